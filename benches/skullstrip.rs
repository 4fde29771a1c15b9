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
use voxflow_stages::resample::{Interp, resample};
use voxflow_stages::skullstrip::{self, AtlasHead, AtlasParams, AutoParams, Edge, RefineParams};
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
        .map(|(id, head, mask)| AtlasHead::new(*id, load(head), binarise(&load(mask))))
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
    // The atlases' own edge convention: each head's CSF share measured on its own mask
    // (legitimate: that head is then an atlas, never the subject), then every head stripped
    // with the other two following their mean share.
    let mut measured = heads.clone();
    for h in &mut measured {
        let t = Instant::now();
        match h.measure_edge(&RefineParams::default()) {
            Ok(f) => println!(
                "| {} | edge of its own mask: csf_fraction {f:.2} | | | | {:.1} |",
                h.id,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => println!("| {} | edge measurement failed: {e} | | | | |", h.id),
        }
    }
    let params = AtlasParams {
        edge: Edge::Atlases,
        ..AtlasParams::default()
    };
    for h in &measured {
        let others: Vec<&AtlasHead> = measured.iter().filter(|o| o.id != h.id).collect();
        let share: f64 = others.iter().filter_map(|o| o.csf_fraction).sum::<f64>() / 2.0;
        let method = format!("atlas, edge = atlases (share {share:.2})");
        let t = Instant::now();
        match skullstrip::atlas(&h.image, &others, &params) {
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
    conventions(&heads);
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

/// Where each reference draws the brain's edge, and what that allows any one method.
///
/// colin27 and MNI152 share MNI space, so one reference mask can be laid on the other head's
/// grid with no registration at all: the best any atlas method can do by carrying that mask.
/// Then `auto` with its CSF share swept from 0 (stop at the cortex) to 1 (reach the
/// diploë or scalp): one row per setting, Dice on each head and the worst of the three.
fn conventions(heads: &[AtlasHead]) {
    println!();
    println!("| reference carried with no registration (shared MNI space) | Dice |");
    println!("|---|---|");
    for (from, to) in [(1, 0), (0, 1)] {
        let (src, dst) = (&heads[from], &heads[to]);
        let placed = resample(&src.mask, &dst.mask.grid(), Interp::Linear, |p| p);
        let placed = placed.with_data(
            placed
                .data
                .iter()
                .map(|&x| if x >= 0.5 { 1.0 } else { 0.0 })
                .collect(),
        );
        println!(
            "| {} mask on {} vs {}'s own | {:.3} |",
            src.id,
            dst.id,
            dst.id,
            skullstrip::dice(&placed, &dst.mask).unwrap_or(f64::NAN)
        );
    }
    println!();
    let names: Vec<&str> = heads.iter().map(|h| h.id.as_str()).collect();
    println!("| auto, csf_fraction | {} | worst |", names.join(" | "));
    println!("|---|---|---|---|---|");
    for fraction in [0.0, 0.25, 0.45, 0.7, 1.0] {
        let mut params = AutoParams::default();
        params.refine.csf_fraction = fraction;
        params.refine.csf_margin_mm = params.refine.csf_margin_mm.max(10.0 * fraction);
        let scores: Vec<f64> = heads
            .iter()
            .map(|h| match skullstrip::auto(&h.image, &params) {
                Ok(r) => skullstrip::dice(&r.mask, &h.mask).unwrap_or(f64::NAN),
                Err(_) => f64::NAN,
            })
            .collect();
        let worst = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let cells: Vec<String> = scores.iter().map(|d| format!("{d:.3}")).collect();
        println!("| {fraction} | {} | {worst:.3} |", cells.join(" | "));
    }
}
