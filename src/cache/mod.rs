//! The volume cache: outputs of preprocessing nodes kept on disk, keyed by what made them.
//!
//! Nightly re-runs over hundreds of subjects spend much of their non-registration time
//! decompressing gzip NIfTI/MGZ files and redoing the same orientation fixes and intensity
//! rescaling. Those nodes (`load`, `conform`, `normalize`, `skull_strip`) are deterministic
//! functions of their parameters and input files, and their value is a [`Scan`], so the
//! engine stores each result once and reads it back on later runs as raw `f32` files
//! (memory-mapped, see [`store`]) instead of recomputing it.
//!
//! A node's key is a SHA-256 over: the cache format version, voxflow's version, the node's
//! type, its parameters as TOML, the subject id, the keys of its inputs in order, and a
//! fingerprint of every file the node's own parameters name. A dataset entry's key is the
//! fingerprint of the files it lists. A file's fingerprint is its path as written, its
//! canonical path, its size and its modification time (ns), so touching, replacing or editing
//! an input misses; so does changing any parameter upstream. SHA-256 (crate `sha2`) rather
//! than `std`'s hasher: keys name directories that must mean the same thing across builds,
//! and `DefaultHasher` is not stable across Rust releases.
//!
//! Keys travel node to node even through nodes that opt out (`cache = false`), so a node
//! after an opted-out one can still be cached. A node with an input that has no key (a
//! registration, a segmentation) has no key either and always runs.
//!
//! The folder has a size cap (`[pipeline] cache_max_gb`, default [`DEFAULT_MAX_GB`] GB,
//! `voxflow run --cache-max-gb N`): at the end of each run, whole entries are evicted, least
//! recently used first, until the entries take at most the cap. The bundled job stores about
//! 190 MB per subject, so without a cap a nightly run over hundreds of subjects would fill
//! the disk unseen; with it, a dataset larger than the cap simply recomputes what was evicted.
//! "Used" means written or read by a run (see [`store`] for how it is recorded and how a
//! removal stays safe for a run reading at the same time). A run whose own entries exceed
//! the cap says so: the next run will recompute part of them.
//!
//! Known shortcomings, in plain words:
//! - during a run the cap is enforced each time the run has stored a tenth of it, so the
//!   folder exceeds it by at most that much plus the entries being written at that moment;
//!   sizes are file lengths, not disk blocks; `.tmp-*` folders left by killed runs are neither counted
//!   nor removed (`voxflow cache clear` removes them);
//! - two runs sharing a folder each evict by what they see at their end, so one may evict an
//!   entry the other was about to read (it then recomputes it);
//! - a change in a stage's code is seen through a hash of the stages' source and of
//!   `Cargo.lock` taken at build time (`VOXFLOW_CODE`, see `build.rs`), so every rebuild
//!   that touches them starts from an empty cache, even a change of a comment;
//! - a file rewritten within the same nanosecond with the same size keeps its key;
//! - a volume two nodes share in memory on a cold run (`normalize` passes labels through)
//!   is stored in each node's entry and read back as two copies on a warm run: the bundled
//!   job's peak memory went from 0.78 to 0.91 GB.
//!
//! Each `.f32` file's CRC-32 is kept in the header, and the header's own CRC-32 in
//! `entry.json` beside it; both are checked on every read, so a file damaged in place (same
//! size) or a header edited into other valid JSON (a shifted affine) is recomputed like a
//! truncated entry.

pub mod store;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};
use voxflow_stages::stage::{StageError, SubjectEntry, Value};

use crate::graph::Pipeline;

pub use store::{CacheError, clear};

/// Version of the key recipe and of the entry layout. Bump it when either changes, or when a
/// cacheable stage's output changes for the same input: old entries then simply miss.
/// 3: `entry.json` carries a CRC-32 of the header itself.
pub const FORMAT_VERSION: u32 = 3;

/// Size cap of the cache folder, in GB (10^9 bytes), unless the pipeline or the command
/// line says otherwise: about a hundred subjects of the bundled job.
pub const DEFAULT_MAX_GB: f64 = 20.0;

/// Node types whose values are cached: deterministic, and producing a scan.
pub const CACHEABLE: &[&str] = &["load", "conform", "normalize", "skull_strip"];

/// What the pipeline file asks of the cache (`[pipeline] cache`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CacheSetting {
    /// The per-user folder ([`default_dir`]).
    #[default]
    Default,
    /// `cache = false`: never read nor write.
    Off,
    /// `cache = "DIR"`.
    Dir(PathBuf),
}

/// `${XDG_CACHE_HOME:-~/.cache}/voxflow/volumes`, or `None` when neither is set.
pub fn default_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache"))
    })?;
    Some(base.join("voxflow").join("volumes"))
}

/// The key of a cached value: a SHA-256 digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    /// The key of arbitrary bytes (for tools and benches that store entries by hand).
    pub fn from_bytes(bytes: &[u8]) -> Key {
        Key(Sha256::digest(bytes).into())
    }

    /// Lowercase hexadecimal, the entry's directory name.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key named by 64 hexadecimal digits (either case), as [`Key::hex`] writes it.
    pub fn from_hex(hex: &str) -> Option<Key> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Key(bytes))
    }
}

/// What the cache knows of one node, fixed for the run.
struct NodePlan {
    name: String,
    /// The node's type, parameters and own files, hashed once; `None` when the type is not
    /// cacheable or one of its files cannot be fingerprinted (then it just runs).
    digest: Option<[u8; 32]>,
    /// Whether its values are read from and written to the cache (`cache = false` opts out).
    enabled: bool,
}

/// Counts for the end-of-run summary.
#[derive(Default)]
struct NodeStats {
    hits: AtomicU64,
    misses: AtomicU64,
    stored_bytes: AtomicU64,
}

/// The cache as one run uses it.
pub struct Cache {
    /// `None`: off for this run.
    dir: Option<PathBuf>,
    nodes: Vec<NodePlan>,
    stats: Vec<NodeStats>,
    /// Most bytes the entries may take after the run ([`Cache::evict`]).
    max_bytes: u64,
    /// Entries this run read or stored, to tell when the cap is smaller than one run needs.
    used: Mutex<HashSet<Key>>,
    /// Bytes stored since the cap was last enforced during the run.
    since_evict: AtomicU64,
    /// Held while entries are evicted during the run, so one worker does it at a time.
    evicting: Mutex<()>,
}

impl Cache {
    /// The cache for `pipeline`; `off` (the `--no-cache` flag) disables it whatever the file
    /// says, and `max_gb` (`--cache-max-gb`) replaces the file's size cap. Nothing is created
    /// on disk until the first entry is stored.
    pub fn new(pipeline: &Pipeline, off: bool, max_gb: Option<f64>) -> Cache {
        let dir = match (&pipeline.settings.cache, off) {
            (_, true) | (CacheSetting::Off, _) => None,
            (CacheSetting::Dir(dir), false) => Some(dir.clone()),
            (CacheSetting::Default, false) => {
                let dir = default_dir();
                if dir.is_none() {
                    warn!("Neither XDG_CACHE_HOME nor HOME is set: the volume cache is off");
                }
                dir
            }
        };
        let nodes = pipeline
            .nodes
            .iter()
            .map(|n| NodePlan {
                name: n.spec.name.clone(),
                digest: dir
                    .as_ref()
                    .and_then(|_| node_digest(&n.spec.kind, &n.spec.params)),
                enabled: n.spec.cache,
            })
            .collect();
        let stats = pipeline
            .nodes
            .iter()
            .map(|_| NodeStats::default())
            .collect();
        if let Some(dir) = &dir {
            debug!(dir = %dir.display(), "Volume cache");
        }
        let max_gb = max_gb.unwrap_or(pipeline.settings.cache_max_gb);
        Cache {
            dir,
            nodes,
            stats,
            max_bytes: gb_to_bytes(max_gb),
            used: Mutex::default(),
            since_evict: AtomicU64::new(0),
            evicting: Mutex::default(),
        }
    }

    /// The key of an input: its stored key, or for a dataset entry the fingerprint of its
    /// files (computed when first needed, while the entry is still in the record).
    pub fn input_key(&self, stored: Option<Key>, value: Option<&Value>) -> Option<Key> {
        self.dir.as_ref()?;
        stored.or_else(|| match value {
            Some(Value::Entry(entry)) => entry_key(entry),
            _ => None,
        })
    }

    /// The key of `node`'s value for `subject`, from its inputs' keys in order; `None` when
    /// the cache is off, the node is not cacheable, or an input has no key.
    pub fn key(&self, node: usize, subject: &str, inputs: &[Option<Key>]) -> Option<Key> {
        let digest = self.nodes[node].digest?;
        let mut h = Sha256::new();
        h.update(digest);
        field(&mut h, subject.as_bytes());
        for input in inputs {
            h.update(input.as_ref()?.0);
        }
        Some(Key(h.finalize().into()))
    }

    /// The value of `node` under `key`: read from the cache on a hit, else computed by
    /// `compute` and stored. A cache that cannot be read or written is logged and bypassed;
    /// it never fails the subject.
    ///
    /// # Errors
    /// Whatever `compute` returns.
    pub fn get_or_compute(
        &self,
        node: usize,
        key: Option<Key>,
        compute: impl FnOnce() -> Result<Value, StageError>,
    ) -> Result<Value, StageError> {
        let (Some(dir), Some(key), true) = (&self.dir, key, self.nodes[node].enabled) else {
            return compute();
        };
        let stats = &self.stats[node];
        match store::read(dir, &key) {
            Ok(Some(scan)) => {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                self.mark_used(key);
                debug!(node = %self.nodes[node].name, key = %key.hex(), "Cache hit");
                return Ok(Value::Scan(Arc::new(scan)));
            }
            Ok(None) => {}
            Err(e) => {
                warn!(node = %self.nodes[node].name, error = %e,
                    "Cache entry unreadable; recomputing and replacing it");
                store::remove(dir, &key);
            }
        }
        stats.misses.fetch_add(1, Ordering::Relaxed);
        let value = compute()?;
        if let Value::Scan(scan) = &value {
            match store::write(dir, &key, scan) {
                Ok(bytes) => {
                    stats.stored_bytes.fetch_add(bytes, Ordering::Relaxed);
                    self.mark_used(key);
                    self.keep_under_cap(bytes);
                }
                Err(e) => warn!(node = %self.nodes[node].name, error = %e,
                    "Cannot store in the volume cache; the run goes on without it"),
            }
        }
        Ok(value)
    }

    /// Logs, per cached node, how many values were read from the cache and how many computed.
    pub fn log_summary(&self) {
        let Some(dir) = &self.dir else { return };
        for (plan, stats) in self.nodes.iter().zip(&self.stats) {
            let (hits, misses) = (
                stats.hits.load(Ordering::Relaxed),
                stats.misses.load(Ordering::Relaxed),
            );
            if hits + misses == 0 {
                continue;
            }
            let stored_mb = stats.stored_bytes.load(Ordering::Relaxed) / 1_000_000;
            info!(node = %plan.name, hits, misses, stored_mb, "Volume cache");
        }
        debug!(dir = %dir.display(), "Volume cache folder (`voxflow cache clear` empties it)");
    }

    /// Remembers that this run read or stored `key`.
    fn mark_used(&self, key: Key) {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
    }

    /// During a run: once a tenth of the cap has been stored since the last check, brings
    /// the folder under its cap again, so a run over a dataset larger than the cap never
    /// fills the disk. Runs on the worker that stored (a file-system walk, no async thread);
    /// a worker that finds another one evicting goes on.
    fn keep_under_cap(&self, stored: u64) {
        let since = self.since_evict.fetch_add(stored, Ordering::Relaxed) + stored;
        if since < (self.max_bytes / 10).max(1) {
            return;
        }
        let Ok(_one) = self.evicting.try_lock() else {
            return;
        };
        self.since_evict.store(0, Ordering::Relaxed);
        self.evict_to_cap(false);
    }

    /// Brings the cache folder under its size cap: evicts whole entries, least recently used
    /// first (this run's own entries were all used during it, so they go last), and logs what
    /// went. Warns when this run's own entries alone exceed the cap. Problems are logged; the
    /// run never fails for them. Blocks on the file system: call it off the async threads.
    pub fn evict(&self) {
        self.evict_to_cap(true);
    }

    /// [`Cache::evict`]; in the middle of a run (`end_of_run` false) without the warning that
    /// the run needs more than the cap (the end of the run says it once), and with what went
    /// logged at debug level.
    fn evict_to_cap(&self, end_of_run: bool) {
        let Some(dir) = &self.dir else { return };
        let listed = match store::entries(dir) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "Cannot list the volume cache; nothing evicted");
                return;
            }
        };
        let own: u64 = {
            let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
            listed
                .iter()
                .filter(|e| used.contains(&e.key))
                .map(|e| e.bytes)
                .sum()
        };
        let cap_gb = self.max_bytes as f64 / 1e9;
        if end_of_run && own > self.max_bytes {
            warn!(
                cap_gb,
                run_gb = own as f64 / 1e9,
                "The volume cache cap is smaller than what this run alone stores or reads: \
                 the next run recomputes what is evicted now; raise `cache_max_gb`"
            );
        }
        let done = store::evict(listed, self.max_bytes);
        if !end_of_run {
            debug!(
                entries = done.entries,
                evicted_mb = done.bytes / 1_000_000,
                left_mb = done.left / 1_000_000,
                "Volume cache kept under its cap during the run"
            );
        } else if done.entries > 0 {
            info!(
                entries = done.entries,
                evicted_mb = done.bytes / 1_000_000,
                left_mb = done.left / 1_000_000,
                cap_gb,
                "Volume cache evicted least recently used entries"
            );
        } else {
            debug!(
                left_mb = done.left / 1_000_000,
                cap_gb, "Volume cache under its cap"
            );
        }
    }
}

/// `gb` × 10^9 bytes, saturating (the settings only accept positive finite numbers).
fn gb_to_bytes(gb: f64) -> u64 {
    (gb * 1e9) as u64
}

/// Length-prefixed bytes, so two fields can never run together into the same hash input.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Hash of what makes a node's output, apart from its inputs and subject.
fn node_digest(kind: &str, params: &toml::Table) -> Option<[u8; 32]> {
    if !CACHEABLE.contains(&kind) {
        return None;
    }
    node_digest_of(env!("VOXFLOW_CODE"), kind, params)
}

/// [`node_digest`] for the stages' code identified by `code`.
fn node_digest_of(code: &str, kind: &str, params: &toml::Table) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    field(&mut h, format!("voxflow-cache {FORMAT_VERSION}").as_bytes());
    field(&mut h, env!("CARGO_PKG_VERSION").as_bytes());
    field(&mut h, code.as_bytes());
    field(&mut h, kind.as_bytes());
    let text = toml::to_string(params).ok()?;
    field(&mut h, text.as_bytes());
    // The stage's own files (an atlas's image, a mask file, atlas heads).
    let built = voxflow_stages::registry::build(kind, params.clone()).ok()?;
    for (param, path) in &built.files {
        field(&mut h, param.as_bytes());
        fingerprint(&mut h, path)?;
    }
    Some(h.finalize().into())
}

/// The key of a dataset entry: the fingerprints of the files it lists.
pub fn entry_key(entry: &SubjectEntry) -> Option<Key> {
    let mut h = Sha256::new();
    field(&mut h, format!("voxflow-entry {FORMAT_VERSION}").as_bytes());
    for (role, path) in [
        ("image", Some(&entry.image)),
        ("labels", entry.labels.as_ref()),
        ("mask", entry.mask.as_ref()),
    ] {
        field(&mut h, role.as_bytes());
        if let Some(path) = path {
            fingerprint(&mut h, path)?;
        }
    }
    Some(Key(h.finalize().into()))
}

/// Adds a file's identity to `h`: path as written (volumes remember it), canonical path,
/// size, modification time. `None` when it cannot be read: the stage will report why.
fn fingerprint(h: &mut Sha256, path: &Path) -> Option<()> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    let modified = meta.modified().ok()?;
    let since = modified
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    field(h, path.as_os_str().as_encoded_bytes());
    field(h, canonical.as_os_str().as_encoded_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(since.to_le_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dir: &Path) -> SubjectEntry {
        SubjectEntry {
            id: "s".into(),
            image: dir.join("image.nii"),
            labels: Some(dir.join("labels.nii")),
            mask: None,
        }
    }

    #[test]
    fn entry_key_follows_file_size_and_time() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("image.nii"), b"1234").unwrap();
        std::fs::write(tmp.path().join("labels.nii"), b"1234").unwrap();
        let e = entry(tmp.path());
        let first = entry_key(&e).unwrap();
        assert_eq!(entry_key(&e), Some(first), "stable for unchanged files");

        let labels = std::fs::File::options()
            .write(true)
            .open(tmp.path().join("labels.nii"))
            .unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        labels.set_modified(later).unwrap();
        let touched = entry_key(&e).unwrap();
        assert_ne!(touched, first, "a touched labels file misses");

        std::fs::write(tmp.path().join("image.nii"), b"12345").unwrap();
        assert_ne!(entry_key(&e).unwrap(), touched, "a rewritten image misses");
        std::fs::remove_file(tmp.path().join("image.nii")).unwrap();
        assert_eq!(entry_key(&e), None, "a missing file has no key");
    }

    #[test]
    fn node_digest_follows_type_and_parameters() {
        let params = |text: &str| -> toml::Table { toml::from_str(text).unwrap() };
        let a = node_digest("normalize", &params("percentiles = [0.5, 99.5]")).unwrap();
        let b = node_digest("normalize", &params("percentiles = [1.0, 99.0]")).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            node_digest("normalize", &params("percentiles = [0.5, 99.5]")),
            Some(a)
        );
        assert_eq!(node_digest("register", &params("")), None, "never cached");
        let p = params("percentiles = [0.5, 99.5]");
        assert_eq!(
            node_digest_of(env!("VOXFLOW_CODE"), "normalize", &p),
            Some(a)
        );
        assert_ne!(
            node_digest_of("0123456789abcdef", "normalize", &p),
            Some(a),
            "another build's stages never share entries"
        );
        assert_eq!(env!("VOXFLOW_CODE").len(), 16);
    }

    #[test]
    fn keys_need_every_input_key() {
        let mut h = Sha256::new();
        h.update(b"x");
        let k = Key(h.finalize().into());
        let cache = test_cache(
            Some(PathBuf::from("/nonexistent")),
            node_digest("normalize", &toml::Table::new()),
        );
        assert!(cache.key(0, "s1", &[Some(k)]).is_some());
        assert_ne!(
            cache.key(0, "s1", &[Some(k)]),
            cache.key(0, "s2", &[Some(k)])
        );
        assert_eq!(cache.key(0, "s1", &[Some(k), None]), None);
        assert_eq!(k.hex().len(), 64);
    }

    /// A cache in `dir` with one enabled node of digest `digest` and the default cap.
    fn test_cache(dir: Option<PathBuf>, digest: Option<[u8; 32]>) -> Cache {
        Cache {
            dir,
            nodes: vec![NodePlan {
                name: "n".into(),
                digest,
                enabled: true,
            }],
            stats: vec![NodeStats::default()],
            max_bytes: gb_to_bytes(DEFAULT_MAX_GB),
            used: Mutex::default(),
            since_evict: AtomicU64::new(0),
            evicting: Mutex::default(),
        }
    }

    fn probe(value: Result<Value, StageError>) -> voxflow_stages::stage::Scan {
        match value {
            Ok(Value::Scan(scan)) => (*scan).clone(),
            _ => unreachable!("the test's values are scans"),
        }
    }

    /// A damaged entry (here its header edited into other valid JSON) is never served: the
    /// value is computed again and the entry replaced, so the next read is a good hit.
    #[test]
    fn a_damaged_header_is_recomputed_and_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = test_cache(Some(tmp.path().to_path_buf()), None);
        let computed = AtomicU64::new(0);
        let scan = || {
            computed.fetch_add(1, Ordering::Relaxed);
            let mut affine = voxflow_stages::volume::Affine::identity();
            affine[(0, 3)] = -7.25;
            let v = voxflow_stages::volume::Volume::new(vec![2.0; 8], [2, 2, 2], affine);
            Ok(Value::Scan(Arc::new(voxflow_stages::stage::Scan {
                image: Arc::new(v),
                labels: None,
                mask: None,
                native: None,
            })))
        };
        let key = Key::from_bytes(b"damaged");
        cache.get_or_compute(0, Some(key), scan).unwrap();
        let header = store::entry_dir(tmp.path(), &key).join("entry.json");
        let text = std::fs::read_to_string(&header).unwrap();
        // The affine's x translation moved by 10 mm, the file still valid JSON.
        let edited = text.replacen("-7.25", "2.75", 1);
        assert_ne!(edited, text);
        serde_json::from_str::<serde_json::Value>(&edited).unwrap();
        std::fs::write(&header, edited).unwrap();

        let value = probe(cache.get_or_compute(0, Some(key), scan));
        assert_eq!(
            value.image.affine[(0, 3)],
            -7.25,
            "the damaged affine was not served"
        );
        assert_eq!(computed.load(Ordering::Relaxed), 2, "recomputed");
        assert_eq!(std::fs::read_to_string(&header).unwrap(), text, "replaced");
        cache.get_or_compute(0, Some(key), scan).unwrap();
        assert_eq!(computed.load(Ordering::Relaxed), 2, "then a hit");
        assert_eq!(cache.stats[0].hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats[0].misses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_run_evicts_down_to_its_cap_after_reading_and_storing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cache = test_cache(Some(tmp.path().to_path_buf()), None);
        let scan = || {
            let v = voxflow_stages::volume::Volume::new(
                vec![2.0; 1000],
                [10, 10, 10],
                voxflow_stages::volume::Affine::identity(),
            );
            Ok(Value::Scan(Arc::new(voxflow_stages::stage::Scan {
                image: Arc::new(v),
                labels: None,
                mask: None,
                native: None,
            })))
        };
        let (a, b) = (Key::from_bytes(b"a"), Key::from_bytes(b"b"));
        for k in [a, b, a] {
            cache.get_or_compute(0, Some(k), scan).unwrap();
        }
        assert_eq!(cache.stats[0].hits.load(Ordering::Relaxed), 1);
        assert_eq!(*cache.used.lock().unwrap(), HashSet::from([a, b]));
        cache.evict();
        assert_eq!(store::entries(tmp.path()).unwrap().len(), 2, "under 20 GB");
        cache.max_bytes = 1;
        cache.evict();
        assert!(store::entries(tmp.path()).unwrap().is_empty());
        assert!(tmp.path().join("CACHEDIR.TAG").exists());
        // During a run: a cap of three entries holds while ten are stored (each store past a
        // tenth of the cap checks it), before any end-of-run eviction.
        let one = store::write(tmp.path(), &Key::from_bytes(b"probe"), &probe(scan())).unwrap();
        store::remove(tmp.path(), &Key::from_bytes(b"probe"));
        cache.max_bytes = 3 * one;
        for i in 0..10u8 {
            cache
                .get_or_compute(0, Some(Key::from_bytes(&[b'k', i])), scan)
                .unwrap();
            let sizes = store::entries(tmp.path()).unwrap();
            assert!(
                sizes.iter().map(|e| e.bytes).sum::<u64>() <= 3 * one,
                "after {i}"
            );
        }
        assert_eq!(store::entries(tmp.path()).unwrap().len(), 3);
        assert!(
            store::read(tmp.path(), &Key::from_bytes(&[b'k', 9]))
                .unwrap()
                .is_some()
        );
        assert_eq!(Key::from_hex(&a.hex()), Some(a));
        assert_eq!(Key::from_hex(&a.hex().to_uppercase()), Some(a));
        assert_eq!(Key::from_hex("xy"), None);
        assert_eq!(Key::from_hex(&format!("+{}", &a.hex()[1..])), None);
    }
}
