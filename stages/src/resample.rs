//! Resampling a volume onto another grid through a spatial mapping, on the CPU.
//!
//! Every stage that moves voxels between grids goes through [`resample`]: `conform` (an affine
//! between two grids), `segment` (a registration's transform into the subject's file grid) and
//! `write` (fields back in the subject's geometry). One interpolation per output, always from
//! the original data, so chained stages never blur twice.
//!
//! Points outside the source grid take the value 0 (background). Work is split over slices
//! with rayon; there is nothing per voxel beyond a few multiply-adds.

use nalgebra::Matrix4;
use rayon::prelude::*;

use crate::stage::Transform;
use crate::volume::{Affine, Grid, Volume};

/// How values between voxel centres are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interp {
    /// The nearest voxel's value: for label maps and masks.
    Nearest,
    /// Trilinear interpolation: for intensities and fields.
    Linear,
}

/// Samples frame `t` of `v` at continuous voxel position `(x, y, z)`.
#[inline]
pub fn sample(v: &Volume, t: usize, x: f64, y: f64, z: f64, interp: Interp) -> f32 {
    let [ni, nj, nk] = v.shape;
    let base = t * v.len();
    match interp {
        Interp::Nearest => {
            let (i, j, k) = (x.round(), y.round(), z.round());
            if i < 0.0 || j < 0.0 || k < 0.0 {
                return 0.0;
            }
            let (i, j, k) = (i as usize, j as usize, k as usize);
            if i >= ni || j >= nj || k >= nk {
                return 0.0;
            }
            v.data[base + i + ni * (j + nj * k)]
        }
        Interp::Linear => {
            let (fx, fy, fz) = (x.floor(), y.floor(), z.floor());
            let (dx, dy, dz) = ((x - fx) as f32, (y - fy) as f32, (z - fz) as f32);
            let (i0, j0, k0) = (fx as i64, fy as i64, fz as i64);
            let at = |i: i64, j: i64, k: i64| -> f32 {
                if i < 0 || j < 0 || k < 0 || i >= ni as i64 || j >= nj as i64 || k >= nk as i64 {
                    0.0
                } else {
                    v.data[base + i as usize + ni * (j as usize + nj * k as usize)]
                }
            };
            let c00 = at(i0, j0, k0) * (1.0 - dx) + at(i0 + 1, j0, k0) * dx;
            let c10 = at(i0, j0 + 1, k0) * (1.0 - dx) + at(i0 + 1, j0 + 1, k0) * dx;
            let c01 = at(i0, j0, k0 + 1) * (1.0 - dx) + at(i0 + 1, j0, k0 + 1) * dx;
            let c11 = at(i0, j0 + 1, k0 + 1) * (1.0 - dx) + at(i0 + 1, j0 + 1, k0 + 1) * dx;
            let c0 = c00 * (1.0 - dy) + c10 * dy;
            let c1 = c01 * (1.0 - dy) + c11 * dy;
            c0 * (1.0 - dz) + c1 * dz
        }
    }
}

/// Inverse of an affine, or identity when singular (a degenerate header, already reported by
/// the reader; resampling then yields background rather than a panic).
pub fn inverse(m: &Affine) -> Affine {
    m.try_inverse().unwrap_or_else(Matrix4::identity)
}

/// Resamples every frame of `src` onto `target`: the output voxel at world point `p` takes
/// the source value at world point `map(p)`.
pub fn resample<F>(src: &Volume, target: &Grid, interp: Interp, map: F) -> Volume
where
    F: Fn([f64; 3]) -> [f64; 3] + Sync,
{
    let [ni, nj, nk] = target.shape;
    let plane = ni * nj;
    let n = target.len();
    let to_src = inverse(&src.affine);
    let mut data = vec![0.0f32; n * src.frames];
    data.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(slab, out)| {
            let (t, k) = (slab / nk, slab % nk);
            for j in 0..nj {
                for i in 0..ni {
                    let p = crate::volume::apply(&target.affine, [i as f64, j as f64, k as f64]);
                    let q = crate::volume::apply(&to_src, map(p));
                    out[i + ni * j] = sample(src, t, q[0], q[1], q[2], interp);
                }
            }
        });
    Volume {
        data,
        shape: target.shape,
        frames: src.frames,
        affine: target.affine,
        header: src.header.clone(),
    }
}

/// Resamples `src` onto `target` through `transform` (target = the transform's fixed space).
pub fn warp(src: &Volume, transform: &Transform, target: &Grid, interp: Interp) -> Volume {
    let mapping = Mapping::new(transform);
    resample(src, target, interp, |p| mapping.apply(p))
}

/// Where fixed-space world point `p` lands in moving space: `affine · (p + u(p))`.
///
/// Outside the displacement's grid `u` takes its value at the nearest point of the grid (the
/// registration grid may be cropped to the subject's head, and the field then continues
/// smoothly past the crop). For many points, build a [`Mapping`] once.
pub fn map_point(transform: &Transform, p: [f64; 3]) -> [f64; 3] {
    Mapping::new(transform).apply(p)
}

/// A transform ready to map many points: [`map_point`] with the displacement grid's inverse
/// affine computed once.
pub struct Mapping<'a> {
    transform: &'a Transform,
    to_u: Affine,
}

impl<'a> Mapping<'a> {
    /// Prepares `transform` for mapping points.
    pub fn new(transform: &'a Transform) -> Mapping<'a> {
        let to_u = transform
            .displacement
            .as_ref()
            .map_or_else(Affine::identity, |u| inverse(&u.affine));
        Mapping { transform, to_u }
    }

    /// Where fixed-space world point `p` lands in moving space.
    pub fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        let q = match &self.transform.displacement {
            Some(u) => {
                let d = sample_vector(u, clamp_index(u.shape, crate::volume::apply(&self.to_u, p)));
                [0, 1, 2].map(|c| p[c] + d[c])
            }
            None => p,
        };
        crate::volume::apply(&self.transform.affine, q)
    }
}

/// The three frames of `u` at continuous voxel `v` (inside the grid), trilinear: the weights
/// and corners are found once for all three.
fn sample_vector(u: &Volume, v: [f64; 3]) -> [f64; 3] {
    let [ni, nj, nk] = u.shape;
    let n = u.len();
    let base = v.map(|x| x.floor());
    let frac = [0, 1, 2].map(|a| v[a] - base[a]);
    let lo = base.map(|x| x as usize);
    let hi = [lo[0] + 1, lo[1] + 1, lo[2] + 1];
    let limit = [ni, nj, nk];
    let mut out = [0.0f64; 3];
    for corner in 0..8usize {
        let pick = [corner & 1, corner >> 1 & 1, corner >> 2 & 1];
        let mut w = 1.0;
        let mut at = [0usize; 3];
        for a in 0..3 {
            if pick[a] == 1 {
                w *= frac[a];
                at[a] = hi[a].min(limit[a] - 1);
            } else {
                w *= 1.0 - frac[a];
                at[a] = lo[a];
            }
        }
        if w == 0.0 {
            continue;
        }
        let idx = at[0] + ni * (at[1] + nj * at[2]);
        for (c, o) in out.iter_mut().enumerate() {
            *o += w * f64::from(u.data[c * n + idx]);
        }
    }
    out
}

/// A continuous voxel index moved to the nearest point inside a grid of `shape`.
pub fn clamp_index(shape: [usize; 3], v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|a| v[a].clamp(0.0, shape[a].saturating_sub(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::affine_from_orientation;

    fn ramp(shape: [usize; 3], affine: Affine) -> Volume {
        let mut data = Vec::with_capacity(shape.iter().product());
        for k in 0..shape[2] {
            for j in 0..shape[1] {
                for i in 0..shape[0] {
                    data.push((i + 10 * j + 100 * k) as f32);
                }
            }
        }
        Volume::new(data, shape, affine)
    }

    #[test]
    fn identity_resample_is_exact() {
        let v = ramp([5, 6, 7], Affine::identity());
        let out = resample(&v, &v.grid(), Interp::Linear, |p| p);
        assert_eq!(out.data, v.data);
    }

    #[test]
    fn reorientation_moves_voxels_to_their_world_place() {
        let src = ramp(
            [4, 5, 6],
            affine_from_orientation("RAS", [1.0; 3], [4, 5, 6], [0.0; 3]).unwrap(),
        );
        let lia = affine_from_orientation("LIA", [1.0; 3], [4, 6, 5], [0.0; 3]).unwrap();
        let out = resample(
            &src,
            &Grid {
                shape: [4, 6, 5],
                affine: lia,
            },
            Interp::Nearest,
            |p| p,
        );
        // Output voxel (0, 0, 0) is the left-most, top-most, posterior-most: source (3, 0, 5).
        assert_eq!(out.get(0, 0, 0), src.get(3, 0, 5));
        assert_eq!(out.get(3, 5, 4), src.get(0, 4, 0));
    }

    #[test]
    fn linear_sampling_interpolates_between_centres() {
        let v = ramp([3, 3, 3], Affine::identity());
        assert!((sample(&v, 0, 0.5, 1.0, 1.0, Interp::Linear) - 110.5).abs() < 1e-5);
        assert_eq!(sample(&v, 0, -2.0, 0.0, 0.0, Interp::Linear), 0.0);
    }
}
