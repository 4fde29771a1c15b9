//! The brain extraction itself: [`auto`] from a raw head, and [`refine_boundary`] that snaps
//! a rough mask (the atlas method's, or `auto`'s own first guess) to the brain's edge.
//!
//! See the parent module for the design and its reasons; this file holds the steps.

use rayon::prelude::*;
use tracing::debug;

use crate::stage::StageError;
use crate::volume::Volume;

use super::levels::Histogram;
use super::lines::gaussian;
use super::morphology::{
    close_bits, dilate_bits, erode_bits, fill_holes_2d, fill_holes_bits, from_bits, largest_bits,
    open_bits, reconstruct_bits, to_bits,
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
    /// median intensity. Default 0.45.
    pub tissue_fraction: f64,
    /// Radius (mm) of the opening that cuts thin tissue bridges (vessels, dura, partial
    /// volume with the skull) before growing. Default 1.5.
    pub opening_mm: f64,
    /// Radius (mm) of the closing that takes in sulcal CSF and smooths the outline. Default 6.
    pub closing_mm: f64,
    /// How far (mm) the mask then extends into dark (CSF-like) voxels towards the inner skull
    /// surface. Default 2.
    pub csf_margin_mm: f64,
    /// Thickness (mm) of the outer layer of the head (skin, scalp and most of the skull)
    /// that is never brain. Default 7.
    pub scalp_mm: f64,
}

impl Default for RefineParams {
    fn default() -> RefineParams {
        RefineParams {
            search_mm: 6.0,
            tissue_fraction: 0.45,
            opening_mm: 1.5,
            closing_mm: 6.0,
            csf_margin_mm: 2.0,
            scalp_mm: 7.0,
        }
    }
}

/// Settings of [`auto`]. Distances are in millimetres.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoParams {
    /// Radius (mm) of the erosion that parts the brain from scalp, eyes and neck before the
    /// largest piece is kept. Default 6.
    pub erode_mm: f64,
    /// Standard deviation (mm) of the smoothing of the tissue indicator whose dense part
    /// (over one half) is eroded; 0 erodes the tissue voxels themselves. Default 2.
    pub density_sigma_mm: f64,
    /// The boundary refinement that follows.
    pub refine: RefineParams,
}

impl Default for AutoParams {
    fn default() -> AutoParams {
        AutoParams {
            erode_mm: 6.0,
            density_sigma_mm: 2.0,
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
    /// The head is the largest component above a tenth of the way from the 2nd to the 98th
    /// percentile, its holes filled in 3D and, so that a dark layer open to the edge of the
    /// field of view (at the neck) still counts as inside, slice by slice along each axis.
    fn new(head: &Volume, scalp_mm: f64) -> Result<Head, SkullStripError> {
        let (shape, spacing) = (head.shape, head.voxel_size());
        let hist = Histogram::new(head.frame(0), None).ok_or(SkullStripError::FlatImage)?;
        let (lo, hi) = (hist.percentile(0.5), hist.percentile(99.5));
        if hi <= lo {
            return Err(SkullStripError::FlatImage);
        }
        let background = hist.otsu(lo, hi);
        let (p2, p98) = (hist.percentile(2.0), hist.percentile(98.0));
        let air = p2 + 0.1 * (p98 - p2);
        let above: Vec<bool> = head.frame(0).par_iter().map(|&x| x as f64 > air).collect();
        let mut bits = fill_holes_bits(&largest_bits(&above, shape), shape);
        for axis in 0..3 {
            bits = fill_holes_2d(&bits, shape, axis);
        }
        let deep = erode_bits(&bits, shape, spacing, scalp_mm);
        debug!(background, air, "Head found");
        Ok(Head {
            background,
            bits,
            deep,
        })
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
    let levels = Levels {
        tissue_lo: background + fraction * (median - background),
        tissue_hi: hist.percentile(99.5) * 1.05,
    };
    debug!(?levels, median, "Tissue levels");
    Ok(levels)
}

/// Finds the brain in a raw T1-weighted head (skull, scalp, face and neck included) without
/// an atlas.
///
/// Steps: Otsu background level; the head (largest component above it, holes filled) less
/// an outer layer of `params.refine.scalp_mm`; tissue levels from a sphere at the head's
/// centre of mass; tissue voxels eroded by `params.erode_mm` so the brain parts from what
/// touches it; the largest piece, grown back; then [`refine_boundary`] with
/// `params.refine`. All distances are in mm.
///
/// # Errors
/// [`SkullStripError::FlatImage`] for an empty or constant image, [`SkullStripError::NoBrain`]
/// when a step leaves nothing.
pub fn auto(head: &Volume, params: &AutoParams) -> Result<StripResult, SkullStripError> {
    let (shape, spacing) = (head.shape, head.voxel_size());
    let data = head.frame(0);
    let found = Head::new(head, params.refine.scalp_mm)?;
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
    let dense = if params.density_sigma_mm > 0.0 {
        let mut d: Vec<f32> = tissue.iter().map(|&t| t as u8 as f32).collect();
        gaussian(&mut d, shape, spacing, params.density_sigma_mm);
        d.iter()
            .zip(&found.deep)
            .map(|(&x, &h)| h && x > 0.5)
            .collect()
    } else {
        tissue.clone()
    };
    let core = largest_bits(&erode_bits(&dense, shape, spacing, params.erode_mm), shape);
    if !core.contains(&true) {
        return Err(SkullStripError::NoBrain(format!(
            "no tissue survives a {} mm erosion",
            params.erode_mm
        )));
    }
    let grown = dilate_bits(&core, shape, spacing, params.erode_mm);
    let first: Vec<bool> = grown.iter().zip(&tissue).map(|(&g, &t)| g && t).collect();
    let first = fill_holes_bits(&close_bits(&first, shape, spacing, 2.0), shape);

    let bits = refine_bits(head, &first, &params.refine, Some((found, levels)))?;

    let mask = from_bits(head, &bits);
    let brain_volume_ml = mask_volume_ml(&mask);
    debug!(brain_volume_ml, "Skull stripped");
    Ok(StripResult {
        mask,
        brain_volume_ml,
    })
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
/// opened by `params.opening_mm` to cut thin bridges and grown from the mask's certain core
/// through tissue; the result is closed by `params.closing_mm` (sulci), its holes filled
/// (ventricles), and extended by up to `params.csf_margin_mm` into dark voxels only, towards
/// the inner skull surface.
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
    Ok(from_bits(head, &refine_bits(head, &bits, params, None)?))
}

fn refine_bits(
    head: &Volume,
    bits: &[bool],
    params: &RefineParams,
    known: Option<(Head, Levels)>,
) -> Result<Vec<bool>, SkullStripError> {
    let (shape, spacing) = (head.shape, head.voxel_size());
    let data = head.frame(0);
    if !bits.contains(&true) {
        return Err(SkullStripError::EmptyMask);
    }
    let inner = erode_bits(bits, shape, spacing, params.search_mm);
    let (found, levels) = match known {
        Some(k) => k,
        None => {
            let found = Head::new(head, params.scalp_mm)?;
            let probe = erode_bits(bits, shape, spacing, params.search_mm.min(5.0));
            let probe = if probe.contains(&true) {
                probe
            } else {
                bits.to_vec()
            };
            let levels = tissue_levels(head, &probe, found.background, params.tissue_fraction)?;
            (found, levels)
        }
    };
    let is_tissue = |x: f32| (x as f64) > levels.tissue_lo && (x as f64) < levels.tissue_hi;

    let outer = dilate_bits(bits, shape, spacing, params.search_mm);
    let candidate: Vec<bool> = (0..data.len())
        .into_par_iter()
        .map(|idx| outer[idx] && found.deep[idx] && is_tissue(data[idx]))
        .collect();
    let candidate = open_bits(&candidate, shape, spacing, params.opening_mm);
    let seed: Vec<bool> = inner
        .iter()
        .zip(&candidate)
        .map(|(&a, &c)| a && c)
        .collect();
    let seed = if seed.contains(&true) {
        seed
    } else {
        candidate.clone()
    };
    let grown = reconstruct_bits(&seed, &candidate, shape);
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
    let reach = dilate_bits(&hull, shape, spacing, params.csf_margin_mm);
    let out: Vec<bool> = (0..hull.len())
        .map(|idx| {
            hull[idx] || (reach[idx] && found.deep[idx] && (data[idx] as f64) <= levels.tissue_lo)
        })
        .collect();
    Ok(fill_holes_bits(&largest_bits(&out, shape), shape))
}
