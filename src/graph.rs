//! The node graph: stages built from their specs, checked, ordered, and drawn.
//!
//! [`Pipeline::build`] is phases 4–6 of [`crate::config`]: it builds every node's stage (so
//! the stage's own config reports unknown or missing parameters), checks that every input
//! names a node, that there is no cycle and at most one source, that every file a stage
//! will read exists, and that each node's inputs can work: their number and kinds, and what
//! is known of them before anything runs (a scan that carries no brain mask, or no label
//! map, where one is needed). It returns every problem found, each located in the file.
//!
//! A node is *per subject* when it is the source or has a per-subject input, and *constant*
//! otherwise: constant nodes (the atlas and what is derived from it alone) run once and
//! their values are shared by every subject.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use voxflow_stages::registry::{self, BuildError};
use voxflow_stages::stage::{InputSpec, Stage, ValueFacts, ValueKind};

use crate::config::{ConfigError, ConfigErrors, NodeSpec, PipelineFile, Settings};

/// A node ready to run.
pub struct Node {
    /// Its spec from the file.
    pub spec: NodeSpec,
    /// The runtime stage.
    pub stage: Arc<dyn Stage>,
    /// Indices (into [`Pipeline::nodes`]) of its inputs, in declared order.
    pub inputs: Vec<usize>,
    /// Whether it runs once per subject (else once per run).
    pub per_subject: bool,
    /// Whether it is the dataset source.
    pub source: bool,
}

/// A validated pipeline: nodes in topological order.
pub struct Pipeline {
    /// The file it came from.
    pub path: PathBuf,
    /// Run-wide settings.
    pub settings: Settings,
    /// Nodes, upstream before downstream.
    pub nodes: Vec<Node>,
}

impl Pipeline {
    /// Builds and checks every node of `file` (see the module doc).
    ///
    /// # Errors
    /// Every problem found, each naming the file, line and node.
    pub fn build(file: PipelineFile) -> Result<Pipeline, ConfigErrors> {
        Pipeline::build_checked(file, Vec::new())
    }

    /// [`Pipeline::build`] for a file whose parsing already found `errors`: the graph checks
    /// still run, and every problem is returned together.
    ///
    /// # Errors
    /// `errors` and every problem the checks find, sorted by position.
    pub fn build_checked(
        file: PipelineFile,
        mut errors: Vec<ConfigError>,
    ) -> Result<Pipeline, ConfigErrors> {
        let mut stages = Vec::with_capacity(file.nodes.len());
        for node in &file.nodes {
            let stage = build_stage(&file, node, &mut errors);
            if let Some(spec) = stage.as_ref().and_then(|s| s.inputs()) {
                check_input_count(&file, node, spec, &mut errors);
            }
            if node.batch > 1 && stage.as_ref().is_some_and(|s| !s.batches()) {
                let message = format!(
                    "type {:?} works on one subject at a time; `batch` applies to `register`",
                    node.kind
                );
                errors.push(file.error_at(node, Some("batch"), message));
            }
            stages.push(stage);
        }

        let index: BTreeMap<&str, usize> = file
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let mut edges = vec![Vec::new(); file.nodes.len()];
        for (i, node) in file.nodes.iter().enumerate() {
            for (position, input) in node.inputs.iter().enumerate() {
                match index.get(input.as_str()) {
                    Some(&j) => {
                        edges[i].push(j);
                        let wrong = input_kind_problem(&stages[i], &stages[j], position, input);
                        if let Some(message) = wrong {
                            errors.push(file.error_at(node, Some("inputs"), message));
                        }
                    }
                    None => errors.push(file.error_at(
                        node,
                        Some("inputs"),
                        unknown_input_message(input, &index),
                    )),
                }
            }
        }

        let sorted = topological_order(&edges);
        let acyclic = sorted.is_ok();
        let order = match sorted {
            Ok(order) => order,
            Err(cycle) => {
                let names: Vec<&str> = cycle.iter().map(|&i| file.nodes[i].name.as_str()).collect();
                let first = &file.nodes[cycle[0]];
                errors.push(file.error_at(
                    first,
                    Some("inputs"),
                    format!(
                        "the inputs form a cycle: {} -> {}",
                        names.join(" -> "),
                        names[0]
                    ),
                ));
                (0..file.nodes.len()).collect()
            }
        };

        let sources: Vec<usize> = (0..stages.len())
            .filter(|&i| stages[i].as_ref().is_some_and(|s| s.subjects().is_some()))
            .collect();
        if sources.len() > 1 {
            let names: Vec<&str> = sources
                .iter()
                .map(|&i| file.nodes[i].name.as_str())
                .collect();
            errors.push(file.error_at(
                &file.nodes[sources[1]],
                Some("type"),
                format!(
                    "only one dataset source per pipeline; found {}",
                    names.join(", ")
                ),
            ));
        }

        if acyclic {
            let facts = check_input_facts(&file, &stages, &edges, &order, &mut errors);
            check_shared_files(&file, &stages, &edges, &facts, &mut errors);
        }
        if acyclic && !sources.is_empty() {
            check_subject_inputs(
                &file,
                &stages,
                &edges,
                &order,
                &sources,
                &index,
                &mut errors,
            );
        }
        if !errors.is_empty() {
            errors.sort_by_key(|e| e.position);
            return Err(ConfigErrors(errors));
        }
        Ok(assemble(file, stages, edges, &order, &sources))
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.spec.name == name)
    }

    /// The graph in Graphviz DOT: constant nodes as boxes, the source as a folder, edges
    /// labelled with the input position when a node has several.
    pub fn to_dot(&self) -> String {
        let mut dot = String::new();
        let _ = writeln!(dot, "digraph {:?} {{", self.settings.name);
        let _ = writeln!(dot, "  rankdir=LR;\n  node [fontname=\"Helvetica\"];");
        for node in &self.nodes {
            let shape = if node.source {
                "folder"
            } else if node.per_subject {
                "ellipse"
            } else {
                "box"
            };
            let extra = if node.spec.concurrency > 1 {
                format!("\\n×{}", node.spec.concurrency)
            } else {
                String::new()
            };
            let label = format!("{}\\n({}){extra}", node.spec.name, node.spec.kind);
            let label = label.replace('"', "\\\"");
            let _ = writeln!(
                dot,
                "  {:?} [label=\"{label}\", shape={shape}];",
                node.spec.name
            );
        }
        for node in &self.nodes {
            for (pos, &input) in node.inputs.iter().enumerate() {
                let from = &self.nodes[input].spec.name;
                let style = if self.nodes[input].per_subject {
                    ""
                } else {
                    ", style=dashed"
                };
                let _ = writeln!(
                    dot,
                    "  {:?} -> {:?} [label=\"{pos}\"{style}];",
                    from, node.spec.name
                );
            }
        }
        dot.push_str("}\n");
        dot
    }
}

fn build_stage(
    file: &PipelineFile,
    node: &NodeSpec,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<dyn Stage>> {
    if !node.expanded {
        return None;
    }
    match registry::build(&node.kind, node.params.clone()) {
        Ok(built) => {
            for (param, path) in &built.files {
                if !path.exists() {
                    let message =
                        format!("`{param}`: {:?} does not exist", path.display().to_string());
                    errors.push(file.error_at(node, Some(param), message));
                }
            }
            Some(built.stage)
        }
        Err(BuildError::UnknownType { kind, known }) => {
            let hint = suggest(&kind, known.iter().copied())
                .map(|s| format!(" (did you mean {s:?}?)"))
                .unwrap_or_default();
            let message = format!(
                "unknown node type {kind:?}{hint}; known: {}",
                known.join(", ")
            );
            errors.push(file.error_at(node, Some("type"), message));
            None
        }
        Err(e) => {
            let message = e.to_string();
            let word = backticked(&message).map(str::to_string);
            // The key's own line, or for a key of a sub-table (`[nodes.x.deformable]`) the
            // sub-table's line: nested values carry no positions of their own.
            let line_key = word.as_deref().and_then(|k| {
                if node.key_lines.contains_key(k) {
                    return Some(k.to_string());
                }
                node.params
                    .iter()
                    .find(|(_, v)| v.as_table().is_some_and(|t| t.contains_key(k)))
                    .map(|(table, _)| table.clone())
            });
            let message = match (&word, &line_key) {
                (Some(k), Some(at)) if message.starts_with("unknown field") => {
                    let place = if at == k {
                        String::new()
                    } else {
                        format!(" in [{at}]")
                    };
                    format!(
                        "unknown parameter `{k}`{place} for type {:?}: {message}",
                        node.kind
                    )
                }
                _ => message,
            };
            errors.push(file.error_at(node, line_key.as_deref(), message));
            None
        }
    }
}

/// Why input `position` (node `input`, running `upstream`) is of a kind `stage` cannot take,
/// if it is; `None` when it fits or either side does not say.
fn input_kind_problem(
    stage: &Option<Arc<dyn Stage>>,
    upstream: &Option<Arc<dyn Stage>>,
    position: usize,
    input: &str,
) -> Option<String> {
    let spec = stage.as_ref()?.inputs()?;
    let want = spec.kind_at(position)?;
    let got = upstream.as_ref()?.output()?;
    (want != got).then(|| {
        format!(
            "input {position} ({input:?}) gives {}, but this input takes {} (inputs: {})",
            got.described(),
            want.described(),
            spec.what
        )
    })
}

/// Reports inputs that must be the subject's own data (the fixed image of `register`, the
/// subject scan of `segment` and `dice`) but come from a constant node: the atlas wired
/// where the subject goes, which would otherwise run and give every subject wrong results.
fn check_subject_inputs(
    file: &PipelineFile,
    stages: &[Option<Arc<dyn Stage>>],
    edges: &[Vec<usize>],
    order: &[usize],
    sources: &[usize],
    index: &BTreeMap<&str, usize>,
    errors: &mut Vec<ConfigError>,
) {
    let mut per_subject = vec![false; file.nodes.len()];
    for &i in order {
        per_subject[i] = sources.contains(&i) || edges[i].iter().any(|&j| per_subject[j]);
    }
    for (i, node) in file.nodes.iter().enumerate() {
        let Some(spec) = stages[i].as_ref().and_then(|s| s.inputs()) else {
            continue;
        };
        for &p in spec.subject {
            let Some(name) = node.inputs.get(p) else {
                continue;
            };
            if index.get(name.as_str()).is_some_and(|&j| !per_subject[j]) {
                let message = format!(
                    "input {p} ({name:?}) is the same for every subject, but it should be the \
                     subject's own scan; are the inputs in the wrong order? (inputs: {})",
                    spec.what
                );
                errors.push(file.error_at(node, Some("inputs"), message));
            }
        }
    }
}

/// Works out, from the source down, what is known of each node's value
/// ([`ValueFacts`]: its kind, whether its scans carry a brain mask and a label map), and
/// reports nodes whose inputs would fail every subject: none of the kinds
/// [`InputSpec::one_of`] asks for (a `write` fed only Dice scores), or what the stage's own
/// [`Stage::input_problem`] finds (a `skull_strip` with `method = "mask"` on scans that carry
/// no mask, a `dice` scoring against subjects without label maps). Nodes whose inputs are
/// already reported (an unknown name, a wrong count) are not checked again. Returns the
/// facts of every node's value.
fn check_input_facts(
    file: &PipelineFile,
    stages: &[Option<Arc<dyn Stage>>],
    edges: &[Vec<usize>],
    order: &[usize],
    errors: &mut Vec<ConfigError>,
) -> Vec<ValueFacts> {
    let mut facts = vec![ValueFacts::default(); file.nodes.len()];
    for &i in order {
        let Some(stage) = &stages[i] else {
            continue;
        };
        let node = &file.nodes[i];
        let inputs: Vec<ValueFacts> = edges[i].iter().map(|&j| facts[j]).collect();
        facts[i] = ValueFacts {
            kind: stage.output(),
            mask: stage.output_mask(&inputs),
            labels: stage.output_labels(&inputs),
        };
        let spec = stage.inputs();
        let counted = spec.is_none_or(|s| (s.min..=s.max).contains(&inputs.len()));
        if inputs.len() != node.inputs.len() || !counted {
            continue;
        }
        let missing = spec.and_then(|spec| missing_kind_message(spec, &inputs));
        for message in missing.into_iter().chain(stage.input_problem(&inputs)) {
            errors.push(file.error_at(node, Some("inputs"), message));
        }
    }
    facts
}

/// Reports two nodes sure to write the same file in the output folder ([`Stage::writes`]):
/// two `report`s, or two `write`s both fed a segmentation. Both would run and the last to
/// finish would replace the other's file without a word. The later node in the file is
/// named, with the earlier one's line.
fn check_shared_files(
    file: &PipelineFile,
    stages: &[Option<Arc<dyn Stage>>],
    edges: &[Vec<usize>],
    facts: &[ValueFacts],
    errors: &mut Vec<ConfigError>,
) {
    let written: Vec<Vec<&str>> = (0..file.nodes.len())
        .map(|i| {
            let inputs: Vec<ValueFacts> = edges[i].iter().map(|&j| facts[j]).collect();
            stages[i].as_ref().map_or(Vec::new(), |s| s.writes(&inputs))
        })
        .collect();
    let mut by_line: Vec<usize> = (0..file.nodes.len()).collect();
    by_line.sort_by_key(|&i| file.nodes[i].line);
    for (n, &later) in by_line.iter().enumerate() {
        for &earlier in &by_line[..n] {
            let shared: Vec<&str> = written[later]
                .iter()
                .copied()
                .filter(|name| written[earlier].contains(name))
                .collect();
            if shared.is_empty() {
                continue;
            }
            let first = &file.nodes[earlier];
            let message = format!(
                "writes {} into the output folder, as node `{}` (line {}) does: the last to \
                 finish would replace the other's; keep one of them",
                shared.join(", "),
                first.name,
                first.line
            );
            errors.push(file.error_at(&file.nodes[later], None, message));
        }
    }
}

/// Why no input is of a kind `spec` needs one of ([`InputSpec::one_of`]), if none is; `None`
/// when one is, or when an input's kind is not known.
fn missing_kind_message(spec: InputSpec, inputs: &[ValueFacts]) -> Option<String> {
    if spec.one_of.is_empty() {
        return None;
    }
    let kinds: Vec<ValueKind> = inputs.iter().map(|f| f.kind).collect::<Option<_>>()?;
    if kinds.iter().any(|k| spec.one_of.contains(k)) {
        return None;
    }
    let wanted: Vec<&str> = spec.one_of.iter().map(|k| k.described()).collect();
    let mut given: Vec<&str> = kinds.iter().map(|k| k.described()).collect();
    given.sort_unstable();
    given.dedup();
    Some(format!(
        "no input gives {}: the inputs give only {}, so every subject would fail (inputs: {})",
        wanted.join(" or "),
        given.join(" and "),
        spec.what
    ))
}

/// Reports a node whose number of `inputs` its type does not take.
fn check_input_count(
    file: &PipelineFile,
    node: &NodeSpec,
    spec: InputSpec,
    errors: &mut Vec<ConfigError>,
) {
    let n = node.inputs.len();
    if (spec.min..=spec.max).contains(&n) {
        return;
    }
    let count = match (spec.min, spec.max) {
        (a, b) if a == b => format!("{a}"),
        (a, usize::MAX) => format!("at least {a}"),
        (a, b) => format!("{a} to {b}"),
    };
    let message = format!(
        "type {:?} takes {count} input{} ({}); this node lists {n}",
        node.kind,
        if spec.max == 1 { "" } else { "s" },
        spec.what
    );
    let key = node.key_lines.contains_key("inputs").then_some("inputs");
    errors.push(file.error_at(node, key, message));
}

/// The first `` `word` `` in a serde message: the key it is about.
fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

fn unknown_input_message(input: &str, index: &BTreeMap<&str, usize>) -> String {
    let hint = suggest(input, index.keys().copied())
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default();
    format!("input {input:?} names no node{hint}")
}

/// The candidate closest to `word` by edit distance, if close enough to be a typo.
fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Kahn's algorithm over `edges[node] = inputs`; on a cycle, returns one cycle's nodes.
fn topological_order(edges: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = edges.len();
    let mut pending: Vec<usize> = edges.iter().map(|e| e.len()).collect();
    let mut consumers = vec![Vec::new(); n];
    for (i, inputs) in edges.iter().enumerate() {
        for &j in inputs {
            consumers[j].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| pending[i] == 0).rev().collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &c in consumers[i].iter().rev() {
            pending[c] -= 1;
            if pending[c] == 0 {
                ready.push(c);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk inputs among the unordered nodes until one repeats: that is a cycle.
    let stuck: BTreeSet<usize> = (0..n).filter(|i| !order.contains(i)).collect();
    let mut path = vec![
        *stuck
            .iter()
            .next()
            .expect("a failed sort leaves nodes unordered"),
    ];
    loop {
        let last = *path.last().expect("path starts non-empty");
        let next = edges[last]
            .iter()
            .copied()
            .find(|j| stuck.contains(j))
            .unwrap_or(path[0]);
        if let Some(at) = path.iter().position(|&p| p == next) {
            let mut cycle = path.split_off(at);
            cycle.reverse();
            return Err(cycle);
        }
        path.push(next);
    }
}

fn assemble(
    file: PipelineFile,
    stages: Vec<Option<Arc<dyn Stage>>>,
    edges: Vec<Vec<usize>>,
    order: &[usize],
    sources: &[usize],
) -> Pipeline {
    let mut position = vec![0; order.len()];
    for (pos, &i) in order.iter().enumerate() {
        position[i] = pos;
    }
    let mut specs: Vec<Option<NodeSpec>> = file.nodes.into_iter().map(Some).collect();
    let mut stages = stages;
    let mut nodes: Vec<Node> = Vec::with_capacity(order.len());
    for &i in order {
        let inputs: Vec<usize> = edges[i].iter().map(|&j| position[j]).collect();
        let source = sources.contains(&i);
        let per_subject = source || inputs.iter().any(|&j| nodes[j].per_subject);
        nodes.push(Node {
            spec: specs[i].take().expect("each node is placed once"),
            stage: stages[i]
                .take()
                .expect("stages exist when no error was found"),
            inputs,
            per_subject,
            source,
        });
    }
    Pipeline {
        path: file.path,
        settings: file.settings,
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_inputs_first() {
        let edges = vec![vec![2], vec![], vec![1]];
        assert_eq!(topological_order(&edges).unwrap(), vec![1, 2, 0]);
    }

    #[test]
    fn finds_the_cycle() {
        let edges = vec![vec![], vec![3], vec![1], vec![2]];
        let mut cycle = topological_order(&edges).unwrap_err();
        cycle.sort();
        assert_eq!(cycle, vec![1, 2, 3]);
    }

    #[test]
    fn suggests_close_names_only() {
        let names = ["register", "segment", "dice"];
        assert_eq!(suggest("regsiter", names.iter().copied()), Some("register"));
        assert_eq!(suggest("histogram", names.iter().copied()), None);
    }
}
