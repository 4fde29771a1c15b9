//! `skull_strip`: removes non-brain tissue by multiplying the image with a brain mask.
//!
//! Registering a skull-stripped atlas to a head with skull pulls the atlas brain onto the
//! scalp; stripping the subject first avoids that. This first version takes the mask from
//! somewhere rather than computing one: the scan's own mask (a dataset column, or a `mask`
//! file), or the atlas's brain carried through a registration onto the subject. The output
//! scan carries the mask it used, so later stages (`normalize` with `within_mask`) see it.
//!
//! Left out: learned or intensity-based brain extraction, erosion (negative `dilate_mm`), and
//! hole filling; an empty mask is an error rather than a pass-through.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::io::read_volume;
use crate::registry::{BuildError, StageConfig};
use crate::resample::{Interp, resample, warp};
use crate::skullstrip::{auto, dilate_mm, refine_boundary};
use crate::stage::{Context, Inputs, Scan, Stage, StageError, Value};
use crate::volume::Volume;

/// Parameters of a `skull_strip` node.
///
/// With the scan's own mask (`inputs = [scan]`):
///
/// ```toml
/// [nodes.stripped]
/// type = "skull_strip"
/// inputs = ["conformed"]
/// method = "mask"
/// ```
///
/// With the atlas's brain (`inputs = [subject scan, transform, atlas scan]`):
///
/// ```toml
/// [nodes.stripped]
/// type = "skull_strip"
/// inputs = ["conformed", "coarse_registration", "atlas"]
/// method = "atlas"
/// dilate_mm = 2.0
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkullStripConfig {
    /// Where the mask comes from. Default `"mask"`.
    #[serde(default)]
    pub method: StripMethod,
    /// For `"mask"`: a mask file used for every subject instead of the scan's own mask. It is
    /// resampled (nearest neighbour, through world coordinates) onto each scan's grid.
    pub mask: Option<PathBuf>,
    /// Grow the mask by this many millimetres before applying it. Default 0.
    #[serde(default)]
    pub dilate_mm: f64,
    /// For `"atlas"`: snap the carried mask to the subject's own brain boundary with
    /// [`crate::skullstrip::refine_boundary`]. Default true.
    #[serde(default = "yes")]
    pub refine: bool,
    /// For `"auto"`: the classical method's settings ([`crate::skullstrip::AutoParams`]),
    /// e.g. `[nodes.strip.auto] refine.csf_fraction = 0.3`.
    #[serde(default)]
    pub auto: crate::skullstrip::AutoParams,
}

fn yes() -> bool {
    true
}

/// Where `skull_strip` takes its brain mask from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StripMethod {
    /// The scan's own mask, or the `mask` file.
    #[default]
    Mask,
    /// The atlas's mask (its `mask`, else `image > 0`) carried through the registration,
    /// then refined at the subject's brain boundary.
    Atlas,
    /// A classical extraction needing no atlas ([`crate::skullstrip::auto`]).
    Auto,
}

impl StageConfig for SkullStripConfig {
    fn files(&self) -> Vec<(String, PathBuf)> {
        self.mask
            .iter()
            .map(|m| ("mask".to_string(), m.clone()))
            .collect()
    }

    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        if !self.dilate_mm.is_finite() || self.dilate_mm < 0.0 {
            return Err(BuildError::Invalid(format!(
                "skull_strip: dilate_mm must be a non-negative number of millimetres, got {}",
                self.dilate_mm
            )));
        }
        if self.method != StripMethod::Mask && self.mask.is_some() {
            return Err(BuildError::Invalid(
                "skull_strip: `mask` applies to method = \"mask\" only".into(),
            ));
        }
        Ok(Arc::new(SkullStrip {
            config: self,
            mask_file: OnceLock::new(),
        }))
    }
}

/// The runtime `skull_strip` stage.
#[derive(Debug)]
pub struct SkullStrip {
    config: SkullStripConfig,
    /// The `mask` file, read once and shared by every subject.
    mask_file: OnceLock<Result<Arc<Volume>, String>>,
}

impl Stage for SkullStrip {
    fn kind(&self) -> crate::stage::StageKind {
        crate::stage::StageKind::Compute
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let scan = inputs.scan(0)?;
        let grid = scan.image.grid();
        let mask = match self.config.method {
            StripMethod::Mask => self.own_mask(scan)?,
            StripMethod::Atlas => {
                let transform = match inputs.get(1)? {
                    Value::Transform(t) => t,
                    other => {
                        return Err(StageError::Input(format!(
                            "skull_strip: method = \"atlas\" expects inputs [subject scan, \
                             transform, atlas scan]; input 1 is a {}",
                            other.kind()
                        )));
                    }
                };
                let atlas = inputs.scan(2)?;
                let atlas_mask = match &atlas.mask {
                    Some(m) => m.clone(),
                    None => Arc::new(binarize(&atlas.image)),
                };
                let carried = warp(&atlas_mask, transform, &grid, Interp::Nearest);
                if self.config.refine {
                    let refine = &self.config.auto.refine;
                    refine_boundary(&scan.image, &carried, refine).map_err(|e| failed(scan, e))?
                } else {
                    carried
                }
            }
            StripMethod::Auto => {
                auto(&scan.image, &self.config.auto)
                    .map_err(|e| failed(scan, e))?
                    .mask
            }
        };
        let mask = if self.config.dilate_mm > 0.0 {
            dilate_mm(&mask, self.config.dilate_mm)
        } else {
            mask
        };
        let inside: Vec<bool> = mask.data.iter().map(|&m| m != 0.0).collect();
        strip(scan, &inside)
    }
}

impl SkullStrip {
    /// The `mask` file if given (on the scan's grid), else the scan's own mask.
    fn own_mask(&self, scan: &Scan) -> Result<Volume, StageError> {
        let Some(path) = &self.config.mask else {
            return scan.mask.as_deref().cloned().ok_or_else(|| {
                StageError::Input(format!(
                    "skull_strip: the scan of {} has no mask; give the dataset a mask, set \
                     `mask = \"file\"`, or use method = \"atlas\"",
                    scan.image.header.path.display()
                ))
            });
        };
        let file = self
            .mask_file
            .get_or_init(|| read_volume(path).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(StageError::Input)?;
        let grid = scan.image.grid();
        if file.grid() == grid {
            return Ok((*file).clone());
        }
        tracing::debug!(file = %path.display(), "Resampling the mask file onto the scan's grid");
        Ok(resample(&file, &grid, Interp::Nearest, |p| p))
    }
}

fn failed(scan: &Scan, e: crate::skullstrip::SkullStripError) -> StageError {
    StageError::Data(format!(
        "skull_strip: {}: {e}",
        scan.image.header.path.display()
    ))
}

/// The image multiplied by the mask, as a scan carrying that mask.
fn strip(scan: &Scan, inside: &[bool]) -> Result<Value, StageError> {
    let count = inside.iter().filter(|&&b| b).count();
    if count == 0 {
        return Err(StageError::Data(format!(
            "skull_strip: the brain mask of {} is empty",
            scan.image.header.path.display()
        )));
    }
    let voxel_ml = scan
        .image
        .affine
        .fixed_view::<3, 3>(0, 0)
        .determinant()
        .abs()
        / 1000.0;
    tracing::debug!(brain_ml = count as f64 * voxel_ml, "Brain volume");
    let image: Vec<f32> = scan
        .image
        .data
        .iter()
        .zip(inside)
        .map(|(&v, &b)| if b { v } else { 0.0 })
        .collect();
    let mask: Vec<f32> = inside.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
    Ok(Value::Scan(Arc::new(Scan {
        image: Arc::new(scan.image.with_data(image)),
        labels: scan.labels.clone(),
        mask: Some(Arc::new(scan.image.with_data(mask))),
        native: scan.native.clone(),
    })))
}

/// `1` where the image is positive, `0` elsewhere.
fn binarize(image: &Volume) -> Volume {
    image.with_data(
        image
            .data
            .iter()
            .map(|&v| if v > 0.0 { 1.0 } else { 0.0 })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{Transform, TransformQuality};
    use crate::volume::Affine;

    #[test]
    fn example_config_parses() {
        let config: SkullStripConfig = toml::from_str(
            r#"
            method = "atlas"
            dilate_mm = 2.0
            "#,
        )
        .unwrap();
        assert_eq!(config.method, StripMethod::Atlas);
        assert!(config.build().is_ok());
        let plain: SkullStripConfig = toml::from_str("mask = \"brain_mask.nii.gz\"").unwrap();
        assert_eq!(plain.method, StripMethod::Mask);
        assert_eq!(plain.files().len(), 1);
        let bad: SkullStripConfig = toml::from_str("dilate_mm = -1").unwrap();
        assert!(bad.build().is_err());
    }

    fn run(config: &str, values: &[Value]) -> Result<Arc<Scan>, StageError> {
        let stage = toml::from_str::<SkullStripConfig>(config)
            .unwrap()
            .build()
            .unwrap();
        let inputs = Inputs {
            values: values.iter().map(|v| ("in", v)).collect(),
        };
        let ctx = Context {
            subject: "s1",
            output_dir: std::path::Path::new("."),
            node: "stripped",
        };
        match stage.process(&ctx, &inputs)? {
            Value::Scan(s) => Ok(s),
            other => panic!("skull_strip returned a {}", other.kind()),
        }
    }

    #[test]
    fn own_mask_zeroes_the_outside_and_is_carried() {
        let image = Volume::new(vec![5.0, 6.0, 7.0, 8.0], [4, 1, 1], Affine::identity());
        let mask = image.with_data(vec![0.0, 1.0, 3.0, 0.0]);
        let mut scan = Scan::from_image(image.clone());
        assert!(run("", &[Value::Scan(Arc::new(scan.clone()))]).is_err());
        scan.mask = Some(Arc::new(mask));
        let out = run("", &[Value::Scan(Arc::new(scan))]).unwrap();
        assert_eq!(out.image.data, [0.0, 6.0, 7.0, 0.0]);
        assert_eq!(out.mask.as_ref().unwrap().data, [0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn atlas_brain_is_carried_through_the_transform() {
        let shape = [6, 1, 1];
        let subject = Volume::new(vec![1.0; 6], shape, Affine::identity());
        let atlas = subject.with_data(vec![0.0, 0.0, 9.0, 9.0, 0.0, 0.0]);
        // The subject's world point x maps to the atlas's x + 1.
        let mut shift = Affine::identity();
        shift[(0, 3)] = 1.0;
        let transform = Transform {
            affine: shift,
            displacement: None,
            inverse: None,
            fixed_grid: subject.grid(),
            quality: TransformQuality::default(),
        };
        let values = [
            Value::Scan(Arc::new(Scan::from_image(subject))),
            Value::Transform(Arc::new(transform)),
            Value::Scan(Arc::new(Scan::from_image(atlas))),
        ];
        let out = run("method = \"atlas\"\nrefine = false", &values).unwrap();
        assert_eq!(out.image.data, [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        let grown = run(
            "method = \"atlas\"\nrefine = false\ndilate_mm = 1.0",
            &values,
        )
        .unwrap();
        assert_eq!(grown.image.data, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }
}
