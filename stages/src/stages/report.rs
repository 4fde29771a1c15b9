//! `report`: the sink that writes the run's results as `report.csv` and `report.json`.
//!
//! The CSV has one row per subject and label (for spreadsheets and plotting); the JSON has the
//! run's summary: subjects done and failed with reasons, mean and standard deviation over
//! subjects of the per-subject mean Dice, each subject's deformation quality and timings, and
//! for a run a signal stopped, `"interrupted": true` with the subjects not run. Both are
//! written to a temporary name and renamed, so a reader never sees half a report.
//!
//! A subject whose mean Dice after registration is lower than before (registration made
//! things worse, e.g. on a scan with background noise) is flagged: `worse_than_before` in
//! its CSV rows and its `per_subject` entry, listed under `"worse_than_before"` in the JSON,
//! and named in a warning. It still counts as done (the exit status does not change): the
//! numbers are real, they just deserve a look.
//!
//! Left out: HTML or figures, and per-label statistics over subjects (derivable from the CSV).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::io::IoError;
use crate::registry::{BuildError, StageConfig};
use crate::stage::{Context, Inputs, RunSummary, Stage, StageError, Value};

/// How Dice is computed, stated in `report.json`.
pub const DICE_RULE: &str = "Dice = 2|A∩B|/(|A|+|B|) per label between the subject's labels \
    and the atlas labels on the subject's file grid; a label absent from both volumes compared \
    is skipped (empty in the CSV, left out of the means); subject means average the scored \
    labels; statistics over subjects use the population standard deviation";

/// Parameters of a `report` node.
///
/// ```toml
/// [nodes.report]
/// type = "report"
/// inputs = ["scores"]
/// lut = "../shared/data/FreeSurferColorLUT.txt"
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// A FreeSurfer colour look-up table (`FreeSurferColorLUT.txt` format) naming labels in
    /// the CSV's `name` column. Default: names left empty.
    pub lut: Option<PathBuf>,
}

impl StageConfig for ReportConfig {
    fn files(&self) -> Vec<(String, PathBuf)> {
        self.lut
            .iter()
            .map(|p| ("lut".to_string(), p.clone()))
            .collect()
    }

    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        let names = match &self.lut {
            Some(path) => {
                let text = fs_err::read_to_string(path)
                    .map_err(|e| BuildError::Invalid(format!("report: lut: {e}")))?;
                parse_lut(&text)
            }
            None => HashMap::new(),
        };
        Ok(Arc::new(Report { names }))
    }
}

/// The runtime `report` sink.
#[derive(Clone, Debug)]
pub struct Report {
    names: HashMap<u32, String>,
}

impl Stage for Report {
    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        Some(crate::stage::InputSpec {
            min: 1,
            max: usize::MAX,
            what: "[dice scores, ...]",
            kinds: &[],
            rest: Some(crate::stage::ValueKind::Scores),
            subject: &[],
            one_of: &[],
        })
    }

    fn writes(&self, _inputs: &[crate::stage::ValueFacts]) -> Vec<&'static str> {
        vec!["report.csv", "report.json"]
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        Ok(inputs
            .values
            .first()
            .map(|(_, v)| (*v).clone())
            .unwrap_or_else(|| Value::Written(Arc::new(Vec::new()))))
    }

    fn finish(&self, ctx: &Context<'_>, summary: &RunSummary) -> Result<Vec<PathBuf>, StageError> {
        let csv_path = ctx.output_dir.join("report.csv");
        let json_path = ctx.output_dir.join("report.json");
        write_atomic(&csv_path, self.csv(summary).as_bytes())?;
        let json = serde_json::to_string_pretty(&summary_json(summary))
            .map_err(|e| StageError::Data(format!("report: {e}")))?;
        write_atomic(&json_path, json.as_bytes())?;
        for outcome in sorted(summary) {
            if let Some(scores) = outcome.scores.as_ref().filter(|s| worse_than_before(s)) {
                tracing::warn!(
                    subject = %outcome.subject,
                    dice_before = scores.mean_before,
                    dice_after = scores.mean_after,
                    "Registration lowered the subject's mean Dice; check its scan and result"
                );
            }
        }
        tracing::info!(file = %json_path.display(), "Report written");
        Ok(vec![csv_path, json_path])
    }
}

impl Report {
    /// `subject,label,name,dice_before,dice_after,worse_than_before`, subjects sorted,
    /// skipped Dice empty; the last column is the subject's flag (`true` when its mean Dice
    /// after registration is lower than before), repeated on each of its rows.
    fn csv(&self, summary: &RunSummary) -> String {
        let mut out = String::from("subject,label,name,dice_before,dice_after,worse_than_before\n");
        for outcome in sorted(summary) {
            let Some(scores) = &outcome.scores else {
                continue;
            };
            let worse = worse_than_before(scores);
            for &(label, before, after) in &scores.per_label {
                let name = self.names.get(&label).map(String::as_str).unwrap_or("");
                out.push_str(&format!(
                    "{},{label},{},{},{},{worse}\n",
                    csv_field(&outcome.subject),
                    csv_field(name),
                    number(before),
                    number(after)
                ));
            }
        }
        out
    }
}

/// Whether registration lowered the subject's mean Dice (false when either is undefined).
fn worse_than_before(scores: &crate::stage::Scores) -> bool {
    scores.mean_after < scores.mean_before
}

fn sorted(summary: &RunSummary) -> Vec<&crate::stage::SubjectOutcome> {
    let mut subjects: Vec<_> = summary.subjects.iter().collect();
    subjects.sort_by(|a, b| a.subject.cmp(&b.subject));
    subjects
}

/// The run summary as `report.json` holds it.
fn summary_json(summary: &RunSummary) -> serde_json::Value {
    let subjects = sorted(summary);
    let failures: Vec<_> = subjects
        .iter()
        .filter_map(|o| {
            let (node, reason) = o.failure.as_ref()?;
            Some(json!({"subject": o.subject, "node": node, "reason": reason}))
        })
        .collect();
    let means = |pick: fn(&crate::stage::Scores) -> f64| -> Vec<f64> {
        subjects
            .iter()
            .filter(|o| o.failure.is_none())
            .filter_map(|o| o.scores.as_ref().map(pick))
            .filter(|v| !v.is_nan())
            .collect()
    };
    let (before, after) = (means(|s| s.mean_before), means(|s| s.mean_after));
    let worse: Vec<&str> = subjects
        .iter()
        .filter(|o| o.scores.as_ref().is_some_and(worse_than_before))
        .map(|o| o.subject.as_str())
        .collect();
    let mut not_run: Vec<&str> = summary.not_run.iter().map(String::as_str).collect();
    not_run.sort_unstable();
    let per_subject: Vec<_> = subjects
        .iter()
        .map(|o| {
            let timings: Vec<_> = o
                .timings
                .iter()
                .map(|(node, s)| json!({"node": node, "seconds": s}))
                .collect();
            json!({
                "subject": o.subject,
                "ok": o.failure.is_none(),
                "dice_before": o.scores.as_ref().map(|s| s.mean_before),
                "dice_after": o.scores.as_ref().map(|s| s.mean_after),
                "labels_scored": o.scores.as_ref().map(|s| s.per_label.len()),
                "worse_than_before": o.scores.as_ref().map(worse_than_before),
                "quality": o.scores.as_ref().and_then(|s| s.quality),
                "timings": timings,
            })
        })
        .collect();
    json!({
        "pipeline": summary.pipeline,
        "interrupted": summary.interrupted,
        "subjects": {
            "total": subjects.len() + not_run.len(),
            "ok": subjects.len() - failures.len(),
            "failed": failures.len(),
            "not_run": not_run.len(),
        },
        "failures": failures,
        "not_run": not_run,
        "worse_than_before": worse,
        "dice": {
            "rule": DICE_RULE,
            "subjects_scored": after.len(),
            "mean_before": mean_std(&before).map(|m| m.0),
            "std_before": mean_std(&before).map(|m| m.1),
            "mean_after": mean_std(&after).map(|m| m.0),
            "std_after": mean_std(&after).map(|m| m.1),
        },
        "per_subject": per_subject,
        "total_seconds": summary.elapsed.as_secs_f64(),
    })
}

/// Mean and population standard deviation, `None` for no values.
fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Some((mean, var.sqrt()))
}

/// A Dice value for the CSV: empty when skipped (NaN).
fn number(v: f64) -> String {
    if v.is_nan() {
        String::new()
    } else {
        format!("{v:.6}")
    }
}

/// Quotes a CSV field when it holds a separator, quote or line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// Label names from a FreeSurfer colour table: `id name r g b a` lines, `#` comments.
fn parse_lut(text: &str) -> HashMap<u32, String> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?;
            let mut fields = line.split_whitespace();
            let id = fields.next()?.parse().ok()?;
            Some((id, fields.next()?.to_string()))
        })
        .collect()
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
///
/// # Errors
/// If the folder cannot be created or the file written or renamed; the error names the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let os = |path: &Path| {
        let path = path.to_path_buf();
        move |error| StageError::Io(IoError::Os { path, error })
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(os(dir))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(os(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        os(path)(source)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stage::{Scores, SubjectOutcome, TransformQuality};

    #[test]
    fn example_config_parses() {
        let config: ReportConfig =
            toml::from_str("lut = \"../shared/data/FreeSurferColorLUT.txt\"").unwrap();
        assert_eq!(config.files().len(), 1);
        assert!(toml::from_str::<ReportConfig>("").unwrap().build().is_ok());
    }

    #[test]
    fn lut_lines_give_names() {
        let names = parse_lut(
            "#No. Label Name: R G B A\n\n  0  Unknown 0 0 0 0\n17 Left-Hippocampus 220 216 20 0 # x\n",
        );
        assert_eq!(names.get(&17).map(String::as_str), Some("Left-Hippocampus"));
        assert_eq!(names.len(), 2);
    }

    /// The report of `summary` written into `dir` without label names: its files (CSV, JSON)
    /// and the JSON read back.
    fn written(dir: &Path, summary: &RunSummary) -> (Vec<PathBuf>, serde_json::Value) {
        let ctx = Context {
            subject: "<run>",
            output_dir: dir,
            node: "report",
            entry: None,
        };
        let report = Report {
            names: HashMap::new(),
        };
        let files = report.finish(&ctx, summary).unwrap();
        let json = serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
        (files, json)
    }

    fn outcome(
        subject: &str,
        scores: Option<Scores>,
        failure: Option<(&str, &str)>,
    ) -> SubjectOutcome {
        SubjectOutcome {
            subject: subject.into(),
            failure: failure.map(|(n, r)| (n.into(), r.into())),
            timings: vec![("load".into(), 0.5), ("register".into(), 3.0)],
            scores,
        }
    }

    #[test]
    fn csv_and_json_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let scores = |b: f64, a: f64| Scores {
            per_label: vec![(17, b, a), (53, f64::NAN, a)],
            mean_before: b,
            mean_after: a,
            quality: Some(TransformQuality {
                nonpositive_jacobian_pct: 0.25,
                log_jacobian_std: 0.1,
                final_loss: 0.01,
            }),
        };
        let summary = RunSummary {
            pipeline: "atlas-seg".into(),
            subjects: vec![
                outcome("s2", Some(scores(0.5, 0.9)), None),
                outcome("s1", Some(scores(0.3, 0.7)), None),
                outcome("s3", None, Some(("loaded", "s3/t1.nii: no such file"))),
            ],
            elapsed: Duration::from_millis(12_500),
            ..RunSummary::default()
        };
        let mut names = HashMap::new();
        names.insert(17, "Left-Hippocampus".to_string());
        let report = Report { names };
        let ctx = Context {
            subject: "<constant>",
            output_dir: &dir.path().join("out"),
            node: "report",
            entry: None,
        };
        let files = report.finish(&ctx, &summary).unwrap();
        assert_eq!(files.len(), 2);

        let mut rows = csv::Reader::from_path(&files[0]).unwrap();
        let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            &rows[0],
            vec![
                "s1",
                "17",
                "Left-Hippocampus",
                "0.300000",
                "0.700000",
                "false"
            ]
        );
        assert_eq!(&rows[1], vec!["s1", "53", "", "", "0.700000", "false"]);
        assert_eq!(&rows[3][0], "s2");

        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
        assert_eq!(json["pipeline"], "atlas-seg");
        assert_eq!(json["interrupted"], false);
        assert_eq!(json["not_run"], serde_json::json!([]));
        assert_eq!(json["subjects"]["total"], 3);
        assert_eq!(json["subjects"]["failed"], 1);
        assert_eq!(json["failures"][0]["node"], "loaded");
        let close = |v: &serde_json::Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-12;
        assert!(close(&json["dice"]["mean_before"], 0.4));
        assert!(close(&json["dice"]["std_before"], 0.1));
        assert!(close(&json["dice"]["mean_after"], 0.8));
        assert!(close(
            &json["per_subject"][0]["quality"]["nonpositive_jacobian_pct"],
            0.25
        ));
        assert_eq!(json["per_subject"][0]["timings"][1]["node"], "register");
        assert!(close(&json["total_seconds"], 12.5));
        assert!(
            json["dice"]["rule"]
                .as_str()
                .unwrap()
                .contains("absent from both")
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            2
        );
    }

    #[test]
    fn an_interrupted_run_says_so_and_lists_the_subjects_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let summary = RunSummary {
            pipeline: "p".into(),
            subjects: vec![outcome("s1", None, None)],
            interrupted: true,
            not_run: vec!["s3".into(), "s2".into()],
            ..RunSummary::default()
        };
        let (_, json) = written(dir.path(), &summary);
        assert_eq!(json["interrupted"], true);
        assert_eq!(json["not_run"], serde_json::json!(["s2", "s3"]));
        assert_eq!(
            json["subjects"],
            serde_json::json!({"total": 3, "ok": 1, "failed": 0, "not_run": 2})
        );
        assert_eq!(json["per_subject"].as_array().map(Vec::len), Some(1));
    }

    /// A registration that lowered a subject's Dice (0.21 → 0.07 on a noisy scan) is flagged
    /// in both files and counted, though the subject still counts as done.
    #[test]
    fn a_subject_made_worse_by_registration_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let scores = |b: f64, a: f64| Scores {
            per_label: vec![(17, b, a)],
            mean_before: b,
            mean_after: a,
            quality: None,
        };
        let summary = RunSummary {
            pipeline: "p".into(),
            subjects: vec![
                outcome("noisy", Some(scores(0.21, 0.07)), None),
                outcome("good", Some(scores(0.21, 0.76)), None),
                outcome("same", Some(scores(0.5, 0.5)), None),
                outcome("unscored", Some(scores(f64::NAN, f64::NAN)), None),
                outcome("failed", None, Some(("dice", "truth is all zero"))),
            ],
            ..RunSummary::default()
        };
        let (files, json) = written(dir.path(), &summary);
        assert_eq!(json["worse_than_before"], serde_json::json!(["noisy"]));
        assert_eq!(json["subjects"]["ok"], 4, "still done");
        let flag = |id: &str| {
            let subjects = json["per_subject"].as_array().unwrap();
            let s = subjects.iter().find(|s| s["subject"] == id).unwrap();
            s["worse_than_before"].clone()
        };
        assert_eq!(flag("noisy"), true);
        assert_eq!(flag("good"), false);
        assert_eq!(flag("same"), false, "equal is not worse");
        assert_eq!(flag("unscored"), false);
        assert_eq!(flag("failed"), serde_json::Value::Null);

        let mut rows = csv::Reader::from_path(&files[0]).unwrap();
        assert_eq!(&rows.headers().unwrap()[5], "worse_than_before");
        let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
        let row = |id: &str| rows.iter().find(|r| &r[0] == id).unwrap().clone();
        assert_eq!(
            row("noisy"),
            vec!["noisy", "17", "", "0.210000", "0.070000", "true"]
        );
        assert_eq!(&row("good")[5], "false");
    }
}
