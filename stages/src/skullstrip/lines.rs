//! Separable passes over the three axes of a volume: the engine room of the mm-based
//! morphology (exact Euclidean distance transforms) and of the Gaussian smoothing the bias
//! correction uses.
//!
//! Every separable filter here works one grid line at a time: the line is copied into a
//! contiguous buffer, transformed, and written back. Lines along `i` are contiguous already;
//! lines along `j` are handled plane by plane; lines along `k` are computed per `j` into
//! blocks that are then scattered. All three are split over rayon without `unsafe`.
//!
//! Distances use the lower-envelope-of-parabolas algorithm for sampled functions
//! (Felzenszwalb and Huttenlocher), with the voxel spacing of each axis, so a radius in mm
//! means the same on isotropic and anisotropic grids. The cost is linear in the number of
//! voxels whatever the radius.

use rayon::prelude::*;

/// Squared distance used for "no feature on this line (yet)".
pub(crate) const FAR: f32 = f32::INFINITY;

/// Applies `f` to every line of `data` along `axis` (0 = `i`, 1 = `j`, 2 = `k`).
pub(crate) fn for_each_line<F>(data: &mut [f32], shape: [usize; 3], axis: usize, f: F)
where
    F: Fn(&mut [f32]) + Sync,
{
    let [ni, nj, nk] = shape;
    if data.is_empty() {
        return;
    }
    match axis {
        0 => data.par_chunks_mut(ni).for_each(&f),
        1 => data.par_chunks_mut(ni * nj).for_each(|plane| {
            let mut line = vec![0.0f32; nj];
            for i in 0..ni {
                for (j, x) in line.iter_mut().enumerate() {
                    *x = plane[i + ni * j];
                }
                f(&mut line);
                for (j, x) in line.iter().enumerate() {
                    plane[i + ni * j] = *x;
                }
            }
        }),
        _ => {
            let src: &[f32] = data;
            let blocks: Vec<Vec<f32>> = (0..nj)
                .into_par_iter()
                .map(|j| {
                    let mut block = vec![0.0f32; ni * nk];
                    for i in 0..ni {
                        let line = &mut block[i * nk..(i + 1) * nk];
                        for (k, x) in line.iter_mut().enumerate() {
                            *x = src[i + ni * (j + nj * k)];
                        }
                        f(line);
                    }
                    block
                })
                .collect();
            for (j, block) in blocks.iter().enumerate() {
                for i in 0..ni {
                    for k in 0..nk {
                        data[i + ni * (j + nj * k)] = block[i * nk + k];
                    }
                }
            }
        }
    }
}

/// One-dimensional squared distance transform of `f` in place, samples `spacing` mm apart:
/// `f'(q) = min_p (spacing·(q − p))² + f(p)`. Entries equal to [`FAR`] are not features.
pub(crate) fn distance_line(f: &mut [f32], spacing: f64) {
    let n = f.len();
    let mut v: Vec<usize> = Vec::with_capacity(n);
    let mut z: Vec<f64> = Vec::with_capacity(n + 1);
    let pos = |q: usize| q as f64 * spacing;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        let fq = f[q] as f64 + pos(q) * pos(q);
        let mut cut = f64::NEG_INFINITY;
        while let Some(&p) = v.last() {
            let fp = f[p] as f64 + pos(p) * pos(p);
            let s = (fq - fp) / (2.0 * (pos(q) - pos(p)));
            // `z` has one entry per parabola in the envelope, so `last` exists here.
            if z.last().is_some_and(|&zl| s <= zl) {
                v.pop();
                z.pop();
            } else {
                cut = s;
                break;
            }
        }
        v.push(q);
        z.push(if v.len() == 1 { f64::NEG_INFINITY } else { cut });
    }
    if v.is_empty() {
        return;
    }
    z.push(f64::INFINITY);
    let orig: Vec<f32> = v.iter().map(|&p| f[p]).collect();
    let mut k = 0;
    for (q, out) in f.iter_mut().enumerate() {
        let x = pos(q);
        while z[k + 1] < x {
            k += 1;
        }
        let d = x - pos(v[k]);
        *out = (d * d + orig[k] as f64) as f32;
    }
}

/// Squared Euclidean distance (mm²) from every voxel to the nearest voxel where `feature` is
/// true; [`FAR`] everywhere when there is none.
pub(crate) fn squared_distance(feature: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f32> {
    let mut d: Vec<f32> = feature
        .par_iter()
        .map(|&b| if b { 0.0 } else { FAR })
        .collect();
    for (axis, &s) in spacing.iter().enumerate() {
        for_each_line(&mut d, shape, axis, |line| distance_line(line, s));
    }
    d
}

/// Gaussian smoothing with standard deviation `sigma_mm` (per axis in mm), truncated at three
/// standard deviations; values past the grid edge repeat the edge value.
pub(crate) fn gaussian(data: &mut [f32], shape: [usize; 3], spacing: [f64; 3], sigma_mm: f64) {
    for (axis, &s) in spacing.iter().enumerate() {
        let sigma = sigma_mm / s.max(f64::MIN_POSITIVE);
        if sigma < 0.1 || shape[axis] < 2 {
            continue;
        }
        let radius = (3.0 * sigma).ceil() as usize;
        let kernel: Vec<f32> = (0..=radius)
            .map(|x| (-(x as f64 * x as f64) / (2.0 * sigma * sigma)).exp())
            .map(|w| w as f32)
            .collect();
        let total: f32 = kernel[0] + 2.0 * kernel[1..].iter().sum::<f32>();
        for_each_line(data, shape, axis, |line| {
            let n = line.len() as isize;
            let src = line.to_vec();
            let at = |x: isize| src[x.clamp(0, n - 1) as usize];
            for (q, out) in line.iter_mut().enumerate() {
                let q = q as isize;
                let mut acc = kernel[0] * at(q);
                for (r, &w) in kernel.iter().enumerate().skip(1) {
                    acc += w * (at(q - r as isize) + at(q + r as isize));
                }
                *out = acc / total;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_line_matches_brute_force() {
        let feats = [3usize, 9, 10];
        let mut f = vec![FAR; 16];
        for &p in &feats {
            f[p] = 0.0;
        }
        distance_line(&mut f, 1.5);
        for (q, &d) in f.iter().enumerate() {
            let best = feats
                .iter()
                .map(|&p| ((q as f64 - p as f64) * 1.5).powi(2))
                .fold(f64::INFINITY, f64::min);
            assert!((d as f64 - best).abs() < 1e-4, "{q}: {d} vs {best}");
        }
    }

    #[test]
    fn squared_distance_is_euclidean_on_anisotropic_grids() {
        let shape = [7, 8, 9];
        let mut feat = vec![false; 7 * 8 * 9];
        feat[3 + 7 * (4 + 8 * 4)] = true;
        let d = squared_distance(&feat, shape, [1.0, 2.0, 0.5]);
        let at = |i: usize, j: usize, k: usize| d[i + 7 * (j + 8 * k)];
        assert_eq!(at(3, 4, 4), 0.0);
        let expect = (2.0f32).powi(2) + (2.0f32 * 2.0).powi(2) + (0.5f32 * 4.0).powi(2);
        assert!((at(1, 6, 8) - expect).abs() < 1e-4);
    }

    #[test]
    fn gaussian_keeps_constants_and_mass_in_the_middle() {
        let shape = [20, 20, 20];
        let mut c = vec![2.0f32; 8000];
        gaussian(&mut c, shape, [1.0; 3], 2.0);
        assert!(c.iter().all(|&x| (x - 2.0).abs() < 1e-4));
        let mut spike = vec![0.0f32; 8000];
        spike[10 + 20 * (10 + 20 * 10)] = 1.0;
        gaussian(&mut spike, shape, [1.0; 3], 1.5);
        let sum: f32 = spike.iter().sum();
        assert!((sum - 1.0).abs() < 1e-3);
    }
}
