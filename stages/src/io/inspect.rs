//! A summary of a volume file, for `voxflow inspect`: geometry as the file states it, and
//! value statistics after scaling, both as JSON (via serde) and as text like `mri_info`.
//!
//! Inspecting reads the whole file, since the statistics need every voxel.

use std::fmt;
use std::path::Path;

use super::IoError;
use super::read::read_detailed;
use crate::volume::{AffineSource, DataType, Format, orientation_code, stats, voxel_size};

/// What a volume file holds. Serialised keys are the field names.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Inspection {
    /// The file.
    pub path: String,
    /// `nifti1` or `mgh`.
    pub format: Format,
    /// Whether the file is gzip-compressed.
    pub compressed: bool,
    /// The array shape, trailing length-1 axes past the third removed.
    pub shape: Vec<usize>,
    /// Number of frames (product of the axes past the third; 1 for a plain volume).
    pub frames: usize,
    /// The on-disk datatype.
    pub dtype: DataType,
    /// Voxel sizes in mm (column lengths of the affine).
    pub voxel_size: [f64; 3],
    /// Orientation code such as `"LIA"`.
    pub orientation: String,
    /// Voxel-to-world affine, row by row.
    pub affine: [[f64; 4]; 4],
    /// Where the affine came from: `sform`, `qform`, `pixdim` or `mgh`.
    pub affine_source: AffineSource,
    /// NIfTI `qform_code` (0 for MGH).
    pub qform_code: i16,
    /// NIfTI `sform_code` (0 for MGH).
    pub sform_code: i16,
    /// Slope applied to the stored values (1 when the file has none).
    pub scl_slope: f64,
    /// Intercept applied to the stored values.
    pub scl_inter: f64,
    /// Smallest finite value after scaling (NaN, serialised as null, if none).
    pub min: f64,
    /// Largest finite value after scaling.
    pub max: f64,
    /// Mean of the finite values after scaling.
    pub mean: f64,
    /// Number of NaN voxels.
    pub n_nan: usize,
    /// Number of infinite voxels.
    pub n_inf: usize,
}

/// Reads `path` and summarises its header and values.
///
/// # Errors
/// As [`read_volume`](super::read_volume): the file is missing, corrupt or unsupported.
///
/// # Examples
/// ```no_run
/// let info = voxflow_stages::io::inspect("brain.mgz".as_ref())?;
/// println!("{info}");
/// println!("{}", serde_json::to_string_pretty(&info).unwrap());
/// # Ok::<(), voxflow_stages::io::IoError>(())
/// ```
pub fn inspect(path: &Path) -> Result<Inspection, IoError> {
    let loaded = read_detailed(path)?;
    let volume = &loaded.volume;
    let header = &volume.header;
    let values = stats(&volume.data);
    let m = &header.affine;
    Ok(Inspection {
        path: path.display().to_string(),
        format: header.format,
        compressed: loaded.compressed,
        shape: loaded.shape,
        frames: volume.frames,
        dtype: header.dtype,
        voxel_size: voxel_size(m),
        orientation: orientation_code(m),
        affine: std::array::from_fn(|r| std::array::from_fn(|c| m[(r, c)])),
        affine_source: header.affine_source,
        qform_code: header.qform_code,
        sform_code: header.sform_code,
        scl_slope: header.scaling.0,
        scl_inter: header.scaling.1,
        min: values.min,
        max: values.max,
        mean: values.mean,
        n_nan: values.n_nan,
        n_inf: values.n_inf,
    })
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = match self.format {
            Format::Nifti1 => "NIfTI-1",
            Format::Mgh => "MGH",
            Format::Derived => "derived",
        };
        let gzip = if self.compressed {
            ", gzip-compressed"
        } else {
            ""
        };
        let shape: Vec<String> = self.shape.iter().map(|n| n.to_string()).collect();
        let sizes: Vec<String> = self.voxel_size.iter().map(|v| format!("{v:.4}")).collect();
        writeln!(f, "{}", self.path)?;
        writeln!(f, "  format        {format}{gzip}")?;
        let frames = match self.frames {
            1 => String::new(),
            n => format!(" ({n} frames)"),
        };
        writeln!(f, "  shape         {}{frames}", shape.join(" x "))?;
        writeln!(f, "  dtype         {}", self.dtype.name())?;
        writeln!(f, "  voxel size    {} mm", sizes.join(" x "))?;
        writeln!(f, "  orientation   {}", self.orientation)?;
        let source = match self.affine_source {
            AffineSource::Sform => "sform",
            AffineSource::Qform => "qform",
            AffineSource::Pixdim => "pixdim only, orientation unknown",
            AffineSource::Mgh => "MGH vox2ras",
            AffineSource::Pipeline => "pipeline",
        };
        let codes = match self.format {
            Format::Nifti1 => {
                format!(
                    ", qform_code {}, sform_code {}",
                    self.qform_code, self.sform_code
                )
            }
            _ => String::new(),
        };
        writeln!(f, "  affine        from {source}{codes}")?;
        for row in &self.affine {
            writeln!(
                f,
                "                {:>10.4} {:>10.4} {:>10.4} {:>10.4}",
                row[0], row[1], row[2], row[3]
            )?;
        }
        if (self.scl_slope, self.scl_inter) == (1.0, 0.0) {
            writeln!(f, "  scaling       none")?;
        } else {
            writeln!(
                f,
                "  scaling       slope {}, intercept {}",
                self.scl_slope, self.scl_inter
            )?;
        }
        write!(
            f,
            "  values        min {:.6}  max {:.6}  mean {:.6}  ({} NaN, {} infinite)",
            self.min, self.max, self.mean, self.n_nan, self.n_inf
        )
    }
}
