//! The multi-resolution copies of both images the optimisers work on.
//!
//! Each level holds the fixed image (and its weight map) on a grid `factor` times coarser
//! than the registration grid, and the moving image on a grid of the same spacing in the
//! moving image's own orientation, so sampling the moving image never aliases. Levels are
//! built finest first, each from the next finer one (a Gaussian of σ = ratio/2 voxels, then
//! trilinear resampling), so the cost stays a small multiple of the finest level's.

use std::collections::BTreeMap;

use tch::Tensor;

use super::ops::{coarser_grid, resample_grid};
use crate::stage::StageError;
use crate::volume::Grid;

/// One resolution level.
pub(crate) struct Level {
    /// Shrink factor relative to the registration grid.
    pub factor: u32,
    /// Fixed image on `grid`, `[1, 1, D, H, W]`.
    pub fixed: Tensor,
    /// Similarity weights on `grid` (the fixed mask), if any.
    pub weight: Option<Tensor>,
    /// The fixed-side grid of this level.
    pub grid: Grid,
    /// Moving image on `moving_grid`.
    pub moving: Tensor,
    /// The moving-side grid of this level.
    pub moving_grid: Grid,
}

/// An image and the grid it lives on.
pub(crate) struct OnGrid {
    /// `[1, 1, D, H, W]` values.
    pub image: Tensor,
    /// Its grid.
    pub grid: Grid,
}

/// Builds the levels for every factor in `factors` (any order, duplicates allowed) from the
/// images on the registration grids.
pub(crate) fn build(
    fixed: &OnGrid,
    weight: Option<&Tensor>,
    moving: &OnGrid,
    factors: &[u32],
) -> Result<BTreeMap<u32, Level>, StageError> {
    let mut wanted: Vec<u32> = factors.iter().copied().filter(|&f| f >= 1).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut out = BTreeMap::new();
    let (mut f_img, mut f_grid) = (fixed.image.shallow_clone(), fixed.grid);
    let mut w_img = weight.map(Tensor::shallow_clone);
    let (mut m_img, mut m_grid) = (moving.image.shallow_clone(), moving.grid);
    let mut current = 1u32;
    for factor in wanted {
        let ratio = factor as f64 / current as f64;
        if factor != current {
            let next_f = coarser_grid(&f_grid, [ratio; 3]);
            let next_m = coarser_grid(&m_grid, [ratio; 3]);
            f_img = resample_grid(&f_img, &f_grid, &next_f, false)?;
            w_img = match w_img {
                Some(w) => Some(resample_grid(&w, &f_grid, &next_f, false)?),
                None => None,
            };
            m_img = resample_grid(&m_img, &m_grid, &next_m, false)?;
            (f_grid, m_grid, current) = (next_f, next_m, factor);
        }
        out.insert(
            factor,
            Level {
                factor,
                fixed: f_img.shallow_clone(),
                weight: w_img.as_ref().map(Tensor::shallow_clone),
                grid: f_grid,
                moving: m_img.shallow_clone(),
                moving_grid: m_grid,
            },
        );
    }
    Ok(out)
}
