//! Picks the backend for `training.device`: "cpu", "cuda" or "auto" (CUDA when this binary was
//! built with it and a GPU answers, else the CPU).

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::error::{Error, Result};

pub fn select_backend(device: &str) -> Result<Box<dyn Backend>> {
    match device {
        "cpu" => Ok(Box::new(CpuBackend::new())),
        "cuda" => cuda_backend(),
        "auto" => Ok(cuda_backend().unwrap_or_else(|_| Box::new(CpuBackend::new()))),
        other => Err(Error::Config(format!(
            "training.device must be auto, cpu or cuda, got '{other}'"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<Box<dyn Backend>> {
    Ok(Box::new(crate::backend::cuda::CudaBackend::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> Result<Box<dyn Backend>> {
    Err(Error::Backend(
        "this titan binary was built without CUDA support; rebuild with `--features cuda` (see README)".into(),
    ))
}

/// A human name for the device (for the MFU peak table and logs).
pub fn device_name(be: &dyn Backend) -> String {
    be.device_description()
}
