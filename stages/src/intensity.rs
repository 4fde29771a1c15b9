//! Intensity normalisation: percentile rescaling, z-scores, histogram matching, and an
//! N4-like bias-field correction.
//!
//! Every function takes an optional mask (a 0/1 volume on the same grid, inside where the
//! value is at least 0.5) that selects the voxels the statistics come from; the mapping is
//! then applied to every voxel, so the background moves consistently with the brain.
//! Statistics skip NaN and infinite voxels. Percentiles come from a 4096-bin histogram
//! (error under 0.03 % of the value range), which avoids sorting 16 million voxels, except in
//! [`percentile_rescale`], which the `normalize` stage uses and which is exact (numpy's rule).
//!
//! [`bias_correct`] follows the scheme of N4 (Tustison et al., 2010) on a coarse grid:
//! the log image is modelled as true log intensity plus a smooth log bias; each iteration
//! sharpens the histogram of the current log residual by Wiener deconvolution of a Gaussian,
//! maps every voxel to the expected sharp value given its residual, and refits the bias as a
//! smooth function of the difference. What it does differently from N4:
//! - the smooth fit is a mask-normalised Gaussian convolution (width `smoothing_mm`) rather
//!   than a multi-resolution cubic B-spline lattice, so there are no control-point levels,
//!   and the field is extrapolated outside the mask by the same convolution;
//! - one resolution only (the grid shrunk to about `shrink_mm` voxels), no schedule of
//!   increasing detail;
//! - no voxel weights beyond the mask, and voxels ≤ 0 are left out of the estimate (their
//!   logarithm is undefined) but still divided by the field.

use rayon::prelude::*;

use crate::skullstrip::levels::Histogram;
use crate::skullstrip::lines::gaussian;
use crate::stage::StageError;
use crate::volume::Volume;

/// Number of quantile landmarks [`histogram_match`] maps (0 %, 1 %, …, 100 %).
pub const HISTOGRAM_LANDMARKS: usize = 101;

/// An intensity operation could not be done on these inputs.
#[derive(Debug, thiserror::Error)]
pub enum IntensityError {
    /// No finite voxel was selected (empty mask, or all NaN).
    #[error("no finite voxel in {what}")]
    Empty {
        /// Which input.
        what: &'static str,
    },
    /// The selected voxels all have one value, so there is no scale to normalise by.
    #[error("{what} is constant over the selected voxels ({value})")]
    Constant {
        /// Which input.
        what: &'static str,
        /// The value.
        value: f64,
    },
    /// A mask is not on its image's grid.
    #[error("grid mismatch: {what} has shape {got:?}, expected {want:?}")]
    ShapeMismatch {
        /// Which input is off.
        what: &'static str,
        /// Its shape.
        got: [usize; 3],
        /// The shape it should have.
        want: [usize; 3],
    },
    /// A parameter is out of its range.
    #[error("invalid parameter: {0}")]
    Parameter(String),
}

impl From<IntensityError> for StageError {
    fn from(e: IntensityError) -> StageError {
        StageError::Data(e.to_string())
    }
}

/// The per-voxel selection of `mask` for image `v`, checked against its grid.
fn selection(
    v: &Volume,
    mask: Option<&Volume>,
    what: &'static str,
) -> Result<Option<Vec<bool>>, IntensityError> {
    let Some(m) = mask else { return Ok(None) };
    if m.shape != v.shape {
        return Err(IntensityError::ShapeMismatch {
            what,
            got: m.shape,
            want: v.shape,
        });
    }
    Ok(Some(m.frame(0).iter().map(|&x| x >= 0.5).collect()))
}

fn histogram(
    v: &Volume,
    keep: Option<&[bool]>,
    what: &'static str,
) -> Result<Histogram, IntensityError> {
    Histogram::new(v.frame(0), keep).ok_or(IntensityError::Empty { what })
}

/// Maps the `lo`-th percentile of the selected voxels to 0 and the `hi`-th to 1, linearly,
/// and clips the result to [0, 1]. Percentiles are in 0–100; typical values 1 and 99.
/// NaN voxels stay NaN; infinities clip to 0 or 1 like any value beyond the percentiles.
///
/// Unlike the other functions here, the two percentiles are exact: they interpolate linearly
/// between order statistics as numpy's default rule does ([`percentile`]), so a pipeline's
/// `normalize` stage gives the same numbers as a numpy script. Finding them costs a copy of
/// the selected voxels and two linear-time selections.
///
/// # Errors
/// [`IntensityError::Parameter`] unless `0 ≤ lo < hi ≤ 100`; [`IntensityError::Empty`] when
/// no finite voxel is selected; [`IntensityError::Constant`] when the two percentiles agree;
/// [`IntensityError::ShapeMismatch`] for a mask on another grid.
pub fn percentile_rescale(
    v: &Volume,
    lo: f64,
    hi: f64,
    mask: Option<&Volume>,
) -> Result<Volume, IntensityError> {
    if !(0.0..100.0).contains(&lo) || hi <= lo || hi > 100.0 {
        return Err(IntensityError::Parameter(format!(
            "percentiles must satisfy 0 <= lo < hi <= 100, got {lo} and {hi}"
        )));
    }
    let keep = selection(v, mask, "mask")?;
    let mut sample: Vec<f32> = v
        .frame(0)
        .iter()
        .enumerate()
        .filter(|&(i, x)| x.is_finite() && keep.as_ref().is_none_or(|k| k[i]))
        .map(|(_, &x)| x)
        .collect();
    if sample.is_empty() {
        return Err(IntensityError::Empty { what: "image" });
    }
    let (a, b) = (percentile(&mut sample, lo), percentile(&mut sample, hi));
    tracing::debug!(lo = a, hi = b, "Percentile range");
    if b <= a {
        return Err(IntensityError::Constant {
            what: "image",
            value: a,
        });
    }
    let scale = 1.0 / (b - a);
    let data = v
        .frame(0)
        .par_iter()
        .map(|&x| (((x as f64 - a) * scale) as f32).clamp(0.0, 1.0))
        .collect();
    Ok(v.with_data(data))
}

/// The `p`-th percentile (0–100) of `values`, interpolating linearly between the order
/// statistics around rank `p / 100 · (n − 1)`, as numpy's default (`linear`) rule does.
/// Reorders `values`. NaN when `values` is empty; `values` should be finite.
///
/// ```
/// let mut v = vec![3.0, 1.0, 2.0, 4.0];
/// assert_eq!(voxflow_stages::intensity::percentile(&mut v, 50.0), 2.5);
/// ```
pub fn percentile(values: &mut [f32], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = p.clamp(0.0, 100.0) / 100.0 * (values.len() - 1) as f64;
    let below = rank.floor() as usize;
    let frac = rank - below as f64;
    let (_, &mut at, above) = values.select_nth_unstable_by(below, f32::total_cmp);
    let next = if frac > 0.0 {
        above.iter().copied().min_by(f32::total_cmp).unwrap_or(at)
    } else {
        at
    };
    at as f64 + frac * (next as f64 - at as f64)
}

/// Subtracts the mean of the selected voxels and divides by their standard deviation, so
/// the selection ends with mean 0 and standard deviation 1 (population formula).
///
/// # Errors
/// [`IntensityError::Empty`] when no finite voxel is selected, [`IntensityError::Constant`]
/// when they all have one value, [`IntensityError::ShapeMismatch`] for a mask on another grid.
pub fn zscore(v: &Volume, mask: Option<&Volume>) -> Result<Volume, IntensityError> {
    let keep = selection(v, mask, "mask")?;
    let (n, sum, sum2) = v
        .frame(0)
        .par_iter()
        .enumerate()
        .filter(|&(i, x)| x.is_finite() && keep.as_ref().is_none_or(|k| k[i]))
        .map(|(_, &x)| (1u64, x as f64, x as f64 * x as f64))
        .reduce(|| (0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    if n == 0 {
        return Err(IntensityError::Empty { what: "image" });
    }
    let mean = sum / n as f64;
    let var = (sum2 / n as f64 - mean * mean).max(0.0);
    if var.sqrt() <= 1e-12 * mean.abs().max(1.0) {
        return Err(IntensityError::Constant {
            what: "image",
            value: mean,
        });
    }
    let inv = 1.0 / var.sqrt();
    Ok(map_voxels(v, |x| (x - mean) * inv))
}

/// Applies `f` (in f64) to every finite voxel of frame 0; NaN and infinities pass through.
fn map_voxels(v: &Volume, f: impl Fn(f64) -> f64 + Sync) -> Volume {
    let data = v
        .frame(0)
        .par_iter()
        .map(|&x| if x.is_finite() { f(x as f64) as f32 } else { x })
        .collect();
    v.with_data(data)
}

/// Maps the intensities of `v` so that its quantiles (over `mask_v`) land on those of
/// `reference` (over `mask_ref`): a piecewise-linear map through
/// [`HISTOGRAM_LANDMARKS`] quantile pairs (0 %, 1 %, …, 100 %). Values beyond the first or
/// last landmark continue along the straight line through the two end landmarks, so the
/// background keeps its place relative to the brain instead of being clamped onto it.
/// Tied landmarks (many equal values, as in 8-bit images) are merged into one.
///
/// # Errors
/// [`IntensityError::Empty`] when either selection has no finite voxel,
/// [`IntensityError::Constant`] when the image's selection has a single value,
/// [`IntensityError::ShapeMismatch`] for a mask on another grid.
pub fn histogram_match(
    v: &Volume,
    reference: &Volume,
    mask_v: Option<&Volume>,
    mask_ref: Option<&Volume>,
) -> Result<Volume, IntensityError> {
    let keep_v = selection(v, mask_v, "image mask")?;
    let keep_r = selection(reference, mask_ref, "reference mask")?;
    let hv = histogram(v, keep_v.as_deref(), "image")?;
    let hr = histogram(reference, keep_r.as_deref(), "reference")?;
    let step = 100.0 / (HISTOGRAM_LANDMARKS - 1) as f64;
    let mut xs: Vec<f64> = Vec::with_capacity(HISTOGRAM_LANDMARKS);
    let mut ys: Vec<f64> = Vec::with_capacity(HISTOGRAM_LANDMARKS);
    let mut tied = 1.0;
    for l in 0..HISTOGRAM_LANDMARKS {
        let (x, y) = (
            hv.percentile(l as f64 * step),
            hr.percentile(l as f64 * step),
        );
        match xs.last() {
            Some(&last) if x <= last => {
                // Merge a tie: the landmark maps to the mean of the tied reference values.
                let ly = ys.last_mut().expect("ys grows with xs");
                *ly = (*ly * tied + y) / (tied + 1.0);
                tied += 1.0;
            }
            _ => {
                xs.push(x);
                ys.push(y);
                tied = 1.0;
            }
        }
    }
    let n = xs.len();
    if n < 2 {
        return Err(IntensityError::Constant {
            what: "image",
            value: xs[0],
        });
    }
    let slope = (ys[n - 1] - ys[0]) / (xs[n - 1] - xs[0]);
    Ok(map_voxels(v, |x| {
        if x <= xs[0] {
            return ys[0] + (x - xs[0]) * slope;
        }
        if x >= xs[n - 1] {
            return ys[n - 1] + (x - xs[n - 1]) * slope;
        }
        let s = xs.partition_point(|&p| p <= x).clamp(1, n - 1);
        let t = (x - xs[s - 1]) / (xs[s] - xs[s - 1]);
        ys[s - 1] + t * (ys[s] - ys[s - 1])
    }))
}

/// Settings of [`bias_correct`].
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BiasParams {
    /// Voxel size (mm) of the coarse grid the field is estimated on. Default 4.
    pub shrink_mm: f64,
    /// Standard deviation (mm) of the Gaussian that makes the field smooth. Default 30.
    pub smoothing_mm: f64,
    /// Most iterations. Default 50.
    pub iterations: usize,
    /// Stop when the largest change of the log field in an iteration falls below this.
    /// Default 0.001.
    pub tolerance: f64,
    /// Full width at half maximum of the Gaussian blur the histogram sharpening undoes, in
    /// log-intensity units. Default 0.15 (as N4).
    pub fwhm: f64,
    /// Wiener filter noise term of the sharpening. Default 0.01 (as N4).
    pub wiener_noise: f64,
    /// Histogram bins of the sharpening. Default 200 (as N4).
    pub bins: usize,
}

impl Default for BiasParams {
    fn default() -> BiasParams {
        BiasParams {
            shrink_mm: 4.0,
            smoothing_mm: 30.0,
            iterations: 50,
            tolerance: 0.001,
            fwhm: 0.15,
            wiener_noise: 0.01,
            bins: 200,
        }
    }
}

/// What [`bias_correct`] returns.
#[derive(Clone, Debug)]
pub struct BiasCorrection {
    /// The image divided by the field.
    pub corrected: Volume,
    /// The multiplicative bias field (geometric mean 1 over the mask) on the image's grid.
    pub field: Volume,
    /// Iterations run.
    pub iterations: usize,
}

/// Estimates a smooth multiplicative bias field inside `mask` (every positive voxel when
/// None) and divides the image by it. See the module documentation for the method and how
/// it differs from N4.
///
/// # Errors
/// [`IntensityError::Parameter`] for non-positive sizes or fewer than 8 bins;
/// [`IntensityError::Empty`] when no positive finite voxel is selected;
/// [`IntensityError::ShapeMismatch`] for a mask on another grid.
pub fn bias_correct(
    v: &Volume,
    mask: Option<&Volume>,
    params: &BiasParams,
) -> Result<BiasCorrection, IntensityError> {
    if !(params.shrink_mm > 0.0 && params.smoothing_mm > 0.0 && params.fwhm > 0.0)
        || params.bins < 8
    {
        return Err(IntensityError::Parameter(format!(
            "bias correction needs positive sizes and at least 8 bins, got {params:?}"
        )));
    }
    let keep = selection(v, mask, "mask")?;
    // Limitation: a single coarse resolution and a Gaussian fit, where N4 refines a B-spline
    // lattice over several levels; fields with detail finer than `smoothing_mm` remain.
    let coarse = Coarse::new(v, keep.as_deref(), params.shrink_mm)?;
    let mut log_b = vec![0.0f32; coarse.log.len()];
    let mut done = 0;
    for it in 0..params.iterations {
        done = it + 1;
        let residual: Vec<f32> = (0..log_b.len())
            .map(|c| {
                if coarse.weight[c] > 0.0 {
                    coarse.log[c] - log_b[c]
                } else {
                    0.0
                }
            })
            .collect();
        let sharp = sharpen(&residual, &coarse.weight, params);
        // The fit is of the residual's departure from its sharpened self, added to the
        // field so far: Gaussian smoothing is not a projection, so refitting the whole
        // field each time would shrink it towards zero.
        let step: Vec<f32> = residual.iter().zip(&sharp).map(|(r, s)| r - s).collect();
        let step = coarse.smooth(&step, params.smoothing_mm);
        let change = step
            .iter()
            .zip(&coarse.weight)
            .filter(|&(_, &w)| w > 0.0)
            .map(|(d, _)| d.abs())
            .fold(0.0f32, f32::max);
        log_b.iter_mut().zip(&step).for_each(|(b, d)| *b += d);
        if (change as f64) < params.tolerance {
            break;
        }
    }
    let field_data = coarse.upsample(&log_b, v);
    let corrected = v
        .frame(0)
        .par_iter()
        .zip(&field_data)
        .map(|(&x, &f)| x / f)
        .collect();
    Ok(BiasCorrection {
        corrected: v.with_data(corrected),
        field: v.with_data(field_data),
        iterations: done,
    })
}

/// The image averaged over blocks of about `shrink_mm`: log intensity and weight (the
/// fraction of the block's voxels selected and positive) per block.
struct Coarse {
    shape: [usize; 3],
    block: [usize; 3],
    spacing: [f64; 3],
    log: Vec<f32>,
    weight: Vec<f32>,
}

impl Coarse {
    fn new(v: &Volume, keep: Option<&[bool]>, shrink_mm: f64) -> Result<Coarse, IntensityError> {
        let vox = v.voxel_size();
        let block = [0, 1, 2].map(|a| ((shrink_mm / vox[a]).round() as usize).max(1));
        let shape = [0, 1, 2].map(|a| v.shape[a].div_ceil(block[a]));
        let spacing = [0, 1, 2].map(|a| vox[a] * block[a] as f64);
        let n = shape.iter().product();
        let (mut sum, mut count, mut total) = (vec![0.0f64; n], vec![0u32; n], vec![0u32; n]);
        let data = v.frame(0);
        let [ni, nj, _] = v.shape;
        for (idx, &x) in data.iter().enumerate() {
            let (i, j, k) = (idx % ni, (idx / ni) % nj, idx / (ni * nj));
            let c = i / block[0] + shape[0] * (j / block[1] + shape[1] * (k / block[2]));
            total[c] += 1;
            if x.is_finite() && x > 0.0 && keep.is_none_or(|m| m[idx]) {
                sum[c] += (x as f64).ln();
                count[c] += 1;
            }
        }
        if count.iter().all(|&c| c == 0) {
            return Err(IntensityError::Empty {
                what: "positive voxels of the mask",
            });
        }
        let log = (0..n)
            .map(|c| {
                if count[c] > 0 {
                    (sum[c] / count[c] as f64) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let weight = (0..n)
            .map(|c| count[c] as f32 / total[c].max(1) as f32)
            .collect();
        Ok(Coarse {
            shape,
            block,
            spacing,
            log,
            weight,
        })
    }

    /// Mask-normalised Gaussian smoothing of `f`, mean removed over the mask: a smooth
    /// field defined everywhere, zero (no bias) where the mask is far away.
    fn smooth(&self, f: &[f32], sigma_mm: f64) -> Vec<f32> {
        let mut num: Vec<f32> = f.iter().zip(&self.weight).map(|(x, w)| x * w).collect();
        let mut den = self.weight.clone();
        gaussian(&mut num, self.shape, self.spacing, sigma_mm);
        gaussian(&mut den, self.shape, self.spacing, sigma_mm);
        let mut out: Vec<f32> = num
            .iter()
            .zip(&den)
            .map(|(&a, &b)| if b > 1e-6 { a / b } else { 0.0 })
            .collect();
        let (s, w) = out
            .iter()
            .zip(&self.weight)
            .fold((0.0f64, 0.0f64), |(s, t), (&x, &w)| {
                (s + (x * w) as f64, t + w as f64)
            });
        let mean = (s / w.max(f64::MIN_POSITIVE)) as f32;
        out.iter_mut().for_each(|x| *x -= mean);
        out
    }

    /// The multiplicative field `exp(log_b)` on `v`'s grid, by trilinear interpolation
    /// between block centres.
    fn upsample(&self, log_b: &[f32], v: &Volume) -> Vec<f32> {
        let [ni, nj, nk] = v.shape;
        let [ci, cj, ck] = self.shape;
        let at = |a: usize, b: usize, c: usize| log_b[a + ci * (b + cj * c)];
        let pos = |x: usize, axis: usize, n: usize| {
            let p = ((x as f64 + 0.5) / self.block[axis] as f64 - 0.5).clamp(0.0, (n - 1) as f64);
            let lo = (p.floor() as usize).min(n.saturating_sub(2));
            let hi = (lo + 1).min(n - 1);
            (lo, hi, (p - lo as f64) as f32)
        };
        let mut out = vec![0.0f32; v.len()];
        out.par_chunks_mut(ni * nj)
            .enumerate()
            .for_each(|(k, plane)| {
                let (k0, k1, tk) = pos(k, 2, ck);
                for j in 0..nj {
                    let (j0, j1, tj) = pos(j, 1, cj);
                    for i in 0..ni {
                        let (i0, i1, ti) = pos(i, 0, ci);
                        let lerp = |a: f32, b: f32, t: f32| a + (b - a) * t;
                        let c0 = lerp(
                            lerp(at(i0, j0, k0), at(i1, j0, k0), ti),
                            lerp(at(i0, j1, k0), at(i1, j1, k0), ti),
                            tj,
                        );
                        let c1 = lerp(
                            lerp(at(i0, j0, k1), at(i1, j0, k1), ti),
                            lerp(at(i0, j1, k1), at(i1, j1, k1), ti),
                            tj,
                        );
                        plane[i + ni * j] = lerp(c0, c1, tk).exp();
                    }
                }
            });
        let _ = nk;
        out
    }
}

/// For each weighted value of `r`, its expected "sharp" value: the histogram of `r` is
/// deconvolved by a Gaussian of `params.fwhm` (Wiener filter), and each value maps to the
/// mean of the sharp distribution blurred around it (the N4 sharpening step).
fn sharpen(r: &[f32], weight: &[f32], params: &BiasParams) -> Vec<f32> {
    let sel = || {
        r.iter()
            .zip(weight)
            .filter(|&(_, &w)| w > 0.0)
            .map(|(&x, _)| x)
    };
    let lo = sel().fold(f32::INFINITY, f32::min) as f64;
    let hi = sel().fold(f32::NEG_INFINITY, f32::max) as f64;
    // Also catches NaN bounds (nothing selected): the comparison is then false.
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return r.to_vec();
    }
    let bins = params.bins;
    let width = (hi - lo) / (bins - 1) as f64;
    let m = (2 * bins).next_power_of_two();
    let mut hist = vec![Complex::default(); m];
    for (&x, &w) in r.iter().zip(weight) {
        if w > 0.0 {
            let p = (x as f64 - lo) / width;
            let b = (p.floor() as usize).min(bins - 2);
            let t = p - b as f64;
            hist[b].re += w as f64 * (1.0 - t);
            hist[b + 1].re += w as f64 * t;
        }
    }
    let sigma = params.fwhm / (8.0f64.ln().sqrt() * 2.0) / width;
    let mut kernel = vec![Complex::default(); m];
    let mut ksum = 0.0;
    for (d, kv) in kernel.iter_mut().enumerate() {
        let x = if d <= m / 2 {
            d as f64
        } else {
            d as f64 - m as f64
        };
        kv.re = (-(x * x) / (2.0 * sigma * sigma)).exp();
        ksum += kv.re;
    }
    kernel.iter_mut().for_each(|k| k.re /= ksum);
    let kf = fft(&kernel, false);
    let hf = fft(&hist, false);
    let uf: Vec<Complex> = hf
        .iter()
        .zip(&kf)
        .map(|(h, k)| {
            let g = k.conj().scale(1.0 / (k.norm2() + params.wiener_noise));
            h.mul(g)
        })
        .collect();
    let u: Vec<f64> = fft(&uf, true).iter().map(|c| c.re.max(0.0)).collect();
    let centre = |b: usize| lo + b as f64 * width;
    let ux: Vec<Complex> = (0..m)
        .map(|b| Complex::real(if b < bins { u[b] * centre(b) } else { 0.0 }))
        .collect();
    let uu: Vec<Complex> = (0..m)
        .map(|b| Complex::real(if b < bins { u[b] } else { 0.0 }))
        .collect();
    let conv = |a: &[Complex]| -> Vec<f64> {
        let af = fft(a, false);
        let prod: Vec<Complex> = af.iter().zip(&kf).map(|(x, k)| x.mul(*k)).collect();
        fft(&prod, true).iter().map(|c| c.re).collect()
    };
    let (num, den) = (conv(&ux), conv(&uu));
    let expect: Vec<f64> = (0..bins)
        .map(|b| {
            if den[b] > 1e-12 {
                num[b] / den[b]
            } else {
                centre(b)
            }
        })
        .collect();
    r.iter()
        .map(|&x| {
            let p = ((x as f64 - lo) / width).clamp(0.0, (bins - 1) as f64);
            let b = (p.floor() as usize).min(bins - 2);
            let t = p - b as f64;
            (expect[b] * (1.0 - t) + expect[b + 1] * t) as f32
        })
        .collect()
}

#[derive(Clone, Copy, Debug, Default)]
struct Complex {
    re: f64,
    im: f64,
}

impl Complex {
    fn real(re: f64) -> Complex {
        Complex { re, im: 0.0 }
    }
    fn mul(self, o: Complex) -> Complex {
        Complex {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    fn conj(self) -> Complex {
        Complex {
            re: self.re,
            im: -self.im,
        }
    }
    fn scale(self, s: f64) -> Complex {
        Complex {
            re: self.re * s,
            im: self.im * s,
        }
    }
    fn norm2(self) -> f64 {
        self.re * self.re + self.im * self.im
    }
}

/// Radix-2 FFT of a power-of-two-long sequence; `inverse` also divides by the length.
fn fft(input: &[Complex], inverse: bool) -> Vec<Complex> {
    let n = input.len();
    let bits = n.trailing_zeros();
    let mut a: Vec<Complex> = (0..n)
        .map(|i| input[i.reverse_bits() >> (usize::BITS - bits)])
        .collect();
    let sign = if inverse { 1.0 } else { -1.0 };
    let mut len = 2;
    while len <= n {
        let ang = sign * 2.0 * std::f64::consts::PI / len as f64;
        for start in (0..n).step_by(len) {
            for t in 0..len / 2 {
                let w = Complex {
                    re: (ang * t as f64).cos(),
                    im: (ang * t as f64).sin(),
                };
                let u = a[start + t];
                let v = a[start + t + len / 2].mul(w);
                a[start + t] = Complex {
                    re: u.re + v.re,
                    im: u.im + v.im,
                };
                a[start + t + len / 2] = Complex {
                    re: u.re - v.re,
                    im: u.im - v.im,
                };
            }
        }
        len *= 2;
    }
    if inverse {
        a.iter_mut().for_each(|c| *c = c.scale(1.0 / n as f64));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Affine;

    fn vol(data: Vec<f32>, shape: [usize; 3], vox: f64) -> Volume {
        let mut a = Affine::identity();
        for ax in 0..3 {
            a[(ax, ax)] = vox;
        }
        Volume::new(data, shape, a)
    }

    /// A phantom with three tissue classes (labels 1–3) inside a ball, 0 outside.
    fn phantom(n: usize) -> (Vec<u8>, Vec<f32>) {
        let c = n as f64 / 2.0;
        let mut labels = vec![0u8; n * n * n];
        for k in 0..n {
            for j in 0..n {
                for i in 0..n {
                    let (x, y, z) = (i as f64 - c, j as f64 - c, k as f64 - c);
                    let r = (x * x + y * y + z * z).sqrt();
                    if r < 0.45 * n as f64 {
                        // Interleaved slabs and shells so no smooth field mimics the classes.
                        let slab = ((x / 4.0).floor() as i64 + (z / 5.0).floor() as i64) & 1;
                        labels[i + n * (j + n * k)] = if r < 0.2 * n as f64 {
                            1
                        } else {
                            2 + slab as u8
                        };
                    }
                }
            }
        }
        let values = labels
            .iter()
            .map(|&l| [0.0, 40.0, 80.0, 110.0][l as usize])
            .collect();
        (labels, values)
    }

    fn class_cv(v: &[f32], labels: &[u8], class: u8) -> f64 {
        let xs: Vec<f64> = v
            .iter()
            .zip(labels)
            .filter(|&(_, &l)| l == class)
            .map(|(&x, _)| x as f64)
            .collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        var.sqrt() / mean
    }

    #[test]
    fn bias_correction_removes_a_known_smooth_field() {
        let n = 64;
        let (labels, clean) = phantom(n);
        let mut biased = clean.clone();
        let mut noise = 12345u64;
        for k in 0..n {
            for j in 0..n {
                for i in 0..n {
                    let (x, y) = (i as f64 / n as f64 - 0.5, j as f64 / n as f64 - 0.5);
                    let field = (0.5 * x + 0.3 * y - 0.4 * x * y).exp() as f32;
                    noise = noise
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let jitter = 1.0 + 0.02 * (((noise >> 33) as f32 / (1u64 << 31) as f32) - 0.5);
                    biased[i + n * (j + n * k)] *= field * jitter;
                }
            }
        }
        let v = vol(biased, [n; 3], 3.0);
        let mask = v.with_data(labels.iter().map(|&l| (l > 0) as u8 as f32).collect());
        let out = bias_correct(&v, Some(&mask), &BiasParams::default()).unwrap();
        let cvs: Vec<(f64, f64)> = (1..=3)
            .map(|c| {
                let before = class_cv(&v.data, &labels, c);
                (before, class_cv(&out.corrected.data, &labels, c))
            })
            .collect();
        for (before, after) in &cvs {
            assert!(*after < 0.2 * before, "{cvs:?}");
        }
    }

    #[test]
    fn histogram_matching_maps_quantiles_onto_the_reference() {
        let n = 20usize.pow(3);
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % n) as f32 / n as f32).collect();
        // The reference is a nonlinear, increasing function of a similar uniform variable.
        let r: Vec<f32> = (0..n)
            .map(|i| 10.0 + 100.0 * ((i * 104729) % n) as f32 / n as f32)
            .collect();
        let r: Vec<f32> = r.iter().map(|x| x * x / 110.0).collect();
        let (vv, rv) = (vol(v, [20; 3], 1.0), vol(r, [20; 3], 1.0));
        let out = histogram_match(&vv, &rv, None, None).unwrap();
        let ho = Histogram::new(&out.data, None).unwrap();
        let hr = Histogram::new(&rv.data, None).unwrap();
        let range = hr.percentile(100.0) - hr.percentile(0.0);
        for p in [1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0] {
            let (a, b) = (ho.percentile(p), hr.percentile(p));
            assert!((a - b).abs() < 0.01 * range, "p{p}: {a} vs {b}");
        }
    }

    #[test]
    fn zscore_gives_mean_zero_and_unit_spread_inside_the_mask() {
        let data: Vec<f32> = (0..1000).map(|i| (i % 37) as f32 * 3.0 + 5.0).collect();
        let v = vol(data, [10; 3], 1.0);
        let mask = v.with_data((0..1000).map(|i| (i < 600) as u8 as f32).collect());
        let z = zscore(&v, Some(&mask)).unwrap();
        let inside: Vec<f64> = z.data[..600].iter().map(|&x| x as f64).collect();
        let mean = inside.iter().sum::<f64>() / 600.0;
        let sd = (inside.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 600.0).sqrt();
        assert!(mean.abs() < 1e-5 && (sd - 1.0).abs() < 1e-5, "{mean} {sd}");
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let mut v: Vec<f32> = (0..=100).rev().map(|x| x as f32).collect();
        assert_eq!(percentile(&mut v, 0.5), 0.5);
        assert_eq!(percentile(&mut v, 99.5), 99.5);
        let mut w = vec![3.0, 1.0, 2.0, 4.0];
        assert!((percentile(&mut w, 50.0) - 2.5).abs() < 1e-12);
        assert!((percentile(&mut w, 10.0) - 1.3).abs() < 1e-12);
        assert!(percentile(&mut [], 50.0).is_nan());
    }

    #[test]
    fn percentile_rescale_lands_in_unit_range() {
        let v = vol((0..1000).map(|i| i as f32).collect(), [10; 3], 1.0);
        let out = percentile_rescale(&v, 1.0, 99.0, None).unwrap();
        assert!(out.data.iter().all(|&x| (0.0..=1.0).contains(&x)));
        assert!((out.data[500] - 0.5).abs() < 0.01);
        assert!(percentile_rescale(&v, 50.0, 10.0, None).is_err());
    }

    #[test]
    fn empty_masks_and_constant_images_are_errors() {
        let v = vol(vec![3.0; 27], [3; 3], 1.0);
        let none = v.zeros_like();
        assert!(matches!(
            zscore(&v, None),
            Err(IntensityError::Constant { .. })
        ));
        assert!(matches!(
            zscore(&v, Some(&none)),
            Err(IntensityError::Empty { .. })
        ));
        assert!(bias_correct(&v, Some(&none), &BiasParams::default()).is_err());
        let other = vol(vec![0.0; 8], [2; 3], 1.0);
        assert!(matches!(
            histogram_match(&v, &v, Some(&other), None),
            Err(IntensityError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn fft_round_trips() {
        let x: Vec<Complex> = (0..16).map(|i| Complex::real((i * i % 7) as f64)).collect();
        let back = fft(&fft(&x, false), true);
        assert!(
            x.iter()
                .zip(&back)
                .all(|(a, b)| (a.re - b.re).abs() < 1e-9 && b.im.abs() < 1e-9)
        );
    }
}
