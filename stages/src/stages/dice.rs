//! `dice`: scores a segmentation against the subject's own labels.
//!
//! For each label, Dice = 2|A∩B| / (|A| + |B|) between the truth (the subject's labels on its
//! file grid) and the atlas labels, both before registration (headers alone) and after.
//!
//! **Rule for absent labels:** when a label is in neither of the two volumes compared, that
//! Dice is undefined (0/0) and skipped: it is NaN in [`Scores::per_label`] and left out of the
//! mean. A label in none of the three volumes has no row at all. With the default label list
//! (every non-zero label of the truth) this never happens; it can with an explicit `labels`.
//!
//! **A truth with none of the scored labels** (an all-zero label map, or one of another
//! labelling) fails the subject with an error naming its file: every Dice would be 0 or
//! undefined, and counted as a result it would pull the dataset's mean down for a reason
//! that is the data's, not the registration's. This holds whatever the segmentation holds.
//!
//! All labels are counted in one pass over the voxels through a label→index lookup table.
//!
//! Left out: surface distances (Hausdorff, ASSD) and per-label volumes; they can be added to
//! [`Scores`] later.

use std::sync::Arc;

use serde::Deserialize;

use crate::registry::{BuildError, StageConfig};
use crate::stage::{Context, Inputs, Scores, Stage, StageError, Value, ValueFacts};

/// Largest label value: beyond 2^24, `f32` voxels no longer hold every integer exactly.
const MAX_LABEL: u32 = 1 << 24;

/// Parameters of a `dice` node; inputs are `[segmentation, subject scan]`.
///
/// ```toml
/// [nodes.scores]
/// type = "dice"
/// inputs = ["segmented", "loaded"]
/// labels = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46,
///           47, 49, 50, 51, 52, 53, 54, 60, 63]
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiceConfig {
    /// Labels to score. Default: every non-zero label present in the subject's truth.
    pub labels: Option<Vec<u32>>,
}

impl StageConfig for DiceConfig {
    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        let labels = match self.labels {
            Some(list) if list.is_empty() => {
                return Err(BuildError::Invalid(
                    "dice: `labels` is empty; remove it to score every label of the truth".into(),
                ));
            }
            Some(list) if list.iter().any(|&l| l > MAX_LABEL) => {
                return Err(BuildError::Invalid(format!(
                    "dice: labels above {MAX_LABEL} cannot be stored exactly in a volume"
                )));
            }
            Some(mut list) => {
                list.sort_unstable();
                list.dedup();
                Some(list)
            }
            None => None,
        };
        Ok(Arc::new(Dice { labels }))
    }
}

/// The runtime `dice` stage.
#[derive(Clone, Debug)]
pub struct Dice {
    labels: Option<Vec<u32>>,
}

impl Stage for Dice {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Scores)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        use crate::stage::ValueKind::{Scan, Segmentation};
        Some(
            crate::stage::InputSpec::of(&[Segmentation, Scan], "[segmentation, subject scan]")
                .subject_at(&[1]),
        )
    }

    /// The truth is input 1's label map: scans known to carry none (their dataset or `load`
    /// names no `labels`) would fail every subject.
    fn input_problem(&self, inputs: &[ValueFacts]) -> Option<String> {
        inputs
            .get(1)
            .is_some_and(ValueFacts::scan_without_labels)
            .then(|| {
                "dice: scores against the label map of the subject scan (input 1), but the \
                 subjects there have no label maps (their dataset or `load` names no \
                 `labels`), so every subject would fail; give the dataset `labels`, or remove \
                 the `dice` node"
                    .to_string()
            })
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let seg = match inputs.get(0)? {
            Value::Segmentation(s) => s,
            other => {
                return Err(StageError::Input(format!(
                    "dice: inputs are [segmentation, subject scan]; input 0 is a {}",
                    other.kind()
                )));
            }
        };
        let subject = inputs.scan(1)?.native_scan();
        let file = subject.image.header.path.display().to_string();
        let Some(truth) = &subject.labels else {
            return Err(StageError::Input(format!(
                "dice: subject {file} has no labels to compare with"
            )));
        };
        for (what, v) in [
            ("labels", &seg.labels),
            ("initial labels", &seg.initial_labels),
        ] {
            if v.shape != truth.shape {
                return Err(StageError::Input(format!(
                    "dice: segmentation {what} have shape {:?} but the truth of {file} has {:?}",
                    v.shape, truth.shape
                )));
            }
        }
        let truth_file = truth.header.path.display();
        let labels = match &self.labels {
            Some(list) => list.clone(),
            None => present_labels(&truth.data)
                .map_err(|e| StageError::Data(format!("dice: labels of {file}: {e}")))?,
        };
        if let Some(problem) = truth_problem(&truth.data, &labels) {
            return Err(StageError::Data(format!(
                "dice: truth label map {truth_file} (of {file}) {problem}; check the \
                 subject's labels file"
            )));
        }
        let mut scores = dice_scores(
            &truth.data,
            &seg.initial_labels.data,
            &seg.labels.data,
            &labels,
        );
        scores.quality = Some(seg.transform.quality);
        tracing::debug!(
            labels = scores.per_label.len(),
            before = scores.mean_before,
            after = scores.mean_after,
            "Dice"
        );
        Ok(Value::Scores(Arc::new(scores)))
    }
}

/// The label a voxel value stands for (values are rounded), if it is a valid one.
#[inline]
fn label_of(v: f32) -> Option<u32> {
    (v >= 0.0 && v < MAX_LABEL as f32).then(|| v.round() as u32)
}

/// Why `truth` cannot be scored on `labels` (sorted): it holds none of them, so every Dice
/// would be 0 (or undefined) whatever the segmentation. `None` when at least one occurs.
fn truth_problem(truth: &[f32], labels: &[u32]) -> Option<String> {
    let scored = |v: f32| label_of(v).is_some_and(|l| labels.binary_search(&l).is_ok());
    if truth.iter().any(|&v| scored(v)) {
        return None;
    }
    if truth.iter().all(|&v| v == 0.0) {
        return Some("is all zero: it holds none of the scored labels".into());
    }
    let found = present_labels(truth).unwrap_or_default();
    if found.is_empty() {
        return Some("holds no valid label".into());
    }
    let shown: Vec<String> = found.iter().take(8).map(u32::to_string).collect();
    let more = if found.len() > shown.len() {
        ", …"
    } else {
        ""
    };
    Some(format!(
        "holds none of the scored labels {labels:?} (it holds {}{more})",
        shown.join(", ")
    ))
}

/// Sorted non-zero labels present in `truth`.
fn present_labels(truth: &[f32]) -> Result<Vec<u32>, String> {
    let mut seen: Vec<bool> = Vec::new();
    for &v in truth {
        let Some(label) = label_of(v) else {
            return Err(format!("voxel value {v} is not a label (0 to {MAX_LABEL})"));
        };
        let l = label as usize;
        if l >= seen.len() {
            seen.resize(l + 1, false);
        }
        seen[l] = true;
    }
    Ok((1..seen.len())
        .filter(|&l| seen[l])
        .map(|l| l as u32)
        .collect())
}

/// Dice of `labels` between `truth` and each of `before` and `after`, in one pass.
fn dice_scores(truth: &[f32], before: &[f32], after: &[f32], labels: &[u32]) -> Scores {
    const NONE: u32 = u32::MAX;
    let top = labels.iter().copied().max().unwrap_or(0) as usize;
    let mut lut = vec![NONE; top + 1];
    for (n, &l) in labels.iter().enumerate() {
        lut[l as usize] = n as u32;
    }
    let index = |v: f32| match label_of(v) {
        Some(l) if (l as usize) <= top => lut[l as usize],
        _ => NONE,
    };

    // Per label: voxels in truth, before, after, truth∩before, truth∩after.
    let mut counts = vec![[0u64; 5]; labels.len()];
    for ((&t, &b), &a) in truth.iter().zip(before).zip(after) {
        let (ti, bi, ai) = (index(t), index(b), index(a));
        if ti != NONE {
            let c = &mut counts[ti as usize];
            c[0] += 1;
            c[3] += u64::from(bi == ti);
            c[4] += u64::from(ai == ti);
        }
        if bi != NONE {
            counts[bi as usize][1] += 1;
        }
        if ai != NONE {
            counts[ai as usize][2] += 1;
        }
    }

    let dice = |both: u64, a: u64, b: u64| {
        if a + b == 0 {
            f64::NAN
        } else {
            2.0 * both as f64 / (a + b) as f64
        }
    };
    let per_label: Vec<(u32, f64, f64)> = labels
        .iter()
        .zip(&counts)
        .map(|(&l, c)| (l, dice(c[3], c[0], c[1]), dice(c[4], c[0], c[2])))
        .filter(|(_, before, after)| !(before.is_nan() && after.is_nan()))
        .collect();
    Scores {
        mean_before: nan_mean(per_label.iter().map(|r| r.1)),
        mean_after: nan_mean(per_label.iter().map(|r| r.2)),
        per_label,
        quality: None,
    }
}

/// Mean of the non-NaN values (NaN if there are none).
fn nan_mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let config: DiceConfig = toml::from_str(
            "labels = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, \
             43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63]",
        )
        .unwrap();
        assert_eq!(config.labels.as_ref().map(Vec::len), Some(30));
        assert!(config.build().is_ok());
        assert!(
            toml::from_str::<DiceConfig>("labels = []")
                .unwrap()
                .build()
                .is_err()
        );
    }

    /// `validate` names a dice whose truth is known to be missing for every subject, and
    /// only that: labels on some subjects, or unknown, leave it to each subject.
    #[test]
    fn subjects_without_label_maps_are_an_input_problem() {
        use crate::stage::ValueKind;
        let stage = DiceConfig::default().build().unwrap();
        let facts = |kind, labels| ValueFacts {
            kind: Some(kind),
            mask: None,
            labels,
        };
        let segmentation = facts(ValueKind::Segmentation, None);
        let problem = |labels| stage.input_problem(&[segmentation, facts(ValueKind::Scan, labels)]);
        let message = problem(Some(false)).expect("no truth for any subject");
        assert!(
            message.contains("input 1") && message.contains("no label maps"),
            "{message}"
        );
        assert_eq!(problem(Some(true)), None);
        assert_eq!(problem(None), None);
        // Another kind at input 1 is reported as such, not as missing labels.
        let entry = facts(ValueKind::Entry, Some(false));
        assert_eq!(stage.input_problem(&[segmentation, entry]), None);
    }

    #[test]
    fn known_overlaps_give_known_values() {
        // Label 1: truth 4 voxels, after 2 of them plus 2 others → 2·2/(4+4) = 0.5.
        // Label 2: truth 2 voxels, after exactly those → 1.
        let truth = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.0, 0.0];
        let after = [1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 1.0, 1.0];
        let before = [0.0; 8];
        let s = dice_scores(&truth, &before, &after, &[1, 2]);
        assert_eq!(s.per_label, vec![(1, 0.0, 0.5), (2, 0.0, 1.0)]);
        assert_eq!((s.mean_before, s.mean_after), (0.0, 0.75));
    }

    #[test]
    fn absent_labels_are_skipped() {
        let truth = [1.0, 1.0, 0.0, 0.0];
        let before = [0.0, 0.0, 5.0, 0.0];
        let after = [1.0, 1.0, 0.0, 0.0];
        // 3 is nowhere: no row. 5 is only in `before`: before Dice 0, after undefined.
        let s = dice_scores(&truth, &before, &after, &[1, 3, 5]);
        assert_eq!(s.per_label.len(), 2);
        assert_eq!(s.per_label[0], (1, 0.0, 1.0));
        assert_eq!(s.per_label[1].0, 5);
        assert_eq!(s.per_label[1].1, 0.0);
        assert!(s.per_label[1].2.is_nan());
        assert_eq!((s.mean_before, s.mean_after), (0.0, 1.0));
    }

    use crate::stage::{Scan, Segmentation, Transform};
    use crate::volume::{Affine, Grid, SourceHeader, Volume};

    /// A 2×2×2 volume of `data` read from `path`.
    fn volume(path: &str, data: [f32; 8]) -> Arc<Volume> {
        let v = Volume::new(data.to_vec(), [2, 2, 2], Affine::identity());
        Arc::new(Volume {
            header: Arc::new(SourceHeader {
                path: path.into(),
                ..(*v.header).clone()
            }),
            ..v
        })
    }

    /// The `dice` stage's result for a subject whose truth is `truth` and whose
    /// segmentation (before and after registration) is `seg`.
    fn run(labels: Option<Vec<u32>>, truth: [f32; 8], seg: [f32; 8]) -> Result<Value, StageError> {
        let seg = volume("seg.nii.gz", seg);
        let segmentation = Value::Segmentation(Arc::new(Segmentation {
            labels: seg.clone(),
            initial_labels: seg.clone(),
            warped_image: seg,
            transform: Arc::new(Transform {
                affine: Affine::identity(),
                displacement: None,
                inverse: None,
                fixed_grid: Grid {
                    shape: [2, 2, 2],
                    affine: Affine::identity(),
                },
                quality: Default::default(),
            }),
        }));
        let subject = Value::Scan(Arc::new(Scan {
            image: volume("data/s1/norm.nii.gz", [1.0; 8]),
            labels: Some(volume("data/s1/seg.nii.gz", truth)),
            mask: None,
            native: None,
        }));
        let stage = DiceConfig { labels }.build().unwrap();
        let ctx = Context {
            subject: "s1",
            output_dir: std::path::Path::new("out"),
            node: "dice",
            entry: None,
        };
        let inputs = Inputs {
            values: vec![("segment", &segmentation), ("scan", &subject)],
        };
        stage.process(&ctx, &inputs)
    }

    /// An all-zero truth scored Dice 0 and counted as a result; it must fail the subject,
    /// naming the truth's file, whether the segmentation holds the labels or not.
    #[test]
    fn an_all_zero_truth_fails_the_subject_naming_its_file() {
        let seg = [0.0, 2.0, 2.0, 17.0, 0.0, 0.0, 0.0, 0.0];
        for (labels, seg) in [
            (Some(vec![2, 17]), seg),
            (Some(vec![2, 17]), [0.0; 8]),
            (None, seg),
            (None, [0.0; 8]),
        ] {
            let err = run(labels.clone(), [0.0; 8], seg).unwrap_err().to_string();
            assert!(
                err.contains("data/s1/seg.nii.gz") && err.contains("all zero"),
                "{labels:?}: {err}"
            );
        }
        // The truth holds labels, but none of those scored.
        let err = run(
            Some(vec![2, 17]),
            [0.0, 0.0, 41.0, 0.0, 0.0, 0.0, 0.0, 5.0],
            seg,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("data/s1/seg.nii.gz") && err.contains("none of the scored labels [2, 17]"),
            "{err}"
        );
        assert!(err.contains("it holds 5, 41"), "{err}");

        // One scored label in the truth is enough: a real (poor) result.
        let truth = [0.0, 0.0, 0.0, 17.0, 0.0, 0.0, 0.0, 0.0];
        let Ok(Value::Scores(scores)) = run(Some(vec![2, 17]), truth, seg) else {
            panic!("scored");
        };
        assert_eq!(scores.per_label, vec![(2, 0.0, 0.0), (17, 1.0, 1.0)]);
    }

    #[test]
    fn default_labels_are_the_truths_non_zero_ones() {
        assert_eq!(
            present_labels(&[0.0, 17.0, 2.0, 2.0, 41.0]).unwrap(),
            [2, 17, 41]
        );
        assert!(present_labels(&[-1.0]).is_err());
    }
}
