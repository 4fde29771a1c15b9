//! Atlas-to-subject registration on libtorch tensors, one code path for CPU and CUDA.
//!
//! [`register`] aligns a moving scan (the atlas) to a fixed scan (the subject) and returns a
//! [`Transform`] in the meaning [`crate::resample::map_point`] defines: fixed world point
//! `p ↦ A·(p + u(p))`, `u` in world mm on the fixed registration grid. Steps:
//!
//! 1. both images are scaled so their 99th percentile of positive voxels is 1 (every measure
//!    then sees the same range whatever the input scale) and resampled, after a Gaussian
//!    anti-aliasing blur, onto grids of `resolution_mm` spacing in their own orientation;
//! 2. [`affine`]: centres of mass and principal axes, a search over axis rotations, then
//!    rigid and affine refinement, coarse to fine (NCC, MSE or MI);
//! 3. [`greedy`]: diffeomorphic greedy composition with Gaussian-smoothed updates and field,
//!    local NCC computed with separable box sums, coarse to fine, with early stopping — or,
//!    when `model` is set, one forward pass of a TorchScript network ([`learned`]);
//! 4. [`field`]: Jacobian statistics, the inverse mapping by fixed-point iteration, and
//!    label transfer by one-hot linear interpolation ([`warp_labels_linear`]).
//!
//! All similarity gradients are computed by hand (derivative w.r.t. the warped image times
//! its spatial gradient) under `no_grad`: autograd through `grid_sample` costs seconds per
//! step on a CPU at 2 mm. Only MI uses autograd, on its histogram alone.
//!
//! With `batch = N` on the node, the engine hands the stage up to N subjects at once and
//! their deformable stages run as one batch on the device ([`register_batch`]): every
//! tensor holds all of them, padded to one shape, so a GPU runs one kernel where it ran N.
//! Limitation: the moving scan's mask is ignored; only the fixed mask restricts the
//! similarity.

mod affine;
mod field;
mod greedy;
mod learned;
mod ops;
mod pyramid;
mod similarity;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Tensor};

pub use field::warp_labels_linear;
pub use learned::Model;
pub use similarity::Loss;

use crate::registry::{BuildError, StageConfig};
use crate::stage::{Context, Inputs, Scan, Stage, StageError, StageKind, Transform, Value};
use crate::volume::{Affine, Grid, Volume};
use greedy::Field;
use ops::{
    apply_affine, grid_with_spacing, index_points, resample_grid, sample, scalar, tensor_volume,
    volume_tensor, world_to_normalised,
};
use pyramid::OnGrid;

/// Makes glibc keep freed memory for reuse instead of handing large blocks back to the
/// kernel; call it once, early in `main`, before other threads start.
///
/// Every registration step allocates tensors of tens of megabytes (a 1 mm field is about
/// 80 MB). By default glibc serves those with fresh `mmap`s and unmaps them on free, so each
/// step pays page faults and the kernel zeroing every page: about 40 % of a 1 mm iteration
/// on a CPU. With `mmap` off and a high trim threshold the same blocks are reused step after
/// step. The cost: the process keeps its peak heap until it exits. No effect on CUDA memory
/// or on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; it is called before other threads
    // allocate (the caller's contract), and failure leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Most iterations accepted per level: more can only be a typo (a 1 mm level costs about a
/// second per iteration on a CPU).
const MAX_ITERATIONS: usize = 10_000;

/// Finest registration grid spacing accepted (mm).
const MIN_RESOLUTION_MM: f64 = 0.25;
/// Coarsest registration grid spacing accepted (mm).
const MAX_RESOLUTION_MM: f64 = 16.0;

/// Largest `deformable.field_shrink` accepted: a field 8 times coarser than a 2 mm level is
/// already a 16 mm grid, smoother than any brain deformation worth finding, and a level
/// needs at least 8 field voxels along each axis (64 image voxels at 8), so larger factors
/// would only apply to the largest images and silently not at all elsewhere.
pub const MAX_FIELD_SHRINK: u32 = 8;

/// Where the tensors live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device; an error if there is none.
    Cuda,
}

impl DeviceChoice {
    /// The libtorch device this choice means on this machine.
    ///
    /// # Errors
    /// `Cuda` when no CUDA device is available.
    pub fn resolve(self) -> Result<Device, StageError> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceChoice::Cuda => Err(StageError::Input(
                "device = \"cuda\" but libtorch sees no CUDA device".into(),
            )),
        }
    }

    /// Why this choice cannot work on this machine, if it cannot: `cuda` where libtorch sees
    /// no CUDA device. Stages check it when they are built, so `validate` names the node and
    /// a run stops before its first subject instead of failing every subject in turn.
    pub fn unavailable(self) -> Option<String> {
        (self == DeviceChoice::Cuda && !tch::Cuda::is_available()).then(|| {
            "`device` is \"cuda\" but libtorch sees no CUDA device on this machine; use \
             \"auto\" (CUDA when there is one, else the CPU) or run where CUDA is"
                .to_string()
        })
    }
}

/// Settings of the affine stage.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AffineConfig {
    /// Shrink factors relative to the registration grid, coarse to fine. Empty (the default):
    /// the factors that give 8 mm and 4 mm grids, whatever `resolution_mm` is — an affine
    /// needs no finer detail, and at 1 mm a 2 mm affine level would cost more than the rest.
    pub levels: Vec<u32>,
    /// Iterations per level (for the rigid pass, then again for the affine pass).
    pub iterations: Vec<usize>,
    /// Similarity measure.
    pub loss: Loss,
    /// Local NCC window (voxels, odd, at least 3).
    pub window: i64,
    /// Adam step, as a fraction of the level's voxel size (mm per iteration).
    pub step: f64,
    /// Stop a level when the loss improved by less than this (relative) over 10 iterations.
    pub tolerance: f64,
    /// Rigid iterations spent on each of the three best initial candidates.
    pub search_iterations: usize,
    /// Also try mirror-image initialisations (det < 0).
    pub allow_reflection: bool,
}

impl Default for AffineConfig {
    fn default() -> AffineConfig {
        AffineConfig {
            levels: Vec::new(),
            iterations: vec![100, 50],
            loss: Loss::Ncc,
            window: 5,
            step: 0.1,
            tolerance: 1e-4,
            search_iterations: 15,
            allow_reflection: false,
        }
    }
}

/// Settings of the deformable stage.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeformableConfig {
    /// Run it at all (false: affine only).
    pub enabled: bool,
    /// Shrink factors relative to the registration grid, coarse to fine.
    pub levels: Vec<u32>,
    /// Iterations per level.
    pub iterations: Vec<usize>,
    /// Similarity measure (`ncc` or `mse`).
    pub loss: Loss,
    /// Largest Adam step, in voxels of the level.
    pub step: f64,
    /// Gaussian σ (voxels) applied to each update.
    pub update_sigma: f64,
    /// Gaussian σ (voxels) applied to the whole field after each update.
    pub field_sigma: f64,
    /// Local NCC window (voxels, odd, at least 3).
    pub window: i64,
    /// Stop a level when the loss improved by less than this (relative) over 10 iterations.
    pub tolerance: f64,
    /// The field lives on a grid this many times coarser than each level's images (1: the
    /// same grid). The similarity still sees every voxel; the field's own work (Adam, the
    /// Gaussians, the composition) shrinks by the cube of it. A displacement is smooth at the
    /// scale of a few voxels anyway, so 2 costs little accuracy. From 1 to
    /// [`MAX_FIELD_SHRINK`] (8). A level keeps at least 8 field voxels along each axis: where
    /// the factor would leave fewer, that level uses the largest factor that leaves enough
    /// (1 for a level under 16 voxels along an axis) and logs a warning naming it.
    pub field_shrink: u32,
}

impl Default for DeformableConfig {
    fn default() -> DeformableConfig {
        DeformableConfig {
            enabled: true,
            levels: vec![4, 2, 1],
            iterations: vec![200, 100, 10],
            loss: Loss::Ncc,
            step: 0.35,
            update_sigma: 0.7,
            field_sigma: 0.35,
            window: 5,
            tolerance: 1e-4,
            field_shrink: 2,
        }
    }
}

/// Parameters of the `register` stage.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegisterConfig {
    /// `auto`, `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// Spacing (mm) of the registration grid the fixed image is resampled to.
    pub resolution_mm: f64,
    /// Affine stage settings.
    pub affine: AffineConfig,
    /// Deformable stage settings.
    pub deformable: DeformableConfig,
    /// A TorchScript model predicting the displacement instead of the deformable stage.
    pub model: Option<PathBuf>,
    /// Compute the inverse transform (subject → atlas) too. Off by default: the fixed-point
    /// inversion costs about as much as the finest deformable level on a CPU, and the bundled
    /// stages only warp atlas data onto the subject; a pipeline that maps subject data to the
    /// atlas sets it.
    pub inverse: bool,
}

impl Default for RegisterConfig {
    fn default() -> RegisterConfig {
        RegisterConfig {
            device: DeviceChoice::Auto,
            resolution_mm: 2.0,
            affine: AffineConfig::default(),
            deformable: DeformableConfig::default(),
            model: None,
            inverse: false,
        }
    }
}

impl RegisterConfig {
    /// The affine shrink factors: `affine.levels`, or those giving grids of 8 and 4 mm.
    pub fn affine_levels(&self) -> Vec<u32> {
        if !self.affine.levels.is_empty() {
            return self.affine.levels.clone();
        }
        let res = if self.resolution_mm > 0.0 {
            self.resolution_mm
        } else {
            1.0
        };
        let mut levels: Vec<u32> = [8.0, 4.0]
            .map(|mm: f64| (mm / res).round().max(1.0) as u32)
            .to_vec();
        levels.dedup();
        // As many levels as iterations were given (at least one), coarsest first.
        levels.resize(
            self.affine.iterations.len().max(1),
            *levels.last().unwrap_or(&1),
        );
        levels
    }

    /// Checks the settings make sense together; returns every problem found.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.resolution_mm > 0.0 && self.resolution_mm.is_finite()) {
            out.push(format!(
                "resolution_mm must be positive, got {}",
                self.resolution_mm
            ));
        }
        let a = &self.affine;
        if a.iterations.is_empty() || a.iterations.len() != self.affine_levels().len() {
            out.push(format!(
                "affine.levels ({} given) and affine.iterations ({} given) must be equally long \
                 (levels may be left out for 8 and 4 mm)",
                a.levels.len(),
                a.iterations.len()
            ));
        }
        let d = &self.deformable;
        if d.enabled && (d.levels.is_empty() || d.levels.len() != d.iterations.len()) {
            out.push(
                "deformable.levels and deformable.iterations must be non-empty and equally long"
                    .into(),
            );
        }
        let positive = |name: &str, v: f64, out: &mut Vec<String>| {
            if !(v.is_finite() && v > 0.0) {
                out.push(format!("{name} must be a positive number, got {v}"));
            }
        };
        let non_negative = |name: &str, v: f64, out: &mut Vec<String>| {
            if !(v.is_finite() && v >= 0.0) {
                out.push(format!("{name} must be zero or more, got {v}"));
            }
        };
        positive("deformable.step", d.step, &mut out);
        positive("affine.step", a.step, &mut out);
        non_negative("deformable.update_sigma", d.update_sigma, &mut out);
        non_negative("deformable.field_sigma", d.field_sigma, &mut out);
        non_negative("deformable.tolerance", d.tolerance, &mut out);
        non_negative("affine.tolerance", a.tolerance, &mut out);
        if self.resolution_mm.is_finite()
            && !(MIN_RESOLUTION_MM..=MAX_RESOLUTION_MM).contains(&self.resolution_mm)
        {
            out.push(format!(
                "resolution_mm must be between {MIN_RESOLUTION_MM} and {MAX_RESOLUTION_MM} mm, got {}",
                self.resolution_mm
            ));
        }
        for (name, levels) in [
            ("affine.levels", &a.levels),
            ("deformable.levels", &d.levels),
        ] {
            if levels.windows(2).any(|w| w[0] < w[1]) {
                out.push(format!(
                    "{name} must go from coarse to fine (largest factor first), got {levels:?}"
                ));
            }
        }
        if a.iterations
            .iter()
            .chain(&d.iterations)
            .any(|&n| n > MAX_ITERATIONS)
        {
            out.push(format!(
                "iterations must be at most {MAX_ITERATIONS} per level (the optimisers stop \
                 on convergence long before)"
            ));
        }
        if !(1..=MAX_FIELD_SHRINK).contains(&d.field_shrink) {
            out.push(format!(
                "deformable.field_shrink must be from 1 to {MAX_FIELD_SHRINK}, got {}",
                d.field_shrink
            ));
        }
        if a.levels.iter().chain(&d.levels).any(|&f| f == 0) {
            out.push("level factors must be at least 1".into());
        }
        if d.loss == Loss::Mi {
            out.push("deformable.loss = \"mi\" is not supported; use \"ncc\" or \"mse\"".into());
        }
        for (name, window) in [("affine.window", a.window), ("deformable.window", d.window)] {
            if window < 3 || window % 2 == 0 {
                // An even window would be used as the next odd one (the window is centred).
                out.push(format!(
                    "{name} must be an odd number of voxels, at least 3, got {window}"
                ));
            }
        }
        out
    }
}

/// The `register` stage: inputs `[moving (atlas) scan, fixed (subject) scan]`, output a
/// [`Value::Transform`] from the subject's space to the atlas's.
pub struct RegisterStage {
    config: RegisterConfig,
    model: Option<Arc<Model>>,
}

impl RegisterStage {
    /// A stage with `config`, loading its model (if any) onto the configured device.
    ///
    /// # Errors
    /// If the configuration is inconsistent or the model cannot be loaded.
    pub fn new(config: RegisterConfig) -> Result<RegisterStage, StageError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StageError::Input(problems.join("; ")));
        }
        let model = match &config.model {
            Some(path) => Some(Model::load(path, config.device.resolve()?)?),
            None => None,
        };
        Ok(RegisterStage { config, model })
    }
}

impl Stage for RegisterStage {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Transform)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        use crate::stage::ValueKind::Scan;
        Some(
            crate::stage::InputSpec::of(
                &[Scan, Scan],
                "[atlas (moving) scan, subject (fixed) scan]",
            )
            .subject_at(&[1]),
        )
    }

    fn kind(&self) -> StageKind {
        StageKind::Compute
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let moving = inputs.scan(0)?;
        let fixed = inputs.scan(1)?;
        let device = self.config.device.resolve()?;
        let t = tch::no_grad(|| run(moving, fixed, &self.config, self.model.as_deref(), device))?;
        Ok(Value::Transform(Arc::new(t)))
    }

    fn batches(&self) -> bool {
        true
    }

    /// Subjects registered to the same atlas scan (the usual case: one constant atlas) form
    /// one batch; a subject with its own atlas runs alone.
    fn process_batch(&self, items: &[(Context<'_>, Inputs<'_>)]) -> Vec<Result<Value, StageError>> {
        let mut out: Vec<Option<Result<Value, StageError>>> = items.iter().map(|_| None).collect();
        let device = match self.config.device.resolve() {
            Ok(d) => d,
            Err(e) => return fail_all(items.len(), &e),
        };
        // (atlas scan, [(item, subject scan)]).
        type Group<'a> = (&'a Arc<Scan>, Vec<(usize, &'a Scan)>);
        let mut groups: Vec<Group<'_>> = Vec::new();
        for (n, (_, inputs)) in items.iter().enumerate() {
            match (inputs.scan(0), inputs.scan(1)) {
                (Ok(moving), Ok(fixed)) => {
                    match groups.iter_mut().find(|(m, _)| Arc::ptr_eq(m, moving)) {
                        Some((_, members)) => members.push((n, fixed)),
                        None => groups.push((moving, vec![(n, fixed)])),
                    }
                }
                (Err(e), _) | (_, Err(e)) => out[n] = Some(Err(e)),
            }
        }
        for (moving, members) in groups {
            let fixed: Vec<&Scan> = members.iter().map(|&(_, f)| f).collect();
            let done = tch::no_grad(|| {
                run_batch(moving, &fixed, &self.config, self.model.as_deref(), device)
            });
            for ((n, _), t) in members.into_iter().zip(done) {
                out[n] = Some(t.map(|t| Value::Transform(Arc::new(t))));
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StageError::Input("no inputs".into()))))
            .collect()
    }
}

impl StageConfig for RegisterConfig {
    fn files(&self) -> Vec<(String, PathBuf)> {
        self.model
            .iter()
            .map(|p| ("model".to_string(), p.clone()))
            .collect()
    }

    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        let problems = self.problems();
        if !problems.is_empty() {
            return Err(BuildError::Invalid(problems.join("; ")));
        }
        if let Some(problem) = self.device.unavailable() {
            return Err(BuildError::Invalid(problem));
        }
        let stage = RegisterStage::new(self).map_err(|e| BuildError::Invalid(e.to_string()))?;
        Ok(Arc::new(stage))
    }
}

/// Registers `moving` (the atlas) to `fixed` (the subject).
///
/// The result maps fixed world points into moving space; `resample::warp` with it carries
/// atlas images and labels onto any grid of the subject.
///
/// # Errors
/// If the configuration is inconsistent, an image is empty, the device is unavailable, the
/// model cannot be loaded, or libtorch fails.
pub fn register(
    moving: &Scan,
    fixed: &Scan,
    config: &RegisterConfig,
) -> Result<Transform, StageError> {
    register_batch(moving, &[fixed], config)
        .pop()
        .expect("one result per fixed scan")
}

/// Registers `moving` (the atlas) to each of `fixed` in one batch (see the stage's `batch`
/// setting): one result per fixed scan, in order, each what [`register`] would give up to
/// the padding's edge effects.
///
/// # Errors
/// Per subject, as [`register`]; a configuration or device problem fails every subject.
pub fn register_batch(
    moving: &Scan,
    fixed: &[&Scan],
    config: &RegisterConfig,
) -> Vec<Result<Transform, StageError>> {
    let setup = || -> Result<(Device, Option<Arc<Model>>), StageError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StageError::Input(problems.join("; ")));
        }
        let device = config.device.resolve()?;
        let model = match &config.model {
            Some(path) => Some(Model::load(path, device)?),
            None => None,
        };
        Ok((device, model))
    };
    match setup() {
        Ok((device, model)) => {
            tch::no_grad(|| run_batch(moving, fixed, config, model.as_deref(), device))
        }
        Err(e) => fail_all(fixed.len(), &e),
    }
}

/// The 99th percentile of the positive values of `data` (1 if there are none).
fn robust_max(data: &[f32]) -> f32 {
    let stride = (data.len() / 1_000_000).max(1);
    let mut vals: Vec<f32> = data
        .iter()
        .step_by(stride)
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if vals.is_empty() {
        return 1.0;
    }
    let n = ((vals.len() - 1) as f64 * 0.99) as usize;
    let (_, v, _) = vals.select_nth_unstable_by(n, f32::total_cmp);
    if *v > 0.0 { *v } else { 1.0 }
}

/// Fewest registration-grid voxels along an axis: the pyramid and the filters need a few.
const MIN_GRID_VOXELS: usize = 8;

/// Voxels above this fraction of the robust maximum count as foreground when cropping.
const FOREGROUND_FRACTION: f32 = 0.02;
/// Millimetres of background kept around the foreground when cropping.
const CROP_MARGIN_MM: f64 = 12.0;

/// The voxel box `[lo, hi)` along each axis holding every voxel above `threshold` of frame 0,
/// grown by `CROP_MARGIN_MM` and kept inside the image; the whole image when none is above.
fn foreground_box(image: &Volume, threshold: f32) -> ([usize; 3], [usize; 3]) {
    let [ni, nj, _] = image.shape;
    let mut lo = image.shape;
    let mut hi = [0usize; 3];
    for (n, &v) in image.frame(0).iter().enumerate() {
        if v > threshold {
            let at = [n % ni, (n / ni) % nj, n / (ni * nj)];
            for a in 0..3 {
                lo[a] = lo[a].min(at[a]);
                hi[a] = hi[a].max(at[a] + 1);
            }
        }
    }
    if (0..3).any(|a| lo[a] >= hi[a]) {
        return ([0; 3], image.shape);
    }
    let size = image.grid().voxel_size();
    for a in 0..3 {
        let margin = (CROP_MARGIN_MM / size[a].max(1e-6)).ceil() as usize;
        lo[a] = lo[a].saturating_sub(margin);
        hi[a] = (hi[a] + margin).min(image.shape[a]);
    }
    (lo, hi)
}

/// A scan's image, scaled to a robust maximum of 1, cropped to its foreground (plus a margin)
/// and resampled to `spacing` mm. Cropping spares every later step the empty background of
/// large fields of view (a 256³ FreeSurfer volume is three quarters air).
fn prepare(scan: &Scan, spacing: f64, device: Device) -> Result<OnGrid, StageError> {
    let image = &scan.image;
    if image.is_empty() {
        return Err(StageError::Data("empty image".into()));
    }
    let scale = robust_max(&image.data);
    let (lo, hi) = foreground_box(image, scale * FOREGROUND_FRACTION);
    let mut t = volume_tensor(image, device)?;
    // Tensor dims 4, 3, 2 are volume axes i, j, k.
    for a in 0..3 {
        t = t.f_narrow(4 - a as i64, lo[a] as i64, (hi[a] - lo[a]) as i64)?;
    }
    let t = t
        .f_nan_to_num(0.0, 0.0, 0.0)?
        .f_div_scalar(f64::from(scale))?;
    let shift = Affine::new_translation(&nalgebra::Vector3::new(
        lo[0] as f64,
        lo[1] as f64,
        lo[2] as f64,
    ));
    let cropped = Grid {
        shape: [0, 1, 2].map(|a| hi[a] - lo[a]),
        affine: image.affine * shift,
    };
    let grid = grid_with_spacing(&cropped, spacing);
    if grid.shape.iter().any(|&n| n < MIN_GRID_VOXELS) {
        return Err(StageError::Data(format!(
            "{}: the image's foreground spans {:?} voxels at {spacing} mm, too few to register \
             (at least {MIN_GRID_VOXELS} per axis); use a finer resolution_mm or check the image",
            image.header.path.display(),
            grid.shape
        )));
    }
    let resampled = resample_grid(&t, &cropped, &grid, false)?;
    Ok(OnGrid {
        image: resampled,
        grid,
    })
}

/// The fixed mask as weights on `grid`, if the scan has one.
fn mask_weight(scan: &Scan, grid: &Grid, device: Device) -> Result<Option<Tensor>, StageError> {
    let Some(mask) = &scan.mask else {
        return Ok(None);
    };
    let binary = volume_tensor(mask, device)?
        .f_gt(0.0)?
        .f_to_kind(tch::Kind::Float)?;
    Ok(Some(resample_grid(&binary, &mask.grid(), grid, false)?))
}

/// A subject prepared and aligned, waiting for the deformable stage.
struct Aligned {
    levels: BTreeMap<u32, pyramid::Level>,
    affine: Affine,
    started: Instant,
    aligned: f64,
}

/// Resamples `fixed`, builds its pyramid against `moving_on` and finds the affine.
fn align_one(
    moving_on: &OnGrid,
    fixed: &Scan,
    config: &RegisterConfig,
    deformable: bool,
    device: Device,
) -> Result<Aligned, StageError> {
    let started = Instant::now();
    let fixed_on = prepare(fixed, config.resolution_mm, device)?;
    let weight = mask_weight(fixed, &fixed_on.grid, device)?;
    let affine_levels = config.affine_levels();
    let mut factors = affine_levels.clone();
    if deformable {
        factors.extend(&config.deformable.levels);
    }
    factors.push(1);
    let levels = pyramid::build(&fixed_on, weight.as_ref(), moving_on, &factors)?;
    let pick = |fs: &[u32]| fs.iter().filter_map(|f| levels.get(f)).collect::<Vec<_>>();
    let affine = affine::align(&pick(&affine_levels), &config.affine)?;
    Ok(Aligned {
        aligned: started.elapsed().as_secs_f64(),
        levels,
        affine,
        started,
    })
}

/// Registers `moving` to each of `fixed`, with one result per fixed scan in order.
///
/// Each subject is resampled and aligned (affine) on its own; the deformable stage then runs
/// for all of them at once, one batch on the device. If the batch fails (on a GPU: too
/// large for its memory) each subject's deformable stage is run again on its own, so a
/// batch never costs a subject its result.
///
/// Limitation: only the deformable stage is batched. The affine stage (a few hundred small
/// steps per subject) and a TorchScript `model` run one subject at a time, so on a GPU they
/// stay bound by kernel launches.
fn run_batch(
    moving: &Scan,
    fixed: &[&Scan],
    config: &RegisterConfig,
    model: Option<&Model>,
    device: Device,
) -> Vec<Result<Transform, StageError>> {
    let moving_on = match prepare(moving, config.resolution_mm, device) {
        Ok(m) => m,
        Err(e) => return fail_all(fixed.len(), &format!("atlas (moving) image: {e}")),
    };
    let deformable = config.deformable.enabled && model.is_none();
    let results: Vec<Result<Aligned, StageError>> = fixed
        .iter()
        .map(|f| align_one(&moving_on, f, config, deformable, device))
        .collect();
    // Each subject's deformable result (field, final loss), once its stage ran.
    type Deformed = Result<(Option<Field>, f64), StageError>;
    let mut fields: Vec<Option<Deformed>> = (0..fixed.len()).map(|_| None).collect();
    if deformable {
        let ready: Vec<(usize, &Aligned)> = results
            .iter()
            .enumerate()
            .filter_map(|(b, r)| Some((b, r.as_ref().ok()?)))
            .collect();
        let subjects: Vec<greedy::Subject<'_>> = ready
            .iter()
            .map(|(_, a)| greedy::Subject {
                levels: config
                    .deformable
                    .levels
                    .iter()
                    .filter_map(|f| a.levels.get(f))
                    .collect(),
                affine: a.affine,
            })
            .collect();
        let deformed = match greedy::deform(&subjects, &config.deformable) {
            Ok(all) => all.into_iter().map(Ok).collect(),
            Err(e) if subjects.len() > 1 => {
                tracing::warn!(subjects = subjects.len(), error = %e,
                    "Batched registration failed; registering its subjects one at a time");
                subjects
                    .iter()
                    .map(|s| {
                        greedy::deform(std::slice::from_ref(s), &config.deformable)?
                            .pop()
                            .ok_or_else(|| StageError::Data("no field".into()))
                    })
                    .collect()
            }
            Err(e) => vec![Err(e)],
        };
        for (&(b, _), d) in ready.iter().zip(deformed) {
            fields[b] = Some(d.map(|(f, loss)| (Some(f), loss)));
        }
    }
    results
        .into_iter()
        .zip(fields)
        .map(|(aligned, field)| {
            let a = aligned?;
            let reg = &a.levels[&1];
            let (field, loss) = match field {
                Some(f) => f?,
                None => match model {
                    Some(model) => {
                        let moved = affine_moved(reg, &a.affine)?;
                        (
                            Some(model.predict(&moved, &reg.fixed, &reg.grid)?),
                            f64::NAN,
                        )
                    }
                    None => (None, f64::NAN),
                },
            };
            let field = field.map(|f| f.resampled(&reg.grid)).transpose()?;
            let deformed = a.started.elapsed().as_secs_f64();
            let result = finish(field, a.affine, loss, reg, &moving_on.grid, config.inverse)?;
            tracing::debug!(
                aligned = a.aligned,
                deformed,
                total = a.started.elapsed().as_secs_f64(),
                nonpositive_jacobian_pct = result.quality.nonpositive_jacobian_pct,
                "Registration done"
            );
            Ok(result)
        })
        .collect()
}

/// `n` failures with one reason, for a problem that stops a whole batch.
fn fail_all<T>(n: usize, reason: &dyn std::fmt::Display) -> Vec<Result<T, StageError>> {
    let reason = reason.to_string();
    (0..n)
        .map(|_| Err(StageError::Input(reason.clone())))
        .collect()
}

fn run(
    moving: &Scan,
    fixed: &Scan,
    config: &RegisterConfig,
    model: Option<&Model>,
    device: Device,
) -> Result<Transform, StageError> {
    run_batch(moving, &[fixed], config, model, device)
        .pop()
        .expect("one result per fixed scan")
}

/// The moving image carried onto the fixed level grid by `affine`.
fn affine_moved(level: &pyramid::Level, affine: &Affine) -> Result<Tensor, StageError> {
    let pts = index_points(&level.grid, level.fixed.device())?;
    let to_moving = world_to_normalised(&level.moving_grid) * affine * level.grid.affine;
    sample(&level.moving, &apply_affine(&pts, &to_moving)?, false)
}

/// Builds the [`Transform`] (with quality and inverse) from the optimised parts.
fn finish(
    field: Option<Field>,
    affine: Affine,
    loss: f64,
    reg: &pyramid::Level,
    moving_grid: &Grid,
    with_inverse: bool,
) -> Result<Transform, StageError> {
    let Some(field) = field else {
        let mut inverse = None;
        if with_inverse {
            inverse = Some(Arc::new(Transform {
                affine: crate::resample::inverse(&affine),
                displacement: None,
                inverse: None,
                fixed_grid: *moving_grid,
                quality: Default::default(),
            }));
        }
        return Ok(Transform {
            affine,
            displacement: None,
            inverse,
            fixed_grid: reg.grid,
            quality: crate::stage::TransformQuality {
                final_loss: loss,
                ..Default::default()
            },
        });
    };
    let bad = scalar(
        &field
            .u
            .f_isfinite()?
            .f_logical_not()?
            .f_sum(tch::Kind::Int64)?,
    )?;
    if bad > 0.0 {
        return Err(StageError::Data(format!(
            "registration diverged: {bad} non-finite displacement values"
        )));
    }
    let quality = field::quality(&field, loss)?;
    let inverse = if with_inverse {
        Some(Arc::new(field::inverse_transform(
            &field,
            &affine,
            moving_grid,
        )?))
    } else {
        None
    };
    let displacement = tensor_volume(&field.world()?, &reg.grid)?;
    Ok(Transform {
        affine,
        displacement: Some(Arc::new(displacement)),
        inverse,
        fixed_grid: reg.grid,
        quality,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_iteration_counts_are_problems() {
        let mut config = RegisterConfig::default();
        assert!(config.problems().is_empty());
        config.deformable.iterations = vec![100_000_000, 10, 1];
        let problems = config.problems().join("; ");
        assert!(problems.contains("at most 10000 per level"), "{problems}");
    }

    /// A window is centred on its voxel, so an even width cannot be honoured (4 was run as
    /// 5); validate says so instead of running something else.
    #[test]
    fn even_or_tiny_windows_are_problems() {
        let mut config = RegisterConfig::default();
        config.deformable.window = 4;
        assert_eq!(
            config.problems(),
            ["deformable.window must be an odd number of voxels, at least 3, got 4"]
        );
        config.deformable.window = 7;
        config.affine.window = 1;
        assert_eq!(
            config.problems(),
            ["affine.window must be an odd number of voxels, at least 3, got 1"]
        );
        config.affine.window = 3;
        assert!(config.problems().is_empty());
    }

    /// `field_shrink` of 12 or 1000 ran as 1 (the finest, slowest field); factors outside
    /// 1–8 are refused by validate.
    #[test]
    fn field_shrink_outside_one_to_eight_is_a_problem() {
        let mut config = RegisterConfig::default();
        for ok in 1..=MAX_FIELD_SHRINK {
            config.deformable.field_shrink = ok;
            assert!(config.problems().is_empty(), "{ok}");
        }
        for bad in [0, 9, 12, 16, 100, 1000] {
            config.deformable.field_shrink = bad;
            assert_eq!(
                config.problems(),
                [format!(
                    "deformable.field_shrink must be from 1 to 8, got {bad}"
                )]
            );
        }
    }
}
