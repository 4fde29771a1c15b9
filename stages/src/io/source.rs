//! Opening a volume file for reading, with gzip recognised by its magic bytes rather than by
//! the file name, and data reads that a lying header cannot push past what the file holds.
//!
//! A header states how many data bytes follow it. Before anything is allocated that number is
//! checked against the file: a plain file must be at least that long, and a gzip file cannot
//! decode to more than deflate's maximum expansion of its compressed size. The buffer for a
//! gzip stream then grows only with the bytes actually decoded, so a header that lies within
//! that bound costs at most what the stream really holds.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::IoError;

/// The first two bytes of every gzip member.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Deflate expands its input at most about 1032 times; more promised data is a lie.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// The most bytes reserved for gzip data before they arrive; beyond this the buffer grows
/// with the decoded stream.
const MAX_UPFRONT_RESERVE: u64 = 256 << 20;

/// How many bytes after the voxels are decoded to reach, and verify, the gzip checksum.
const MAX_TRAILER_CHECK: u64 = 64 << 20;

/// Bytes kept from the start of the decoded stream: the NIfTI-1 header and extension flag,
/// which is longer than the MGH header.
pub(crate) const HEAD_LEN: usize = 352;

/// An open volume file: its first bytes, and the rest as a (possibly decompressed) stream.
pub(crate) struct Source {
    path: PathBuf,
    reader: Box<dyn Read>,
    compressed: bool,
    file_len: u64,
    head: Vec<u8>,
    /// Bytes of the decoded stream consumed so far (including `head`).
    pos: u64,
}

impl Source {
    /// Opens `path`, decides from its first bytes whether it is gzip-compressed, and reads the
    /// first [`HEAD_LEN`] decoded bytes (fewer if the stream is shorter).
    pub(crate) fn open(path: &Path) -> Result<Source, IoError> {
        let os = |e| IoError::os(path, e);
        let mut file = File::open(path).map_err(os)?;
        let file_len = file.metadata().map_err(os)?.len();
        let mut magic = [0u8; 2];
        let n = read_up_to(&mut file, &mut magic).map_err(os)?;
        file.seek(SeekFrom::Start(0)).map_err(os)?;
        let compressed = n == 2 && magic == GZIP_MAGIC;
        let named_gz = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
        if compressed != named_gz {
            tracing::debug!(path = %path.display(), compressed, "Content and name disagree on gzip");
        }

        let buffered = BufReader::with_capacity(1 << 16, file);
        let reader: Box<dyn Read> = if compressed {
            Box::new(MultiGzDecoder::new(buffered))
        } else {
            Box::new(buffered)
        };
        let mut source = Source {
            path: path.to_path_buf(),
            reader,
            compressed,
            file_len,
            head: Vec::new(),
            pos: 0,
        };
        let mut head = vec![0; HEAD_LEN];
        let n = read_up_to(&mut source.reader, &mut head).map_err(|e| source.stream_error(e))?;
        head.truncate(n);
        source.head = head;
        source.pos = n as u64;
        Ok(source)
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file is gzip-compressed.
    pub(crate) fn compressed(&self) -> bool {
        self.compressed
    }

    /// The first (up to [`HEAD_LEN`]) bytes of the decoded stream.
    pub(crate) fn head(&self) -> &[u8] {
        &self.head
    }

    /// Reads `len` bytes starting at byte `offset` of the decoded stream, after checking that
    /// the file can hold them. Offsets must not go backwards past the head between calls.
    pub(crate) fn read_data(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
        let end = self.check_capacity(offset, len)?;
        let reserve = if self.compressed {
            len.min(MAX_UPFRONT_RESERVE)
        } else {
            len
        };
        let mut data = Vec::new();
        data.try_reserve_exact(to_usize(reserve))
            .map_err(|_| self.invalid(format!("cannot allocate {len} bytes for the voxel data")))?;

        let head_len = self.head.len() as u64;
        if offset < head_len {
            data.extend_from_slice(&self.head[to_usize(offset)..to_usize(end.min(head_len))]);
        }
        if offset > self.pos {
            self.skip(offset - self.pos)?;
        }
        // Zero when the head already held all the data (a tiny volume).
        let remaining = end.saturating_sub(self.pos.max(offset));
        let before = data.len();
        let got = (&mut self.reader).take(remaining).read_to_end(&mut data);
        self.pos += (data.len() - before) as u64;
        if let Err(e) = got {
            return Err(self.stream_error(e));
        }
        if (data.len() as u64) < len {
            return Err(self.invalid(format!(
                "file ends after {} of the {len} data bytes its header promises \
                 (truncated download or copy?)",
                data.len()
            )));
        }
        Ok(data)
    }

    /// For a gzip file, decodes what follows the voxels (up to a cap) so the stream's checksum
    /// and length are verified; a plain file needs nothing.
    pub(crate) fn finish(&mut self) -> Result<(), IoError> {
        if !self.compressed {
            return Ok(());
        }
        // Limitation: a gzip file with more than MAX_TRAILER_CHECK bytes after the voxels is
        // not checksummed; only MGH footers live there, and they are a few hundred bytes.
        let drained = (&mut self.reader)
            .take(MAX_TRAILER_CHECK)
            .read_to_end(&mut Vec::new());
        drained.map(|_| ()).map_err(|e| self.stream_error(e))
    }

    /// Checks that `len` bytes at `offset` can exist in this file; returns the end offset.
    fn check_capacity(&self, offset: u64, len: u64) -> Result<u64, IoError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| self.invalid(format!("header promises an impossible {len} bytes")))?;
        if !self.compressed && end > self.file_len {
            return Err(self.invalid(format!(
                "header promises {len} data bytes from offset {offset}, but the file holds only \
                 {} bytes in all ({} missing): truncated file or wrong header",
                self.file_len,
                end - self.file_len
            )));
        }
        let most = self.file_len.saturating_mul(MAX_DEFLATE_RATIO);
        if self.compressed && end > most {
            return Err(self.invalid(format!(
                "header promises {len} data bytes, but a {}-byte gzip file can decode to at \
                 most {most}: the header is wrong",
                self.file_len
            )));
        }
        usize::try_from(end)
            .map_err(|_| self.invalid(format!("{len} data bytes do not fit in memory")))?;
        Ok(end)
    }

    /// Discards `n` bytes of the stream (padding or extensions before the voxels).
    fn skip(&mut self, n: u64) -> Result<(), IoError> {
        let skipped = io::copy(&mut (&mut self.reader).take(n), &mut io::sink())
            .map_err(|e| self.stream_error(e))?;
        self.pos += skipped;
        if skipped < n {
            return Err(self.invalid(format!(
                "file ends at byte {}, before its voxel data starts",
                self.pos
            )));
        }
        Ok(())
    }

    /// An error met while reading the stream: corrupt gzip data, or the OS refusing.
    fn stream_error(&self, e: io::Error) -> IoError {
        if self.compressed {
            self.invalid(format!("gzip data is corrupt or truncated ({e})"))
        } else {
            IoError::os(&self.path, e)
        }
    }

    fn invalid(&self, reason: String) -> IoError {
        IoError::invalid(&self.path, reason)
    }
}

/// Fills `buf` from `reader` until it is full or the stream ends; returns the bytes read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Converts a byte count already checked by `check_capacity` to fit in `usize`.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
