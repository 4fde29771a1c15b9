//! Registration benchmark on the real pair in `../shared/data`: fsaverage → OASIS subject and
//! the reverse, each at 2 mm and 1 mm, scored by Dice on the 30 standard aseg labels in the
//! fixed scan's own 1 mm grid (atlas labels warped nearest-neighbour).
//!
//! Each case runs in a child process (this binary with `--case`), so the peak resident
//! memory it reports (`VmHWM`) belongs to that case alone. Libtorch gets two threads, the
//! budget the peers were measured with. The device is `auto`: CUDA when libtorch sees one.
//!
//! Usage: `cargo bench --bench register [-- FILTER]`, where FILTER keeps the cases whose
//! name contains it (e.g. `2mm`, `fs->oasis`).
//!
//! While the file readers are unfinished, `VOXFLOW_DEV_DATA` may name a folder of raw
//! `NAME.f32` + `NAME.json` (shape, row-major affine) copies; they are used only when
//! `io::read_volume` fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use voxflow_stages::register::{RegisterConfig, register};
use voxflow_stages::resample::{Interp, warp};
use voxflow_stages::stage::Scan;
use voxflow_stages::volume::{Affine, Volume, affine_from_orientation};

/// The 30 standard OASIS evaluation labels.
const LABELS: [u32; 30] = [
    2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46, 47, 49, 50, 51,
    52, 53, 54, 60, 63,
];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// Reads a volume with the project's reader, else from the raw development copy.
fn read(rel: &str, dev_name: &str) -> Volume {
    let path = data_dir().join(rel);
    match voxflow_stages::io::read_volume(&path) {
        Ok(v) => v,
        Err(e) => {
            let Ok(dir) = std::env::var("VOXFLOW_DEV_DATA") else {
                panic!("{e} (set VOXFLOW_DEV_DATA for the raw development copies)");
            };
            read_raw(&Path::new(&dir).join(dev_name))
        }
    }
}

fn read_raw(stem: &Path) -> Volume {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
            .unwrap();
    let shape: Vec<usize> = serde_json::from_value(meta["shape"].clone()).unwrap();
    let aff: Vec<f64> = serde_json::from_value(meta["affine"].clone()).unwrap();
    let bytes = std::fs::read(stem.with_extension("f32")).unwrap();
    let data = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Volume::new(
        data,
        [shape[0], shape[1], shape[2]],
        Affine::from_row_slice(&aff),
    )
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
        "fs" => (
            read("fsaverage/brain.mgz", "fs_brain"),
            read("fsaverage/aseg.mgz", "fs_aseg"),
        ),
        _ => (
            read("oasis_like_subject/norm.nii.gz", "oasis_norm"),
            read("oasis_like_subject/seg.nii.gz", "oasis_seg"),
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
    let mut scores = Vec::new();
    for &l in &LABELS {
        let (mut a, mut b, mut both) = (0usize, 0usize, 0usize);
        for (&t, &p) in truth.data.iter().zip(&pred.data) {
            let (t, p) = (t.round() as u32 == l, p.round() as u32 == l);
            a += t as usize;
            b += p as usize;
            both += (t && p) as usize;
        }
        if a + b > 0 {
            scores.push(2.0 * both as f64 / (a + b) as f64);
        }
    }
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

/// Runs one case in this process and prints its result line.
fn run_case(moving: &str, fixed: &str, res: f64) {
    tch::set_num_threads(2);
    let t0 = Instant::now();
    let (m_img, m_lab) = load(moving);
    let (f_img, f_lab) = load(fixed);
    let load_s = t0.elapsed().as_secs_f64();
    let config = RegisterConfig {
        resolution_mm: res,
        ..RegisterConfig::default()
    };
    let device = config.device.resolve().unwrap();
    let t1 = Instant::now();
    let transform = register(&Scan::from_image(m_img), &Scan::from_image(f_img), &config).unwrap();
    let reg_s = t1.elapsed().as_secs_f64();
    let warped = warp(&m_lab, &transform, &f_lab.grid(), Interp::Nearest);
    let d = dice(&f_lab, &warped);
    let q = transform.quality;
    let fixed_lab = Arc::new(f_lab);
    let _ = fixed_lab;
    println!(
        "RESULT {moving}->{fixed} {res:.0}mm {device:?} load {load_s:.2} s | register {reg_s:.2} s | \
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
            let out = Command::new(&exe)
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
