//! Deformable registration: greedy diffeomorphic updates, coarse to fine.
//!
//! Why greedy composition rather than a stationary velocity field: each step composes a
//! small, smoothed update with the current map (`φ ← φ ∘ (id + δ)`), then smooths the
//! displacement, as ANTs' and FireANTs' greedy methods do. Small smooth updates keep every
//! step invertible, so the map stays folding-free in practice, and one step costs one image
//! sample, one field sample and a few separable filters. Scaling and squaring would add
//! about seven field compositions per step for the same accuracy on brain pairs (the peers'
//! greedy variants score within 0.01 Dice of their symmetric ones at several times less
//! time), which the CPU budget cannot afford.
//!
//! The field is kept in voxel units of its own grid (channels `(i, j, k)`), by default twice
//! as coarse as the level's images (`field_shrink`), so the warped image is
//! `M(A(F·(x + u(x))))` with `F` the field grid's affine and `u` upsampled trilinearly to the
//! level's voxels; the result is converted to world millimetres only at the end. The step direction is Adam's normalised
//! moment of `∂loss/∂warped · ∇warped` (the derivative w.r.t. a right-composed update),
//! smoothed by `update_sigma` voxels and scaled by `step` voxels.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::DeformableConfig;
use super::affine::converged;
use super::ops::{
    apply_affine, channels_first, channels_last, coarser_grid, gaussian, gradient_times,
    index_points, index_to_normalised, linear, mix_channels, sample, scalar, world_to_normalised,
};
use super::pyramid::Level;
use super::similarity::Measure;
use crate::resample::inverse;
use crate::stage::StageError;
use crate::volume::{Affine, Grid};

/// A displacement in voxel units of `grid`, `[1, 3, D, H, W]` with channels `(i, j, k)`.
pub(crate) struct Field {
    /// The values.
    pub u: Tensor,
    /// The grid it lives on.
    pub grid: Grid,
}

impl Field {
    /// The zero field on `grid`.
    pub fn zeros(grid: &Grid, device: tch::Device) -> Result<Field, StageError> {
        let [ni, nj, nk] = grid.shape.map(|n| n as i64);
        Ok(Field {
            u: Tensor::f_zeros([1, 3, nk, nj, ni], (Kind::Float, device))?,
            grid: *grid,
        })
    }

    /// This field resampled onto `target` (trilinear, edge values outside), in `target`'s
    /// voxel units.
    pub fn resampled(&self, target: &Grid) -> Result<Field, StageError> {
        if target == &self.grid {
            return Ok(Field {
                u: self.u.shallow_clone(),
                grid: self.grid,
            });
        }
        let pts = index_points(target, self.u.device())?;
        let coords = apply_affine(&pts, &(world_to_normalised(&self.grid) * target.affine))?;
        let u = sample(&self.u, &coords, true)?;
        let to_target = linear(&target.affine)
            .try_inverse()
            .ok_or_else(|| StageError::Data("singular registration grid".into()))?
            * linear(&self.grid.affine);
        Ok(Field {
            u: mix_channels(&u, &to_target)?,
            grid: *target,
        })
    }

    /// The displacement in world millimetres, `[1, 3, D, H, W]` with channels `(x, y, z)`.
    pub fn world(&self) -> Result<Tensor, StageError> {
        mix_channels(&self.u, &linear(&self.grid.affine))
    }
}

/// Adam's ε as a multiple of the first step's gradient RMS.
const ADAM_FLOOR: f64 = 1.0;

/// `u ∘ (id + δ) + δ`: the displacement of `φ ∘ (id + δ)` when `φ = id + u`. `idx_n` holds the
/// grid's voxel indices already mapped to `grid_sample` coordinates and `scale` the per-axis
/// factor from voxels to those coordinates (the map is diagonal), so no matrix product is
/// needed per step.
pub(crate) fn compose(
    u: &Tensor,
    delta: &Tensor,
    idx_n: &Tensor,
    scale: &Tensor,
) -> Result<Tensor, StageError> {
    let pts = channels_last(delta)?.f_mul(scale)?.f_add_(idx_n)?;
    Ok(sample(u, &pts, true)?.f_add_(delta)?)
}

/// The per-axis factors of [`index_to_normalised`] for `grid`, as a `[3]` tensor.
fn normalised_scale(grid: &Grid, device: tch::Device) -> Result<Tensor, StageError> {
    let n = index_to_normalised(grid);
    let s = [n[(0, 0)] as f32, n[(1, 1)] as f32, n[(2, 2)] as f32];
    Ok(Tensor::f_from_slice(&s)?.f_to_device(device)?)
}

/// Runs the greedy optimisation at one level, updating `field` in place; returns the loss.
///
/// The similarity is evaluated on the level's grid; the field may live on a grid `f` times
/// coarser (`field.grid`, see [`DeformableConfig::field_shrink`]). Each step then upsamples
/// the field (trilinear), samples the moving image, and carries the voxel-wise derivative
/// back to the field's grid by `f`×`f`×`f` block means; Adam, the Gaussians and the
/// composition all run on the coarse grid, which is where most of a step's passes are.
fn run_level(
    level: &Level,
    affine: &Affine,
    field: &mut Field,
    config: &DeformableConfig,
    iterations: usize,
) -> Result<f64, StageError> {
    let start = Instant::now();
    let device = level.fixed.device();
    // Moving `grid_sample` coordinates of the field's voxel centres, and the linear map from a
    // field-voxel displacement to a shift of those coordinates.
    let to_moving = world_to_normalised(&level.moving_grid) * affine * field.grid.affine;
    let base = channels_first(&apply_affine(
        &index_points(&field.grid, device)?,
        &to_moving,
    )?)?;
    let to_sample = linear(&to_moving);
    let shrink = shrink_factor(&level.grid, &field.grid);
    // Trilinear upsampling of the sample points themselves: exact for the affine part inside
    // the grid; the outermost half field-voxel takes the edge value (background margin).
    let upsample = |x: &Tensor| -> Result<Tensor, StageError> {
        if shrink == 1 {
            return Ok(x.shallow_clone());
        }
        let [ni, nj, nk] = level.grid.shape.map(|n| n as i64);
        let f = f64::from(shrink);
        Ok(x.f_upsample_trilinear3d([nk, nj, ni], false, f, f, f)?)
    };
    let to_level = linear(&inverse(&level.grid.affine)) * linear(&field.grid.affine);
    let pool = |x: Tensor| -> Result<Tensor, StageError> {
        if shrink == 1 {
            return Ok(x);
        }
        let f = i64::from(shrink);
        let pooled = x.f_avg_pool3d([f; 3], [f; 3], [0; 3], true, false, None::<i64>)?;
        // Derivative w.r.t. field-voxel displacements: the level-voxel one turned by `to_level`ᵀ.
        mix_channels(&pooled, &to_level.transpose())
    };
    let idx_n = apply_affine(
        &index_points(&field.grid, device)?,
        &index_to_normalised(&field.grid),
    )?;
    let scale = normalised_scale(&field.grid, device)?;
    let measure = Measure::new(
        config.loss,
        &level.fixed,
        level.weight.as_ref(),
        config.window,
    )?;
    let (b1, b2) = (0.9f64, 0.999f64);
    let mut m = field.u.f_zeros_like()?;
    let mut v = field.u.f_zeros_like()?;
    let mut eps = 0.0;
    let mut history = Vec::with_capacity(iterations);
    for it in 0..iterations {
        let pts = upsample(&mix_channels(&field.u, &to_sample)?.f_add_(&base)?)?;
        // A channels-last view: `grid_sample` reads it through its strides, no copy.
        let warped = sample(&level.moving, &channels_last(&pts)?, false)?;
        let ev = measure.evaluate(&warped)?;
        let g = pool(gradient_times(&warped, &ev.grad)?)?;
        if it == 0 {
            // Adam's floor at the gradient's RMS, so weakly textured regions (background, the
            // inside of ventricles) take steps in proportion to their evidence instead of
            // full-size ones in noisy directions. A floor of 1 % of the RMS let such regions
            // drift (1 mm Dice 0.772, SDlogJ 0.59); at the RMS Dice is 0.777, SDlogJ 0.43.
            eps = ADAM_FLOOR
                * scalar(&g.f_square()?.f_mean(Kind::Double)?)?
                    .sqrt()
                    .max(1e-30);
        }
        // Adam's moments as running averages, in place.
        let _ = m.f_lerp_(&g, 1.0 - b1)?;
        let _ = v.f_lerp_(&g.f_square()?, 1.0 - b2)?;
        let bias1 = 1.0 - b1.powi(it as i32 + 1);
        let bias2 = (1.0 - b2.powi(it as i32 + 1)).sqrt();
        // m̂ / (√v̂ + ε) · (−step) = m / (√v + ε·√b₂) · (−step·√b₂ / b₁).
        let mut denom = v.f_sqrt()?;
        let _ = denom.f_add_scalar_(eps * bias2)?;
        let mut dir = m.f_div(&denom)?;
        let _ = dir.f_mul_scalar_(-config.step * bias2 / bias1)?;
        let delta = gaussian(&dir, [config.update_sigma; 3])?;
        let u = compose(&field.u, &delta, &idx_n, &scale)?;
        field.u = gaussian(&u, [config.field_sigma; 3])?;
        history.push(ev.value);
        if converged(&history, config.tolerance) {
            break;
        }
    }
    let last = history.last().copied().unwrap_or(f64::NAN);
    tracing::debug!(
        factor = level.factor,
        shrink,
        voxels = level.fixed.numel(),
        loss = last,
        iterations = history.len(),
        seconds = start.elapsed().as_secs_f64(),
        "Deformable level done"
    );
    Ok(last)
}

/// How many times coarser `coarse` is than `fine` (1 when they are the same grid).
fn shrink_factor(fine: &Grid, coarse: &Grid) -> u32 {
    if fine == coarse {
        return 1;
    }
    let ratio = coarse.voxel_size()[0] / fine.voxel_size()[0];
    ratio.round().max(1.0) as u32
}

/// The grid a level's field lives on: `shrink` times coarser than the level's, unless that
/// would leave fewer than 8 voxels along an axis.
fn field_grid(grid: &Grid, shrink: u32) -> Grid {
    let f = shrink.max(1);
    if f == 1 || grid.shape.iter().any(|&n| n < 8 * f as usize) {
        return *grid;
    }
    coarser_grid(grid, [f64::from(f); 3])
}

/// Optimises a displacement on the levels (given coarse to fine, with `config.iterations` in
/// the same order) after `affine`; returns it on the finest level's grid and the final loss.
///
/// # Errors
/// If a tensor operation fails.
pub(crate) fn deform(
    levels: &[&Level],
    affine: &Affine,
    config: &DeformableConfig,
) -> Result<(Field, f64), StageError> {
    let Some(first) = levels.first() else {
        return Err(StageError::Input("no deformable levels configured".into()));
    };
    let on = |level: &Level| field_grid(&level.grid, config.field_shrink);
    let mut field = Field::zeros(&on(first), first.fixed.device())?;
    let mut loss = f64::NAN;
    for (level, &iters) in levels.iter().zip(&config.iterations) {
        field = field.resampled(&on(level))?;
        loss = run_level(level, affine, &mut field, config, iters)?;
    }
    Ok((field, loss))
}
