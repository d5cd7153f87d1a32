//! titan: a kernel-first LLM pre-training engine.
//!
//! Layers (one way): kernels/ (CUDA) <- engine (this crate: backends, tape, planner, optim, data,
//! checkpoint, train) <- models/ <- the `titan` CLI. See docs/ARCHITECTURE.md.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod error;
pub mod metrics;
#[path = "../models/mod.rs"]
pub mod models;
pub mod params;
pub mod planner;
pub mod plot;
pub mod rng;
pub mod tape;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{DType, Shape};
