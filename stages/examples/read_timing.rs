//! Rough read and write timings on the real scans in `../shared/data`, for checking that
//! decoding stays fast: `cargo run --release -p voxflow-stages --example read_timing`.
//!
//! Each file is read three times and the best time printed; then the OASIS volume is written
//! as `.nii` and `.nii.gz` to a temporary folder.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use voxflow_stages::io::{read_volume, write_nifti};
use voxflow_stages::volume::DataType;

const FILES: [&str; 6] = [
    "oasis_like_subject/norm.nii.gz",
    "fsaverage/aseg.mgz",
    "fsaverage/brain.mgz",
    "fsaverage/T1.mgz",
    "colin27/ch2.nii.gz",
    "mni152/MNI152_T1.nii.gz",
];

fn best_of_three<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..3 {
        let started = Instant::now();
        last = Some(f());
        best = best.min(started.elapsed());
    }
    (best, last.expect("three runs happened"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"));
    for rel in FILES {
        let (time, volume) = best_of_three(|| read_volume(&data.join(rel)));
        let volume = volume?;
        let dtype = volume.header.dtype.name();
        println!("read  {rel:<34} {:>4?} {dtype:<8} {time:.1?}", volume.shape);
    }

    let norm = read_volume(&data.join(FILES[0]))?;
    let dir = std::env::temp_dir().join(format!("voxflow-timing-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for name in ["norm.nii", "norm.nii.gz"] {
        let out = dir.join(name);
        let (time, bytes) = best_of_three(|| write_nifti(&out, &norm, DataType::Float32));
        println!("write {name:<34} float32 {} bytes {time:.1?}", bytes?);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
