//! `segment`: carries the atlas's labels and image through a registration into the subject's
//! own file grid.
//!
//! Registration works on conformed, normalized copies, but results belong on the subject's
//! file grid, so this stage resamples the atlas's *native* labels (nearest neighbour) and
//! image (linear) straight onto the subject's *native* grid through the transform: one
//! interpolation from the original data. It also carries the labels through the headers
//! alone (no registration), the "before" segmentation that `dice` compares against.
//!
//! Every output carries the subject's file header, not the atlas's, so `write` puts them in
//! the subject's geometry.
//!
//! Labels go over by nearest neighbour (default) or, with `interp = "linear"`, by one-hot
//! linear interpolation and arg-max ([`crate::register::warp_labels_linear`]: smoother
//! boundaries, a few labels at a time so memory stays two values per voxel).

use std::sync::Arc;

use serde::Deserialize;

use crate::register::warp_labels_linear;
use crate::registry::{BuildError, StageConfig};
use crate::resample::{Interp, resample, warp};
use crate::stage::{Context, Inputs, Segmentation, Stage, StageError, Value, ValueFacts};
use crate::volume::{SourceHeader, Volume};

/// Parameters of a `segment` node; inputs are `[transform, atlas scan, subject scan]`.
///
/// ```toml
/// [nodes.segmented]
/// type = "segment"
/// inputs = ["registration", "atlas", "conformed"]
/// interp = "nearest"   # or "linear": one-hot, interpolated, arg-max
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// How labels are interpolated. Default `"nearest"`.
    #[serde(default)]
    pub interp: LabelInterp,
}

/// How `segment` interpolates labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelInterp {
    /// Each subject voxel takes the label of the nearest atlas voxel.
    #[default]
    Nearest,
    /// Each label's indicator is interpolated linearly; the largest wins.
    Linear,
}

/// Labels processed together by one-hot linear interpolation.
const LABEL_CHUNK: usize = 4;

impl StageConfig for SegmentConfig {
    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(Segment { config: self }))
    }
}

/// The runtime `segment` stage.
#[derive(Clone, Debug)]
pub struct Segment {
    config: SegmentConfig,
}

impl Stage for Segment {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Segmentation)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        use crate::stage::ValueKind::{Scan, Transform};
        Some(
            crate::stage::InputSpec::of(
                &[Transform, Scan, Scan],
                "[registration, atlas scan, subject scan]",
            )
            .subject_at(&[2]),
        )
    }

    /// The labels carried are the atlas scan's (input 1): one known to carry none fails
    /// every subject. The subject scan's own labels (input 2) are not needed.
    fn input_problem(&self, inputs: &[ValueFacts]) -> Option<String> {
        inputs
            .get(1)
            .is_some_and(ValueFacts::scan_without_labels)
            .then(|| {
                "segment: carries the label map of the atlas scan (input 1) into each subject, \
                 but that scan has none (the `load` or dataset it comes from names no \
                 `labels`), so every subject would fail; give the atlas's `load` a `labels` \
                 file, or check the order of the inputs"
                    .to_string()
            })
    }

    fn kind(&self) -> crate::stage::StageKind {
        crate::stage::StageKind::Compute
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let transform = match inputs.get(0)? {
            Value::Transform(t) => t.clone(),
            other => {
                return Err(StageError::Input(format!(
                    "segment: inputs are [transform, atlas scan, subject scan]; input 0 is a {}",
                    other.kind()
                )));
            }
        };
        let atlas = inputs.scan(1)?.native_scan();
        let subject = inputs.scan(2)?.native_scan();
        let Some(atlas_labels) = &atlas.labels else {
            return Err(StageError::Input(format!(
                "segment: the atlas {} has no labels",
                atlas.image.header.path.display()
            )));
        };
        let grid = subject.image.grid();
        let header = &subject.image.header;
        let labels = match self.config.interp {
            LabelInterp::Nearest => warp(atlas_labels, &transform, &grid, Interp::Nearest),
            LabelInterp::Linear => warp_labels_linear(atlas_labels, &transform, &grid, LABEL_CHUNK),
        };
        let warped_image = warp(&atlas.image, &transform, &grid, Interp::Linear);
        let initial = resample(atlas_labels, &grid, Interp::Nearest, |p| p);
        tracing::debug!(
            atlas = %atlas.image.header.path.display(),
            shape = ?grid.shape,
            "Atlas carried into the subject's file grid"
        );
        Ok(Value::Segmentation(Arc::new(Segmentation {
            labels: Arc::new(with_header(labels, header)),
            initial_labels: Arc::new(with_header(initial, header)),
            warped_image: Arc::new(with_header(warped_image, header)),
            transform,
        })))
    }
}

/// `volume` with the subject's file header (resampling copies the source's, the atlas's).
fn with_header(volume: Volume, header: &Arc<SourceHeader>) -> Volume {
    Volume {
        header: header.clone(),
        ..volume
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{Scan, Transform, TransformQuality};
    use crate::volume::{Affine, affine_from_orientation};
    use std::path::PathBuf;

    #[test]
    fn example_config_parses() {
        let config: SegmentConfig = toml::from_str("interp = \"nearest\"").unwrap();
        assert_eq!(config.interp, LabelInterp::Nearest);
        assert!(config.build().is_ok());
        let linear: SegmentConfig = toml::from_str("interp = \"linear\"").unwrap();
        assert_eq!(linear.interp, LabelInterp::Linear);
        assert!(toml::from_str::<SegmentConfig>("interp = \"cubic\"").is_err());
    }

    /// `validate` names an atlas known to carry no label map; the subject's own labels
    /// (input 2) do not matter here.
    #[test]
    fn an_atlas_without_labels_is_an_input_problem() {
        use crate::stage::ValueKind;
        let stage = SegmentConfig::default().build().unwrap();
        let facts = |kind, labels| ValueFacts {
            kind: Some(kind),
            mask: None,
            labels,
        };
        let transform = facts(ValueKind::Transform, None);
        let problem = |atlas, subject| {
            stage.input_problem(&[
                transform,
                facts(ValueKind::Scan, atlas),
                facts(ValueKind::Scan, subject),
            ])
        };
        let message = problem(Some(false), Some(true)).expect("no labels to carry");
        assert!(
            message.contains("atlas scan (input 1)") && message.contains("has none"),
            "{message}"
        );
        assert_eq!(problem(Some(true), Some(false)), None);
        assert_eq!(problem(None, Some(false)), None);
    }

    fn file_header(path: &str, affine: Affine) -> Arc<SourceHeader> {
        Arc::new(SourceHeader {
            path: PathBuf::from(path),
            ..SourceHeader::derived(affine)
        })
    }

    #[test]
    fn identity_transform_on_identical_grids_reproduces_labels_with_subject_header() {
        let shape = [5, 4, 3];
        let affine = affine_from_orientation("LIA", [1.0; 3], shape, [1.0, 2.0, 3.0]).unwrap();
        let labels: Vec<f32> = (0..60).map(|n| (n % 7 * 3) as f32).collect();
        let mut atlas_image = Volume::new(vec![2.0; 60], shape, affine);
        atlas_image.header = file_header("atlas.mgz", affine);
        let mut atlas = Scan::from_image(atlas_image.clone());
        atlas.labels = Some(Arc::new(atlas_image.with_data(labels.clone())));
        let mut subject_image = Volume::new(vec![1.0; 60], shape, affine);
        subject_image.header = file_header("subject.nii.gz", Affine::identity());
        let transform = Transform {
            affine: Affine::identity(),
            displacement: None,
            inverse: None,
            fixed_grid: subject_image.grid(),
            quality: TransformQuality::default(),
        };
        let values = [
            Value::Transform(Arc::new(transform)),
            Value::Scan(Arc::new(atlas)),
            Value::Scan(Arc::new(Scan::from_image(subject_image))),
        ];
        let inputs = Inputs {
            values: vec![
                ("reg", &values[0]),
                ("atlas", &values[1]),
                ("subject", &values[2]),
            ],
        };
        let ctx = Context {
            subject: "s1",
            output_dir: std::path::Path::new("."),
            node: "segmented",
            entry: None,
        };
        for interp in [LabelInterp::Nearest, LabelInterp::Linear] {
            let stage = SegmentConfig { interp }.build().unwrap();
            let Value::Segmentation(seg) = stage.process(&ctx, &inputs).unwrap() else {
                panic!("segment returned another kind of value");
            };
            assert_eq!(seg.labels.data, labels, "{interp:?}");
            assert_eq!(seg.initial_labels.data, labels);
            assert_eq!(seg.warped_image.data, vec![2.0; 60]);
            for v in [&seg.labels, &seg.initial_labels, &seg.warped_image] {
                assert_eq!(v.header.path, PathBuf::from("subject.nii.gz"));
                assert_eq!(v.header.affine, Affine::identity());
                assert_eq!(v.affine, affine);
            }
        }
    }
}
