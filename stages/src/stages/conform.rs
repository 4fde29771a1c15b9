//! `conform`: brings a scan onto a common orientation and voxel grid.
//!
//! Registration wants every subject on an orthogonal grid of known spacing; this stage makes
//! one covering the scan's field of view (or of a given shape, centred on the scan) and
//! resamples the image linearly and the labels and mask by nearest neighbour, each once from
//! the data it was given. It is also where a wrong header is fixed: `assume_orientation`
//! declares the true axis directions of the file and replaces its affine, keeping the voxels.
//! The output remembers the scan on its (corrected) file grid in [`Scan::native`], so
//! `segment` and `write` can return to the subject's own geometry.
//!
//! Left out: anti-aliasing before downsampling (each output voxel samples the input at one
//! point) and cropping to the head; both can come as parameters later.

use std::sync::Arc;

use serde::Deserialize;

use crate::registry::{BuildError, StageConfig};
use crate::resample::{Interp, resample};
use crate::stage::{Context, Inputs, Scan, Stage, StageError, Value, ValueFacts};
use crate::volume::{Affine, Grid, Volume, affine_from_orientation, apply, orientation_code};

/// Parameters of a `conform` node.
///
/// ```toml
/// [nodes.conformed]
/// type = "conform"
/// inputs = ["loaded"]
/// assume_orientation = "LIA"
/// orientation = "RAS"
/// spacing = 1.0
/// shape = [160, 192, 224]
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConformConfig {
    /// The true axis directions of the input file (e.g. `"LIA"`), for a file whose header is
    /// wrong. Its affine is replaced by one with these directions, its own voxel sizes, and
    /// the grid's centre at `assume_centre`; the voxel data are kept. Default: trust the file.
    pub assume_orientation: Option<String>,
    /// World position (mm) of the grid's centre when `assume_orientation` is given. Default
    /// `[0, 0, 0]`: a header that is wrong about the axes is not trusted for position either.
    pub assume_centre: Option<[f64; 3]>,
    /// Target axis directions (e.g. `"RAS"`). Default: the input's own, i.e. the nearest
    /// orthogonal orientation to its affine.
    pub orientation: Option<String>,
    /// Target voxel size in mm, one number or one per target axis. Default: the input's voxel
    /// size along each world direction.
    pub spacing: Option<Spacing>,
    /// Target shape. Default: the smallest grid covering the input's field of view.
    pub shape: Option<[usize; 3]>,
}

/// A voxel size: one number for all axes, or one per axis.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Spacing {
    /// The same size along every axis.
    Isotropic(f64),
    /// One size per target axis.
    PerAxis([f64; 3]),
}

impl Spacing {
    fn per_axis(self) -> [f64; 3] {
        match self {
            Spacing::Isotropic(s) => [s; 3],
            Spacing::PerAxis(s) => s,
        }
    }
}

impl StageConfig for ConformConfig {
    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        let code = |key: &str, value: Option<String>| -> Result<Option<String>, BuildError> {
            let Some(value) = value else { return Ok(None) };
            affine_from_orientation(&value, [1.0; 3], [1; 3], [0.0; 3])
                .map_err(|e| BuildError::Invalid(format!("conform: {key}: {e}")))?;
            Ok(Some(value.to_ascii_uppercase()))
        };
        let assume = code("assume_orientation", self.assume_orientation)?;
        let orientation = code("orientation", self.orientation)?;
        if self.assume_centre.is_some() && assume.is_none() {
            return Err(BuildError::Invalid(
                "conform: `assume_centre` only applies with `assume_orientation`".into(),
            ));
        }
        let spacing = self.spacing.map(Spacing::per_axis);
        if let Some(s) = spacing.filter(|s| s.iter().any(|v| !v.is_finite() || *v <= 0.0)) {
            return Err(BuildError::Invalid(format!(
                "conform: spacing must be positive millimetres, got {s:?}"
            )));
        }
        if let Some(shape) = self.shape.filter(|s| s.contains(&0)) {
            return Err(BuildError::Invalid(format!(
                "conform: shape must have no zero axis, got {shape:?}"
            )));
        }
        Ok(Arc::new(Conform {
            assume: assume.map(|code| (code, self.assume_centre.unwrap_or([0.0; 3]))),
            orientation,
            spacing,
            shape: self.shape,
        }))
    }
}

/// The runtime `conform` stage.
#[derive(Clone, Debug)]
pub struct Conform {
    assume: Option<(String, [f64; 3])>,
    orientation: Option<String>,
    spacing: Option<[f64; 3]>,
    shape: Option<[usize; 3]>,
}

impl Stage for Conform {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Scan)
    }

    fn output_mask(&self, inputs: &[ValueFacts]) -> Option<bool> {
        inputs.first()?.mask
    }

    fn output_labels(&self, inputs: &[ValueFacts]) -> Option<bool> {
        inputs.first()?.labels
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        Some(crate::stage::InputSpec::of(
            &[crate::stage::ValueKind::Scan],
            "[scan]",
        ))
    }

    fn kind(&self) -> crate::stage::StageKind {
        crate::stage::StageKind::Compute
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let input = inputs.scan(0)?;
        let source = match &self.assume {
            Some(_) if input.native.is_some() => {
                return Err(StageError::Input(format!(
                    "conform: assume_orientation applies to a scan on its file grid, but {} \
                     was already resampled; put this conform before any resampling stage",
                    input.image.header.path.display()
                )));
            }
            Some((code, centre)) => Arc::new(reoriented(input, code, *centre)?),
            None => input.clone(),
        };
        let native = input.native.clone().unwrap_or_else(|| source.clone());
        let target = self.target_grid(&source.image)?;
        if same_grid(&target, &source.image.grid()) {
            tracing::debug!("Input already on the target grid; not resampled");
            return Ok(Value::Scan(Arc::new(Scan {
                native: Some(native),
                ..(*source).clone()
            })));
        }

        tracing::debug!(
            from = %orientation_code(&source.image.affine),
            to = %orientation_code(&target.affine),
            shape = ?target.shape,
            spacing = ?target.voxel_size(),
            "Conforming"
        );
        // Limitation: no anti-aliasing; downsampling (e.g. 1 mm to 2 mm) samples one point per
        // output voxel, which aliases fine structure. Registration at 2 mm tolerates it.
        let onto = |v: &Arc<Volume>, interp| Arc::new(resample(v, &target, interp, |p| p));
        Ok(Value::Scan(Arc::new(Scan {
            image: onto(&source.image, Interp::Linear),
            labels: source.labels.as_ref().map(|v| onto(v, Interp::Nearest)),
            mask: source.mask.as_ref().map(|v| onto(v, Interp::Nearest)),
            native: Some(native),
        })))
    }
}

impl Conform {
    /// The grid the scan is resampled onto: target orientation and spacing, centred on the
    /// input, covering its field of view unless a shape was given.
    fn target_grid(&self, src: &Volume) -> Result<Grid, StageError> {
        let own = orientation_code(&src.affine);
        let code = self.orientation.clone().unwrap_or_else(|| own.clone());
        let src_rows = world_rows(&own);
        let tgt_rows = world_rows(&code);
        let src_size = src.voxel_size();
        let size_along = |row: usize| {
            let axis = src_rows.iter().position(|&r| r == row).unwrap_or(row);
            src_size[axis]
        };
        let spacing = self.spacing.unwrap_or_else(|| tgt_rows.map(size_along));

        let (lo, hi) = world_bounds(src);
        let shape = self.shape.unwrap_or_else(|| {
            let mut shape = [1; 3];
            for j in 0..3 {
                let extent = hi[tgt_rows[j]] - lo[tgt_rows[j]];
                shape[j] = ((extent / spacing[j]) - 1e-3).ceil().max(1.0) as usize;
            }
            shape
        });
        let centre = src.voxel_to_world(src.shape.map(|n| (n as f64 - 1.0) / 2.0));
        let affine = affine_from_orientation(&code, spacing, shape, centre)
            .map_err(|e| StageError::Input(format!("conform: {e}")))?;
        Ok(Grid { shape, affine })
    }
}

/// The scan with its affine replaced by the declared orientation; voxels and file header kept.
fn reoriented(scan: &Scan, code: &str, centre: [f64; 3]) -> Result<Scan, StageError> {
    let image = &scan.image;
    let affine = affine_from_orientation(code, image.voxel_size(), image.shape, centre)
        .map_err(|e| StageError::Input(format!("conform: assume_orientation: {e}")))?;
    tracing::debug!(
        file = %image.header.path.display(),
        stated = %orientation_code(&image.affine),
        assumed = code,
        "Replacing the file's affine by the declared orientation"
    );
    let with = |v: &Arc<Volume>| Arc::new(with_affine(v, affine));
    Ok(Scan {
        image: with(image),
        labels: scan.labels.as_ref().map(with),
        mask: scan.mask.as_ref().map(with),
        native: None,
    })
}

fn with_affine(v: &Volume, affine: Affine) -> Volume {
    Volume {
        affine,
        ..v.clone()
    }
}

/// For each letter of an orientation code, the world axis (0 = x, 1 = y, 2 = z) it follows.
fn world_rows(code: &str) -> [usize; 3] {
    let mut rows = [0, 1, 2];
    for (j, c) in code.chars().take(3).enumerate() {
        rows[j] = match c {
            'R' | 'L' => 0,
            'A' | 'P' => 1,
            _ => 2,
        };
    }
    rows
}

/// World bounding box of the volume's voxels (their outer faces, not centres).
fn world_bounds(v: &Volume) -> ([f64; 3], [f64; 3]) {
    let mut lo = [f64::INFINITY; 3];
    let mut hi = [f64::NEG_INFINITY; 3];
    for corner in 0..8 {
        let p = [0, 1, 2].map(|a| {
            if corner >> a & 1 == 0 {
                -0.5
            } else {
                v.shape[a] as f64 - 0.5
            }
        });
        let w = apply(&v.affine, p);
        for r in 0..3 {
            lo[r] = lo[r].min(w[r]);
            hi[r] = hi[r].max(w[r]);
        }
    }
    (lo, hi)
}

/// Whether two grids have the same shape and affines equal to a micrometre.
fn same_grid(a: &Grid, b: &Grid) -> bool {
    a.shape == b.shape && (a.affine - b.affine).abs().max() < 1e-3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resample::inverse;

    fn ramp(shape: [usize; 3], affine: Affine) -> Volume {
        let data = (0..shape.iter().product::<usize>())
            .map(|n| n as f32)
            .collect();
        Volume::new(data, shape, affine)
    }

    fn conform(config: &str, scan: Scan) -> Arc<Scan> {
        let config: ConformConfig = toml::from_str(config).unwrap();
        let stage = config.build().unwrap();
        let value = Value::Scan(Arc::new(scan));
        let inputs = Inputs {
            values: vec![("loaded", &value)],
        };
        let ctx = Context {
            subject: "s1",
            output_dir: std::path::Path::new("."),
            node: "conformed",
            entry: None,
        };
        match stage.process(&ctx, &inputs).unwrap() {
            Value::Scan(s) => s,
            other => panic!("conform returned a {}", other.kind()),
        }
    }

    #[test]
    fn example_config_parses() {
        let config: ConformConfig = toml::from_str(
            r#"
            assume_orientation = "LIA"
            orientation = "RAS"
            spacing = 1.0
            shape = [160, 192, 224]
            "#,
        )
        .unwrap();
        assert_eq!(config.spacing, Some(Spacing::Isotropic(1.0)));
        let per_axis: ConformConfig = toml::from_str("spacing = [1.0, 1.0, 2.5]").unwrap();
        assert_eq!(per_axis.spacing, Some(Spacing::PerAxis([1.0, 1.0, 2.5])));
        assert!(config.build().is_ok());
        let bad: ConformConfig = toml::from_str("orientation = \"RAR\"").unwrap();
        assert!(bad.build().is_err());
    }

    #[test]
    fn reorientation_keeps_every_voxel_at_its_world_place() {
        let src = ramp(
            [4, 5, 6],
            affine_from_orientation("RAS", [1.0; 3], [4, 5, 6], [3.0, -2.0, 1.0]).unwrap(),
        );
        let mut scan = Scan::from_image(src.clone());
        scan.labels = Some(Arc::new(src.clone()));
        let out = conform("orientation = \"LIA\"", scan);
        assert_eq!(out.image.shape, [4, 6, 5]);
        assert_eq!(orientation_code(&out.image.affine), "LIA");
        let to_src = inverse(&src.affine);
        for (i, j, k) in [(0, 0, 0), (3, 5, 4), (1, 2, 3)] {
            let q = apply(
                &to_src,
                out.image.voxel_to_world([i as f64, j as f64, k as f64]),
            );
            let q = q.map(|x| x.round() as usize);
            assert_eq!(out.image.get(i, j, k), src.get(q[0], q[1], q[2]));
            assert_eq!(
                out.labels.as_ref().unwrap().get(i, j, k),
                src.get(q[0], q[1], q[2])
            );
        }
        assert_eq!(out.native.as_ref().unwrap().image.data, src.data);
    }

    #[test]
    fn resampled_labels_stay_values_of_the_input() {
        let shape = [9, 8, 7];
        let affine = affine_from_orientation("LAS", [1.0; 3], shape, [0.0; 3]).unwrap();
        let labels: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|n| [0.0, 2.0, 17.0, 41.0][n % 4])
            .collect();
        let mut scan = Scan::from_image(ramp(shape, affine));
        scan.labels = Some(Arc::new(Volume::new(labels, shape, affine)));
        let out = conform("spacing = 0.7\norientation = \"RAS\"", scan);
        assert_eq!(out.image.shape, [13, 12, 10]);
        let labels = out.labels.as_ref().unwrap();
        assert!(
            labels
                .data
                .iter()
                .all(|v| [0.0, 2.0, 17.0, 41.0].contains(v))
        );
        assert!((out.image.voxel_size()[0] - 0.7).abs() < 1e-12);
    }

    #[test]
    fn assumed_orientation_replaces_the_affine_and_is_kept_as_native() {
        let src = ramp([4, 6, 8], Affine::identity());
        let out = conform(
            "assume_orientation = \"LIA\"",
            Scan::from_image(src.clone()),
        );
        let native = out.native.as_ref().unwrap();
        assert_eq!(orientation_code(&native.image.affine), "LIA");
        assert_eq!(native.image.header.affine, Affine::identity());
        assert_eq!(native.image.data, src.data);
        // The grid is kept (default orientation is the corrected one), so is every voxel.
        assert_eq!(out.image.data, src.data);
        let centre = out.image.voxel_to_world([1.5, 2.5, 3.5]);
        assert!(centre.iter().all(|c| c.abs() < 1e-12));
    }

    #[test]
    fn assumed_orientation_on_a_resampled_scan_is_refused() {
        let src = ramp([2, 2, 2], Affine::identity());
        let mut scan = Scan::from_image(src.clone());
        scan.native = Some(Arc::new(Scan::from_image(src)));
        let stage = ConformConfig {
            assume_orientation: Some("LIA".into()),
            ..ConformConfig::default()
        }
        .build()
        .unwrap();
        let value = Value::Scan(Arc::new(scan));
        let inputs = Inputs {
            values: vec![("x", &value)],
        };
        let ctx = Context {
            subject: "s1",
            output_dir: std::path::Path::new("."),
            node: "c",
            entry: None,
        };
        assert!(stage.process(&ctx, &inputs).is_err());
    }
}
