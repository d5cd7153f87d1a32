//! Picks the backend for `training.device`: "cpu", "cuda" or "auto" (CUDA when this binary was
//! built with it and a GPU answers, else the CPU).

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::dist::Communicator;
use crate::error::{Error, Result};
use std::time::Duration;

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

/// A rank's backend and the communicator its collectives run on (None for one rank).
pub type RankDevice = (Box<dyn Backend>, Option<Box<dyn Communicator>>);

/// The backend of one rank and the communicator its collectives run on: on the CPU the host
/// communicator itself; on CUDA rank r takes GPU r mod (visible GPUs) (ranks of a node are
/// contiguous, one per GPU) and an NCCL communicator bootstrapped over the host one.
pub fn select_rank_backend(
    device: &str,
    world: Option<Box<dyn Communicator>>,
    timeout: Duration,
) -> Result<RankDevice> {
    let Some(world) = world else {
        return Ok((select_backend(device)?, None));
    };
    match device {
        "cpu" => Ok((Box::new(CpuBackend::new()), Some(world))),
        "cuda" => cuda_rank(world, timeout),
        "auto" if cuda_backend().is_ok() => cuda_rank(world, timeout),
        "auto" => Ok((Box::new(CpuBackend::new()), Some(world))),
        other => select_backend(other).map(|b| (b, Some(world))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_rank(world: Box<dyn Communicator>, timeout: Duration) -> Result<RankDevice> {
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Backend(format!("cuda: device count: {e}")))?
        .max(1) as usize;
    let be = crate::backend::cuda::CudaBackend::new(world.rank() % count)?;
    let nccl = crate::dist::NcclComm::new(&be, world.as_ref(), timeout)?;
    Ok((Box::new(be), Some(Box::new(nccl))))
}

#[cfg(not(feature = "cuda"))]
fn cuda_rank(_world: Box<dyn Communicator>, _timeout: Duration) -> Result<RankDevice> {
    cuda_backend().map(|b| (b, None))
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
