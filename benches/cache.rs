//! Volume cache benchmark on the real data in `../shared/data`: what a warm cache saves.
//!
//! Two measurements, each in a fresh temporary cache folder (never the user's):
//!
//! 1. loading the OASIS-style subject (`norm.nii.gz` + `seg.nii.gz`) and the fsaverage atlas
//!    (`brain.mgz` + `aseg.mgz`) from their gzip files, against reading the same scans back
//!    from cache entries (median of 5 reads each, page cache warm in both cases);
//! 2. the bundled job `pipelines/oneshot-aseg.toml` with two libtorch threads, each run in a
//!    child process (this binary with `--job`, `GOMP_SPINCOUNT=1000` as `voxflow` sets it),
//!    so both pay the same start-up: once with an empty cache (cold: computes and stores) and
//!    once more (warm), after a run with the cache off for reference. Seconds are the run itself, from listing to report.
//!
//! Usage: `cargo bench --bench cache`. Prints seconds; nothing is asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
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
        (
            "oasis_like_subject/norm.nii.gz",
            "oasis_like_subject/seg.nii.gz",
        ),
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
    pipeline.settings.cache = match dir.to_str() {
        Some("off") => CacheSetting::Off,
        _ => CacheSetting::Dir(dir.to_path_buf()),
    };
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

/// Runs the bundled job in a child process; its seconds and Dice.
fn job_in_child(dir: &Path, output: &Path) -> (f64, f64) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.arg("--job").arg(dir).arg(output);
    if ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"]
        .iter()
        .all(|v| std::env::var_os(v).is_none())
    {
        command.env("GOMP_SPINCOUNT", "1000");
    }
    let out = command.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut words = text.split_whitespace().map(|w| w.parse::<f64>().unwrap());
    (words.next().unwrap(), words.next().unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--job") {
        tch::set_num_threads(2);
        tch::set_num_interop_threads(1);
        let (seconds, dice) = bundled_job(Path::new(&args[at + 1]), Path::new(&args[at + 2]));
        println!("{seconds} {dice}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();

    let (gzip, cached) = load_vs_cache(&tmp.path().join("load"));
    println!("load OASIS subject + fsaverage atlas (image + labels), median of 5:");
    println!("  from gzip files   {gzip:.3} s");
    println!(
        "  from the cache    {cached:.3} s  ({:.1}× faster)",
        gzip / cached
    );

    let dir = tmp.path().join("job");
    let out = tmp.path().join("out");
    let (off, dice_off) = job_in_child(Path::new("off"), &out);
    let (cold, dice_cold) = job_in_child(&dir, &out);
    let (warm, dice_warm) = job_in_child(&dir, &out);
    println!("pipelines/oneshot-aseg.toml, whole run (2 libtorch threads):");
    println!("  no cache          {off:.2} s  (Dice {dice_off:.4})");
    println!("  cold cache        {cold:.2} s  (Dice {dice_cold:.4})");
    println!("  warm cache        {warm:.2} s  (Dice {dice_warm:.4})");
}
