//! Reading FreeSurfer MGH volumes (`.mgh`, and `.mgz` once decompressed).
//!
//! An MGH file is a big-endian header (version 1, dimensions, frames, type, and the
//! `delta`/`Mdc`/`c_ras` geometry), voxels from byte 284, and an optional footer of scan
//! parameters and tags that is ignored. Types read: uchar, short, ushort, int and float.
//!
//! When `goodRASflag` is not positive the geometry fields are not trusted and FreeSurfer's
//! default is used instead: 1 mm coronal (LIA) with the centre at the origin. nibabel does the
//! same only for negative flags and reads whatever the fields hold when the flag is 0.

use std::path::Path;
use std::sync::Arc;

use nalgebra::{Matrix3, Vector3};

use super::IoError;
use super::decode::{decode, size_of};
use super::read::Loaded;
use super::source::Source;
use crate::volume::{Affine, AffineSource, DataType, Format, SourceHeader, Volume};

/// Bytes of the header that carry fields; the rest up to the data offset is unused.
const FIELDS_LEN: usize = 90;

/// Where the voxels start.
const DATA_OFFSET: u64 = 284;

/// Reads the MGH volume whose header starts `source`.
pub(crate) fn read(source: &mut Source) -> Result<Loaded, IoError> {
    let path = source.path().to_path_buf();
    let head = source.head();
    if head.len() < FIELDS_LEN {
        return Err(IoError::invalid(
            &path,
            format!("file ends inside the MGH header ({} bytes)", head.len()),
        ));
    }
    let int = |at: usize| i32::from_be_bytes(field(head, at));
    let float = |at: usize| f64::from(f32::from_be_bytes(field(head, at)));

    let mut dims = [0usize; 4];
    for (k, name) in ["width", "height", "depth", "nframes"].iter().enumerate() {
        let v = int(4 + 4 * k);
        if v < 1 {
            return Err(IoError::invalid(
                &path,
                format!("{name} is {v}, but every axis needs at least one voxel"),
            ));
        }
        dims[k] = v as usize;
    }
    let dtype = datatype(&path, int(20))?;
    let good_ras = i16::from_be_bytes(field(head, 28));
    let affine = if good_ras > 0 {
        let delta = [0, 1, 2].map(|k| float(30 + 4 * k));
        let mdc = [0, 1, 2].map(|c| [0, 1, 2].map(|r| float(42 + 12 * c + 4 * r)));
        let c_ras = [0, 1, 2].map(|k| float(78 + 4 * k));
        vox2ras(dims, delta, mdc, c_ras)
    } else {
        // Limitation: nibabel keeps the stored geometry when the flag is exactly 0; this
        // follows FreeSurfer, which wrote the format, so the two can disagree on such files.
        tracing::warn!(path = %path.display(), good_ras, "MGH goodRASflag not set, assuming 1 mm LIA");
        let lia = [[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]];
        vox2ras(dims, [1.0; 3], lia, [0.0; 3])
    };
    if !affine.iter().all(|v| v.is_finite()) {
        return Err(IoError::invalid(
            &path,
            "vox2ras geometry has non-finite entries",
        ));
    }

    let nbytes = dims
        .iter()
        .try_fold(size_of(dtype), |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            IoError::invalid(&path, format!("dimensions {dims:?} are impossibly large"))
        })?;
    let bytes = source.read_data(DATA_OFFSET, nbytes as u64)?;
    source.finish()?;
    let data = decode(&bytes, dtype, true, (1.0, 0.0));
    drop(bytes);

    let header = SourceHeader {
        path: path.clone(),
        format: Format::Mgh,
        dtype,
        affine,
        affine_source: AffineSource::Mgh,
        qform_code: 0,
        sform_code: 0,
        scaling: (1.0, 0.0),
    };
    let mut shape = dims[..3].to_vec();
    if dims[3] > 1 {
        shape.push(dims[3]);
    }
    let volume = Volume {
        data,
        shape: [dims[0], dims[1], dims[2]],
        frames: dims[3],
        affine,
        header: Arc::new(header),
    };
    Ok(Loaded {
        volume,
        shape,
        compressed: source.compressed(),
    })
}

/// `N` bytes of the header at `at`; the caller has checked the header is [`FIELDS_LEN`] long.
fn field<const N: usize>(head: &[u8], at: usize) -> [u8; N] {
    let mut bytes = [0; N];
    bytes.copy_from_slice(&head[at..at + N]);
    bytes
}

/// The voxel datatype for an MGH type code.
fn datatype(path: &Path, code: i32) -> Result<DataType, IoError> {
    let unsupported = |what: &str| {
        Err(IoError::unsupported(
            path,
            format!("MGH type {code} ({what}) is not supported"),
        ))
    };
    Ok(match code {
        0 => DataType::Uint8,
        1 => DataType::Int32,
        3 => DataType::Float32,
        4 => DataType::Int16,
        10 => DataType::Uint16,
        2 => return unsupported("long"),
        5 => return unsupported("bitmap"),
        6 => return unsupported("tensor"),
        7 | 8 => return unsupported("complex"),
        9 => return unsupported("RGB"),
        _ => {
            return Err(IoError::invalid(
                path,
                format!("unknown MGH type code {code}"),
            ));
        }
    })
}

/// FreeSurfer's vox2ras: columns `Mdc[c] * delta[c]`, and the voxel at `dims / 2` (not
/// rounded) mapped to `c_ras`. `mdc[c]` is the world direction of voxel axis `c`.
fn vox2ras(dims: [usize; 4], delta: [f64; 3], mdc: [[f64; 3]; 3], c_ras: [f64; 3]) -> Affine {
    let lin = Matrix3::from_fn(|r, c| mdc[c][r] * delta[c]);
    let centre = Vector3::from_fn(|k, _| dims[k] as f64 / 2.0);
    let origin = Vector3::from(c_ras) - lin * centre;
    let mut m = Affine::identity();
    m.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
    m.fixed_view_mut::<3, 1>(0, 3).copy_from(&origin);
    m
}
