//! Volumes, file formats, the stage contract and the built-in stages of voxflow.
//!
//! - [`volume`]: the in-memory [`volume::Volume`] and its geometry;
//! - [`io`]: NIfTI-1 and MGH/MGZ readers and writer, and `inspect`;
//! - [`resample`]: moving voxels between grids through affines and registrations;
//! - [`skullstrip`]: brain extraction and mask morphology in mm; [`intensity`]: normalisation
//!   and bias-field correction;
//! - [`stage`]: the contract between engine and stages, and the values they exchange;
//! - [`register`]: atlas-to-subject registration on libtorch tensors;
//! - [`stages`]: the built-in stages, and [`registry`] that builds them from pipeline files;
//! - [`paths`]: paths compared as the file system resolves them (output vs. dataset).
#![deny(missing_docs)]

pub mod intensity;
pub mod io;
pub mod paths;
pub mod register;
pub mod registry;
pub mod resample;
pub mod skullstrip;
pub mod stage;
pub mod stages;
pub mod volume;
