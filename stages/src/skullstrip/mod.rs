//! Skull stripping: finding the brain in a raw T1-weighted head, and mask morphology in mm.
//!
//! (Design notes are completed below once measured.)

pub(crate) mod levels;
pub(crate) mod lines;
mod morphology;
mod strip;

pub use morphology::{close_mm, dilate_mm, erode_mm, fill_holes, largest_component, open_mm};
pub use strip::{
    AutoParams, RefineParams, SkullStripError, StripResult, auto, dice, mask_volume_ml,
    refine_boundary,
};
