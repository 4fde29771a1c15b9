//! Volume cache benchmark on the real data in `../shared/data`: what a warm cache saves.
//!
//! Two measurements, each in a fresh temporary cache folder (never the user's):
//!
//! 1. loading the OASIS-style subject (`norm.nii.gz` + `seg.nii.gz`) and the fsaverage atlas
//!    (`brain.mgz` + `aseg.mgz`) from their gzip files, against reading the same scans back
//!    from cache entries (median of 5 reads each, page cache warm in both cases);
//! 2. the bundled job `pipelines/oneshot-aseg.toml`, run in process with two libtorch
//!    threads: once with an empty cache (cold: computes and stores) and once more (warm).
//!
//! Usage: `cargo bench --bench cache`. Prints seconds; nothing is asserted.

use std::path::{Path, PathBuf};
use std::time::Instant;

use voxflow::cache::{CacheSetting, Key, store};
use voxflow_stages::stage::Scan;
use voxflow_stages::stages::{NonFinite, load_scan};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn load(image: &str, labels: &str) -> Scan {
    load_scan(
        &data().join(image),
        Some(&data().join(labels)),
        None,
        NonFinite::Error,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Seconds to load both scans from gzip, and to read them from the cache.
fn load_vs_cache(dir: &Path) -> (f64, f64) {
    let pairs = [
        ("oasis_like_subject/norm.nii.gz", "oasis_like_subject/seg.nii.gz"),
        ("fsaverage/brain.mgz", "fsaverage/aseg.mgz"),
    ];
    let gzip = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for (image, labels) in pairs {
                    std::hint::black_box(load(image, labels));
                }
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let keys: Vec<Key> = pairs
        .iter()
        .map(|(image, labels)| {
            let key = Key::from_bytes(format!("bench {image} {labels}").as_bytes());
            store::write(dir, &key, &load(image, labels)).unwrap();
            key
        })
        .collect();
    let cached = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for key in &keys {
                    std::hint::black_box(store::read(dir, key).unwrap().expect("stored"));
                }
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    (gzip, cached)
}

/// Seconds of one in-process run of the bundled job with its cache in `dir`, and its Dice.
fn bundled_job(dir: &Path, output: &Path) -> (f64, f64) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).unwrap();
    let mut pipeline = voxflow::load_pipeline(Path::new("pipelines/oneshot-aseg.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    pipeline.settings.cache = CacheSetting::Dir(dir.to_path_buf());
    let options = voxflow::run::RunOptions {
        output: Some(output.to_path_buf()),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let t = Instant::now();
    let outcome = runtime
        .block_on(voxflow::run::run(pipeline, options))
        .unwrap();
    let seconds = t.elapsed().as_secs_f64();
    assert_eq!(outcome.failed(), 0, "{:?}", outcome.summary.subjects);
    let dice = outcome.summary.subjects[0]
        .scores
        .as_ref()
        .map_or(f64::NAN, |s| s.mean_after);
    (seconds, dice)
}

fn main() {
    tch::set_num_threads(2);
    tch::set_num_interop_threads(1);
    let tmp = tempfile::tempdir().unwrap();

    let (gzip, cached) = load_vs_cache(&tmp.path().join("load"));
    println!("load OASIS subject + fsaverage atlas (image + labels), median of 5:");
    println!("  from gzip files   {gzip:.3} s");
    println!("  from the cache    {cached:.3} s  ({:.1}× faster)", gzip / cached);

    let dir = tmp.path().join("job");
    let out = tmp.path().join("out");
    let (cold, dice_cold) = bundled_job(&dir, &out);
    let (warm, dice_warm) = bundled_job(&dir, &out);
    println!("pipelines/oneshot-aseg.toml, whole run in process (2 libtorch threads):");
    println!("  cold cache        {cold:.2} s  (Dice {dice_cold:.4})");
    println!("  warm cache        {warm:.2} s  (Dice {dice_warm:.4})");
}
