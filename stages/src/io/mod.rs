//! Reading and writing volumes: NIfTI-1 (`.nii`, `.nii.gz`) and FreeSurfer MGH/MGZ.
//!
//! - [`read_volume`] reads either format, recognised by content rather than name, into a
//!   [`Volume`](crate::volume::Volume) of `f32` values with scaling applied and the affine
//!   chosen as nibabel would (sform, then qform, then pixdim; MGH vox2ras);
//! - [`write_nifti`] writes NIfTI-1, atomically, in a chosen datatype;
//! - [`inspect`] summarises a file's header and values, as JSON or text.
//!
//! Corrupt files (truncated gzip, headers promising more data than the file has, text files
//! with a volume's name) give an [`IoError`] naming the file and the problem, and nothing a
//! lying header asks for is allocated before the file is shown to hold it.
//!
//! Not supported: NIfTI-2, `.hdr`/`.img` pairs, RGB and complex datatypes, and writing MGH.

mod decode;
mod error;
mod inspect;
mod mgh;
mod nifti1;
mod read;
mod source;
mod write;
mod xform;

pub use error::IoError;
pub use inspect::{Inspection, inspect};
pub use read::read_volume;
pub use write::write_nifti;
