//! Tensor building blocks of the registration: grids and sampling, separable filters, box
//! sums and finite differences.
//!
//! Conventions shared by every file of `register/`:
//! - an image is a `[1, C, D, H, W]` float tensor whose `(D, H, W)` axes are the volume's
//!   `(k, j, i)` axes, so a [`Volume`] buffer becomes a tensor without a transpose;
//! - a grid's geometry stays in `f64` on the host ([`Grid`]); only the per-voxel work runs
//!   on the device, so CPU and CUDA share one code path;
//! - points handed to `grid_sample` are `[1, D, H, W, 3]` in `(i, j, k)` order, normalised with
//!   `align_corners = true` (voxel centre 0 ↦ −1, last centre ↦ +1).
//!
//! Filters are separable 1D convolutions (Gaussian) or separable sums (box), never dense 3D
//! kernels, so their cost per voxel does not grow with the cube of the window.

use nalgebra::{Matrix3, Matrix4};
use tch::{Device, Kind, Tensor};

use crate::resample::inverse;
use crate::stage::StageError;
use crate::volume::{Affine, Grid, Volume};

/// Copies a volume's first frame to the device as a `[1, 1, D, H, W]` tensor.
pub(crate) fn volume_tensor(v: &Volume, device: Device) -> Result<Tensor, StageError> {
    let [ni, nj, nk] = v.shape;
    let t = Tensor::f_from_slice(v.frame(0))?;
    Ok(t.f_view([1, 1, nk as i64, nj as i64, ni as i64])?
        .f_to_device(device)?)
}

/// Copies a `[1, C, D, H, W]` tensor back to the host as a `C`-frame volume on `grid`.
pub(crate) fn tensor_volume(t: &Tensor, grid: &Grid) -> Result<Volume, StageError> {
    let frames = t.size()[1] as usize;
    let flat = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view([-1])?;
    let data = Vec::<f32>::try_from(&flat)?;
    if data.len() != frames * grid.len() {
        return Err(StageError::Data(format!(
            "tensor of {} values does not fit a {:?} grid with {frames} frames",
            data.len(),
            grid.shape
        )));
    }
    let mut v = Volume::new(vec![0.0; grid.len()], grid.shape, grid.affine);
    v.data = data;
    v.frames = frames;
    Ok(v)
}

/// The linear 3×3 part of an affine.
pub(crate) fn linear(m: &Affine) -> Matrix3<f64> {
    m.fixed_view::<3, 3>(0, 0).into_owned()
}

/// Maps voxel indices of `grid` to `grid_sample` coordinates (`align_corners = true`).
pub(crate) fn index_to_normalised(grid: &Grid) -> Affine {
    let mut n = Affine::identity();
    for a in 0..3 {
        let len = grid.shape[a] as f64;
        if len > 1.0 {
            n[(a, a)] = 2.0 / (len - 1.0);
            n[(a, 3)] = -1.0;
        } else {
            n[(a, a)] = 0.0;
        }
    }
    n
}

/// Maps world points to `grid_sample` coordinates of `grid`.
pub(crate) fn world_to_normalised(grid: &Grid) -> Affine {
    index_to_normalised(grid) * inverse(&grid.affine)
}

/// The voxel indices of `grid` as a `[1, D, H, W, 3]` tensor in `(i, j, k)` order.
pub(crate) fn index_points(grid: &Grid, device: Device) -> Result<Tensor, StageError> {
    let [ni, nj, nk] = grid.shape.map(|n| n as i64);
    let opts = (Kind::Float, device);
    let i = Tensor::f_arange(ni, opts)?
        .f_view([1, 1, ni])?
        .f_expand([nk, nj, ni], false)?;
    let j = Tensor::f_arange(nj, opts)?
        .f_view([1, nj, 1])?
        .f_expand([nk, nj, ni], false)?;
    let k = Tensor::f_arange(nk, opts)?
        .f_view([nk, 1, 1])?
        .f_expand([nk, nj, ni], false)?;
    Ok(Tensor::f_stack(&[i, j, k], 3)?.f_unsqueeze(0)?)
}

/// Applies a 4×4 affine to a `[..., 3]` tensor of points.
pub(crate) fn apply_affine(points: &Tensor, m: &Affine) -> Result<Tensor, StageError> {
    let device = points.device();
    let lin: Vec<f32> = (0..3)
        .flat_map(|c| (0..3).map(move |r| (r, c)))
        .map(|(r, c)| m[(r, c)] as f32)
        .collect();
    // `lin` holds Mᵀ row by row (column c of M is row c of Mᵀ), so `p · Mᵀ` is `M p`.
    let lin_t = Tensor::f_from_slice(&lin)?
        .f_view([3, 3])?
        .f_to_device(device)?;
    let shift = Tensor::f_from_slice(&[m[(0, 3)] as f32, m[(1, 3)] as f32, m[(2, 3)] as f32])?
        .f_to_device(device)?;
    Ok(points.f_matmul(&lin_t)?.f_add(&shift)?)
}

/// Samples `image` (`[B, C, D, H, W]`) at normalised `coords` (`[B, D', H', W', 3]`):
/// trilinear, zeros outside (`border = false`) or the nearest edge value (`border = true`).
pub(crate) fn sample(image: &Tensor, coords: &Tensor, border: bool) -> Result<Tensor, StageError> {
    Ok(image.f_grid_sampler_3d(coords, 0, i64::from(border), true)?)
}

/// Resamples `image` from `src` onto `dst` (world-aligned, trilinear, zeros outside), after a
/// Gaussian blur of σ = ratio/2 source voxels along each axis the target grid is coarser in.
///
/// When `dst` is `src` shrunk by whole factors ([`coarser_grid`]), each target voxel is the
/// mean of the block of source voxels it covers instead: one pass, and the usual pyramid
/// filter. Blocks cut by the far edge average the voxels they hold.
pub(crate) fn resample_grid(
    image: &Tensor,
    src: &Grid,
    dst: &Grid,
    border: bool,
) -> Result<Tensor, StageError> {
    if src == dst {
        return Ok(image.shallow_clone());
    }
    let (vs, vd) = (src.voxel_size(), dst.voxel_size());
    let ratio = [0, 1, 2].map(|a| vd[a] / vs[a]);
    let whole = ratio.map(|r| r.round().max(1.0));
    if (0..3).all(|a| (ratio[a] - whole[a]).abs() < 1e-6) && coarser_grid(src, whole) == *dst {
        // Kernel sizes in tensor order (k, j, i).
        let f = [whole[2], whole[1], whole[0]].map(|v| v as i64);
        return Ok(image.f_avg_pool3d(f, f, [0; 3], true, false, None::<i64>)?);
    }
    let sigma = ratio.map(|r| if r > 1.01 { 0.5 * r } else { 0.0 });
    let blurred = gaussian(image, sigma)?;
    let pts = index_points(dst, image.device())?;
    let to_src = world_to_normalised(src) * dst.affine;
    sample(&blurred, &apply_affine(&pts, &to_src)?, border)
}

/// A grid covering the same field of view as `grid` with voxels `factor` times larger along
/// each axis; voxel `v` of the new grid is centred on continuous voxel `factor·v + (factor−1)/2`
/// of the old one.
pub(crate) fn coarser_grid(grid: &Grid, factor: [f64; 3]) -> Grid {
    let mut scale = Matrix4::identity();
    let mut shape = [1usize; 3];
    for a in 0..3 {
        scale[(a, a)] = factor[a];
        scale[(a, 3)] = (factor[a] - 1.0) / 2.0;
        shape[a] = ((grid.shape[a] as f64 / factor[a]).ceil() as usize).max(1);
    }
    Grid {
        shape,
        affine: grid.affine * scale,
    }
}

/// A grid of `grid`'s field of view and orientation with isotropic `spacing` mm voxels.
pub(crate) fn grid_with_spacing(grid: &Grid, spacing: f64) -> Grid {
    let vs = grid.voxel_size();
    coarser_grid(grid, [0, 1, 2].map(|a| spacing / vs[a]))
}

/// The normalised 1D Gaussian of standard deviation `sigma` (in voxels), radius ⌈3σ⌉.
fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as i64;
    let raw: Vec<f64> = (-radius..=radius)
        .map(|x| (-(x * x) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|v| (v / total) as f32).collect()
}

/// Separable Gaussian smoothing of every channel of a `[B, C, D, H, W]` tensor, with σ (in
/// voxels) given per volume axis `(i, j, k)`; zero padding; σ ≤ 0 skips that axis.
///
/// Each 1D pass is a sum of shifted, weighted views of the padded tensor (the kernel is
/// symmetric, so mirrored taps are added first and weighted once). On a CPU this is four to
/// five times faster than libtorch's depthwise `conv3d` for the short kernels the
/// registration uses (σ ≤ 2, at most 13 taps), and it is plain element-wise work on CUDA.
pub(crate) fn gaussian(x: &Tensor, sigma: [f64; 3]) -> Result<Tensor, StageError> {
    let mut out = x.shallow_clone();
    // Volume axis i is tensor dim 4 (W), j is 3 (H), k is 2 (D).
    for (axis, &s) in sigma.iter().enumerate() {
        if s <= 0.0 {
            continue;
        }
        let k = gaussian_kernel(s);
        let r = (k.len() / 2) as i64;
        let dim = 4 - axis as i64;
        let n = out.size()[dim as usize];
        let mut pad = [0i64; 6];
        pad[2 * axis] = r;
        pad[2 * axis + 1] = r;
        let padded = out.f_constant_pad_nd(pad)?;
        let mut acc = padded
            .f_narrow(dim, r, n)?
            .f_mul_scalar(f64::from(k[r as usize]))?;
        for t in 1..=r {
            let mut pair =
                padded
                    .f_narrow(dim, r - t, n)?
                    .f_add(&padded.f_narrow(dim, r + t, n)?)?;
            let _ = pair.f_mul_scalar_(f64::from(k[(r + t) as usize]))?;
            let _ = acc.f_add_(&pair)?;
        }
        out = acc;
    }
    Ok(out)
}

/// Box sums over a `(2r+1)³` window of every channel of a `[B, C, D, H, W]` tensor, zero
/// outside: separable, one padding for all axes, then `2r` additions of shifted views per
/// axis. On a CPU this beats cumulative sums (whose pass along the outermost axis strides
/// through memory) for the windows registration uses (5–9 voxels); the cost per voxel grows
/// with the window's width, never with its volume.
pub(crate) fn box_sum(x: &Tensor, r: i64) -> Result<Tensor, StageError> {
    let mut out = x.f_constant_pad_nd([r, r, r, r, r, r])?;
    for dim in [4i64, 3, 2] {
        let n = out.size()[dim as usize] - 2 * r;
        let mut acc = out.f_narrow(dim, 0, n)?.f_add(&out.f_narrow(dim, 1, n)?)?;
        for t in 2..=2 * r {
            let _ = acc.f_add_(&out.f_narrow(dim, t, n)?)?;
        }
        out = acc;
    }
    Ok(out)
}

/// Central-difference spatial gradient of a `[1, 1, D, H, W]` tensor in voxel units, as
/// `[1, 3, D, H, W]` with channels `(∂/∂i, ∂/∂j, ∂/∂k)`; one-sided at the borders.
pub(crate) fn spatial_gradient(x: &Tensor) -> Result<Tensor, StageError> {
    let mut parts = Vec::with_capacity(3);
    for dim in [4i64, 3, 2] {
        let n = x.size()[dim as usize];
        if n < 2 {
            parts.push(x.f_zeros_like()?);
            continue;
        }
        let fwd = x
            .f_narrow(dim, 1, n - 1)?
            .f_sub(&x.f_narrow(dim, 0, n - 1)?)?;
        // Average the forward differences on both sides; at the ends only one exists.
        let first = fwd.f_narrow(dim, 0, 1)?;
        let last = fwd.f_narrow(dim, n - 2, 1)?;
        let inner = if n > 2 {
            let a = fwd.f_narrow(dim, 0, n - 2)?;
            let b = fwd.f_narrow(dim, 1, n - 2)?;
            Some(a.f_add(&b)?.f_mul_scalar(0.5)?)
        } else {
            None
        };
        let mut pieces = vec![first];
        pieces.extend(inner);
        pieces.push(last);
        parts.push(Tensor::f_cat(&pieces, dim)?);
    }
    Ok(Tensor::f_cat(&parts, 1)?)
}

/// `∇x · w` for `[B, 1, D, H, W]` tensors: the central-difference spatial gradient of `x` (voxel
/// units) times `w`, as `[B, 3, D, H, W]` with channels `(∂/∂i, ∂/∂j, ∂/∂k)`.
///
/// Unlike [`spatial_gradient`] the border is the replicated edge, so the outermost voxels get
/// half the one-sided difference; that saves assembling the result from pieces, and an
/// optimiser's step direction does not depend on the outermost layer.
pub(crate) fn gradient_times(x: &Tensor, w: &Tensor) -> Result<Tensor, StageError> {
    let size = x.size();
    let (d, h, wd) = (size[2], size[3], size[4]);
    let padded = x.f_replication_pad3d([1, 1, 1, 1, 1, 1])?;
    let half = w.f_mul_scalar(0.5)?;
    let view = |dim: i64, off: i64| -> Result<Tensor, StageError> {
        let at = |axis: i64| 1 + if axis == dim { off } else { 0 };
        Ok(padded
            .f_narrow(2, at(2), d)?
            .f_narrow(3, at(3), h)?
            .f_narrow(4, at(4), wd)?)
    };
    let out = Tensor::f_empty([size[0], 3, d, h, wd], (x.kind(), x.device()))?;
    for (c, dim) in [4i64, 3, 2].into_iter().enumerate() {
        let mut slot = out.f_narrow(1, c as i64, 1)?;
        let _ = view(dim, 1)?.f_sub_out(&slot, &view(dim, -1)?)?;
        let _ = slot.f_mul_(&half)?;
    }
    Ok(out)
}

/// Mixes the three channels of a `[B, 3, D, H, W]` vector field by the 3×3 matrix `m`
/// (output channel `r` = Σ_c m[r, c] · input channel `c`).
pub(crate) fn mix_channels(x: &Tensor, m: &Matrix3<f64>) -> Result<Tensor, StageError> {
    let vals: Vec<f32> = (0..3)
        .flat_map(|r| (0..3).map(move |c| (r, c)))
        .map(|(r, c)| m[(r, c)] as f32)
        .collect();
    let w = Tensor::f_from_slice(&vals)?
        .f_to_device(x.device())?
        .f_view([3, 3, 1, 1, 1])?;
    Ok(x.f_conv3d::<Tensor>(&w, None, [1, 1, 1], [0, 0, 0], [1, 1, 1], 1)?)
}

/// [`mix_channels`] with one matrix per batch item (`ms[b]` for item `b`); one pass when
/// they are all the same.
pub(crate) fn mix_each(x: &Tensor, ms: &[Matrix3<f64>]) -> Result<Tensor, StageError> {
    if ms.windows(2).all(|w| w[0] == w[1]) {
        return mix_channels(x, &ms[0]);
    }
    let parts = ms
        .iter()
        .enumerate()
        .map(|(b, m)| mix_channels(&x.f_narrow(0, b as i64, 1)?, m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// A `[B, 3, D, H, W]` field as `[B, D, H, W, 3]` points (a view, no copy).
pub(crate) fn channels_last(x: &Tensor) -> Result<Tensor, StageError> {
    Ok(x.f_permute([0, 2, 3, 4, 1])?)
}

/// `[1, D, H, W, 3]` points as a contiguous `[1, 3, D, H, W]` field (a copy).
pub(crate) fn channels_first(x: &Tensor) -> Result<Tensor, StageError> {
    Ok(x.f_permute([0, 4, 1, 2, 3])?.f_contiguous()?)
}

/// A scalar tensor's value on the host.
pub(crate) fn scalar(x: &Tensor) -> Result<f64, StageError> {
    Ok(x.f_to_kind(Kind::Double)?.f_double_value(&[])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_box(x: &[f32], n: [usize; 3], r: i64) -> Vec<f32> {
        let [nk, nj, ni] = n;
        let at = |k: i64, j: i64, i: i64| -> f32 {
            if k < 0 || j < 0 || i < 0 || k >= nk as i64 || j >= nj as i64 || i >= ni as i64 {
                0.0
            } else {
                x[(k as usize * nj + j as usize) * ni + i as usize]
            }
        };
        let mut out = Vec::with_capacity(x.len());
        for k in 0..nk as i64 {
            for j in 0..nj as i64 {
                for i in 0..ni as i64 {
                    let mut s = 0.0;
                    for dk in -r..=r {
                        for dj in -r..=r {
                            for di in -r..=r {
                                s += at(k + dk, j + dj, i + di);
                            }
                        }
                    }
                    out.push(s);
                }
            }
        }
        out
    }

    #[test]
    fn box_sum_matches_naive_window_sum() {
        let n = [5usize, 6, 7];
        let x: Vec<f32> = (0..210).map(|v| ((v * 37 % 11) as f32) / 7.0).collect();
        let t = Tensor::from_slice(&x).view([1, 1, 5, 6, 7]);
        for r in [1, 2] {
            let got = Vec::<f32>::try_from(box_sum(&t, r).unwrap().view([-1])).unwrap();
            let want = naive_box(&x, n, r);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-3, "r={r}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn gaussian_preserves_mass_inside_and_gradient_of_ramp_is_one() {
        let ramp = Tensor::arange(8, (Kind::Float, Device::Cpu))
            .view([1, 1, 1, 1, 8])
            .expand([1, 1, 4, 5, 8], false)
            .contiguous();
        let g = spatial_gradient(&ramp).unwrap();
        let gi = g.narrow(1, 0, 1);
        assert!((gi.min().double_value(&[]) - 1.0).abs() < 1e-6);
        let impulse = Tensor::zeros([1, 1, 21, 21, 21], (Kind::Float, Device::Cpu));
        let _ = impulse
            .narrow(2, 10, 1)
            .narrow(3, 10, 1)
            .narrow(4, 10, 1)
            .fill_(1.0);
        let s = gaussian(&impulse, [1.5, 1.0, 2.0]).unwrap();
        assert!((s.sum(Kind::Double).double_value(&[]) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn gradient_times_weights_central_differences() {
        let x = Tensor::rand([1, 1, 5, 6, 7], (Kind::Float, Device::Cpu));
        let w = Tensor::rand([1, 1, 5, 6, 7], (Kind::Float, Device::Cpu));
        let got = gradient_times(&x, &w).unwrap();
        let want = spatial_gradient(&x).unwrap().f_mul(&w).unwrap();
        // Same inside; the outermost layer along each axis is not compared.
        let inner = |t: &Tensor| t.narrow(2, 1, 3).narrow(3, 1, 4).narrow(4, 1, 5);
        assert!(inner(&got).allclose(&inner(&want), 1e-5, 1e-6, false));
        // At the first i-slice: half of the forward difference, times the weight.
        let edge = (x.narrow(4, 1, 1) - x.narrow(4, 0, 1)) * 0.5 * w.narrow(4, 0, 1);
        assert!(
            got.narrow(1, 0, 1)
                .narrow(4, 0, 1)
                .allclose(&edge, 1e-5, 1e-6, false)
        );
    }

    #[test]
    fn resampling_onto_the_same_world_points_is_identity() {
        let grid = Grid {
            shape: [6, 5, 4],
            affine: crate::volume::affine_from_orientation("LIA", [2.0; 3], [6, 5, 4], [1.0; 3])
                .unwrap(),
        };
        let x = Tensor::rand([1, 1, 4, 5, 6], (Kind::Float, Device::Cpu));
        let pts = index_points(&grid, Device::Cpu).unwrap();
        let coords = apply_affine(&pts, &index_to_normalised(&grid)).unwrap();
        let y = sample(&x, &coords, false).unwrap();
        assert!(y.allclose(&x, 1e-5, 1e-5, false));
    }
}
