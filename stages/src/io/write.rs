//! Writing volumes as single-file NIfTI-1 (`.nii`, or `.nii.gz` when the name ends in `.gz`).
//!
//! Choices, so outputs look the same in every viewer:
//! - `volume.affine` goes into the sform and, when its linear part is a rotation (possibly
//!   with the third axis reversed) times voxel sizes, into the qform as well, both under the
//!   same code: the source file's `sform_code` when the volume still has the source's affine,
//!   else 1 (scanner). A sheared affine gets `qform_code` 0, since a qform cannot hold it.
//! - `pixdim[1..=3]` are the affine's column lengths and `pixdim[0]` its handedness (qfac).
//! - Several frames are written as a 4D image `[ni, nj, nk, frames]` with no intent code: a
//!   volume does not say whether its frames are time points or vector components, and 4D is
//!   what FSL and FreeSurfer tools read as frames. ITK's 5D vector layout
//!   (`[ni, nj, nk, 1, 3]`, intent 1007) is read, as 3 frames, but not written.
//! - Values are stored without scaling (`scl_slope` 1); integer types get rounded values,
//!   saturated at the type's range, with NaN stored as 0.
//!
//! The file is written to a hidden temporary name in the same folder, flushed to disk and
//! then renamed, so an interrupted write never leaves a partial file under the final name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::Compression;
use flate2::write::GzEncoder;

use super::IoError;
use super::decode::{encode_le, size_of};
use super::xform::affine_to_qform;
use crate::volume::{Affine, DataType, Volume, voxel_size};

/// Header, extension flag, then the voxels.
const VOX_OFFSET: usize = 352;

/// gzip level: close to the default's size at about twice its speed on brain volumes.
const GZIP_LEVEL: u32 = 3;

/// Voxels converted per write call, bounding the conversion buffer.
const CHUNK: usize = 1 << 16;

/// NIfTI `xyzt_units`: millimetres, plus seconds when there are frames.
const UNITS_MM: u8 = 2;
const UNITS_SEC: u8 = 8;

/// Makes temporary names unique between threads of one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `volume` (every frame) as NIfTI-1 with `volume.affine` as sform (and qform when it
/// is a rotation times scales), gzip-compressed when the name ends in `.gz`, to a temporary
/// name in the same folder that is then renamed into place. Values are converted to `dtype`
/// (rounded and saturated for integer types). Returns the number of bytes written.
///
/// # Errors
/// If the file cannot be created or written ([`IoError::Os`]), the volume's data does not
/// match its shape or its affine is not finite ([`IoError::Invalid`]), or an axis is longer
/// than NIfTI-1's 32767 voxels ([`IoError::Unsupported`]).
///
/// # Examples
/// ```no_run
/// use voxflow_stages::{io, volume::DataType};
/// let seg = io::read_volume("aseg.mgz".as_ref())?;
/// io::write_nifti("aseg.nii.gz".as_ref(), &seg, DataType::Int16)?;
/// # Ok::<(), io::IoError>(())
/// ```
pub fn write_nifti(path: &Path, volume: &Volume, dtype: DataType) -> Result<u64, IoError> {
    let expected = volume.len().checked_mul(volume.frames);
    if expected != Some(volume.data.len()) {
        return Err(IoError::invalid(
            path,
            format!(
                "volume holds {} values, but shape {:?} with {} frames needs {:?}",
                volume.data.len(),
                volume.shape,
                volume.frames,
                expected
            ),
        ));
    }
    let header = header_bytes(path, volume, dtype)?;
    let compressed = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let tmp = temp_path(path)?;
    match write_file(&tmp, &header, volume, dtype, compressed) {
        Ok(bytes) => {
            fs::rename(&tmp, path).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                IoError::os(path, e)
            })?;
            tracing::debug!(path = %path.display(), bytes, dtype = dtype.name(), "Wrote volume");
            Ok(bytes)
        }
        Err(e) => {
            // Best effort: the temporary name is hidden, and the write error is what matters.
            let _ = fs::remove_file(&tmp);
            Err(IoError::os(path, e))
        }
    }
}

/// A hidden, unique name beside `path`.
fn temp_path(path: &Path) -> Result<PathBuf, IoError> {
    let name = path
        .file_name()
        .ok_or_else(|| IoError::invalid(path, "not a file name"))?;
    let unique = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_name = format!(
        ".{}.{}-{unique}.tmp",
        name.to_string_lossy(),
        std::process::id()
    );
    Ok(path.with_file_name(tmp_name))
}

/// Writes header and voxels to `tmp`, flushed to disk; returns the file's size.
fn write_file(
    tmp: &Path,
    header: &[u8],
    volume: &Volume,
    dtype: DataType,
    compressed: bool,
) -> io::Result<u64> {
    let file = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let file: File = if compressed {
        let mut gz = GzEncoder::new(out, Compression::new(GZIP_LEVEL));
        write_body(&mut gz, header, volume, dtype)?;
        gz.finish()?.into_inner().map_err(|e| e.into_error())?
    } else {
        write_body(&mut out, header, volume, dtype)?;
        out.into_inner().map_err(|e| e.into_error())?
    };
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

fn write_body(
    w: &mut impl Write,
    header: &[u8],
    volume: &Volume,
    dtype: DataType,
) -> io::Result<()> {
    w.write_all(header)?;
    let mut buf = Vec::with_capacity(CHUNK * size_of(dtype));
    for chunk in volume.data.chunks(CHUNK) {
        buf.clear();
        encode_le(chunk, dtype, &mut buf);
        w.write_all(&buf)?;
    }
    Ok(())
}

/// The NIfTI-1 datatype code of `dtype`.
fn datatype_code(dtype: DataType) -> i16 {
    match dtype {
        DataType::Uint8 => 2,
        DataType::Int16 => 4,
        DataType::Int32 => 8,
        DataType::Float32 => 16,
        DataType::Float64 => 64,
        DataType::Int8 => 256,
        DataType::Uint16 => 512,
        DataType::Uint32 => 768,
        DataType::Int64 => 1024,
    }
}

/// The xform code for both transforms (see the module docs).
fn xform_code(volume: &Volume) -> i16 {
    let source = &volume.header;
    if (1..=4).contains(&source.sform_code) && source.affine == volume.affine {
        source.sform_code
    } else {
        1
    }
}

/// The 348-byte header plus a zero extension flag, little-endian.
fn header_bytes(
    path: &Path,
    volume: &Volume,
    dtype: DataType,
) -> Result<[u8; VOX_OFFSET], IoError> {
    let affine: &Affine = &volume.affine;
    if !affine.iter().all(|v| v.is_finite()) {
        return Err(IoError::invalid(
            path,
            "volume affine has non-finite entries",
        ));
    }
    let axis = |n: usize| {
        i16::try_from(n).map_err(|_| {
            IoError::unsupported(
                path,
                format!("an axis of {n} voxels is longer than NIfTI-1 allows (32767)"),
            )
        })
    };
    let frames = volume.frames > 1;
    let dim = [
        if frames { 4 } else { 3 },
        axis(volume.shape[0])?,
        axis(volume.shape[1])?,
        axis(volume.shape[2])?,
        axis(volume.frames)?,
        1,
        1,
        1,
    ];

    let mut h = Header([0; VOX_OFFSET]);
    h.i32(0, 348);
    h.0[38] = b'r';
    for (k, &d) in dim.iter().enumerate() {
        h.i16(40 + 2 * k, d);
    }
    h.i16(70, datatype_code(dtype));
    h.i16(72, 8 * size_of(dtype) as i16);
    let qform = affine_to_qform(affine);
    let zooms = voxel_size(affine);
    let qfac = qform.map_or(1.0, |q| q.qfac);
    let pixdim = [qfac, zooms[0], zooms[1], zooms[2], 1.0, 1.0, 1.0, 1.0];
    for (k, &p) in pixdim.iter().enumerate() {
        h.f32(76 + 4 * k, p);
    }
    h.f32(108, VOX_OFFSET as f64);
    h.f32(112, 1.0);
    h.0[123] = if frames {
        UNITS_MM | UNITS_SEC
    } else {
        UNITS_MM
    };
    h.0[148..155].copy_from_slice(b"voxflow");

    let code = xform_code(volume);
    h.i16(254, code);
    if let Some(q) = qform {
        h.i16(252, code);
        for (k, &v) in q.bcd.iter().chain(&q.offset).enumerate() {
            h.f32(256 + 4 * k, v);
        }
    }
    for r in 0..3 {
        for c in 0..4 {
            h.f32(280 + 16 * r + 4 * c, affine[(r, c)]);
        }
    }
    h.0[344..348].copy_from_slice(b"n+1\0");
    Ok(h.0)
}

/// A header under construction, with little-endian field setters.
struct Header([u8; VOX_OFFSET]);

impl Header {
    fn i16(&mut self, at: usize, v: i16) {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn i32(&mut self, at: usize, v: i32) {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn f32(&mut self, at: usize, v: f64) {
        self.0[at..at + 4].copy_from_slice(&(v as f32).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::affine_from_orientation;

    #[test]
    fn header_parses_with_the_nifti_crate() {
        let affine = affine_from_orientation("LIA", [1.0, 2.0, 3.0], [4, 5, 6], [0.0; 3]).unwrap();
        let volume = Volume::new(vec![0.0; 120], [4, 5, 6], affine);
        let bytes = header_bytes(Path::new("x.nii"), &volume, DataType::Int16).unwrap();
        let h = nifti::NiftiHeader::from_reader(&bytes[..348]).unwrap();
        assert_eq!(&h.dim[..4], &[3, 4, 5, 6]);
        assert_eq!((h.datatype, h.bitpix, h.vox_offset), (4, 16, 352.0));
        assert_eq!((h.qform_code, h.sform_code), (1, 1));
        assert_eq!(&h.pixdim[1..4], &[1.0, 2.0, 3.0]);
        assert_eq!(h.srow_y, [0.0, 0.0, 3.0, affine[(1, 3)] as f32]);
    }

    #[test]
    fn sheared_affine_gets_no_qform() {
        let mut affine = Affine::identity();
        affine[(0, 1)] = 0.3;
        let volume = Volume::new(vec![0.0; 8], [2, 2, 2], affine);
        let bytes = header_bytes(Path::new("x.nii"), &volume, DataType::Float32).unwrap();
        let h = nifti::NiftiHeader::from_reader(&bytes[..348]).unwrap();
        assert_eq!((h.qform_code, h.sform_code), (0, 1));
    }
}
