//! The brain extraction itself: [`auto`] from a raw head, and [`refine_boundary`] that snaps
//! a rough mask (the atlas method's, or `auto`'s own first guess) to the brain's edge.
//!
//! See the parent module for the design and its reasons; this file holds the steps.

use rayon::prelude::*;
use tracing::debug;

use crate::stage::StageError;
use crate::volume::Volume;

use super::levels::Histogram;
use super::lines::squared_distance;
use super::morphology::{
    close_bits, dilate_bits, erode_bits, fill_holes_2d, fill_holes_bits, from_bits, grow_bits,
    largest_bits, open_bits, reconstruct_bits, to_bits,
};

/// Skull stripping could not be done on these inputs.
#[derive(Debug, thiserror::Error)]
pub enum SkullStripError {
    /// The head has no finite voxel, or a single value everywhere.
    #[error("the head image is empty or constant (no finite range of intensities)")]
    FlatImage,
    /// No voxel looked like tissue at the stated step.
    #[error("no brain found: {0}")]
    NoBrain(String),
    /// The mask given to refine is empty.
    #[error("the initial mask is empty")]
    EmptyMask,
    /// The atlas method was given no atlas head.
    #[error("no atlas head to strip with (a subject's own head is never used)")]
    NoAtlas,
    /// Registering an atlas head to the subject failed.
    #[error("registering atlas {atlas} to the head failed: {reason}")]
    Registration {
        /// The atlas's id.
        atlas: String,
        /// What the registration reported.
        reason: String,
    },
    /// An atlas head's own brain could not be found, so where its mask puts the brain's edge
    /// cannot be measured.
    #[error("measuring where atlas {atlas}'s mask puts the brain's edge failed: {reason}")]
    AtlasEdge {
        /// The atlas's id.
        atlas: String,
        /// What the extraction reported.
        reason: String,
    },
    /// Two volumes that must share a grid do not.
    #[error("grid mismatch: {what} has shape {got:?}, expected {want:?}")]
    ShapeMismatch {
        /// Which input is off.
        what: &'static str,
        /// Its shape.
        got: [usize; 3],
        /// The shape it should have.
        want: [usize; 3],
    },
}

impl From<SkullStripError> for StageError {
    fn from(e: SkullStripError) -> StageError {
        StageError::Data(e.to_string())
    }
}

/// Settings of [`refine_boundary`]. Distances are in millimetres.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefineParams {
    /// How far (mm) the boundary may move from the initial mask's, in or out. Default 6.
    pub search_mm: f64,
    /// Where tissue starts, as a fraction of the way from the background level to the brain's
    /// median intensity. Default 0.15: low, so that cortex in partial volume with CSF (and
    /// the blurred cortex of an averaged template) counts as tissue; the background level is
    /// Otsu's over the whole image, about half the brain's median, so this is still well
    /// above CSF. 0.45 lost the base of the fsaverage cerebellum and temporal lobes.
    pub tissue_fraction: f64,
    /// How far (mm, along 6-connected paths through tissue) the brain may extend from white
    /// matter: cortex, sulci and cerebellar folia, but not the orbits or neck beyond.
    /// Default 14.
    pub grow_mm: f64,
    /// Radius (mm) of the opening that cuts thin tissue bridges (vessels, dura, partial
    /// volume with the skull) before growing. Default 1.5.
    pub opening_mm: f64,
    /// Radius (mm) of the closing that takes in sulcal CSF and smooths the outline. Default 6.
    pub closing_mm: f64,
    /// The most (mm) the mask then extends into the dark (CSF and bone) layer outside the
    /// brain. Default 6.
    pub csf_margin_mm: f64,
    /// Which fraction of that dark layer's local thickness is taken in, from the brain side:
    /// 0 stops at the brain surface, 1 reaches the scalp or diploë. Default 0.45.
    pub csf_fraction: f64,
    /// Thickness (mm) of the outer layer of the head (skin, scalp and most of the skull)
    /// that is never brain. Default 7.
    pub scalp_mm: f64,
}

impl Default for RefineParams {
    fn default() -> RefineParams {
        RefineParams {
            search_mm: 6.0,
            tissue_fraction: 0.15,
            grow_mm: 14.0,
            opening_mm: 1.5,
            closing_mm: 6.0,
            csf_margin_mm: 6.0,
            csf_fraction: 0.45,
            scalp_mm: 7.0,
        }
    }
}

/// Settings of [`auto`]. Distances are in millimetres.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoParams {
    /// Radius (mm) of the opening of the white-matter-bright voxels that cuts thin bright
    /// bridges (fat, marrow, vessels) before the largest piece is kept. Default 1.5.
    pub white_opening_mm: f64,
    /// The boundary refinement that follows.
    pub refine: RefineParams,
}

impl Default for AutoParams {
    fn default() -> AutoParams {
        AutoParams {
            white_opening_mm: 1.5,
            refine: RefineParams::default(),
        }
    }
}

/// What [`auto`] returns.
#[derive(Clone, Debug)]
pub struct StripResult {
    /// The brain mask, 0/1 on the head's grid.
    pub mask: Volume,
    /// Volume of the mask in millilitres.
    pub brain_volume_ml: f64,
}

/// Intensity levels of a head that the steps threshold against.
#[derive(Clone, Copy, Debug)]
struct Levels {
    /// Lower end of brain tissue (between CSF and grey matter).
    tissue_lo: f64,
    /// Upper end of brain tissue (below fat and marrow).
    tissue_hi: f64,
    /// Between grey and white matter.
    white: f64,
}

/// Volume of a mask in millilitres.
pub fn mask_volume_ml(mask: &Volume) -> f64 {
    let m = mask.affine.fixed_view::<3, 3>(0, 0).determinant().abs();
    mask.frame(0).iter().filter(|&&x| x >= 0.5).count() as f64 * m / 1000.0
}

/// Dice overlap `2|A∩B| / (|A|+|B|)` of two masks on the same grid (inside: value ≥ 0.5).
/// Two empty masks overlap perfectly (1).
///
/// # Errors
/// [`SkullStripError::ShapeMismatch`] when the grids differ in shape.
pub fn dice(a: &Volume, b: &Volume) -> Result<f64, SkullStripError> {
    if a.shape != b.shape {
        return Err(SkullStripError::ShapeMismatch {
            what: "second mask",
            got: b.shape,
            want: a.shape,
        });
    }
    let (both, na, nb) = a
        .frame(0)
        .par_iter()
        .zip(b.frame(0))
        .map(|(&x, &y)| {
            let (x, y) = (x >= 0.5, y >= 0.5);
            ((x && y) as u64, x as u64, y as u64)
        })
        .reduce(|| (0, 0, 0), |p, q| (p.0 + q.0, p.1 + q.1, p.2 + q.2));
    if na + nb == 0 {
        return Ok(1.0);
    }
    Ok(2.0 * both as f64 / (na + nb) as f64)
}

/// What is known about a head before looking for the brain: its background level and which
/// voxels lie deeper than the scalp.
struct Head {
    /// Otsu's level over the robust range of all voxels: between the dark classes (air,
    /// noise floor, CSF, bone) and tissue. The low anchor of the tissue levels.
    background: f64,
    /// Voxels of the head, every cavity filled.
    bits: Vec<bool>,
    /// Head voxels farther than `scalp_mm` from the air around the head.
    deep: Vec<bool>,
}

impl Head {
    /// The background level and the head's voxels on the full grid. The head is the largest
    /// component above a tenth of the way from the 2nd to the 98th percentile, its holes
    /// filled in 3D and, so that a dark layer open to the edge of the field of view (at the
    /// neck) still counts as inside, slice by slice along each axis.
    fn locate(head: &Volume) -> Result<(f64, Vec<bool>), SkullStripError> {
        let shape = head.shape;
        let hist = Histogram::new(head.frame(0), None).ok_or(SkullStripError::FlatImage)?;
        let (lo, hi) = (hist.percentile(0.5), hist.percentile(99.5));
        if hi <= lo {
            return Err(SkullStripError::FlatImage);
        }
        let background = hist.otsu(lo, hi);
        let (p2, p98) = (hist.percentile(2.0), hist.percentile(98.0));
        // Above the air's noise too: the Rician noise of a magnitude image peaks at σ and
        // rarely passes 4σ, while a tenth of the range sat at its mean for noise of 5 % of
        // the range, so the "head" filled the field of view (mask Dice 0.16 on fsaverage).
        // Capped at half the level between dark classes and tissue, below CSF and bone.
        let noise = (4.0 * (hist.mode_below(background) - lo.min(0.0))).min(0.5 * background);
        let air = (p2 + 0.1 * (p98 - p2)).max(noise);
        let above: Vec<bool> = head.frame(0).par_iter().map(|&x| x as f64 > air).collect();
        let mut bits = fill_holes_bits(&largest_bits(&above, shape), shape);
        for axis in 0..3 {
            bits = fill_holes_2d(&bits, shape, axis);
        }
        debug!(background, air, "Head found");
        Ok((background, bits))
    }

    /// The head on a cropped grid `sub`, from its cropped voxels.
    fn new(sub: &Volume, background: f64, bits: Vec<bool>, scalp_mm: f64) -> Head {
        let deep = erode_bits(&bits, sub.shape, sub.voxel_size(), scalp_mm);
        Head {
            background,
            bits,
            deep,
        }
    }
}

/// A box of the grid: where the work happens, so that the air around a head costs nothing.
struct Crop {
    lo: [usize; 3],
    shape: [usize; 3],
    full: [usize; 3],
}

impl Crop {
    /// The bounding box of `bits` grown by `margin` voxels, or None when `bits` is empty.
    fn around(bits: &[bool], full: [usize; 3], margin: usize) -> Option<Crop> {
        let [ni, nj, _] = full;
        let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
        for (idx, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
            let p = [idx % ni, (idx / ni) % nj, idx / (ni * nj)];
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a]);
            }
        }
        if lo[0] == usize::MAX {
            return None;
        }
        let lo = [0, 1, 2].map(|a| lo[a].saturating_sub(margin));
        let hi = [0, 1, 2].map(|a| (hi[a] + margin).min(full[a] - 1));
        let shape = [0, 1, 2].map(|a| hi[a] - lo[a] + 1);
        Some(Crop { lo, shape, full })
    }

    fn index(&self, i: usize, j: usize, k: usize) -> usize {
        let [ni, nj, _] = self.full;
        (self.lo[0] + i) + ni * ((self.lo[1] + j) + nj * (self.lo[2] + k))
    }

    fn take<T: Copy>(&self, full: &[T]) -> Vec<T> {
        let [si, sj, sk] = self.shape;
        let mut out = Vec::with_capacity(si * sj * sk);
        for k in 0..sk {
            for j in 0..sj {
                let start = self.index(0, j, k);
                out.extend_from_slice(&full[start..start + si]);
            }
        }
        out
    }

    fn paste(&self, sub: &[bool]) -> Vec<bool> {
        let [si, sj, sk] = self.shape;
        let mut out = vec![false; self.full.iter().product()];
        for k in 0..sk {
            for j in 0..sj {
                let start = self.index(0, j, k);
                let from = si * (j + sj * k);
                out[start..start + si].copy_from_slice(&sub[from..from + si]);
            }
        }
        out
    }

    fn volume(&self, v: &Volume) -> Volume {
        let shift = crate::volume::Affine::new_translation(&nalgebra::Vector3::new(
            self.lo[0] as f64,
            self.lo[1] as f64,
            self.lo[2] as f64,
        ));
        Volume::new(self.take(v.frame(0)), self.shape, v.affine * shift)
    }
}

/// Tissue levels from the voxels of `inside` (which should be mostly brain) above the
/// background level.
fn tissue_levels(
    head: &Volume,
    inside: &[bool],
    background: f64,
    fraction: f64,
) -> Result<Levels, SkullStripError> {
    let data = head.frame(0);
    let keep: Vec<bool> = inside
        .iter()
        .zip(data)
        .map(|(&m, &x)| m && x as f64 > background)
        .collect();
    let hist = Histogram::new(data, Some(&keep))
        .ok_or_else(|| SkullStripError::NoBrain("no voxel above background inside".into()))?;
    let median = hist.percentile(50.0);
    let (tissue_lo, tissue_hi) = (
        background + fraction * (median - background),
        hist.percentile(99.5) * 1.05,
    );
    let levels = Levels {
        tissue_lo,
        tissue_hi,
        white: hist.otsu(tissue_lo, tissue_hi),
    };
    debug!(?levels, median, "Tissue levels");
    Ok(levels)
}

/// A smoothed copy of `head` when its air is noisy, else `None`.
///
/// The noise of a magnitude image's air (Rician, peaking at σ) is the mode of the dark
/// values; when σ passes 1 % of the robust range, a Gaussian of σ 1 mm (noise down about
/// fifteenfold, edges moved well under a voxel) runs first, since every step thresholds
/// single voxels: with noise of 2 % of the range, fsaverage's mask lost the CSF layer and
/// fell from 0.914 to 0.857. Clean heads (the three shared ones) are left as they are.
fn denoised(head: &Volume) -> Result<Option<Volume>, SkullStripError> {
    let hist = Histogram::new(head.frame(0), None).ok_or(SkullStripError::FlatImage)?;
    let (lo, hi) = (hist.percentile(0.5), hist.percentile(99.5));
    if hi <= lo {
        return Err(SkullStripError::FlatImage);
    }
    let sigma = hist.mode_below(hist.otsu(lo, hi)) - lo.min(0.0);
    let range = hist.percentile(98.0) - hist.percentile(2.0);
    if sigma <= 0.01 * range {
        return Ok(None);
    }
    debug!(
        noise = sigma,
        range, "Noisy air: smoothing the head before stripping"
    );
    let mut data = head.frame(0).to_vec();
    super::lines::gaussian(&mut data, head.shape, head.voxel_size(), 1.0);
    Ok(Some(head.with_data(data)))
}

/// The steps of [`auto`] up to the brain's hull, on the head's bounding box.
fn extract(full: &Volume, params: &AutoParams) -> Result<Extraction, SkullStripError> {
    let denoised = denoised(full)?;
    let full = denoised.as_ref().unwrap_or(full);
    let (background, head_bits) = Head::locate(full)?;
    let crop = Crop::around(&head_bits, full.shape, 2)
        .ok_or_else(|| SkullStripError::NoBrain("nothing above the background level".into()))?;
    let head = &crop.volume(full);
    let found = Head::new(
        head,
        background,
        crop.take(&head_bits),
        params.refine.scalp_mm,
    );
    let (shape, spacing) = (head.shape, head.voxel_size());
    let data = head.frame(0);
    let centre = sphere_at_centre(&found.bits, shape, spacing)
        .ok_or_else(|| SkullStripError::NoBrain("nothing above the background level".into()))?;
    let levels = tissue_levels(
        head,
        &centre,
        found.background,
        params.refine.tissue_fraction,
    )?;

    let tissue: Vec<bool> = data
        .par_iter()
        .zip(&found.deep)
        .map(|(&x, &h)| h && (x as f64) > levels.tissue_lo && (x as f64) < levels.tissue_hi)
        .collect();
    let white: Vec<bool> = data
        .par_iter()
        .zip(&found.deep)
        .map(|(&x, &h)| h && (x as f64) >= levels.white && (x as f64) < levels.tissue_hi)
        .collect();
    let white = open_bits(&white, shape, spacing, params.white_opening_mm);
    let core = largest_bits(&white, shape);
    if !core.contains(&true) {
        return Err(SkullStripError::NoBrain(format!(
            "no white matter survives a {} mm opening",
            params.white_opening_mm
        )));
    }
    let first = grow_bits(&core, &tissue, shape, spacing, params.refine.grow_mm);
    let first = fill_holes_bits(&close_bits(&first, shape, spacing, 2.0), shape);

    let (hull, band) = hull_bits(head, &first, &params.refine, found, Some(levels), true)?;
    Ok(Extraction { crop, hull, band })
}

/// [`auto`] up to the brain's hull, with the dark layer around it measured: what
/// [`auto`] and [`fit_csf_fraction`] share.
struct Extraction {
    crop: Crop,
    hull: Vec<bool>,
    band: DarkBand,
}

impl Extraction {
    /// The mask on the cropped grid with `fraction` of the dark layer taken in, at most
    /// `cap_mm` deep.
    fn mask(&self, fraction: f64, cap_mm: f64) -> Vec<bool> {
        self.band
            .brain(&self.hull, fraction, cap_mm, self.crop.shape)
    }
}

/// Finds the brain in a raw T1-weighted head (skull, scalp, face and neck included) without
/// an atlas.
///
/// Steps (the module documentation argues each): the head and, inside it, the voxels deeper
/// than `params.refine.scalp_mm`; tissue and white-matter levels from a sphere at the head's
/// centre of mass; the largest piece of white-matter-bright voxels after an opening of
/// `params.white_opening_mm`; tissue reached from it within `params.refine.grow_mm`; then the
/// boundary work of [`refine_boundary`] with `params.refine`. All distances are in mm. The
/// work happens on the head's bounding box, so empty field of view costs little.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use voxflow_stages::skullstrip::{auto, AutoParams};
/// let head = voxflow_stages::io::read_volume("colin27/ch2.nii.gz".as_ref())?;
/// let brain = auto(&head, &AutoParams::default())?;
/// assert!(brain.brain_volume_ml > 500.0);
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`SkullStripError::FlatImage`] for an empty or constant image, [`SkullStripError::NoBrain`]
/// when a step leaves nothing.
pub fn auto(head: &Volume, params: &AutoParams) -> Result<StripResult, SkullStripError> {
    let found = extract(head, params)?;
    let bits = found.mask(params.refine.csf_fraction, params.refine.csf_margin_mm);
    let mask = from_bits(head, &found.crop.paste(&bits));
    let brain_volume_ml = mask_volume_ml(&mask);
    debug!(brain_volume_ml, "Skull stripped");
    Ok(StripResult {
        mask,
        brain_volume_ml,
    })
}

/// The CSF share (`csf_fraction`) with which [`auto`] best reproduces `mask`, a brain mask
/// of `head` drawn by another tool, and the Dice it then reaches: where that tool puts the
/// brain's edge in the dark layer between cortex and skull (0 at the cortex, as BET does on
/// colin27; about 0.45 for the MNI152 mask; 0.7 for FreeSurfer's fsaverage mask). Shares
/// from 0 to 1 in steps of 0.05 are tried on one extraction (the layer may then reach
/// `max(csf_margin_mm, 12)` deep), so this costs one [`auto`] plus a few seconds.
///
/// # Errors
/// Those of [`auto`], and [`SkullStripError::ShapeMismatch`] when `mask` is not on `head`'s
/// grid.
pub fn fit_csf_fraction(
    head: &Volume,
    mask: &Volume,
    params: &AutoParams,
) -> Result<(f64, f64), SkullStripError> {
    if mask.shape != head.shape {
        return Err(SkullStripError::ShapeMismatch {
            what: "mask",
            got: mask.shape,
            want: head.shape,
        });
    }
    let found = extract(head, params)?;
    let bits = to_bits(mask);
    // Voxels of `mask` outside the crop count against every share, as ours are empty there.
    let reference = bits.iter().filter(|&&b| b).count();
    let within = found.crop.take(&bits);
    let cap = fitted_cap(params.refine.csf_margin_mm);
    let scores: Vec<(f64, f64)> = (0..=20)
        .into_par_iter()
        .map(|step| {
            let fraction = step as f64 * 0.05;
            let ours = found.mask(fraction, cap);
            let (both, n) = ours
                .iter()
                .zip(&within)
                .fold((0usize, 0usize), |(b, n), (&o, &w)| {
                    (b + (o && w) as usize, n + o as usize)
                });
            (fraction, 2.0 * both as f64 / (n + reference).max(1) as f64)
        })
        .collect();
    let best = scores.into_iter().fold(
        (0.0, f64::NEG_INFINITY),
        |a, b| if b.1 > a.1 { b } else { a },
    );
    debug!(
        csf_fraction = best.0,
        dice = best.1,
        "CSF share fitted to a mask"
    );
    Ok(best)
}

/// How deep (mm) the dark layer may be taken when the CSF share is fitted to another tool's
/// masks: deep enough for a share near 1 on a wide layer (fsaverage's is about 8 mm).
pub(crate) fn fitted_cap(csf_margin_mm: f64) -> f64 {
    csf_margin_mm.max(12.0)
}

/// Voxels within a sphere around the centre of mass of `head_bits`, with a radius of half
/// that of a ball of the head's volume: mostly brain in any head scan.
fn sphere_at_centre(head_bits: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Option<Vec<bool>> {
    let [ni, nj, _] = shape;
    let (mut n, mut s) = (0usize, [0.0f64; 3]);
    for (idx, _) in head_bits.iter().enumerate().filter(|(_, b)| **b) {
        n += 1;
        s[0] += (idx % ni) as f64;
        s[1] += ((idx / ni) % nj) as f64;
        s[2] += (idx / (ni * nj)) as f64;
    }
    if n == 0 {
        return None;
    }
    let c = s.map(|x| x / n as f64);
    let vol = n as f64 * spacing.iter().product::<f64>();
    let r = 0.5 * (3.0 * vol / (4.0 * std::f64::consts::PI)).cbrt();
    debug!(centre = ?c, radius_mm = r, "Head centre");
    let bits = (0..head_bits.len())
        .into_par_iter()
        .map(|idx| {
            let p = [
                (idx % ni) as f64,
                ((idx / ni) % nj) as f64,
                (idx / (ni * nj)) as f64,
            ];
            let d2: f64 = (0..3).map(|a| ((p[a] - c[a]) * spacing[a]).powi(2)).sum();
            head_bits[idx] && d2 <= r * r
        })
        .collect();
    Some(bits)
}

/// Snaps a brain mask that may be off by a few millimetres to the brain's boundary in `head`.
///
/// Inside the band of `params.search_mm` around the initial outline, tissue voxels (between
/// the levels measured inside the mask, and deeper than `params.scalp_mm` from the air) are
/// opened by `params.opening_mm` to cut thin bridges and grown through tissue, at most
/// `params.grow_mm`, from the white matter of the mask's certain core; the result is closed by `params.closing_mm` (sulci), its holes filled
/// (ventricles), and extended into the dark layer (CSF and bone) around it by
/// `params.csf_fraction` of that layer's local thickness, at most `params.csf_margin_mm`.
/// This is the atlas method's last step: give it the atlas mask carried onto the subject.
///
/// Tissue levels come from the mask eroded by up to 5 mm, so the mask must be mostly brain;
/// one off by 3 mm either way is recovered (see the crate's skull-stripping tests and bench).
///
/// # Errors
/// [`SkullStripError::ShapeMismatch`] when `mask` is not on `head`'s grid,
/// [`SkullStripError::EmptyMask`] when it is empty, [`SkullStripError::FlatImage`] for a
/// constant head.
pub fn refine_boundary(
    head: &Volume,
    mask: &Volume,
    params: &RefineParams,
) -> Result<Volume, SkullStripError> {
    if mask.shape != head.shape {
        return Err(SkullStripError::ShapeMismatch {
            what: "mask",
            got: mask.shape,
            want: head.shape,
        });
    }
    let bits = to_bits(mask);
    let (background, head_bits) = Head::locate(head)?;
    let both: Vec<bool> = bits.iter().zip(&head_bits).map(|(&a, &b)| a || b).collect();
    let crop = Crop::around(&both, head.shape, 2).ok_or(SkullStripError::EmptyMask)?;
    let sub = crop.volume(head);
    let found = Head::new(&sub, background, crop.take(&head_bits), params.scalp_mm);
    let refined = refine_bits(&sub, &crop.take(&bits), params, found, None, false)?;
    Ok(from_bits(head, &crop.paste(&refined)))
}

/// The boundary steps shared by [`auto`] and [`refine_boundary`] on a cropped grid. Levels
/// are measured inside `bits` unless given. A `trusted` mask (auto's own) is regrown from
/// all of its interior; another is regrown from its interior's white matter, `grow_mm` at
/// most.
fn refine_bits(
    head: &Volume,
    bits: &[bool],
    params: &RefineParams,
    found: Head,
    levels: Option<Levels>,
    trusted: bool,
) -> Result<Vec<bool>, SkullStripError> {
    let (hull, band) = hull_bits(head, bits, params, found, levels, trusted)?;
    Ok(band.brain(&hull, params.csf_fraction, params.csf_margin_mm, head.shape))
}

/// [`refine_bits`] up to the closed, filled hull of the brain, with the dark layer around it
/// measured.
fn hull_bits(
    head: &Volume,
    bits: &[bool],
    params: &RefineParams,
    found: Head,
    levels: Option<Levels>,
    trusted: bool,
) -> Result<(Vec<bool>, DarkBand), SkullStripError> {
    let (shape, spacing) = (head.shape, head.voxel_size());
    let data = head.frame(0);
    if !bits.contains(&true) {
        return Err(SkullStripError::EmptyMask);
    }
    let inner = erode_bits(bits, shape, spacing, params.search_mm);
    let levels = match levels {
        Some(l) => l,
        None => {
            let probe = erode_bits(bits, shape, spacing, params.search_mm.min(5.0));
            let probe = if probe.contains(&true) {
                probe
            } else {
                bits.to_vec()
            };
            tissue_levels(head, &probe, found.background, params.tissue_fraction)?
        }
    };
    let is_tissue = |x: f32| (x as f64) > levels.tissue_lo && (x as f64) < levels.tissue_hi;

    let outer = dilate_bits(bits, shape, spacing, params.search_mm);
    let candidate: Vec<bool> = (0..data.len())
        .into_par_iter()
        .map(|idx| outer[idx] && found.deep[idx] && is_tissue(data[idx]))
        .collect();
    let candidate = open_bits(&candidate, shape, spacing, params.opening_mm);
    let interior: Vec<bool> = inner
        .iter()
        .zip(&candidate)
        .map(|(&a, &c)| a && c)
        .collect();
    let grown = if trusted {
        let seed = if interior.contains(&true) {
            interior
        } else {
            candidate.clone()
        };
        reconstruct_bits(&seed, &candidate, shape)
    } else {
        // A mask from elsewhere may overshoot into face or neck tissue that touches the
        // brain (the blurred skull base of an average template), and growth from all of its
        // interior would follow that tissue. So, as in `auto`, growth starts from white
        // matter and is bounded.
        let white: Vec<bool> = (0..data.len())
            .map(|idx| interior[idx] && data[idx] as f64 >= levels.white)
            .collect();
        let seed = [white, interior]
            .into_iter()
            .find(|s| s.contains(&true))
            .unwrap_or_else(|| candidate.clone());
        grow_bits(&seed, &candidate, shape, spacing, params.grow_mm)
    };
    let brain: Vec<bool> = grown.iter().zip(&inner).map(|(&g, &i)| g || i).collect();
    let brain = largest_bits(&brain, shape);
    if !brain.contains(&true) {
        return Err(SkullStripError::NoBrain(
            "no tissue connected to the mask".into(),
        ));
    }

    let hull = fill_holes_bits(
        &close_bits(&brain, shape, spacing, params.closing_mm),
        shape,
    );
    let band = DarkBand::measure(&hull, data, levels.tissue_lo, shape, spacing);
    Ok((hull, band))
}

/// The dark layer (CSF and bone, at most `dark`) around a brain's hull: per voxel, the
/// distance to the hull and to the nearest brighter voxel outside it. T1 does not tell CSF
/// from cortical bone, so the inner skull surface is placed at a share of this layer's
/// local width.
struct DarkBand {
    bright: Vec<bool>,
    to_hull: Vec<f32>,
    to_bright: Vec<f32>,
}

impl DarkBand {
    fn measure(
        hull: &[bool],
        data: &[f32],
        dark: f64,
        shape: [usize; 3],
        spacing: [f64; 3],
    ) -> DarkBand {
        let bright: Vec<bool> = hull
            .par_iter()
            .zip(data)
            .map(|(&h, &x)| !h && x as f64 > dark)
            .collect();
        DarkBand {
            to_hull: squared_distance(hull, shape, spacing),
            to_bright: squared_distance(&bright, shape, spacing),
            bright,
        }
    }

    /// `hull` plus the dark voxels whose distance to it is at most `fraction` of the layer's
    /// local width (distance to the hull plus distance to the next brighter voxel), and at
    /// most `cap_mm`.
    // Limitation: one share for the whole layer; the three reference masks want 0 (colin27)
    // to 0.7 (fsaverage), so no value matches all of them (see the module documentation).
    fn take(&self, hull: &[bool], fraction: f64, cap_mm: f64) -> Vec<bool> {
        let (alpha, cap) = (fraction as f32, cap_mm as f32);
        (0..hull.len())
            .into_par_iter()
            .map(|idx| {
                if hull[idx] {
                    return true;
                }
                let (d_in, d_out) = (self.to_hull[idx].sqrt(), self.to_bright[idx].sqrt());
                !self.bright[idx] && d_in <= cap && d_in <= alpha * (d_in + d_out)
            })
            .collect()
    }

    /// [`DarkBand::take`], its largest piece with holes filled: the brain mask.
    fn brain(&self, hull: &[bool], fraction: f64, cap_mm: f64, shape: [usize; 3]) -> Vec<bool> {
        let out = self.take(hull, fraction, cap_mm);
        fill_holes_bits(&largest_bits(&out, shape), shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Affine;

    /// A synthetic head on a 1.5 × 1.5 × 3 mm grid: nested ellipsoids of white matter, grey
    /// matter, CSF, bone and bright scalp fat, plus a block of muscle (a "face") touching the
    /// scalp. Returns the head and the intracranial volume (brain and CSF), which is what
    /// the default `csf_fraction` aims at when the bone is thin.
    fn phantom() -> (Volume, Volume) {
        let (shape, vox) = ([140, 160, 60], [1.5, 1.5, 3.0]);
        let layers = [
            (1.00, 110.0),
            (1.12, 75.0),
            (1.18, 30.0),
            (1.24, 8.0),
            (1.36, 160.0),
        ];
        let radii = [45.0, 55.0, 40.0];
        let centre = [0, 1, 2].map(|a| shape[a] as f64 * vox[a] / 2.0);
        let mut head = vec![0.0f32; shape.iter().product()];
        let mut brain = vec![0.0f32; head.len()];
        for k in 0..shape[2] {
            for j in 0..shape[1] {
                for i in 0..shape[0] {
                    let p = [i as f64 * vox[0], j as f64 * vox[1], k as f64 * vox[2]];
                    let d = (0..3)
                        .map(|a| ((p[a] - centre[a]) / radii[a]).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    let idx = i + shape[0] * (j + shape[1] * k);
                    if let Some(&(_, v)) = layers.iter().find(|(r, _)| d <= *r) {
                        head[idx] = v;
                    }
                    if d <= 1.18 {
                        brain[idx] = 1.0;
                    }
                    let face = p[1] > centre[1] + 1.3 * radii[1] && (p[0] - centre[0]).abs() < 30.0;
                    if face && (p[1] - centre[1]) < 1.6 * radii[1] && head[idx] == 0.0 {
                        head[idx] = 70.0;
                    }
                }
            }
        }
        let mut affine = Affine::identity();
        for a in 0..3 {
            affine[(a, a)] = vox[a];
        }
        let head = Volume::new(head, shape, affine);
        let brain = head.with_data(brain);
        (head, brain)
    }

    #[test]
    fn auto_finds_the_brain_of_a_synthetic_anisotropic_head() {
        let (head, brain) = phantom();
        let r = auto(&head, &AutoParams::default()).unwrap();
        let d = dice(&r.mask, &brain).unwrap();
        assert!(d > 0.93, "dice {d}");
        let want = mask_volume_ml(&brain);
        assert!(
            (r.brain_volume_ml / want - 1.0).abs() < 0.1,
            "{} vs {want}",
            r.brain_volume_ml
        );
    }

    #[test]
    fn refine_snaps_a_shifted_mask_back() {
        let (head, brain) = phantom();
        for start in [
            super::super::erode_mm(&brain, 4.0),
            super::super::dilate_mm(&brain, 4.0),
        ] {
            let r = refine_boundary(&head, &start, &RefineParams::default()).unwrap();
            let (before, after) = (dice(&start, &brain).unwrap(), dice(&r, &brain).unwrap());
            assert!(after > 0.93 && after > before, "{before} -> {after}");
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let flat = Volume::new(vec![5.0; 1000], [10, 10, 10], Affine::identity());
        assert!(matches!(
            auto(&flat, &AutoParams::default()),
            Err(SkullStripError::FlatImage)
        ));
        let (head, _) = phantom();
        let empty = head.zeros_like();
        assert!(matches!(
            refine_boundary(&head, &empty, &RefineParams::default()),
            Err(SkullStripError::EmptyMask)
        ));
        assert!(matches!(
            refine_boundary(&head, &flat, &RefineParams::default()),
            Err(SkullStripError::ShapeMismatch { .. })
        ));
        assert!(dice(&head, &flat).is_err());
    }
}
