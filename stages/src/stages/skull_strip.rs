//! `skull_strip`: removes non-brain tissue by multiplying the image with a brain mask.
//!
//! Registering a skull-stripped atlas to a head with skull pulls the atlas brain onto the
//! scalp; stripping the subject first avoids that. The mask comes from one of three methods:
//! the scan's own mask (a dataset column, or a `mask` file); the atlas method, with the brain
//! masks of other heads carried onto the subject by registration, fused by voting, with the
//! subject's own boundary kept near them ([`crate::skullstrip::atlas`]); or the classical `auto` extraction
//! ([`crate::skullstrip::auto`]). The output scan carries the mask it used, so later stages
//! (`normalize` with `within_mask`) see it.
//!
//! The atlas method takes its heads from the node's `atlases` list, each with an `id`. An
//! atlas whose id is the subject's id, or whose image is the subject's image file, is never
//! used for that subject, so one list serves a dataset whose subjects are the atlases
//! themselves (leave-one-out). Without `atlases` it takes one atlas and a ready transform
//! from its inputs instead.
//!
//! Left out: learned brain extraction, erosion (negative `dilate_mm`); an empty mask is an
//! error rather than a pass-through.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::io::read_volume;
use crate::registry::{BuildError, StageConfig};
use crate::resample::{Interp, resample, warp};
use crate::skullstrip::{AtlasHead, AtlasParams, Edge, atlas, auto, dilate_mm, refine_boundary};
use crate::stage::{Context, Inputs, Scan, Stage, StageError, Value, ValueFacts};
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
/// With the brains of other heads (`inputs = [scan]`; each subject uses every listed atlas
/// whose id is not its own):
///
/// ```toml
/// [nodes.stripped]
/// type = "skull_strip"
/// inputs = ["head"]
/// method = "atlas"
///
/// [[nodes.stripped.atlases]]
/// id = "colin27"
/// image = "colin27/ch2.nii.gz"
/// mask = "colin27/ch2bet.nii.gz"
///
/// [[nodes.stripped.atlases]]
/// id = "mni152"
/// image = "mni152/MNI152_T1.nii.gz"
/// mask = "mni152/MNI152_mask.nii.gz"
///
/// [nodes.stripped.atlas]              # optional: crate::skullstrip::AtlasParams
/// register.resolution_mm = 2.0
/// boundary.csf_fraction = 0.45         # how much of the CSF layer is brain (0 to 1)
/// edge = "atlases"                     # or take that share from the atlases' own masks
/// ```
///
/// With one atlas's brain and a registration made elsewhere
/// (`inputs = [subject scan, transform, atlas scan]`):
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
    /// For `"atlas"`: heads with skull and their brain masks, registered to each subject in
    /// turn. Each subject uses those whose `id` differs from its own.
    #[serde(default)]
    pub atlases: Vec<AtlasHeadConfig>,
    /// For `"atlas"` with `atlases`: registration and boundary settings
    /// ([`crate::skullstrip::AtlasParams`]); `refine` above switches the boundary step.
    #[serde(default)]
    pub atlas: AtlasParams,
    /// For `"auto"`: the classical method's settings ([`crate::skullstrip::AutoParams`]),
    /// e.g. `[nodes.strip.auto] refine.csf_fraction = 0.3`.
    #[serde(default)]
    pub auto: crate::skullstrip::AutoParams,
}

fn yes() -> bool {
    true
}

/// One atlas head of a `skull_strip` node's `atlases` list.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtlasHeadConfig {
    /// The id of the subject this head is (never used to strip that subject).
    pub id: String,
    /// The head image, with skull.
    pub image: PathBuf,
    /// Its brain mask on the same grid (inside: value > 0).
    pub mask: PathBuf,
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

/// Largest `dilate_mm` accepted: a margin wider than a few centimetres keeps the whole head
/// (and costs a dilation over the whole volume), so it can only be a typo.
const MAX_DILATE_MM: f64 = 50.0;

impl StageConfig for SkullStripConfig {
    fn files(&self) -> Vec<(String, PathBuf)> {
        let atlases = self.atlases.iter().flat_map(|a| {
            [
                (format!("atlases.{}.image", a.id), a.image.clone()),
                (format!("atlases.{}.mask", a.id), a.mask.clone()),
            ]
        });
        self.mask
            .iter()
            .map(|m| ("mask".to_string(), m.clone()))
            .chain(atlases)
            .collect()
    }

    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        if !(0.0..=MAX_DILATE_MM).contains(&self.dilate_mm) {
            return Err(BuildError::Invalid(format!(
                "skull_strip: dilate_mm must be from 0 to {MAX_DILATE_MM} mm, got {}",
                self.dilate_mm
            )));
        }
        if self.method != StripMethod::Mask && self.mask.is_some() {
            return Err(BuildError::Invalid(
                "skull_strip: `mask` applies to method = \"mask\" only".into(),
            ));
        }
        if self.method != StripMethod::Atlas && !self.atlases.is_empty() {
            return Err(BuildError::Invalid(
                "skull_strip: `atlases` applies to method = \"atlas\" only".into(),
            ));
        }
        let mut ids: Vec<&str> = self.atlases.iter().map(|a| a.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(BuildError::Invalid(format!(
                "skull_strip: atlas id {:?} is listed twice",
                w[0]
            )));
        }
        let problems = self.atlas.register.problems();
        if !problems.is_empty() {
            return Err(BuildError::Invalid(format!(
                "skull_strip: atlas.register: {}",
                problems.join("; ")
            )));
        }
        if let Some(problem) = self.atlas.register.device.unavailable() {
            return Err(BuildError::Invalid(format!(
                "skull_strip: atlas.register: {problem}"
            )));
        }
        Ok(Arc::new(SkullStrip {
            config: self,
            mask_file: OnceLock::new(),
            atlas_heads: OnceLock::new(),
        }))
    }
}

/// The runtime `skull_strip` stage.
#[derive(Debug)]
pub struct SkullStrip {
    config: SkullStripConfig,
    /// The `mask` file, read once and shared by every subject.
    mask_file: OnceLock<Result<Arc<Volume>, String>>,
    /// The `atlases` heads, read once (on first use) and shared by every subject.
    atlas_heads: OnceLock<Result<Arc<Vec<AtlasHead>>, String>>,
}

impl Stage for SkullStrip {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Scan)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        Some(
            if self.config.method == StripMethod::Atlas && self.config.atlases.is_empty() {
                crate::stage::InputSpec::of(
                    &[
                        crate::stage::ValueKind::Scan,
                        crate::stage::ValueKind::Transform,
                        crate::stage::ValueKind::Scan,
                    ],
                    "[scan, registration, atlas scan] when no `atlases` are listed",
                )
            } else {
                crate::stage::InputSpec::of(&[crate::stage::ValueKind::Scan], "[scan]")
            },
        )
    }

    fn output_mask(&self, _inputs: &[ValueFacts]) -> Option<bool> {
        Some(true)
    }

    /// The scan's label map is kept (the atlas's, with `method = "atlas"`, is not taken).
    fn output_labels(&self, inputs: &[ValueFacts]) -> Option<bool> {
        inputs.first()?.labels
    }

    /// The mask method on scans known to carry no mask (a dataset or `load` without `mask`)
    /// and without a `mask` file would fail every subject.
    fn input_problem(&self, inputs: &[ValueFacts]) -> Option<String> {
        let own = self.config.method == StripMethod::Mask && self.config.mask.is_none();
        (own && inputs.first().is_some_and(|f| f.mask == Some(false))).then(|| {
            "skull_strip: method = \"mask\" applies the brain mask the scan carries, but the \
             scans of input 0 carry none (their dataset or `load` names no `mask`); give the \
             dataset a `mask`, set `mask = \"FILE\"` here, or use method = \"auto\" or \
             \"atlas\""
                .to_string()
        })
    }

    fn kind(&self) -> crate::stage::StageKind {
        crate::stage::StageKind::Compute
    }

    fn process(&self, ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let scan = inputs.scan(0)?;
        let grid = scan.image.grid();
        let mask = match self.config.method {
            StripMethod::Mask => self.own_mask(scan)?,
            StripMethod::Atlas if !self.config.atlases.is_empty() => {
                self.other_heads_mask(ctx, scan)?
            }
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
    /// The atlas method with the `atlases` list: every head but the subject's own.
    fn other_heads_mask(&self, ctx: &Context<'_>, scan: &Scan) -> Result<Volume, StageError> {
        let heads = self
            .atlas_heads
            .get_or_init(|| load_atlases(&self.config.atlases, &self.config.atlas).map(Arc::new))
            .clone()
            .map_err(StageError::Input)?;
        let own = same_file(&scan.image.header.path);
        let usable: Vec<&AtlasHead> = heads
            .iter()
            .filter(|h| h.id != ctx.subject && same_file(&h.image.header.path) != own)
            .collect();
        if usable.is_empty() {
            return Err(StageError::Input(format!(
                "skull_strip: subject {} ({}): no atlas head other than its own; list at \
                 least one head with another id in `atlases`",
                ctx.subject,
                scan.image.header.path.display()
            )));
        }
        let ids: Vec<&str> = usable.iter().map(|h| h.id.as_str()).collect();
        tracing::debug!(subject = ctx.subject, atlases = ?ids, "Atlas heads chosen");
        let mut params = self.config.atlas.clone();
        params.refine = self.config.refine;
        let stripped = atlas(&scan.image, &usable, &params).map_err(|e| failed(scan, e))?;
        Ok(stripped.mask)
    }

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

/// Reads every atlas head and its mask (binarised: inside where the file's value is > 0),
/// and, when the masks' edge convention is followed, measures each one's edge once.
fn load_atlases(list: &[AtlasHeadConfig], params: &AtlasParams) -> Result<Vec<AtlasHead>, String> {
    list.iter()
        .map(|a| {
            let image = read_volume(&a.image).map_err(|e| format!("atlas {}: {e}", a.id))?;
            let mask = read_volume(&a.mask).map_err(|e| format!("atlas {}: {e}", a.id))?;
            if mask.shape != image.shape {
                return Err(format!(
                    "atlas {}: mask {} has shape {:?} but image {} has {:?}",
                    a.id,
                    a.mask.display(),
                    mask.shape,
                    a.image.display(),
                    image.shape
                ));
            }
            let mut head = AtlasHead::new(a.id.clone(), image, binarize(&mask));
            if params.edge == Edge::Atlases {
                head.measure_edge(&params.boundary)
                    .map_err(|e| e.to_string())?;
            }
            Ok(head)
        })
        .collect()
}

/// A file's identity for "is this the subject's own head": its canonical path when it
/// exists, else the path as given.
fn same_file(path: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
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
    fn a_margin_wider_than_a_head_is_refused() {
        for bad in ["dilate_mm = 1e6", "dilate_mm = -1.0", "dilate_mm = nan"] {
            let config: SkullStripConfig = toml::from_str(bad).unwrap();
            let err = config
                .build()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("dilate_mm must be from 0 to 50"),
                "{bad}: {err}"
            );
        }
    }

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

    #[test]
    fn atlas_list_parses_and_is_checked() {
        let list = r#"
            method = "atlas"
            [[atlases]]
            id = "colin27"
            image = "colin27/ch2.nii.gz"
            mask = "colin27/ch2bet.nii.gz"
            [[atlases]]
            id = "mni152"
            image = "mni152/MNI152_T1.nii.gz"
            mask = "mni152/MNI152_mask.nii.gz"
            [atlas]
            register.resolution_mm = 3.0
            boundary.csf_fraction = 0.4
        "#;
        let config: SkullStripConfig = toml::from_str(list).unwrap();
        assert_eq!(config.atlases.len(), 2);
        assert_eq!(config.atlas.register.resolution_mm, 3.0);
        assert_eq!(config.atlas.boundary.csf_fraction, 0.4);
        assert_eq!(config.atlas.reach_mm, 10.0, "other atlas defaults kept");
        assert_eq!(
            config.atlas.boundary.search_mm, 6.0,
            "other boundary defaults kept"
        );
        assert_eq!(config.atlas.register.deformable.levels, [4, 2]);
        assert_eq!(config.atlas.edge, Edge::Subject);
        let edge = list.replace("[atlas]", "[atlas]\nedge = \"atlases\"");
        let config_edge: SkullStripConfig = toml::from_str(&edge).unwrap();
        assert_eq!(config_edge.atlas.edge, Edge::Atlases);
        let err = toml::from_str::<SkullStripConfig>(&edge.replace("\"atlases\"", "\"bet\""))
            .unwrap_err();
        assert!(err.to_string().contains("subject") && err.to_string().contains("atlases"));
        let typo = list.replace("csf_fraction", "csf_fractoin");
        let err = toml::from_str::<SkullStripConfig>(&typo).unwrap_err();
        assert!(err.to_string().contains("csf_fractoin"), "{err}");
        assert_eq!(config.files().len(), 4);
        assert!(config.build().is_ok());
        let twice = list.replace("\"mni152\"", "\"colin27\"");
        let err = toml::from_str::<SkullStripConfig>(&twice)
            .unwrap()
            .build()
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("listed twice")));
        let auto = list.replace("method = \"atlas\"", "method = \"auto\"");
        let config: SkullStripConfig = toml::from_str(&auto).unwrap();
        assert!(config.build().is_err(), "atlases with method auto");
    }

    #[test]
    fn a_subject_is_never_stripped_with_its_own_head() {
        let dir = tempfile::tempdir().unwrap();
        let head = Volume::new(vec![1.0; 27], [3, 3, 3], Affine::identity());
        let (image, mask) = (dir.path().join("head.nii"), dir.path().join("mask.nii"));
        crate::io::write_nifti(&image, &head, crate::volume::DataType::Float32).unwrap();
        crate::io::write_nifti(&mask, &head, crate::volume::DataType::Float32).unwrap();
        let config = format!(
            "method = \"atlas\"\n[[atlases]]\nid = \"s1\"\nimage = {:?}\nmask = {:?}",
            image.display().to_string(),
            mask.display().to_string()
        );
        // The context's subject is "s1", the only atlas's id.
        let err = run(&config, &[Value::Scan(Arc::new(Scan::from_image(head)))]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("s1") && text.contains("own"), "{text}");
        // The same file under another id is the subject's own head too.
        let renamed = config.replace("id = \"s1\"", "id = \"other\"");
        let own = crate::io::read_volume(&image).unwrap();
        let err = run(&renamed, &[Value::Scan(Arc::new(Scan::from_image(own)))]).unwrap_err();
        assert!(err.to_string().contains("own"), "{err}");
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
            entry: None,
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
