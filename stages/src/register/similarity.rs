//! Similarity measures between the fixed image and the warped moving image, each returning
//! its value and its derivative with respect to the warped image.
//!
//! The optimisers never differentiate through `grid_sample`: they multiply the derivative
//! returned here by the warped image's spatial gradient (chain rule by hand), which costs a
//! few element-wise passes instead of an autograd graph over the whole volume.
//!
//! - Local NCC uses five box-summed maps (I, J, I², J², IJ; separable box sums) and, for the
//!   exact derivative, three more box sums of per-window coefficients (the box filter is its
//!   own adjoint). The variance floor is a fraction of each image's global variance, so the
//!   measure behaves the same on images in [0, 1], [0, 255] or z-scores — a fixed floor (as
//!   in FireANTs) makes the measure collapse on images in [0, 1].
//! - MSE is the mean squared difference; it assumes intensities on one scale, which the
//!   caller arranges by robust normalisation.
//! - MI uses Parzen-window histograms; its derivative comes from autograd on the metric alone
//!   (never through the sampler), on at most [`MI_MAX_SAMPLES`] voxels taken at a stride.

use tch::{Kind, Tensor};

use super::ops::{box_sum, scalar};
use crate::stage::StageError;

/// Which similarity measure to optimise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Local normalised cross-correlation over a cubic window (same contrast, robust to bias).
    Ncc,
    /// Mean squared error (same contrast and scale).
    Mse,
    /// Mutual information (different contrasts); affine stage only.
    Mi,
}

/// Fraction of the global variance added to every local variance in local NCC.
const NCC_VARIANCE_FLOOR: f64 = 1e-3;
/// Most voxels the MI histogram is built from.
pub(crate) const MI_MAX_SAMPLES: i64 = 200_000;
/// Histogram bins of MI.
const MI_BINS: i64 = 32;

/// Similarity values (lower is better) and the derivative w.r.t. each warped voxel.
pub(crate) struct Evaluated {
    /// The loss of each batch item, in batch order (one value for an unbatched call).
    pub values: Vec<f64>,
    /// `∂loss/∂warped`, same shape as the warped image; each item's own loss differentiated.
    pub grad: Tensor,
}

impl Evaluated {
    /// The loss of an unbatched call (the mean over the items of a batch).
    pub(crate) fn value(&self) -> f64 {
        self.values.iter().sum::<f64>() / self.values.len().max(1) as f64
    }
}

/// Evaluates `loss` between `fixed` and `warped` (`[B, 1, D, H, W]`), weighting voxels by
/// `weight` (same shape, or `None` for all voxels equally), without padding.
#[cfg(test)]
fn evaluate(
    loss: Loss,
    fixed: &Tensor,
    warped: &Tensor,
    weight: Option<&Tensor>,
    window: i64,
) -> Result<Evaluated, StageError> {
    let items = Items::new(fixed, None)?;
    match loss {
        Loss::Ncc => FixedNcc::new(fixed, weight, &items, window)?.evaluate(&items, warped),
        Loss::Mse => mse(fixed, warped, weight, &items),
        Loss::Mi => mutual_information(fixed, warped, weight),
    }
}

/// The items of a batch: each one's own voxels (a batch pads smaller grids with zeros to one
/// shape) and how many there are. Every sum a measure takes is a per-item sum over those
/// voxels, so an item's value and derivative are what it would get on its own.
pub(crate) struct Items {
    /// `[B, 1, D, H, W]`: 1 on an item's own voxels, 0 on padding; `None` without padding.
    valid: Option<Tensor>,
    /// Own voxels per item, `[B]` (f64).
    counts: Tensor,
}

impl Items {
    /// The items of `like` (`[B, 1, D, H, W]`), with `valid` marking own voxels if padded.
    pub(crate) fn new(like: &Tensor, valid: Option<&Tensor>) -> Result<Items, StageError> {
        let counts = match valid {
            Some(v) => per_item_sum(v)?,
            None => {
                let size = like.size();
                let each = size[1..].iter().product::<i64>() as f64;
                Tensor::f_full([size[0]], each, (Kind::Double, like.device()))?
            }
        };
        Ok(Items {
            valid: valid.map(Tensor::shallow_clone),
            counts,
        })
    }

    /// `x` with padding zeroed.
    fn own(&self, x: &Tensor) -> Result<Tensor, StageError> {
        Ok(match &self.valid {
            Some(v) => x.f_mul(v)?,
            None => x.shallow_clone(),
        })
    }

    /// The per-item weight totals: the weights' sums, or the own-voxel counts.
    fn totals(&self, weight: Option<&Tensor>) -> Result<Tensor, StageError> {
        Ok(match weight {
            Some(w) => per_item_sum(w)?,
            None => self.counts.shallow_clone(),
        }
        .f_clamp_min(1e-12)?)
    }

    /// Per-item variance of `x` over own voxels (padding must be zero), floored, as a
    /// `[B, 1, 1, 1, 1]` float tensor ready to broadcast.
    fn variance(&self, x: &Tensor) -> Result<Tensor, StageError> {
        let mean = per_item_sum(x)?.f_div(&self.counts)?;
        let var = per_item_sum(&x.f_square()?)?
            .f_div(&self.counts)?
            .f_sub(&mean.f_square()?)?
            .f_clamp_min(1e-12)?;
        broadcastable(&var, x.kind())
    }
}

/// Sum over every dimension but the first, `[B]` in f64.
///
/// Summed in the input's own kind (libtorch accumulates float sums in double on a CPU), then
/// widened: asking for a double sum would first copy the whole volume to double.
fn per_item_sum(x: &Tensor) -> Result<Tensor, StageError> {
    Ok(x.f_sum_dim_intlist(&[1i64, 2, 3, 4][..], false, x.kind())?
        .f_to_kind(Kind::Double)?)
}

/// A `[B]` tensor as `[B, 1, 1, 1, 1]` of `kind`.
fn broadcastable(x: &Tensor, kind: Kind) -> Result<Tensor, StageError> {
    Ok(x.f_to_kind(kind)?.f_view([-1, 1, 1, 1, 1])?)
}

/// A `[B]` tensor's values.
fn values(x: &Tensor) -> Result<Vec<f64>, StageError> {
    Ok(Vec::<f64>::try_from(
        &x.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?,
    )?)
}

fn weighted(x: Tensor, weight: Option<&Tensor>) -> Result<Tensor, StageError> {
    Ok(match weight {
        Some(w) => x.f_mul(w)?,
        None => x,
    })
}

/// The fixed image's side of local NCC, computed once per level: its window sums, window
/// means and floored variances, and the weight totals. Greedy iterations then box-sum only
/// the three maps that involve the warped image (J, J², IJ) instead of five.
pub(crate) struct FixedNcc {
    fixed: Tensor,
    weight: Option<Tensor>,
    r: i64,
    n: f64,
    si: Tensor,
    mean_i: Tensor,
    b: Tensor,
    /// `−1 / Σ w` per item, `[B, 1, 1, 1, 1]`.
    scale: Tensor,
    totals: Tensor,
}

impl FixedNcc {
    /// Precomputes the statistics of `fixed` for windows of `window` voxels.
    pub(crate) fn new(
        fixed: &Tensor,
        weight: Option<&Tensor>,
        items: &Items,
        window: i64,
    ) -> Result<FixedNcc, StageError> {
        let r = (window / 2).max(1);
        let n = ((2 * r + 1) as f64).powi(3);
        let sums = box_sum(
            &Tensor::f_cat(&[fixed.shallow_clone(), fixed.f_square()?], 1)?,
            r,
        )?;
        let si = sums.f_narrow(1, 0, 1)?.f_contiguous()?;
        let sii = sums.f_narrow(1, 1, 1)?;
        let mean_i = si.f_div_scalar(n)?;
        let floor = items
            .variance(fixed)?
            .f_mul_scalar(n * NCC_VARIANCE_FLOOR)?;
        let b = sii
            .f_sub(&si.f_mul(&mean_i)?)?
            .f_clamp_min(0.0)?
            .f_add(&floor)?;
        let totals = items.totals(weight)?;
        Ok(FixedNcc {
            fixed: fixed.shallow_clone(),
            weight: weight.map(Tensor::shallow_clone),
            r,
            n,
            si,
            mean_i,
            b,
            scale: broadcastable(&totals.f_reciprocal()?.f_neg()?, fixed.kind())?,
            totals,
        })
    }

    /// Local NCC: `−Σ_c w_c · A_c² / (B_c · C_c) / Σ w`, with `A`, `B`, `C` the windowed
    /// covariance and variances (plus the floor) at centre `c`, and its exact derivative;
    /// per item of a batch. `warped` must be zero on padding ([`Items::own`]).
    fn evaluate(&self, items: &Items, warped: &Tensor) -> Result<Evaluated, StageError> {
        let (i, j, n, r) = (&self.fixed, warped, self.n, self.r);
        let weight = self.weight.as_ref();
        let sums = box_sum(
            &Tensor::f_cat(&[j.shallow_clone(), j.f_square()?, i.f_mul(j)?], 1)?,
            r,
        )?;
        let part = |c: i64| sums.f_narrow(1, c, 1);
        let (sj, sjj, sij) = (part(0)?, part(1)?, part(2)?);
        let mean_j = sj.f_div_scalar(n)?;
        let a = sij.f_sub(&self.si.f_mul(&mean_j)?)?;
        let floor = items.variance(j)?.f_mul_scalar(n * NCC_VARIANCE_FLOOR)?;
        let c = sjj
            .f_sub(&sj.f_mul(&mean_j)?)?
            .f_clamp_min(0.0)?
            .f_add(&floor)?;
        let bc = self.b.f_mul(&c)?;
        let cc = a.f_square()?.f_div(&bc)?;
        let value = per_item_sum(&weighted(cc, weight)?)?
            .f_div(&self.totals)?
            .f_neg()?;

        // ∂cc_c/∂J(x) = α_c (I(x) − Ī_c) − β_c (J(x) − J̄_c) for every x in window c, with
        // α = 2A/(BC) and β = α·A/C; summing over windows is a box sum of the coefficients.
        let alpha = weighted(a.f_mul_scalar(2.0)?.f_div(&bc)?, weight)?;
        let beta = alpha.f_mul(&a)?.f_div(&c)?;
        let offset = beta.f_mul(&mean_j)?.f_sub(&alpha.f_mul(&self.mean_i)?)?;
        let back = box_sum(&Tensor::f_cat(&[alpha, beta, offset], 1)?, r)?;
        let grad = i
            .f_mul(&back.f_narrow(1, 0, 1)?)?
            .f_sub(&j.f_mul(&back.f_narrow(1, 1, 1)?)?)?
            .f_add(&back.f_narrow(1, 2, 1)?)?
            .f_mul(&self.scale)?;
        Ok(Evaluated {
            values: values(&value)?,
            grad: items.own(&grad)?,
        })
    }
}

/// A similarity measure bound to one fixed image (or a batch of them, with weight maps) for
/// many evaluations: local NCC keeps the fixed images' window statistics, computed once
/// instead of per step.
pub(crate) struct Measure {
    kind: MeasureKind,
    items: Items,
}

enum MeasureKind {
    /// Local NCC with its precomputed fixed side.
    Ncc(FixedNcc),
    /// Any other measure, evaluated afresh each time.
    Other {
        loss: Loss,
        fixed: Tensor,
        weight: Option<Tensor>,
    },
}

impl Measure {
    /// `loss` against `fixed` (`[B, 1, D, H, W]`), weighting voxels by `weight`; `valid`
    /// marks each item's own voxels when a batch was padded to one shape.
    ///
    /// # Errors
    /// If a tensor operation fails, or `loss` is MI on a batch (MI is unbatched).
    pub(crate) fn new(
        loss: Loss,
        fixed: &Tensor,
        weight: Option<&Tensor>,
        valid: Option<&Tensor>,
        window: i64,
    ) -> Result<Measure, StageError> {
        let items = Items::new(fixed, valid)?;
        if loss == Loss::Mi && fixed.size()[0] > 1 {
            return Err(StageError::Input("MI cannot evaluate a batch".into()));
        }
        let kind = match loss {
            Loss::Ncc => MeasureKind::Ncc(FixedNcc::new(fixed, weight, &items, window)?),
            loss => MeasureKind::Other {
                loss,
                fixed: fixed.shallow_clone(),
                weight: weight.map(Tensor::shallow_clone),
            },
        };
        Ok(Measure { kind, items })
    }

    /// The values and derivative for `warped` (its padding, if any, is ignored).
    pub(crate) fn evaluate(&self, warped: &Tensor) -> Result<Evaluated, StageError> {
        let own = self.items.own(warped)?;
        match &self.kind {
            MeasureKind::Ncc(ncc) => ncc.evaluate(&self.items, &own),
            MeasureKind::Other {
                loss: Loss::Mse,
                fixed,
                weight,
            } => mse(fixed, &own, weight.as_ref(), &self.items),
            MeasureKind::Other { fixed, weight, .. } => {
                mutual_information(fixed, &own, weight.as_ref())
            }
        }
    }
}

/// Local NCC of `warped` against `fixed` (see [`FixedNcc::evaluate`]), fixed statistics
/// included.
#[cfg(test)]
fn local_ncc(
    fixed: &Tensor,
    warped: &Tensor,
    weight: Option<&Tensor>,
    window: i64,
) -> Result<Evaluated, StageError> {
    evaluate(Loss::Ncc, fixed, warped, weight, window)
}

/// Mean squared error and its derivative, per item.
fn mse(
    fixed: &Tensor,
    warped: &Tensor,
    weight: Option<&Tensor>,
    items: &Items,
) -> Result<Evaluated, StageError> {
    let totals = items.totals(weight)?;
    let diff = warped.f_sub(fixed)?;
    let wdiff = items.own(&weighted(diff.shallow_clone(), weight)?)?;
    let value = per_item_sum(&wdiff.f_mul(&diff)?)?.f_div(&totals)?;
    let scale = broadcastable(&totals.f_reciprocal()?.f_mul_scalar(2.0)?, warped.kind())?;
    Ok(Evaluated {
        values: values(&value)?,
        grad: wdiff.f_mul(&scale)?,
    })
}

/// Parzen-window weights of `x` (values in about [0, 1]) over the histogram bins, `[N, B]`.
fn parzen(x: &Tensor) -> Result<Tensor, StageError> {
    let centres = Tensor::f_arange(MI_BINS, (Kind::Float, x.device()))?
        .f_add_scalar(0.5)?
        .f_div_scalar(MI_BINS as f64)?;
    let sigma = 1.0 / MI_BINS as f64;
    let w = x
        .f_clamp(0.0, 1.0)?
        .f_unsqueeze(1)?
        .f_sub(&centres.f_unsqueeze(0)?)?
        .f_square()?
        .f_mul_scalar(-0.5 / (sigma * sigma))?
        .f_exp()?;
    let norm = w
        .f_sum_dim_intlist(1, true, Kind::Float)?
        .f_clamp_min(1e-12)?;
    Ok(w.f_div(&norm)?)
}

/// Negative mutual information and its derivative (autograd on the histogram only).
fn mutual_information(
    fixed: &Tensor,
    warped: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Evaluated, StageError> {
    let count = fixed.numel() as i64;
    let stride = (count + MI_MAX_SAMPLES - 1) / MI_MAX_SAMPLES;
    let pick = |x: &Tensor| x.f_reshape([-1])?.f_slice(0, 0, count, stride);
    let f = pick(fixed)?;
    let wsel = match weight {
        Some(w) => pick(w)?,
        None => f.f_ones_like()?,
    };
    let m = pick(warped)?.f_detach()?.f_set_requires_grad(true)?;
    let (value, g) = tch::with_grad(|| -> Result<(f64, Tensor), StageError> {
        let pf = parzen(&f)?.f_mul(&wsel.f_unsqueeze(1)?)?;
        let pm = parzen(&m)?;
        let total = wsel.f_sum(Kind::Float)?.f_clamp_min(1e-12)?;
        let joint = pf
            .f_tr()?
            .f_matmul(&pm)?
            .f_div(&total)?
            .f_add_scalar(1e-10)?;
        let mf = joint.f_sum_dim_intlist(1, true, Kind::Float)?;
        let mm = joint.f_sum_dim_intlist(0, true, Kind::Float)?;
        let mi = joint
            .f_mul(&joint.f_log()?.f_sub(&mf.f_log()?)?.f_sub(&mm.f_log()?)?)?
            .f_sum(Kind::Float)?;
        let loss = mi.f_neg()?;
        let grads = Tensor::f_run_backward(&[&loss], &[&m], false, false)?;
        Ok((scalar(&loss)?, grads[0].shallow_clone()))
    })?;
    let grad = fixed.f_zeros_like()?;
    let mut flat = grad.f_view([-1])?.f_slice(0, 0, count, stride)?;
    flat.f_copy_(&g)?;
    Ok(Evaluated {
        values: vec![value],
        grad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Local NCC by autograd through plain tensor ops, as a reference for the hand-written
    /// derivative.
    fn reference_ncc_grad(i: &Tensor, j: &Tensor, w: &Tensor, window: i64) -> (f64, Tensor) {
        let j = j.detach().set_requires_grad(true);
        let loss = tch::with_grad(|| {
            let r = window / 2;
            let n = ((2 * r + 1) as f64).powi(3);
            let bx = |x: &Tensor| box_sum(x, r).unwrap();
            let (si, sj) = (bx(i), bx(&j));
            let a = bx(&(i * &j)) - &si * &sj / n;
            let b = (bx(&i.square()) - si.square() / n).clamp_min(0.0)
                + n * NCC_VARIANCE_FLOOR * i.var(false).double_value(&[]);
            let vj = j.detach().var(false).double_value(&[]);
            let c =
                (bx(&j.square()) - sj.square() / n).clamp_min(0.0) + n * NCC_VARIANCE_FLOOR * vj;
            -(a.square() / (b * c) * w).sum(Kind::Double) / w.sum(Kind::Double)
        });
        let g = Tensor::run_backward(&[&loss], &[&j], false, false);
        (loss.double_value(&[]), g[0].shallow_clone())
    }

    #[test]
    fn local_ncc_derivative_matches_autograd() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let i = Tensor::rand([1, 1, 6, 7, 8], opts);
        let j = &i * 0.5 + Tensor::rand([1, 1, 6, 7, 8], opts) * 0.5;
        let w = Tensor::rand([1, 1, 6, 7, 8], opts);
        let got = tch::no_grad(|| local_ncc(&i, &j, Some(&w), 3).unwrap());
        let (value, grad) = reference_ncc_grad(&i, &j, &w, 3);
        assert!(
            (got.value() - value).abs() < 1e-9,
            "{} vs {value}",
            got.value()
        );
        assert!(got.grad.allclose(&grad, 1e-6, 1e-9, false));
    }

    #[test]
    fn ncc_is_scale_invariant_and_best_for_identical_images() {
        let i = Tensor::rand([1, 1, 8, 8, 8], (Kind::Float, Device::Cpu));
        let same = local_ncc(&i, &i, None, 5).unwrap().value();
        let scaled = local_ncc(&(&i * 250.0), &(&i * 3.0), None, 5)
            .unwrap()
            .value();
        let other = Tensor::rand([1, 1, 8, 8, 8], (Kind::Float, Device::Cpu));
        let worse = local_ncc(&i, &other, None, 5).unwrap().value();
        assert!(same < -0.99 && (same - scaled).abs() < 1e-4 && worse > -0.5);
    }

    #[test]
    fn mi_prefers_aligned_images_and_has_a_gradient() {
        let i = Tensor::rand([1, 1, 10, 10, 10], (Kind::Float, Device::Cpu));
        let aligned = mutual_information(&i, &(1.0 - &i), None).unwrap();
        let other = Tensor::rand([1, 1, 10, 10, 10], (Kind::Float, Device::Cpu));
        let random = mutual_information(&i, &other, None).unwrap();
        assert!(aligned.value() < random.value() - 0.5);
        assert!(random.grad.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }
}
