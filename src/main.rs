//! The `voxflow` command: run, validate, draw and inspect.
//!
//! Exit status: 0 when everything succeeded; 1 when a run finished but some subject failed
//! (each failure is logged with its reason and listed in the report); 2 for a broken
//! pipeline file, bad usage, an unreadable file given to `inspect`, or any error that stopped
//! the run as a whole; 130 (SIGINT, Ctrl-C) or 143 (SIGTERM) when a signal stopped a run
//! before every subject finished (the report lists those that did; see
//! [`voxflow::run::interrupt`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use voxflow::run::{Interrupt, ProgressWriter, RunOptions};

/// Whole-dataset 3D medical-imaging pipelines declared in files.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level (error, warn, info, debug, trace) or a tracing filter; RUST_LOG also works.
    #[arg(long, global = true, default_value = "info", value_parser = log_filter)]
    log_level: String,
}

/// Restarts the process with `GOMP_SPINCOUNT=1000` unless the user set it or
/// `OMP_WAIT_POLICY`.
///
/// libtorch's OpenMP threads spin for a long while waiting for work after every operation
/// (libgomp's default: 300 000 turns). On a machine where anything else runs (another job, a
/// second voxflow) the spinning threads and the other work take turns on the cores, and each
/// operation waits for a descheduled thread. Measured on the 2-core machine, the 2 mm
/// registration bench case, whole process: idle 3.0 s by default, 3.3 s with 1000 turns,
/// 4.4 s with no spinning (`OMP_WAIT_POLICY=PASSIVE`); beside one busy process 6.6 s, 4.9 s
/// and 4.0 s; beside a parallel build the registration alone took 40 s by default and 3 s
/// without spinning. The runtime reads the variables when it loads, before `main`, hence
/// the restart.
fn limit_openmp_spinning() {
    use std::os::unix::process::CommandExt;
    if ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // `exec` returns only if it failed; the run then goes on with the runtime's default.
    let _ = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("GOMP_SPINCOUNT", OPENMP_SPIN)
        .exec();
}

/// Turns an idle OpenMP thread spins before it sleeps (see [`limit_openmp_spinning`]).
const OPENMP_SPIN: &str = "1000";

/// Accepts a level, or comma-separated `target=level` directives whose levels are real ones
/// (a bare word that is no level, like `bogus`, would silently log nothing).
fn log_filter(text: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in text.split(',') {
        let level = directive.rsplit('=').next().unwrap_or_default().trim();
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{level:?} is not a log level; use one of {} (optionally as target=level)",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(text.to_string())
}

/// Most `--threads` accepted: far more than any machine has cores, and small enough that
/// clap's range message reads well (`0 is not in 1..=1024`).
const MAX_THREADS: u64 = 1024;

/// A positive, finite number of gigabytes.
fn positive_gb(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb > 0.0 => Ok(gb),
        _ => Err(format!("{text:?} is not a positive number of gigabytes")),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Validate a pipeline file, then run it over its dataset.
    Run {
        /// The pipeline file (TOML).
        file: PathBuf,
        /// Write results here instead of the pipeline's `output`.
        #[arg(long)]
        output: Option<PathBuf>,
        /// CPU threads for numerical work, 1 to 1024 (default: all cores; on a busy machine 1
        /// can be faster).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
            .range(1..=MAX_THREADS))]
        threads: Option<usize>,
        /// Never draw progress bars, even on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// Neither read nor write the volume cache (every node computes its value).
        #[arg(long)]
        no_cache: bool,
        /// Size cap of the volume cache in GB, replacing the file's `cache_max_gb` (default
        /// 20): least recently used entries are evicted at the end of the run.
        #[arg(long, value_name = "GB", value_parser = positive_gb)]
        cache_max_gb: Option<f64>,
    },
    /// Manage the volume cache of preprocessed scans.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Check a pipeline file without running anything; lists every problem found.
    Validate {
        /// The pipeline file (TOML).
        file: PathBuf,
    },
    /// Print a pipeline's graph in Graphviz DOT (pipe it to `dot -Tsvg`).
    Graph {
        /// The pipeline file (TOML).
        file: PathBuf,
    },
    /// Show what the readers understand of a volume file (NIfTI-1, MGH/MGZ).
    Inspect {
        /// The volume file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Remove every cached volume (the folder itself and files voxflow did not make stay); a
    /// folder without voxflow's CACHEDIR.TAG is refused.
    Clear {
        /// The cache folder (default: ${XDG_CACHE_HOME:-~/.cache}/voxflow/volumes; use the
        /// pipeline's `[pipeline] cache` folder if it sets one).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the default cache folder.
    Dir,
}

fn main() -> ExitCode {
    limit_openmp_spinning();
    voxflow_stages::register::tune_allocator();
    let cli = Cli::parse();
    let bars = match &cli.command {
        Command::Run {
            no_progress: false, ..
        } => ProgressWriter::terminal_bars(),
        _ => None,
    };
    init_logging(&cli.log_level, bars.clone());
    match dispatch(cli.command, bars) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(level: &str, bars: Option<indicatif::MultiProgress>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ProgressWriter::new(bars))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn dispatch(command: Command, bars: Option<indicatif::MultiProgress>) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { file } => Ok(match voxflow::load_pipeline(&file) {
            Ok(p) => {
                // Listing the dataset is cheap (names, not volumes) and catches a pattern or
                // manifest that names no subject, or an `output` among the dataset's files,
                // before a night's run finds it.
                let Some(source) = p.nodes.iter().find(|n| n.source) else {
                    println!("{}: ok ({} nodes)", file.display(), p.nodes.len());
                    return Ok(ExitCode::SUCCESS);
                };
                match source.stage.subjects_for_run(&p.settings.output) {
                    Some(Err(e)) => {
                        eprintln!(
                            "error: {}:{}:1: node `{}`: cannot list the dataset: {e}",
                            file.display(),
                            source.spec.line,
                            source.spec.name
                        );
                        ExitCode::from(2)
                    }
                    listed => {
                        let n = listed.and_then(Result::ok).map_or(0, |s| s.len());
                        println!(
                            "{}: ok ({} nodes, {n} subject{})",
                            file.display(),
                            p.nodes.len(),
                            if n == 1 { "" } else { "s" }
                        );
                        ExitCode::SUCCESS
                    }
                }
            }
            Err(errors) => report_config_errors(&errors),
        }),
        Command::Graph { file } => Ok(match voxflow::load_pipeline(&file) {
            Ok(p) => {
                emit(&p.to_dot())?;
                ExitCode::SUCCESS
            }
            Err(errors) => report_config_errors(&errors),
        }),
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Cache { action } => cache(action),
        Command::Run {
            file,
            output,
            threads,
            no_cache,
            cache_max_gb,
            ..
        } => {
            let pipeline = match voxflow::load_pipeline(&file) {
                Ok(p) => p,
                Err(errors) => return Ok(report_config_errors(&errors)),
            };
            set_threads(threads);
            let runtime = tokio::runtime::Runtime::new()?;
            let interrupt = Interrupt::default();
            let options = RunOptions {
                output,
                bars,
                no_cache,
                cache_max_gb,
                interrupt: interrupt.clone(),
            };
            let outcome = runtime.block_on(async {
                if let Err(e) = interrupt.listen() {
                    tracing::warn!(error = %e, "Cannot catch SIGINT and SIGTERM; they stop the \
                        run at once, without a report");
                }
                voxflow::run::run(pipeline, options).await
            })?;
            print_outcome(&outcome);
            Ok(match outcome.interrupted {
                Some(signal) => ExitCode::from(signal.exit_code()),
                None if outcome.failed() > 0 => ExitCode::from(1),
                None => ExitCode::SUCCESS,
            })
        }
    }
}

fn cache(action: CacheAction) -> anyhow::Result<ExitCode> {
    let default = || {
        voxflow::cache::default_dir()
            .ok_or_else(|| anyhow::anyhow!("neither XDG_CACHE_HOME nor HOME is set; use --dir"))
    };
    match action {
        CacheAction::Dir => emit(&format!("{}\n", default()?.display()))?,
        CacheAction::Clear { dir } => {
            let dir = match dir {
                Some(d) => d,
                None => default()?,
            };
            let (entries, bytes) = voxflow::cache::clear(&dir)?;
            emit(&format!(
                "{}: removed {entries} entries ({:.1} MB)\n",
                dir.display(),
                bytes as f64 / 1e6
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report_config_errors(errors: &voxflow::config::ConfigErrors) -> ExitCode {
    for e in &errors.0 {
        eprintln!("error: {e}");
    }
    eprintln!(
        "hint: {} problem(s); `voxflow validate FILE` checks a file without running it",
        errors.0.len()
    );
    ExitCode::from(2)
}

fn set_threads(threads: Option<usize>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = threads.unwrap_or(cores);
    if n > cores {
        tracing::warn!(
            threads = n,
            cores,
            "More threads than cores: they will take turns, which is slower, not faster"
        );
    }
    tch::set_num_threads(n as i32);
    tch::set_num_interop_threads(1);
    // The global pool may already exist only if something used rayon before: then keep it.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

fn print_outcome(outcome: &voxflow::run::RunOutcome) {
    let subjects = &outcome.summary.subjects;
    let scored: Vec<f64> = subjects
        .iter()
        .filter_map(|s| s.scores.as_ref().map(|d| d.mean_after))
        .collect();
    println!(
        "{} subjects, {} failed, {:.1} s",
        subjects.len(),
        outcome.failed(),
        outcome.summary.elapsed.as_secs_f64()
    );
    if let Some(signal) = outcome.interrupted {
        println!(
            "interrupted by {}: {} subjects not run",
            signal.name(),
            outcome.summary.not_run.len()
        );
    }
    if !scored.is_empty() {
        let mean = scored.iter().sum::<f64>() / scored.len() as f64;
        println!("mean Dice after registration: {mean:.3}");
    }
    println!("results: {}", outcome.output.display());
    for report in &outcome.reports {
        println!("  {}", report.display());
    }
}

fn inspect(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let info = voxflow_stages::io::inspect(file)?;
    if json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&info)?))?;
    } else {
        emit(&format!("{}\n", info.to_string().trim_end()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a reader that stopped early (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
