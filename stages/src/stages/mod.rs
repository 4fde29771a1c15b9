//! The built-in stages, one file per pipeline `type`.
//!
//! A typical atlas-segmentation pipeline reads a dataset, loads and conforms each subject,
//! registers the atlas to it, carries the atlas labels into the subject's file grid, scores
//! them and writes the results:
//!
//! ```text
//! dataset → load → conform → normalize → skull_strip → register → segment → dice → report
//!                                                                        ↘ write
//! ```
//!
//! Each file holds a documented `*Config` (what a pipeline node may say, with
//! `deny_unknown_fields`) and the runtime stage it builds. The [`crate::registry`] maps `type`
//! names to them. `register` lives in [`crate::register`], not here.
//!
//! Stages that resample (`conform`, `skull_strip` with an atlas, `segment`, `write`) always
//! interpolate from the data they were given, so no voxel is interpolated twice on its way to
//! an output; `segment` and `write` go back to the subject's file grid through
//! [`crate::stage::Scan::native`].

mod conform;
mod dataset;
mod dice;
mod load;
mod normalize;
mod report;
mod segment;
mod skull_strip;
mod write;

pub use conform::{Conform, ConformConfig, Spacing};
pub use dataset::{Dataset, DatasetConfig};
pub use dice::{Dice, DiceConfig};
pub use load::{Load, LoadConfig, NonFinite, load_scan};
pub use normalize::{Normalize, NormalizeConfig, NormalizeMethod};
pub use report::{Report, ReportConfig};
pub use segment::{LabelInterp, Segment, SegmentConfig};
pub use skull_strip::{AtlasHeadConfig, SkullStrip, SkullStripConfig, StripMethod};
pub use write::{Write, WriteConfig};
