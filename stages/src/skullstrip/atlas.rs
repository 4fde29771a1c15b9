//! The atlas method: brain masks of other heads carried onto a subject by registration,
//! fused by voting, and replaced by the subject's own brain boundary near them.
//!
//! Each atlas head (an image with skull and its brain mask) is registered to the subject's
//! head with [`crate::register::register`] (affine, then deformable, skull included: the
//! whole head is the best guide to where the brain is). Its mask is carried onto the subject's
//! grid by linear interpolation, the carried masks are averaged, and voxels where at least
//! half of the atlases agree are kept.
//!
//! The boundary then comes from the subject's own intensities: [`super::auto`] is run on the
//! subject and its mask is kept where it lies within `reach_mm` (10) of the fused mask
//! (largest piece, holes filled). The fused mask thus only guards against what the classical
//! extraction can get wrong far from the brain (a leak into the orbits or neck), and the
//! edge is the subject's, not the atlases'. A `reach_mm` of 5 cut fsaverage's cerebellum
//! (0.907). Why not snap the fused mask itself with
//! [`super::refine_boundary`], as this method first did: the carried masks bring their
//! atlases' edge conventions (up to 5 mm apart between the bundled references) and their
//! interior sets the tissue levels; measured on the three shared heads with the same tissue
//! and CSF settings (search 12 mm, growth 22 mm), snapping gave Dice 0.912 / 0.964 / 0.878 (colin27 / MNI152 /
//! fsaverage) against 0.911 / 0.967 / 0.917 for the subject's own boundary kept near the
//! fused mask. When `auto` finds no brain, the fused mask is snapped as before.
//!
//! Which atlases may strip which subject is the caller's business; the `skull_strip` stage
//! leaves out every atlas whose id is the subject's (see `stages/skull_strip.rs`).
//!
//! How much of the CSF and bone layer around the brain counts as brain is a convention that
//! differs between tools (see the parent module). By default ([`Edge::Subject`]) every
//! subject gets the boundary settings' share, whatever the atlases; with [`Edge::Atlases`]
//! each atlas's own share is measured once on its own head and mask ([`fit_csf_fraction`],
//! a few seconds per atlas) and each subject gets the mean share of the atlases it uses.
//!
//! Limitations: the atlases are registered one after another, each taking most of the time
//! (about 4 s at 2 mm on two CPU cores); batching them is left to the registration. Since the
//! edge is the subject's, shaped by one share for the whole brain, the atlas masks' shapes
//! beyond that share are not followed: on colin27 and MNI152 the default mask is `auto`'s,
//! and it only trims a leak on fsaverage (0.914 to 0.917). The fallback to snapping (when
//! `auto` finds nothing) is not covered by a test.

use std::time::Instant;

use rayon::prelude::*;
use tracing::{debug, info, warn};

use crate::register::{RegisterConfig, register};
use crate::resample::{Interp, warp};
use crate::stage::Scan;
use crate::volume::Volume;

use super::morphology::{dilate_bits, fill_holes_bits, from_bits, largest_bits, to_bits};
use super::strip::{
    AutoParams, RefineParams, SkullStripError, StripResult, auto, fit_csf_fraction, fitted_cap,
    mask_volume_ml, refine_boundary,
};

/// A head with skull and its brain mask, on the same grid.
#[derive(Clone, Debug)]
pub struct AtlasHead {
    /// A name for logs and errors, and for telling the subject's own head apart.
    pub id: String,
    /// The head image (with skull).
    pub image: Volume,
    /// Its brain mask (inside: value ≥ 0.5).
    pub mask: Volume,
    /// Where this mask puts the brain's edge, as the CSF share that reproduces it
    /// ([`fit_csf_fraction`]), once measured; [`atlas`] with [`Edge::Atlases`] measures it
    /// when `None`. Measure it once per head ([`AtlasHead::measure_edge`]) when one head
    /// strips many subjects.
    pub csf_fraction: Option<f64>,
}

impl AtlasHead {
    /// A head and its mask, its edge not yet measured.
    pub fn new(id: impl Into<String>, image: Volume, mask: Volume) -> AtlasHead {
        AtlasHead {
            id: id.into(),
            image,
            mask,
            csf_fraction: None,
        }
    }

    /// Measures where this head's mask puts the brain's edge ([`fit_csf_fraction`] with
    /// `boundary`) and keeps it in `csf_fraction`.
    ///
    /// # Errors
    /// [`SkullStripError::AtlasEdge`] naming the head when its own brain cannot be found.
    pub fn measure_edge(&mut self, boundary: &RefineParams) -> Result<f64, SkullStripError> {
        let fraction = self.edge(boundary)?;
        self.csf_fraction = Some(fraction);
        Ok(fraction)
    }

    /// `csf_fraction` if measured, else measured now (and not kept).
    fn edge(&self, boundary: &RefineParams) -> Result<f64, SkullStripError> {
        if let Some(f) = self.csf_fraction {
            return Ok(f);
        }
        let settings = AutoParams {
            refine: boundary.clone(),
            ..AutoParams::default()
        };
        let t = Instant::now();
        let (fraction, dice) =
            fit_csf_fraction(&self.image, &self.mask, &settings).map_err(|e| {
                SkullStripError::AtlasEdge {
                    atlas: self.id.clone(),
                    reason: e.to_string(),
                }
            })?;
        info!(
            atlas = %self.id,
            csf_fraction = fraction,
            dice,
            seconds = t.elapsed().as_secs_f64(),
            "Atlas mask edge measured"
        );
        Ok(fraction)
    }
}

/// Whose convention the atlas method follows for the brain's edge (how much of the CSF and
/// bone layer between cortex and skull counts as brain).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Edge {
    /// The boundary settings' own `csf_fraction` (default 0.45, between the bundled
    /// references' conventions): every subject gets the same edge whatever the atlases.
    #[default]
    Subject,
    /// The atlases' masks': the CSF share with which each atlas's own extraction best
    /// reproduces its mask ([`fit_csf_fraction`]), averaged over the atlases used. Atlases
    /// whose masks come from one tool give subjects that tool's edge (BET-like masks a tight
    /// one, FreeSurfer-like masks an intracranial one).
    Atlases,
}

/// Settings of [`atlas`].
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AtlasParams {
    /// How each atlas head is registered to the subject. Default: 2 mm, affine then
    /// deformable on levels 4 and 2 (the finest level adds little to a mask). Keys given
    /// here override these defaults one by one.
    #[serde(deserialize_with = "over_default_register")]
    pub register: RegisterConfig,
    /// Replace the fused mask's edge by the subject's own. Default true; false returns the
    /// fused mask as carried.
    pub refine: bool,
    /// How far (mm) the subject's own brain mask may reach outside the fused mask. Default
    /// 10: more than the 5 mm between the references' edge conventions plus registration
    /// error, less than the distance from the brain to the eyes or the neck muscles.
    pub reach_mm: f64,
    /// The boundary settings of the subject's own extraction ([`auto`]'s `refine`), and of
    /// the [`refine_boundary`] fallback. Defaults are `auto`'s; keys given here override
    /// them one by one.
    #[serde(deserialize_with = "over_default_boundary")]
    pub boundary: RefineParams,
    /// Whose edge convention the mask follows. Default [`Edge::Subject`].
    pub edge: Edge,
}

impl Default for AtlasParams {
    fn default() -> AtlasParams {
        let mut register = RegisterConfig::default();
        register.deformable.levels = vec![4, 2];
        register.deformable.iterations = vec![200, 100];
        AtlasParams {
            register,
            refine: true,
            reach_mm: 10.0,
            boundary: RefineParams::default(),
            edge: Edge::Subject,
        }
    }
}

/// `given` laid over `base`, table by table, so a partial table keeps the other defaults.
fn merge(base: &mut toml::Table, given: toml::Table) {
    for (key, value) in given {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(g)) => merge(b, g),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// Deserializes a partial table over `default` (serde's own `default` would start the
/// nested type from its own defaults, losing the atlas method's).
fn over_default<'de, D, T>(d: D, default: T) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    use serde::Deserialize;
    use serde::de::Error;
    let given = toml::Table::deserialize(d)?;
    let mut base = toml::Table::try_from(default).map_err(D::Error::custom)?;
    merge(&mut base, given);
    T::deserialize(toml::Value::Table(base)).map_err(D::Error::custom)
}

fn over_default_register<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<RegisterConfig, D::Error> {
    over_default(d, AtlasParams::default().register)
}

fn over_default_boundary<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RefineParams, D::Error> {
    over_default(d, AtlasParams::default().boundary)
}

/// Strips `head` with the brain masks of `atlases`: each registered to `head`, its mask
/// carried over, a majority vote (a voxel is in when the mean carried mask is at least 0.5;
/// with two atlases either one suffices), then, unless `params.refine` is false, the
/// subject's own mask from [`auto`] (with `params.boundary`) kept within `params.reach_mm`
/// of the fused mask; [`refine_boundary`] of the fused mask when `auto` finds no brain.
///
/// The caller chooses the atlases; never pass the subject's own head or mask (its Dice
/// against that mask would mean nothing).
///
/// # Errors
/// [`SkullStripError::NoAtlas`] for an empty list, [`SkullStripError::ShapeMismatch`] when an
/// atlas mask is not on its image's grid, [`SkullStripError::Registration`] naming the atlas
/// when its registration fails, and the errors of [`refine_boundary`].
pub fn atlas(
    head: &Volume,
    atlases: &[&AtlasHead],
    params: &AtlasParams,
) -> Result<StripResult, SkullStripError> {
    if atlases.is_empty() {
        return Err(SkullStripError::NoAtlas);
    }
    let fixed = Scan::from_image(head.clone());
    let grid = head.grid();
    let mut sum = vec![0.0f32; head.len()];
    for a in atlases {
        if a.mask.shape != a.image.shape {
            return Err(SkullStripError::ShapeMismatch {
                what: "atlas mask",
                got: a.mask.shape,
                want: a.image.shape,
            });
        }
        let t = Instant::now();
        let moving = Scan::from_image(a.image.clone());
        let transform = register(&moving, &fixed, &params.register).map_err(|e| {
            SkullStripError::Registration {
                atlas: a.id.clone(),
                reason: e.to_string(),
            }
        })?;
        let carried = warp(&binary(&a.mask), &transform, &grid, Interp::Linear);
        sum.par_iter_mut()
            .zip(carried.frame(0))
            .for_each(|(s, &c)| *s += c);
        info!(
            atlas = %a.id,
            seconds = t.elapsed().as_secs_f64(),
            carried_ml = mask_volume_ml(&carried),
            "Atlas mask carried"
        );
    }
    let n = atlases.len() as f32;
    let fused = head.with_data(
        sum.par_iter()
            .map(|&s| if s / n >= 0.5 { 1.0 } else { 0.0 })
            .collect(),
    );
    debug!(fused_ml = mask_volume_ml(&fused), "Atlas masks fused");
    let mask = if params.refine {
        let boundary = edge_settings(atlases, params)?;
        own_boundary(head, &fused, &boundary, params.reach_mm)?
    } else {
        fused
    };
    let brain_volume_ml = mask_volume_ml(&mask);
    Ok(StripResult {
        mask,
        brain_volume_ml,
    })
}

/// The boundary settings for this subject: `params.boundary`, with, for [`Edge::Atlases`],
/// the atlases' mean CSF share (each measured now unless it already was) and the deeper cap
/// that share was measured with.
fn edge_settings(
    atlases: &[&AtlasHead],
    params: &AtlasParams,
) -> Result<RefineParams, SkullStripError> {
    let mut boundary = params.boundary.clone();
    if params.edge == Edge::Subject {
        return Ok(boundary);
    }
    let mut sum = 0.0;
    for a in atlases {
        sum += a.edge(&params.boundary)?;
    }
    boundary.csf_fraction = sum / atlases.len() as f64;
    boundary.csf_margin_mm = fitted_cap(boundary.csf_margin_mm);
    debug!(
        csf_fraction = boundary.csf_fraction,
        "Edge convention of the atlases"
    );
    Ok(boundary)
}

/// The subject's own brain mask ([`auto`] with `boundary`) where it lies within `reach_mm`
/// of the fused atlas mask: the largest piece of that, holes filled. Falls back to
/// [`refine_boundary`] of the fused mask when `auto` finds no brain or nothing is left.
fn own_boundary(
    head: &Volume,
    fused: &Volume,
    boundary: &RefineParams,
    reach_mm: f64,
) -> Result<Volume, SkullStripError> {
    let settings = AutoParams {
        refine: boundary.clone(),
        ..AutoParams::default()
    };
    let own = match auto(head, &settings) {
        Ok(r) => r.mask,
        Err(e) => {
            warn!(error = %e, "No brain of the subject's own; snapping the fused mask");
            return refine_boundary(head, fused, boundary);
        }
    };
    let (shape, spacing) = (head.shape, head.voxel_size());
    let near = dilate_bits(&to_bits(fused), shape, spacing, reach_mm);
    let kept: Vec<bool> = to_bits(&own)
        .iter()
        .zip(&near)
        .map(|(&o, &n)| o && n)
        .collect();
    let kept = fill_holes_bits(&largest_bits(&kept, shape), shape);
    if !kept.contains(&true) {
        warn!("The subject's own mask misses the fused mask; snapping the fused mask");
        return refine_boundary(head, fused, boundary);
    }
    debug!(
        own_ml = mask_volume_ml(&own),
        "Own mask kept near the fused mask"
    );
    Ok(from_bits(head, &kept))
}

/// A mask as 0/1 (inside: ≥ 0.5), so linear interpolation of it gives a share of inside.
fn binary(mask: &Volume) -> Volume {
    mask.with_data(
        mask.frame(0)
            .par_iter()
            .map(|&x| if x >= 0.5 { 1.0 } else { 0.0 })
            .collect(),
    )
}
