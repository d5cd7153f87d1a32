//! titan: the model folders and their registry, above the engine (DESIGN §1: kernels <- engine
//! <- models <- registry / CLI). Each folder follows torchtitan's conventions (model/ for the
//! single-device math, infra/ for parallelism) and registers one `ModelSpec`; the engine's
//! trainer, checkpoints, Hugging Face interop and CLI see models only through it.
//! See docs/adding_a_model.md.
//!
//! The engine's modules are re-exported, so `titan::tape`, `titan::train` and so on name them.

pub use titan_engine::*;

pub mod llama3;
pub mod qwen3;

use titan_engine::model::Registry;

/// Every model this binary trains; the first is the default when a config names none.
pub fn registry() -> Registry {
    Registry::new(vec![llama3::model_spec(), qwen3::model_spec()])
}
