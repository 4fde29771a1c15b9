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
//! The field is kept in voxel units of the current level's grid (channels `(i, j, k)`), so
//! the warped image is `M(A(F·(x + u(x))))` with `F` the level grid's affine; the result is
//! converted to world millimetres only at the end. The step direction is Adam's normalised
//! moment of `∂loss/∂warped · ∇warped` (the derivative w.r.t. a right-composed update),
//! smoothed by `update_sigma` voxels and scaled by `step` voxels.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::DeformableConfig;
use super::affine::converged;
use super::ops::{
    apply_affine, channels_last, gaussian, index_points, index_to_normalised, linear, mix_channels,
    sample, scalar, spatial_gradient, world_to_normalised,
};
use super::pyramid::Level;
use super::similarity::{FixedNcc, Loss, evaluate};
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

/// Moving-image sample of every voxel of a level for the field `u`: `base` holds the
/// normalised moving coordinates of the voxel centres (`to_moving` applied to the indices,
/// computed once per level), so only the linear part acts on `u` each iteration.
fn warp(
    level: &Level,
    base: &Tensor,
    to_moving: &Affine,
    u: &Tensor,
) -> Result<Tensor, StageError> {
    let mut lin = *to_moving;
    lin.fixed_view_mut::<3, 1>(0, 3).fill(0.0);
    let pts = apply_affine(&channels_last(u)?, &lin)?.f_add_(base)?;
    sample(&level.moving, &pts, false)
}

/// `u ∘ (id + δ) + δ`: the displacement of `φ ∘ (id + δ)` when `φ = id + u`.
pub(crate) fn compose(
    u: &Tensor,
    delta: &Tensor,
    idx: &Tensor,
    grid: &Grid,
) -> Result<Tensor, StageError> {
    let pts = idx.f_add(&channels_last(delta)?)?;
    let moved = sample(u, &apply_affine(&pts, &index_to_normalised(grid))?, true)?;
    Ok(moved.f_add(delta)?)
}

/// Runs the greedy optimisation at one level, updating `field` in place; returns the loss.
fn run_level(
    level: &Level,
    affine: &Affine,
    field: &mut Field,
    config: &DeformableConfig,
    iterations: usize,
) -> Result<f64, StageError> {
    let start = Instant::now();
    let device = level.fixed.device();
    let idx = index_points(&level.grid, device)?;
    let to_moving = world_to_normalised(&level.moving_grid) * affine * level.grid.affine;
    let base = apply_affine(&idx, &to_moving)?;
    let voxels = level.fixed.numel() as f64;
    let ncc = match config.loss {
        Loss::Ncc => Some(FixedNcc::new(
            &level.fixed,
            level.weight.as_ref(),
            config.window,
        )?),
        _ => None,
    };
    let (b1, b2) = (0.9f64, 0.999f64);
    let mut m = field.u.f_zeros_like()?;
    let mut v = field.u.f_zeros_like()?;
    let mut eps = 0.0;
    let mut history = Vec::with_capacity(iterations);
    for it in 0..iterations {
        let warped = warp(level, &base, &to_moving, &field.u)?;
        let ev = match &ncc {
            Some(ncc) => ncc.evaluate(&warped)?,
            None => evaluate(
                config.loss,
                &level.fixed,
                &warped,
                level.weight.as_ref(),
                config.window,
            )?,
        };
        history.push(ev.value);
        let g = spatial_gradient(&warped)?
            .f_mul(&ev.grad)?
            .f_mul_scalar(voxels)?;
        if it == 0 {
            // Adam's floor relative to the gradient's scale, so flat background stays still.
            eps = 1e-2
                * scalar(&g.f_square()?.f_mean(Kind::Double)?)?
                    .sqrt()
                    .max(1e-30);
        }
        // Adam's moments, updated in place (no new volumes per iteration).
        let _ = m.f_mul_scalar_(b1)?.f_add_(&g.f_mul_scalar(1.0 - b1)?)?;
        let _ = v
            .f_mul_scalar_(b2)?
            .f_addcmul_(&g, &g.f_mul_scalar(1.0 - b2)?)?;
        let bias1 = 1.0 - b1.powi(it as i32 + 1);
        let bias2 = 1.0 - b2.powi(it as i32 + 1);
        let denom = v.f_mul_scalar(1.0 / bias2)?.f_sqrt_()?.f_add_scalar_(eps)?;
        let dir = m.f_div(&denom)?.f_mul_scalar_(-config.step / bias1)?;
        let delta = gaussian(&dir, [config.update_sigma; 3])?;
        let u = compose(&field.u, &delta, &idx, &level.grid)?;
        field.u = gaussian(&u, [config.field_sigma; 3])?;
        if converged(&history, config.tolerance) {
            break;
        }
    }
    let last = history.last().copied().unwrap_or(f64::NAN);
    tracing::debug!(
        factor = level.factor,
        loss = last,
        iterations = history.len(),
        seconds = start.elapsed().as_secs_f64(),
        "Deformable level done"
    );
    Ok(last)
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
    let mut field = Field::zeros(&first.grid, first.fixed.device())?;
    let mut loss = f64::NAN;
    for (level, &iters) in levels.iter().zip(&config.iterations) {
        field = field.resampled(&level.grid)?;
        loss = run_level(level, affine, &mut field, config, iters)?;
    }
    Ok((field, loss))
}
