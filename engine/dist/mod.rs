//! Communicators: the collectives every parallel schedule is written against (DESIGN §2,
//! engine/dist). One trait, three implementations with the same semantics:
//! - `local`: ranks as threads of one process (CPU runs and most tests);
//! - `tcp`: CPU ranks in separate processes or machines (the multi-node path, tested on loopback);
//! - `nccl`: GPUs, one NCCL communicator per GPU (`NcclComm`, `--features cuda`), started through
//!   a host communicator (the bootstrap) that carries rank 0's unique id.
//!
//! The host communicators share one implementation of the collectives (`host.rs`) over a
//! point-to-point `Transport`; only moving bytes differs. Reductions run in rank order, so a
//! run is bitwise reproducible for a given world size. Their calls complete before returning.
//! NCCL's calls only queue work on the communicator's own CUDA stream, ordered after the compute
//! stream's earlier work and before its later work (events, never a host wait); `wait` (once a
//! step) is where a dead or stuck peer becomes an error instead of a hang. NCCL's reduction
//! order is its own: results match the host communicators' to rounding, not bitwise.

pub mod host;
pub mod launch;
pub mod mesh;
pub mod meta;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;
pub mod transport;

pub use host::HostComm;
pub use mesh::{Mesh, ParallelDims};
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;

use crate::backend::Buf;
use crate::error::Result;
use std::time::Duration;

/// How a reduction combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the group size.
    Avg,
    Max,
    Min,
}

/// Collectives over a group of ranks. Buffers are backend memory (host memory for the host
/// communicators, device memory for NCCL); f32 and bf16 (reduced in f32). Every member of the
/// group must call the same collectives in the same order; a member that does not arrive
/// within the timeout turns into an error on the others that names it (NCCL cannot name it: its
/// error names this rank and says that a peer is dead or stuck).
pub trait Communicator: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// In place: every rank ends with the reduction of all ranks' `buf`.
    fn all_reduce(&self, buf: Buf, op: ReduceOp) -> Result<()>;
    /// `recv` (size x send.len) = the ranks' `send` buffers in rank order.
    fn all_gather(&self, send: Buf, recv: Buf) -> Result<()>;
    /// As `all_gather`, but later compute is not ordered after it until `order_compute`: FSDP's
    /// prefetch issues the next unit's gather and computes this one meanwhile. The host
    /// communicators complete it before returning.
    fn all_gather_start(&self, send: Buf, recv: Buf) -> Result<()> {
        self.all_gather(send, recv)
    }
    /// Orders later compute after everything this communicator has issued (NCCL: the compute
    /// stream waits on an event, the host does not block; host communicators have nothing in
    /// flight).
    fn order_compute(&self) -> Result<()> {
        Ok(())
    }
    /// `recv` (send.len / size) = the reduction of every rank's slice `rank` of `send`.
    fn reduce_scatter(&self, send: Buf, recv: Buf, op: ReduceOp) -> Result<()>;
    /// As `reduce_scatter`, but later compute is not ordered after it until `order_compute`
    /// (FSDP reduces a unit's gradients while backward goes on).
    fn reduce_scatter_start(&self, send: Buf, recv: Buf, op: ReduceOp) -> Result<()> {
        self.reduce_scatter(send, recv, op)
    }
    /// Every rank's `buf` = root's.
    fn broadcast(&self, buf: Buf, root: usize) -> Result<()>;
    /// Point to point (pipeline stages). `send` never waits on the host for the matching
    /// `recv`; under NCCL the pair meets on the GPU, so two ranks that exchange buffers put both
    /// calls inside one group (`group_start` .. `group_end`).
    fn send(&self, buf: Buf, peer: usize) -> Result<()>;
    fn recv(&self, buf: Buf, peer: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Blocks until every collective this rank has issued is complete, or fails (a dead or stuck
    /// peer) within the timeout. The host communicators finish each call before returning, so
    /// theirs returns at once; NCCL's calls only queue work on the GPU, and the trainer calls
    /// this once per step before the host reads results.
    fn wait(&self) -> Result<()> {
        Ok(())
    }
    /// Batches the point-to-point calls up to `group_end` (NCCL's grouping); the host
    /// communicators never block in `send`, so for them these only mark the region. Inside
    /// one a rank may send to itself (NCCL's rule; a pipeline with every stage on one rank).
    fn group_start(&self) -> Result<()> {
        Ok(())
    }
    fn group_end(&self) -> Result<()> {
        Ok(())
    }
    /// The sub-group of `ranks` (indices in this group, ascending). Every member calls it with
    /// the same list; non-members must not.
    fn split(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>>;
    /// How long a collective may wait for another rank (`comm.train_timeout_seconds` after
    /// the first step, `init_timeout_seconds` before).
    fn set_timeout(&self, timeout: Duration);
    /// "rank 1 of 4 (tcp)" for logs and errors.
    fn describe(&self) -> String;
}
