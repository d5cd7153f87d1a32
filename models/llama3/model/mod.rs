pub mod config;
#[allow(clippy::module_inception)]
pub mod model;
