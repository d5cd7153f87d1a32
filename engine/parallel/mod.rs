//! Generic parallelism and training techniques that a model's `infra/parallelize.rs` applies to
//! its modules (torchtitan's `distributed/` and `components/`): activation checkpointing today;
//! tensor parallel, FSDP and the pipeline schedules land here, each model folder keeping only
//! the thin glue that names its modules.

pub mod ac;
pub mod fsdp;
pub mod fsdp_runtime;
pub mod pipeline;
pub mod schedule;
pub mod tp;
