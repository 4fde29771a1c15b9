//! The voxflow engine: pipeline files, graph validation, scheduling, and the CLI's commands.
//!
//! - [`config`]: pipeline TOML to located, collected errors or a [`config::PipelineFile`];
//! - [`graph`]: stages built and checked into a [`graph::Pipeline`], and its DOT drawing;
//! - [`run`]: the bounded-channel runtime that streams subjects through the nodes;
//! - [`cache`]: preprocessed volumes kept on disk, keyed by what made them.
//!
//! Stages, volumes and formats live in the `voxflow-stages` crate.

pub mod cache;
pub mod config;
pub mod graph;
pub mod run;

use std::path::Path;

use config::{ConfigErrors, PipelineFile};
use graph::Pipeline;

/// Loads, parses and validates a pipeline file: every check `voxflow validate` makes.
///
/// # Errors
/// Every problem found, each naming the file, line and node.
pub fn load_pipeline(path: &Path) -> Result<Pipeline, ConfigErrors> {
    let (file, errors) = PipelineFile::load_partial(path)?;
    Pipeline::build_checked(file, errors)
}
