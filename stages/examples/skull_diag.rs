//! A diagnostic for tuning skull stripping (not used by the pipelines): strips the shared heads with
//! `auto` and/or `atlas` (settings from the TOML in `AUTO` / `ATLAS` env vars) and writes
//! head, reference and masks as uncompressed NIfTI under the directory given as argument 1.
//! Argument 2 picks the method(s): `auto`, `atlas` or `both`; argument 3 the heads (comma list).
use std::path::Path;
use std::time::Instant;

use voxflow_stages::io::write_nifti;
use voxflow_stages::skullstrip::{self, AtlasHead, AtlasParams, AutoParams};
use voxflow_stages::volume::{DataType, Volume};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data");
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
    voxflow_stages::io::read_volume(&Path::new(DATA).join(rel)).unwrap()
}

fn main() {
    tch::set_num_threads(1);
    let args: Vec<String> = std::env::args().collect();
    let out = Path::new(&args[1]);
    let which = args.get(2).map(String::as_str).unwrap_or("both");
    let only: Vec<String> = args
        .get(3)
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_default();
    let auto_p: AutoParams = toml::from_str(&std::env::var("AUTO").unwrap_or_default()).unwrap();
    let atlas_p: AtlasParams = toml::from_str(&std::env::var("ATLAS").unwrap_or_default()).unwrap();
    let heads: Vec<AtlasHead> = CASES
        .iter()
        .map(|(id, h, m)| {
            let mask = load(m);
            AtlasHead {
                id: id.to_string(),
                mask: mask.with_data(mask.data.iter().map(|&x| (x > 0.0) as u8 as f32).collect()),
                image: load(h),
            }
        })
        .collect();
    for h in &heads {
        if !only.is_empty() && !only.contains(&h.id) {
            continue;
        }
        let dir = out.join(&h.id);
        std::fs::create_dir_all(&dir).unwrap();
        if std::env::var("DUMP").is_ok() {
            write_nifti(&dir.join("head.nii"), &h.image, DataType::Float32).unwrap();
            write_nifti(&dir.join("ref.nii"), &h.mask, DataType::Float32).unwrap();
        }
        if which == "auto" || which == "both" {
            let t = Instant::now();
            let r = skullstrip::auto(&h.image, &auto_p).unwrap();
            report(&h.id, "auto", &r.mask, &h.mask, t.elapsed().as_secs_f64());
            write_nifti(&dir.join("auto.nii"), &r.mask, DataType::Float32).unwrap();
        }
        if which == "refine" {
            let fused = voxflow_stages::io::read_volume(&dir.join("fused.nii")).unwrap();
            let p: skullstrip::RefineParams =
                toml::from_str(&std::env::var("REFINE").unwrap_or_default()).unwrap();
            let t = Instant::now();
            let r = skullstrip::refine_boundary(&h.image, &fused, &p).unwrap();
            report(&h.id, "refine", &r, &h.mask, t.elapsed().as_secs_f64());
            write_nifti(&dir.join("refined.nii"), &r, DataType::Float32).unwrap();
        }
        if which == "atlas" || which == "both" {
            let others: Vec<&AtlasHead> = heads.iter().filter(|o| o.id != h.id).collect();
            let t = Instant::now();
            let r = skullstrip::atlas(&h.image, &others, &atlas_p).unwrap();
            report(&h.id, "atlas", &r.mask, &h.mask, t.elapsed().as_secs_f64());
            let name = if atlas_p.refine {
                "atlas.nii"
            } else {
                "fused.nii"
            };
            write_nifti(&dir.join(name), &r.mask, DataType::Float32).unwrap();
        }
    }
}

fn report(id: &str, method: &str, m: &Volume, r: &Volume, secs: f64) {
    let vox = m.affine.fixed_view::<3, 3>(0, 0).determinant().abs() / 1000.0;
    let (mut fp, mut fn_) = (0usize, 0usize);
    for (&a, &b) in m.data.iter().zip(&r.data) {
        fp += (a >= 0.5 && b < 0.5) as usize;
        fn_ += (a < 0.5 && b >= 0.5) as usize;
    }
    println!(
        "{id:10} {method:6} dice {:.4}  mL {:.0} (ref {:.0})  FP {:.0} FN {:.0}  {secs:.1} s",
        skullstrip::dice(m, r).unwrap(),
        skullstrip::mask_volume_ml(m),
        skullstrip::mask_volume_ml(r),
        fp as f64 * vox,
        fn_ as f64 * vox
    );
}
