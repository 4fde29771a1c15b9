//! Skull stripping on the three real heads of `../shared/data`: mask Dice against each
//! head's reference mask, brain volume and seconds, as a Markdown table on stdout.
//!
//! Rows `auto` strip each head with no atlas. Rows `atlas` strip each head with the other two
//! heads as atlases (registered to it, masks fused by voting, boundary refined); a head's own
//! mask is never used to strip it. Rows `refine from GT ±3 mm` are labelled as using the
//! reference: they start `refine_boundary` from the reference mask eroded or dilated by 3 mm
//! and show how much of it the refinement recovers. A last row times the bias correction.
//!
//! Run with `cargo bench --bench skullstrip` (libtorch on one thread, as the measured figures
//! in the README were taken). A file that cannot be read stops the bench, naming the file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use voxflow_stages::intensity::{BiasParams, bias_correct};
use voxflow_stages::skullstrip::{self, AtlasHead, AtlasParams, AutoParams, RefineParams};
use voxflow_stages::volume::Volume;

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

fn load(rel: &str) -> Volume {
    let path: PathBuf = Path::new(DATA).join(rel);
    voxflow_stages::io::read_volume(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn binarise(v: &Volume) -> Volume {
    v.with_data(
        v.data
            .iter()
            .map(|&x| if x > 0.0 { 1.0 } else { 0.0 })
            .collect(),
    )
}

fn row(name: &str, method: &str, mask: &Volume, reference: &Volume, secs: f64) {
    println!(
        "| {name} | {method} | {:.3} | {:.0} | {:.0} | {secs:.1} |",
        skullstrip::dice(mask, reference).unwrap_or(f64::NAN),
        skullstrip::mask_volume_ml(mask),
        skullstrip::mask_volume_ml(reference)
    );
}

fn main() {
    tch::set_num_threads(1);
    let heads: Vec<AtlasHead> = CASES
        .iter()
        .map(|(id, head, mask)| AtlasHead {
            id: id.to_string(),
            image: load(head),
            mask: binarise(&load(mask)),
        })
        .collect();
    println!("| head | method | Dice | brain mL | reference mL | seconds |");
    println!("|---|---|---|---|---|---|");
    for h in &heads {
        let t = Instant::now();
        match skullstrip::auto(&h.image, &AutoParams::default()) {
            Ok(r) => row(&h.id, "auto", &r.mask, &h.mask, t.elapsed().as_secs_f64()),
            Err(e) => println!("| {} | auto failed: {e} | | | | |", h.id),
        }
    }
    for h in &heads {
        let others: Vec<&AtlasHead> = heads.iter().filter(|o| o.id != h.id).collect();
        let names: Vec<&str> = others.iter().map(|o| o.id.as_str()).collect();
        let method = format!("atlas ({})", names.join(" + "));
        let t = Instant::now();
        match skullstrip::atlas(&h.image, &others, &AtlasParams::default()) {
            Ok(r) => row(&h.id, &method, &r.mask, &h.mask, t.elapsed().as_secs_f64()),
            Err(e) => println!("| {} | {method} failed: {e} | | | | |", h.id),
        }
    }
    for h in &heads {
        for shift in [-3.0, 3.0] {
            let start = if shift < 0.0 {
                skullstrip::erode_mm(&h.mask, -shift)
            } else {
                skullstrip::dilate_mm(&h.mask, shift)
            };
            let before = skullstrip::dice(&start, &h.mask).unwrap_or(f64::NAN);
            let method = format!("refine from GT {shift:+} mm (uses GT; start Dice {before:.3})");
            let t = Instant::now();
            match skullstrip::refine_boundary(&h.image, &start, &RefineParams::default()) {
                Ok(r) => row(&h.id, &method, &r, &h.mask, t.elapsed().as_secs_f64()),
                Err(e) => println!("| {} | {method} failed: {e} | | | | |", h.id),
            }
        }
    }
    let h = &heads[0];
    let t = Instant::now();
    match bias_correct(&h.image, Some(&h.mask), &BiasParams::default()) {
        Ok(b) => println!(
            "| {} | bias_correct ({} iterations) | | | | {:.1} |",
            h.id,
            b.iterations,
            t.elapsed().as_secs_f64()
        ),
        Err(e) => println!("| {} | bias_correct failed: {e} | | | | |", h.id),
    }
}
