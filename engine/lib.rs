//! titan's engine: a kernel-first LLM pre-training engine.
//!
//! Layers (one way): kernels/ (CUDA) <- engine (this crate: backends, tape, planner, optim, data,
//! checkpoint, train, the model protocol, the CLI) <- models/ (the `titan` crate: model folders
//! and their registry, the binary). This crate never names a model: it sees models only through
//! `model::ModelSpec`. See docs/ARCHITECTURE.md.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod dist;
pub mod error;
pub mod metrics;
pub mod model;
pub mod out;
pub mod parallel;
pub mod params;
pub mod planner;
pub mod plot;
pub mod progress;
pub mod rng;
pub mod tape;
pub mod tensor;
pub mod tensorboard;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{DType, Shape};
