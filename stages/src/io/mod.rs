//! Reading and writing volumes: NIfTI-1 (`.nii`, `.nii.gz`) and FreeSurfer MGH/MGZ.
//!
//! PLACEHOLDER API — the formats work fills this module in; signatures are the contract.

use std::path::{Path, PathBuf};

use crate::volume::{DataType, Volume};

/// A volume file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The operating system refused (missing file, permissions, disk full).
    #[error("{path}: {source}")]
    Os {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a valid volume of its format.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Reads a NIfTI-1 or MGH/MGZ file, choosing the format from its content and name.
///
/// # Errors
/// If the file is missing, truncated, corrupt, or of an unsupported layout.
pub fn read_volume(path: &Path) -> Result<Volume, IoError> {
    Err(IoError::Invalid {
        path: path.to_path_buf(),
        reason: "reader not written yet".into(),
    })
}

/// Writes `volume` (every frame) as NIfTI-1 with `volume.affine` as both sform and qform,
/// gzip-compressed when the name ends in `.gz`, to a temporary name then renamed.
/// Returns the number of bytes written.
///
/// # Errors
/// If the file cannot be created or written.
pub fn write_nifti(path: &Path, volume: &Volume, dtype: DataType) -> Result<u64, IoError> {
    let _ = (volume, dtype);
    Err(IoError::Invalid {
        path: path.to_path_buf(),
        reason: "writer not written yet".into(),
    })
}
