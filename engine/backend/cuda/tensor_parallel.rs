//! PENDING (in progress on a branch): the CUDA kernels of the tensor-parallel ops. Until they
//! land these return an error naming the op, so a CUDA run with tp > 1 fails clearly.

use super::CudaBackend;
use crate::backend::{Copy2d, CrossEntropyShard, CrossEntropyStats, EmbeddingShard};
use crate::error::{Error, Result};

fn pending(op: &str) -> Result<()> {
    Err(Error::Backend(format!(
        "{op}: the CUDA kernel of this tensor-parallel op is not built yet"
    )))
}

impl CudaBackend {
    pub(crate) fn copy_2d_impl(&self, _: &Copy2d) -> Result<()> {
        pending("copy_2d")
    }
    pub(crate) fn embedding_shard_fwd_impl(&self, _: &EmbeddingShard) -> Result<()> {
        pending("embedding_shard_fwd")
    }
    pub(crate) fn embedding_shard_bwd_impl(&self, _: &EmbeddingShard) -> Result<()> {
        pending("embedding_shard_bwd")
    }
    pub(crate) fn cross_entropy_stats_impl(&self, _: &CrossEntropyStats) -> Result<()> {
        pending("cross_entropy_stats")
    }
    pub(crate) fn cross_entropy_shard_impl(&self, _: &CrossEntropyShard) -> Result<()> {
        pending("cross_entropy_shard")
    }
}
