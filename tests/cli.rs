//! End-to-end tests of the `voxflow` command on the real scans in `../shared/data`.
//!
//! Registration runs on a coarse grid here (4 mm) so the suite stays quick on two cores; the
//! Dice floor is set for that resolution and scored, as always, in the subject's 1 mm grid.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use voxflow_stages::io::{read_volume, write_nifti};
use voxflow_stages::volume::DataType;

const LABELS: &str = "[2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, \
                      41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63]";

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// Runs voxflow in `cwd`. Its default volume cache goes under `cwd` when that is a temporary
/// folder, and nowhere near the user's own cache otherwise.
fn voxflow(args: &[&str], cwd: &Path) -> Output {
    command(args, cwd)
        .output()
        .expect("the voxflow binary runs")
}

/// The `voxflow` command [`voxflow`] runs, not started yet.
fn command(args: &[&str], cwd: &Path) -> Command {
    let xdg = if cwd.starts_with(std::env::temp_dir()) {
        cwd.join(".xdg-cache")
    } else {
        std::env::temp_dir().join("voxflow-cli-tests-xdg-cache")
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_voxflow"));
    command
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .env("XDG_CACHE_HOME", xdg);
    command
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The bundled one-shot pipeline with the dataset, resolution and output swapped.
fn oneshot(root: &Path, pattern: &str, resolution: f64, output: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "test-oneshot"
output = "{output}"

[vars]
data = "{data}"

[nodes.atlas]
type = "load"
image = "${{data}}/fsaverage/brain.mgz"
labels = "${{data}}/fsaverage/aseg.mgz"

[nodes.atlas_norm]
type = "normalize"
inputs = ["atlas"]

[nodes.subjects]
type = "dataset"
root = "{root}"
pattern = "{pattern}"
image = "norm.nii.gz"
labels = "seg.nii.gz"

[nodes.scan]
type = "load"
inputs = ["subjects"]

[nodes.oriented]
type = "conform"
inputs = ["scan"]
assume_orientation = "LIA"

[nodes.norm]
type = "normalize"
inputs = ["oriented"]

[nodes.register]
type = "register"
inputs = ["atlas_norm", "norm"]
resolution_mm = {resolution:.1}

[nodes.segment]
type = "segment"
inputs = ["register", "atlas", "oriented"]

[nodes.dice]
type = "dice"
inputs = ["segment", "oriented"]
labels = {LABELS}

[nodes.write]
type = "write"
inputs = ["segment"]
field = true

[nodes.report]
type = "report"
inputs = ["dice"]
"#,
        output = output.display(),
        data = data().display(),
        root = root.display(),
    )
}

fn report(output: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(output.join("report.json")).expect("report.json exists");
    serde_json::from_str(&text).expect("report.json is JSON")
}

#[test]
fn oneshot_pipeline_segments_the_real_subject_and_writes_readable_results() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = tmp.path().join("oneshot.toml");
    std::fs::write(&pipeline, oneshot(&data(), "oasis_like_subject", 4.0, &out)).unwrap();

    let run = voxflow(
        &["run", pipeline.to_str().unwrap(), "--no-progress"],
        tmp.path(),
    );
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        text(&run).contains(&out.display().to_string()),
        "prints where results are"
    );

    let json = report(&out);
    let subject = &json["per_subject"][0];
    let before = subject["dice_before"].as_f64().expect("dice_before");
    let after = subject["dice_after"].as_f64().expect("dice_after");
    assert!(
        after >= 0.65,
        "mean Dice after registration at 4 mm: {after}"
    );
    assert!(
        before < after - 0.2,
        "before {before} should be well under after {after}"
    );

    // Every written volume is in the subject's own geometry (the file's header, identity).
    let original = read_volume(&data().join("oasis_like_subject/norm.nii.gz")).unwrap();
    let truth = read_volume(&data().join("oasis_like_subject/seg.nii.gz")).unwrap();
    for name in ["seg.nii.gz", "warped_atlas.nii.gz", "field.nii.gz"] {
        let path = out.join("oasis_like_subject").join(name);
        let written = read_volume(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(written.shape, original.shape, "{name}");
        assert!(
            (written.affine - original.header.affine).abs().max() < 1e-4,
            "{name}"
        );
    }
    let field = read_volume(&out.join("oasis_like_subject/field.nii.gz")).unwrap();
    assert_eq!(field.frames, 3, "displacement has three components");

    // The written segmentation reproduces the reported Dice against the real labels.
    let seg = read_volume(&out.join("oasis_like_subject/seg.nii.gz")).unwrap();
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    let reported = |label: &str| -> f64 {
        let row = csv
            .lines()
            .find(|l| l.split(',').nth(1) == Some(label))
            .expect(label);
        row.split(',').nth(4).unwrap().parse().unwrap()
    };
    for label in [2.0, 17.0, 41.0] {
        let measured = dice(&seg.data, &truth.data, label);
        let reported = reported(&label.to_string());
        assert!(
            (measured - reported).abs() < 1e-5,
            "label {label}: {measured} vs {reported}"
        );
        assert!(measured > 0.5, "label {label}: Dice {measured}");
    }
    assert_eq!(
        csv.lines().count(),
        31,
        "a header and one row per label:\n{csv}"
    );
}

fn dice(a: &[f32], b: &[f32], label: f32) -> f64 {
    let (mut both, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        na += usize::from(x == label);
        nb += usize::from(y == label);
        both += usize::from(x == label && y == label);
    }
    2.0 * both as f64 / (na + nb) as f64
}

/// Several subjects, good and bad, streamed through one run: the bad ones are reported with
/// their reason and the good ones still finish with real scores.
#[test]
fn dataset_run_reports_bad_subjects_and_finishes_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("dataset");
    let src = data().join("oasis_like_subject");
    let image = read_volume(&src.join("norm.nii.gz")).unwrap();
    let labels = read_volume(&src.join("seg.nii.gz")).unwrap();

    // Two good subjects: the real one, and a copy shifted by 3 voxels along each axis.
    let copy = |name: &str, dx: usize| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut img = image.clone();
        let mut lab = labels.clone();
        img.affine = image.header.affine;
        lab.affine = labels.header.affine;
        if dx > 0 {
            img.data = shift(&image.data, image.shape, dx);
            lab.data = shift(&labels.data, labels.shape, dx);
        }
        write_nifti(&dir.join("norm.nii.gz"), &img, DataType::Float32).unwrap();
        write_nifti(&dir.join("seg.nii.gz"), &lab, DataType::Int16).unwrap();
    };
    copy("s1_real", 0);
    copy("s2_shifted", 3);

    // A truncated image.
    let bad = root.join("s3_truncated");
    std::fs::create_dir_all(&bad).unwrap();
    let bytes = std::fs::read(src.join("norm.nii.gz")).unwrap();
    std::fs::write(bad.join("norm.nii.gz"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(src.join("seg.nii.gz"), bad.join("seg.nii.gz")).unwrap();

    // Labels of another shape than the image.
    let mismatched = root.join("s4_mismatched");
    std::fs::create_dir_all(&mismatched).unwrap();
    std::fs::copy(src.join("norm.nii.gz"), mismatched.join("norm.nii.gz")).unwrap();
    let small =
        voxflow_stages::volume::Volume::new(vec![0.0; 8 * 9 * 10], [8, 9, 10], labels.affine);
    write_nifti(&mismatched.join("seg.nii.gz"), &small, DataType::Int16).unwrap();

    // Not a NIfTI file at all, and a folder without its image.
    let text_file = root.join("s5_not_nifti");
    std::fs::create_dir_all(&text_file).unwrap();
    std::fs::write(text_file.join("norm.nii.gz"), "this is not an image\n").unwrap();
    std::fs::copy(src.join("seg.nii.gz"), text_file.join("seg.nii.gz")).unwrap();
    std::fs::create_dir_all(root.join("s6_missing")).unwrap();

    let out = tmp.path().join("out");
    let pipeline = tmp.path().join("dataset.toml");
    // The two good subjects are registered in one batch; the bad ones fail before it.
    let batched = oneshot(&root, "s*", 4.0, &out)
        .replace("type = \"register\"", "type = \"register\"\nbatch = 2");
    std::fs::write(&pipeline, batched).unwrap();
    let run = voxflow(
        &["run", pipeline.to_str().unwrap(), "--no-progress"],
        tmp.path(),
    );
    let log = text(&run);
    assert_eq!(run.status.code(), Some(1), "some subjects failed:\n{log}");

    let json = report(&out);
    let subjects = json["per_subject"].as_array().expect("per-subject list");
    assert_eq!(subjects.len(), 6, "{json:#}");
    assert_eq!(json["subjects"]["failed"], 4, "{json:#}");
    let by_id = |id: &str| {
        subjects
            .iter()
            .find(|s| s["subject"] == id)
            .expect(id)
            .clone()
    };
    let failures = json["failures"].as_array().expect("failures list");
    let failure = |id: &str| failures.iter().find(|f| f["subject"] == id).cloned();
    // One batch: each subject is charged half of its time.
    let register_seconds = |id: &str| {
        let s = by_id(id);
        let timings = s["timings"].as_array().cloned().unwrap_or_default();
        let t = timings.iter().find(|t| t["node"] == "register");
        t.and_then(|t| t["seconds"].as_f64())
            .unwrap_or_else(|| panic!("{id}: no register timing in {s}"))
    };
    assert_eq!(register_seconds("s1_real"), register_seconds("s2_shifted"));
    for good in ["s1_real", "s2_shifted"] {
        let s = by_id(good);
        assert_eq!(s["ok"], true, "{good}: {s}");
        assert!(failure(good).is_none(), "{good}");
        assert!(s["dice_after"].as_f64().unwrap() > 0.65, "{good}: {s}");
        assert!(out.join(good).join("seg.nii.gz").exists(), "{good} written");
    }
    for (bad, culprit) in [
        ("s3_truncated", "norm.nii.gz"),
        ("s4_mismatched", "seg.nii.gz"),
        ("s5_not_nifti", "norm.nii.gz"),
        ("s6_missing", "norm.nii.gz"),
    ] {
        let f = failure(bad).unwrap_or_else(|| panic!("{bad} is listed as failed: {json:#}"));
        let reason = f["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(culprit), "{bad}: {reason}");
        assert!(log.contains(bad), "{bad} is named in the log");
        assert!(
            !out.join(bad).join("seg.nii.gz").exists(),
            "{bad} wrote no result"
        );
    }
}

/// Shifts a volume by `d` voxels along every axis (zeros enter at the low end).
fn shift(data: &[f32], shape: [usize; 3], d: usize) -> Vec<f32> {
    let [ni, nj, nk] = shape;
    let mut out = vec![0.0; data.len()];
    for k in d..nk {
        for j in d..nj {
            for i in d..ni {
                out[i + ni * (j + nj * k)] = data[(i - d) + ni * ((j - d) + nj * (k - d))];
            }
        }
    }
    out
}

fn validate(pipeline: &str) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.toml");
    std::fs::write(&path, pipeline).unwrap();
    let out = voxflow(&["validate", path.to_str().unwrap()], tmp.path());
    (out.status.code(), text(&out))
}

fn broken(edit: impl Fn(String) -> String) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    validate(&edit(oneshot(
        &data(),
        "oasis_like_subject",
        4.0,
        &tmp.path().join("o"),
    )))
}

#[test]
fn bundled_pipelines_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        let out = voxflow(&["validate", path.to_str().unwrap()], root);
        assert!(out.status.success(), "{}: {}", path.display(), text(&out));
    }
}

#[test]
fn a_cycle_is_named_with_its_nodes() {
    let (code, msg) = broken(|p| p.replace("inputs = [\"scan\"]", "inputs = [\"norm\"]"));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("cycle") && msg.contains("oriented") && msg.contains("norm"),
        "{msg}"
    );
    assert!(msg.contains("broken.toml:"), "{msg}");
}

#[test]
fn a_typoed_parameter_is_named_with_its_line() {
    let (code, msg) = broken(|p| p.replace("resolution_mm =", "resolution_m ="));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("resolution_m") && msg.contains("node `register`"),
        "{msg}"
    );
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l.starts_with("resolution_mm")),
        "{msg}"
    );
}

/// The line number of the first `broken.toml:LINE:` location in a `validate` message.
fn first_error_line(msg: &str) -> usize {
    msg.split("broken.toml:")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no location in {msg}"))
}

/// The 1-based line of the test pipeline (as `broken` starts from) that `pick` chooses.
fn line_of(pick: impl Fn(&str) -> bool) -> usize {
    oneshot(&data(), "x", 4.0, Path::new("o"))
        .lines()
        .position(pick)
        .expect("line in the test pipeline")
        + 1
}

#[test]
fn a_wrong_number_of_inputs_is_named_with_its_line() {
    let (code, msg) =
        broken(|p| p.replace("inputs = [\"atlas_norm\", \"norm\"]", "inputs = [\"norm\"]"));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `register`")
            && msg.contains("takes 2 inputs")
            && msg.contains("lists 1"),
        "{msg}"
    );
    assert!(msg.contains("broken.toml:"), "{msg}");
}

#[test]
fn an_input_of_the_wrong_kind_is_named_with_its_line() {
    // The report fed segmentations instead of Dice scores.
    let (code, msg) = broken(|p| {
        p.replace(
            "type = \"report\"\ninputs = [\"dice\"]",
            "type = \"report\"\ninputs = [\"segment\"]",
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `report`")
            && msg.contains("input 0 (\"segment\") gives a segmentation")
            && msg.contains("this input takes Dice scores"),
        "{msg}"
    );
    // Segment's inputs in the wrong order: a scan where the registration goes.
    let (code, msg) = broken(|p| {
        p.replace(
            "inputs = [\"register\", \"atlas\", \"oriented\"]",
            "inputs = [\"oriented\", \"atlas\", \"register\"]",
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("input 0 (\"oriented\") gives a scan, but this input takes a transform")
            && msg.contains("input 2 (\"register\") gives a transform"),
        "{msg}"
    );
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "inputs = [\"register\", \"atlas\", \"oriented\"]"),
        "{msg}"
    );
}

/// Two scans swapped: both of the right kind, but the atlas sits where the subject goes.
#[test]
fn the_atlas_where_the_subject_goes_is_named_with_its_line() {
    let (code, msg) = broken(|p| {
        p.replace(
            "inputs = [\"register\", \"atlas\", \"oriented\"]",
            "inputs = [\"register\", \"oriented\", \"atlas\"]",
        )
        .replace(
            "inputs = [\"atlas_norm\", \"norm\"]",
            "inputs = [\"norm\", \"atlas_norm\"]",
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    for (node, input) in [
        ("segment", "input 2 (\"atlas\")"),
        ("register", "input 1 (\"atlas_norm\")"),
    ] {
        assert!(
            msg.contains(&format!("node `{node}`"))
                && msg.contains(&format!("{input} is the same for every subject")),
            "{node}: {msg}"
        );
    }
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "inputs = [\"atlas_norm\", \"norm\"]"),
        "{msg}"
    );
}

#[test]
fn batch_on_a_node_that_cannot_batch_is_named_with_its_line() {
    let (code, msg) = broken(|p| p.replace("type = \"segment\"", "type = \"segment\"\nbatch = 4"));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `segment`") && msg.contains("`batch` applies to `register`"),
        "{msg}"
    );
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "type = \"segment\"") + 1,
        "{msg}"
    );
    let (code, msg) =
        broken(|p| p.replace("type = \"register\"", "type = \"register\"\nbatch = 0"));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("`batch` must be a whole number from 1 to"),
        "{msg}"
    );
}

/// `device = "cuda"` where libtorch sees none stops `run` before its first subject, naming
/// the node and the line (it used to fail every subject in turn and exit 1); `auto` and `cpu`
/// still pass.
#[test]
fn cuda_without_a_cuda_device_stops_the_run_before_any_subject() {
    if tch::Cuda::is_available() {
        return;
    }
    let with_device = |device: &'static str| {
        move |p: String| {
            p.replace(
                "type = \"register\"",
                &format!("type = \"register\"\ndevice = \"{device}\""),
            )
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = tmp.path().join("broken.toml");
    let cuda = with_device("cuda")(oneshot(&data(), "oasis_like_subject", 4.0, &out));
    std::fs::write(&pipeline, cuda).unwrap();
    let run = voxflow(
        &["run", pipeline.to_str().unwrap(), "--no-progress"],
        tmp.path(),
    );
    let msg = text(&run);
    assert_eq!(run.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("node `register`") && msg.contains("no CUDA device"),
        "{msg}"
    );
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "type = \"register\"") + 1,
        "{msg}"
    );
    assert!(!msg.contains("Starting run"), "{msg}");
    assert!(!out.join("oasis_like_subject").exists(), "{msg}");

    for device in ["auto", "cpu"] {
        let (code, msg) = broken(with_device(device));
        assert_eq!(code, Some(0), "{device}: {msg}");
    }
}

/// `skull_strip` with `method = "mask"` on scans whose dataset names no mask would fail every
/// subject: `validate` names the node and its line. A dataset `mask` or a `mask` file on the
/// node passes, and a subject whose declared mask file is missing still fails alone.
#[test]
fn skull_strip_mask_without_any_mask_is_named_with_its_line() {
    let strip = "\n[nodes.strip]\ntype = \"skull_strip\"\ninputs = [\"oriented\"]\n";
    let with_strip = |p: String| format!("{p}{strip}");
    let (code, msg) = broken(with_strip);
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `strip`") && msg.contains("method = \"mask\""),
        "{msg}"
    );
    let lines = oneshot(&data(), "x", 4.0, Path::new("o")).lines().count();
    assert_eq!(
        first_error_line(&msg),
        lines + 4,
        "the strip node's inputs: {msg}"
    );

    let (code, msg) = broken(|p| {
        with_strip(p).replace(
            "labels = \"seg.nii.gz\"",
            "labels = \"seg.nii.gz\"\nmask = \"seg.nii.gz\"",
        )
    });
    assert_eq!(code, Some(0), "a dataset mask: {msg}");
    let mask_file = format!(
        "mask = \"{}\"\n",
        data().join("oasis_like_subject/seg.nii.gz").display()
    );
    let (code, msg) = broken(|p| format!("{}{mask_file}", with_strip(p)));
    assert_eq!(code, Some(0), "a mask file: {msg}");

    // Declared but missing for the subject: that subject fails in `load`, naming the file.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = tmp.path().join("p.toml");
    let missing = with_strip(oneshot(&data(), "oasis_like_subject", 4.0, &out)).replace(
        "labels = \"seg.nii.gz\"",
        "labels = \"seg.nii.gz\"\nmask = \"brainmask.nii.gz\"",
    );
    std::fs::write(&pipeline, missing).unwrap();
    let run = voxflow(
        &["run", pipeline.to_str().unwrap(), "--no-progress"],
        tmp.path(),
    );
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    let json = report(&out);
    assert_eq!(json["failures"][0]["node"], "scan", "{json:#}");
    let reason = json["failures"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("brainmask.nii.gz"), "{reason}");
}

/// A `write` fed nothing it can write (Dice scores only) is named with its line.
#[test]
fn a_write_with_nothing_to_write_is_named_with_its_line() {
    let (code, msg) = broken(|p| {
        p.replace(
            "type = \"write\"\ninputs = [\"segment\"]",
            "type = \"write\"\ninputs = [\"dice\"]",
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `write`")
            && msg.contains("no input gives a segmentation or a scan")
            && msg.contains("Dice scores"),
        "{msg}"
    );
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "type = \"write\"") + 1,
        "{msg}"
    );
}

/// `dice` scores against the subject scan's label map: a dataset that declares no `labels`
/// would fail every subject, so `validate` names the node and its `inputs` line. `segment`
/// does not need the subject's labels and says nothing.
#[test]
fn dice_against_subjects_without_label_maps_is_named_with_its_line() {
    let (code, msg) = broken(|p| p);
    assert_eq!(code, Some(0), "the unedited pipeline: {msg}");

    let (code, msg) = broken(|p| {
        p.replace(
            "image = \"norm.nii.gz\"\nlabels = \"seg.nii.gz\"\n",
            "image = \"norm.nii.gz\"\n",
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `dice`") && msg.contains("the subjects there have no label maps"),
        "{msg}"
    );
    assert!(!msg.contains("node `segment`"), "{msg}");
    // The line in the edited file, one line shorter than the one `line_of` reads.
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "inputs = [\"segment\", \"oriented\"]") - 1,
        "{msg}"
    );

    // A manifest: no row with labels is named too; when only some rows have labels, each
    // subject without them fails on its own.
    let tmp = tempfile::tempdir().unwrap();
    let subject = data().join("oasis_like_subject");
    let as_manifest = |cells: &[&str]| {
        let mut rows = "subject,image,labels\n".to_string();
        for (n, cell) in cells.iter().enumerate() {
            let labels = if cell.is_empty() {
                String::new()
            } else {
                subject.join(cell).display().to_string()
            };
            rows += &format!("s{n},{},{labels}\n", subject.join("norm.nii.gz").display());
        }
        let path = tmp.path().join(format!("m{}.csv", cells.join("-")));
        std::fs::write(&path, rows).unwrap();
        move |p: String| {
            let from = p.find("root = ").expect("the dataset's root");
            let to = from + p[from..].find("\n\n").expect("the end of the dataset node");
            format!(
                "{}manifest = \"{}\"{}",
                &p[..from],
                path.display(),
                &p[to..]
            )
        }
    };
    let (code, msg) = broken(as_manifest(&["", ""]));
    assert_eq!(code, Some(2), "no row has labels: {msg}");
    assert!(msg.contains("node `dice`"), "{msg}");
    let (code, msg) = broken(as_manifest(&["seg.nii.gz", "seg.nii.gz"]));
    assert_eq!(code, Some(0), "every row has labels: {msg}");
    let (code, msg) = broken(as_manifest(&["seg.nii.gz", ""]));
    assert_eq!(code, Some(0), "some rows have labels: {msg}");
}

/// `segment` carries the atlas scan's label map: an atlas `load` without `labels` (here
/// through a `conform`, as in `oneshot-raw-heads.toml`) would fail every subject, and
/// `validate` names the node and its `inputs` line.
#[test]
fn an_atlas_without_labels_is_named_with_its_line() {
    let unlabelled = |p: String| p.replace("labels = \"${data}/fsaverage/aseg.mgz\"\n", "");
    let (code, msg) = broken(unlabelled);
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `segment`") && msg.contains("the atlas scan (input 1)"),
        "{msg}"
    );
    assert!(!msg.contains("node `dice`"), "{msg}");
    // The line in the edited file, one line shorter than the one `line_of` reads.
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "inputs = [\"register\", \"atlas\", \"oriented\"]") - 1,
        "{msg}"
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let raw_heads = std::fs::read_to_string(root.join("pipelines/oneshot-raw-heads.toml"))
        .unwrap()
        .replace(
            "data = \"../shared/data\"",
            &format!("data = \"{}\"", data().display()),
        );
    let (code, msg) = validate(&raw_heads);
    assert_eq!(code, Some(0), "{msg}");
    let (code, msg) =
        validate(&raw_heads.replace("labels = \"${data}/oasis_like_subject/seg.nii.gz\"\n", ""));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `segment`") && msg.contains("the atlas scan (input 1)"),
        "{msg}"
    );
}

/// A dataset that declares `labels` passes `validate` even if a subject lacks the file:
/// that subject fails alone, in `load`, naming the file, and the others are scored.
#[test]
fn a_subject_missing_its_declared_labels_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("dataset");
    let src = data().join("oasis_like_subject");
    for (name, files) in [
        ("s1_labelled", &["norm.nii.gz", "seg.nii.gz"][..]),
        ("s2_unlabelled", &["norm.nii.gz"][..]),
    ] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        for file in files {
            std::os::unix::fs::symlink(src.join(file), root.join(name).join(file)).unwrap();
        }
    }
    let out = tmp.path().join("out");
    let pipeline = tmp.path().join("p.toml");
    std::fs::write(&pipeline, oneshot(&root, "s*", 4.0, &out)).unwrap();
    let check = voxflow(&["validate", pipeline.to_str().unwrap()], tmp.path());
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));

    let run = voxflow(
        &["run", pipeline.to_str().unwrap(), "--no-progress"],
        tmp.path(),
    );
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    let json = report(&out);
    let failures = json["failures"].as_array().expect("failures list");
    assert_eq!(failures.len(), 1, "{json:#}");
    assert_eq!(failures[0]["subject"], "s2_unlabelled", "{json:#}");
    assert_eq!(failures[0]["node"], "scan", "{json:#}");
    let reason = failures[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("s2_unlabelled/seg.nii.gz"), "{reason}");
    assert!(out.join("s1_labelled").join("seg.nii.gz").exists());
}

#[test]
fn validate_lists_settings_and_graph_problems_together() {
    let (code, msg) = broken(|p| {
        p.replacen("name = \"test-oneshot\"", "nmae = \"test-oneshot\"", 1)
            .replace("inputs = [\"atlas_norm\", \"norm\"]", "inputs = [\"norm\"]")
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("nmae"), "{msg}");
    assert!(msg.contains("takes 2 inputs"), "{msg}");
}

#[test]
fn a_typo_in_a_sub_table_points_at_that_table() {
    let (code, msg) = broken(|p| {
        p.replace(
            "[nodes.segment]",
            "[nodes.register.deformable]\nstpe = 1.0\n\n[nodes.segment]",
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("`stpe` in [deformable]"), "{msg}");
    assert_eq!(
        first_error_line(&msg),
        line_of(|l| l == "[nodes.segment]"),
        "{msg}"
    );
}

/// An even NCC window ran as the next odd one and a `field_shrink` of 12 ran as 1 (the
/// finest field): validate refuses both, naming the node.
#[test]
fn validate_refuses_an_even_window_and_a_field_shrink_out_of_range() {
    let (code, msg) = broken(|p| {
        p.replace(
            "[nodes.segment]",
            "[nodes.register.deformable]\nwindow = 4\nfield_shrink = 12\n\n[nodes.segment]",
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("node `register`"), "{msg}");
    assert!(
        msg.contains("deformable.window must be an odd number of voxels, at least 3, got 4"),
        "{msg}"
    );
    assert!(
        msg.contains("deformable.field_shrink must be from 1 to 8, got 12"),
        "{msg}"
    );
}

#[test]
fn a_load_with_both_a_file_and_an_input_is_caught_by_validate() {
    let (code, msg) = broken(|p| {
        p.replacen(
            "inputs = [\"subjects\"]",
            "inputs = [\"subjects\"]\nimage = \"elsewhere.nii.gz\"",
            1,
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `scan`") && msg.contains("takes 0 inputs"),
        "{msg}"
    );
}

#[test]
fn a_dataset_pattern_that_matches_nothing_fails_validate() {
    let (code, msg) =
        broken(|p| p.replace("pattern = \"oasis_like_subject\"", "pattern = \"nobody_*\""));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("node `subjects`") && msg.contains("cannot list the dataset"),
        "{msg}"
    );
}

#[test]
fn a_bogus_log_level_is_a_usage_error() {
    let out = voxflow(
        &[
            "--log-level",
            "bogus",
            "validate",
            "pipelines/oneshot-aseg.toml",
        ],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not a log level"), "{}", text(&out));
}

#[test]
fn an_unknown_node_type_is_named_with_a_suggestion() {
    let (code, msg) = broken(|p| p.replace("type = \"segment\"", "type = \"segmnet\""));
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("segmnet") && msg.contains("did you mean \"segment\""),
        "{msg}"
    );
}

#[test]
fn a_missing_file_and_a_dangling_input_are_both_reported() {
    let (code, msg) = broken(|p| {
        p.replace("fsaverage/aseg.mgz", "fsaverage/no-such.mgz")
            .replace("[\"segment\"]", "[\"segmentt\"]")
    });
    assert_eq!(code, Some(2), "{msg}");
    assert!(
        msg.contains("no-such.mgz") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(
        msg.contains("segmentt") && msg.contains("names no node"),
        "{msg}"
    );
}

#[test]
fn graph_prints_dot_with_every_edge() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("p.toml");
    std::fs::write(
        &path,
        oneshot(&data(), "oasis_like_subject", 4.0, &tmp.path().join("o")),
    )
    .unwrap();
    let out = voxflow(&["graph", path.to_str().unwrap()], tmp.path());
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains("\"atlas_norm\" -> \"register\""), "{dot}");
    assert!(dot.contains("\"norm\" -> \"register\""), "{dot}");
    assert_eq!(dot.matches("->").count(), 13, "{dot}");
}

#[test]
fn inspect_reports_geometry_as_json_and_rejects_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let aseg = data().join("fsaverage/aseg.mgz");
    let out = voxflow(&["inspect", aseg.to_str().unwrap(), "--json"], tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["shape"], serde_json::json!([256, 256, 256]));
    assert_eq!(json["orientation"], "LIA");
    assert_eq!(json["affine_source"], "mgh");
    assert_eq!(json["dtype"], "float32");
    assert_eq!(json["min"], 0.0);
    assert_eq!(json["n_nan"], 0);
    for key in ["voxel_size", "affine", "max", "mean"] {
        assert!(!json[key].is_null(), "{key} in {json}");
    }

    let garbage = tmp.path().join("garbage.nii");
    std::fs::write(&garbage, b"not a volume").unwrap();
    let out = voxflow(&["inspect", garbage.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("garbage.nii"), "{}", text(&out));

    let missing = tmp.path().join("missing.nii.gz");
    let out = voxflow(&["inspect", missing.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let said = text(&out);
    assert!(said.contains("missing.nii.gz"), "{said}");
    assert_eq!(
        said.matches("os error").count(),
        1,
        "the OS reason once: {said}"
    );
}

/// Binary Dice of two masks (inside: value > 0).
fn mask_dice(a: &[f32], b: &[f32]) -> f64 {
    let (mut both, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        na += usize::from(x > 0.0);
        nb += usize::from(y > 0.0);
        both += usize::from(x > 0.0 && y > 0.0);
    }
    2.0 * both as f64 / (na + nb) as f64
}

/// The bundled `skullstrip-eval` pipeline (atlas method, each head stripped with the other
/// two), registering at 4 mm so the test stays quick: every head's written mask is in the
/// head's own geometry and overlaps its reference mask. Floors are for 4 mm; the bench
/// measures the bundled 2 mm setting.
#[test]
fn skullstrip_eval_strips_each_head_with_the_other_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundled = std::fs::read_to_string(root.join("pipelines/skullstrip-eval.toml")).unwrap();
    let pipeline = bundled
        .replace(
            "output = \"out/skullstrip-eval\"",
            &format!("output = \"{}\"", out.display()),
        )
        .replace(
            "data = \"../shared/data\"",
            &format!("data = \"{}\"", data().display()),
        )
        + "\n[nodes.stripped.atlas]\nregister.resolution_mm = 4.0\n";
    let path = tmp.path().join("skullstrip-eval.toml");
    std::fs::write(&path, pipeline).unwrap();

    let run = voxflow(
        &["run", path.to_str().unwrap(), "--no-progress"],
        tmp.path(),
    );
    assert!(run.status.success(), "{}", text(&run));
    let log = text(&run);
    for (subject, head, reference, floor) in [
        (
            "colin27",
            "colin27/ch2.nii.gz",
            "colin27/ch2bet.nii.gz",
            0.90,
        ),
        (
            "mni152",
            "mni152/MNI152_T1.nii.gz",
            "mni152/MNI152_mask.nii.gz",
            0.955,
        ),
        ("fsaverage", "fsaverage/T1.mgz", "fsaverage/brain.mgz", 0.90),
    ] {
        let written = read_volume(&out.join(subject).join("mask.nii.gz"))
            .unwrap_or_else(|e| panic!("{subject}: {e}"));
        let head = read_volume(&data().join(head)).unwrap();
        let reference = read_volume(&data().join(reference)).unwrap();
        assert_eq!(written.shape, head.shape, "{subject}");
        assert!(
            (written.affine - head.header.affine).abs().max() < 1e-4,
            "{subject}: the mask is not in the head's geometry"
        );
        assert!(
            written.data.iter().all(|&x| x == 0.0 || x == 1.0),
            "{subject}: mask values are not 0/1"
        );
        let d = mask_dice(&written.data, &reference.data);
        eprintln!("{subject}: atlas-method mask Dice at 4 mm {d:.4}");
        assert!(d >= floor, "{subject}: Dice {d} under {floor}\n{log}");
    }
}

/// `(hits, misses)` the end-of-run cache summary logged for `node`.
fn cache_counts(log: &str, node: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("Volume cache") && l.contains(&format!(" node={node} ")))
        .unwrap_or_else(|| panic!("no cache summary for {node}:\n{log}"));
    let count = |name: &str| -> u64 {
        let at = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    (count("hits"), count("misses"))
}

/// A temporary copy of the real subject (so a test may touch its files) and the one-shot
/// pipeline on it with its volume cache in `cache`.
fn cached_oneshot(tmp: &Path, cache: &Path) -> PathBuf {
    let root = tmp.join("data");
    let subject = root.join("subj");
    std::fs::create_dir_all(&subject).unwrap();
    for name in ["norm.nii.gz", "seg.nii.gz"] {
        std::fs::copy(
            data().join("oasis_like_subject").join(name),
            subject.join(name),
        )
        .unwrap();
    }
    let text = oneshot(&root, "subj", 4.0, Path::new("out")).replacen(
        "[pipeline]\n",
        &format!("[pipeline]\ncache = \"{}\"\n", cache.display()),
        1,
    );
    let pipeline = tmp.join("cached.toml");
    std::fs::write(&pipeline, text).unwrap();
    pipeline
}

fn run_into(pipeline: &Path, output: &str, extra: &[&str], cwd: &Path) -> String {
    let mut args = vec!["run", pipeline.to_str().unwrap(), "--no-progress"];
    args.extend(["--output", output]);
    args.extend(extra);
    let run = voxflow(&args, cwd);
    assert!(run.status.success(), "{}", text(&run));
    text(&run)
}

const PREPROCESSING: [&str; 5] = ["atlas", "atlas_norm", "scan", "oriented", "norm"];

/// A second run reads every preprocessing node from the cache and writes the same bytes;
/// changing a parameter misses that node and what follows; touching an input file misses
/// the nodes of that subject but not the atlas.
#[test]
fn a_rerun_reads_preprocessed_scans_from_the_cache_until_something_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let pipeline = cached_oneshot(tmp.path(), &cache);

    let cold = run_into(&pipeline, "out1", &[], tmp.path());
    for node in PREPROCESSING {
        assert_eq!(cache_counts(&cold, node), (0, 1), "{node} cold");
    }
    let warm = run_into(&pipeline, "out2", &[], tmp.path());
    for node in PREPROCESSING {
        assert_eq!(cache_counts(&warm, node), (1, 0), "{node} warm");
    }
    for name in ["seg.nii.gz", "warped_atlas.nii.gz", "field.nii.gz"] {
        let read = |out: &str| std::fs::read(tmp.path().join(out).join("subj").join(name)).unwrap();
        assert!(
            read("out1") == read("out2"),
            "{name} differs after a cached run"
        );
    }
    let dice = |out: &str| report(&tmp.path().join(out))["per_subject"][0]["dice_after"].clone();
    assert_eq!(dice("out1"), dice("out2"));

    // Another normalization of the subject: only `norm` misses.
    let text = std::fs::read_to_string(&pipeline).unwrap().replacen(
        "inputs = [\"oriented\"]\n",
        "inputs = [\"oriented\"]\npercentiles = [1.0, 99.0]\n",
        1,
    );
    std::fs::write(&pipeline, text).unwrap();
    let changed = run_into(&pipeline, "out3", &[], tmp.path());
    for (node, counts) in [
        ("atlas_norm", (1, 0)),
        ("oriented", (1, 0)),
        ("norm", (0, 1)),
    ] {
        assert_eq!(
            cache_counts(&changed, node),
            counts,
            "{node} after a parameter change"
        );
    }

    // A touched label file: the subject's nodes miss, the atlas still hits.
    let seg = std::fs::File::options()
        .write(true)
        .open(tmp.path().join("data/subj/seg.nii.gz"))
        .unwrap();
    seg.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .unwrap();
    let touched = run_into(&pipeline, "out4", &[], tmp.path());
    for (node, counts) in [("atlas", (1, 0)), ("scan", (0, 1)), ("oriented", (0, 1))] {
        assert_eq!(
            cache_counts(&touched, node),
            counts,
            "{node} after touching seg"
        );
    }
}

/// `--no-cache` writes nothing; a truncated entry is named in a warning, recomputed and
/// replaced, and the run succeeds; `cache clear` empties the folder.
#[test]
fn a_damaged_cache_entry_is_recomputed_and_no_cache_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let pipeline = cached_oneshot(tmp.path(), &cache);

    run_into(&pipeline, "out0", &["--no-cache"], tmp.path());
    assert!(!cache.exists(), "--no-cache created {}", cache.display());
    assert!(!tmp.path().join(".xdg-cache").exists());

    run_into(&pipeline, "out1", &[], tmp.path());
    let mut files: Vec<PathBuf> = Vec::new();
    for shard in std::fs::read_dir(&cache).unwrap().flatten() {
        for entry in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            files.push(entry.path().join("0.f32"));
        }
    }
    assert_eq!(files.len(), PREPROCESSING.len(), "{files:?}");
    for file in &files {
        let f = std::fs::File::options().write(true).open(file).unwrap();
        f.set_len(1000).unwrap();
    }
    let damaged = run_into(&pipeline, "out2", &[], tmp.path());
    assert!(
        damaged.contains("Cache entry unreadable") && damaged.contains("0.f32"),
        "{damaged}"
    );
    for node in PREPROCESSING {
        assert_eq!(cache_counts(&damaged, node), (0, 1), "{node} recomputed");
    }
    assert_eq!(
        report(&tmp.path().join("out1"))["per_subject"][0]["dice_after"],
        report(&tmp.path().join("out2"))["per_subject"][0]["dice_after"]
    );
    let repaired = run_into(&pipeline, "out3", &[], tmp.path());
    for node in PREPROCESSING {
        assert_eq!(cache_counts(&repaired, node), (1, 0), "{node} replaced");
    }

    let clear = voxflow(
        &["cache", "clear", "--dir", cache.to_str().unwrap()],
        tmp.path(),
    );
    assert!(clear.status.success(), "{}", text(&clear));
    assert!(
        text(&clear).contains("removed 5 entries"),
        "{}",
        text(&clear)
    );
    let left: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "only CACHEDIR.TAG stays: {left:?}");
}

/// The cache entries (64-hex folders in two-hex shards) under `cache`.
fn cache_entries(cache: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().len() == 64 {
                found.push(entry.path());
            }
        }
    }
    found
}

/// `--cache-max-gb` replaces the file's cap; a cap smaller than what one run uses lets the
/// run succeed (reading its hits first), warns, and leaves no entry and no temporary folder,
/// but keeps files that are not the cache's.
#[test]
fn a_cache_over_its_cap_is_evicted_at_the_end_of_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let pipeline = cached_oneshot(tmp.path(), &cache);
    let capped = std::fs::read_to_string(&pipeline).unwrap().replacen(
        "[pipeline]\n",
        "[pipeline]\ncache_max_gb = 0.000001\n",
        1,
    );
    std::fs::write(&pipeline, capped).unwrap();

    let roomy = run_into(&pipeline, "out1", &["--cache-max-gb", "10"], tmp.path());
    assert!(!roomy.contains("evicted"), "{roomy}");
    assert_eq!(cache_entries(&cache).len(), PREPROCESSING.len());
    std::fs::write(cache.join("notes.txt"), b"mine").unwrap();

    let tight = run_into(&pipeline, "out2", &[], tmp.path());
    for node in PREPROCESSING {
        assert_eq!(
            cache_counts(&tight, node),
            (1, 0),
            "{node} read before eviction"
        );
    }
    assert!(tight.contains("cap is smaller"), "{tight}");
    assert!(
        tight.contains("evicted least recently used entries") && tight.contains("entries=5"),
        "{tight}"
    );
    assert_eq!(cache_entries(&cache), Vec::<PathBuf>::new());
    for shard in std::fs::read_dir(&cache).unwrap().flatten() {
        let inside: Vec<_> = std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        assert!(
            inside.is_empty(),
            "left in {}: {inside:?}",
            shard.path().display()
        );
    }
    assert!(cache.join("notes.txt").exists() && cache.join("CACHEDIR.TAG").exists());

    let bad = voxflow(
        &["run", pipeline.to_str().unwrap(), "--cache-max-gb", "0"],
        tmp.path(),
    );
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(
        text(&bad).contains("positive number of gigabytes"),
        "{}",
        text(&bad)
    );
}

/// Six copies of the real subject under `tmp/dataset`, and the one-shot pipeline on them.
fn six_subjects(tmp: &Path, out: &Path) -> PathBuf {
    for id in ["s1", "s2", "s3", "s4", "s5", "s6"] {
        let dir = tmp.join("dataset").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["norm.nii.gz", "seg.nii.gz"] {
            std::fs::copy(data().join("oasis_like_subject").join(name), dir.join(name)).unwrap();
        }
    }
    let pipeline = tmp.join("six.toml");
    std::fs::write(&pipeline, oneshot(&tmp.join("dataset"), "s*", 4.0, out)).unwrap();
    pipeline
}

/// Starts `voxflow run` on `pipeline`, sends it `signal` (a `kill` name) once its log shows
/// `when`, and returns its exit status, stdout and log.
fn run_and_signal(pipeline: &Path, cwd: &Path, when: &str, signal: &str) -> (Option<i32>, String) {
    use std::io::{BufRead, BufReader, Read};
    let mut child = command(&["run", pipeline.to_str().unwrap(), "--no-progress"], cwd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the voxflow binary starts");
    let mut log = String::new();
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut sent = false;
    let mut line = String::new();
    while lines.read_line(&mut line).expect("the log is text") > 0 {
        if !sent && line.contains(when) {
            let kill = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(kill.success());
            sent = true;
        }
        log.push_str(&line);
        line.clear();
    }
    let status = child.wait().expect("voxflow ends");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(sent, "never saw {when:?}:\n{log}");
    (status.code(), format!("{stdout}{log}"))
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Ctrl-C once the first subject is done: the run takes no more subjects, writes the report
/// of those that finished with `"interrupted": true` and the rest as not run, leaves no
/// temporary file, and exits 130.
#[test]
fn sigint_after_the_first_subject_writes_the_report_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = six_subjects(tmp.path(), &out);
    let (code, log) = run_and_signal(&pipeline, tmp.path(), "Subject done", "INT");
    assert_eq!(code, Some(130), "{log}");
    assert!(log.contains("interrupted by SIGINT"), "{log}");

    let json = report(&out);
    assert_eq!(json["interrupted"], true, "{json:#}");
    let done: Vec<&str> = json["per_subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["subject"].as_str().unwrap())
        .collect();
    let not_run: Vec<&str> = json["not_run"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(done.first(), Some(&"s1"), "{json:#}");
    assert!(!not_run.is_empty() && !not_run.contains(&"s1"), "{json:#}");
    assert_eq!(done.len() + not_run.len(), 6, "{json:#}");
    assert_eq!(json["subjects"]["total"], 6, "{json:#}");
    assert_eq!(json["subjects"]["failed"], 0, "{json:#}");
    assert!(json["per_subject"][0]["dice_after"].as_f64().unwrap() > 0.65);
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert!(
        csv.lines()
            .skip(1)
            .all(|l| done.iter().any(|d| l.starts_with(d)))
    );

    // Nothing half-written: no temporary name left, and every volume reads back whole.
    for file in files_under(&out) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.contains(".tmp"), "left behind: {}", file.display());
        if name.ends_with(".nii.gz") {
            read_volume(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
    }
    assert!(out.join("s1/seg.nii.gz").exists());
}

/// SIGTERM (a scheduler stopping the job) before any subject finished: exit 143 and a
/// report with every subject not run.
#[test]
fn sigterm_before_any_subject_finishes_reports_every_subject_not_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pipeline = six_subjects(tmp.path(), &out);
    let (code, log) = run_and_signal(&pipeline, tmp.path(), "Starting run", "TERM");
    assert_eq!(code, Some(143), "{log}");
    let json = report(&out);
    assert_eq!(json["interrupted"], true, "{json:#}");
    assert_eq!(
        json["not_run"].as_array().map(Vec::len),
        Some(6),
        "{json:#}"
    );
    assert_eq!(json["per_subject"], serde_json::json!([]), "{json:#}");
}

/// The README's recipe for one's own dataset: the bundled pipeline, its `subjects` and
/// `subject_pattern` set from the shell, runs every subject folder found there.
#[test]
fn the_bundled_pipeline_runs_on_another_dataset_from_the_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = tmp.path().join("lab dataset").join("sub-01");
    std::fs::create_dir_all(&subject).unwrap();
    for name in ["norm.nii.gz", "seg.nii.gz"] {
        std::fs::copy(
            data().join("oasis_like_subject").join(name),
            subject.join(name),
        )
        .unwrap();
    }
    let out = tmp.path().join("out");
    let run = command(
        &[
            "run",
            "pipelines/oneshot-aseg.toml",
            "--no-progress",
            "--no-cache",
            "--output",
            out.to_str().unwrap(),
        ],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .env("subjects", tmp.path().join("lab dataset"))
    .env("subject_pattern", "sub-*")
    .output()
    .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    assert!(out.join("sub-01").join("seg.nii.gz").is_file());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let text = report.to_string();
    assert!(
        text.contains("sub-01") && !text.contains("oasis_like_subject"),
        "{text}"
    );
}

/// `--threads 0` names the range it takes, not `1..18446744073709551615`.
#[test]
fn threads_out_of_range_names_a_readable_range() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for value in ["0", "1025"] {
        let out = voxflow(
            &[
                "run",
                "pipelines/oneshot-aseg.toml",
                "--threads",
                value,
                "--no-progress",
            ],
            root,
        );
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(2), "{msg}");
        assert!(
            msg.contains(&format!("{value} is not in 1..=1024")),
            "{msg}"
        );
        assert!(!msg.contains("18446744073709551615"), "{msg}");
    }
}

/// `cache clear --dir` on a folder voxflow never made its cache: exit 2, the folder named,
/// and its hex-named folder still there.
#[test]
fn cache_clear_refuses_a_folder_that_is_not_a_voxflow_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mine");
    let hex = dir.join("0f").join("e".repeat(64));
    std::fs::create_dir_all(&hex).unwrap();
    std::fs::write(hex.join("notes.txt"), b"keep me").unwrap();
    let out = voxflow(
        &["cache", "clear", "--dir", dir.to_str().unwrap()],
        tmp.path(),
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains(&dir.display().to_string()) && msg.contains("not a voxflow cache folder"),
        "{msg}"
    );
    assert_eq!(std::fs::read(hex.join("notes.txt")).unwrap(), b"keep me");
}

/// A lab manifest with metadata columns validates; the extra columns are logged once, and a
/// near miss of a column voxflow reads is a warning naming it.
#[test]
fn a_manifest_with_extra_columns_validates_and_logs_them_once() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("subjects.csv");
    std::fs::write(
        &manifest,
        "subject,image,labels,age,sex,diagnosis,lables\n\
         s1,s1/norm.nii.gz,s1/seg.nii.gz,71,F,AD,s1/x.nii.gz\n\
         s2,s2/norm.nii.gz,s2/seg.nii.gz,64,M,CN,s2/x.nii.gz\n",
    )
    .unwrap();
    let pipeline = tmp.path().join("p.toml");
    let toml = oneshot(&data(), "x", 4.0, &tmp.path().join("out")).replace(
        &format!(
            "root = \"{}\"\npattern = \"x\"\nimage = \"norm.nii.gz\"\nlabels = \"seg.nii.gz\"",
            data().display()
        ),
        &format!("manifest = \"{}\"", manifest.display()),
    );
    assert!(toml.contains("manifest ="), "{toml}");
    std::fs::write(&pipeline, toml).unwrap();
    let out = voxflow(&["validate", pipeline.to_str().unwrap()], tmp.path());
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(0), "{msg}");
    assert!(msg.contains("2 subjects"), "{msg}");
    assert_eq!(msg.matches("Manifest columns ignored").count(), 1, "{msg}");
    assert!(
        msg.contains("INFO") && msg.contains("\"age\", \"sex\", \"diagnosis\""),
        "{msg}"
    );
    assert_eq!(msg.matches("did you mean \"labels\"").count(), 1, "{msg}");
}

/// An empty `cache` or `output` (literally, or from a variable that expands to nothing)
/// stops `run` at validation with the key's line, and nothing is written in the working
/// directory the empty path would have named.
#[test]
fn empty_output_and_cache_folders_are_refused_with_their_line() {
    for (setting, expects) in [
        ("cache = \"\"", "`cache` is empty"),
        (
            "cache = \"${VOXFLOW_TEST_NEVER_SET:-}\"",
            "`cache` is empty (after expanding ${VOXFLOW_TEST_NEVER_SET:-})",
        ),
        ("output = \"\"", "`output` is empty"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cwd = tmp.path().join("work");
        std::fs::create_dir(&cwd).unwrap();
        let toml = oneshot(&data(), "oasis_like_subject", 4.0, Path::new("unused"));
        let toml = toml.replacen("output = \"unused\"", setting, 1);
        std::fs::write(tmp.path().join("p.toml"), &toml).unwrap();
        let line = toml.lines().position(|l| l == setting).unwrap() + 1;
        let out = voxflow(&["run", "../p.toml", "--no-progress"], &cwd);
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(2), "{setting}: {msg}");
        assert!(
            msg.contains(&format!("p.toml:{line}:")) && msg.contains(expects),
            "{setting}: {msg}"
        );
        assert!(!msg.contains("results:"), "{setting}: {msg}");
        let written: Vec<_> = std::fs::read_dir(&cwd).unwrap().flatten().collect();
        assert!(written.is_empty(), "{setting}: wrote {written:?}");
    }
}

/// `data= subjects= voxflow run` on a bundled pipeline: the error names each empty
/// environment variable and the [vars] value it replaces, on each line that uses it,
/// instead of `root: "" does not exist`.
#[test]
fn an_empty_environment_variable_is_named_where_it_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/oneshot-aseg.toml");
    let out = command(
        &["run", pipeline.to_str().unwrap(), "--no-progress"],
        tmp.path(),
    )
    .env("data", "")
    .env("subjects", "")
    .output()
    .expect("the voxflow binary runs");
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(2), "{msg}");
    let toml = std::fs::read_to_string(&pipeline).unwrap();
    for key in [
        "root = \"${subjects}",
        "image = \"${data}",
        "lut = \"${data}",
    ] {
        let line = toml.lines().position(|l| l.starts_with(key)).unwrap() + 1;
        assert!(
            msg.contains(&format!("oneshot-aseg.toml:{line}:")),
            "line {line} ({key}) not named: {msg}"
        );
    }
    for (name, value) in [("data", "../shared/data"), ("subjects", "../shared/data")] {
        assert!(
            msg.contains(&format!(
                "the environment variable `{name}` is set but empty (it replaces [vars] \
                 {name} = \"{value}\")"
            )),
            "{name}: {msg}"
        );
    }
    assert!(!msg.contains("does not exist"), "{msg}");
    // Only the lines that use them: no knock-on errors from the nodes they left unbuilt.
    let uses = toml
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| l.contains("${data}") || l.contains("${subjects}"))
        .count();
    assert!(msg.contains(&format!("hint: {uses} problem(s)")), "{msg}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// Two `report` nodes would write the same report.json and report.csv (the last one wins,
/// losing the other's label names): validate names the second with the first's line.
#[test]
fn two_reports_into_one_output_are_named_with_both_lines() {
    let (code, msg) = broken(|p| {
        format!(
            "{p}\n[nodes.report_named]\ntype = \"report\"\ninputs = [\"dice\"]\n\
             lut = \"{}/FreeSurferColorLUT.txt\"\n",
            data().display()
        )
    });
    assert_eq!(code, Some(2), "{msg}");
    let first = line_of(|l| l == "[nodes.report]");
    let second = oneshot(&data(), "x", 4.0, Path::new("o")).lines().count() + 2;
    assert!(
        msg.contains(&format!("broken.toml:{second}:1: node `report_named`"))
            && msg.contains("report.csv, report.json")
            && msg.contains(&format!("node `report` (line {first})")),
        "{msg}"
    );
}

/// Two `write` nodes fed segmentations write the same files for every subject; a second
/// `write` of something else (a skull-stripped scan's mask) is fine.
#[test]
fn two_writes_of_the_same_files_are_named_with_both_lines() {
    let (code, msg) = broken(|p| {
        format!("{p}\n[nodes.write_again]\ntype = \"write\"\ninputs = [\"segment\", \"dice\"]\n")
    });
    assert_eq!(code, Some(2), "{msg}");
    let first = line_of(|l| l == "[nodes.write]");
    assert!(
        msg.contains("node `write_again`")
            && msg.contains("<subject>/seg.nii.gz, <subject>/warped_atlas.nii.gz")
            && !msg.contains("field.nii.gz")
            && msg.contains(&format!("node `write` (line {first})")),
        "{msg}"
    );

    let (code, msg) = broken(|p| {
        format!(
            "{p}\n[nodes.strip]\ntype = \"skull_strip\"\ninputs = [\"oriented\"]\n\
             method = \"auto\"\n\n[nodes.write_mask]\ntype = \"write\"\ninputs = [\"strip\"]\n"
        )
    });
    assert_eq!(code, Some(0), "{msg}");
}

/// The tester's case: `--output` equal to the dataset root (or a folder holding it, or a
/// link to it, however spelt) would replace each subject's `seg.nii.gz` with the
/// prediction. The run stops before writing anything (not even its lock file), exit 2,
/// naming both folders; `validate` catches the same `output` in the file.
#[test]
fn an_output_folder_that_is_or_holds_the_dataset_root_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("x");
    let subject = root.join("s0");
    std::fs::create_dir_all(&subject).unwrap();
    for name in ["norm.nii.gz", "seg.nii.gz"] {
        std::fs::copy(
            data().join("oasis_like_subject").join(name),
            subject.join(name),
        )
        .unwrap();
    }
    let truth = std::fs::read(subject.join("seg.nii.gz")).unwrap();
    let pipeline = tmp.path().join("p.toml");
    std::fs::write(&pipeline, oneshot(&root, "*", 4.0, &tmp.path().join("out"))).unwrap();
    std::os::unix::fs::symlink(&root, tmp.path().join("link")).unwrap();

    for output in [
        root.clone(),
        tmp.path().to_path_buf(),
        tmp.path().join("link"),
        root.join("not-yet/.."),
    ] {
        let out = voxflow(
            &[
                "run",
                pipeline.to_str().unwrap(),
                "--no-progress",
                "--output",
                output.to_str().unwrap(),
            ],
            tmp.path(),
        );
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(2), "{}: {msg}", output.display());
        assert!(
            msg.contains(&format!("output folder {}", output.display()))
                && msg.contains(&format!("dataset root {}", root.display())),
            "{}: {msg}",
            output.display()
        );
    }
    assert_eq!(std::fs::read(subject.join("seg.nii.gz")).unwrap(), truth);
    let mut left: Vec<String> = files_under(&root)
        .iter()
        .map(|f| f.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["s0/norm.nii.gz", "s0/seg.nii.gz"]);

    let in_file = tmp.path().join("in-file.toml");
    std::fs::write(&in_file, oneshot(&root, "*", 4.0, &root)).unwrap();
    let out = voxflow(&["validate", in_file.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is the dataset root"), "{}", text(&out));
}

/// A tiny scan and brain mask (2×2×2 voxels) as `t1.nii.gz` and `mask.nii.gz` in `dir`.
fn tiny_subject(dir: &Path) {
    use voxflow_stages::volume::{Affine, Volume};
    std::fs::create_dir_all(dir).unwrap();
    let image = Volume::new(
        (0..8).map(|v| v as f32).collect(),
        [2, 2, 2],
        Affine::identity(),
    );
    write_nifti(&dir.join("t1.nii.gz"), &image, DataType::Float32).unwrap();
    let mask = Volume::new(vec![1.0; 8], [2, 2, 2], Affine::identity());
    write_nifti(&dir.join("mask.nii.gz"), &mask, DataType::Uint8).unwrap();
}

/// dataset → load → write: each subject's brain mask written back as `mask.nii.gz`, with
/// nothing computed in between (no cache).
fn mask_copy(source: &str) -> String {
    format!(
        "[pipeline]\nname = \"masks\"\ncache = false\n\n[nodes.subjects]\ntype = \"dataset\"\n\
         {source}\n\n[nodes.scan]\ntype = \"load\"\ninputs = [\"subjects\"]\n\n\
         [nodes.write]\ntype = \"write\"\ninputs = [\"scan\"]\n"
    )
}

/// An output folder that is a manifest's own folder puts `s0/mask.nii.gz` where the
/// manifest's mask is: `write` fails that subject (exit 1) naming the file, which keeps its
/// bytes, and writes the subject whose files are elsewhere.
#[test]
fn write_never_replaces_a_subjects_own_file() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("study");
    tiny_subject(&study.join("s0"));
    tiny_subject(&tmp.path().join("elsewhere/s1"));
    std::fs::write(
        study.join("subjects.csv"),
        "subject,image,mask\ns0,s0/t1.nii.gz,s0/mask.nii.gz\n\
         s1,../elsewhere/s1/t1.nii.gz,../elsewhere/s1/mask.nii.gz\n",
    )
    .unwrap();
    let before = std::fs::read(study.join("s0/mask.nii.gz")).unwrap();
    let pipeline = tmp.path().join("p.toml");
    std::fs::write(
        &pipeline,
        mask_copy(&format!("manifest = \"{}/subjects.csv\"", study.display())),
    )
    .unwrap();
    let out = voxflow(
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--no-progress",
            "--output",
            study.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains(&format!(
            "{} is this subject's own mask file",
            study.join("s0/mask.nii.gz").display()
        )),
        "{msg}"
    );
    assert_eq!(std::fs::read(study.join("s0/mask.nii.gz")).unwrap(), before);
    assert!(study.join("s1/mask.nii.gz").is_file(), "{msg}");
}

/// `root = "."` and `pattern = "*"`: `.git` is no subject, and the second run does not
/// find the first run's `out/` as one.
#[test]
fn hidden_folders_and_the_runs_own_output_are_no_subjects() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["s1", "s2", ".git", ".datalad"] {
        tiny_subject(&tmp.path().join(dir));
    }
    std::fs::write(
        tmp.path().join("p.toml"),
        mask_copy("root = \".\"\npattern = \"*\"\nimage = \"t1.nii.gz\"\nmask = \"mask.nii.gz\""),
    )
    .unwrap();
    for run in 1..=2 {
        let out = voxflow(&["run", "p.toml", "--no-progress"], tmp.path());
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(0), "run {run}: {msg}");
        assert!(msg.contains("2 subjects, 0 failed"), "run {run}: {msg}");
        let validated = voxflow(&["validate", "p.toml"], tmp.path());
        assert!(
            text(&validated).contains("(3 nodes, 2 subjects)"),
            "{}",
            text(&validated)
        );
    }
    let mut written: Vec<String> = files_under(&tmp.path().join("out/masks"))
        .iter()
        .map(|f| f.strip_prefix(tmp.path()).unwrap().display().to_string())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "out/masks/.voxflow.lock",
            "out/masks/s1/mask.nii.gz",
            "out/masks/s2/mask.nii.gz"
        ]
    );
}
