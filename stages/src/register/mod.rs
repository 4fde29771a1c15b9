//! Atlas-to-subject registration on libtorch tensors.
//!
//! PLACEHOLDER — filled in by the registration work.
