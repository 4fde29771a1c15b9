//! What is derived from a finished displacement: folding statistics, the inverse mapping,
//! and atlas labels carried by one-hot linear interpolation.
//!
//! The inverse is found by fixed-point iteration (`v ← −u(x + v)`), which converges for
//! displacements whose Jacobian stays away from zero, as greedy updates keep it; no second
//! registration is run. Label transfer votes, at each target voxel, over the eight source
//! voxels around the mapped point with their trilinear weights: exactly the argmax of
//! one-hot maps interpolated linearly, without ever building those maps. Labels are
//! processed `chunk` at a time, so scratch memory is two values per target voxel whatever
//! the number of labels.

use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::greedy::Field;
use super::ops::{
    apply_affine, channels_last, index_points, index_to_normalised, linear, mix_channels, sample,
    scalar, spatial_gradient, world_to_normalised,
};
use crate::resample::{Mapping, inverse};
use crate::stage::{StageError, Transform, TransformQuality};
use crate::volume::{Affine, Grid, Volume, apply};

/// Fixed-point iterations of the inversion.
const INVERSE_ITERATIONS: usize = 30;

/// Jacobian determinant of `x ↦ x + u(x)` at every voxel, `[1, 1, D, H, W]`.
pub(crate) fn jacobian_determinant(field: &Field) -> Result<Tensor, StageError> {
    // d[c][d] = ∂u_c/∂x_d + δ_cd, rows from the gradient of each channel.
    let mut rows = Vec::with_capacity(3);
    for c in 0..3 {
        let g = spatial_gradient(&field.u.f_narrow(1, c, 1)?)?;
        let parts: Vec<Tensor> = (0..3)
            .map(|d| {
                let p = g.f_narrow(1, d, 1)?;
                if d == c { p.f_add_scalar(1.0) } else { Ok(p) }
            })
            .collect::<Result<_, _>>()?;
        rows.push(parts);
    }
    let m = |r: usize, c: usize| &rows[r][c];
    let minor = |r1: usize, r2: usize, c1: usize, c2: usize| -> Result<Tensor, StageError> {
        Ok(m(r1, c1)
            .f_mul(m(r2, c2))?
            .f_sub(&m(r1, c2).f_mul(m(r2, c1))?)?)
    };
    let det = m(0, 0)
        .f_mul(&minor(1, 2, 1, 2)?)?
        .f_sub(&m(0, 1).f_mul(&minor(1, 2, 0, 2)?)?)?
        .f_add(&m(0, 2).f_mul(&minor(1, 2, 0, 1)?)?)?;
    Ok(det)
}

/// Percentage of non-positive Jacobian determinants and the std of log-Jacobian over the
/// positive ones.
pub(crate) fn quality(field: &Field, final_loss: f64) -> Result<TransformQuality, StageError> {
    let det = jacobian_determinant(field)?;
    let total = det.numel() as f64;
    let bad = scalar(&det.f_le(0.0)?.f_sum(Kind::Double)?)?;
    let positive = det.f_masked_select(&det.f_gt(0.0)?)?;
    let log_std = if positive.numel() > 1 {
        scalar(&positive.f_log()?.f_to_kind(Kind::Double)?.f_std(false)?)?
    } else {
        0.0
    };
    Ok(TransformQuality {
        nonpositive_jacobian_pct: 100.0 * bad / total.max(1.0),
        log_jacobian_std: log_std,
        final_loss,
    })
}

/// The displacement `v` with `(id + v) ≈ (id + u)⁻¹`, on the same grid.
pub(crate) fn invert_field(field: &Field) -> Result<Field, StageError> {
    let idx = index_points(&field.grid, field.u.device())?;
    let norm = index_to_normalised(&field.grid);
    let mut v = field.u.f_neg()?;
    for _ in 0..INVERSE_ITERATIONS {
        let pts = idx.f_add(&channels_last(&v)?)?;
        v = sample(&field.u, &apply_affine(&pts, &norm)?, true)?.f_neg()?;
    }
    Ok(Field {
        u: v,
        grid: field.grid,
    })
}

/// The inverse transform (moving world → fixed world) on `moving_grid`: `q ↦ A⁻¹·(q + w(q))`
/// with `w(q) = A_lin · v_world(A⁻¹ q)`, `v` the inverse displacement.
pub(crate) fn inverse_transform(
    field: &Field,
    affine: &Affine,
    moving_grid: &Grid,
) -> Result<Transform, StageError> {
    let inv_affine = inverse(affine);
    let v = invert_field(field)?;
    let v_world = v.world()?;
    let pts = index_points(moving_grid, v_world.device())?;
    let to_v = world_to_normalised(&field.grid) * inv_affine * moving_grid.affine;
    let sampled = sample(&v_world, &apply_affine(&pts, &to_v)?, false)?;
    let w = mix_channels(&sampled, &linear(affine))?;
    let disp = super::ops::tensor_volume(&w, moving_grid)?;
    Ok(Transform {
        affine: inv_affine,
        displacement: Some(std::sync::Arc::new(disp)),
        inverse: None,
        fixed_grid: *moving_grid,
        quality: TransformQuality::default(),
    })
}

/// Carries a label map through `transform` onto `target` by one-hot linear interpolation and
/// argmax, `chunk` labels per pass (at least 1). Ties go to the smaller label; points whose
/// eight neighbours all fall outside `labels` take 0.
pub fn warp_labels_linear(
    labels: &Volume,
    transform: &Transform,
    target: &Grid,
    chunk: usize,
) -> Volume {
    let mut ids: Vec<u32> = labels
        .frame(0)
        .iter()
        .map(|&v| v.round().max(0.0) as u32)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let to_src = inverse(&labels.affine);
    let [ni, nj, _] = target.shape;
    let mapping = Mapping::new(transform);
    let coords: Vec<[f32; 3]> = (0..target.len())
        .into_par_iter()
        .map(|n| {
            let (i, j, k) = (n % ni, (n / ni) % nj, n / (ni * nj));
            let p = apply(&target.affine, [i as f64, j as f64, k as f64]);
            let q = apply(&to_src, mapping.apply(p));
            [q[0] as f32, q[1] as f32, q[2] as f32]
        })
        .collect();
    let mut best = vec![(f32::MIN, 0u32); target.len()];
    for group in ids.chunks(chunk.max(1)) {
        best.par_iter_mut().zip(&coords).for_each(|(slot, q)| {
            vote(labels, q, group, slot);
        });
    }
    let mut out = Volume::new(
        best.into_iter().map(|(_, l)| l as f32).collect(),
        target.shape,
        target.affine,
    );
    out.header = labels.header.clone();
    out
}

/// Updates `slot` with the labels of `group` interpolated at continuous voxel `q`.
fn vote(labels: &Volume, q: &[f32; 3], group: &[u32], slot: &mut (f32, u32)) {
    let [ni, nj, nk] = labels.shape;
    let base = q.map(|v| v.floor());
    let frac = [q[0] - base[0], q[1] - base[1], q[2] - base[2]];
    let mut acc = [0.0f32; 8];
    let mut ids = [u32::MAX; 8];
    for corner in 0..8 {
        let off = [corner & 1, corner >> 1 & 1, corner >> 2 & 1];
        let pos: [i64; 3] = [0, 1, 2].map(|a| base[a] as i64 + off[a] as i64);
        if pos[0] < 0 || pos[1] < 0 || pos[2] < 0 {
            continue;
        }
        let (i, j, k) = (pos[0] as usize, pos[1] as usize, pos[2] as usize);
        if i >= ni || j >= nj || k >= nk {
            continue;
        }
        let label = labels.data[i + ni * (j + nj * k)].round().max(0.0) as u32;
        if group.binary_search(&label).is_err() {
            continue;
        }
        let w: f32 = (0..3)
            .map(|a| if off[a] == 1 { frac[a] } else { 1.0 - frac[a] })
            .product();
        let slot_n = ids
            .iter()
            .position(|&l| l == label || l == u32::MAX)
            .unwrap_or(7);
        ids[slot_n] = label;
        acc[slot_n] += w;
    }
    for n in 0..8 {
        if ids[n] == u32::MAX {
            break;
        }
        let better = acc[n] > slot.0 || (acc[n] == slot.0 && ids[n] < slot.1);
        if acc[n] > 0.0 && better {
            *slot = (acc[n], ids[n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn grid(n: usize) -> Grid {
        Grid {
            shape: [n; 3],
            affine: Affine::identity(),
        }
    }

    #[test]
    fn folding_field_has_nonpositive_jacobians_and_identity_has_none() {
        let g = grid(9);
        let [ni, nj, nk] = g.shape.map(|n| n as i64);
        let zero = Field {
            u: Tensor::zeros([1, 3, nk, nj, ni], (tch::Kind::Float, Device::Cpu)),
            grid: g,
        };
        let q = quality(&zero, 0.0).unwrap();
        assert_eq!(q.nonpositive_jacobian_pct, 0.0);
        assert!(q.log_jacobian_std < 1e-6);
        // u_i = −2·i: ∂(x + u)/∂i = −1 everywhere → every voxel folds.
        let idx = index_points(&g, Device::Cpu).unwrap();
        let i = idx.narrow(4, 0, 1).squeeze_dim(4).unsqueeze(1) * -2.0;
        let zeros = i.zeros_like();
        let folding = Field {
            u: Tensor::cat(&[i, zeros.shallow_clone(), zeros], 1),
            grid: g,
        };
        let q = quality(&folding, 0.0).unwrap();
        assert!((q.nonpositive_jacobian_pct - 100.0).abs() < 1e-9);
    }

    #[test]
    fn label_vote_matches_one_hot_interpolation() {
        let mut data = vec![0.0f32; 27];
        data[13] = 5.0; // centre
        data[14] = 7.0; // centre + i
        let labels = Volume::new(data, [3, 3, 3], Affine::identity());
        let t = Transform {
            affine: Affine::identity(),
            displacement: None,
            inverse: None,
            fixed_grid: labels.grid(),
            quality: TransformQuality::default(),
        };
        // Target voxel at i = 1.4 (between 5 and 7, nearer 5) and at 1.6 (nearer 7).
        let mut target = Grid {
            shape: [1, 1, 1],
            affine: Affine::identity(),
        };
        target.affine[(0, 3)] = 1.4;
        target.affine[(1, 3)] = 1.0;
        target.affine[(2, 3)] = 1.0;
        assert_eq!(warp_labels_linear(&labels, &t, &target, 1).data, vec![5.0]);
        target.affine[(0, 3)] = 1.6;
        assert_eq!(warp_labels_linear(&labels, &t, &target, 2).data, vec![7.0]);
    }
}
