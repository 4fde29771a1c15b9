//! Reading the real scans in `../shared/data`, round trips through `write_nifti`, and small
//! broken or unusual files the tests make themselves (truncated gzip, text named `.nii`,
//! lying headers, MGH without geometry, 5D vector images).

use std::io::Write;
use std::path::{Path, PathBuf};

use voxflow_stages::io::{IoError, inspect, read_volume, write_nifti};
use voxflow_stages::volume::{
    AffineSource, DataType, Volume, affine_from_orientation, orientation_code,
};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data")).join(rel)
}

fn read(rel: &str) -> Volume {
    read_volume(&data(rel)).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_error_names_file(result: Result<Volume, IoError>, path: &Path, about: &str) {
    let message = match result {
        Ok(_) => panic!("{} read, but must be rejected", path.display()),
        Err(e) => e.to_string(),
    };
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        message.contains(&*name),
        "message does not name the file: {message}"
    );
    assert!(
        message.contains(about),
        "message does not say {about:?}: {message}"
    );
}

#[test]
fn fsaverage_aseg_is_float32_big_endian_lia() {
    let v = read("fsaverage/aseg.mgz");
    assert_eq!((v.shape, v.frames), ([256; 3], 1));
    assert_eq!(v.header.dtype, DataType::Float32);
    assert_eq!(v.header.affine_source, AffineSource::Mgh);
    assert_eq!(orientation_code(&v.affine), "LIA");
    assert!(
        v.data
            .iter()
            .all(|x| x.fract() == 0.0 && (0.0..=255.0).contains(x))
    );
    assert!(
        v.data.contains(&17.0) && v.data.contains(&53.0),
        "hippocampus labels present"
    );
}

#[test]
fn fsaverage_brain_is_uint8_lia() {
    let v = read("fsaverage/brain.mgz");
    assert_eq!(v.shape, [256; 3]);
    assert_eq!(v.header.dtype, DataType::Uint8);
    assert_eq!(orientation_code(&v.affine), "LIA");
    assert_eq!(v.voxel_size(), [1.0; 3]);
    assert!(v.data.iter().any(|&x| x > 0.0));
}

#[test]
fn oasis_norm_is_float64_with_identity_header() {
    let v = read("oasis_like_subject/norm.nii.gz");
    assert_eq!(v.shape, [160, 192, 224]);
    assert_eq!(v.header.dtype, DataType::Float64);
    assert_eq!(
        orientation_code(&v.affine),
        "RAS",
        "the header's (wrong) identity affine"
    );
    let max = v.data.iter().copied().fold(f32::MIN, f32::max);
    assert!(max > 0.9 && max <= 1.0, "max {max}");
    assert!(v.data.iter().all(|&x| x >= 0.0));
}

#[test]
fn colin27_is_uint8_ras() {
    let v = read("colin27/ch2.nii.gz");
    assert_eq!(v.shape, [181, 217, 181]);
    assert_eq!(v.header.dtype, DataType::Uint8);
    assert_eq!(orientation_code(&v.affine), "RAS");
}

#[test]
fn mni152_is_int16_las() {
    let v = read("mni152/MNI152_T1.nii.gz");
    assert_eq!(v.shape, [182, 218, 182]);
    assert_eq!(v.header.dtype, DataType::Int16);
    assert_eq!(orientation_code(&v.affine), "LAS");
    let max = v.data.iter().copied().fold(f32::MIN, f32::max);
    assert!(max > 1000.0 && max <= 9999.0, "max {max}");
}

fn assert_same_volume(a: &Volume, b: &Volume) {
    assert_eq!((a.shape, a.frames), (b.shape, b.frames));
    assert!(
        (a.affine - b.affine).abs().max() < 1e-5,
        "{} vs {}",
        a.affine,
        b.affine
    );
    assert!(a.data == b.data, "voxel values differ");
}

#[test]
fn round_trip_keeps_data_affine_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("oasis_like_subject/norm.nii.gz", DataType::Float32),
        ("fsaverage/aseg.mgz", DataType::Int16),
        ("mni152/MNI152_T1.nii.gz", DataType::Int16),
        ("colin27/ch2.nii.gz", DataType::Uint8),
    ];
    for (rel, dtype) in cases {
        let original = read(rel);
        for ext in ["nii.gz", "nii"] {
            let out = dir.path().join(format!("out.{ext}"));
            let bytes = write_nifti(&out, &original, dtype).unwrap();
            assert_eq!(bytes, std::fs::metadata(&out).unwrap().len());
            let back = read_volume(&out).unwrap();
            assert_same_volume(&original, &back);
            assert_eq!(back.header.dtype, dtype);
            assert_eq!(back.header.qform_code, back.header.sform_code, "{rel}");
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 2, "temporary files left behind: {left:?}");
}

#[test]
fn written_qform_agrees_with_sform() {
    let dir = tempfile::tempdir().unwrap();
    let affine = affine_from_orientation("PIR", [0.9, 1.1, 2.5], [6, 7, 8], [3.0, -4.0, 5.0]);
    let volume = Volume::new(
        (0..336).map(|x| x as f32).collect(),
        [6, 7, 8],
        affine.unwrap(),
    );
    let out = dir.path().join("oblique.nii");
    write_nifti(&out, &volume, DataType::Float32).unwrap();

    // Zero the sform code so the reader has to use the qform.
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[254..256].copy_from_slice(&0i16.to_le_bytes());
    std::fs::write(&out, &bytes).unwrap();
    let back = read_volume(&out).unwrap();
    assert_eq!(back.header.affine_source, AffineSource::Qform);
    assert_same_volume(&volume, &back);
}

#[test]
fn frames_round_trip_and_5d_vectors_read_as_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut volume = Volume::new(vec![0.0; 24], [2, 3, 4], nalgebra::Matrix4::identity());
    volume.data = (0..72).map(|x| x as f32 - 30.5).collect();
    volume.frames = 3;
    let out = dir.path().join("field.nii.gz");
    write_nifti(&out, &volume, DataType::Float32).unwrap();
    assert_same_volume(&volume, &read_volume(&out).unwrap());

    // The same field in ITK's 5D vector layout: dim = [5, 2, 3, 4, 1, 3], intent 1007.
    let plain = dir.path().join("field5d.nii");
    write_nifti(&plain, &volume, DataType::Float32).unwrap();
    let mut bytes = std::fs::read(&plain).unwrap();
    for (k, d) in [5i16, 2, 3, 4, 1, 3].iter().enumerate() {
        bytes[40 + 2 * k..42 + 2 * k].copy_from_slice(&d.to_le_bytes());
    }
    bytes[68..70].copy_from_slice(&1007i16.to_le_bytes());
    std::fs::write(&plain, &bytes).unwrap();
    assert_same_volume(&volume, &read_volume(&plain).unwrap());
    assert_eq!(inspect(&plain).unwrap().shape, vec![2, 3, 4, 1, 3]);
}

#[test]
fn truncated_gzip_is_rejected_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(data("fsaverage/brain.mgz")).unwrap();
    let cut = dir.path().join("cut.nii.gz");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    assert_error_names_file(read_volume(&cut), &cut, "truncated");
}

#[test]
fn text_named_nii_is_rejected_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.nii");
    std::fs::write(&path, "subject,age\nsub-01,42\n").unwrap();
    assert_error_names_file(read_volume(&path), &path, "text");
}

#[test]
fn missing_file_error_names_the_file() {
    let path = PathBuf::from("/nonexistent/voxflow/missing.nii.gz");
    assert_error_names_file(read_volume(&path), &path, "");
}

/// A 352-byte little-endian NIfTI-1 header for float64 data of `dims`.
fn lying_header(dims: [i16; 3]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.nii");
    let volume = Volume::new(vec![1.0; 8], [2, 2, 2], nalgebra::Matrix4::identity());
    write_nifti(&small, &volume, DataType::Float64).unwrap();
    let mut bytes = std::fs::read(&small).unwrap();
    bytes.truncate(352);
    for (k, d) in dims.iter().enumerate() {
        bytes[42 + 2 * k..44 + 2 * k].copy_from_slice(&d.to_le_bytes());
    }
    bytes
}

#[test]
fn absurd_dims_are_rejected_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let header = lying_header([32767; 3]);
    let plain = dir.path().join("huge.nii");
    std::fs::write(&plain, &header).unwrap();
    let started = std::time::Instant::now();
    assert_error_names_file(read_volume(&plain), &plain, "promises");

    let gz = dir.path().join("huge.nii.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&header).unwrap();
    enc.write_all(&vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    assert_error_names_file(read_volume(&gz), &gz, "promises");
    assert!(
        started.elapsed().as_secs() < 5,
        "rejecting took {:?}",
        started.elapsed()
    );
}

/// An MGH header (version 1) of `dims` and `kind`, with goodRASflag `good`, then `data`.
fn mgh_bytes(dims: [i32; 4], kind: i32, good: i16, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(284 + data.len());
    for v in [1, dims[0], dims[1], dims[2], dims[3], kind, 0] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(&good.to_be_bytes());
    // Geometry a reader must ignore when the flag is 0: 3 mm RAS centred at (50, 50, 50).
    let geometry = [
        3.0f32, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 50.0, 50.0, 50.0,
    ];
    for v in geometry {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.resize(284, 0);
    b.extend_from_slice(data);
    b
}

#[test]
fn mgh_without_good_ras_flag_gets_freesurfer_default_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noras.mgh");
    let data: Vec<u8> = (0u16..24).flat_map(|v| (v * 2800).to_be_bytes()).collect();
    std::fs::write(&path, mgh_bytes([2, 3, 4, 1], 10, 0, &data)).unwrap();
    let v = read_volume(&path).unwrap();
    assert_eq!(orientation_code(&v.affine), "LIA");
    assert_eq!(v.voxel_size(), [1.0; 3]);
    // The centre voxel (1, 1.5, 2) sits at the origin.
    let centre = v.voxel_to_world([1.0, 1.5, 2.0]);
    assert!(centre.iter().all(|c| c.abs() < 1e-12), "{centre:?}");
    assert_eq!(v.header.dtype, DataType::Uint16);
    assert_eq!(v.data[23], 64400.0, "uint16 above 32767");

    std::fs::write(&path, mgh_bytes([2, 3, 4, 1], 10, 1, &data)).unwrap();
    let v = read_volume(&path).unwrap();
    assert_eq!(
        (orientation_code(&v.affine), v.voxel_size()),
        ("RAS".into(), [3.0; 3])
    );
}

#[test]
fn tiny_mgh_whose_data_fits_in_the_first_bytes_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.mgh");
    std::fs::write(&path, mgh_bytes([1, 1, 1, 1], 0, 1, &[200])).unwrap();
    assert_eq!(read_volume(&path).unwrap().data, vec![200.0]);
}

#[test]
fn mgh_with_short_data_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.mgh");
    std::fs::write(&path, mgh_bytes([10, 10, 10, 2], 3, 1, &[0; 100])).unwrap();
    assert_error_names_file(read_volume(&path), &path, "8000 data bytes");
}

#[test]
fn inspect_reports_the_documented_keys() {
    let info = inspect(&data("fsaverage/brain.mgz")).unwrap();
    assert_eq!(info.shape, vec![256, 256, 256]);
    assert_eq!(info.orientation, "LIA");
    let json = serde_json::to_value(&info).unwrap();
    let keys = [
        "shape",
        "dtype",
        "voxel_size",
        "orientation",
        "affine",
        "affine_source",
        "min",
        "max",
        "mean",
        "n_nan",
    ];
    for key in keys {
        assert!(json.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(json["dtype"], "uint8");
    assert_eq!(json["affine_source"], "mgh");
    assert_eq!(json["affine"].as_array().unwrap().len(), 4);
    let text = info.to_string();
    assert!(
        text.contains("LIA") && text.contains("256 x 256 x 256"),
        "{text}"
    );
}
