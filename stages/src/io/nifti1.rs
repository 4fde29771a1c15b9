//! Reading single-file NIfTI-1 images (`.nii`, and `.nii.gz` once decompressed).
//!
//! The 348-byte header is parsed by the `nifti` crate (which handles either byte order); this
//! file validates it, derives the geometry the way nibabel does, and decodes the voxels itself
//! so every datatype and byte order runs one tight loop (see `decode.rs`). Header extensions
//! are skipped: voxels are read from `vox_offset` whatever the extension flag says.
//! Separate `.hdr`/`.img` pairs and NIfTI-2 are not read.

use std::path::Path;
use std::sync::Arc;

use nifti::{NiftiError, NiftiHeader};

use super::IoError;
use super::decode::{decode, size_of};
use super::read::Loaded;
use super::source::Source;
use super::xform::{Qform, fixed_pixdim, fixed_qfac, pixdim_affine, qform_to_affine};
use crate::volume::{Affine, AffineSource, DataType, Format, SourceHeader, Volume};

/// Size of the NIfTI-1 header proper; the 4-byte extension flag follows it.
pub(crate) const HEADER_LEN: usize = 348;

/// The earliest voxel offset of a single-file image: header plus extension flag.
const MIN_VOX_OFFSET: u64 = 352;

/// What the header says about the voxel array and its place in the world.
struct Layout {
    /// Array shape, trailing length-1 axes past the third removed.
    dims: Vec<usize>,
    dtype: DataType,
    offset: u64,
    scaling: (f64, f64),
    affine: Affine,
    affine_source: AffineSource,
}

/// Reads the NIfTI-1 image whose header starts `source`; `big_endian` is the byte order
/// `sizeof_hdr` revealed.
pub(crate) fn read(source: &mut Source, big_endian: bool) -> Result<Loaded, IoError> {
    let path = source.path().to_path_buf();
    let header = parse_header(&path, source.head(), big_endian)?;
    let layout = layout(&path, &header)?;
    let nbytes = layout
        .dims
        .iter()
        .try_fold(size_of(layout.dtype), |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            IoError::invalid(
                &path,
                format!("dimensions {:?} are impossibly large", layout.dims),
            )
        })?;

    let bytes = source.read_data(layout.offset, nbytes as u64)?;
    source.finish()?;
    let data = decode(&bytes, layout.dtype, big_endian, layout.scaling);
    drop(bytes);

    let dims = &layout.dims;
    let shape = [
        dims[0],
        dims.get(1).copied().unwrap_or(1),
        dims.get(2).copied().unwrap_or(1),
    ];
    // Limitation: every axis past the third is folded into `frames`, so a 5D vector image
    // [ni, nj, nk, 1, 3] and a 4D series of 3 volumes read alike; stages only need the count,
    // and `inspect` still reports the file's own shape.
    let frames = dims.iter().skip(3).product();
    let source_header = SourceHeader {
        path: path.clone(),
        format: Format::Nifti1,
        dtype: layout.dtype,
        affine: layout.affine,
        affine_source: layout.affine_source,
        qform_code: header.qform_code,
        sform_code: header.sform_code,
        scaling: layout.scaling,
    };
    let volume = Volume {
        data,
        shape,
        frames,
        affine: layout.affine,
        header: Arc::new(source_header),
    };
    Ok(Loaded {
        volume,
        shape: layout.dims,
        compressed: source.compressed(),
    })
}

/// Parses and sanity-checks the header at the start of `head`.
fn parse_header(path: &Path, head: &[u8], big_endian: bool) -> Result<NiftiHeader, IoError> {
    if head.len() < HEADER_LEN {
        return Err(IoError::invalid(
            path,
            format!(
                "file ends inside the NIfTI-1 header ({} of 348 bytes)",
                head.len()
            ),
        ));
    }
    // The crate guesses the byte order from dim[0]; checking dim[0] in the order sizeof_hdr
    // revealed first makes its guess agree with ours.
    let dim0_bytes = [head[40], head[41]];
    let dim0 = if big_endian {
        i16::from_be_bytes(dim0_bytes)
    } else {
        i16::from_le_bytes(dim0_bytes)
    };
    if !(1..=7).contains(&dim0) {
        return Err(IoError::invalid(
            path,
            format!("dim[0] is {dim0}, but a NIfTI-1 image has 1 to 7 dimensions"),
        ));
    }
    let header = NiftiHeader::from_reader(&head[..HEADER_LEN]).map_err(|e| match e {
        NiftiError::InvalidFormat => IoError::invalid(
            path,
            format!(
                "magic {:?} is not NIfTI-1's \"n+1\": not a NIfTI-1 file",
                String::from_utf8_lossy(&head[344..347])
            ),
        ),
        other => IoError::invalid(path, format!("unreadable NIfTI-1 header ({other})")),
    })?;
    if &header.magic == nifti::header::MAGIC_CODE_NI1 {
        return Err(IoError::unsupported(
            path,
            "header belongs to a .hdr/.img pair (magic \"ni1\"); only single-file .nii images \
             are supported",
        ));
    }
    Ok(header)
}

/// Shape, datatype, data offset, scaling and affine from a parsed header.
fn layout(path: &Path, header: &NiftiHeader) -> Result<Layout, IoError> {
    let dtype = datatype(path, header.datatype)?;
    let ndim = usize::from(header.dim[0]);
    let mut dims = Vec::with_capacity(ndim);
    for (k, &d) in header.dim[1..=ndim].iter().enumerate() {
        // The spec's dim fields are signed; the crate stores them unsigned.
        let d = d as i16;
        if d < 1 {
            return Err(IoError::invalid(
                path,
                format!(
                    "dim[{}] is {d}, but every axis needs at least one voxel",
                    k + 1
                ),
            ));
        }
        dims.push(d as usize);
    }
    while dims.len() > 3 && dims.last() == Some(&1) {
        dims.pop();
    }

    let vox_offset = header.vox_offset;
    if !vox_offset.is_finite() || vox_offset < 0.0 {
        return Err(IoError::invalid(
            path,
            format!("vox_offset {vox_offset} is not a byte offset"),
        ));
    }
    let offset = (vox_offset as u64).max(MIN_VOX_OFFSET);
    if offset != vox_offset as u64 {
        tracing::debug!(path = %path.display(), vox_offset, "Voxel offset inside the header, using 352");
    }

    let (affine, affine_source) = affine(path, header, &dims);
    Ok(Layout {
        dtype,
        offset,
        scaling: scaling(header.scl_slope, header.scl_inter),
        affine,
        affine_source,
        dims,
    })
}

/// The voxel datatype for a NIfTI-1 datatype code.
fn datatype(path: &Path, code: i16) -> Result<DataType, IoError> {
    let unsupported = |what: &str| {
        Err(IoError::unsupported(
            path,
            format!("datatype {code} ({what}) is not supported; convert to a scalar type first"),
        ))
    };
    Ok(match code {
        2 => DataType::Uint8,
        4 => DataType::Int16,
        8 => DataType::Int32,
        16 => DataType::Float32,
        64 => DataType::Float64,
        256 => DataType::Int8,
        512 => DataType::Uint16,
        768 => DataType::Uint32,
        1024 => DataType::Int64,
        1 => return unsupported("1-bit binary"),
        32 | 1792 | 2048 => return unsupported("complex"),
        128 => return unsupported("RGB24 colour"),
        2304 => return unsupported("RGBA32 colour"),
        1280 => return unsupported("uint64"),
        1536 => return unsupported("float128"),
        _ => {
            return Err(IoError::invalid(
                path,
                format!("unknown datatype code {code} (not in the NIfTI-1 table)"),
            ));
        }
    })
}

/// The scaling to apply: `scl_slope` 0 or not finite means none (the intercept is then
/// ignored too); a non-finite intercept counts as 0.
fn scaling(slope: f32, inter: f32) -> (f64, f64) {
    let (slope, inter) = (f64::from(slope), f64::from(inter));
    if slope == 0.0 || !slope.is_finite() {
        return (1.0, 0.0);
    }
    (slope, if inter.is_finite() { inter } else { 0.0 })
}

/// Whether an xform code means "this transform is set" (nibabel treats unknown codes as 0).
fn code_is_set(code: i16) -> bool {
    (1..=5).contains(&code)
}

/// The voxel-to-world affine: sform if set, else qform if set, else nibabel's pixdim
/// fallback. A transform with non-finite entries counts as unset.
fn affine(path: &Path, h: &NiftiHeader, dims: &[usize]) -> (Affine, AffineSource) {
    let pixdim = |k: usize| f64::from(h.pixdim[k]);
    if code_is_set(h.sform_code) {
        let mut m = Affine::identity();
        for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                m[(r, c)] = f64::from(v);
            }
        }
        if m.iter().all(|v| v.is_finite()) {
            return (m, AffineSource::Sform);
        }
        tracing::warn!(path = %path.display(), "Sform has non-finite entries, ignoring it");
    }
    if code_is_set(h.qform_code) {
        if (1..=3).any(|k| pixdim(k) < 0.0) {
            tracing::warn!(path = %path.display(), "Negative pixdim, using its magnitude");
        }
        let q = Qform {
            bcd: [h.quatern_b, h.quatern_c, h.quatern_d].map(f64::from),
            qfac: fixed_qfac(pixdim(0)),
            pixdim: [1, 2, 3].map(|k| fixed_pixdim(pixdim(k))),
            offset: [h.quatern_x, h.quatern_y, h.quatern_z].map(f64::from),
        };
        let m = qform_to_affine(&q);
        if m.iter().all(|v| v.is_finite()) {
            return (m, AffineSource::Qform);
        }
        tracing::warn!(path = %path.display(), "Qform has non-finite entries, ignoring it");
    }
    tracing::warn!(
        path = %path.display(),
        "No qform or sform: orientation unknown, assuming nibabel's centred LAS from pixdim"
    );
    let axis = |k: usize| dims.get(k).copied().unwrap_or(1);
    let zoom = |k: usize| {
        if k < dims.len() {
            fixed_pixdim(pixdim(k + 1))
        } else {
            1.0
        }
    };
    let m = pixdim_affine([axis(0), axis(1), axis(2)], [zoom(0), zoom(1), zoom(2)]);
    (m, AffineSource::Pixdim)
}
