//! Skull stripping on the three real heads of `../shared/data`: mask Dice against each
//! head's reference mask, brain volume and time, as a Markdown table on stdout.
//!
//! Rows `auto` strip each head with no knowledge of its mask. Rows `refine from GT ±3 mm`
//! are labelled as using the reference: they start `refine_boundary` from the reference
//! mask eroded or dilated by 3 mm and show how much of it the refinement recovers, which is
//! what the atlas method relies on. A last row times the bias-field correction.
//!
//! Run with `cargo bench --bench skullstrip`. Volumes come from
//! `voxflow_stages::io::read_volume`, or, while that reader is not in the tree, from raw
//! copies under `/tmp/voxflow-skull/` (`<folder>__<file>.f32` + `.json`); heads found in
//! neither place are reported and skipped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use voxflow_stages::intensity::{BiasParams, bias_correct};
use voxflow_stages::skullstrip::{self, AutoParams, RefineParams};
use voxflow_stages::volume::{Affine, Volume};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");

const CASES: [(&str, &str, &str); 3] = [
    ("colin27", "colin27/ch2.nii.gz", "colin27/ch2bet.nii.gz"),
    (
        "mni152",
        "mni152/MNI152_T1.nii.gz",
        "mni152/MNI152_mask.nii.gz",
    ),
    ("fsaverage", "fsaverage/T1.mgz", "fsaverage/brain.mgz"),
];

fn load(path: &Path) -> Result<Volume, String> {
    voxflow_stages::io::read_volume(path).or_else(|e| load_raw(path).ok_or(e.to_string()))
}

fn load_raw(path: &Path) -> Option<Volume> {
    let parent = path.parent()?.file_name()?.to_str()?;
    let name = format!("{parent}__{}", path.file_name()?.to_str()?);
    let dir = Path::new("/tmp/voxflow-skull");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).ok()?).ok()?;
    let shape: Vec<usize> = serde_json::from_value(meta["shape"].clone()).ok()?;
    let rows: Vec<Vec<f64>> = serde_json::from_value(meta["affine"].clone()).ok()?;
    let bytes = std::fs::read(dir.join(format!("{name}.f32"))).ok()?;
    let data: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let affine = Affine::from_fn(|r, c| {
        rows.get(r)
            .and_then(|row| row.get(c))
            .copied()
            .unwrap_or(0.0)
    });
    let shape = [*shape.first()?, *shape.get(1)?, *shape.get(2)?];
    (data.len() == shape.iter().product::<usize>()).then(|| Volume::new(data, shape, affine))
}

fn binarise(v: &Volume) -> Volume {
    v.with_data(
        v.data
            .iter()
            .map(|&x| if x > 0.0 { 1.0 } else { 0.0 })
            .collect(),
    )
}

fn data(rel: &str) -> PathBuf {
    Path::new(DATA).join(rel)
}

fn main() {
    println!("| head | method | Dice | brain mL | reference mL | seconds |");
    println!("|---|---|---|---|---|---|");
    let mut loaded = Vec::new();
    for (name, head, mask) in CASES {
        let (h, m) = match (load(&data(head)), load(&data(mask))) {
            (Ok(h), Ok(m)) => (h, binarise(&m)),
            (Err(e), _) | (_, Err(e)) => {
                println!("| {name} | skipped: {e} | | | | |");
                continue;
            }
        };
        let t = Instant::now();
        let r = match skullstrip::auto(&h, &AutoParams::default()) {
            Ok(r) => r,
            Err(e) => {
                println!("| {name} | auto failed: {e} | | | | |");
                continue;
            }
        };
        let secs = t.elapsed().as_secs_f64();
        let d = skullstrip::dice(&r.mask, &m).unwrap_or(f64::NAN);
        let ref_ml = skullstrip::mask_volume_ml(&m);
        println!(
            "| {name} | auto | {d:.3} | {:.0} | {ref_ml:.0} | {secs:.1} |",
            r.brain_volume_ml
        );
        loaded.push((name, h, m));
    }
    for (name, h, m) in &loaded {
        for shift in [-3.0, 3.0] {
            let start = if shift < 0.0 {
                skullstrip::erode_mm(m, -shift)
            } else {
                skullstrip::dilate_mm(m, shift)
            };
            let before = skullstrip::dice(&start, m).unwrap_or(f64::NAN);
            let t = Instant::now();
            match skullstrip::refine_boundary(h, &start, &RefineParams::default()) {
                Ok(r) => println!(
                    "| {name} | refine from GT {shift:+} mm (uses GT; start Dice {before:.3}) \
                     | {:.3} | {:.0} | {:.0} | {:.1} |",
                    skullstrip::dice(&r, m).unwrap_or(f64::NAN),
                    skullstrip::mask_volume_ml(&r),
                    skullstrip::mask_volume_ml(m),
                    t.elapsed().as_secs_f64()
                ),
                Err(e) => println!("| {name} | refine from GT {shift:+} mm failed: {e} | | | | |"),
            }
        }
    }
    if let Some((name, h, m)) = loaded.first() {
        let t = Instant::now();
        match bias_correct(h, Some(m), &BiasParams::default()) {
            Ok(b) => println!(
                "| {name} | bias_correct ({} iterations) | | | | {:.1} |",
                b.iterations,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => println!("| {name} | bias_correct failed: {e} | | | | |"),
        }
    }
}
