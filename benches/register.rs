//! Registration benchmark on the real pair in `../shared/data`: fsaverage → OASIS subject and
//! the reverse, each at 2 mm and 1 mm, scored by Dice on the 30 standard aseg labels in the
//! fixed scan's own 1 mm grid (atlas labels warped nearest-neighbour).
//!
//! Each case runs in a child process (this binary with `--case`), so the peak resident
//! memory it reports (`VmHWM`) belongs to that case alone. Libtorch gets two threads, the
//! budget the peers were measured with. The device is `auto`: CUDA when libtorch sees one.
//!
//! The settings are those of the shipped pipelines (`pipelines/oneshot-aseg.toml` at 2 mm,
//! `pipelines/oneshot-aseg-1mm.toml` at 1 mm).
//!
//! Usage: `cargo bench --bench register [-- FILTER]`, where FILTER keeps the cases whose
//! name contains it (e.g. `2mm`, `fs->oasis`). `VOXFLOW_BENCH_BATCH=N` registers the pair N
//! times in one batch and prints seconds per pair (the whole-process time is for all N).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use voxflow_stages::register::{RegisterConfig, register, register_batch};
use voxflow_stages::resample::{Interp, warp};
use voxflow_stages::stage::Scan;
use voxflow_stages::volume::{Volume, affine_from_orientation};

/// The 30 standard OASIS evaluation labels.
const LABELS: [u32; 30] = [
    2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46, 47, 49, 50, 51,
    52, 53, 54, 60, 63,
];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// Reads a volume of the shared data with the project's reader.
fn read(rel: &str) -> Volume {
    let path = data_dir().join(rel);
    voxflow_stages::io::read_volume(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Min–max scaling to [0, 1], as the pipeline's `normalize` stage does.
fn normalise(v: &mut Volume) {
    let (lo, hi) = v
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let span = (hi - lo).max(1e-12);
    v.data.iter_mut().for_each(|x| *x = (*x - lo) / span);
}

/// An image and its labels; the OASIS scan gets its true orientation (LIA) declared.
fn load(which: &str) -> (Volume, Volume) {
    let (mut image, mut labels) = match which {
        "fs" => (read("fsaverage/brain.mgz"), read("fsaverage/aseg.mgz")),
        _ => (
            read("oasis_like_subject/norm.nii.gz"),
            read("oasis_like_subject/seg.nii.gz"),
        ),
    };
    if which != "fs" {
        let lia = affine_from_orientation("LIA", [1.0; 3], image.shape, [0.0; 3]).unwrap();
        image.affine = lia;
        labels.affine = lia;
    }
    normalise(&mut image);
    (image, labels)
}

fn dice(truth: &Volume, pred: &Volume) -> f64 {
    // One pass over the voxels, counting per label slot (the last slot: any other value).
    let mut slot_of = [LABELS.len(); 256];
    for (i, &l) in LABELS.iter().enumerate() {
        slot_of[l as usize] = i;
    }
    let slot = |v: f32| {
        slot_of
            .get(v.round() as usize)
            .copied()
            .unwrap_or(LABELS.len())
    };
    let (mut a, mut b, mut both) = ([0usize; 31], [0usize; 31], [0usize; 31]);
    for (&t, &p) in truth.data.iter().zip(&pred.data) {
        let (t, p) = (slot(t), slot(p));
        a[t] += 1;
        b[p] += 1;
        both[t] += usize::from(t == p);
    }
    let scores: Vec<f64> = (0..LABELS.len())
        .filter(|&i| a[i] + b[i] > 0)
        .map(|i| 2.0 * both[i] as f64 / (a[i] + b[i]) as f64)
        .collect();
    scores.iter().sum::<f64>() / scores.len().max(1) as f64
}

fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The `register` settings of the shipped pipeline for `res` (`oneshot-aseg.toml` at 2 mm,
/// `oneshot-aseg-1mm.toml` at 1 mm), so the bench measures what users run. The environment
/// variable `VOXFLOW_BENCH_CONFIG` may hold other settings in the same TOML form, to try a
/// schedule without rebuilding; `resolution_mm` always comes from the case.
fn settings(res: f64) -> RegisterConfig {
    let text = match std::env::var("VOXFLOW_BENCH_CONFIG") {
        Ok(text) => text,
        Err(_) => {
            let file = if res < 1.5 {
                "oneshot-aseg-1mm.toml"
            } else {
                "oneshot-aseg.toml"
            };
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("pipelines")
                .join(file);
            let pipeline: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut node = pipeline["nodes"]["register"]
                .as_table()
                .cloned()
                .unwrap_or_else(|| panic!("{}: no [nodes.register]", path.display()));
            node.remove("type");
            node.remove("inputs");
            toml::to_string(&node).unwrap()
        }
    };
    let mut config: RegisterConfig =
        toml::from_str(&text).unwrap_or_else(|e| panic!("register settings: {e}"));
    config.resolution_mm = res;
    config
}

/// Runs one case in this process and prints its result line.
fn run_case(moving: &str, fixed: &str, res: f64) {
    voxflow_stages::register::tune_allocator();
    // `VOXFLOW_BENCH_THREADS` overrides the two threads (1 gives steadier CPU-time
    // comparisons on a shared machine).
    let threads = std::env::var("VOXFLOW_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    tch::set_num_threads(threads);
    let t0 = Instant::now();
    let (m_img, m_lab) = load(moving);
    let (f_img, f_lab) = load(fixed);
    let load_s = t0.elapsed().as_secs_f64();
    let config = settings(res);
    let device = config.device.resolve().unwrap();
    // `VOXFLOW_BENCH_BATCH=N`: the fixed scan N times in one batch (the `batch` node
    // setting); the seconds printed are per pair.
    let batch = std::env::var("VOXFLOW_BENCH_BATCH")
        .ok()
        .and_then(|b| b.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let (moving_scan, fixed_scan) = (Scan::from_image(m_img), Scan::from_image(f_img));
    let t1 = Instant::now();
    let transform = if batch == 1 {
        register(&moving_scan, &fixed_scan, &config).unwrap()
    } else {
        let fixed = vec![&fixed_scan; batch];
        let mut all = register_batch(&moving_scan, &fixed, &config);
        all.swap_remove(0).unwrap()
    };
    let reg_s = t1.elapsed().as_secs_f64() / batch as f64;
    let t2 = Instant::now();
    let warped = warp(&m_lab, &transform, &f_lab.grid(), Interp::Nearest);
    let d = dice(&f_lab, &warped);
    let score_s = t2.elapsed().as_secs_f64();
    let q = transform.quality;
    println!(
        "RESULT {moving}->{fixed} {res:.0}mm {device:?} batch {batch} load {load_s:.2} s | register {reg_s:.2} s/pair | labels+Dice {score_s:.2} s | \
         peak {:.0} MiB | Dice {d:.4} | nonpos J {:.4} % | SDlogJ {:.4} | loss {:.4}",
        peak_mib(),
        q.nonpositive_jacobian_pct,
        q.log_jacobian_std,
        q.final_loss
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(pos) = args.iter().position(|a| a == "--case") {
        let res: f64 = args[pos + 3].parse().unwrap();
        run_case(&args[pos + 1], &args[pos + 2], res);
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let exe = std::env::current_exe().unwrap();
    println!(
        "load: uptime {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for (moving, fixed) in [("fs", "oasis"), ("oasis", "fs")] {
        for res in [2.0, 1.0] {
            let name = format!("{moving}->{fixed} {res:.0}mm");
            if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            let t = Instant::now();
            let mut command = Command::new(&exe);
            // As the `voxflow` binary does: OpenMP threads spin briefly, then sleep, between
            // operations, unless the caller chose otherwise.
            if ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"]
                .iter()
                .all(|v| std::env::var_os(v).is_none())
            {
                command.env("GOMP_SPINCOUNT", "1000");
            }
            let out = command
                .args(["--case", moving, fixed, &res.to_string()])
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            match stdout.lines().find(|l| l.starts_with("RESULT")) {
                Some(line) => println!(
                    "{} | whole process {:.2} s",
                    line,
                    t.elapsed().as_secs_f64()
                ),
                None => println!("{name}: failed ({})", out.status),
            }
        }
    }
}
