//! titan: a kernel-first LLM pre-training engine.
//!
//! Layers (one way): kernels/ (CUDA) <- engine (this crate: backends, tape, planner, optim, data,
//! checkpoint, train) <- models/ <- the `titan` CLI. See docs/ARCHITECTURE.md.

pub mod backend;
pub mod data;
pub mod error;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::{DType, Shape};
#[path = "../models/mod.rs"]
pub mod models;
pub mod params;
pub mod planner;
pub mod rng;
pub mod tape;
