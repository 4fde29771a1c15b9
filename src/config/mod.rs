//! Pipeline files: TOML text to a checked [`PipelineFile`], with every error located.
//!
//! Loading runs in phases and collects every problem of a phase before giving up, so a user
//! fixing a file sees all of its mistakes at once:
//!
//! 1. TOML syntax (a syntax error stops here: nothing after it can be trusted);
//! 2. the file's shape: a `[pipeline]` table with known keys, `[vars]`, `[nodes.*]` with a
//!    `type` and well-formed `inputs`;
//! 3. `${VAR}` expansion in every string (environment first, then `[vars]`);
//! 4. each node's parameters, checked by its stage's own config (unknown, missing or
//!    mistyped keys);
//! 5. the graph ([`crate::graph`]): inputs that name nothing, cycles, sources;
//! 6. files the stages will read exist.
//!
//! Every error carries the file and, where the text has one, the line of the offending key.
//! Keys are kept with their byte spans (`toml::Spanned`) for that purpose only.

mod vars;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use vars::expand;

/// Capacity of every channel between two nodes unless the file says otherwise.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 2;

/// One problem found in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The pipeline file.
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the text.
    pub position: Option<(usize, usize)>,
    /// The node concerned, if any.
    pub node: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(node) = &self.node {
            write!(f, ": node `{node}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found, in file order.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, e) in self.0.iter().enumerate() {
            if n > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The pipeline file as written: the `[pipeline]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsWire {
    name: Option<String>,
    output: Option<String>,
    channel_capacity: Option<usize>,
    description: Option<String>,
    cache: Option<toml::Value>,
    cache_max_gb: Option<toml::Value>,
}

/// Only the keys of `[pipeline]`, with their spans, to locate a bad setting on its own line
/// (the settings themselves are read from a plain value, which keeps no spans).
#[derive(Debug, Default, Deserialize)]
struct PipelineKeys {
    #[serde(default)]
    pipeline: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
}

/// A `[nodes.NAME]` table as written, keys kept with their spans.
type WireNode = Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>;

/// The pipeline file as written, keys kept with their spans.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWire {
    pipeline: Option<Spanned<toml::Value>>,
    #[serde(default)]
    vars: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    nodes: BTreeMap<Spanned<String>, WireNode>,
}

/// Run-wide settings from `[pipeline]`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The pipeline's name (default: the file's stem).
    pub name: String,
    /// Where results go (default `out/<name>`).
    pub output: PathBuf,
    /// Default capacity of the channels between nodes.
    pub channel_capacity: usize,
    /// Free text.
    pub description: Option<String>,
    /// Where the volume cache lives (`cache = "DIR"`), or `cache = false` for none.
    pub cache: crate::cache::CacheSetting,
    /// Size cap of the volume cache folder in GB (`cache_max_gb`, default
    /// [`crate::cache::DEFAULT_MAX_GB`]); least recently used entries go first.
    pub cache_max_gb: f64,
}

/// One `[nodes.NAME]` table, parsed but not yet built into a stage.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The node's name.
    pub name: String,
    /// Its `type`.
    pub kind: String,
    /// Names of upstream nodes, in order.
    pub inputs: Vec<String>,
    /// How many subjects this node works on at once.
    pub concurrency: usize,
    /// Capacity of the channel feeding this node, if set.
    pub channel_capacity: Option<usize>,
    /// Most subjects handed to the stage in one call (1: one at a time).
    pub batch: usize,
    /// Whether the volume cache may serve and keep this node's values (`cache = false` opts
    /// out; only cacheable types accept the key).
    pub cache: bool,
    /// The stage's own parameters, `${VAR}`s expanded.
    pub params: toml::Table,
    /// Whether every parameter expanded to a usable value. When one did not (an undefined
    /// variable, an empty path), its error is reported and the stage is not built: it would
    /// only add knock-on errors (a missing `image`, a wrong number of inputs, `""` does not
    /// exist).
    pub expanded: bool,
    /// Line of the node's header.
    pub line: usize,
    /// Line of each key, for errors about it.
    pub key_lines: BTreeMap<String, usize>,
}

/// A pipeline file, parsed, with variables expanded.
#[derive(Clone, Debug)]
pub struct PipelineFile {
    /// The file it came from.
    pub path: PathBuf,
    /// Run-wide settings.
    pub settings: Settings,
    /// Nodes, in name order.
    pub nodes: Vec<NodeSpec>,
}

/// Keys of a node table that the engine consumes; everything else goes to the stage.
/// Largest `concurrency`, `channel_capacity` or `batch` accepted: each unit may hold a subject's
/// volumes (hundreds of MB) or a thread, so larger values only exhaust memory.
const MAX_ENGINE_COUNT: usize = 1024;

const ENGINE_KEYS: &[&str] = &[
    "type",
    "inputs",
    "concurrency",
    "channel_capacity",
    "batch",
    "cache",
];

/// Converts byte offsets to 1-based `(line, column)`.
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        (line, offset - self.starts[line - 1] + 1)
    }

    fn line(&self, offset: usize) -> usize {
        self.position(offset).0
    }
}

impl PipelineFile {
    /// Reads and parses a pipeline file (phases 1–3 of the module doc).
    ///
    /// # Errors
    /// Every problem found, each located in the file.
    pub fn load(path: &Path) -> Result<PipelineFile, ConfigErrors> {
        let (file, errors) = PipelineFile::load_partial(path)?;
        finish(file, errors)
    }

    /// Like [`PipelineFile::load`], but when every node could be read it returns the file
    /// together with the problems found in settings, variables and parameters, so the graph
    /// checks can add theirs and `validate` lists everything at once.
    ///
    /// # Errors
    /// When the file cannot be read or parsed as TOML, or a node is malformed.
    pub fn load_partial(path: &Path) -> Result<(PipelineFile, Vec<ConfigError>), ConfigErrors> {
        let text = fs_err::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                position: None,
                node: None,
                message: format!("cannot read pipeline file: {}", io_reason(&e)),
            }])
        })?;
        PipelineFile::parse_partial(path, &text)
    }

    /// Parses pipeline text that came from `path` (used in messages and for the default name).
    ///
    /// # Errors
    /// Every problem found, each located in the file.
    pub fn parse(path: &Path, text: &str) -> Result<PipelineFile, ConfigErrors> {
        let (file, errors) = PipelineFile::parse_partial(path, text)?;
        finish(file, errors)
    }

    /// Parses pipeline text; see [`PipelineFile::load_partial`].
    ///
    /// # Errors
    /// When the text is not TOML or a node is malformed (then every problem found so far).
    pub fn parse_partial(
        path: &Path,
        text: &str,
    ) -> Result<(PipelineFile, Vec<ConfigError>), ConfigErrors> {
        let lines = LineIndex::new(text);
        let err = |offset: Option<usize>, node: Option<&str>, message: String| ConfigError {
            file: path.to_path_buf(),
            position: offset.map(|o| lines.position(o)),
            node: node.map(str::to_string),
            message,
        };

        let wire: FileWire = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            let message = e.message().trim().to_string();
            ConfigErrors(vec![err(offset, None, message)])
        })?;

        let mut errors = Vec::new();
        let vars = wire_vars(&wire.vars, &mut |o, m| errors.push(err(Some(o), None, m)));
        let key_offsets: BTreeMap<String, usize> = toml::from_str::<PipelineKeys>(text)
            .unwrap_or_default()
            .pipeline
            .into_keys()
            .map(|k| (k.get_ref().clone(), k.span().start))
            .collect();
        let pipeline = (wire.pipeline.as_ref(), &key_offsets);
        let settings = settings(path, pipeline, &vars, &mut |o, m| {
            errors.push(err(o, None, m))
        });

        if wire.nodes.is_empty() {
            errors.push(err(
                None,
                None,
                "the file declares no nodes ([nodes.NAME] tables)".into(),
            ));
        }
        let mut nodes = Vec::new();
        let mut malformed = false;
        for (name, table) in &wire.nodes {
            let node_name = name.get_ref().as_str();
            let mut report = |o: usize, m: String| errors.push(err(Some(o), Some(node_name), m));
            match node_spec(name, table, &vars, &lines, &mut report) {
                Some(node) => nodes.push(node),
                None => malformed = true,
            }
        }

        let file = PipelineFile {
            path: path.to_path_buf(),
            settings,
            nodes,
        };
        if malformed {
            // A node is missing: graph checks would report every input naming it as dangling.
            errors.sort_by_key(|e| e.position);
            return Err(ConfigErrors(errors));
        }
        Ok((file, errors))
    }

    /// An error located at `key` of `node` (or at the node's header if the key is absent).
    pub fn error_at(&self, node: &NodeSpec, key: Option<&str>, message: String) -> ConfigError {
        let line = key
            .and_then(|k| node.key_lines.get(k).copied())
            .unwrap_or(node.line);
        ConfigError {
            file: self.path.clone(),
            position: Some((line, 1)),
            node: Some(node.name.clone()),
            message,
        }
    }
}

/// The file, or its problems sorted by position.
fn finish(file: PipelineFile, mut errors: Vec<ConfigError>) -> Result<PipelineFile, ConfigErrors> {
    if errors.is_empty() {
        return Ok(file);
    }
    errors.sort_by_key(|e| e.position);
    Err(ConfigErrors(errors))
}

fn io_reason(e: &std::io::Error) -> String {
    // fs-err puts the path in its message; the caller already names the file.
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    }
}

/// `[vars]` values as strings (numbers and booleans are accepted and stringified).
fn wire_vars(
    wire: &BTreeMap<String, Spanned<toml::Value>>,
    report: &mut dyn FnMut(usize, String),
) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for (name, value) in wire {
        let text = match value.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                report(
                    value.span().start,
                    format!("variable `{name}` must be a string or number"),
                );
                continue;
            }
        };
        vars.insert(name.clone(), text);
    }
    match vars::resolve(&vars) {
        Ok(resolved) => resolved,
        Err((name, why)) => {
            let at = wire.get(&name).map_or(0, |v| v.span().start);
            report(at, format!("variable `{name}`: {why}"));
            vars
        }
    }
}

/// `[pipeline]` as a value, and the offset of each of its keys (for errors on their line).
type PipelineWire<'a> = (
    Option<&'a Spanned<toml::Value>>,
    &'a BTreeMap<String, usize>,
);

fn settings(
    path: &Path,
    (wire, key_offsets): PipelineWire,
    vars: &BTreeMap<String, String>,
    report: &mut dyn FnMut(Option<usize>, String),
) -> Settings {
    // Where a bad value is reported: its key's line, else the table's.
    let at = |key: &str| {
        key_offsets
            .get(key)
            .copied()
            .or(wire.map(|w| w.span().start))
    };
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let mut parsed = SettingsWire::default();
    if let Some(wire) = wire {
        let offset = wire.span().start;
        match SettingsWire::deserialize(wire.get_ref().clone()) {
            Ok(s) => parsed = s,
            Err(e) => report(Some(offset), format!("[pipeline]: {}", e.message().trim())),
        }
    }
    // An empty name, output or cache folder would mean the working directory.
    let mut expand_or_report = |key: &str, s: &str| match expand(s, vars) {
        Ok(expanded) => {
            if let Some(problem) = empty_problem(key, s, &expanded) {
                report(at(key), format!("[pipeline]: {problem}"));
            }
            expanded
        }
        Err(m) => {
            report(at(key), format!("[pipeline]: `{key}`: {m}"));
            s.to_string()
        }
    };
    let name = parsed.name.as_deref().map(|n| expand_or_report("name", n));
    let name = name.or(stem).unwrap_or_else(|| "pipeline".to_string());
    let output = match parsed.output.as_deref() {
        Some(o) => PathBuf::from(expand_or_report("output", o)),
        None => Path::new("out").join(&name),
    };
    let cache = cache_setting(parsed.cache.as_ref(), &mut |dir| {
        expand_or_report("cache", dir)
    });
    if parsed
        .channel_capacity
        .is_some_and(|c| !(1..=MAX_ENGINE_COUNT).contains(&c))
    {
        report(
            at("channel_capacity"),
            format!("[pipeline]: channel_capacity must be between 1 and {MAX_ENGINE_COUNT}"),
        );
    }
    if cache.is_none() {
        report(
            at("cache"),
            "[pipeline]: `cache` must be a folder or a boolean".into(),
        );
    }
    let cache_max_gb = match parsed.cache_max_gb.as_ref() {
        None => Some(crate::cache::DEFAULT_MAX_GB),
        Some(value) => positive_gb(value),
    };
    if cache_max_gb.is_none() {
        report(
            at("cache_max_gb"),
            "[pipeline]: `cache_max_gb` must be a positive number of gigabytes (e.g. 20)".into(),
        );
    }
    Settings {
        name,
        output,
        channel_capacity: parsed
            .channel_capacity
            .unwrap_or(DEFAULT_CHANNEL_CAPACITY)
            .max(1),
        description: parsed.description,
        cache: cache.unwrap_or_default(),
        cache_max_gb: cache_max_gb.unwrap_or(crate::cache::DEFAULT_MAX_GB),
    }
}

/// Why the string `key` took, `expanded` from `raw`, cannot be used: an empty one (as a path,
/// the working directory; as anything else, no value).
fn empty_problem(key: &str, raw: &str, expanded: &str) -> Option<String> {
    if !expanded.is_empty() {
        return None;
    }
    Some(if raw.contains("${") {
        format!("`{key}` is empty (after expanding {raw})")
    } else {
        format!("`{key}` is empty")
    })
}

/// [`empty_problem`] for a node parameter, whose value may be a list or table of strings.
fn empty_param_problem(key: &str, raw: &toml::Value, expanded: &toml::Value) -> Option<String> {
    fn holds_empty(value: &toml::Value) -> bool {
        match value {
            toml::Value::String(s) => s.is_empty(),
            toml::Value::Array(items) => items.iter().any(holds_empty),
            toml::Value::Table(t) => t.values().any(holds_empty),
            _ => false,
        }
    }
    match (raw, expanded) {
        (toml::Value::String(raw), toml::Value::String(expanded)) => {
            empty_problem(key, raw, expanded)
        }
        _ => holds_empty(expanded).then(|| format!("`{key}` holds an empty string")),
    }
}

/// A whole or decimal number above zero and finite (`nan` and `inf` are TOML floats).
fn positive_gb(value: &toml::Value) -> Option<f64> {
    let gb = match value {
        toml::Value::Integer(n) => *n as f64,
        toml::Value::Float(x) => *x,
        _ => return None,
    };
    (gb.is_finite() && gb > 0.0).then_some(gb)
}

/// `[pipeline] cache`: absent or `true` for the per-user folder, `false` for none, or a
/// folder (variables expanded); `None` for any other value.
fn cache_setting(
    value: Option<&toml::Value>,
    expand: &mut dyn FnMut(&str) -> String,
) -> Option<crate::cache::CacheSetting> {
    use crate::cache::CacheSetting;
    match value {
        None | Some(toml::Value::Boolean(true)) => Some(CacheSetting::Default),
        Some(toml::Value::Boolean(false)) => Some(CacheSetting::Off),
        Some(toml::Value::String(dir)) => Some(CacheSetting::Dir(PathBuf::from(expand(dir)))),
        Some(_) => None,
    }
}

fn node_spec(
    name: &Spanned<String>,
    table: &WireNode,
    vars: &BTreeMap<String, String>,
    lines: &LineIndex,
    report: &mut dyn FnMut(usize, String),
) -> Option<NodeSpec> {
    let header = name.span().start;
    let mut key_lines = BTreeMap::new();
    let mut values = BTreeMap::new();
    for (key, value) in table.get_ref() {
        key_lines.insert(key.get_ref().clone(), lines.line(key.span().start));
        values.insert(key.get_ref().as_str(), value);
    }
    let at = |key: &str| values.get(key).map(|v| v.span().start).unwrap_or(header);

    let kind = match values.get("type").map(|v| v.get_ref()) {
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(_) => {
            report(at("type"), "`type` must be a string".into());
            None
        }
        None => {
            report(
                header,
                "missing `type` (the kind of stage this node runs)".into(),
            );
            None
        }
    };
    let inputs = match values.get("inputs").map(|v| v.get_ref()) {
        None => Vec::new(),
        Some(toml::Value::Array(items)) if items.iter().all(|i| i.is_str()) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        Some(toml::Value::String(one)) => vec![one.clone()],
        Some(_) => {
            report(at("inputs"), "`inputs` must be a list of node names".into());
            Vec::new()
        }
    };
    let positive = |key: &str, report: &mut dyn FnMut(usize, String)| -> Option<usize> {
        match values.get(key).map(|v| v.get_ref()) {
            None => None,
            Some(toml::Value::Integer(n)) if (1..=MAX_ENGINE_COUNT as i64).contains(n) => {
                Some(*n as usize)
            }
            Some(_) => {
                report(
                    at(key),
                    format!("`{key}` must be a whole number from 1 to {MAX_ENGINE_COUNT}"),
                );
                None
            }
        }
    };
    let concurrency = positive("concurrency", report).unwrap_or(1);
    let channel_capacity = positive("channel_capacity", report);
    let batch = positive("batch", report).unwrap_or(1);
    let cache = match values.get("cache").map(|v| v.get_ref()) {
        None => true,
        Some(toml::Value::Boolean(b))
            if kind
                .as_deref()
                .is_none_or(|k| crate::cache::CACHEABLE.contains(&k)) =>
        {
            *b
        }
        Some(toml::Value::Boolean(_)) => {
            report(
                at("cache"),
                format!(
                    "`cache`: nodes of type {:?} are never cached (only {})",
                    kind.as_deref().unwrap_or_default(),
                    crate::cache::CACHEABLE.join(", ")
                ),
            );
            true
        }
        Some(_) => {
            report(at("cache"), "`cache` must be true or false".into());
            true
        }
    };

    let mut params = toml::Table::new();
    let mut expanded = true;
    for (key, value) in &values {
        if ENGINE_KEYS.contains(key) {
            continue;
        }
        match vars::expand_value(value.get_ref(), vars) {
            Ok(v) => {
                // No parameter takes an empty string; as a path it would name the working
                // directory (`root = "${data}"` with `data` empty).
                if let Some(problem) = empty_param_problem(key, value.get_ref(), &v) {
                    report(value.span().start, problem);
                    expanded = false;
                }
                params.insert(key.to_string(), v);
            }
            Err(m) => {
                report(value.span().start, format!("`{key}`: {m}"));
                expanded = false;
            }
        }
    }

    Some(NodeSpec {
        name: name.get_ref().clone(),
        kind: kind?,
        inputs,
        concurrency,
        channel_capacity,
        batch,
        cache,
        params,
        expanded,
        line: lines.line(header),
        key_lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PipelineFile, ConfigErrors> {
        PipelineFile::parse(Path::new("p.toml"), text)
    }

    #[test]
    fn absurd_capacities_are_rejected_before_running() {
        for text in [
            "[pipeline]\nchannel_capacity = 9223372036854775807\n[nodes.a]\ntype = \"load\"\n",
            "[nodes.a]\ntype = \"load\"\nconcurrency = 100000\n",
        ] {
            let errors = parse(text).err().map(|e| e.to_string());
            assert!(
                errors.as_ref().is_some_and(|e| e.contains("1024")),
                "{text}: {errors:?}"
            );
        }
    }

    #[test]
    fn nodes_keep_their_lines_and_engine_keys() {
        let text = "[pipeline]\nname = \"x\"\n\n[nodes.a]\ntype = \"load\"\nimage = \"f\"\n\n\
                    [nodes.b]\ntype = \"conform\"\ninputs = [\"a\"]\nconcurrency = 3\n";
        let p = parse(text).unwrap();
        assert_eq!(p.settings.name, "x");
        assert_eq!(p.settings.output, Path::new("out/x"));
        let b = &p.nodes[1];
        assert_eq!((b.name.as_str(), b.line, b.concurrency), ("b", 8, 3));
        assert_eq!(b.inputs, ["a"]);
        assert_eq!(b.key_lines["inputs"], 10);
        assert!(b.params.is_empty(), "engine keys must not reach the stage");
        assert_eq!(p.nodes[0].params["image"].as_str(), Some("f"));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = parse("[nodes.a]\ntype = \"load\"\nimage = \n").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].position.map(|p| p.0), Some(3), "{e}");
        assert!(e.to_string().starts_with("p.toml:3:"), "{e}");
    }

    #[test]
    fn every_structural_problem_is_reported() {
        let text = "[pipeline]\nnmae = \"x\"\n[nodes.a]\nimage = 1\n[nodes.b]\ntype = \"x\"\n\
                    inputs = 3\nconcurrency = 0\n";
        let e = parse(text).unwrap_err();
        let all = e.to_string();
        assert!(all.contains("unknown field `nmae`"), "{all}");
        assert!(
            all.contains("p.toml:3:") && all.contains("missing `type`"),
            "{all}"
        );
        assert!(
            all.contains("p.toml:7:") && all.contains("`inputs` must be"),
            "{all}"
        );
        assert!(
            all.contains("p.toml:8:") && all.contains("`concurrency`"),
            "{all}"
        );
    }

    #[test]
    fn cache_settings_are_read_and_checked() {
        use crate::cache::CacheSetting;
        let node = "[nodes.a]\ntype = \"load\"\n";
        let p = parse(node).unwrap();
        assert_eq!(p.settings.cache, CacheSetting::Default);
        assert!(p.nodes[0].cache);
        let p = parse(&format!("[pipeline]\ncache = false\n{node}cache = false\n")).unwrap();
        assert_eq!(p.settings.cache, CacheSetting::Off);
        assert!(!p.nodes[0].cache);
        let p = parse(&format!(
            "[vars]\nd = \"/c\"\n[pipeline]\ncache = \"${{d}}/v\"\n{node}"
        ))
        .unwrap();
        assert_eq!(p.settings.cache, CacheSetting::Dir("/c/v".into()));

        let e = parse("[pipeline]\ncache = 3\n[nodes.a]\ntype = \"register\"\ncache = false\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.toml:2:") && e.contains("`cache` must be a folder"),
            "{e}"
        );
        assert!(e.contains("p.toml:5:") && e.contains("never cached"), "{e}");
        let e = parse(&format!("{node}cache = \"no\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.toml:3:") && e.contains("true or false"),
            "{e}"
        );
    }

    #[test]
    fn cache_max_gb_is_a_positive_number() {
        let node = "[nodes.a]\ntype = \"load\"\n";
        let p = parse(node).unwrap();
        assert_eq!(p.settings.cache_max_gb, crate::cache::DEFAULT_MAX_GB);
        for (value, gb) in [("0.5", 0.5), ("3", 3.0), ("1e-6", 1e-6)] {
            let p = parse(&format!("[pipeline]\ncache_max_gb = {value}\n{node}")).unwrap();
            assert_eq!(p.settings.cache_max_gb, gb, "{value}");
        }
        for value in ["0", "-2", "0.0", "nan", "inf", "\"20\"", "true"] {
            let text = format!("[pipeline]\nname = \"x\"\n\ncache_max_gb = {value}\n{node}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains("p.toml:4:") && e.contains("`cache_max_gb` must be a positive number"),
                "{value}: {e}"
            );
        }
    }

    /// An empty output, cache or path parameter would mean the working directory: each is
    /// an error on its own line, saying what expanded to nothing.
    #[test]
    fn empty_paths_are_errors_on_their_line() {
        let text = "[vars]\nblank = \"\"\n[pipeline]\nname = \"x\"\noutput = \"${blank}\"\n\
                    cache = \"${VOXFLOW_TEST_UNSET_7:-}\"\n[nodes.a]\ntype = \"load\"\n\
                    image = \"\"\n[nodes.b]\ntype = \"dataset\"\nroot = \"${blank}\"\n\
                    image = [\"t1.nii\", \"\"]\n";
        let e = parse(text).unwrap_err();
        let lines: Vec<(usize, &str)> =
            e.0.iter()
                .map(|e| (e.position.map_or(0, |p| p.0), e.message.as_str()))
                .collect();
        assert_eq!(
            lines,
            [
                (
                    5,
                    "[pipeline]: `output` is empty (after expanding ${blank})"
                ),
                (
                    6,
                    "[pipeline]: `cache` is empty (after expanding ${VOXFLOW_TEST_UNSET_7:-})"
                ),
                (9, "`image` is empty"),
                (12, "`root` is empty (after expanding ${blank})"),
                (13, "`image` holds an empty string"),
            ],
            "{e}"
        );
        let e = parse("[pipeline]\nname = \"\"\n[nodes.a]\ntype = \"load\"\n").unwrap_err();
        assert!(e.to_string().contains("p.toml:2:") && e.to_string().contains("`name` is empty"));
    }

    #[test]
    fn variables_expand_from_vars_table() {
        let text =
            "[vars]\nroot = \"/data\"\n[nodes.a]\ntype = \"load\"\nimage = \"${root}/x.nii\"\n";
        let p = parse(text).unwrap();
        assert_eq!(p.nodes[0].params["image"].as_str(), Some("/data/x.nii"));
    }

    #[test]
    fn undefined_variable_is_located() {
        let text = "[nodes.a]\ntype = \"load\"\nimage = \"${NOT_DEFINED_ANYWHERE_42}/x\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.0[0].position.map(|p| p.0), Some(3));
        assert!(e.0[0].message.contains("NOT_DEFINED_ANYWHERE_42"), "{e}");
    }
}
