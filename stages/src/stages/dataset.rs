//! `dataset`: the source stage that lists a dataset's subjects and where their files are.
//!
//! Two layouts are supported: one folder per subject under a root (matched by a glob, each
//! holding files with the same names), or a CSV manifest with one row per subject. Listing
//! only looks at names; it never opens a volume, so a subject whose image is missing still
//! yields an entry and fails alone in `load`, with the other subjects going on.
//!
//! A run's listing ([`Stage::subjects_for_run`]) knows the output folder: one that is the
//! root or holds it is refused (the results would replace the subjects' files), and folders
//! that are, lie inside or hold it are no subjects (`out/` under `root = "."`). Hidden names
//! (`.git`) match only a pattern that spells the dot.
//!
//! Left out: BIDS-style discovery (sessions, entities in file names) and per-subject globs
//! for the file names; both can be expressed as a manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::registry::{BuildError, StageConfig};
use crate::stage::{Context, Inputs, Stage, StageError, SubjectEntry, Value, ValueFacts};

/// Parameters of a `dataset` node.
///
/// Folder layout:
///
/// ```toml
/// [nodes.subjects]
/// type = "dataset"
/// root = "data/oasis"
/// pattern = "OAS1_*"
/// image = "norm.nii.gz"
/// labels = "seg.nii.gz"
/// ```
///
/// `pattern` may be a list of globs, and `image`, `labels`, `mask` lists of candidate names
/// (the first that exists in a folder is used), for datasets whose folders name files
/// differently:
///
/// ```toml
/// [nodes.heads]
/// type = "dataset"
/// root = "data"
/// pattern = ["colin27", "mni152"]
/// image = ["ch2.nii.gz", "MNI152_T1.nii.gz"]
/// ```
///
/// Manifest layout (columns `subject,image[,labels][,mask]`, any others ignored; paths
/// relative to the manifest's folder):
///
/// ```toml
/// [nodes.subjects]
/// type = "dataset"
/// manifest = "data/subjects.csv"
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Folder holding one sub-folder per subject. Exclusive with `manifest`.
    pub root: Option<PathBuf>,
    /// Glob (or list of globs), relative to `root`, matching the subject folders. Default
    /// `"*"`. A name starting with `.` (`.git`, `.datalad`) matches only a pattern that
    /// spells the dot (`.*`, `.hidden`), and the run's own output folder, what lies inside
    /// it and a folder holding it are never subjects.
    #[serde(default = "default_pattern")]
    pub pattern: Names,
    /// Image file name (or candidates) inside each subject folder. Required with `root`.
    pub image: Option<Names>,
    /// Label map file name (or candidates) inside each subject folder, if the dataset has
    /// labels.
    pub labels: Option<Names>,
    /// Brain mask file name (or candidates) inside each subject folder, if the dataset has
    /// masks.
    pub mask: Option<Names>,
    /// CSV file with a header naming at least `subject` and `image`, optionally `labels` and
    /// `mask`, in any order; other columns (age, sex, diagnosis, …) are ignored and logged
    /// once, as a warning when one looks like a misspelt `labels` or `mask`. Exclusive with
    /// `root`.
    pub manifest: Option<PathBuf>,
}

/// One name, or a list of them.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Names {
    /// A single name.
    One(String),
    /// Several names, in order of preference.
    Many(Vec<String>),
}

impl Names {
    /// The names, in order.
    pub fn items(&self) -> Vec<&str> {
        match self {
            Names::One(name) => vec![name.as_str()],
            Names::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }

    /// The first candidate that exists in `dir`, else the first candidate (so a missing file
    /// is reported under the name the user expects).
    fn pick(&self, dir: &Path) -> PathBuf {
        let items = self.items();
        let found = items.iter().find(|name| dir.join(name).is_file());
        dir.join(found.or(items.first()).copied().unwrap_or_default())
    }
}

fn default_pattern() -> Names {
    Names::One("*".to_string())
}

/// Where a dataset's subjects come from, once the configuration was checked.
#[derive(Clone, Debug)]
enum Layout {
    Folders {
        root: PathBuf,
        pattern: Names,
        image: Names,
        labels: Option<Names>,
        mask: Option<Names>,
    },
    Manifest(PathBuf),
}

impl StageConfig for DatasetConfig {
    fn files(&self) -> Vec<(String, PathBuf)> {
        match (&self.root, &self.manifest) {
            (Some(root), _) => vec![("root".to_string(), root.clone())],
            (None, Some(manifest)) => vec![("manifest".to_string(), manifest.clone())],
            (None, None) => Vec::new(),
        }
    }

    fn build(self) -> Result<Arc<dyn Stage>, BuildError> {
        let layout = match (self.root, self.manifest) {
            (Some(_), Some(_)) => {
                return Err(BuildError::Invalid(
                    "dataset: give either `root` or `manifest`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(BuildError::Invalid(
                    "dataset: give `root` (with `image`) or `manifest`".into(),
                ));
            }
            (Some(root), None) => {
                let Some(image) = self.image else {
                    return Err(BuildError::Invalid(format!(
                        "dataset: `root = {:?}` needs `image`, the image file name inside each \
                         subject folder",
                        root
                    )));
                };
                for pattern in self.pattern.items() {
                    glob::Pattern::new(pattern).map_err(|e| {
                        BuildError::Invalid(format!("dataset: pattern {pattern:?}: {e}"))
                    })?;
                }
                Layout::Folders {
                    root,
                    pattern: self.pattern,
                    image,
                    labels: self.labels,
                    mask: self.mask,
                }
            }
            (None, Some(manifest)) => {
                let stray: Vec<&str> = [
                    ("image", self.image.is_some()),
                    ("labels", self.labels.is_some()),
                    ("mask", self.mask.is_some()),
                    ("pattern", self.pattern != default_pattern()),
                ]
                .into_iter()
                .filter_map(|(key, given)| given.then_some(key))
                .collect();
                if !stray.is_empty() {
                    return Err(BuildError::Invalid(format!(
                        "dataset: `manifest` names the files itself; remove {}",
                        stray.join(", ")
                    )));
                }
                Layout::Manifest(manifest)
            }
        };
        Ok(Arc::new(Dataset {
            layout,
            listed: Mutex::new(None),
        }))
    }
}

/// The runtime `dataset` source.
#[derive(Debug)]
pub struct Dataset {
    layout: Layout,
    /// The listing, kept so `process` can hand out a subject's entry by id.
    listed: Mutex<Option<Arc<Vec<SubjectEntry>>>>,
}

impl Dataset {
    /// Lists the subjects, sorted by id.
    ///
    /// # Errors
    /// If the root or manifest cannot be read, nothing matches, or two subjects share an id.
    pub fn list(&self) -> Result<Vec<SubjectEntry>, StageError> {
        self.list_skipping(None)
    }

    /// [`Dataset::list`] for a run writing into `output`: refused when `output` is the root
    /// or holds it, and without the folders that are, lie inside or hold `output`. The
    /// listing is kept for [`Stage::process`]. A manifest names its files itself and is
    /// listed as it is (`write` still refuses to replace a subject's own file).
    ///
    /// # Errors
    /// As [`Dataset::list`], and when `output` is the root or a folder holding it.
    pub fn list_for_run(&self, output: &Path) -> Result<Arc<Vec<SubjectEntry>>, StageError> {
        let Layout::Folders { root, .. } = &self.layout else {
            return self.listing();
        };
        if crate::paths::is_within(root, output) {
            return Err(output_holds_root(root, output));
        }
        let entries = Arc::new(self.list_skipping(Some(output))?);
        *self.listed.lock().unwrap_or_else(|e| e.into_inner()) = Some(entries.clone());
        Ok(entries)
    }

    /// [`Dataset::list`], leaving out the folders that are, lie inside or hold `output`.
    fn list_skipping(&self, output: Option<&Path>) -> Result<Vec<SubjectEntry>, StageError> {
        let mut entries = match &self.layout {
            Layout::Folders {
                root,
                pattern,
                image,
                labels,
                mask,
            } => {
                let mut entries = Vec::new();
                let names = FileNames {
                    image,
                    labels: labels.as_ref(),
                    mask: mask.as_ref(),
                };
                for glob in pattern.items() {
                    for entry in list_folders(root, glob, &names, output)? {
                        // One folder matched by two globs is one subject; two folders whose
                        // ids collide (`a/b_c` and `a_b/c`) are caught below.
                        if !entries
                            .iter()
                            .any(|e: &SubjectEntry| e.image == entry.image)
                        {
                            entries.push(entry);
                        }
                    }
                }
                entries
            }
            Layout::Manifest(path) => read_manifest(path)?,
        };
        let bad: Vec<String> = entries
            .iter()
            .filter(|e| !is_plain_name(&e.id) || RESERVED_IDS.contains(&e.id.as_str()))
            .map(|e| format!("{:?} ({})", e.id, e.image.display()))
            .collect();
        if !bad.is_empty() {
            return Err(StageError::Input(format!(
                "dataset: subject ids name output folders, so each must be a plain name of at \
                 most {MAX_ID_BYTES} bytes (no `/`, `\\`, `..`, control characters) and not one \
                 of {RESERVED_IDS:?}; these are not: {}",
                bad.join(", ")
            )));
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = entries.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(StageError::Input(format!(
                "dataset: subject id {:?} appears twice ({} and {})",
                pair[0].id,
                pair[0].image.display(),
                pair[1].image.display()
            )));
        }
        tracing::debug!(subjects = entries.len(), "Dataset listed");
        Ok(entries)
    }

    /// `Some(true)` when `has` holds for every subject listed, `Some(false)` for none, `None`
    /// when it differs between them or the dataset cannot be listed (which is reported on
    /// its own).
    fn every_row(&self, has: impl Fn(&SubjectEntry) -> bool) -> Option<bool> {
        let entries = self.listing().ok()?;
        match entries.iter().filter(|e| has(e)).count() {
            0 => Some(false),
            n if n == entries.len() => Some(true),
            _ => None,
        }
    }

    fn listing(&self) -> Result<Arc<Vec<SubjectEntry>>, StageError> {
        // A poisoned lock only means another thread panicked while listing; the cached value
        // is either complete or absent, so it is safe to go on with it.
        let mut cached = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entries) = cached.as_ref() {
            return Ok(entries.clone());
        }
        let entries = Arc::new(self.list()?);
        *cached = Some(entries.clone());
        Ok(entries)
    }
}

impl Stage for Dataset {
    fn output(&self) -> Option<crate::stage::ValueKind> {
        Some(crate::stage::ValueKind::Entry)
    }

    fn inputs(&self) -> Option<crate::stage::InputSpec> {
        Some(crate::stage::InputSpec::exactly(
            0,
            "none (a dataset is a source)",
        ))
    }

    /// Folders carry a mask when `mask` names one; a manifest's rows, when each (or none)
    /// fills the `mask` column. A named file that is missing fails its subject alone.
    fn output_mask(&self, _inputs: &[ValueFacts]) -> Option<bool> {
        match &self.layout {
            Layout::Folders { mask, .. } => Some(mask.is_some()),
            Layout::Manifest(_) => self.every_row(|e| e.mask.is_some()),
        }
    }

    /// Folders carry a label map when `labels` names one; a manifest's rows, when each (or
    /// none) fills the `labels` column. A named file that is missing fails its subject alone.
    fn output_labels(&self, _inputs: &[ValueFacts]) -> Option<bool> {
        match &self.layout {
            Layout::Folders { labels, .. } => Some(labels.is_some()),
            Layout::Manifest(_) => self.every_row(|e| e.labels.is_some()),
        }
    }

    fn process(&self, ctx: &Context<'_>, _inputs: &Inputs<'_>) -> Result<Value, StageError> {
        let entries = self.listing()?;
        entries
            .iter()
            .find(|e| e.id == ctx.subject)
            .map(|e| Value::Entry(Arc::new(e.clone())))
            .ok_or_else(|| {
                StageError::Input(format!(
                    "dataset: subject {:?} is not in the dataset",
                    ctx.subject
                ))
            })
    }

    fn subjects(&self) -> Option<Result<Vec<SubjectEntry>, StageError>> {
        Some(self.listing().map(|entries| entries.as_ref().clone()))
    }

    fn subjects_for_run(&self, output: &Path) -> Option<Result<Vec<SubjectEntry>, StageError>> {
        Some(
            self.list_for_run(output)
                .map(|entries| entries.as_ref().clone()),
        )
    }
}

/// Why a run may not write into `output`: it is the dataset's `root`, or holds it, so the
/// run's files would land among (and replace) the subjects' own.
fn output_holds_root(root: &Path, output: &Path) -> StageError {
    let (resolved_root, resolved_output) =
        (crate::paths::resolve(root), crate::paths::resolve(output));
    let shown = |given: &Path, resolved: &Path| {
        if given == resolved {
            format!("{}", given.display())
        } else {
            format!("{} ({})", given.display(), resolved.display())
        }
    };
    let relation = if resolved_root == resolved_output {
        "is"
    } else {
        "holds"
    };
    StageError::Input(format!(
        "dataset: the output folder {} {relation} the dataset root {}: the run would write its \
         results among the subjects' own files (a subject's labels replaced by the \
         prediction); choose an output folder outside the dataset",
        shown(output, &resolved_output),
        shown(root, &resolved_root),
    ))
}

/// The file names (or candidates) each subject folder holds.
struct FileNames<'a> {
    image: &'a Names,
    labels: Option<&'a Names>,
    mask: Option<&'a Names>,
}

/// One entry per folder under `root` matching `pattern`; ids are the folders' paths relative
/// to `root` with separators turned into `_` (the folder name for a one-level pattern).
/// Names starting with `.` match only where the pattern spells the dot; folders that are,
/// lie inside or hold `output` (the run's own) are left out.
fn list_folders(
    root: &Path,
    pattern: &str,
    names: &FileNames<'_>,
    output: Option<&Path>,
) -> Result<Vec<SubjectEntry>, StageError> {
    if !root.is_dir() {
        return Err(StageError::Input(format!(
            "dataset: root {} is not a folder",
            root.display()
        )));
    }
    let full = format!(
        "{}/{}",
        glob::Pattern::escape(&root.to_string_lossy()),
        pattern
    );
    // Not `require_literal_leading_dot`: glob 0.3 then drops every hidden name, even where
    // the pattern spells the dot; `hidden_unasked` below applies the rule instead.
    let paths = glob::glob(&full)
        .map_err(|e| StageError::Input(format!("dataset: pattern {pattern:?}: {e}")))?;
    let output = output.map(crate::paths::resolve);
    let mut entries = Vec::new();
    let mut skipped = 0;
    for path in paths {
        let dir = path.map_err(|e| StageError::Input(format!("dataset: {e}")))?;
        // A link to a folder that is gone is a subject whose files are missing, not a plain
        // file to skip: it is kept, so its load fails and the run counts it.
        let dangling = dir.is_symlink() && std::fs::metadata(&dir).is_err();
        if !dir.is_dir() && !dangling {
            continue;
        }
        // A pattern spelling the dot (`.*`) also matches `.` and `..`: the root itself and
        // its parent, neither a subject folder.
        let rel = dir.strip_prefix(root).unwrap_or(&dir);
        let plain = |c: std::path::Component<'_>| matches!(c, std::path::Component::Normal(_));
        if rel.as_os_str().is_empty() || !rel.components().all(plain) {
            continue;
        }
        if hidden_unasked(rel, pattern) {
            tracing::debug!(folder = %dir.display(), "Hidden folder skipped");
            continue;
        }
        let id = subject_id(root, &dir);
        if let Some(output) = &output
            && is_output_folder(&dir, output, names.image)
        {
            skipped += 1;
            continue;
        }
        if dangling {
            tracing::warn!(subject = %id, link = %dir.display(), "Subject folder is a broken link");
        }
        let image = names.image.pick(&dir);
        if !image.is_file() {
            tracing::debug!(subject = %id, image = %image.display(), "Subject folder lacks its image; kept");
        }
        entries.push(SubjectEntry {
            id,
            image,
            labels: names.labels.map(|names| names.pick(&dir)),
            mask: names.mask.map(|names| names.pick(&dir)),
        });
    }
    if entries.is_empty() {
        let besides = match skipped {
            0 => String::new(),
            _ => " besides the run's output folder".to_string(),
        };
        return Err(StageError::Input(format!(
            "dataset: no subject folder under root {} matches pattern {pattern:?}{besides}",
            root.display()
        )));
    }
    Ok(entries)
}

/// Whether `rel` (a matched folder, relative to the root) has a name starting with `.` where
/// `pattern` does not spell the dot: `.git` under `*` is no subject, under `.*` it is. Where
/// the pattern's parts do not line up with the folder's (`**`), a hidden name needs a dot
/// anywhere in the pattern.
fn hidden_unasked(rel: &Path, pattern: &str) -> bool {
    let parts: Vec<&str> = pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let aligned = !parts.contains(&"**");
    rel.components().enumerate().any(|(i, c)| {
        let hidden = c.as_os_str().to_string_lossy().starts_with('.');
        let spelt = match parts.get(i) {
            Some(part) if aligned => part.starts_with('.'),
            _ => parts.iter().any(|p| p.starts_with('.')),
        };
        hidden && !spelt
    })
}

/// Whether `dir` is the run's `output` folder (resolved), lies inside it or holds it: then
/// it is no subject, but the first run's results (`out/` under a root of `.`). Logged, as a
/// warning when the folder holds a subject's image after all.
fn is_output_folder(dir: &Path, output: &Path, image: &Names) -> bool {
    let resolved = crate::paths::resolve(dir);
    if !resolved.starts_with(output) && !output.starts_with(&resolved) {
        return false;
    }
    let folder = dir.display();
    if image.pick(dir).is_file() {
        tracing::warn!(%folder, output = %output.display(),
            "Skipping a subject folder: it is, lies inside or holds the run's output folder");
    } else {
        tracing::info!(%folder, output = %output.display(),
            "Skipping the run's output folder: it is not a subject");
    }
    true
}

// Limitation: ids built from nested folders (`a/b` → `a_b`) can collide with a folder that
// already has that name; the duplicate check reports it rather than merging subjects.
fn subject_id(root: &Path, dir: &Path) -> String {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.join("_")
}

/// Names the run itself writes in the output folder, which no subject folder may take.
const RESERVED_IDS: [&str; 2] = ["report.json", "report.csv"];

/// Longest subject id, in bytes: a file name longer than this cannot be made on common
/// file systems.
const MAX_ID_BYTES: usize = 255;

/// Whether `id` can name a folder inside the output folder and nothing else: one path
/// component, not `.` or `..`, no separators or control characters, not too long.
pub(crate) fn is_plain_name(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id != "."
        && id != ".."
        && !id.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// The manifest columns voxflow reads; any other (age, sex, diagnosis, …) is ignored.
const MANIFEST_COLUMNS: [&str; 4] = ["subject", "image", "labels", "mask"];

/// Logs, once per listing, the manifest columns voxflow does not read: a warning with the
/// column it looks like for a near miss (`lables`, `Image`), which leaves that column's files
/// unused, and one info line for the rest (lab metadata such as age or diagnosis).
fn log_ignored_columns(path: &Path, ignored: &[&str]) {
    let mut other = Vec::new();
    for &name in ignored {
        let near = MANIFEST_COLUMNS
            .into_iter()
            .find(|known| typo_distance(&name.to_lowercase(), known) <= 1);
        match near {
            Some(known) => tracing::warn!(manifest = %path.display(), column = name,
                "Manifest column {name:?} is ignored; did you mean {known:?}?"),
            None => other.push(format!("{name:?}")),
        }
    }
    if !other.is_empty() {
        tracing::info!(manifest = %path.display(), columns = %other.join(", "),
            "Manifest columns ignored (voxflow reads subject, image, labels, mask)");
    }
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`: a swap counts
/// once, so `lables` is one edit from `labels` while `age` stays two from `image`.
fn typo_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// Reads a manifest with columns `subject`, `image` and optionally `labels` and `mask`; other
/// columns are ignored (see [`log_ignored_columns`]).
fn read_manifest(path: &Path) -> Result<Vec<SubjectEntry>, StageError> {
    let fail = |what: String| StageError::Input(format!("manifest {}: {what}", path.display()));
    let text = fs_err::read_to_string(path).map_err(|e| StageError::Input(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header = reader.headers().map_err(|e| fail(e.to_string()))?.clone();
    let mut column = BTreeMap::new();
    let mut ignored = Vec::new();
    for (n, name) in header.iter().enumerate() {
        if !MANIFEST_COLUMNS.contains(&name) {
            ignored.push(name);
            continue;
        }
        column.insert(name.to_string(), n);
    }
    log_ignored_columns(path, &ignored);
    let (Some(&id_col), Some(&image_col)) = (column.get("subject"), column.get("image")) else {
        return Err(fail(
            "the header needs at least the columns subject and image".into(),
        ));
    };
    let file = |record: &csv::StringRecord, name: &str| -> Option<PathBuf> {
        let cell = record.get(*column.get(name)?)?;
        (!cell.is_empty()).then(|| base.join(cell))
    };

    let mut entries = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let line = row + 2;
        let record = record.map_err(|e| fail(e.to_string()))?;
        let id = record.get(id_col).unwrap_or("");
        let image = record.get(image_col).unwrap_or("");
        if id.is_empty() || image.is_empty() {
            return Err(fail(format!(
                "line {line}: subject and image must not be empty"
            )));
        }
        if !is_plain_name(id) {
            return Err(fail(format!(
                "line {line}: subject id {id:?} must be a plain name (no `/`, `\\`, `..`, \
                 control characters): it names the subject's output folder"
            )));
        }
        entries.push(SubjectEntry {
            id: id.to_string(),
            image: base.join(image),
            labels: file(&record, "labels"),
            mask: file(&record, "mask"),
        });
    }
    if entries.is_empty() {
        return Err(fail("no subject rows".into()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(toml_text: &str) -> Arc<dyn Stage> {
        let config: DatasetConfig = toml::from_str(toml_text).unwrap();
        config.build().unwrap()
    }

    #[test]
    fn example_config_parses() {
        let config: DatasetConfig = toml::from_str(
            r#"
            root = "data/oasis"
            pattern = "OAS1_*"
            image = "norm.nii.gz"
            labels = "seg.nii.gz"
            "#,
        )
        .unwrap();
        assert_eq!(config.pattern, Names::One("OAS1_*".into()));
        assert_eq!(
            config.files(),
            vec![("root".into(), PathBuf::from("data/oasis"))]
        );
        let manifest: DatasetConfig = toml::from_str(r#"manifest = "subjects.csv""#).unwrap();
        assert!(manifest.build().is_ok());
    }

    #[test]
    fn root_and_manifest_together_are_rejected() {
        let config: DatasetConfig =
            toml::from_str("root = \"a\"\nimage = \"x\"\nmanifest = \"m.csv\"").unwrap();
        assert!(config.build().is_err());
    }

    #[test]
    fn glob_lists_folders_sorted_and_keeps_one_missing_its_image() {
        let dir = tempfile::tempdir().unwrap();
        for (name, with_image) in [("sub-b", true), ("sub-a", true), ("sub-c", false)] {
            let sub = dir.path().join(name);
            std::fs::create_dir(&sub).unwrap();
            if with_image {
                std::fs::write(sub.join("t1.nii.gz"), b"").unwrap();
            }
        }
        std::fs::create_dir(dir.path().join("other")).unwrap();
        std::fs::write(dir.path().join("sub-file"), b"").unwrap();
        let stage = dataset(&format!(
            "root = {:?}\npattern = \"sub-*\"\nimage = \"t1.nii.gz\"\nlabels = \"aseg.mgz\"",
            dir.path()
        ));
        let entries = stage.subjects().unwrap().unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["sub-a", "sub-b", "sub-c"]);
        assert_eq!(entries[2].image, dir.path().join("sub-c/t1.nii.gz"));
        assert_eq!(entries[0].labels, Some(dir.path().join("sub-a/aseg.mgz")));
        assert_eq!(entries[0].mask, None);
    }

    /// What `validate` learns of the masks: folders from `mask`, a manifest from its rows
    /// (every one, none, or some filling the column).
    #[test]
    fn masks_are_known_from_the_config_or_the_manifest_rows() {
        let no_facts: &[ValueFacts] = &[];
        let folders = |extra: &str| {
            dataset(&format!("root = \"d\"\nimage = \"t1.nii.gz\"\n{extra}")).output_mask(no_facts)
        };
        assert_eq!(folders(""), Some(false));
        assert_eq!(folders("mask = \"brainmask.nii.gz\""), Some(true));

        let dir = tempfile::tempdir().unwrap();
        let manifest = |name: &str, rows: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, rows).unwrap();
            dataset(&format!("manifest = {path:?}")).output_mask(no_facts)
        };
        assert_eq!(
            manifest("none.csv", "subject,image\na,a.nii\nb,b.nii\n"),
            Some(false)
        );
        let all = "subject,image,mask\na,a.nii,am.nii\nb,b.nii,bm.nii\n";
        assert_eq!(manifest("all.csv", all), Some(true));
        let some = "subject,image,mask\na,a.nii,am.nii\nb,b.nii,\n";
        assert_eq!(manifest("some.csv", some), None);
    }

    /// What `validate` learns of the label maps: folders from `labels`, a manifest from its
    /// rows (every one, none, or some filling the column).
    #[test]
    fn labels_are_known_from_the_config_or_the_manifest_rows() {
        let no_facts: &[ValueFacts] = &[];
        let folders = |extra: &str| {
            dataset(&format!("root = \"d\"\nimage = \"t1.nii.gz\"\n{extra}"))
                .output_labels(no_facts)
        };
        assert_eq!(folders(""), Some(false));
        assert_eq!(folders("mask = \"brainmask.nii.gz\""), Some(false));
        assert_eq!(folders("labels = \"seg.nii.gz\""), Some(true));
        assert_eq!(
            folders("labels = [\"aseg.mgz\", \"seg.nii.gz\"]"),
            Some(true)
        );

        let dir = tempfile::tempdir().unwrap();
        let manifest = |name: &str, rows: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, rows).unwrap();
            dataset(&format!("manifest = {path:?}")).output_labels(no_facts)
        };
        assert_eq!(
            manifest(
                "none.csv",
                "subject,image,mask\na,a.nii,am.nii\nb,b.nii,bm.nii\n"
            ),
            Some(false)
        );
        let empty_column = "subject,image,labels\na,a.nii,\nb,b.nii,\n";
        assert_eq!(manifest("empty.csv", empty_column), Some(false));
        let all = "subject,image,labels\na,a.nii,as.nii\nb,b.nii,bs.nii\n";
        assert_eq!(manifest("all.csv", all), Some(true));
        let some = "subject,image,labels\na,a.nii,as.nii\nb,b.nii,\n";
        assert_eq!(manifest("some.csv", some), None);
        let unreadable = dir.path().join("absent.csv");
        assert_eq!(
            dataset(&format!("manifest = {unreadable:?}")).output_labels(no_facts),
            None
        );
    }

    fn folders(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            let sub = dir.path().join(name);
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join("t1.nii.gz"), b"").unwrap();
        }
        dir
    }

    fn listing_error(dir: &Path, pattern: &str) -> String {
        let stage = dataset(&format!(
            "root = {:?}\npattern = {pattern:?}\nimage = \"t1.nii.gz\"",
            dir
        ));
        match stage.subjects().unwrap() {
            Ok(entries) => panic!("listed {entries:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// `a/b_c` and `a_b/c` both become `a_b_c`: an error naming both folders, not one of them
    /// silently dropped.
    #[test]
    fn nested_folders_whose_ids_collide_are_an_error() {
        let dir = folders(&["a/b", "a/b_c", "a_b/c", "x/y"]);
        let message = listing_error(dir.path(), "*/*");
        assert!(
            message.contains("\"a_b_c\" appears twice")
                && message.contains("a/b_c/t1.nii.gz")
                && message.contains("a_b/c/t1.nii.gz"),
            "{message}"
        );
    }

    /// A subject folder that is a link to nothing is kept (its load then fails, naming the
    /// file) instead of vanishing from the run.
    #[test]
    fn a_broken_link_folder_is_kept_as_a_subject() {
        let dir = folders(&["good"]);
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("linked")).unwrap();
        let stage = dataset(&format!(
            "root = {:?}\npattern = \"*\"\nimage = \"t1.nii.gz\"",
            dir.path()
        ));
        let entries = stage.subjects().unwrap().unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["good", "linked"]);
        assert!(!entries[1].image.exists());
    }

    /// `.git` and `.datalad` are no subjects under `pattern = "*"`; a pattern that spells
    /// the dot still reaches a hidden folder.
    #[test]
    fn hidden_folders_match_only_a_pattern_that_spells_the_dot() {
        let dir = folders(&["s1", ".git", ".datalad", "s2/.hidden"]);
        let ids = |pattern: &str| -> Vec<String> {
            let stage = dataset(&format!(
                "root = {:?}\npattern = {pattern:?}\nimage = \"t1.nii.gz\"",
                dir.path()
            ));
            let entries = stage.subjects().unwrap().unwrap();
            entries.into_iter().map(|e| e.id).collect()
        };
        assert_eq!(ids("*"), ["s1", "s2"]);
        // `s2/.hidden` is the only folder two levels down.
        assert!(listing_error(dir.path(), "*/*").contains("no subject folder"));
        assert_eq!(ids(".*"), [".datalad", ".git"]);
        assert_eq!(ids("*/.hidden"), ["s2_.hidden"]);
    }

    /// A run writing into `root/out/run` lists neither `out` (which holds it) nor the output
    /// folder; one writing into the root itself, or a folder holding it (however spelt), is
    /// refused, naming both folders.
    #[test]
    fn the_runs_output_folder_is_no_subject_and_may_not_hold_the_root() {
        let dir = folders(&["s1", "s2", "out/run/s1"]);
        let root = dir.path().join("data");
        std::fs::create_dir(&root).unwrap();
        for name in ["a", "b", "c"] {
            std::fs::create_dir_all(root.join(name)).unwrap();
        }
        let listed = |root: &Path, output: &Path| {
            let stage = dataset(&format!("root = {root:?}\nimage = \"t1.nii.gz\""));
            stage
                .subjects_for_run(output)
                .unwrap()
                .map(|entries| entries.into_iter().map(|e| e.id).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        };
        let top = dir.path();
        assert_eq!(
            listed(top, &top.join("out/run")).unwrap(),
            ["data", "s1", "s2"]
        );
        assert_eq!(
            listed(top, &top.join("s2/results")).unwrap(),
            ["data", "out", "s1"],
            "a subject folder holding the output is skipped"
        );
        assert_eq!(listed(&root, &top.join("out")).unwrap(), ["a", "b", "c"]);

        std::os::unix::fs::symlink(&root, top.join("link")).unwrap();
        for output in [
            root.clone(),
            top.to_path_buf(),
            top.join("link"),
            root.join("new/.."),
        ] {
            let err = listed(&root, &output).unwrap_err();
            assert!(
                err.contains(&format!("output folder {}", output.display()))
                    && err.contains(&format!("dataset root {}", root.display())),
                "{}: {err}",
                output.display()
            );
        }
    }

    /// Ids that cannot be output folders are all named at once, before anything runs.
    #[test]
    fn ids_that_cannot_name_an_output_folder_are_listed_together() {
        let dir = folders(&["report.json", "bad\nname", "good"]);
        let message = listing_error(dir.path(), "*");
        for id in ["\"report.json\"", "\"bad\\nname\""] {
            assert!(message.contains(id), "{id} missing from {message}");
        }
        assert!(!message.contains("\"good\""), "{message}");
        // Longer than a file name may be (a manifest or nested folders can make one).
        assert!(!is_plain_name(&"s".repeat(256)) && is_plain_name(&"s".repeat(255)));
    }

    #[test]
    fn pattern_lists_and_candidate_names_cover_heterogeneous_folders() {
        let dir = tempfile::tempdir().unwrap();
        for (name, file) in [
            ("colin", "ch2.nii.gz"),
            ("mni", "MNI.nii.gz"),
            ("skip", "x.nii"),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join(file), b"").unwrap();
        }
        let stage = dataset(&format!(
            "root = {:?}\npattern = [\"mni\", \"colin\", \"mn*\"]\n\
             image = [\"ch2.nii.gz\", \"MNI.nii.gz\"]",
            dir.path()
        ));
        let entries = stage.subjects().unwrap().unwrap();
        let found: Vec<(&str, PathBuf)> = entries
            .iter()
            .map(|e| (e.id.as_str(), e.image.clone()))
            .collect();
        assert_eq!(
            found,
            [
                ("colin", dir.path().join("colin/ch2.nii.gz")),
                ("mni", dir.path().join("mni/MNI.nii.gz")),
            ]
        );
    }

    #[test]
    fn empty_match_names_root_and_pattern() {
        let dir = tempfile::tempdir().unwrap();
        let stage = dataset(&format!(
            "root = {:?}\npattern = \"nobody-*\"\nimage = \"t1.nii\"",
            dir.path()
        ));
        let err = stage.subjects().unwrap().unwrap_err().to_string();
        assert!(err.contains("nobody-*"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn manifest_paths_are_relative_to_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("subjects.csv");
        std::fs::write(
            &manifest,
            "subject,image,labels\ns2,s2/t1.nii.gz,s2/seg.nii.gz\ns1,/abs/t1.mgz,\n",
        )
        .unwrap();
        let stage = dataset(&format!("manifest = {manifest:?}"));
        let entries = stage.subjects().unwrap().unwrap();
        assert_eq!(entries[0].id, "s1");
        assert_eq!(entries[0].image, PathBuf::from("/abs/t1.mgz"));
        assert_eq!(entries[0].labels, None);
        assert_eq!(entries[1].labels, Some(dir.path().join("s2/seg.nii.gz")));
        let ctx = Context {
            subject: "s2",
            output_dir: dir.path(),
            node: "subjects",
            entry: None,
        };
        let value = stage.process(&ctx, &Inputs::default()).unwrap();
        assert!(matches!(value, Value::Entry(e) if e.id == "s2"));
    }

    /// Lab manifests carry metadata columns: they are ignored, and a near miss of a column
    /// voxflow reads is only a warning (its files are then unused).
    #[test]
    fn manifest_columns_voxflow_does_not_read_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("m.csv");
        std::fs::write(
            &manifest,
            "subject,age,image,sex,labels,diagnosis,lables\n\
             s1,71,s1/t1.nii.gz,F,s1/seg.nii.gz,AD,x.nii\n",
        )
        .unwrap();
        let entries = dataset(&format!("manifest = {manifest:?}"))
            .subjects()
            .unwrap()
            .unwrap();
        assert_eq!(
            entries,
            [SubjectEntry {
                id: "s1".into(),
                image: dir.path().join("s1/t1.nii.gz"),
                labels: Some(dir.path().join("s1/seg.nii.gz")),
                mask: None,
            }]
        );
        assert_eq!(typo_distance("lables", "labels"), 1);
        assert_eq!(typo_distance("image", "image"), 0);
        assert!(typo_distance("age", "image") > 1 && typo_distance("sex", "subject") > 1);
    }

    #[test]
    fn manifest_rejects_bad_and_duplicate_ids() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("m.csv");
        for id in ["../../escaped", "/tmp/abs", "..", "a/b"] {
            std::fs::write(&manifest, format!("subject,image\n{id},a.nii\n")).unwrap();
            let err = dataset(&format!("manifest = {manifest:?}"))
                .subjects()
                .unwrap()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("plain name") && err.contains("line 2"),
                "{err}"
            );
        }
        std::fs::write(&manifest, "subject,image\na,a.nii\na,b.nii\n").unwrap();
        let err = dataset(&format!("manifest = {manifest:?}"))
            .subjects()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice"), "{err}");
    }
}
