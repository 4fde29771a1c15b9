//! Affine alignment: moments initialisation, a search over axis rotations, then rigid and
//! affine refinement from coarse to fine.
//!
//! The transform maps fixed world points to moving world points as
//! `A(p) = (L / R)·(p − c) + t`, with `c` the fixed centre of mass and `R` a radius of the
//! fixed image, so all twelve parameters (`L`, `t`) are in millimetres and one Adam step size
//! suits them all. The rigid phase projects `L` back onto `s₀·R·rotation` after every step
//! (polar decomposition), `s₀` being the isotropic scale the second moments suggest.
//!
//! Rigid refinement runs on every level but the finest, then affine refinement on all.
//!
//! Initialisation tries the header alignment, the principal-axes rotation (four sign
//! choices) and all 24 axis-aligned rotations about the centres of mass, scores each at the
//! coarsest level, refines the best few briefly and keeps the winner: this recovers 90° and
//! 180° rotations between atlas and subject. Reflections are tried only when allowed, since a
//! brain and its left–right mirror image are nearly indistinguishable by intensity.
//!
//! The gradient is computed by hand: `∂loss/∂warped · ∇warped` gives the derivative w.r.t.
//! the moving point of each voxel, which is then contracted with the voxel positions.

use nalgebra::{Matrix3, SymmetricEigen, Vector3};
use tch::{Kind, Tensor};

use super::AffineConfig;
use super::ops::{
    apply_affine, gradient_times, index_points, linear, sample, scalar, world_to_normalised,
};
use super::pyramid::Level;
use super::similarity::Measure;
use crate::stage::StageError;
use crate::volume::Affine;

/// The affine being optimised.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    /// Linear part times `radius` (mm).
    pub lin: Matrix3<f64>,
    /// Translation: where the fixed centre lands (mm).
    pub t: Vector3<f64>,
    /// Fixed centre of mass (mm).
    pub centre: Vector3<f64>,
    /// Normalising radius (mm).
    pub radius: f64,
}

impl Params {
    /// The world-to-world affine (fixed → moving).
    pub fn affine(&self) -> Affine {
        let l = self.lin / self.radius;
        let shift = self.t - l * self.centre;
        let mut m = Affine::identity();
        m.fixed_view_mut::<3, 3>(0, 0).copy_from(&l);
        m.fixed_view_mut::<3, 1>(0, 3).copy_from(&shift);
        m
    }
}

/// Centre of mass and second-moment matrix (mm) of an image's foreground on its level grid:
/// voxels above Otsu's threshold, weighted by intensity.
///
/// Weighting every voxel let a scan's background count: a background lifted off zero (noise
/// that percentile rescaling shifts up, or Rician noise) fills the whole field of view, and
/// its second moments made the atlas scale up to the field of view (Dice 0.07 on the OASIS
/// subject with Gaussian noise of 2 % of its range, against 0.76 without).
fn moments(
    image: &Tensor,
    grid: &crate::volume::Grid,
) -> Result<(Vector3<f64>, Matrix3<f64>), StageError> {
    let pts =
        apply_affine(&index_points(grid, image.device())?, &grid.affine)?.f_reshape([-1, 3])?;
    let w = image.f_clamp_min(0.0)?.f_to_kind(Kind::Float)?;
    let values: Vec<f32> = Vec::try_from(&w.f_to_device(tch::Device::Cpu)?.f_reshape([-1])?)?;
    let threshold = crate::skullstrip::levels::Histogram::new(&values, None)
        .map(|h| h.otsu(h.percentile(0.5), h.percentile(99.5)))
        .unwrap_or(0.0);
    let w = w
        .f_mul(&w.f_gt(threshold)?.f_to_kind(Kind::Float)?)?
        .f_reshape([-1, 1])?
        .f_to_kind(Kind::Double)?;
    let pts = pts.f_to_kind(Kind::Double)?;
    let total = scalar(&w.f_sum(Kind::Double)?)?;
    if total <= 0.0 {
        return Err(StageError::Data(
            "image is empty: no positive intensity".into(),
        ));
    }
    let com_t = pts
        .f_mul(&w)?
        .f_sum_dim_intlist(0, false, Kind::Double)?
        .f_div_scalar(total)?;
    let com: Vec<f64> = Vec::try_from(&com_t.f_to_device(tch::Device::Cpu)?)?;
    let centred = pts.f_sub(&com_t)?;
    let cov_t = centred
        .f_mul(&w)?
        .f_tr()?
        .f_matmul(&centred)?
        .f_div_scalar(total)?;
    let cov: Vec<f64> = Vec::try_from(&cov_t.f_to_device(tch::Device::Cpu)?.f_reshape([-1])?)?;
    Ok((
        Vector3::from_column_slice(&com),
        Matrix3::from_row_slice(&cov),
    ))
}

/// Eigenvectors as columns, sorted by decreasing eigenvalue, and the eigenvalues.
fn principal_axes(cov: &Matrix3<f64>) -> (Matrix3<f64>, Vector3<f64>) {
    let eig = SymmetricEigen::new(*cov);
    let mut order = [0usize, 1, 2];
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let vecs = Matrix3::from_columns(&order.map(|i| eig.eigenvectors.column(i).into_owned()));
    let vals = Vector3::new(
        eig.eigenvalues[order[0]],
        eig.eigenvalues[order[1]],
        eig.eigenvalues[order[2]],
    );
    (vecs, vals)
}

/// Every signed permutation matrix (48), or only the rotations among them (24).
fn axis_rotations(reflections: bool) -> Vec<Matrix3<f64>> {
    let perms = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let mut out = Vec::new();
    for p in perms {
        for signs in 0..8 {
            let mut m = Matrix3::zeros();
            for (row, &col) in p.iter().enumerate() {
                m[(row, col)] = if signs >> row & 1 == 1 { -1.0 } else { 1.0 };
            }
            if reflections || m.determinant() > 0.0 {
                out.push(m);
            }
        }
    }
    out
}

/// The derivative of the loss w.r.t. (`lin`, `t`).
type Gradient = (Matrix3<f64>, Vector3<f64>);

/// The loss and, if asked, its gradient w.r.t. (`lin`, `t`) at one level.
fn loss_and_grad(
    level: &Level,
    world: &Tensor,
    params: &Params,
    measure: &Measure,
    with_grad: bool,
) -> Result<(f64, Option<Gradient>), StageError> {
    let a = params.affine();
    let coords = apply_affine(world, &(world_to_normalised(&level.moving_grid) * a))?;
    let warped = sample(&level.moving, &coords, false)?;
    let ev = measure.evaluate(&warped)?;
    if !with_grad {
        return Ok((ev.value(), None));
    }
    // Row vectors: ∇M(q)ᵀ = ∇ₓWᵀ · (A_lin F_lin)⁻¹.
    let g_x = gradient_times(&warped, &ev.grad)?;
    let to_q = (linear(&a) * linear(&level.grid.affine))
        .try_inverse()
        .ok_or_else(|| StageError::Data("affine became singular".into()))?;
    let mut m = Affine::identity();
    m.fixed_view_mut::<3, 3>(0, 0).copy_from(&to_q.transpose());
    let g_q = apply_affine(&g_x.f_permute([0, 2, 3, 4, 1])?.f_reshape([-1, 3])?, &m)?;
    let centre = Tensor::f_from_slice(&[
        params.centre[0] as f32,
        params.centre[1] as f32,
        params.centre[2] as f32,
    ])?
    .f_to_device(world.device())?;
    let pn = world
        .f_reshape([-1, 3])?
        .f_sub(&centre)?
        .f_div_scalar(params.radius)?;
    let g_lin = g_q
        .f_tr()?
        .f_matmul(&pn)?
        .f_to_kind(Kind::Double)?
        .f_reshape([-1])?;
    let g_t = g_q.f_sum_dim_intlist(0, false, Kind::Double)?;
    let g_lin: Vec<f64> = Vec::try_from(&g_lin.f_to_device(tch::Device::Cpu)?)?;
    let g_t: Vec<f64> = Vec::try_from(&g_t.f_to_device(tch::Device::Cpu)?)?;
    Ok((
        ev.value(),
        Some((
            Matrix3::from_row_slice(&g_lin),
            Vector3::from_column_slice(&g_t),
        )),
    ))
}

/// Nearest `scale`·rotation (or rotoreflection, keeping the sign of the determinant).
fn project_rigid(lin: &Matrix3<f64>, scale: f64) -> Matrix3<f64> {
    let svd = lin.svd(true, true);
    match (svd.u, svd.v_t) {
        (Some(u), Some(vt)) => u * vt * scale,
        _ => *lin,
    }
}

/// Adam on the twelve affine parameters at one level.
fn optimise(
    level: &Level,
    params: &mut Params,
    config: &AffineConfig,
    iterations: usize,
    rigid: Option<f64>,
) -> Result<f64, StageError> {
    let world = apply_affine(
        &index_points(&level.grid, level.fixed.device())?,
        &level.grid.affine,
    )?;
    let start = std::time::Instant::now();
    let spacing = level.grid.voxel_size().iter().sum::<f64>() / 3.0;
    let (b1, b2) = (0.9f64, 0.999f64);
    let mut m = [0.0f64; 12];
    let mut v = [0.0f64; 12];
    let mut history = Vec::with_capacity(iterations);
    let mut value = f64::NAN;
    let measure = Measure::new(
        config.loss,
        &level.fixed,
        level.weight.as_ref(),
        None,
        config.window,
    )?;
    for it in 0..iterations {
        let (loss, grad) = loss_and_grad(level, &world, params, &measure, true)?;
        value = loss;
        history.push(loss);
        let Some((g_lin, g_t)) = grad else { break };
        let lr = config.step * spacing * (1.0 - 0.9 * it as f64 / iterations as f64);
        let g: Vec<f64> = g_lin
            .transpose()
            .iter()
            .chain(g_t.iter())
            .copied()
            .collect();
        let scale = (1.0 - b1.powi(it as i32 + 1), 1.0 - b2.powi(it as i32 + 1));
        let mut step = [0.0f64; 12];
        for n in 0..12 {
            m[n] = b1 * m[n] + (1.0 - b1) * g[n];
            v[n] = b2 * v[n] + (1.0 - b2) * g[n] * g[n];
            step[n] = lr * (m[n] / scale.0) / ((v[n] / scale.1).sqrt() + 1e-12);
        }
        for r in 0..3 {
            for c in 0..3 {
                params.lin[(r, c)] -= step[r * 3 + c];
            }
            params.t[r] -= step[9 + r];
        }
        if let Some(s) = rigid {
            params.lin = project_rigid(&params.lin, s * params.radius);
        }
        if converged(&history, config.tolerance) {
            break;
        }
    }
    tracing::debug!(
        factor = level.factor,
        rigid = rigid.is_some(),
        loss = value,
        iterations = history.len(),
        seconds = start.elapsed().as_secs_f64(),
        "Affine level done"
    );
    Ok(value)
}

/// Whether the best loss of the last 10 steps improved on the best before them by less than
/// `tolerance` (relative); never before 20 steps, so Adam's first oscillations do not count.
pub(crate) fn converged(history: &[f64], tolerance: f64) -> bool {
    const WINDOW: usize = 10;
    if history.len() < 2 * WINDOW || tolerance <= 0.0 {
        return false;
    }
    let split = history.len() - WINDOW;
    let best = |h: &[f64]| h.iter().copied().fold(f64::INFINITY, f64::min);
    let (before, recent) = (best(&history[..split]), best(&history[split..]));
    before - recent < tolerance * before.abs().max(1e-12)
}

/// Finds the affine (fixed world → moving world) aligning the levels, given coarse to fine
/// with `config.iterations` in the same order.
///
/// # Errors
/// If an image is empty or a tensor operation fails.
pub(crate) fn align(levels: &[&Level], config: &AffineConfig) -> Result<Affine, StageError> {
    let Some(coarsest) = levels.first() else {
        return Err(StageError::Input("no affine levels configured".into()));
    };
    let (cf, sf) = moments(&coarsest.fixed, &coarsest.grid)?;
    let (cm, sm) = moments(&coarsest.moving, &coarsest.moving_grid)?;
    let (ef, lf) = principal_axes(&sf);
    let (em, lm) = principal_axes(&sm);
    // Eigenvectors come with arbitrary signs: as a right-handed frame each, `em · S · efᵀ`
    // is a rotation exactly when the sign matrix `S` is. Without this, half the principal-axis
    // candidates were mirror images even with reflections off, and a mirrored candidate that
    // scored best carried left-hemisphere labels onto the right.
    let (ef, em) = (right_handed(ef), right_handed(em));
    let scale = ((lm.iter().product::<f64>()) / lf.iter().product::<f64>().max(1e-12))
        .powf(1.0 / 6.0)
        .clamp(0.5, 2.0);
    let radius = lf.iter().map(|v| v.max(1.0).sqrt()).sum::<f64>() / 3.0 * 2.0;
    let make = |rot: Matrix3<f64>| Params {
        lin: rot * scale * radius,
        t: cm,
        centre: cf,
        radius,
    };
    let mut candidates: Vec<Params> = axis_rotations(config.allow_reflection)
        .into_iter()
        .map(make)
        .collect();
    for signs in axis_rotations(config.allow_reflection) {
        let diagonal = (0..3).all(|a| signs[(a, a)].abs() > 0.5);
        if diagonal {
            candidates.push(make(em * signs * ef.transpose()));
        }
    }
    let world = apply_affine(
        &index_points(&coarsest.grid, coarsest.fixed.device())?,
        &coarsest.grid.affine,
    )?;
    let mut scored = Vec::with_capacity(candidates.len());
    let measure = Measure::new(
        config.loss,
        &coarsest.fixed,
        coarsest.weight.as_ref(),
        None,
        config.window,
    )?;
    for p in candidates {
        let (value, _) = loss_and_grad(coarsest, &world, &p, &measure, false)?;
        scored.push((value, p));
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut best: Option<(f64, Params)> = None;
    for (_, mut p) in scored.into_iter().take(3) {
        let value = optimise(
            coarsest,
            &mut p,
            config,
            config.search_iterations,
            Some(scale),
        )?;
        if best.as_ref().is_none_or(|(b, _)| value < *b) {
            best = Some((value, p));
        }
    }
    let Some((value, mut params)) = best else {
        return Err(StageError::Data(
            "no affine candidate could be scored".into(),
        ));
    };
    tracing::debug!(loss = value, "Affine initialisation chosen");
    // Rigid on every level but the finest (whose small corrections the affine pass makes
    // anyway, at the finest level's cost once instead of twice), then affine on all.
    let rigid_levels = levels.len().saturating_sub(1).max(1);
    for (level, &iters) in levels.iter().zip(&config.iterations).take(rigid_levels) {
        optimise(level, &mut params, config, iters, Some(scale))?;
    }
    for (level, &iters) in levels.iter().zip(&config.iterations) {
        optimise(level, &mut params, config, iters, None)?;
    }
    let affine = params.affine();
    if !config.allow_reflection && linear(&affine).determinant() <= 0.0 {
        return Err(StageError::Data(
            "the affine alignment ended as a mirror image (determinant ≤ 0) with \
             allow_reflection off; the scans may be too different to align"
                .into(),
        ));
    }
    Ok(affine)
}

/// `frame` with its last axis negated if needed so its determinant is positive.
fn right_handed(frame: Matrix3<f64>) -> Matrix3<f64> {
    if frame.determinant() >= 0.0 {
        return frame;
    }
    let mut out = frame;
    out.set_column(2, &(-frame.column(2)));
    out
}
