//! The contract between the engine and a stage, and the values stages hand each other.
//!
//! A pipeline node runs one [`Stage`]. For each subject the engine calls [`Stage::process`]
//! with the values its upstream nodes produced for that subject (or, for nodes whose inputs
//! are all constant, once for the whole run), in the order the node's `inputs` lists them.
//! Values are reference-counted, so the atlas is loaded once and shared by every subject
//! without copying.
//!
//! A stage never sees other subjects and never panics on bad data: it returns a
//! [`StageError`] that the engine records against the subject before moving on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::volume::{Grid, Volume};

/// One row of a dataset: a subject id and where its files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectEntry {
    /// Subject id (folder name or manifest column), used for output folders and reports.
    pub id: String,
    /// The image file.
    pub image: PathBuf,
    /// The label map, when the dataset has one.
    pub labels: Option<PathBuf>,
    /// A brain mask, when the dataset has one.
    pub mask: Option<PathBuf>,
}

/// An image with its optional label map and brain mask, all on the same grid.
#[derive(Clone, Debug)]
pub struct Scan {
    /// The intensity image.
    pub image: Arc<Volume>,
    /// A label map on the image's grid.
    pub labels: Option<Arc<Volume>>,
    /// A brain mask (non-zero inside) on the image's grid.
    pub mask: Option<Arc<Volume>>,
    /// The scan on its own file grid (after any declared orientation fix), before a stage
    /// resampled it. `None` means this scan is itself on its file grid.
    pub native: Option<Arc<Scan>>,
}

impl Scan {
    /// A scan holding just an image, on its own file grid.
    pub fn from_image(image: Volume) -> Scan {
        Scan {
            image: Arc::new(image),
            labels: None,
            mask: None,
            native: None,
        }
    }

    /// The scan on its own file grid: `native` if set, else `self`.
    pub fn native_scan(self: &Arc<Scan>) -> Arc<Scan> {
        self.native.clone().unwrap_or_else(|| self.clone())
    }
}

/// A spatial mapping from a fixed (subject) space to a moving (atlas) space.
///
/// A world point `p` of the fixed space maps to `affine · (p + u(p))` in the moving space,
/// where `u` is the displacement field, in mm, sampled trilinearly on its grid (zero outside).
#[derive(Clone, Debug)]
pub struct Transform {
    /// World-to-world affine applied after the displacement.
    pub affine: crate::volume::Affine,
    /// Displacement (3 frames: x, y, z world mm) on the fixed registration grid, if deformable.
    pub displacement: Option<Arc<Volume>>,
    /// The inverse mapping (moving to fixed), when the registration computed it.
    pub inverse: Option<Arc<Transform>>,
    /// The grid the registration worked on (the conformed fixed image's grid).
    pub fixed_grid: Grid,
    /// Quality figures of the deformation.
    pub quality: TransformQuality,
}

/// Quality of a deformation, for the report.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TransformQuality {
    /// Percentage of fixed-grid voxels whose mapping has a Jacobian determinant ≤ 0.
    pub nonpositive_jacobian_pct: f64,
    /// Standard deviation of log Jacobian determinant (over voxels with a positive one).
    pub log_jacobian_std: f64,
    /// Final similarity value (loss) the optimiser reached.
    pub final_loss: f64,
}

/// What `segment` produces: atlas labels and image carried into the subject's file grid.
#[derive(Clone, Debug)]
pub struct Segmentation {
    /// Atlas labels through the registration, on the subject's file grid.
    pub labels: Arc<Volume>,
    /// Atlas labels through the headers alone (no registration), for the "before" Dice.
    pub initial_labels: Arc<Volume>,
    /// The atlas image through the registration, on the subject's file grid.
    pub warped_image: Arc<Volume>,
    /// The transform that produced them.
    pub transform: Arc<Transform>,
}

/// Per-label Dice scores of one subject.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Scores {
    /// `(label, dice before registration, dice after)`; a label absent from both volumes is
    /// skipped, so it has no row.
    pub per_label: Vec<(u32, f64, f64)>,
    /// Mean over `per_label` before registration.
    pub mean_before: f64,
    /// Mean over `per_label` after registration.
    pub mean_after: f64,
    /// Quality of the deformation, when known.
    pub quality: Option<TransformQuality>,
}

/// A value a stage produces for one subject (or once, for a constant node).
#[derive(Clone, Debug)]
pub enum Value {
    /// A dataset row: where a subject's files are.
    Entry(Arc<SubjectEntry>),
    /// An image with optional labels and mask.
    Scan(Arc<Scan>),
    /// A registration result.
    Transform(Arc<Transform>),
    /// Labels carried into the subject's grid.
    Segmentation(Arc<Segmentation>),
    /// Dice scores.
    Scores(Arc<Scores>),
    /// Files a sink wrote.
    Written(Arc<Vec<PathBuf>>),
}

impl Value {
    /// Which kind of value this is.
    pub fn value_kind(&self) -> ValueKind {
        match self {
            Value::Entry(_) => ValueKind::Entry,
            Value::Scan(_) => ValueKind::Scan,
            Value::Transform(_) => ValueKind::Transform,
            Value::Segmentation(_) => ValueKind::Segmentation,
            Value::Scores(_) => ValueKind::Scores,
            Value::Written(_) => ValueKind::Written,
        }
    }

    /// A short name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        self.value_kind().name()
    }
}

/// The kinds of [`Value`], so `validate` can check a node's inputs before anything runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// [`Value::Entry`].
    Entry,
    /// [`Value::Scan`].
    Scan,
    /// [`Value::Transform`].
    Transform,
    /// [`Value::Segmentation`].
    Segmentation,
    /// [`Value::Scores`].
    Scores,
    /// [`Value::Written`].
    Written,
}

impl ValueKind {
    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ValueKind::Entry => "dataset entry",
            ValueKind::Scan => "scan",
            ValueKind::Transform => "transform",
            ValueKind::Segmentation => "segmentation",
            ValueKind::Scores => "scores",
            ValueKind::Written => "written files",
        }
    }

    /// The name with its article, as a sentence says it ("a scan", "Dice scores").
    pub fn described(self) -> &'static str {
        match self {
            ValueKind::Entry => "a dataset entry",
            ValueKind::Scan => "a scan",
            ValueKind::Transform => "a transform",
            ValueKind::Segmentation => "a segmentation",
            ValueKind::Scores => "Dice scores",
            ValueKind::Written => "written files",
        }
    }
}

/// What `validate` knows of the value a node gives each subject, before anything runs: what
/// [`Stage::output`], [`Stage::output_mask`] and [`Stage::output_labels`] say, worked out
/// node by node from the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ValueFacts {
    /// Its kind; `None` when it depends on the inputs or the node could not be built.
    pub kind: Option<ValueKind>,
    /// For a scan or a dataset entry: `Some(true)` when every subject's carries a brain mask,
    /// `Some(false)` when none does, `None` when it is not known or differs between subjects.
    pub mask: Option<bool>,
    /// For a scan or a dataset entry: `Some(true)` when every subject's carries a label map,
    /// `Some(false)` when none does, `None` when it is not known or differs between subjects.
    /// A declared label file that one subject lacks still counts as carried: that subject
    /// fails alone, when its files are read.
    pub labels: Option<bool>,
}

impl ValueFacts {
    /// Whether this is known to be a scan without a label map, for every subject.
    pub fn scan_without_labels(&self) -> bool {
        self.kind == Some(ValueKind::Scan) && self.labels == Some(false)
    }
}

/// The inputs a stage takes: between `min` and `max` upstream nodes, described by `what`,
/// each of a kind `kinds` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputSpec {
    /// Fewest inputs.
    pub min: usize,
    /// Most inputs.
    pub max: usize,
    /// What they are, in order, as the docs write it (e.g. `[atlas scan, subject scan]`).
    pub what: &'static str,
    /// The kind each input must be, by position; positions past the end take `rest`'s.
    pub kinds: &'static [ValueKind],
    /// The kind of every input past `kinds`; `None` for any kind.
    pub rest: Option<ValueKind>,
    /// Positions that must carry the subject's own data: a constant there (the atlas) means
    /// the inputs are in the wrong order.
    pub subject: &'static [usize],
    /// Kinds of which at least one input must be, wherever it is listed (`write` needs
    /// something to write); empty when any mix will do.
    pub one_of: &'static [ValueKind],
}

impl InputSpec {
    /// Exactly the `n` inputs `what` lists, of any kind.
    pub const fn exactly(n: usize, what: &'static str) -> InputSpec {
        InputSpec {
            min: n,
            max: n,
            what,
            kinds: &[],
            rest: None,
            subject: &[],
            one_of: &[],
        }
    }

    /// Exactly the inputs `kinds` lists, in that order; `what` describes them.
    pub const fn of(kinds: &'static [ValueKind], what: &'static str) -> InputSpec {
        InputSpec {
            min: kinds.len(),
            max: kinds.len(),
            what,
            kinds,
            rest: None,
            subject: &[],
            one_of: &[],
        }
    }

    /// This spec with `positions` marked as the subject's own ([`InputSpec::subject`]).
    pub const fn subject_at(self, positions: &'static [usize]) -> InputSpec {
        InputSpec {
            subject: positions,
            ..self
        }
    }

    /// This spec with at least one input of a kind in `kinds` required
    /// ([`InputSpec::one_of`]).
    pub const fn needing_one_of(self, kinds: &'static [ValueKind]) -> InputSpec {
        InputSpec {
            one_of: kinds,
            ..self
        }
    }

    /// The kind input `n` must be, if the stage needs one.
    pub fn kind_at(&self, n: usize) -> Option<ValueKind> {
        self.kinds.get(n).copied().or(self.rest)
    }
}

/// The values a node receives: one per declared input, in declaration order.
#[derive(Debug, Default)]
pub struct Inputs<'a> {
    /// `(upstream node name, its value)`.
    pub values: Vec<(&'a str, &'a Value)>,
}

impl<'a> Inputs<'a> {
    /// The `n`-th input, or an error naming what was expected.
    pub fn get(&self, n: usize) -> Result<&'a Value, StageError> {
        self.values
            .get(n)
            .map(|(_, v)| *v)
            .ok_or_else(|| StageError::Input(format!("expected at least {} inputs", n + 1)))
    }

    /// The `n`-th input, which must be a scan.
    pub fn scan(&self, n: usize) -> Result<&'a Arc<Scan>, StageError> {
        match self.get(n)? {
            Value::Scan(s) => Ok(s),
            other => Err(self.wrong(n, "scan", other)),
        }
    }

    /// The first input holding a value of the wanted kind, found by `pick`.
    pub fn find<T>(&self, pick: impl Fn(&'a Value) -> Option<T>) -> Option<T> {
        self.values.iter().find_map(|(_, v)| pick(v))
    }

    fn wrong(&self, n: usize, want: &str, got: &Value) -> StageError {
        let name = self.values.get(n).map(|(name, _)| *name).unwrap_or("?");
        StageError::Input(format!(
            "input {n} ({name}) is a {}, expected a {want}",
            got.kind()
        ))
    }
}

/// Where a stage runs: the engine keeps compute stages off the async runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageKind {
    /// Reads or writes files; runs on the async runtime's blocking pool.
    Io,
    /// Heavy numerical work (libtorch); runs on dedicated worker threads.
    Compute,
}

/// What a stage knows about the subject and run it works for.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// The subject id (`"<constant>"` for constant nodes).
    pub subject: &'a str,
    /// The pipeline's output directory.
    pub output_dir: &'a Path,
    /// The node's name in the pipeline file.
    pub node: &'a str,
    /// The subject's dataset entry (where its own files are), for per-subject nodes; `None`
    /// for constant nodes and for a sink's [`Stage::finish`]. `write` never replaces these
    /// files.
    pub entry: Option<&'a SubjectEntry>,
}

/// One subject's outcome, as the engine saw it; given to sinks at the end of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SubjectOutcome {
    /// Subject id.
    pub subject: String,
    /// `None` if every stage succeeded, else `(node, reason)` of the first failure.
    pub failure: Option<(String, String)>,
    /// Seconds spent in each node, in pipeline order.
    pub timings: Vec<(String, f64)>,
    /// Dice scores, when a `dice` node ran.
    pub scores: Option<Scores>,
}

/// Everything a sink needs at the end of a run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunSummary {
    /// Pipeline name.
    pub pipeline: String,
    /// One outcome per subject that went through every node, in the order they finished.
    pub subjects: Vec<SubjectOutcome>,
    /// Wall-clock time of the whole run.
    pub elapsed: Duration,
    /// Whether a signal stopped the run before every subject finished.
    pub interrupted: bool,
    /// Subjects the interruption stopped before their last node, or before their first: none
    /// of their results count (files a node already wrote for them stay, each complete).
    pub not_run: Vec<String>,
}

/// A stage failed for one subject.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    /// The inputs are not what the stage needs (wrong kind, missing labels, shapes disagree).
    #[error("{0}")]
    Input(String),
    /// The data cannot be processed (NaNs where none may be, empty masks, …).
    #[error("{0}")]
    Data(String),
    /// libtorch reported an error.
    #[error("libtorch: {}", torch_message(.0))]
    Torch(#[from] tch::TchError),
}

/// libtorch's message without the C++ stack trace it appends (`Exception raised from …`,
/// `frame #N: …`), which says nothing to a user and buries the reason in reports.
pub(crate) fn torch_message(e: &tch::TchError) -> String {
    let full = e.to_string();
    let cut = ["Exception raised from", "frame #"]
        .iter()
        .filter_map(|m| full.find(m))
        .min()
        .unwrap_or(full.len());
    full[..cut].trim_end().to_string()
}

/// A pipeline step. Implementations are built from their `*Config` by the registry.
pub trait Stage: Send + Sync {
    /// How many inputs the stage takes and what they are, so `validate` can reject a wrong
    /// count with the node's line; `None` when it accepts any number.
    fn inputs(&self) -> Option<InputSpec> {
        None
    }

    /// The kind of value [`Stage::process`] returns, so `validate` can check what consumes
    /// it; `None` when it depends on the inputs.
    fn output(&self) -> Option<ValueKind> {
        None
    }

    /// Whether the scan (or dataset entry) [`Stage::process`] returns carries a brain mask,
    /// given what is known of its inputs (in declared order), as [`ValueFacts::mask`] says
    /// it; `None` (the default) when the stage cannot tell or gives no scan.
    fn output_mask(&self, _inputs: &[ValueFacts]) -> Option<bool> {
        None
    }

    /// Whether the scan (or dataset entry) [`Stage::process`] returns carries a label map,
    /// given what is known of its inputs (in declared order), as [`ValueFacts::labels`] says
    /// it; `None` (the default) when the stage cannot tell or gives no scan.
    fn output_labels(&self, _inputs: &[ValueFacts]) -> Option<bool> {
        None
    }

    /// Why inputs of these facts (in declared order) would fail every subject, if `validate`
    /// can tell before anything runs: what the counts and kinds of [`Stage::inputs`] cannot
    /// say, such as a scan without the mask or label map the stage needs. `None` (the
    /// default) when nothing is known to be wrong.
    fn input_problem(&self, _inputs: &[ValueFacts]) -> Option<String> {
        None
    }

    /// Files this node is sure to write in the output folder, given what is known of its
    /// inputs (in declared order): names relative to the output folder, with a subject's own
    /// files under `<subject>/`. `validate` rejects two nodes sure to write the same file,
    /// since the last to finish would silently replace the other's. Empty (the default) when
    /// the stage writes nothing or cannot tell.
    fn writes(&self, _inputs: &[ValueFacts]) -> Vec<&'static str> {
        Vec::new()
    }

    /// Where the engine should run it.
    fn kind(&self) -> StageKind {
        StageKind::Io
    }

    /// Processes one subject's inputs (or, for a constant node, the run's).
    ///
    /// # Errors
    /// Any failure for this subject; the engine records it and the run goes on.
    fn process(&self, ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError>;

    /// Whether [`Stage::process_batch`] does better than one [`Stage::process`] per subject,
    /// so a node of this type may set `batch`.
    fn batches(&self) -> bool {
        false
    }

    /// Processes several subjects' inputs in one call, one result per item in the same
    /// order. The engine calls it (with two or more items) only on nodes with `batch` > 1.
    /// The default processes them one by one.
    fn process_batch(&self, items: &[(Context<'_>, Inputs<'_>)]) -> Vec<Result<Value, StageError>> {
        items
            .iter()
            .map(|(ctx, inputs)| self.process(ctx, inputs))
            .collect()
    }

    /// Called once after every subject went through, with the whole run's outcomes. Sinks
    /// (the report) write their files here.
    ///
    /// # Errors
    /// If the sink could not write its output.
    fn finish(
        &self,
        _ctx: &Context<'_>,
        _summary: &RunSummary,
    ) -> Result<Vec<PathBuf>, StageError> {
        Ok(Vec::new())
    }

    /// For source nodes: the subjects of the dataset, each becoming one stream element.
    /// `None` for every other stage.
    ///
    /// # Errors
    /// If the dataset cannot be listed (missing root, unreadable manifest).
    fn subjects(&self) -> Option<Result<Vec<SubjectEntry>, StageError>> {
        None
    }

    /// For source nodes: the subjects of a run that writes into `output`, which must not
    /// land among the subjects' own files. The default is [`Stage::subjects`]; `dataset`
    /// refuses an `output` that is its root or holds it, and leaves out subject folders that
    /// are, lie inside or hold `output` (a second run must not find the first's results as
    /// a subject).
    ///
    /// # Errors
    /// As [`Stage::subjects`], and when `output` would put the run's files among the
    /// dataset's.
    fn subjects_for_run(&self, _output: &Path) -> Option<Result<Vec<SubjectEntry>, StageError>> {
        self.subjects()
    }
}
