pub mod config;
#[allow(clippy::module_inception)]
pub mod model;
pub mod state_dict_adapter;
