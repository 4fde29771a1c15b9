//! Stages chained the way a pipeline chains them, on files: tiny NIfTI files the tests write
//! themselves, and the real scans in `../shared/data`.
//!
//! Every test here goes through `io::read_volume` or `io::write_nifti`, so they fail until
//! the formats work is merged (the placeholder reader and writer return errors). The logic of
//! each stage is covered on in-memory volumes by the unit tests beside it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use voxflow_stages::io::{read_volume, write_nifti};
use voxflow_stages::registry;
use voxflow_stages::stage::{
    Context, Inputs, Scan, Scores, Segmentation, Stage, StageError, Transform, TransformQuality,
    Value,
};
use voxflow_stages::volume::{Affine, DataType, Volume, affine_from_orientation, orientation_code};

fn stage(kind: &str, params: &str) -> Arc<dyn Stage> {
    let table: toml::Table = toml::from_str(params).expect("test parameters are valid TOML");
    match registry::build(kind, table) {
        Ok(built) => built.stage,
        Err(e) => panic!("{kind}: {e}"),
    }
}

fn run(
    stage: &dyn Stage,
    subject: &str,
    out: &Path,
    values: &[&Value],
) -> Result<Value, StageError> {
    let ctx = Context {
        subject,
        output_dir: out,
        node: "test",
        entry: None,
    };
    let inputs = Inputs {
        values: values.iter().map(|v| ("upstream", *v)).collect(),
    };
    stage.process(&ctx, &inputs)
}

fn shared_data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(rel)
}

fn identity_transform(scan: &Scan) -> Value {
    Value::Transform(Arc::new(Transform {
        affine: Affine::identity(),
        displacement: None,
        inverse: None,
        fixed_grid: scan.image.grid(),
        quality: TransformQuality::default(),
    }))
}

fn as_scan(v: &Value) -> Arc<Scan> {
    match v {
        Value::Scan(s) => s.clone(),
        other => panic!("expected a scan, got a {}", other.kind()),
    }
}

fn blob(shape: [usize; 3], affine: Affine) -> (Volume, Volume) {
    let mut image = Vec::new();
    let mut labels = Vec::new();
    for k in 0..shape[2] {
        for j in 0..shape[1] {
            for i in 0..shape[0] {
                let inside = (2..6).contains(&i) && (2..5).contains(&j) && (1..4).contains(&k);
                image.push(if inside { 100.0 + i as f32 } else { 5.0 });
                labels.push(if !inside {
                    0.0
                } else if i < 4 {
                    17.0
                } else {
                    53.0
                });
            }
        }
    }
    (
        Volume::new(image, shape, affine),
        Volume::new(labels, shape, affine),
    )
}

#[test]
fn load_reports_both_files_and_shapes_when_labels_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = blob([8, 7, 5], Affine::identity());
    let (_, labels) = blob([8, 7, 6], Affine::identity());
    let image_path = dir.path().join("t1.nii.gz");
    let labels_path = dir.path().join("aseg.nii.gz");
    write_nifti(&image_path, &image, DataType::Float32).unwrap();
    write_nifti(&labels_path, &labels, DataType::Int16).unwrap();
    let load = stage(
        "load",
        &format!("image = {image_path:?}\nlabels = {labels_path:?}"),
    );
    let err = run(load.as_ref(), "<constant>", dir.path(), &[])
        .unwrap_err()
        .to_string();
    for part in ["t1.nii.gz", "aseg.nii.gz", "[8, 7, 5]", "[8, 7, 6]"] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
}

#[test]
fn load_counts_non_finite_voxels_or_zeroes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut image, _) = blob([4, 4, 4], Affine::identity());
    image.data[3] = f32::NAN;
    image.data[9] = f32::INFINITY;
    let path = dir.path().join("nan.nii");
    write_nifti(&path, &image, DataType::Float32).unwrap();
    let err = run(
        stage("load", &format!("image = {path:?}")).as_ref(),
        "<constant>",
        dir.path(),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("nan.nii") && err.contains("2 NaN or infinite"),
        "{err}"
    );
    let zeroed = run(
        stage("load", &format!("image = {path:?}\nnon_finite = \"zero\"")).as_ref(),
        "<constant>",
        dir.path(),
        &[],
    )
    .unwrap();
    assert_eq!(as_scan(&zeroed).image.data[3], 0.0);
}

/// dataset → load → conform (declared orientation) → segment → dice → write, with the
/// subject as its own atlas and an identity transform: Dice 1, and outputs in the file's
/// stated geometry.
#[test]
fn chain_on_written_files_scores_one_and_writes_in_file_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let (image, labels) = blob([8, 7, 5], Affine::identity());
    for subject in ["s1", "s2"] {
        let folder = root.join(subject);
        std::fs::create_dir_all(&folder).unwrap();
        write_nifti(&folder.join("t1.nii.gz"), &image, DataType::Float32).unwrap();
        if subject == "s1" {
            write_nifti(&folder.join("seg.nii.gz"), &labels, DataType::Int16).unwrap();
        }
    }
    let out = dir.path().join("out");
    let dataset = stage(
        "dataset",
        &format!("root = {root:?}\nimage = \"t1.nii.gz\"\nlabels = \"seg.nii.gz\""),
    );
    let entries = dataset.subjects().unwrap().unwrap();
    assert_eq!(entries.len(), 2);

    let entry = run(dataset.as_ref(), "s1", &out, &[]).unwrap();
    let loaded = run(stage("load", "").as_ref(), "s1", &out, &[&entry]).unwrap();
    let conformed = run(
        stage(
            "conform",
            "assume_orientation = \"LIA\"\norientation = \"RAS\"",
        )
        .as_ref(),
        "s1",
        &out,
        &[&loaded],
    )
    .unwrap();
    let scan = as_scan(&conformed);
    assert_eq!(orientation_code(&scan.image.affine), "RAS");
    assert_eq!(orientation_code(&scan.native_scan().image.affine), "LIA");

    let transform = identity_transform(&scan);
    let seg = run(
        stage("segment", "").as_ref(),
        "s1",
        &out,
        &[&transform, &conformed, &conformed],
    )
    .unwrap();
    let scores = run(stage("dice", "").as_ref(), "s1", &out, &[&seg, &conformed]).unwrap();
    let Value::Scores(scores) = scores else {
        panic!("dice returned another kind of value")
    };
    let Scores { per_label, .. } = scores.as_ref();
    assert_eq!(per_label, &vec![(17, 1.0, 1.0), (53, 1.0, 1.0)]);

    let written = run(stage("write", "").as_ref(), "s1", &out, &[&seg]).unwrap();
    let Value::Written(paths) = written else {
        panic!("write returned another kind of value")
    };
    assert_eq!(paths.len(), 2);
    let back = read_volume(&out.join("s1/seg.nii.gz")).unwrap();
    assert_eq!(
        back.affine,
        Affine::identity(),
        "written in the file's stated geometry"
    );
    assert_eq!(back.data, labels.data);

    // s2 has no labels file: its load fails alone, naming the file.
    let entry = run(dataset.as_ref(), "s2", &out, &[]).unwrap();
    let err = run(stage("load", "").as_ref(), "s2", &out, &[&entry]).unwrap_err();
    assert!(err.to_string().contains("seg.nii.gz"), "{err}");
}

/// The OASIS-style subject, whose header claims identity although its axes are LIA: with
/// the declared orientation it lines up with fsaverage, and results are written back with
/// its own (identity) header.
#[test]
fn oasis_subject_declared_lia_segments_itself_and_keeps_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let folder = shared_data("oasis_like_subject");
    let load = stage(
        "load",
        &format!(
            "image = {:?}\nlabels = {:?}",
            folder.join("norm.nii.gz"),
            folder.join("seg.nii.gz")
        ),
    );
    let loaded = run(load.as_ref(), "oasis", dir.path(), &[]).unwrap();
    let conformed = run(
        stage("conform", "assume_orientation = \"LIA\"").as_ref(),
        "oasis",
        dir.path(),
        &[&loaded],
    )
    .unwrap();
    let scan = as_scan(&conformed);
    assert_eq!(scan.image.shape, [160, 192, 224]);
    assert_eq!(orientation_code(&scan.image.affine), "LIA");
    assert_eq!(scan.image.header.affine, Affine::identity());

    let transform = identity_transform(&scan);
    let seg = run(
        stage("segment", "").as_ref(),
        "oasis",
        dir.path(),
        &[&transform, &conformed, &conformed],
    )
    .unwrap();
    let Value::Segmentation(s) = &seg else {
        panic!("segment returned another kind of value")
    };
    let Segmentation { labels, .. } = s.as_ref();
    assert_eq!(labels.data, scan.labels.as_ref().unwrap().data);
    let dice = stage(
        "dice",
        "labels = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, \
         46, 47, 49, 50, 51, 52, 53, 54, 60, 63]",
    );
    let Value::Scores(scores) =
        run(dice.as_ref(), "oasis", dir.path(), &[&seg, &conformed]).unwrap()
    else {
        panic!("dice returned another kind of value")
    };
    assert_eq!(scores.mean_after, 1.0);

    run(stage("write", "").as_ref(), "oasis", dir.path(), &[&seg]).unwrap();
    let back = read_volume(&dir.path().join("oasis/seg.nii.gz")).unwrap();
    assert_eq!(back.affine, Affine::identity());
}

/// fsaverage as the atlas, resampled by `conform` to 2 mm RAS: labels stay aseg IDs.
#[test]
fn fsaverage_conformed_to_ras_keeps_integer_labels() {
    let dir = tempfile::tempdir().unwrap();
    let folder = shared_data("fsaverage");
    let load = stage(
        "load",
        &format!(
            "image = {:?}\nlabels = {:?}",
            folder.join("brain.mgz"),
            folder.join("aseg.mgz")
        ),
    );
    let loaded = run(load.as_ref(), "<constant>", dir.path(), &[]).unwrap();
    let original = as_scan(&loaded);
    let ids: std::collections::BTreeSet<i64> = original
        .labels
        .as_ref()
        .unwrap()
        .data
        .iter()
        .map(|&v| v as i64)
        .collect();
    let conformed = run(
        stage("conform", "orientation = \"RAS\"\nspacing = 2.0").as_ref(),
        "<constant>",
        dir.path(),
        &[&loaded],
    )
    .unwrap();
    let scan = as_scan(&conformed);
    assert_eq!(scan.image.shape, [128, 128, 128]);
    let labels = scan.labels.as_ref().unwrap();
    assert!(
        labels
            .data
            .iter()
            .all(|&v| v.fract() == 0.0 && ids.contains(&(v as i64)))
    );
    let lia = affine_from_orientation("LIA", [1.0; 3], [256; 3], [0.0; 3]).unwrap();
    assert_eq!(
        orientation_code(&lia),
        orientation_code(&original.image.affine)
    );
}
