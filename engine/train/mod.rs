//! Training: job configuration (torchtitan TOML schema + CLI overrides) and the LR schedule.

pub mod config;
pub mod device;
pub mod dist;
pub mod initial_load;
pub mod lock;
pub mod lr;
pub mod memory;
pub mod pipeline;
pub mod pipeline_trace;
pub mod preempt;
pub mod state;
pub mod step_trace;
pub mod trainer;
pub mod validate;
