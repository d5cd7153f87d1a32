//! titan: a kernel-first LLM pre-training engine.
//!
//! Layers (one way): kernels/ (CUDA) <- engine (this crate: backends, tape, planner, optim, data,
//! checkpoint, train) <- models/ <- the `titan` CLI. See docs/ARCHITECTURE.md.

pub mod backend;
pub mod checkpoint;
pub mod error;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{DType, Shape};
