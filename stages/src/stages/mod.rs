//! The built-in stages, one file per `type`.
//!
//! PLACEHOLDER — filled in by the stages work.

/// Placeholder so the registry compiles before any stage exists.
#[derive(serde::Deserialize)]
pub struct NeverConfig {}

impl crate::registry::StageConfig for NeverConfig {
    fn build(self) -> Result<std::sync::Arc<dyn crate::stage::Stage>, crate::registry::BuildError> {
        Err(crate::registry::BuildError::Invalid("never".into()))
    }
}
