//! `load`: reads a subject's image, labels and mask (or the atlas's) into a [`Scan`].
//!
//! Per subject, the input is a `dataset` entry; with no inputs, the node is constant and its
//! own `image`/`labels`/`mask` parameters name the files (how an atlas is declared). Loading
//! is where bad data is caught: labels or a mask of another shape, and NaN/Inf voxels, are
//! errors naming the files and values, so later stages can assume clean, aligned volumes.
//! Labels or a mask of the image's shape whose header affine differs are taken to be on the
//! image's grid, with a warning (see the limitation in `load_scan`).
//!
//! Left out: 4D images (a time series is rejected rather than reduced) and resampling labels
//! stored on another grid; both are errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::io::read_volume;
use crate::registry::{BuildError, StageConfig};
use crate::stage::{Context, Inputs, Scan, Stage, StageError, Value, ValueFacts};
use crate::volume::{Volume, stats};

/// Parameters of a `load` node.
///
/// Per subject (`inputs = ["subjects"]`, a `dataset` node), usually no parameters. As the
/// atlas (no inputs):
///
/// ```toml
/// [nodes.atlas]
/// type = "load"
/// image = "../shared/data/fsaverage/brain.mgz"
/// labels = "../shared/data/fsaverage/aseg.mgz"
/// non_finite = "error"
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    /// The image file, for a constant node (no inputs).
    pub image: Option<PathBuf>,
    /// The label map file, for a constant node.
    pub labels: Option<PathBuf>,
    /// The brain mask file, for a constant node.
    pub mask: Option<PathBuf>,
    /// What to do with NaN or infinite image voxels. Default `"error"`.
    #[serde(default)]
    pub non_finite: NonFinite,
}

/// What `load` does with NaN or infinite voxels in an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Fail the subject, naming the file and the count.
    #[default]
    Error,
    /// Replace them by 0 (logged at debug with the count).
    Zero,
}

impl StageConfig for LoadConfig {
    fn files(&self) -> Vec<(String, PathBuf)> {
        [
            ("image", &self.image),
            ("labels", &self.labels),
            ("mask", &self.mask),
        ]
        .into_iter()
        .filter_map(|(key, path)| Some((key.to_string(), path.clone()?)))
        .collect()
    }

    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        if self.image.is_none() && (self.labels.is_some() || self.mask.is_some()) {
            return Err(BuildError::Invalid(
                "load: `labels` or `mask` given without `image`".into(),
            ));
        }
        Ok(Arc::new(Load { config: self }))
    }
}

/// The runtime `load` stage.
#[derive(Debug)]
pub struct Load {
    config: LoadConfig,
}

impl Stage for Load {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Scan)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        Some(if self.config.image.is_some() {
            crate::stage::InputSpec::exactly(0, "none: `image` names the file")
        } else {
            crate::stage::InputSpec::of(
                &[crate::stage::ValueKind::Entry],
                "[dataset], or none with `image` set",
            )
        })
    }

    /// A constant node's mask is its `mask` parameter; a subject's, its dataset entry's.
    fn output_mask(&self, inputs: &[ValueFacts]) -> Option<bool> {
        match inputs.first() {
            None => Some(self.config.mask.is_some()),
            Some(entry) => entry.mask,
        }
    }

    /// A constant node's label map is its `labels` parameter; a subject's, its dataset
    /// entry's.
    fn output_labels(&self, inputs: &[ValueFacts]) -> Option<bool> {
        match inputs.first() {
            None => Some(self.config.labels.is_some()),
            Some(entry) => entry.labels,
        }
    }

    fn process(&self, _ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let (image, labels, mask) = match inputs.values.first() {
            Some((name, Value::Entry(entry))) => {
                if self.config.image.is_some() {
                    return Err(StageError::Input(format!(
                        "load: reads its files from input {name:?}; remove the `image` parameter"
                    )));
                }
                (
                    entry.image.clone(),
                    entry.labels.clone(),
                    entry.mask.clone(),
                )
            }
            Some((name, other)) => {
                return Err(StageError::Input(format!(
                    "load: input {name:?} is a {}, expected a dataset entry",
                    other.kind()
                )));
            }
            None => match &self.config.image {
                Some(image) => (
                    image.clone(),
                    self.config.labels.clone(),
                    self.config.mask.clone(),
                ),
                None => {
                    return Err(StageError::Input(
                        "load: without inputs, the `image` parameter must name a file".into(),
                    ));
                }
            },
        };
        let scan = load_scan(
            &image,
            labels.as_deref(),
            mask.as_deref(),
            self.config.non_finite,
        )?;
        Ok(Value::Scan(Arc::new(scan)))
    }
}

/// Reads an image and its optional companions, checking they share the image's grid.
///
/// # Errors
/// If a file cannot be read, a companion's shape differs from the image's, the image is not
/// 3D, or it holds NaN/Inf voxels with [`NonFinite::Error`].
pub fn load_scan(
    image_path: &Path,
    labels: Option<&Path>,
    mask: Option<&Path>,
    non_finite: NonFinite,
) -> Result<Scan, StageError> {
    let mut image = read_volume(image_path)?;
    if image.frames != 1 {
        return Err(StageError::Data(format!(
            "{}: expected a 3D image, found {} frames",
            image_path.display(),
            image.frames
        )));
    }
    check_finite(&mut image, image_path, non_finite)?;

    let companion = |path: Option<&Path>, what: &str| -> Result<Option<Arc<Volume>>, StageError> {
        let Some(path) = path else { return Ok(None) };
        let mut volume = read_volume(path)?;
        if volume.shape != image.shape || volume.frames != 1 {
            return Err(StageError::Input(format!(
                "{what} {} has shape {:?} ({} frames) but image {} has shape {:?}",
                path.display(),
                volume.shape,
                volume.frames,
                image_path.display(),
                image.shape
            )));
        }
        let s = stats(&volume.data);
        if s.n_nan + s.n_inf > 0 {
            return Err(StageError::Data(format!(
                "{what} {}: {} NaN and {} infinite voxels",
                path.display(),
                s.n_nan,
                s.n_inf
            )));
        }
        if what == "labels" {
            check_label_values(&volume.data, path)?;
        }
        // Limitation: a companion on the same shape but another affine is assumed to be on
        // the image's grid (a header difference, as in some releases) and only warned about.
        if !affines_agree(&volume, &image) {
            tracing::warn!(
                file = %path.display(),
                image = %image_path.display(),
                "Affine differs from the image's; using the image's"
            );
            volume.affine = image.affine;
        }
        Ok(Some(Arc::new(volume)))
    };
    let labels = companion(labels, "labels")?;
    let mask = companion(mask, "mask")?;
    Ok(Scan {
        image: Arc::new(image),
        labels,
        mask,
        native: None,
    })
}

fn check_finite(image: &mut Volume, path: &Path, policy: NonFinite) -> Result<(), StageError> {
    let bad = image.data.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    match policy {
        NonFinite::Error => Err(StageError::Data(format!(
            "{}: {bad} NaN or infinite voxels; set non_finite = \"zero\" to replace them by 0",
            path.display()
        ))),
        NonFinite::Zero => {
            for v in image.data.iter_mut().filter(|v| !v.is_finite()) {
                *v = 0.0;
            }
            tracing::debug!(file = %path.display(), voxels = bad, "Replaced non-finite voxels by 0");
            Ok(())
        }
    }
}

/// A label map holds whole, non-negative numbers; anything else (a map resampled with
/// linear interpolation, a probability map) would be truncated to wrong labels downstream.
fn check_label_values(data: &[f32], path: &Path) -> Result<(), StageError> {
    let is_bad = |v: f32| v < 0.0 || (v - v.round()).abs() > 1e-3;
    let bad = data.iter().filter(|&&v| is_bad(v)).count();
    match data.iter().find(|&&v| is_bad(v)) {
        None => Ok(()),
        Some(example) => Err(StageError::Data(format!(
            "labels {}: {bad} voxels are not whole non-negative numbers (e.g. {example}); a \
             label map must hold label ids (was it resampled with linear interpolation?)",
            path.display()
        ))),
    }
}

/// Whether two volumes' affines agree to a thousandth of a millimetre.
fn affines_agree(a: &Volume, b: &Volume) -> bool {
    (a.affine - b.affine).abs().max() < 1e-3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Affine;

    #[test]
    fn example_config_parses() {
        let config: LoadConfig = toml::from_str(
            r#"
            image = "../shared/data/fsaverage/brain.mgz"
            labels = "../shared/data/fsaverage/aseg.mgz"
            non_finite = "zero"
            "#,
        )
        .unwrap();
        assert_eq!(config.non_finite, NonFinite::Zero);
        assert_eq!(config.files().len(), 2);
        let plain: LoadConfig = toml::from_str("").unwrap();
        assert_eq!(plain.non_finite, NonFinite::Error);
        assert!(toml::from_str::<LoadConfig>("non_finite = \"nan\"").is_err());
        assert!(toml::from_str::<LoadConfig>("imgae = \"x\"").is_err());
    }

    #[test]
    fn non_finite_voxels_are_counted_or_zeroed() {
        let data = vec![1.0, f32::NAN, f32::INFINITY, 2.0];
        let mut v = Volume::new(data.clone(), [2, 2, 1], Affine::identity());
        let err = check_finite(&mut v, Path::new("t1.nii"), NonFinite::Error).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("t1.nii") && text.contains("2 NaN"), "{text}");
        check_finite(&mut v, Path::new("t1.nii"), NonFinite::Zero).unwrap();
        assert_eq!(v.data, [1.0, 0.0, 0.0, 2.0]);
    }

    #[test]
    fn labels_that_are_not_whole_numbers_fail_naming_the_file() {
        use crate::volume::DataType;
        let dir = tempfile::tempdir().unwrap();
        let image = Volume::new(vec![1.0; 8], [2, 2, 2], Affine::identity());
        let (img, lab) = (dir.path().join("t1.nii"), dir.path().join("seg.nii"));
        crate::io::write_nifti(&img, &image, DataType::Float32).unwrap();
        let mut labels = vec![0.0, 2.0, 41.0, 2.0, 0.0, 0.0, 17.0, 0.0];
        crate::io::write_nifti(&lab, &image.with_data(labels.clone()), DataType::Float32).unwrap();
        let scan = load_scan(&img, Some(&lab), None, NonFinite::Error).unwrap();
        assert_eq!(scan.labels.unwrap().data, labels, "whole float labels pass");
        labels[2] = 2.5;
        labels[5] = -1.0;
        crate::io::write_nifti(&lab, &image.with_data(labels), DataType::Float32).unwrap();
        let err = load_scan(&img, Some(&lab), None, NonFinite::Error)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("seg.nii") && err.contains("2 voxels") && err.contains("2.5"),
            "{err}"
        );
    }

    /// What `validate` learns of a loaded scan's label map and mask: a constant node's
    /// from its own parameters, a subject's from its dataset entry.
    #[test]
    fn labels_and_mask_come_from_the_parameters_or_the_entry() {
        use crate::stage::ValueKind;
        let atlas = |text: &str| {
            toml::from_str::<LoadConfig>(&format!("image = \"brain.mgz\"\n{text}"))
                .unwrap()
                .build()
                .unwrap()
        };
        let none: &[ValueFacts] = &[];
        let labelled = atlas("labels = \"aseg.mgz\"");
        assert_eq!(labelled.output_labels(none), Some(true));
        assert_eq!(labelled.output_mask(none), Some(false));
        let bare = atlas("mask = \"brainmask.mgz\"");
        assert_eq!(bare.output_labels(none), Some(false));
        assert_eq!(bare.output_mask(none), Some(true));

        let per_subject = toml::from_str::<LoadConfig>("").unwrap().build().unwrap();
        for labels in [Some(true), Some(false), None] {
            let entry = ValueFacts {
                kind: Some(ValueKind::Entry),
                mask: None,
                labels,
            };
            assert_eq!(per_subject.output_labels(&[entry]), labels);
        }
    }

    #[test]
    fn constant_load_without_image_is_an_input_error() {
        let stage = LoadConfig {
            image: None,
            labels: None,
            mask: None,
            non_finite: NonFinite::Error,
        }
        .build()
        .unwrap();
        let ctx = Context {
            subject: "<constant>",
            output_dir: Path::new("."),
            node: "atlas",
            entry: None,
        };
        assert!(stage.process(&ctx, &Inputs::default()).is_err());
    }
}
