//! `normalize`: rescales image intensities so subjects and atlas are comparable.
//!
//! MRI intensities have no absolute unit, and registration losses such as MSE compare raw
//! values, so each image is brought to a common range. The first method clips at two
//! percentiles (robust to a few hot voxels) and maps them to 0 and 1. The `method` key selects
//! the algorithm so others (z-score, histogram matching, bias-field correction) can be added
//! beside it without changing existing pipelines.
//!
//! The rescaling itself is [`crate::intensity::percentile_rescale`] (exact percentiles, numpy's
//! linear rule); this file only picks the voxels and names the file in errors.
//!
//! Left out: bias-field correction and histogram matching (later methods); labels, mask and
//! the native scan pass through untouched, so `write` never sees normalized intensities.

use std::sync::Arc;

use serde::Deserialize;

use crate::intensity::percentile_rescale;
use crate::registry::{BuildError, StageConfig};
use crate::stage::{Context, Inputs, Scan, Stage, StageError, Value, ValueFacts};
use crate::volume::Volume;

/// Parameters of a `normalize` node.
///
/// ```toml
/// [nodes.normalized]
/// type = "normalize"
/// inputs = ["conformed"]
/// method = "percentile"
/// percentiles = [0.5, 99.5]
/// within_mask = false
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    /// The algorithm. Default `"percentile"`.
    #[serde(default)]
    pub method: NormalizeMethod,
    /// For `"percentile"`: the low and high percentiles (0–100) mapped to 0 and 1; values
    /// beyond them are clipped. Default `[0.5, 99.5]`.
    #[serde(default = "default_percentiles")]
    pub percentiles: [f64; 2],
    /// Compute the percentiles over the scan's brain mask only (the mask must exist); the
    /// rescaling still applies to every voxel. Default `false`.
    #[serde(default)]
    pub within_mask: bool,
}

fn default_percentiles() -> [f64; 2] {
    [0.5, 99.5]
}

/// How `normalize` rescales intensities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeMethod {
    /// Clip at two percentiles and map them linearly to `[0, 1]`.
    #[default]
    Percentile,
}

impl StageConfig for NormalizeConfig {
    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        let [lo, hi] = self.percentiles;
        if !(0.0..=100.0).contains(&lo) || !(0.0..=100.0).contains(&hi) || lo >= hi {
            return Err(BuildError::Invalid(format!(
                "normalize: percentiles must satisfy 0 <= low < high <= 100, got [{lo}, {hi}]"
            )));
        }
        Ok(Arc::new(Normalize { config: self }))
    }
}

/// The runtime `normalize` stage.
#[derive(Clone, Debug)]
pub struct Normalize {
    config: NormalizeConfig,
}

impl Stage for Normalize {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Scan)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        Some(crate::stage::InputSpec::of(
            &[crate::stage::ValueKind::Scan],
            "[scan]",
        ))
    }

    fn output_mask(&self, inputs: &[ValueFacts]) -> Option<bool> {
        inputs.first()?.mask
    }

    fn output_labels(&self, inputs: &[ValueFacts]) -> Option<bool> {
        inputs.first()?.labels
    }

    fn input_problem(&self, inputs: &[ValueFacts]) -> Option<String> {
        let unmasked = inputs.first().is_some_and(|f| f.mask == Some(false));
        (self.config.within_mask && unmasked).then(|| {
            "normalize: within_mask = true, but the scans of input 0 carry no brain mask (their \
             dataset or `load` names no `mask`); give them one, strip them with `skull_strip` \
             first, or set within_mask = false"
                .to_string()
        })
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let scan = inputs.scan(0)?;
        let file = scan.image.header.path.display().to_string();
        let mask = match (self.config.within_mask, &scan.mask) {
            (false, _) => None,
            (true, Some(mask)) => Some(binary(mask)),
            (true, None) => {
                return Err(StageError::Input(format!(
                    "normalize: within_mask = true but the scan of {file} has no mask"
                )));
            }
        };
        let image = match self.config.method {
            NormalizeMethod::Percentile => {
                let [lo, hi] = self.config.percentiles;
                percentile_rescale(&scan.image, lo, hi, mask.as_ref())
                    .map_err(|e| StageError::Data(format!("normalize: {file}: {e}")))?
            }
        };
        Ok(Value::Scan(Arc::new(Scan {
            image: Arc::new(image),
            ..(**scan).clone()
        })))
    }
}

/// The scan's mask as 0/1 (inside: non-zero), the selection [`percentile_rescale`] expects.
fn binary(mask: &Volume) -> Volume {
    mask.with_data(
        mask.frame(0)
            .iter()
            .map(|&m| if m != 0.0 { 1.0 } else { 0.0 })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intensity::percentile;
    use crate::volume::Affine;

    #[test]
    fn example_config_parses() {
        let config: NormalizeConfig = toml::from_str(
            r#"
            method = "percentile"
            percentiles = [0.5, 99.5]
            within_mask = false
            "#,
        )
        .unwrap();
        assert_eq!(config.method, NormalizeMethod::Percentile);
        let default: NormalizeConfig = toml::from_str("").unwrap();
        assert_eq!(default.percentiles, [0.5, 99.5]);
        let reversed: NormalizeConfig = toml::from_str("percentiles = [90, 10]").unwrap();
        assert!(reversed.build().is_err());
        assert!(toml::from_str::<NormalizeConfig>("method = \"zscore\"").is_err());
    }

    fn run(config: &str, scan: Scan) -> Result<Arc<Scan>, StageError> {
        let stage = toml::from_str::<NormalizeConfig>(config)
            .unwrap()
            .build()
            .unwrap();
        let value = Value::Scan(Arc::new(scan));
        let inputs = Inputs {
            values: vec![("in", &value)],
        };
        let ctx = Context {
            subject: "s1",
            output_dir: std::path::Path::new("."),
            node: "normalized",
            entry: None,
        };
        match stage.process(&ctx, &inputs)? {
            Value::Scan(s) => Ok(s),
            other => panic!("normalize returned a {}", other.kind()),
        }
    }

    #[test]
    fn percentiles_map_to_zero_and_one() {
        let data: Vec<f32> = (0..=100).map(|x| x as f32 * 2.0).collect();
        let mut padded = data.clone();
        padded.extend([0.0; 4]);
        let image = Volume::new(padded, [105, 1, 1], Affine::identity());
        let out = run("percentiles = [10.0, 90.0]", Scan::from_image(image)).unwrap();
        let lo_hi = {
            let mut s = data.clone();
            s.extend([0.0; 4]);
            (percentile(&mut s.clone(), 10.0), percentile(&mut s, 90.0))
        };
        for (v, o) in data.iter().zip(&out.image.data) {
            let want = ((*v as f64 - lo_hi.0) / (lo_hi.1 - lo_hi.0)).clamp(0.0, 1.0);
            assert!((*o as f64 - want).abs() < 1e-6);
        }
        assert_eq!(out.image.data.iter().copied().fold(f32::MIN, f32::max), 1.0);
        assert_eq!(out.image.data.iter().copied().fold(f32::MAX, f32::min), 0.0);
    }

    #[test]
    fn within_mask_uses_only_masked_voxels_and_needs_a_mask() {
        let image = Volume::new(
            vec![1000.0, 10.0, 20.0, 30.0],
            [4, 1, 1],
            Affine::identity(),
        );
        let mask = Volume::new(vec![0.0, 1.0, 1.0, 1.0], [4, 1, 1], Affine::identity());
        let err = run("within_mask = true", Scan::from_image(image.clone())).unwrap_err();
        assert!(err.to_string().contains("no mask"), "{err}");
        let mut scan = Scan::from_image(image);
        scan.mask = Some(Arc::new(mask));
        let out = run("within_mask = true\npercentiles = [0, 100]", scan).unwrap();
        assert_eq!(out.image.data, [1.0, 0.0, 0.5, 1.0]);
    }

    #[test]
    fn constant_image_is_an_error() {
        let image = Volume::new(vec![5.0; 8], [2, 2, 2], Affine::identity());
        assert!(run("", Scan::from_image(image)).is_err());
    }
}
