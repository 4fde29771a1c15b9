//! The in-memory volume every stage exchanges, and the geometry that places it in the world.
//!
//! Voxels are stored as `f32` in the order NIfTI and MGH use on disk: the first axis (`i`)
//! varies fastest, then `j`, then `k`, then the frame. The same buffer viewed as a libtorch
//! tensor of shape `[k, j, i]` is the `(D, H, W)` layout `grid_sample` expects, so volumes
//! reach the registration code without a transpose.
//!
//! Every volume knows two affines: `affine`, the voxel-to-world (RAS, mm) mapping the
//! computation trusts, and `header.affine`, the one its file stated. They differ only when a
//! pipeline declares the true orientation of a file whose header is wrong; outputs are written
//! back with the file's own header so they overlay the input in any viewer.

use std::path::PathBuf;
use std::sync::Arc;

use nalgebra::{Matrix3, Matrix4, Vector3, Vector4};

/// A 4×4 voxel-to-world affine in millimetres (RAS+ world, as NIfTI and nibabel use).
pub type Affine = Matrix4<f64>;

/// How the values were stored in the source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// Unsigned 8-bit integer.
    Uint8,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Signed 32-bit integer.
    Int32,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Signed 64-bit integer.
    Int64,
    /// 32-bit float.
    Float32,
    /// 64-bit float.
    Float64,
}

impl DataType {
    /// The lowercase name used by `inspect` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Uint8 => "uint8",
            DataType::Int8 => "int8",
            DataType::Int16 => "int16",
            DataType::Uint16 => "uint16",
            DataType::Int32 => "int32",
            DataType::Uint32 => "uint32",
            DataType::Int64 => "int64",
            DataType::Float32 => "float32",
            DataType::Float64 => "float64",
        }
    }
}

/// The file format a volume came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// NIfTI-1, plain or gzip-compressed.
    Nifti1,
    /// FreeSurfer MGH, plain or gzip-compressed (MGZ).
    Mgh,
    /// Made in memory by a stage, never read from a file.
    Derived,
}

/// Which header field the voxel-to-world affine was taken from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AffineSource {
    /// NIfTI `srow_*` (sform_code > 0).
    Sform,
    /// NIfTI quaternion (qform_code > 0, sform_code 0).
    Qform,
    /// Neither code set: voxel sizes only, the nibabel fallback.
    Pixdim,
    /// FreeSurfer MGH vox2ras.
    Mgh,
    /// Declared by the pipeline (an orientation override) or made by a stage.
    Pipeline,
}

/// What the source file said about itself; kept so results can be written in its geometry.
#[derive(Clone, Debug)]
pub struct SourceHeader {
    /// The file the volume was read from.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Its on-disk datatype.
    pub dtype: DataType,
    /// The affine the file states (before any pipeline override).
    pub affine: Affine,
    /// Where that affine came from.
    pub affine_source: AffineSource,
    /// NIfTI `qform_code` (0 for MGH).
    pub qform_code: i16,
    /// NIfTI `sform_code` (0 for MGH).
    pub sform_code: i16,
    /// The `(slope, intercept)` that was applied to the stored values.
    pub scaling: (f64, f64),
}

impl SourceHeader {
    /// A header for a volume made in memory, with the given affine.
    pub fn derived(affine: Affine) -> SourceHeader {
        SourceHeader {
            path: PathBuf::new(),
            format: Format::Derived,
            dtype: DataType::Float32,
            affine,
            affine_source: AffineSource::Pipeline,
            qform_code: 1,
            sform_code: 1,
            scaling: (1.0, 0.0),
        }
    }
}

/// A 3D volume (optionally with several frames) placed in world space.
#[derive(Clone, Debug)]
pub struct Volume {
    /// Voxel values, `i` fastest, then `j`, `k`, frame.
    pub data: Vec<f32>,
    /// Spatial size `[ni, nj, nk]`.
    pub shape: [usize; 3],
    /// Number of frames (1 for an ordinary volume, 3 for a displacement field).
    pub frames: usize,
    /// The voxel-to-world affine the computation uses.
    pub affine: Affine,
    /// The source file's header.
    pub header: Arc<SourceHeader>,
}

impl Volume {
    /// A single-frame volume from its parts.
    ///
    /// # Panics
    /// If `data.len()` is not the product of `shape`: a programming error, never bad input,
    /// since readers check sizes before building a volume.
    pub fn new(data: Vec<f32>, shape: [usize; 3], affine: Affine) -> Volume {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "volume data and shape disagree"
        );
        Volume {
            data,
            shape,
            frames: 1,
            affine,
            header: Arc::new(SourceHeader::derived(affine)),
        }
    }

    /// A volume of zeros on the same grid as `self` (one frame, same header).
    pub fn zeros_like(&self) -> Volume {
        Volume {
            data: vec![0.0; self.len()],
            shape: self.shape,
            frames: 1,
            affine: self.affine,
            header: self.header.clone(),
        }
    }

    /// A single-frame volume on the same grid and header as `self` holding `data`.
    ///
    /// # Panics
    /// If `data` has not one value per voxel of `self`.
    pub fn with_data(&self, data: Vec<f32>) -> Volume {
        assert_eq!(
            data.len(),
            self.len(),
            "replacement data does not fit the grid"
        );
        Volume {
            data,
            shape: self.shape,
            frames: 1,
            affine: self.affine,
            header: self.header.clone(),
        }
    }

    /// Number of voxels in one frame.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the volume has no voxels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Linear index of voxel `(i, j, k)` in frame 0.
    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        i + self.shape[0] * (j + self.shape[1] * k)
    }

    /// Value at voxel `(i, j, k)` of frame 0.
    #[inline]
    pub fn get(&self, i: usize, j: usize, k: usize) -> f32 {
        self.data[self.index(i, j, k)]
    }

    /// The first frame's values.
    pub fn frame(&self, t: usize) -> &[f32] {
        let n = self.len();
        &self.data[t * n..(t + 1) * n]
    }

    /// Voxel sizes in mm: the lengths of the affine's first three columns.
    pub fn voxel_size(&self) -> [f64; 3] {
        voxel_size(&self.affine)
    }

    /// The grid (shape and affine) this volume lives on.
    pub fn grid(&self) -> Grid {
        Grid {
            shape: self.shape,
            affine: self.affine,
        }
    }

    /// World coordinates (mm) of a continuous voxel position.
    pub fn voxel_to_world(&self, v: [f64; 3]) -> [f64; 3] {
        apply(&self.affine, v)
    }
}

/// A voxel grid: a shape and its voxel-to-world affine, without data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    /// Spatial size `[ni, nj, nk]`.
    pub shape: [usize; 3],
    /// Voxel-to-world affine.
    pub affine: Affine,
}

impl Grid {
    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the grid has no voxels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Voxel sizes in mm.
    pub fn voxel_size(&self) -> [f64; 3] {
        voxel_size(&self.affine)
    }
}

/// Applies a 4×4 affine to a 3D point.
#[inline]
pub fn apply(m: &Affine, p: [f64; 3]) -> [f64; 3] {
    let r = m * Vector4::new(p[0], p[1], p[2], 1.0);
    [r[0], r[1], r[2]]
}

/// Voxel sizes (column norms of the linear part) of an affine.
pub fn voxel_size(m: &Affine) -> [f64; 3] {
    let c = |j: usize| Vector3::new(m[(0, j)], m[(1, j)], m[(2, j)]).norm();
    [c(0), c(1), c(2)]
}

/// The nibabel-style orientation code (e.g. `"RAS"`, `"LIA"`): for each voxel axis, the world
/// direction it points to most strongly.
pub fn orientation_code(m: &Affine) -> String {
    let lin: Matrix3<f64> = m.fixed_view::<3, 3>(0, 0).into_owned();
    let mut used = [false; 3];
    let mut code = String::with_capacity(3);
    for j in 0..3 {
        let col = lin.column(j);
        let mut best = None;
        for r in 0..3 {
            if used[r] {
                continue;
            }
            if best.is_none_or(|b: usize| col[r].abs() > col[b].abs()) {
                best = Some(r);
            }
        }
        let Some(r) = best else { break };
        used[r] = true;
        let letters = [('R', 'L'), ('A', 'P'), ('S', 'I')][r];
        code.push(if col[r] >= 0.0 { letters.0 } else { letters.1 });
    }
    code
}

/// Errors made by parsing an orientation code.
#[derive(Debug, thiserror::Error)]
#[error("invalid orientation code {code:?}: expected three letters, one each of R/L, A/P, S/I")]
pub struct OrientationError {
    /// The offending text.
    pub code: String,
}

/// An affine for a grid of `shape` with isotropic or given voxel sizes, whose axes point in
/// the directions of `code` (e.g. `"LIA"`) and whose centre voxel sits at world `centre`.
///
/// # Errors
/// If `code` is not a permutation of one letter from each of R/L, A/P, S/I.
pub fn affine_from_orientation(
    code: &str,
    voxel_size: [f64; 3],
    shape: [usize; 3],
    centre: [f64; 3],
) -> Result<Affine, OrientationError> {
    let err = || OrientationError {
        code: code.to_string(),
    };
    let letters: Vec<char> = code.to_ascii_uppercase().chars().collect();
    if letters.len() != 3 {
        return Err(err());
    }
    let mut m = Affine::identity();
    let mut seen = [false; 3];
    for (j, c) in letters.iter().enumerate() {
        let (row, sign) = match c {
            'R' => (0, 1.0),
            'L' => (0, -1.0),
            'A' => (1, 1.0),
            'P' => (1, -1.0),
            'S' => (2, 1.0),
            'I' => (2, -1.0),
            _ => return Err(err()),
        };
        if seen[row] {
            return Err(err());
        }
        seen[row] = true;
        for r in 0..3 {
            m[(r, j)] = if r == row { sign * voxel_size[j] } else { 0.0 };
        }
    }
    let mid = [
        (shape[0] as f64 - 1.0) / 2.0,
        (shape[1] as f64 - 1.0) / 2.0,
        (shape[2] as f64 - 1.0) / 2.0,
    ];
    let at_mid = apply(&m, mid);
    for r in 0..3 {
        m[(r, 3)] = centre[r] - at_mid[r];
    }
    Ok(m)
}

/// Summary statistics of finite values, and the count of NaNs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stats {
    /// Smallest finite value (NaN if none).
    pub min: f64,
    /// Largest finite value (NaN if none).
    pub max: f64,
    /// Mean of finite values (NaN if none).
    pub mean: f64,
    /// Number of NaN voxels.
    pub n_nan: usize,
    /// Number of infinite voxels.
    pub n_inf: usize,
}

/// Statistics of `data` over finite values.
pub fn stats(data: &[f32]) -> Stats {
    let (mut min, mut max, mut sum, mut n) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, 0usize);
    let (mut n_nan, mut n_inf) = (0, 0);
    for &v in data {
        if v.is_nan() {
            n_nan += 1;
        } else if v.is_infinite() {
            n_inf += 1;
        } else {
            let v = v as f64;
            min = min.min(v);
            max = max.max(v);
            sum += v;
            n += 1;
        }
    }
    if n == 0 {
        return Stats {
            min: f64::NAN,
            max: f64::NAN,
            mean: f64::NAN,
            n_nan,
            n_inf,
        };
    }
    Stats {
        min,
        max,
        mean: sum / n as f64,
        n_nan,
        n_inf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orientation_round_trips_through_affine() {
        for code in ["RAS", "LIA", "LAS", "PIR", "SAR"] {
            let m = affine_from_orientation(code, [1.0, 2.0, 1.5], [10, 20, 30], [0.0; 3]).unwrap();
            assert_eq!(orientation_code(&m), code);
            assert_eq!(voxel_size(&m), [1.0, 2.0, 1.5]);
        }
    }

    #[test]
    fn orientation_centre_lands_on_requested_point() {
        let m = affine_from_orientation("LIA", [1.0; 3], [11, 21, 31], [5.0, -3.0, 2.0]).unwrap();
        let c = apply(&m, [5.0, 10.0, 15.0]);
        assert!(
            (c[0] - 5.0).abs() < 1e-12 && (c[1] + 3.0).abs() < 1e-12 && (c[2] - 2.0).abs() < 1e-12
        );
    }

    #[test]
    fn bad_orientation_codes_are_rejected() {
        for code in ["RRS", "XYZ", "RA", "RASX"] {
            assert!(
                affine_from_orientation(code, [1.0; 3], [2, 2, 2], [0.0; 3]).is_err(),
                "{code}"
            );
        }
    }

    #[test]
    fn stats_skip_non_finite_values() {
        let s = stats(&[1.0, f32::NAN, 3.0, f32::INFINITY]);
        assert_eq!(
            (s.min, s.max, s.mean, s.n_nan, s.n_inf),
            (1.0, 3.0, 2.0, 1, 1)
        );
    }
}
