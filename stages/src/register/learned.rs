//! Learned registration: a TorchScript network predicts the displacement in one forward pass.
//!
//! Contract of the model file: `forward(moving, fixed)` takes two `[1, 1, D, H, W]` float
//! tensors on the fixed registration grid — the moving image already carried there by the
//! affine stage — and returns a `[1, 3, D, H, W]` displacement in voxels of that grid with
//! channels in `(D, H, W)` order, i.e. `(k, j, i)`, as VoxelMorph writes it: the warped
//! image at voxel `x` is the moving image at `x + disp(x)`. The model must accept the grid's
//! shape; no padding or cropping is done for it.

use std::path::Path;
use std::sync::Arc;

use tch::{CModule, Device, Tensor};

use super::greedy::Field;
use crate::stage::StageError;
use crate::volume::Grid;

/// A loaded TorchScript registration model, shareable between workers.
#[derive(Debug)]
pub struct Model {
    module: CModule,
}

impl Model {
    /// Loads the module from `path` onto `device`.
    ///
    /// # Errors
    /// If the file is missing or not a TorchScript module.
    pub fn load(path: &Path, device: Device) -> Result<Arc<Model>, StageError> {
        let module = CModule::load_on_device(path, device).map_err(|e| {
            StageError::Input(format!(
                "{}: cannot load it as a TorchScript model: {}",
                path.display(),
                crate::stage::torch_message(&e)
            ))
        })?;
        Ok(Arc::new(Model { module }))
    }

    /// Predicts the displacement between `moving` and `fixed` on `grid`.
    ///
    /// # Errors
    /// If the forward pass fails or returns the wrong shape.
    pub(crate) fn predict(
        &self,
        moving: &Tensor,
        fixed: &Tensor,
        grid: &Grid,
    ) -> Result<Field, StageError> {
        let out = self.module.forward_ts(&[moving, fixed])?;
        let want = [1, 3, fixed.size()[2], fixed.size()[3], fixed.size()[4]];
        if out.size() != want {
            return Err(StageError::Data(format!(
                "model returned a tensor of shape {:?}, expected {want:?}",
                out.size()
            )));
        }
        // Channels (k, j, i) → (i, j, k).
        let u = out.f_flip([1])?.f_to_kind(tch::Kind::Float)?;
        Ok(Field { u, grid: *grid })
    }
}
