//! Reads every file of the shared torture corpus (`../shared/torture`) and checks it against
//! `MANIFEST.json`: files to read must load with the stated shape, affine, scaling, statistics
//! and probe values; files to reject must fail with a message naming the file. Every mismatch
//! is collected so one run reports them all.

use std::path::PathBuf;

use serde_json::Value;
use voxflow_stages::io::read_volume;
use voxflow_stages::volume::{AffineSource, Volume, stats};

/// Affine entries may differ by this much (absolute), as the manifest states.
const AFFINE_TOL: f64 = 1e-4;

/// Values may differ by this much (relative), as the manifest states.
const VALUE_TOL: f64 = 1e-4;

fn torture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/torture"))
}

fn close(actual: f64, expected: f64) -> bool {
    if expected.is_nan() {
        return actual.is_nan();
    }
    if expected.is_infinite() {
        return actual == expected;
    }
    (actual - expected).abs() <= VALUE_TOL * expected.abs() + 1e-6
}

/// A probe or statistic value: a number, or `"nan"`, `"inf"`, `"-inf"`.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn usizes(v: &Value) -> Vec<usize> {
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .filter_map(Value::as_u64)
        .map(|n| n as usize)
        .collect()
}

/// Everything about `volume` that disagrees with the manifest's `expected` block.
fn mismatches(volume: &Volume, expected: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    problems.extend(shape_mismatch(volume, &usizes(&expected["shape_squeezed"])));
    problems.extend(affine_mismatch(volume, &expected["affine"]));
    problems.extend(header_mismatch(volume, expected));
    problems.extend(stats_mismatch(volume, &expected["stats"]));
    if problems.iter().any(|p| p.starts_with("shape")) {
        return problems;
    }
    let probes = expected["probes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if probes.is_empty() {
        problems.push("manifest lists no probes".to_string());
    }
    for probe in probes {
        let index = usizes(&probe["index"]);
        let want = number(&probe["value"]).unwrap_or(f64::NAN);
        let [ni, nj, nk] = volume.shape;
        let at = |k: usize| index.get(k).copied().unwrap_or(0);
        let linear = at(0) + ni * (at(1) + nj * (at(2) + nk * at(3)));
        match volume.data.get(linear) {
            Some(&got) if close(f64::from(got), want) => {}
            got => problems.push(format!("probe {index:?}: got {got:?}, expected {want}")),
        }
    }
    problems
}

fn shape_mismatch(volume: &Volume, want: &[usize]) -> Option<String> {
    let mut spatial: Vec<usize> = want.iter().take(3).copied().collect();
    spatial.resize(3, 1);
    let frames: usize = want.iter().skip(3).product();
    let ok = spatial == volume.shape && frames == volume.frames;
    let got = (volume.shape, volume.frames);
    (!ok).then(|| format!("shape {got:?} (shape, frames), expected {want:?}"))
}

fn affine_mismatch(volume: &Volume, want: &Value) -> Option<String> {
    let want: Vec<Vec<f64>> = serde_json::from_value(want.clone()).unwrap_or_default();
    if want.len() != 4 || want.iter().any(|row| row.len() != 4) {
        return Some(format!("manifest affine is not 4x4: {want:?}"));
    }
    let mut worst = 0.0f64;
    for (r, row) in want.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let diff = (volume.affine[(r, c)] - v).abs();
            worst = if diff.is_nan() {
                f64::INFINITY
            } else {
                worst.max(diff)
            };
        }
    }
    (worst > AFFINE_TOL).then(|| format!("affine off by {worst}: got {}", volume.affine))
}

fn header_mismatch(volume: &Volume, expected: &Value) -> Vec<String> {
    let header = &volume.header;
    let mut problems = Vec::new();
    let source = match expected["affine_source"].as_str().unwrap_or("") {
        "sform" => Some(AffineSource::Sform),
        "qform" => Some(AffineSource::Qform),
        "fallback_pixdim" => Some(AffineSource::Pixdim),
        "mgh_vox2ras" => Some(AffineSource::Mgh),
        _ => None,
    };
    if source.is_some_and(|s| s != header.affine_source) {
        problems.push(format!(
            "affine source {:?}, expected {source:?}",
            header.affine_source
        ));
    }
    let dtype = expected["dtype_on_disk"].as_str().unwrap_or("");
    if dtype != header.dtype.name() {
        problems.push(format!("dtype {}, expected {dtype}", header.dtype.name()));
    }
    let scaling = expected["slope_inter_applied"].as_array().map(|a| {
        let v: Vec<f64> = a.iter().filter_map(Value::as_f64).collect();
        v
    });
    if let Some(want) = scaling
        && want != [header.scaling.0, header.scaling.1]
    {
        problems.push(format!("scaling {:?}, expected {want:?}", header.scaling));
    }
    problems
}

fn stats_mismatch(volume: &Volume, want: &Value) -> Vec<String> {
    let got = stats(&volume.data);
    let mut problems = Vec::new();
    for (name, value) in [("min", got.min), ("max", got.max), ("mean", got.mean)] {
        let expected = number(&want[name]).unwrap_or(f64::NAN);
        if !close(value, expected) {
            problems.push(format!("{name} {value}, expected {expected}"));
        }
    }
    let count = |k: &str| want[k].as_u64().unwrap_or(0) as usize;
    if got.n_nan != count("n_nan") {
        problems.push(format!(
            "{} NaN voxels, expected {}",
            got.n_nan,
            count("n_nan")
        ));
    }
    if got.n_inf != count("n_posinf") + count("n_neginf") {
        problems.push(format!("{} infinite voxels", got.n_inf));
    }
    problems
}

#[test]
fn every_torture_file_is_read_or_rejected_as_the_manifest_says() {
    let dir = torture_dir();
    let text = std::fs::read_to_string(dir.join("MANIFEST.json")).expect("torture manifest");
    let manifest: Value = serde_json::from_str(&text).expect("manifest is JSON");
    let files = manifest["files"].as_array().expect("manifest lists files");
    assert!(!files.is_empty());

    let mut failures = Vec::new();
    let (mut read, mut rejected) = (0, 0);
    for entry in files {
        let name = entry["name"].as_str().unwrap_or("?");
        let path = dir.join(entry["file"].as_str().unwrap_or(""));
        let expect = entry["expect"].as_str().unwrap_or("");
        let started = std::time::Instant::now();
        let result = read_volume(&path);
        let elapsed = started.elapsed();
        match (expect, result) {
            ("error", Ok(_)) => failures.push(format!("{name}: read, but must be rejected")),
            ("read", Err(e)) => failures.push(format!("{name}: must read, got error: {e}")),
            ("error" | "read_or_error", Err(e)) if e.to_string().contains(name) => {
                eprintln!("rejected in {elapsed:?}: {e}");
                rejected += 1;
            }
            ("error" | "read_or_error", Err(e)) => {
                failures.push(format!("{name}: error does not name the file: {e}"));
            }
            ("read" | "read_or_error", Ok(volume)) => {
                let problems = mismatches(&volume, &entry["expected"]);
                if problems.is_empty() {
                    read += 1;
                } else {
                    failures.push(format!("{name}: {}", problems.join("; ")));
                }
            }
            (other, _) => failures.push(format!("{name}: unknown expectation {other:?}")),
        }
    }
    eprintln!(
        "torture corpus: {} files, {read} read correctly, {rejected} rejected correctly",
        files.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} torture files mismatch:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
