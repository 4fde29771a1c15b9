//! Running a validated pipeline over a dataset with bounded memory.
//!
//! Constant nodes (the atlas and what derives from it alone) run once, first; their values
//! are shared by every subject through `Arc`s. Then the source lists the dataset and each
//! subject becomes a [`Record`] that travels down the per-subject nodes in topological order:
//!
//! ```text
//! source -> [chan] -> node 1 (× concurrency) -> [chan] -> node 2 -> ... -> collector
//! ```
//!
//! Every channel is bounded (`channel_capacity`, per pipeline or per node), so at most
//! `capacity + concurrency` records wait at or work in any node, whatever the dataset's size:
//! peak memory depends on capacities and concurrency, not on the number of subjects. A
//! record drops each value right after its last consumer ran, so a finished volume does not
//! ride along to the end.
//!
//! Shutdown: the source closes the first channel after the last subject; the workers of a
//! node hold the only senders of the next channel, so it closes once they have all drained
//! their input and exited. The collector ends when the last channel closes.
//!
//! Interrupted ([`Interrupt`], set by SIGINT or SIGTERM): the source sends no more subjects,
//! and each node passes the records that reach it on without running its stage, so the
//! channels drain and close as above. Subjects stopped this way are listed as not run; the
//! sinks still write the report for those that finished (see [`interrupt`]).
//!
//! Compute stages (libtorch) run on dedicated OS threads that block on their channel; I/O
//! stages run as async tasks that hand each call to the runtime's blocking pool. A stage that
//! fails or panics marks the record failed; later nodes pass it through untouched and the
//! run goes on with the next subject.
//!
//! Nodes whose value is cacheable go through [`crate::cache`]: each record carries the key
//! of every value it produced, and a node whose key is in the cache reads its value back
//! instead of running its stage (the time it took is still recorded as the node's). After
//! the last subject, the cache folder is brought back under its size cap
//! ([`Cache::evict`]), off the async threads.

pub mod interrupt;
mod progress;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use async_channel::{Receiver, Sender};
use tracing::{Instrument, info, info_span, warn};
use voxflow_stages::stage::{
    Context, Inputs, RunSummary, StageKind, SubjectEntry, SubjectOutcome, Value,
};

pub use interrupt::{Interrupt, Signal};
pub use progress::{Progress, ProgressWriter};

use crate::cache::{Cache, Key};
use crate::graph::Pipeline;

/// How to run, beyond what the pipeline file says.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Output directory overriding the file's.
    pub output: Option<PathBuf>,
    /// Where to draw progress bars; `None` for none.
    pub bars: Option<indicatif::MultiProgress>,
    /// Neither read nor write the volume cache, whatever the pipeline file says.
    pub no_cache: bool,
    /// Size cap of the volume cache in GB, replacing the file's `cache_max_gb`.
    pub cache_max_gb: Option<f64>,
    /// Stops the run early when set (the CLI sets it on SIGINT or SIGTERM).
    pub interrupt: Interrupt,
}

/// What a finished run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// Per-subject outcomes, as sinks saw them.
    pub summary: RunSummary,
    /// The output directory.
    pub output: PathBuf,
    /// Files the sinks wrote at the end (reports).
    pub reports: Vec<PathBuf>,
    /// The signal that stopped the run before every subject finished, if one did.
    pub interrupted: Option<Signal>,
}

impl RunOutcome {
    /// Number of subjects that failed in some node.
    pub fn failed(&self) -> usize {
        self.summary
            .subjects
            .iter()
            .filter(|s| s.failure.is_some())
            .count()
    }
}

/// One subject on its way through the per-subject nodes.
struct Record {
    id: String,
    /// Where the subject's own files are, for stages that must not touch them (`write`).
    entry: Arc<SubjectEntry>,
    /// Values by node index; constant nodes' values live in [`Shared::constants`].
    values: Vec<Option<Value>>,
    /// Cache keys by node index, for the values this record holds or held.
    keys: Vec<Option<Key>>,
    failure: Option<(String, String)>,
    timings: Vec<(String, f64)>,
    /// The run was interrupted before this subject's last node: later nodes pass it on.
    stopped: bool,
}

impl Record {
    /// Whether nodes still work on it: neither failed nor stopped.
    fn live(&self) -> bool {
        self.failure.is_none() && !self.stopped
    }
}

/// What every worker reads.
struct Shared {
    pipeline: Pipeline,
    constants: Vec<Option<Value>>,
    constant_keys: Vec<Option<Key>>,
    cache: Arc<Cache>,
    output: PathBuf,
    /// For each node, the index of the last per-subject node that reads it.
    last_use: Vec<usize>,
    progress: Progress,
    interrupt: Interrupt,
}

/// Runs `pipeline` to the end.
///
/// # Errors
/// Only for problems that stop the whole run: the dataset cannot be listed or the output
/// directory is among its files, the output directory cannot be made, a constant node (the
/// atlas) fails. A failing subject is not an
/// error here: it is counted in the outcome.
pub async fn run(pipeline: Pipeline, options: RunOptions) -> anyhow::Result<RunOutcome> {
    let started = Instant::now();
    let output = options
        .output
        .clone()
        .unwrap_or_else(|| pipeline.settings.output.clone());
    // Listed first: the source refuses an output folder among the dataset's files before
    // anything (even the lock file) is written there.
    let entries = list_subjects(&pipeline, &output)?;
    fs_err::create_dir_all(&output).context("cannot create the output directory")?;
    let _lock = lock_output(&output)?;

    let cache = Arc::new(Cache::new(
        &pipeline,
        options.no_cache,
        options.cache_max_gb,
    ));
    let (constants, constant_keys) = run_constants(&pipeline, &cache, &output).await?;
    info!(pipeline = %pipeline.settings.name, subjects = entries.len(), output = %output.display(),
        "Starting run");

    let stream: Vec<usize> = (0..pipeline.nodes.len())
        .filter(|&i| pipeline.nodes[i].per_subject)
        .collect();
    let names: Vec<String> = stream
        .iter()
        .filter(|&&i| !pipeline.nodes[i].source)
        .map(|&i| pipeline.nodes[i].spec.name.clone())
        .collect();
    let progress = Progress::new(options.bars.as_ref(), &names, entries.len() as u64);
    let last_use = last_uses(&pipeline);
    let shared = Arc::new(Shared {
        pipeline,
        constants,
        constant_keys,
        cache,
        output: output.clone(),
        last_use,
        progress,
        interrupt: options.interrupt.clone(),
    });

    let (collected, not_run) = stream_subjects(shared.clone(), &stream, entries).await?;
    shared.progress.finish();
    let interrupted = options.interrupt.signal().filter(|_| !not_run.is_empty());
    if let Some(signal) = interrupted {
        warn!(
            signal = signal.name(),
            finished = collected.len(),
            not_run = not_run.len(),
            "Run interrupted; the report lists the subjects that finished"
        );
    }
    shared.cache.log_summary();
    let cache = shared.cache.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || cache.evict()).await {
        warn!(error = %e, "Volume cache eviction stopped");
    }

    let summary = RunSummary {
        pipeline: shared.pipeline.settings.name.clone(),
        subjects: collected,
        elapsed: started.elapsed(),
        interrupted: interrupted.is_some(),
        not_run,
    };
    let reports = finish_sinks(&shared, &summary)?;
    Ok(RunOutcome {
        summary,
        output,
        reports,
        interrupted,
    })
}

type Constants = (Vec<Option<Value>>, Vec<Option<Key>>);

/// Name of the lock file a run holds in its output folder.
const LOCK_FILE: &str = ".voxflow.lock";

/// Takes the output folder for this run: a second run into the same folder (a nightly job
/// started again while the last one still runs) would mix two runs' files under one report.
/// The lock is advisory and released when the returned file is dropped or the process dies.
fn lock_output(output: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = output.join(LOCK_FILE);
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another voxflow run is writing to {}; wait for it, or choose another --output",
            output.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            // A file system without locks (some network mounts): run unguarded.
            warn!(file = %path.display(), error = %e, "Cannot lock the output folder");
            Ok(file)
        }
    }
}

async fn run_constants(
    pipeline: &Pipeline,
    cache: &Arc<Cache>,
    output: &std::path::Path,
) -> anyhow::Result<Constants> {
    let mut values: Vec<Option<Value>> = vec![None; pipeline.nodes.len()];
    let mut keys: Vec<Option<Key>> = vec![None; pipeline.nodes.len()];
    for (i, node) in pipeline.nodes.iter().enumerate() {
        if node.per_subject {
            continue;
        }
        let started = Instant::now();
        let inputs: Vec<(String, Value)> = node
            .inputs
            .iter()
            .filter_map(|&j| {
                values[j]
                    .clone()
                    .map(|v| (pipeline.nodes[j].spec.name.clone(), v))
            })
            .collect();
        let input_keys: Vec<Option<Key>> = node.inputs.iter().map(|&j| keys[j]).collect();
        let key = cache.key(i, "<constant>", &input_keys);
        let (stage, cache) = (node.stage.clone(), cache.clone());
        let (name, out) = (node.spec.name.clone(), output.to_path_buf());
        let result = tokio::task::spawn_blocking(move || {
            let ctx = Context {
                subject: "<constant>",
                output_dir: &out,
                node: &name,
                entry: None,
            };
            let inputs = Inputs {
                values: inputs.iter().map(|(n, v)| (n.as_str(), v)).collect(),
            };
            cache.get_or_compute(i, key, || stage.process(&ctx, &inputs))
        })
        .instrument(info_span!("constant", stage = %node.spec.name))
        .await
        .context("a constant node panicked")?;
        let value = result.with_context(|| {
            format!(
                "constant node `{}` ({}) failed",
                node.spec.name, node.spec.kind
            )
        })?;
        info!(node = %node.spec.name, seconds = started.elapsed().as_secs_f64(), "Constant ready");
        values[i] = Some(value);
        keys[i] = key;
    }
    Ok((values, keys))
}

/// The subjects of a run writing into `output` ([`Stage::subjects_for_run`]).
///
/// [`Stage::subjects_for_run`]: voxflow_stages::stage::Stage::subjects_for_run
fn list_subjects(
    pipeline: &Pipeline,
    output: &std::path::Path,
) -> anyhow::Result<Vec<SubjectEntry>> {
    let Some(source) = pipeline.nodes.iter().find(|n| n.source) else {
        return Ok(Vec::new());
    };
    let listed = source
        .stage
        .subjects_for_run(output)
        .expect("source nodes list subjects");
    listed.with_context(|| format!("source node `{}` cannot list the dataset", source.spec.name))
}

/// For each node, the position of the last per-subject node that reads it (itself if none).
fn last_uses(pipeline: &Pipeline) -> Vec<usize> {
    let mut last: Vec<usize> = (0..pipeline.nodes.len()).collect();
    for (i, node) in pipeline.nodes.iter().enumerate() {
        for &j in &node.inputs {
            last[j] = last[j].max(i);
        }
    }
    last
}

/// Streams every subject through the per-subject nodes; returns the outcomes of those that
/// went through every node, and the ids of those an interrupt stopped (or never sent).
async fn stream_subjects(
    shared: Arc<Shared>,
    stream: &[usize],
    entries: Vec<SubjectEntry>,
) -> anyhow::Result<(Vec<SubjectOutcome>, Vec<String>)> {
    let nodes = &shared.pipeline.nodes;
    let Some(&source) = stream.iter().find(|&&i| nodes[i].source) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let default_capacity = shared.pipeline.settings.channel_capacity;
    let workers: Vec<usize> = stream.iter().copied().filter(|&i| i != source).collect();

    let capacity = |i: Option<&usize>| {
        i.and_then(|&i| nodes[i].spec.channel_capacity)
            .unwrap_or(default_capacity)
    };
    let (first_tx, mut rx) = async_channel::bounded::<Record>(capacity(workers.first()));
    let mut handles = Vec::new();
    for (pos, &node) in workers.iter().enumerate() {
        let (tx, next_rx) = async_channel::bounded::<Record>(capacity(workers.get(pos + 1)));
        spawn_node(&shared, node, rx, tx, &mut handles);
        rx = next_rx;
    }

    let listed = entries.len();
    let feeder = tokio::spawn(feed(
        entries,
        first_tx,
        source,
        nodes.len(),
        shared.interrupt.clone(),
    ));

    let mut outcomes = Vec::new();
    let mut not_run = Vec::new();
    while let Ok(record) = rx.recv().await {
        if record.stopped {
            not_run.push(record.id);
            continue;
        }
        // "k/N": how far the run is, for logs read without the progress bars.
        let progress = format!("{}/{listed}", outcomes.len() + 1);
        outcomes.push(outcome(record, &progress));
    }
    not_run.extend(feeder.await.context("the dataset feeder panicked")?);
    if outcomes.len() + not_run.len() < listed {
        // Every worker of some node stopped early: the subjects behind it have no outcome,
        // which must not pass for a clean run.
        anyhow::bail!(
            "{} of {listed} subjects never finished: a node's workers stopped",
            listed - outcomes.len() - not_run.len()
        );
    }
    for handle in handles {
        match handle {
            Worker::Task(h) => h.await.context("a node task panicked")?,
            Worker::Thread(h) => {
                tokio::task::spawn_blocking(move || h.join())
                    .await
                    .context("joining a compute thread")?
                    .map_err(|_| anyhow::anyhow!("a compute thread panicked"))?;
            }
        }
    }
    Ok((outcomes, not_run))
}

/// Sends one record per dataset entry into the first channel, then closes it (by dropping
/// `tx`). Once `interrupt` is set it sends no more; returns the ids of the entries it did
/// not send.
async fn feed(
    entries: Vec<SubjectEntry>,
    tx: Sender<Record>,
    source: usize,
    n_nodes: usize,
    interrupt: Interrupt,
) -> Vec<String> {
    let mut entries = entries.into_iter();
    while let Some(entry) = entries.next() {
        let id = entry.id.clone();
        let entry = Arc::new(entry);
        let mut values = vec![None; n_nodes];
        values[source] = Some(Value::Entry(entry.clone()));
        let record = Record {
            id: id.clone(),
            entry,
            values,
            keys: vec![None; n_nodes],
            failure: None,
            timings: Vec::new(),
            stopped: false,
        };
        let sent = tokio::select! {
            biased;
            () = interrupt.wait() => false,
            sent = tx.send(record) => sent.is_ok(),
        };
        if !sent {
            if interrupt.signal().is_none() {
                // Every worker of the first node stopped; the caller reports the shortfall.
                return Vec::new();
            }
            return std::iter::once(id).chain(entries.map(|e| e.id)).collect();
        }
    }
    Vec::new()
}

fn outcome(record: Record, progress: &str) -> SubjectOutcome {
    let scores = record.values.iter().find_map(|v| match v {
        Some(Value::Scores(s)) => Some((**s).clone()),
        _ => None,
    });
    let seconds: f64 = record.timings.iter().map(|(_, s)| s).sum();
    match &record.failure {
        // The reason was logged by `step` when it happened, so a quick failure is not held
        // behind slow subjects; this line only counts the subject.
        Some((node, _)) => info!(subject = %record.id, progress, failed_in = %node,
            "Subject finished with a failure"),
        None => match &scores {
            Some(s) => info!(subject = %record.id, progress, seconds,
                dice_before = s.mean_before, dice_after = s.mean_after, "Subject done"),
            None => info!(subject = %record.id, progress, seconds, "Subject done"),
        },
    }
    SubjectOutcome {
        subject: record.id,
        failure: record.failure,
        timings: record.timings,
        scores,
    }
}

enum Worker {
    Task(tokio::task::JoinHandle<()>),
    Thread(std::thread::JoinHandle<()>),
}

fn spawn_node(
    shared: &Arc<Shared>,
    node: usize,
    rx: Receiver<Record>,
    tx: Sender<Record>,
    handles: &mut Vec<Worker>,
) {
    let spec = &shared.pipeline.nodes[node].spec;
    let kind = shared.pipeline.nodes[node].stage.kind();
    for worker in 0..spec.concurrency {
        let (shared, rx, tx) = (shared.clone(), rx.clone(), tx.clone());
        match kind {
            StageKind::Compute => {
                let name = format!("{}-{worker}", spec.name);
                let batch = spec.batch;
                let (s2, rx2, tx2) = (shared.clone(), rx.clone(), tx.clone());
                let spawned = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || compute_loop(&shared, node, &rx, &tx, batch));
                match spawned {
                    Ok(h) => handles.push(Worker::Thread(h)),
                    // Without a thread of its own (thread or memory limits), the worker runs
                    // on the runtime's blocking pool: slower to start, but every subject
                    // still goes through.
                    Err(e) => {
                        warn!(node = %spec.name, error = %e,
                            "Cannot start a compute thread; using the blocking pool");
                        handles.push(Worker::Task(tokio::task::spawn_blocking(move || {
                            compute_loop(&s2, node, &rx2, &tx2, batch)
                        })));
                    }
                }
            }
            StageKind::Io => handles.push(Worker::Task(tokio::spawn(async move {
                while let Ok(record) = rx.recv().await {
                    let inner = shared.clone();
                    let record =
                        match tokio::task::spawn_blocking(move || step(&inner, node, record)).await
                        {
                            Ok(r) => r,
                            // step() catches panics itself, so only cancellation lands here.
                            Err(_) => break,
                        };
                    if tx.send(record).await.is_err() {
                        break;
                    }
                }
            }))),
        }
    }
}

/// A compute worker: takes batches from `rx` until it closes, sends each record on.
fn compute_loop(
    shared: &Shared,
    node: usize,
    rx: &Receiver<Record>,
    tx: &Sender<Record>,
    batch: usize,
) {
    while let Some(records) = next_batch(rx, batch) {
        for record in step_batch(shared, node, records) {
            if tx.send_blocking(record).is_err() {
                return;
            }
        }
    }
}

/// Waits for the next records of a compute node: up to `batch` subjects still on their way
/// (failed ones ride along without counting), or fewer once the channel closes. `None` when
/// the channel is closed and drained.
///
/// A batch waits for its last subject rather than starting short: a node that batches is
/// slower per call than its upstream nodes (registration on a GPU), so waiting costs
/// nothing while upstream keeps producing, and the batch stays full.
fn next_batch(rx: &Receiver<Record>, batch: usize) -> Option<Vec<Record>> {
    let mut records = vec![rx.recv_blocking().ok()?];
    let mut live = usize::from(records[0].live());
    while live < batch {
        let Ok(record) = rx.recv_blocking() else {
            break;
        };
        live += usize::from(record.live());
        records.push(record);
    }
    Some(records)
}

/// Runs node `node` on one record, catching failures and panics.
fn step(shared: &Shared, node: usize, mut record: Record) -> Record {
    if stop(shared, &mut record) {
        return record;
    }
    if record.failure.is_none() {
        let spec = &shared.pipeline.nodes[node].spec;
        let started = Instant::now();
        let span = info_span!("stage", stage = %spec.name, subject = %record.id);
        let result = span.in_scope(|| {
            std::panic::catch_unwind(AssertUnwindSafe(|| process(shared, node, &record)))
                .unwrap_or_else(|panic| Err(panic_reason(panic)))
        });
        settle(
            shared,
            node,
            &mut record,
            result,
            started.elapsed().as_secs_f64(),
        );
    }
    release(shared, node, record)
}

/// Runs node `node` on several records in one [`Stage::process_batch`] call; records that
/// failed upstream pass through. If the batch call panics, each subject is run again on its
/// own, so one subject's bad data cannot fail the others.
///
/// [`Stage::process_batch`]: voxflow_stages::stage::Stage::process_batch
fn step_batch(shared: &Shared, node: usize, mut records: Vec<Record>) -> Vec<Record> {
    for record in &mut records {
        stop(shared, record);
    }
    let live: Vec<usize> = (0..records.len()).filter(|&i| records[i].live()).collect();
    if live.len() < 2 {
        return records.into_iter().map(|r| step(shared, node, r)).collect();
    }
    let n = &shared.pipeline.nodes[node];
    let started = Instant::now();
    let span = info_span!("batch", stage = %n.spec.name, subjects = live.len());
    let results = span.in_scope(|| {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut slots = Vec::new();
            let mut items: Vec<(Context<'_>, Inputs<'_>)> = Vec::new();
            let mut outcome: Vec<Option<Result<Keyed, String>>> = vec![None; live.len()];
            for (slot, &i) in live.iter().enumerate() {
                match gather(shared, node, &records[i]) {
                    Ok(values) => {
                        slots.push(slot);
                        items.push((context(shared, node, &records[i]), Inputs { values }));
                    }
                    Err(reason) => outcome[slot] = Some(Err(reason)),
                }
            }
            let done = n.stage.process_batch(&items);
            for (slot, result) in slots.into_iter().zip(done) {
                // Batching stages are never cached: their values have no key.
                outcome[slot] = Some(result.map(|v| (v, None)).map_err(|e| e.to_string()));
            }
            outcome
        }))
    });
    let Ok(results) = results else {
        warn!(node = %n.spec.name, subjects = live.len(),
            "A batch panicked; running its subjects one at a time");
        return records.into_iter().map(|r| step(shared, node, r)).collect();
    };
    // Each subject is charged an equal share of the batch's time.
    let seconds = started.elapsed().as_secs_f64() / live.len() as f64;
    let mut results = results.into_iter();
    let mut out = Vec::with_capacity(records.len());
    for mut record in records {
        if record.stopped {
            out.push(record);
            continue;
        }
        if record.failure.is_none() {
            let result = results
                .next()
                .flatten()
                .unwrap_or_else(|| Err("the stage returned no result for this subject".into()));
            settle(shared, node, &mut record, result, seconds);
        }
        out.push(release(shared, node, record));
    }
    out
}

/// Stops `record` here if the run was interrupted and it is still live: its values are
/// dropped and later nodes pass it on untouched. Returns whether it is stopped.
fn stop(shared: &Shared, record: &mut Record) -> bool {
    if record.live() && shared.interrupt.signal().is_some() {
        record.stopped = true;
        record.values.fill(None);
    }
    record.stopped
}

/// Records a stage's result for one subject: its value, or its failure (logged now, so a
/// quick failure is not held behind slow subjects).
fn settle(
    shared: &Shared,
    node: usize,
    record: &mut Record,
    result: Result<Keyed, String>,
    seconds: f64,
) {
    let name = &shared.pipeline.nodes[node].spec.name;
    record.timings.push((name.clone(), seconds));
    match result {
        Ok((value, key)) => {
            record.values[node] = Some(value);
            record.keys[node] = key;
        }
        Err(reason) => {
            warn!(subject = %record.id, node = %name, reason = %reason, "Subject failed");
            record.failure = Some((name.clone(), reason));
        }
    }
}

fn panic_reason(panic: Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string());
    format!("internal error: {what}")
}

/// Drops the values no later node reads (scores stay for the report) and advances the
/// node's progress bar.
fn release(shared: &Shared, node: usize, mut record: Record) -> Record {
    for (i, value) in record.values.iter_mut().enumerate() {
        let keep = matches!(value, Some(Value::Scores(_)));
        if shared.last_use[i] <= node && !keep {
            *value = None;
        }
    }
    let name = &shared.pipeline.nodes[node].spec.name;
    shared
        .progress
        .advance(name, &record.id, record.failure.is_some());
    record
}

/// The values node `node` reads for `record`, in its declared input order.
fn gather<'a>(
    shared: &'a Shared,
    node: usize,
    record: &'a Record,
) -> Result<Vec<(&'a str, &'a Value)>, String> {
    let nodes = &shared.pipeline.nodes;
    let mut values = Vec::with_capacity(nodes[node].inputs.len());
    for &j in &nodes[node].inputs {
        let name = nodes[j].spec.name.as_str();
        match input(shared, record, j).0 {
            Some(v) => values.push((name, v)),
            None => return Err(format!("input `{name}` has no value for this subject")),
        }
    }
    Ok(values)
}

/// Node `j`'s value and cache key as `record` sees them: the record's own for a per-subject
/// node, the run's for a constant one.
fn input<'a>(shared: &'a Shared, record: &'a Record, j: usize) -> (&'a Option<Value>, Option<Key>) {
    if shared.pipeline.nodes[j].per_subject {
        (&record.values[j], record.keys[j])
    } else {
        (&shared.constants[j], shared.constant_keys[j])
    }
}

fn context<'a>(shared: &'a Shared, node: usize, record: &'a Record) -> Context<'a> {
    Context {
        subject: &record.id,
        output_dir: &shared.output,
        node: &shared.pipeline.nodes[node].spec.name,
        entry: Some(&record.entry),
    }
}

/// A value and its cache key (`None` when it is not cacheable).
type Keyed = (Value, Option<Key>);

/// Runs node `node`'s stage on `record` (or reads its value from the cache); returns the
/// value and its cache key.
fn process(shared: &Shared, node: usize, record: &Record) -> Result<Keyed, String> {
    let values = gather(shared, node, record)?;
    let nodes = &shared.pipeline.nodes;
    let keys: Vec<Option<Key>> = nodes[node]
        .inputs
        .iter()
        .map(|&j| {
            let (value, key) = input(shared, record, j);
            shared.cache.input_key(key, value.as_ref())
        })
        .collect();
    let key = shared.cache.key(node, &record.id, &keys);
    let inputs = Inputs { values };
    let ctx = context(shared, node, record);
    shared
        .cache
        .get_or_compute(node, key, || nodes[node].stage.process(&ctx, &inputs))
        .map(|value| (value, key))
        .map_err(|e| e.to_string())
}

fn finish_sinks(shared: &Shared, summary: &RunSummary) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for node in &shared.pipeline.nodes {
        let ctx = Context {
            subject: "<run>",
            output_dir: &shared.output,
            node: &node.spec.name,
            entry: None,
        };
        let files = node
            .stage
            .finish(&ctx, summary)
            .with_context(|| format!("node `{}` could not finish", node.spec.name))?;
        written.extend(files);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use voxflow_stages::stage::{Stage, StageError};

    use super::*;
    use crate::config::{NodeSpec, Settings};
    use crate::graph::Node;

    struct Source(usize);

    impl Stage for Source {
        fn process(&self, _: &Context<'_>, _: &Inputs<'_>) -> Result<Value, StageError> {
            unreachable!("the engine never calls process on a source")
        }

        fn subjects(&self) -> Option<Result<Vec<SubjectEntry>, StageError>> {
            let entry = |n: usize| SubjectEntry {
                id: format!("s{n:03}"),
                image: PathBuf::from("x"),
                labels: None,
                mask: None,
            };
            Some(Ok((0..self.0).map(entry).collect()))
        }
    }

    /// Counts subjects between the first and last node, and remembers the most at once.
    #[derive(Default)]
    struct InFlight {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    struct Enter(Arc<InFlight>);

    impl Stage for Enter {
        fn process(&self, ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
            match ctx.subject {
                "s003" => return Err(StageError::Data("bad scan".into())),
                "s005" => panic!("stage bug"),
                _ => {}
            }
            let now = self.0.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.0.most.fetch_max(now, Ordering::SeqCst);
            Ok(inputs.get(0)?.clone())
        }
    }

    struct Leave(Arc<InFlight>);

    impl Stage for Leave {
        fn kind(&self) -> StageKind {
            StageKind::Compute
        }

        fn process(&self, _: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
            std::thread::sleep(Duration::from_millis(3));
            self.0.now.fetch_sub(1, Ordering::SeqCst);
            Ok(inputs.get(0)?.clone())
        }
    }

    fn node(
        name: &str,
        stage: Arc<dyn Stage>,
        inputs: Vec<usize>,
        capacity: Option<usize>,
    ) -> Node {
        let spec = NodeSpec {
            name: name.into(),
            kind: "test".into(),
            inputs: Vec::new(),
            concurrency: 1,
            channel_capacity: capacity,
            batch: 1,
            cache: true,
            params: toml::Table::new(),
            expanded: true,
            line: 1,
            key_lines: Default::default(),
        };
        Node {
            spec,
            stage,
            inputs,
            per_subject: true,
            source: name == "source",
        }
    }

    fn pipeline(subjects: usize, capacity: usize, counter: &Arc<InFlight>) -> Pipeline {
        let settings = Settings {
            name: "t".into(),
            output: std::env::temp_dir().join("voxflow-run-test"),
            channel_capacity: 8,
            description: None,
            cache: crate::cache::CacheSetting::Off,
            cache_max_gb: crate::cache::DEFAULT_MAX_GB,
        };
        let nodes = vec![
            node("source", Arc::new(Source(subjects)), vec![], None),
            node("enter", Arc::new(Enter(counter.clone())), vec![0], None),
            node(
                "leave",
                Arc::new(Leave(counter.clone())),
                vec![1],
                Some(capacity),
            ),
        ];
        Pipeline {
            path: "t.toml".into(),
            settings,
            nodes,
        }
    }

    async fn run_with(subjects: usize, capacity: usize) -> (RunOutcome, usize) {
        let counter = Arc::new(InFlight::default());
        let tmp = std::env::temp_dir().join(format!("voxflow-run-test-{capacity}"));
        let options = RunOptions {
            output: Some(tmp),
            bars: None,
            no_cache: true,
            cache_max_gb: None,
            interrupt: Interrupt::default(),
        };
        let outcome = run(pipeline(subjects, capacity, &counter), options)
            .await
            .unwrap();
        (outcome, counter.most.load(Ordering::SeqCst))
    }

    /// Between `enter` and `leave` sit the channel's `capacity` records, the one `leave`
    /// works on, and the one `enter` holds while waiting to send: exactly `capacity + 2` at
    /// most, however many subjects there are.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_in_flight_are_bounded_by_channel_capacity() {
        for capacity in [1, 3] {
            let (outcome, most) = run_with(40, capacity).await;
            assert_eq!(outcome.summary.subjects.len(), 40);
            assert_eq!(most, capacity + 2, "capacity {capacity}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_and_panicking_subjects_do_not_stop_the_others() {
        let (outcome, _) = run_with(8, 2).await;
        assert_eq!(outcome.summary.subjects.len(), 8);
        assert_eq!(outcome.failed(), 2);
        let failure = |id: &str| {
            let s = outcome
                .summary
                .subjects
                .iter()
                .find(|s| s.subject == id)
                .unwrap();
            s.failure.clone()
        };
        assert_eq!(
            failure("s003"),
            Some(("enter".to_string(), "bad scan".to_string()))
        );
        let (node, reason) = failure("s005").unwrap();
        assert_eq!(node, "enter");
        assert!(reason.contains("stage bug"), "{reason}");
        assert_eq!(failure("s004"), None);
    }

    /// Records the size of each batch it is handed; a batch holding `s007` panics, and
    /// `s007` alone fails.
    #[derive(Default)]
    struct Batcher {
        sizes: std::sync::Mutex<Vec<usize>>,
    }

    impl Stage for Batcher {
        fn kind(&self) -> StageKind {
            StageKind::Compute
        }

        fn batches(&self) -> bool {
            true
        }

        fn process(&self, ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
            if ctx.subject == "s007" {
                return Err(StageError::Data("bad alone".into()));
            }
            Ok(inputs.get(0)?.clone())
        }

        fn process_batch(
            &self,
            items: &[(Context<'_>, Inputs<'_>)],
        ) -> Vec<Result<Value, StageError>> {
            self.sizes.lock().unwrap().push(items.len());
            assert!(
                items.iter().all(|(c, _)| c.subject != "s007"),
                "s007 in a batch"
            );
            items.iter().map(|(c, i)| self.process(c, i)).collect()
        }
    }

    /// Subjects reach a batching node in groups of at most `batch`; ones that failed upstream
    /// ride along without counting, and a batch that panics is rerun one subject at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batching_node_gets_full_batches_and_survives_a_panic() {
        let counter = Arc::new(InFlight::default());
        let batcher = Arc::new(Batcher::default());
        let mut p = pipeline(10, 4, &counter);
        let mut last = node("batcher", batcher.clone(), vec![2], Some(4));
        last.spec.batch = 3;
        p.nodes.push(last);
        let options = RunOptions {
            output: Some(std::env::temp_dir().join("voxflow-run-test-batch")),
            bars: None,
            no_cache: true,
            cache_max_gb: None,
            interrupt: Interrupt::default(),
        };
        let outcome = run(p, options).await.unwrap();
        assert_eq!(outcome.summary.subjects.len(), 10);
        let failed: BTreeMap<String, String> = outcome
            .summary
            .subjects
            .iter()
            .filter_map(|s| {
                s.failure
                    .clone()
                    .map(|(n, r)| (s.subject.clone(), format!("{n}: {r}")))
            })
            .collect();
        let ids: Vec<&str> = failed.keys().map(String::as_str).collect();
        assert_eq!(ids, ["s003", "s005", "s007"]);
        assert_eq!(failed["s003"], "enter: bad scan");
        assert_eq!(failed["s007"], "batcher: bad alone");
        let sizes = batcher.sizes.lock().unwrap().clone();
        // Eight subjects reach the batcher: batches of three, the one with s007 rerun alone.
        assert!(sizes.iter().all(|&n| (2..=3).contains(&n)), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 8, "{sizes:?}");
    }

    /// Passes its input on.
    struct Pass;

    impl Stage for Pass {
        fn process(&self, _: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
            Ok(inputs.get(0)?.clone())
        }
    }

    /// Passes its input on; when `at` reaches it, sets the run's interrupt first.
    struct Interrupter {
        at: &'static str,
        interrupt: Interrupt,
    }

    impl Stage for Interrupter {
        fn kind(&self) -> StageKind {
            StageKind::Compute
        }

        fn process(&self, ctx: &Context<'_>, inputs: &Inputs<'_>) -> Result<Value, StageError> {
            if ctx.subject == self.at {
                self.interrupt.trigger(Signal::Interrupt);
            }
            Ok(inputs.get(0)?.clone())
        }
    }

    /// One worker per node keeps the subjects in order: the one in the last node when the
    /// interrupt comes finishes, those before it finished, every later one is not run,
    /// whether it was waiting in a channel or never sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupt_stops_later_subjects_and_keeps_the_finished_ones() {
        let counter = Arc::new(InFlight::default());
        let interrupt = Interrupt::default();
        let mut p = pipeline(20, 2, &counter);
        p.nodes.truncate(1);
        p.nodes.push(node("pass", Arc::new(Pass), vec![0], None));
        let last = Interrupter {
            at: "s004",
            interrupt: interrupt.clone(),
        };
        p.nodes.push(node("last", Arc::new(last), vec![1], None));
        let options = RunOptions {
            output: Some(std::env::temp_dir().join("voxflow-run-test-interrupt")),
            interrupt,
            no_cache: true,
            ..RunOptions::default()
        };
        let outcome = run(p, options).await.unwrap();
        assert_eq!(outcome.interrupted, Some(Signal::Interrupt));
        let done: Vec<&str> = outcome
            .summary
            .subjects
            .iter()
            .map(|s| s.subject.as_str())
            .collect();
        assert_eq!(done, ["s000", "s001", "s002", "s003", "s004"]);
        let mut not_run = outcome.summary.not_run.clone();
        not_run.sort();
        let later: Vec<String> = (5..20).map(|n| format!("s{n:03}")).collect();
        assert_eq!(not_run, later);
        assert!(outcome.summary.interrupted);
        assert_eq!(outcome.failed(), 0);
    }

    #[test]
    fn a_second_run_cannot_take_a_locked_output_folder() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_output(dir.path()).unwrap();
        let err = lock_output(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another voxflow run is writing to"), "{err}");
        drop(first);
        assert!(lock_output(dir.path()).is_ok());
    }
}
