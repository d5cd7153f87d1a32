pub mod parallelize;
pub mod pipeline;
