//! The one error type of the `io` module: every variant names the file it is about.
//!
//! Messages are lowercase, start with the path and say what is wrong with the file, so the CLI
//! can print them as they are.

use std::path::{Path, PathBuf};

/// A volume file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The operating system refused (missing file, permissions, disk full). The OS error is
    /// part of the message, not a separate cause, so reports that print causes do not say it
    /// twice.
    #[error("{path}: {error}")]
    Os {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file is not a valid volume of its format.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is valid but uses a feature this reader or writer does not handle.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature, e.g. the datatype code.
        reason: String,
    },
}

impl IoError {
    /// An [`IoError::Os`] for `path`.
    pub(crate) fn os(path: &Path, error: std::io::Error) -> IoError {
        IoError::Os {
            path: path.to_path_buf(),
            error,
        }
    }

    /// An [`IoError::Invalid`] for `path`.
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> IoError {
        IoError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// An [`IoError::Unsupported`] for `path`.
    pub(crate) fn unsupported(path: &Path, reason: impl Into<String>) -> IoError {
        IoError::Unsupported {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            IoError::Os { path, .. }
            | IoError::Invalid { path, .. }
            | IoError::Unsupported { path, .. } => path,
        }
    }
}
