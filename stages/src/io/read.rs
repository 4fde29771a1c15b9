//! Choosing the reader for a file from its content: gzip by its magic bytes, then NIfTI-1 by
//! `sizeof_hdr` = 348 in either byte order, MGH by version 1. The name is never trusted, so a
//! plain file called `.nii.gz` or a gzip file called `.mgh` reads fine, and a text file with
//! a volume's name gets an error saying it is text.

use std::path::Path;

use super::source::Source;
use super::{IoError, mgh, nifti1};
use crate::volume::Volume;

/// A volume together with what the file said about its array.
pub(crate) struct Loaded {
    /// The volume.
    pub(crate) volume: Volume,
    /// The file's array shape, trailing length-1 axes past the third removed (a 2D file has
    /// two entries, a multi-frame one four or more).
    pub(crate) shape: Vec<usize>,
    /// Whether the file was gzip-compressed.
    pub(crate) compressed: bool,
}

/// The formats recognised by their first bytes.
enum Kind {
    Nifti1 { big_endian: bool },
    Nifti2,
    Mgh,
    Unknown,
}

/// Reads a NIfTI-1 or MGH/MGZ file, choosing the format from its content.
///
/// Voxel values come back as `f32` with the header's scaling applied; the affine is the
/// sform when `sform_code > 0`, else the qform when `qform_code > 0`, else nibabel's
/// pixdim fallback (MGH: the vox2ras). Trailing length-1 axes past the third are dropped,
/// 2D images get a third axis of length 1, and everything past the third axis becomes frames.
///
/// # Errors
/// If the file is missing or unreadable ([`IoError::Os`]); truncated, corrupt, or not a
/// volume at all ([`IoError::Invalid`]); or of a datatype such as RGB or complex that has no
/// scalar value per voxel ([`IoError::Unsupported`]). Every message starts with the path.
///
/// # Examples
/// ```no_run
/// let brain = voxflow_stages::io::read_volume(std::path::Path::new("brain.mgz"))?;
/// assert_eq!(brain.shape, [256, 256, 256]);
/// # Ok::<(), voxflow_stages::io::IoError>(())
/// ```
pub fn read_volume(path: &Path) -> Result<Volume, IoError> {
    read_detailed(path).map(|loaded| loaded.volume)
}

/// [`read_volume`], keeping the file's own array shape.
pub(crate) fn read_detailed(path: &Path) -> Result<Loaded, IoError> {
    let mut source = Source::open(path)?;
    let loaded = match kind(source.head()) {
        Kind::Nifti1 { big_endian } => nifti1::read(&mut source, big_endian)?,
        Kind::Mgh => mgh::read(&mut source)?,
        Kind::Nifti2 => {
            return Err(IoError::unsupported(
                path,
                "NIfTI-2 files are not supported",
            ));
        }
        Kind::Unknown => {
            return Err(IoError::invalid(
                path,
                unrecognised(source.head(), source.compressed()),
            ));
        }
    };
    let v = &loaded.volume;
    tracing::debug!(
        path = %path.display(),
        shape = ?v.shape,
        frames = v.frames,
        dtype = v.header.dtype.name(),
        "Read volume"
    );
    Ok(loaded)
}

/// Recognises the format from the first decoded bytes.
fn kind(head: &[u8]) -> Kind {
    let Some(first) = head.first_chunk::<4>() else {
        return Kind::Unknown;
    };
    match (i32::from_le_bytes(*first), i32::from_be_bytes(*first)) {
        (348, _) => Kind::Nifti1 { big_endian: false },
        (_, 348) => Kind::Nifti1 { big_endian: true },
        (540, _) | (_, 540) => Kind::Nifti2,
        (_, 1) => Kind::Mgh,
        _ => Kind::Unknown,
    }
}

/// Says what an unrecognised file looks like, so the user knows what went wrong.
fn unrecognised(head: &[u8], compressed: bool) -> String {
    let after = if compressed {
        " after gzip decompression"
    } else {
        ""
    };
    if head.is_empty() {
        return format!("file is empty{after}");
    }
    if head.starts_with(b"version https://git-lfs") {
        return "file is a git-lfs pointer (a small text stand-in), not the volume: fetch the \
                real file with `git lfs pull`"
            .to_string();
    }
    // The head may end inside a multi-byte character; the part before it decides.
    let text = match std::str::from_utf8(head) {
        Ok(s) => Some(s),
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok(),
        Err(_) => None,
    };
    let text = text.filter(|s| s.chars().all(|c| !c.is_control() || c.is_whitespace()));
    if let Some(text) = text {
        let first_line: String = text.lines().next().unwrap_or("").chars().take(40).collect();
        return format!(
            "file is text{after} (starting {first_line:?}), not a NIfTI-1 or MGH volume"
        );
    }
    let bytes: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "not a NIfTI-1 or MGH volume{after}: unrecognised first bytes {}",
        bytes.join(" ")
    )
}
