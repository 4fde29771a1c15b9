//! Cache entries on disk: one folder per key holding raw `f32` files and a JSON header.
//!
//! ```text
//! DIR/CACHEDIR.TAG                 tells backup tools to skip the folder
//! DIR/ab/abcdef…(64 hex)/entry.json  shapes, affines, source headers, how volumes form the
//!                                    scan, checksums of the header and of every `.f32` file
//! DIR/ab/abcdef…/0.f32, 1.f32, …     voxels, little-endian f32, `i` fastest (as `Volume`)
//! ```
//!
//! Raw `f32` is what [`Volume`] holds, so reading an entry back is a memory map and a copy,
//! with no decompression and no conversion; the files are larger than the gzip inputs (that
//! is the trade). A volume the scan holds twice (a `conform` output whose `native` scan is
//! the same image) is written once and shared again when read.
//!
//! An entry is written under a temporary name in its shard folder and renamed into place
//! when complete, so a killed run leaves at most a `.tmp-*` folder (removed by `clear`) and
//! two runs storing the same key both succeed (the second finds the first's entry and drops
//! its own). An entry whose header does not parse, whose header or `.f32` files fail their
//! CRC-32, or whose files have the wrong size is an error for the caller to log, remove and
//! recompute.
//!
//! `entry.json` is an envelope around the header proper:
//!
//! ```text
//! { "format": 3, "crc32": 1234567890, "header": { "volumes": [...], "scan": {...} } }
//! ```
//!
//! `crc32` covers the bytes of `header` exactly as written, so an edit that keeps the file
//! valid JSON (a shifted affine, another shape, a swapped volume index) is caught like a
//! damaged `.f32` file. Checking the bytes as written rather than a re-serialization of what
//! was parsed keeps the check exact: a float read back one unit in the last place off would
//! otherwise fail it.
//!
//! An entry's last use is its header's modification time: writing it sets it, and every
//! read that returns the entry sets it to now. [`evict`] removes the least recently used
//! entries first, each renamed to a `.tmp-` name and then deleted, so a run that looks it up
//! meanwhile misses (and recomputes) rather than reading half an entry; a run already
//! reading its files keeps them, as unlinked files stay readable while open.
//!
//! Limitation: [`Volume`] owns a `Vec<f32>`, so the mapped pages are copied into it; serving
//! volumes straight from the map would need a different storage type in every stage. Files
//! are not `fsync`ed: a power cut right after a run may leave an entry with short files,
//! which the size check then rejects.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use voxflow_stages::stage::Scan;
use voxflow_stages::volume::{Affine, AffineSource, DataType, Format, SourceHeader, Volume};

use super::{FORMAT_VERSION, Key};

/// Name of the header file of an entry.
const HEADER: &str = "entry.json";

/// A cache entry could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The entry is not what this version writes (truncated, edited, another format).
    #[error("{path}: corrupt cache entry: {reason}")]
    Corrupt {
        /// The entry's file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `clear` was pointed at a folder voxflow did not make its cache.
    #[error(
        "{path}: not a voxflow cache folder (it has no CACHEDIR.TAG written by voxflow); \
         nothing removed"
    )]
    NotACache {
        /// The folder.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `entry.json` holds: the format, then the header's bytes and their CRC-32.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    format: u32,
    /// CRC-32 of `header`'s bytes as they stand in the file.
    crc32: u32,
    #[serde(borrow)]
    header: &'a RawValue,
}

/// Just the format of an `entry.json`, read first so an entry of another format is named as
/// such whatever its layout.
#[derive(Debug, Deserialize)]
struct FormatOnly {
    format: u32,
}

/// The entry's header: its volumes and how they form the scan.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryHeader {
    volumes: Vec<VolumeMeta>,
    scan: ScanMeta,
}

/// One volume: its file is `<index>.f32`.
#[derive(Debug, Serialize, Deserialize)]
struct VolumeMeta {
    shape: [usize; 3],
    frames: usize,
    /// Row-major 4×4.
    affine: [f64; 16],
    header: HeaderMeta,
    /// CRC-32 of the `.f32` file's bytes, so a file damaged in place (same size) is caught.
    crc32: u32,
}

/// [`SourceHeader`], field by field.
#[derive(Debug, Serialize, Deserialize)]
struct HeaderMeta {
    path: PathBuf,
    format: Format,
    dtype: DataType,
    affine: [f64; 16],
    affine_source: AffineSource,
    qform_code: i16,
    sform_code: i16,
    scaling: (f64, f64),
}

/// A scan as indices into the entry's volumes.
#[derive(Debug, Serialize, Deserialize)]
struct ScanMeta {
    image: usize,
    labels: Option<usize>,
    mask: Option<usize>,
    native: Option<Box<ScanMeta>>,
}

/// The folder of the entry for `key`.
pub fn entry_dir(dir: &Path, key: &Key) -> PathBuf {
    let hex = key.hex();
    dir.join(&hex[..2]).join(hex)
}

/// Reads the entry for `key`; `Ok(None)` when there is none.
///
/// # Errors
/// [`CacheError::Corrupt`] for an entry that is not whole, [`CacheError::Io`] when it cannot
/// be read.
pub fn read(dir: &Path, key: &Key) -> Result<Option<Scan>, CacheError> {
    let entry = entry_dir(dir, key);
    let header_path = entry.join(HEADER);
    let text = match std::fs::read(&header_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&header_path)(e)),
    };
    let corrupt = |reason: String| CacheError::Corrupt {
        path: header_path.clone(),
        reason,
    };
    let header = parse_header(&text).map_err(corrupt)?;
    let volumes = match header
        .volumes
        .iter()
        .enumerate()
        .map(|(i, meta)| read_volume(&entry, i, meta).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) => v,
        // Evicted or cleared by another run between the header and a volume: a miss.
        Err(CacheError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && !header_path.exists() =>
        {
            tracing::debug!(entry = %entry.display(), "Cache entry removed while read");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let scan = assemble(&header.scan, &volumes).ok_or_else(|| corrupt("bad index".into()))?;
    mark_used(&header_path);
    Ok(Some(scan))
}

/// The header in the text of an `entry.json`, once its format and checksum are right; else
/// what is wrong.
fn parse_header(text: &[u8]) -> Result<EntryHeader, String> {
    let format: FormatOnly = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if format.format != FORMAT_VERSION {
        return Err(format!(
            "format {}, expected {FORMAT_VERSION}",
            format.format
        ));
    }
    let envelope: Envelope<'_> = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let crc = crc32fast::hash(envelope.header.get().as_bytes());
    if crc != envelope.crc32 {
        return Err(format!(
            "header checksum {crc:08x}, expected {:08x} (edited or damaged)",
            envelope.crc32
        ));
    }
    serde_json::from_str(envelope.header.get()).map_err(|e| e.to_string())
}

/// Records that the entry whose header is `header` was just used: eviction removes the
/// entries with the oldest header modification time first. A failure (a read-only cache
/// shared by another user) only costs the entry its place in that order.
fn mark_used(header: &Path) {
    let now = std::time::SystemTime::now();
    if let Err(e) = std::fs::File::open(header).and_then(|f| f.set_modified(now)) {
        tracing::debug!(file = %header.display(), error = %e, "Cannot mark a cache entry used");
    }
}

fn assemble(meta: &ScanMeta, volumes: &[Arc<Volume>]) -> Option<Scan> {
    let get = |i: Option<usize>| -> Option<Option<Arc<Volume>>> {
        match i {
            None => Some(None),
            Some(i) => volumes.get(i).cloned().map(Some),
        }
    };
    let native = match &meta.native {
        None => None,
        Some(n) => Some(Arc::new(assemble(n, volumes)?)),
    };
    Some(Scan {
        image: volumes.get(meta.image)?.clone(),
        labels: get(meta.labels)?,
        mask: get(meta.mask)?,
        native,
    })
}

fn read_volume(entry: &Path, index: usize, meta: &VolumeMeta) -> Result<Volume, CacheError> {
    let path = entry.join(format!("{index}.f32"));
    let values = meta
        .shape
        .iter()
        .try_fold(meta.frames, |n, &s| n.checked_mul(s));
    let expected = values.and_then(|n| n.checked_mul(4));
    let file = std::fs::File::open(&path).map_err(io(&path))?;
    let len = file.metadata().map_err(io(&path))?.len();
    if expected.is_none_or(|e| e as u64 != len) {
        return Err(CacheError::Corrupt {
            path,
            reason: format!(
                "{len} bytes, expected {:?} for shape {:?} × {} frames",
                expected, meta.shape, meta.frames
            ),
        });
    }
    let (data, crc) = read_f32(&file, &path, len as usize)?;
    if crc != meta.crc32 {
        return Err(CacheError::Corrupt {
            path,
            reason: format!("checksum {crc:08x}, expected {:08x}", meta.crc32),
        });
    }
    let h = &meta.header;
    Ok(Volume {
        data,
        shape: meta.shape,
        frames: meta.frames,
        affine: from_rows(&meta.affine),
        header: Arc::new(SourceHeader {
            path: h.path.clone(),
            format: h.format,
            dtype: h.dtype,
            affine: from_rows(&h.affine),
            affine_source: h.affine_source,
            qform_code: h.qform_code,
            sform_code: h.sform_code,
            scaling: h.scaling,
        }),
    })
}

/// The file's little-endian `f32`s and the CRC-32 of its bytes, through a memory map, or a
/// plain read if mapping fails.
fn read_f32(file: &std::fs::File, path: &Path, len: usize) -> Result<(Vec<f32>, u32), CacheError> {
    if len == 0 {
        return Ok((Vec::new(), crc32fast::hash(&[])));
    }
    // SAFETY: the map is only read, and only while this function runs. Cache files are never
    // modified or truncated in place: entries are written under a temporary name, renamed
    // whole, and removed by unlinking (which keeps the pages of an open file valid). Only a
    // process outside voxflow truncating the file during this copy could invalidate the map.
    match unsafe { Mmap::map(file) } {
        Ok(map) if map.len() == len => Ok(decode(&map)),
        Ok(_) | Err(_) => {
            tracing::debug!(file = %path.display(), "Cannot map the cache file; reading it");
            let bytes = std::fs::read(path).map_err(io(path))?;
            if bytes.len() != len {
                return Err(CacheError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "changed while read".into(),
                });
            }
            Ok(decode(&bytes))
        }
    }
}

fn decode(bytes: &[u8]) -> (Vec<f32>, u32) {
    let values = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (values, crc32fast::hash(bytes))
}

fn rows(m: &Affine) -> [f64; 16] {
    std::array::from_fn(|i| m[(i / 4, i % 4)])
}

fn from_rows(a: &[f64; 16]) -> Affine {
    Affine::from_fn(|r, c| a[r * 4 + c])
}

/// Stores `scan` under `key`; returns the bytes written (0 when another run stored it first).
///
/// # Errors
/// When the folder or a file cannot be written; nothing is left under the final name.
pub fn write(dir: &Path, key: &Key, scan: &Scan) -> Result<u64, CacheError> {
    let target = entry_dir(dir, key);
    if target.join(HEADER).exists() {
        mark_used(&target.join(HEADER));
        return Ok(0);
    }
    let shard = target.parent().expect("entry folders sit in a shard");
    std::fs::create_dir_all(shard).map_err(io(shard))?;
    tag(dir);
    let tmp = shard.join(temporary_name(key));
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let written = write_entry(&tmp, scan).and_then(|bytes| {
        match std::fs::rename(&tmp, &target) {
            Ok(()) => Ok(bytes),
            // Another run renamed its copy first: theirs is as good as ours.
            Err(_) if target.join(HEADER).exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(0)
            }
            Err(e) => Err(io(&target)(e)),
        }
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn temporary_name(key: &Key) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".tmp-{}-{}-{n}", key.hex(), std::process::id())
}

/// Writes the volumes and the header into `folder`; returns the bytes written.
fn write_entry(folder: &Path, scan: &Scan) -> Result<u64, CacheError> {
    let mut volumes: Vec<Arc<Volume>> = Vec::new();
    let meta = describe(scan, &mut volumes);
    let mut bytes = 0;
    let mut metas = Vec::with_capacity(volumes.len());
    for (i, v) in volumes.iter().enumerate() {
        let (written, crc32) = write_f32(&folder.join(format!("{i}.f32")), &v.data)?;
        bytes += written;
        metas.push(VolumeMeta {
            crc32,
            ..volume_meta(v)
        });
    }
    let header = EntryHeader {
        volumes: metas,
        scan: meta,
    };
    let path = folder.join(HEADER);
    let text = header_text(&header).map_err(|e| CacheError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&path, &text).map_err(io(&path))?;
    Ok(bytes + text.len() as u64)
}

/// The text of `entry.json` for `header`: the envelope with the header's bytes and their
/// CRC-32 (the header is embedded verbatim, so the checksum holds for the bytes in the file).
fn header_text(header: &EntryHeader) -> Result<Vec<u8>, serde_json::Error> {
    // Indented one level, to read as part of the envelope (JSON strings hold no raw line
    // breaks, so only layout changes).
    let body = serde_json::to_string_pretty(header)?.replace('\n', "\n  ");
    let crc32 = crc32fast::hash(body.as_bytes());
    let body = RawValue::from_string(body)?;
    let envelope = Envelope {
        format: FORMAT_VERSION,
        crc32,
        header: &body,
    };
    let mut text = serde_json::to_vec_pretty(&envelope)?;
    text.push(b'\n');
    Ok(text)
}

/// The scan as indices into `volumes`, adding each distinct volume (by pointer) once.
fn describe(scan: &Scan, volumes: &mut Vec<Arc<Volume>>) -> ScanMeta {
    let mut index = |v: &Arc<Volume>| match volumes.iter().position(|w| Arc::ptr_eq(v, w)) {
        Some(i) => i,
        None => {
            volumes.push(v.clone());
            volumes.len() - 1
        }
    };
    let image = index(&scan.image);
    let labels = scan.labels.as_ref().map(&mut index);
    let mask = scan.mask.as_ref().map(&mut index);
    ScanMeta {
        image,
        labels,
        mask,
        native: scan.native.as_ref().map(|n| Box::new(describe(n, volumes))),
    }
}

fn volume_meta(v: &Volume) -> VolumeMeta {
    let h = &v.header;
    VolumeMeta {
        shape: v.shape,
        frames: v.frames,
        affine: rows(&v.affine),
        header: HeaderMeta {
            path: h.path.clone(),
            format: h.format,
            dtype: h.dtype,
            affine: rows(&h.affine),
            affine_source: h.affine_source,
            qform_code: h.qform_code,
            sform_code: h.sform_code,
            scaling: h.scaling,
        },
        crc32: 0,
    }
}

/// Writes `data` as little-endian `f32`s; returns the bytes written and their CRC-32.
fn write_f32(path: &Path, data: &[f32]) -> Result<(u64, u32), CacheError> {
    let mut file = std::fs::File::create(path).map_err(io(path))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(1 << 20);
    for chunk in data.chunks(1 << 18) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
        crc.update(&buf);
        file.write_all(&buf).map_err(io(path))?;
    }
    Ok((data.len() as u64 * 4, crc.finalize()))
}

/// Name of the tag file marking a cache folder (https://bford.info/cachedir/).
const TAG_FILE: &str = "CACHEDIR.TAG";

/// The tag's first line, fixed by the standard.
const TAG_SIGNATURE: &str = "Signature: 8a477f597d28d172789f06886806bc55";

/// What voxflow writes after the signature, and what [`clear`] looks for: another tool's tag
/// does not make a folder voxflow's.
const TAG_COMMENT: &str = "# voxflow volume cache";

/// Marks `dir` as a cache folder, once.
fn tag(dir: &Path) {
    let path = dir.join(TAG_FILE);
    if !path.exists() {
        let text =
            format!("{TAG_SIGNATURE}\n{TAG_COMMENT}: safe to delete (`voxflow cache clear`).\n");
        let _ = std::fs::write(path, text);
    }
}

/// Whether `dir` holds the tag voxflow writes in its cache folders.
fn tagged_by_voxflow(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(TAG_FILE))
        .is_ok_and(|text| text.starts_with(TAG_SIGNATURE) && text.contains(TAG_COMMENT))
}

/// Removes the entry for `key` (a corrupt one); a failure is only logged.
pub fn remove(dir: &Path, key: &Key) {
    let entry = entry_dir(dir, key);
    if let Err(e) = std::fs::remove_dir_all(&entry)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(entry = %entry.display(), error = %e, "Cannot remove a cache entry");
    }
}

/// Empties the cache folder `dir`: every entry and leftover temporary folder. A folder
/// without the `CACHEDIR.TAG` voxflow writes in its caches is refused, and even in a cache
/// only what has the cache's layout (two-hex-digit shards holding 64-hex or `.tmp-` folders)
/// is removed, so a mistyped `--dir` cannot wipe unrelated files. A folder that does not
/// exist holds nothing to remove. Returns `(entries, bytes)` removed.
///
/// # Errors
/// [`CacheError::NotACache`] for a folder voxflow did not tag as its cache; an I/O error
/// when a folder cannot be listed or removed.
pub fn clear(dir: &Path) -> Result<(usize, u64), CacheError> {
    if !dir.exists() {
        return Ok((0, 0));
    }
    if !tagged_by_voxflow(dir) {
        return Err(CacheError::NotACache {
            path: dir.to_path_buf(),
        });
    }
    let mut removed = (0, 0);
    for shard in shards(dir)? {
        for (folder, is_entry) in shard_folders(&shard)? {
            removed.1 += folder_size(&folder);
            std::fs::remove_dir_all(&folder).map_err(io(&folder))?;
            removed.0 += usize::from(is_entry);
        }
        // Still holding something that is not ours: leave it.
        let _ = std::fs::remove_dir(&shard);
    }
    Ok(removed)
}

/// The shard folders of `dir` (two hex digits); none when `dir` does not exist.
fn shards(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut shards = Vec::new();
    for shard in listing {
        let shard = shard.map_err(io(dir))?.path();
        let name = shard.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if shard.is_dir() && name.len() == 2 && is_hex(name) {
            shards.push(shard);
        }
    }
    Ok(shards)
}

/// The folders of a shard that the cache made: `(path, true)` for an entry (64 hex digits),
/// `(path, false)` for a temporary one (`.tmp-*`, being written or removed). Anything else
/// is not listed.
fn shard_folders(shard: &Path) -> Result<Vec<(PathBuf, bool)>, CacheError> {
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(shard).map_err(io(shard))? {
        let path = entry.map_err(io(shard))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.len() == 64 && is_hex(name) {
            folders.push((path, true));
        } else if name.starts_with(".tmp-") {
            folders.push((path, false));
        }
    }
    Ok(folders)
}

/// One entry as eviction sees it.
#[derive(Clone, Debug)]
pub struct EntryInfo {
    /// Its key (the folder's name).
    pub key: Key,
    /// Its folder.
    pub path: PathBuf,
    /// Bytes of its files.
    pub bytes: u64,
    /// When it was last written or read: its header's modification time (the epoch for an
    /// entry without a header, which no read can use).
    pub used: SystemTime,
}

/// Every entry in `dir`, temporary folders excluded (they may be another run's write).
///
/// # Errors
/// When a folder cannot be listed.
pub fn entries(dir: &Path) -> Result<Vec<EntryInfo>, CacheError> {
    let mut found = Vec::new();
    for shard in shards(dir)? {
        for (path, is_entry) in shard_folders(&shard)? {
            let key = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(Key::from_hex);
            let (true, Some(key)) = (is_entry, key) else {
                continue;
            };
            let used = std::fs::metadata(path.join(HEADER))
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            found.push(EntryInfo {
                key,
                bytes: folder_size(&path),
                path,
                used,
            });
        }
    }
    Ok(found)
}

/// What [`evict`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Entries removed.
    pub entries: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes of the entries left.
    pub left: u64,
}

/// Removes whole entries of `listed` (from [`entries`]), least recently used first, until
/// the rest take at most `max_bytes`. An entry that cannot be removed is logged and skipped;
/// one that another run removed first is not counted.
pub fn evict(mut listed: Vec<EntryInfo>, max_bytes: u64) -> Evicted {
    listed.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.path.cmp(&b.path)));
    let mut done = Evicted {
        left: listed.iter().map(|e| e.bytes).sum(),
        ..Evicted::default()
    };
    for entry in &listed {
        if done.left <= max_bytes {
            break;
        }
        match remove_entry(entry) {
            Ok(true) => {
                done.entries += 1;
                done.bytes += entry.bytes;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Cannot evict a cache entry; it stays");
                continue;
            }
        }
        done.left -= entry.bytes;
    }
    done
}

/// Removes one entry: renamed to a temporary name first, so a run looking it up from then on
/// misses instead of finding half its files, then deleted (a run already reading its files
/// keeps them until it closes them). `Ok(false)` when it was already gone.
fn remove_entry(entry: &EntryInfo) -> Result<bool, CacheError> {
    let shard = entry.path.parent().expect("entry folders sit in a shard");
    let doomed = shard.join(temporary_name(&entry.key));
    match std::fs::rename(&entry.path, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(&entry.path)(e)),
    }
    // Left behind on failure under a `.tmp-` name, which `clear` removes.
    std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
    Ok(true)
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Bytes of the files directly in `path` (an entry has no subfolders).
fn folder_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn scan() -> Scan {
        let mut affine = Affine::identity();
        affine[(0, 3)] = -12.5;
        let image = Arc::new(Volume::new(
            vec![0.25, -1.0, f32::MIN_POSITIVE, 3.5e9, 7.0, 8.0],
            [3, 2, 1],
            affine,
        ));
        let labels = Arc::new(image.with_data(vec![0.0, 2.0, 2.0, 41.0, 0.0, 17.0]));
        let native = Arc::new(Scan {
            image: image.clone(),
            labels: Some(labels.clone()),
            mask: None,
            native: None,
        });
        Scan {
            image: Arc::new(image.with_data(vec![1.0; 6])),
            labels: Some(labels),
            mask: None,
            native: Some(native),
        }
    }

    #[test]
    fn a_scan_comes_back_whole_with_its_shared_volumes() {
        let tmp = tempfile::tempdir().unwrap();
        let original = scan();
        let bytes = write(tmp.path(), &key(1), &original).unwrap();
        assert!(
            bytes >= 3 * 24,
            "three distinct volumes of 24 bytes: {bytes}"
        );
        assert_eq!(
            write(tmp.path(), &key(1), &original).unwrap(),
            0,
            "stored once"
        );

        let back = read(tmp.path(), &key(1)).unwrap().expect("a hit");
        let native = back.native.as_ref().expect("native kept");
        assert_eq!(back.image.data, original.image.data);
        assert_eq!(
            native.image.data,
            original.native.as_ref().unwrap().image.data
        );
        assert_eq!(native.image.affine, original.image.affine);
        assert_eq!(native.image.header.affine, original.image.header.affine);
        assert!(Arc::ptr_eq(
            back.labels.as_ref().unwrap(),
            native.labels.as_ref().unwrap()
        ));
        assert!(back.mask.is_none());
        assert!(read(tmp.path(), &key(2)).unwrap().is_none(), "a miss");
        let left: Vec<_> = std::fs::read_dir(entry_dir(tmp.path(), &key(1)).parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(left.is_empty(), "no temporary folder left");
    }

    #[test]
    fn a_truncated_or_garbled_entry_is_corrupt_and_removable() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &key(3), &scan()).unwrap();
        let entry = entry_dir(tmp.path(), &key(3));
        let file = std::fs::File::options()
            .write(true)
            .open(entry.join("1.f32"))
            .unwrap();
        file.set_len(10).unwrap();
        let err = read(tmp.path(), &key(3)).unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("1.f32"), "{err}");

        std::fs::write(entry.join(HEADER), b"{ not json").unwrap();
        assert!(matches!(
            read(tmp.path(), &key(3)),
            Err(CacheError::Corrupt { .. })
        ));
        remove(tmp.path(), &key(3));
        assert!(read(tmp.path(), &key(3)).unwrap().is_none());
    }

    /// Bytes changed in place (same size: NaNs or zeros written over part of a file) are
    /// caught by the checksum instead of feeding a subject damaged data.
    #[test]
    fn bytes_damaged_in_place_fail_the_checksum() {
        use std::io::{Seek, SeekFrom};
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &key(4), &scan()).unwrap();
        assert!(read(tmp.path(), &key(4)).unwrap().is_some());
        let path = entry_dir(tmp.path(), &key(4)).join("0.f32");
        let size = std::fs::metadata(&path).unwrap().len();
        let mut file = std::fs::File::options().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(4)).unwrap();
        file.write_all(&f32::NAN.to_le_bytes()).unwrap();
        drop(file);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        let err = read(tmp.path(), &key(4)).unwrap_err();
        assert!(
            matches!(err, CacheError::Corrupt { .. }) && err.to_string().contains("checksum"),
            "{err}"
        );
    }

    /// `entry.json` edited in place, still valid JSON (an affine moved by 10 mm), must not
    /// be served: its checksum no longer matches, as for a damaged `.f32` file.
    #[test]
    fn a_header_edited_into_other_valid_json_fails_its_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &key(5), &scan()).unwrap();
        let path = entry_dir(tmp.path(), &key(5)).join(HEADER);
        let text = std::fs::read_to_string(&path).unwrap();
        let affine3 = |text: &str| {
            let json: serde_json::Value = serde_json::from_str(text).unwrap();
            json["header"]["volumes"][0]["affine"][3].as_f64().unwrap()
        };
        assert_eq!(affine3(&text), -12.5);
        let edited = text.replacen("-12.5", "-2.5", 1);
        assert_eq!(
            affine3(&edited),
            -2.5,
            "the edit moved volumes[0].affine[3]"
        );
        std::fs::write(&path, &edited).unwrap();

        let err = read(tmp.path(), &key(5)).unwrap_err();
        assert!(
            matches!(&err, CacheError::Corrupt { path: p, .. } if p == &path),
            "{err}"
        );
        assert!(err.to_string().contains("entry.json"), "{err}");
        assert!(err.to_string().contains("header checksum"), "{err}");

        // The checksum field itself edited: caught too.
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let crc = json["crc32"].as_u64().unwrap();
        let other = text.replacen(&format!("\"crc32\": {crc}"), "\"crc32\": 7", 1);
        assert_ne!(other, text);
        std::fs::write(&path, other).unwrap();
        assert!(matches!(
            read(tmp.path(), &key(5)),
            Err(CacheError::Corrupt { .. })
        ));
        // Put back as written: a hit again.
        std::fs::write(&path, &text).unwrap();
        let back = read(tmp.path(), &key(5)).unwrap().expect("a hit");
        assert_eq!(back.image.affine[(0, 3)], -12.5);
    }

    #[test]
    fn an_entry_of_another_format_is_named_as_such() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &key(7), &scan()).unwrap();
        let path = entry_dir(tmp.path(), &key(7)).join(HEADER);
        // What format 2 wrote: no envelope, no header checksum.
        std::fs::write(
            &path,
            br#"{"format": 2, "volumes": [], "scan": {"image": 0}}"#,
        )
        .unwrap();
        let err = read(tmp.path(), &key(7)).unwrap_err();
        assert!(err.to_string().contains("format 2"), "{err}");
    }

    #[test]
    fn runs_storing_the_same_key_at_once_leave_one_whole_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let original = scan();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| write(tmp.path(), &key(6), &original).unwrap());
            }
        });
        let back = read(tmp.path(), &key(6)).unwrap().expect("stored");
        assert_eq!(back.image.data, original.image.data);
        let shard = entry_dir(tmp.path(), &key(6));
        let names: Vec<String> = std::fs::read_dir(shard.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [key(6).hex()], "no temporary folder left");
    }

    #[test]
    fn clear_removes_entries_and_leaves_other_files() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &key(4), &scan()).unwrap();
        write(tmp.path(), &key(5), &scan()).unwrap();
        std::fs::create_dir_all(tmp.path().join("05/.tmp-x")).unwrap();
        std::fs::write(tmp.path().join("notes.txt"), b"mine").unwrap();
        let (entries, bytes) = clear(tmp.path()).unwrap();
        assert_eq!(entries, 2);
        assert!(bytes > 0);
        assert!(tmp.path().join("notes.txt").exists());
        assert!(!tmp.path().join("04").exists());
        assert_eq!(clear(&tmp.path().join("none")).unwrap(), (0, 0));
    }

    /// A folder that merely looks like a cache (hex-named folders), or carries another
    /// tool's CACHEDIR.TAG, keeps every file.
    #[test]
    fn clear_refuses_a_folder_voxflow_did_not_tag() {
        let tmp = tempfile::tempdir().unwrap();
        let hex = tmp.path().join("ab").join("c".repeat(64));
        std::fs::create_dir_all(&hex).unwrap();
        std::fs::write(hex.join("thesis.tex"), b"years of work").unwrap();
        for tag in [
            None,
            Some(format!("{TAG_SIGNATURE}\n# made by another tool\n")),
        ] {
            if let Some(text) = &tag {
                std::fs::write(tmp.path().join(TAG_FILE), text).unwrap();
            }
            let err = clear(tmp.path()).unwrap_err();
            assert!(matches!(err, CacheError::NotACache { .. }), "{err}");
            let message = err.to_string();
            assert!(
                message.contains(&tmp.path().display().to_string())
                    && message.contains("not a voxflow cache"),
                "{message}"
            );
            assert_eq!(
                std::fs::read(hex.join("thesis.tex")).unwrap(),
                b"years of work"
            );
        }
    }

    /// An entry of `n` voxels (one volume), last used `age` seconds ago; returns its bytes.
    fn aged_entry(dir: &Path, k: &Key, n: usize, age: u64) -> u64 {
        let image = Arc::new(Volume::new(vec![1.0; n], [n, 1, 1], Affine::identity()));
        let scan = Scan {
            image,
            labels: None,
            mask: None,
            native: None,
        };
        let bytes = write(dir, k, &scan).unwrap();
        let used = SystemTime::now() - std::time::Duration::from_secs(age);
        std::fs::File::open(entry_dir(dir, k).join(HEADER))
            .unwrap()
            .set_modified(used)
            .unwrap();
        bytes
    }

    fn total(dir: &Path) -> u64 {
        entries(dir).unwrap().iter().map(|e| e.bytes).sum()
    }

    #[test]
    fn eviction_removes_the_least_recently_used_entries_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Oldest first; sizes differ so the counts below can only come from the right ones.
        let sizes: Vec<u64> = [(1000, 400), (3000, 300), (2000, 200), (500, 100)]
            .iter()
            .enumerate()
            .map(|(i, &(n, age))| aged_entry(dir, &key(10 + i as u8), n, age))
            .collect();
        let listed = entries(dir).unwrap();
        assert_eq!(listed.len(), 4);
        assert_eq!(
            listed.iter().map(|e| e.bytes).sum::<u64>(),
            sizes.iter().sum::<u64>()
        );
        // Not entries: a file at the top, a stranger's folder in a shard, a file that looks
        // like a shard, an in-progress write.
        std::fs::write(dir.join("notes.txt"), vec![7; 50_000]).unwrap();
        std::fs::create_dir_all(dir.join("0a/mine")).unwrap();
        std::fs::write(dir.join("0a/mine/big"), vec![7; 50_000]).unwrap();
        std::fs::write(dir.join("ff"), b"x").unwrap();
        std::fs::create_dir_all(dir.join("0a/.tmp-writing")).unwrap();

        // Room for the two newest but not for the second oldest as well.
        let cap = sizes[2] + sizes[3] + sizes[1] - 1;
        let done = evict(entries(dir).unwrap(), cap);
        assert_eq!(done.entries, 2);
        assert_eq!(done.bytes, sizes[0] + sizes[1]);
        assert_eq!(done.left, sizes[2] + sizes[3]);
        assert!(total(dir) <= cap);
        for (k, kept) in [(10, false), (11, false), (12, true), (13, true)] {
            assert_eq!(entry_dir(dir, &key(k)).exists(), kept, "key {k}");
        }
        assert!(read(dir, &key(12)).unwrap().is_some());
        for other in ["notes.txt", "0a/mine/big", "ff", "0a/.tmp-writing"] {
            assert!(dir.join(other).exists(), "{other} was removed");
        }
        // Key 10's shard is `0a`: only the stranger's folders are left in it.
        let mut left: Vec<String> = std::fs::read_dir(dir.join("0a"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".tmp-writing", "mine"], "no evicted folder left");

        assert_eq!(
            evict(entries(dir).unwrap(), cap).entries,
            0,
            "already under"
        );
        let done = evict(entries(dir).unwrap(), 0);
        assert_eq!((done.entries, done.left), (2, 0));
        assert!(entries(dir).unwrap().is_empty());
        assert!(dir.join("notes.txt").exists() && dir.join("0a/mine/big").exists());
        assert_eq!(
            evict(entries(&dir.join("none")).unwrap(), 0),
            Evicted::default()
        );
    }

    #[test]
    fn a_read_marks_an_entry_used_so_it_outlives_older_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let oldest = aged_entry(dir, &key(20), 100, 300);
        let middle = aged_entry(dir, &key(21), 100, 200);
        let newest = aged_entry(dir, &key(22), 100, 100);
        assert!(read(dir, &key(20)).unwrap().is_some(), "a hit");
        let done = evict(entries(dir).unwrap(), oldest + newest);
        assert_eq!((done.entries, done.bytes), (1, middle));
        assert!(
            entry_dir(dir, &key(20)).exists(),
            "the entry just read stays"
        );
        assert!(!entry_dir(dir, &key(21)).exists());

        // Storing a key that is already there counts as a use too.
        aged_entry(dir, &key(22), 100, 1000);
        assert_eq!(write(dir, &key(22), &scan()).unwrap(), 0);
        evict(entries(dir).unwrap(), newest);
        assert!(entry_dir(dir, &key(22)).exists() && !entry_dir(dir, &key(20)).exists());
    }

    #[test]
    fn an_entry_renamed_away_is_a_miss_and_its_leftover_is_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &key(30), &scan()).unwrap();
        let entry = entry_dir(tmp.path(), &key(30));
        std::fs::rename(&entry, entry.with_file_name(".tmp-gone")).unwrap();
        assert!(read(tmp.path(), &key(30)).unwrap().is_none());
        assert_eq!(
            clear(tmp.path()).unwrap().0,
            0,
            "a `.tmp-` leftover is no entry"
        );
        assert!(!entry.parent().unwrap().exists(), "but clear removes it");
    }
}
