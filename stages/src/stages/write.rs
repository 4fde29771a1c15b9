//! `write`: saves a subject's segmentation, warped atlas and optionally the deformation.
//!
//! Files go to `<output_dir>/<subject>/` in the subject's **original** geometry: the voxels
//! are on the subject's file grid (as `segment` made them) and the affine written is the one
//! the input file stated (`header.affine`), not the corrected one used for computing. So
//! `seg.nii.gz` overlays the subject's image in any viewer even when the pipeline declared
//! the file's true orientation with `conform.assume_orientation`.
//!
//! A file about to be replaced that is one of the subject's own inputs (its image, labels or
//! mask) fails the subject instead, before anything is written: an output folder overlapping
//! the dataset must not turn ground truth into predictions.
//!
//! Left out: writing intermediate scans (other inputs are ignored), and the affine part of
//! the transform in `field.nii.gz`, which holds the displacement alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nalgebra::Matrix3;
use serde::Deserialize;

use crate::io::{IoError, write_nifti};
use crate::registry::{BuildError, StageConfig};
use crate::resample::{Interp, resample};
use crate::stage::{
    Context, Inputs, Segmentation, Stage, StageError, Value, ValueFacts, ValueKind,
};
use crate::volume::{DataType, Volume};

/// Parameters of a `write` node; inputs are a segmentation (writes `seg.nii.gz`,
/// `warped_atlas.nii.gz`, optionally `field.nii.gz`) and/or a skull-stripped scan (writes its
/// brain mask as `mask.nii.gz`), each in the subject's file geometry.
///
/// ```toml
/// [nodes.written]
/// type = "write"
/// inputs = ["segmented"]
/// field = true
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteConfig {
    /// Also write `field.nii.gz`: the displacement (3 frames, mm) on the subject's file grid.
    /// Default `false`.
    #[serde(default)]
    pub field: bool,
}

impl StageConfig for WriteConfig {
    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        Ok(Arc::new(Write { config: self }))
    }
}

/// The runtime `write` stage.
#[derive(Clone, Debug)]
pub struct Write {
    config: WriteConfig,
}

impl Stage for Write {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Written)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        use crate::stage::ValueKind::{Scan, Segmentation};
        Some(
            crate::stage::InputSpec {
                min: 1,
                max: usize::MAX,
                what: "[segmentation or skull-stripped scan, any others to wait for]",
                kinds: &[],
                rest: None,
                subject: &[],
                one_of: &[],
            }
            .needing_one_of(&[Segmentation, Scan]),
        )
    }

    /// Scans are written only for their mask: inputs whose only scans are known to carry
    /// none (and no segmentation) leave nothing to write.
    fn input_problem(&self, inputs: &[ValueFacts]) -> Option<String> {
        let writable = |f: &ValueFacts| match f.kind {
            Some(ValueKind::Segmentation) | None => true,
            Some(ValueKind::Scan) => f.mask != Some(false),
            Some(_) => false,
        };
        let scans = inputs.iter().any(|f| f.kind == Some(ValueKind::Scan));
        (scans && !inputs.iter().any(writable)).then(|| {
            "write: a scan is written as its brain mask, but no input scan carries one and no \
             input is a segmentation, so nothing would be written; feed it a `segment` or a \
             `skull_strip` node"
                .to_string()
        })
    }

    /// A segmentation input writes `seg`, `warped_atlas` (and `field`); a scan known to carry
    /// a mask writes `mask`. Inputs of unknown kind, or scans whose mask is not known, add
    /// nothing: only what is certain.
    fn writes(&self, inputs: &[ValueFacts]) -> Vec<&'static str> {
        let mut names = Vec::new();
        if inputs
            .iter()
            .any(|f| f.kind == Some(ValueKind::Scan) && f.mask == Some(true))
        {
            names.push("<subject>/mask.nii.gz");
        }
        if inputs
            .iter()
            .any(|f| f.kind == Some(ValueKind::Segmentation))
        {
            names.extend(["<subject>/seg.nii.gz", "<subject>/warped_atlas.nii.gz"]);
            if self.config.field {
                names.push("<subject>/field.nii.gz");
            }
        }
        names
    }

    fn process(&self, ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        // Limitation: only the first segmentation and the first masked scan are written;
        // other inputs only order this node after their nodes.
        let seg = inputs.find(|v| match v {
            Value::Segmentation(s) => Some(s),
            _ => None,
        });
        let masked = inputs.find(|v| match v {
            Value::Scan(s) if s.mask.is_some() => Some(s),
            _ => None,
        });
        if seg.is_none() && masked.is_none() {
            return Err(StageError::Input(
                "write: needs a segmentation or a scan with a mask among its inputs".into(),
            ));
        }
        // Dataset ids are checked when listed; a stage built another way must not escape
        // the output folder either.
        if !crate::stages::dataset::is_plain_name(ctx.subject) {
            return Err(StageError::Input(format!(
                "subject id {:?} is not a plain name; refusing to write outside {}",
                ctx.subject,
                ctx.output_dir.display()
            )));
        }
        let dir = ctx.output_dir.join(ctx.subject);
        let mut targets = Vec::new();
        if masked.is_some() {
            targets.push(dir.join("mask.nii.gz"));
        }
        if seg.is_some() {
            targets.extend(["seg.nii.gz", "warped_atlas.nii.gz"].map(|n| dir.join(n)));
            if self.config.field {
                targets.push(dir.join("field.nii.gz"));
            }
        }
        refuse_own_files(ctx, &targets)?;
        std::fs::create_dir_all(&dir).map_err(|error| IoError::Os {
            path: dir.clone(),
            error,
        })?;

        let mut written = Vec::new();
        if let Some(scan) = masked {
            written.push(save(
                &dir.join("mask.nii.gz"),
                &mask_on_file_grid(scan),
                DataType::Uint8,
            )?);
        }
        let Some(seg) = seg else {
            return Ok(Value::Written(Arc::new(written)));
        };
        let labels = in_file_geometry(&seg.labels);
        let dtype = label_dtype(&labels.data);
        written.push(save(&dir.join("seg.nii.gz"), &labels, dtype)?);
        let warped = in_file_geometry(&seg.warped_image);
        written.push(save(
            &dir.join("warped_atlas.nii.gz"),
            &warped,
            DataType::Float32,
        )?);
        if self.config.field {
            match field_on_file_grid(seg) {
                Some(field) => {
                    written.push(save(&dir.join("field.nii.gz"), &field, DataType::Float32)?)
                }
                None => tracing::debug!("Transform has no displacement; field.nii.gz not written"),
            }
        }
        Ok(Value::Written(Arc::new(written)))
    }
}

/// Fails the subject when a file `write` is about to replace is one of the subject's own
/// input files (its image, labels or mask, as its dataset entry names them): an output folder
/// that overlaps the dataset (a manifest's folder, a link into the dataset) would otherwise
/// replace the subject's ground truth with the prediction.
fn refuse_own_files(ctx: &Context<'_>, targets: &[PathBuf]) -> Result<(), StageError> {
    let Some(entry) = ctx.entry else {
        return Ok(());
    };
    let own = [
        ("image", Some(&entry.image)),
        ("labels", entry.labels.as_ref()),
        ("mask", entry.mask.as_ref()),
    ];
    for target in targets {
        // A file that does not exist yet is no input; one that does is compared as the
        // file system resolves it (links, `..`).
        let Ok(resolved) = target.canonicalize() else {
            continue;
        };
        for (what, path) in own.iter().filter_map(|(w, p)| Some((w, (*p)?))) {
            if path.canonicalize().is_ok_and(|p| p == resolved) {
                return Err(StageError::Input(format!(
                    "write: {} is this subject's own {what} file ({}); refusing to replace it \
                     with a result: choose an output folder outside the dataset",
                    target.display(),
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

fn save(path: &Path, volume: &Volume, dtype: DataType) -> Result<PathBuf, StageError> {
    let bytes = write_nifti(path, volume, dtype)?;
    tracing::debug!(file = %path.display(), bytes, dtype = dtype.name(), "Wrote");
    Ok(path.to_path_buf())
}

/// The volume with the affine its subject's file stated, so it overlays that file.
fn in_file_geometry(volume: &Volume) -> Volume {
    Volume {
        affine: volume.header.affine,
        ..volume.clone()
    }
}

/// A scan's mask on its subject's file grid (nearest neighbour), with the file's affine.
fn mask_on_file_grid(scan: &Arc<crate::stage::Scan>) -> Volume {
    let native = scan.native_scan();
    let mask = scan
        .mask
        .as_deref()
        .expect("only scans with a mask are passed here");
    let grid = native.image.grid();
    let mut out = if mask.grid() == grid {
        mask.clone()
    } else {
        resample(mask, &grid, Interp::Nearest, |p| p)
    };
    out.header = native.image.header.clone();
    in_file_geometry(&out)
}

/// `int16` when every value is an integer that fits, else `int32`.
fn label_dtype(data: &[f32]) -> DataType {
    let fits = data
        .iter()
        .all(|&v| v.fract() == 0.0 && (i16::MIN as f32..=i16::MAX as f32).contains(&v));
    if fits {
        DataType::Int16
    } else {
        // Limitation: labels are assumed integral; a fractional value would be truncated by
        // the int32 writer. `segment` only produces atlas values by nearest neighbour, so this
        // happens only with a non-integer atlas label map.
        DataType::Int32
    }
}

/// The displacement resampled onto the subject's file grid, its vectors expressed in the
/// world frame of the file's stated affine.
fn field_on_file_grid(seg: &Segmentation) -> Option<Volume> {
    let u = seg.transform.displacement.as_ref()?;
    let grid = seg.labels.grid();
    // Past the displacement's own grid it continues with its edge values, as in `map_point`.
    let to_u = crate::resample::inverse(&u.affine);
    let mut field = resample(u, &grid, Interp::Linear, |p| {
        let v = crate::resample::clamp_index(u.shape, crate::volume::apply(&to_u, p));
        crate::volume::apply(&u.affine, v)
    });
    field.header = seg.labels.header.clone();
    field.affine = seg.labels.header.affine;

    // The computation's world and the file's differ by stated · computed⁻¹ when an orientation
    // was declared; displacement vectors turn with it.
    let stated: Matrix3<f64> = seg
        .labels
        .header
        .affine
        .fixed_view::<3, 3>(0, 0)
        .into_owned();
    let computed: Matrix3<f64> = seg.labels.affine.fixed_view::<3, 3>(0, 0).into_owned();
    let turn = stated * computed.try_inverse().unwrap_or_else(Matrix3::identity);
    if (turn - Matrix3::identity()).abs().max() > 1e-9 {
        let n = field.len();
        for v in 0..n {
            let d = [field.data[v], field.data[n + v], field.data[2 * n + v]].map(f64::from);
            for r in 0..3 {
                let turned = turn[(r, 0)] * d[0] + turn[(r, 1)] * d[1] + turn[(r, 2)] * d[2];
                field.data[r * n + v] = turned as f32;
            }
        }
    }
    Some(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{Transform, TransformQuality};
    use crate::volume::{Affine, SourceHeader, affine_from_orientation};

    #[test]
    fn example_config_parses() {
        let config: WriteConfig = toml::from_str("field = true").unwrap();
        assert!(config.field);
        assert!(!toml::from_str::<WriteConfig>("").unwrap().field);
        assert!(toml::from_str::<WriteConfig>("fields = true").is_err());
    }

    /// A subject whose own mask sits where `write` would put `mask.nii.gz` (an output folder
    /// that is the manifest's folder) fails, naming the file, and the file keeps its bytes.
    #[test]
    fn a_subjects_own_file_is_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path().join("s0");
        std::fs::create_dir(&own).unwrap();
        let volume = Volume::new(vec![1.0; 8], [2, 2, 2], crate::volume::Affine::identity());
        for name in ["t1.nii.gz", "mask.nii.gz"] {
            write_nifti(&own.join(name), &volume, DataType::Uint8).unwrap();
        }
        let before = std::fs::read(own.join("mask.nii.gz")).unwrap();
        let mut scan = crate::stage::Scan::from_image(volume.clone());
        scan.mask = Some(Arc::new(Volume::new(
            vec![0.0; 8],
            [2, 2, 2],
            crate::volume::Affine::identity(),
        )));
        let scan = Value::Scan(Arc::new(scan));
        let entry = crate::stage::SubjectEntry {
            id: "s0".into(),
            image: own.join("t1.nii.gz"),
            labels: None,
            // Spelt another way than the target: compared as the file system resolves it.
            mask: Some(tmp.path().join("s0/../s0/mask.nii.gz")),
        };
        let write = Write {
            config: WriteConfig::default(),
        };
        let inputs = Inputs {
            values: vec![("scan", &scan)],
        };
        let mut ctx = Context {
            subject: "s0",
            output_dir: tmp.path(),
            node: "write",
            entry: Some(&entry),
        };
        let err = write.process(&ctx, &inputs).unwrap_err().to_string();
        assert!(
            err.contains(&own.join("mask.nii.gz").display().to_string())
                && err.contains("this subject's own mask file"),
            "{err}"
        );
        assert_eq!(std::fs::read(own.join("mask.nii.gz")).unwrap(), before);

        // Into another folder the same subject is written.
        let elsewhere = tmp.path().join("out");
        ctx.output_dir = &elsewhere;
        assert!(write.process(&ctx, &inputs).is_ok());
        assert!(elsewhere.join("s0/mask.nii.gz").is_file());
    }

    /// What `validate` compares between two `write` nodes: only the files that are sure.
    #[test]
    fn written_names_follow_the_known_input_kinds() {
        let facts = |kind, mask| ValueFacts {
            kind,
            mask,
            ..ValueFacts::default()
        };
        let seg = facts(Some(ValueKind::Segmentation), None);
        let masked = facts(Some(ValueKind::Scan), Some(true));
        let maybe = facts(Some(ValueKind::Scan), None);
        let unknown = facts(None, None);
        let plain = Write {
            config: WriteConfig::default(),
        };
        let with_field = Write {
            config: WriteConfig { field: true },
        };
        assert_eq!(
            plain.writes(&[seg, masked]),
            [
                "<subject>/mask.nii.gz",
                "<subject>/seg.nii.gz",
                "<subject>/warped_atlas.nii.gz"
            ]
        );
        assert_eq!(
            with_field.writes(&[seg]).last(),
            Some(&"<subject>/field.nii.gz")
        );
        assert!(plain.writes(&[maybe, unknown]).is_empty());
    }

    #[test]
    fn labels_choose_the_smallest_integer_type() {
        assert_eq!(label_dtype(&[0.0, 2035.0, -3.0]), DataType::Int16);
        assert_eq!(label_dtype(&[0.0, 40000.0]), DataType::Int32);
        assert_eq!(label_dtype(&[0.5]), DataType::Int32);
    }

    #[test]
    fn field_turns_into_the_files_stated_frame() {
        let shape = [2, 2, 2];
        let lia = affine_from_orientation("LIA", [1.0; 3], shape, [0.0; 3]).unwrap();
        let mut labels = Volume::new(vec![0.0; 8], shape, lia);
        labels.header = Arc::new(SourceHeader::derived(Affine::identity()));
        // A uniform displacement of +1 mm along world x (towards R) in the computation frame.
        let mut u = Volume::new(vec![0.0; 8], shape, lia);
        u.data.extend(vec![0.0; 16]);
        u.data[..8].fill(1.0);
        u.frames = 3;
        let labels = Arc::new(labels);
        let seg = Segmentation {
            labels: labels.clone(),
            initial_labels: labels.clone(),
            warped_image: labels.clone(),
            transform: Arc::new(Transform {
                affine: Affine::identity(),
                displacement: Some(Arc::new(u)),
                inverse: None,
                fixed_grid: labels.grid(),
                quality: TransformQuality::default(),
            }),
        };
        let field = field_on_file_grid(&seg).unwrap();
        assert_eq!(field.affine, Affine::identity());
        // Along the first voxel axis, which the file calls +x and truly points left: -1.
        assert!(field.frame(0).iter().all(|&v| (v + 1.0).abs() < 1e-6));
        assert!(
            field
                .frame(1)
                .iter()
                .chain(field.frame(2))
                .all(|&v| v.abs() < 1e-6)
        );
    }
}
