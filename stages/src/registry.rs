//! Builds stages from the `type` and parameters of a pipeline node.
//!
//! Every built-in stage has a `*Config` that deserializes from the node's table with
//! `deny_unknown_fields`, so a typo'd parameter is an error naming the key, and a `build()`
//! that yields the runtime [`Stage`]. The engine never knows the concrete types: it calls
//! [`build`] with the node's `type` and the rest of its table.

use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::stage::Stage;
use crate::stages;

/// The `type` names a pipeline file may use, in the order the docs list them.
pub const TYPES: &[&str] = &[
    "dataset",
    "load",
    "conform",
    "normalize",
    "skull_strip",
    "register",
    "segment",
    "dice",
    "write",
    "report",
];

/// A stage built from its node, with what the engine validates before running.
pub struct BuiltStage {
    /// The runtime stage.
    pub stage: Arc<dyn Stage>,
    /// Files and folders the stage will read, each with the parameter naming it, so
    /// `validate` reports a missing one before any work starts.
    pub files: Vec<(String, PathBuf)>,
}

/// A node's `type` or parameters are wrong.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No stage has this `type`.
    #[error("unknown node type {kind:?}; known types: {}", known.join(", "))]
    UnknownType {
        /// The type the file asked for.
        kind: String,
        /// The known ones.
        known: Vec<&'static str>,
    },
    /// The parameters do not deserialize (unknown or missing key, wrong type).
    #[error("{0}")]
    Params(String),
    /// The parameters deserialize but make no sense together.
    #[error("{0}")]
    Invalid(String),
}

/// A stage's configuration as written in a pipeline file.
pub trait StageConfig: DeserializeOwned {
    /// Files or folders the stage will read, with the parameter that names each.
    fn files(&self) -> Vec<(String, PathBuf)> {
        Vec::new()
    }

    /// Turns the configuration into the runtime stage.
    ///
    /// # Errors
    /// If the parameters are individually valid but inconsistent.
    fn build(self) -> Result<Arc<dyn Stage>, BuildError>;
}

fn build_as<C: StageConfig>(params: toml::Table) -> Result<BuiltStage, BuildError> {
    let config = C::deserialize(toml::Value::Table(params))
        .map_err(|e| BuildError::Params(e.to_string().trim().to_string()))?;
    let files = config.files();
    Ok(BuiltStage {
        stage: config.build()?,
        files,
    })
}

/// Builds the stage of type `kind` from the node's parameters (its table without `type`
/// and `inputs`, and without the engine's own keys such as `concurrency`).
///
/// # Errors
/// [`BuildError::UnknownType`] for an unknown `kind`, else whatever the config rejects.
pub fn build(kind: &str, params: toml::Table) -> Result<BuiltStage, BuildError> {
    match kind {
        "dataset" => build_as::<stages::DatasetConfig>(params),
        "load" => build_as::<stages::LoadConfig>(params),
        "conform" => build_as::<stages::ConformConfig>(params),
        "normalize" => build_as::<stages::NormalizeConfig>(params),
        "skull_strip" => build_as::<stages::SkullStripConfig>(params),
        "register" => build_as::<crate::register::RegisterConfig>(params),
        "segment" => build_as::<stages::SegmentConfig>(params),
        "dice" => build_as::<stages::DiceConfig>(params),
        "write" => build_as::<stages::WriteConfig>(params),
        "report" => build_as::<stages::ReportConfig>(params),
        _ => Err(BuildError::UnknownType {
            kind: kind.to_string(),
            known: TYPES.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_type_is_known_to_build() {
        for kind in TYPES {
            if let Err(BuildError::UnknownType { .. }) = build(kind, toml::Table::new()) {
                panic!("{kind} is listed in TYPES but build does not know it");
            }
        }
    }

    #[test]
    fn unknown_types_and_keys_are_named() {
        let err = build("segmnet", toml::Table::new())
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("segmnet") && e.contains("segment")));
        let params: toml::Table = toml::from_str("spacing = 1.0\nspaceing = 2.0").unwrap();
        let err = build("conform", params).err().map(|e| e.to_string());
        assert!(
            err.is_some_and(|e| e.contains("spaceing")),
            "unknown key not named"
        );
    }

    #[test]
    fn register_rejects_values_that_cannot_work() {
        for (text, named) in [
            ("deformable.step = nan", "deformable.step"),
            ("deformable.step = -1.0", "deformable.step"),
            ("deformable.field_sigma = -0.5", "deformable.field_sigma"),
            (
                "deformable.levels = [1, 2, 4]\ndeformable.iterations = [1, 1, 1]",
                "coarse to fine",
            ),
            ("resolution_mm = 500.0", "resolution_mm"),
            ("resolution_mm = 0.0001", "resolution_mm"),
        ] {
            let params: toml::Table = toml::from_str(text).unwrap();
            let err = build("register", params).err().map(|e| e.to_string());
            assert!(
                err.as_ref().is_some_and(|e| e.contains(named)),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn libtorch_errors_lose_their_stack_trace() {
        let err = tch::Tensor::f_ones([2, 3], (tch::Kind::Float, tch::Device::Cpu))
            .and_then(|a| a.f_matmul(&a))
            .map(|_| ())
            .unwrap_err();
        let message = crate::stage::StageError::from(err).to_string();
        assert!(message.starts_with("libtorch: "), "{message}");
        assert!(!message.contains("frame #"), "{message}");
    }

    /// Without a CUDA device, `device = "cuda"` fails the build (so `validate`, naming the
    /// node) instead of every subject; `auto` and `cpu` build.
    #[test]
    fn cuda_is_refused_where_there_is_none() {
        if tch::Cuda::is_available() {
            return;
        }
        for (kind, text) in [
            ("register", "device = \"cuda\""),
            (
                "skull_strip",
                "method = \"auto\"\n[atlas]\nregister.device = \"cuda\"",
            ),
        ] {
            let params: toml::Table = toml::from_str(text).unwrap();
            let err = build(kind, params).err().map(|e| e.to_string());
            assert!(
                err.as_ref()
                    .is_some_and(|e| e.contains("`device` is \"cuda\"") && e.contains("no CUDA")),
                "{kind}: {err:?}"
            );
        }
        for device in ["auto", "cpu"] {
            let params: toml::Table = toml::from_str(&format!("device = \"{device}\"")).unwrap();
            assert!(build("register", params).is_ok(), "{device}");
        }
    }

    /// What `validate` knows of a scan's label map goes through the stages that keep the
    /// scan's labels (a skull-stripped scan keeps its own); others give no scan and know
    /// nothing of it.
    #[test]
    fn stages_that_keep_a_scans_labels_keep_what_is_known_of_them() {
        use crate::stage::{ValueFacts, ValueKind};
        let scan = |labels| ValueFacts {
            kind: Some(ValueKind::Scan),
            mask: None,
            labels,
        };
        let built = |kind: &str| build(kind, toml::Table::new()).unwrap().stage;
        for kind in ["conform", "normalize", "skull_strip"] {
            for labels in [Some(true), Some(false), None] {
                assert_eq!(built(kind).output_labels(&[scan(labels)]), labels, "{kind}");
            }
        }
        let segmentation = ValueFacts {
            kind: Some(ValueKind::Segmentation),
            ..scan(None)
        };
        for (kind, inputs) in [
            ("register", vec![scan(Some(true)), scan(Some(true))]),
            ("dice", vec![segmentation, scan(Some(true))]),
            ("write", vec![scan(Some(true))]),
        ] {
            assert_eq!(built(kind).output_labels(&inputs), None, "{kind}");
        }
    }

    #[test]
    fn register_builds_with_defaults_and_rejects_typos() {
        assert!(build("register", toml::Table::new()).is_ok());
        let params: toml::Table = toml::from_str("resolution_m = 2.0").unwrap();
        let err = build("register", params).err().map(|e| e.to_string());
        assert!(
            err.is_some_and(|e| e.contains("resolution_m")),
            "unknown key not named"
        );
    }
}
