//! The trainer's collectives outside FSDP's own: agreeing on host values (the global token
//! count the loss is averaged over, the loss, a stop request, the checkpoint tag) and the
//! data-parallel gradient all-reduce of DDP / HSDP. All are no-ops for one rank.

use super::config::JobConfig;
use super::preempt::StopCause;
use super::trainer::Trainer;
use crate::backend::Buf;
use crate::dist::{Communicator, ParallelDims, ReduceOp};
use crate::error::{Error, Result};
use crate::parallel::schedule::Schedule;
use crate::tensor::DType;
use std::time::Duration;

impl Trainer {
    /// World size (1 without a mesh).
    pub fn world_size(&self) -> usize {
        self.mesh.as_ref().map_or(1, |m| m.dims.world)
    }

    /// Reduces up to 16 host values over the world, through the backend's scratch buffer (the
    /// same path for host memory and NCCL's device memory).
    pub(super) fn all_reduce_host(&self, vals: &mut [f32], op: ReduceOp) -> Result<()> {
        match &self.mesh {
            Some(m) => self.all_reduce_host_on(m.world.as_ref(), vals, op),
            None => Ok(()),
        }
    }

    /// As `all_reduce_host`, over the data-parallel ranks only: a value every tensor-parallel
    /// rank of a batch holds alike (its token count, its loss) is counted once.
    pub(super) fn all_reduce_dp(&self, vals: &mut [f32], op: ReduceOp) -> Result<()> {
        match &self.mesh {
            Some(m) => self.all_reduce_host_on(m.dp.as_ref(), vals, op),
            None => Ok(()),
        }
    }

    /// As `all_reduce_host`, over the ranks that hold different parts of the global batch's
    /// loss (pp x dp): the last pipeline stages' losses, counted once per tp group.
    pub(super) fn all_reduce_batch(&self, vals: &mut [f32], op: ReduceOp) -> Result<()> {
        match &self.mesh {
            Some(m) => self.all_reduce_host_on(m.batch.as_ref(), vals, op),
            None => Ok(()),
        }
    }

    fn all_reduce_host_on(
        &self,
        comm: &dyn Communicator,
        vals: &mut [f32],
        op: ReduceOp,
    ) -> Result<()> {
        let buf: Buf = self.comm_scalars.slice(0, vals.len());
        self.be.upload(buf, bytemuck::cast_slice(vals))?;
        comm.all_reduce(buf, op)?;
        comm.wait()?;
        self.be.download(buf, bytemuck::cast_slice_mut(vals))
    }

    /// Tensor parallel: sums the partial gradients of the replicated weights that met sharded
    /// activations (norms under sequence parallel) over the tp group, once per step.
    pub(super) fn reduce_tp_partials(&self) -> Result<()> {
        match self.store.tp() {
            Some(tp) => tp.reduce_partials(self.be.as_ref(), |id| self.store.local_grad(id)),
            None => Ok(()),
        }
    }

    /// The squared global gradient norm into `out` (device), as the sum over one replica's
    /// ranks of their gradients' squares: FSDP shards tile the gradient, tensor-parallel slices
    /// and pipeline stages too; a replicated weight counts on the first tp rank only, a
    /// parameter two stages hold (a tied embedding) on its owner's.
    pub(super) fn grad_norm_sq(&self, out: Buf) -> Result<()> {
        let be = self.be.as_ref();
        let pp = self.pipeline.as_ref();
        match self.store.tp() {
            None if pp.is_none() => {
                be.sum_squares(&[self.store.flat_grad()], out)?;
                if let Some(f) = self.store.fsdp() {
                    f.comm().all_reduce(out, ReduceOp::Sum)?;
                    f.comm().wait()?;
                }
                Ok(())
            }
            tp => {
                let bufs: Vec<Buf> = self
                    .store
                    .ids()
                    .filter(|&id| tp.is_none_or(|t| t.rank == 0 || t.dim(id).is_some()))
                    .filter(|&id| pp.is_none_or(|p| !p.is_copy(id)))
                    .map(|id| self.store.local_grad(id))
                    .filter(|b| b.len > 0)
                    .collect();
                be.sum_squares(&bufs, out)?;
                let m = self
                    .mesh
                    .as_ref()
                    .expect("tensor / pipeline parallel has a mesh");
                m.replica.all_reduce(out, ReduceOp::Sum)?;
                m.replica.wait()
            }
        }
    }

    /// The sum of `n` over the data-parallel ranks, exact: reduced as 16-bit halves, each far
    /// below f32's 2^24 integer range for any real world size.
    pub(super) fn global_count(&self, n: usize) -> Result<usize> {
        if self.mesh.is_none() {
            return Ok(n);
        }
        let mut v = [
            (n >> 32) as f32,
            ((n >> 16) & 0xffff) as f32,
            (n & 0xffff) as f32,
        ];
        self.all_reduce_dp(&mut v, ReduceOp::Sum)?;
        Ok(((v[0] as usize) << 32) + ((v[1] as usize) << 16) + v[2] as usize)
    }

    /// The stop request of any rank (the largest code), so every rank stops after the same
    /// step; an error if a rank is gone.
    pub(super) fn agreed_stop(&self) -> Result<Option<StopCause>> {
        let local = self.stop.agreed_stop();
        if self.mesh.is_none() {
            return Ok(local);
        }
        // Codes: 0 none, 1 stdout closed, 1 + n signal n; max picks one request.
        let code = match local {
            None => 0,
            Some(StopCause::OutputClosed) => 1,
            Some(StopCause::Signal(s)) => 1 + s,
        };
        let mut v = [code as f32];
        self.all_reduce_host(&mut v, ReduceOp::Max)?;
        Ok(match v[0] as i32 {
            0 => None,
            1 => Some(StopCause::OutputClosed),
            c => StopCause::decode(c - 1),
        })
    }

    /// DDP and HSDP: sums the data-parallel replicas' gradients (the whole flat gradient, or
    /// the local shards), once per step.
    pub(super) fn replicate_grads(&self) -> Result<()> {
        match &self.mesh {
            Some(m) if m.dims.degrees.dp_replicate > 1 => {
                m.dp_replicate
                    .all_reduce(self.store.flat_grad(), ReduceOp::Sum)?;
                m.dp_replicate.wait()
            }
            _ => Ok(()),
        }
    }

    /// `comm.init_timeout_seconds` holds until the first step is done, then this.
    pub(super) fn set_comm_timeout(&self, seconds: i64) {
        if let Some(m) = &self.mesh {
            let t = Duration::from_secs(seconds.max(1) as u64);
            m.world.set_timeout(t);
            m.dp_shard.set_timeout(t);
            m.dp_replicate.set_timeout(t);
            m.dp.set_timeout(t);
            m.replica.set_timeout(t);
            m.batch.set_timeout(t);
            if let Some(tp) = self.store.tp() {
                tp.comm.set_timeout(t);
            }
            if let Some(f) = self.store.fsdp() {
                f.comm().set_timeout(t);
            }
            if let Some(p) = &self.pipeline {
                p.set_timeout(t);
            }
        }
    }

    /// Rank 0's values on every rank: its pid (the name of each save's temp folder, the same
    /// everywhere) and the MFU peak it measured (one CPU rank's pool: every rank's is alike).
    pub(super) fn agree_at_start(mut self) -> Result<Trainer> {
        let pid = std::process::id();
        let mut v = [0f32; 3];
        if self.rank == 0 {
            v = [
                (pid >> 16) as f32,
                (pid & 0xffff) as f32,
                (self.peak.flops / 1e9) as f32,
            ];
        }
        self.all_reduce_host(&mut v, ReduceOp::Sum)?;
        self.save_tag = ((v[0] as u64) << 16) + v[1] as u64;
        if self.peak.flops.is_nan() {
            self.peak.flops = v[2] as f64 * 1e9;
        }
        Ok(self)
    }

    /// Every rank's verdict on a collective file operation: an error on all ranks if any failed
    /// (the failing rank returns its own error).
    pub(super) fn all_ok(&self, local: Result<()>, what: &str) -> Result<()> {
        let mut v = [local.is_err() as u8 as f32];
        self.all_reduce_host(&mut v, ReduceOp::Max)?;
        local?;
        if v[0] > 0.0 {
            return Err(Error::Checkpoint(format!(
                "{what} failed on another rank (its log names the cause)"
            )));
        }
        Ok(())
    }
}

/// `[parallelism]` resolved for `world` ranks; degrees this release does not build are refused.
pub(super) fn parallel_dims(cfg: &JobConfig, world: usize) -> Result<ParallelDims> {
    let dims = ParallelDims::new(&cfg.parallelism, world).map_err(|e| {
        let hint = if world == 1 {
            "; launch that many ranks with `titan train --nproc-per-node N` (or --nnodes, see \
             docs/PARALLELISM.md)"
        } else {
            ""
        };
        Error::Config(format!(
            "{}{hint}",
            e.to_string().trim_start_matches("config error: ")
        ))
    })?;
    let g = dims.degrees;
    if g.pp > 1 || cfg.parallelism.pipeline_on_one_rank {
        // The schedule's layout rules (enough microbatches for the stages, an interleaved count
        // that divides) come first: they hold whenever pipelines run.
        Schedule::check_config(&cfg.parallelism, cfg.training.local_batch_size)?;
    }
    for (name, d) in [("context", g.cp), ("expert", g.ep)] {
        if d > 1 {
            return Err(Error::Config(format!(
                "parallelism: {name} parallel degree {d}: this release builds data, tensor and \
                 pipeline parallelism (FSDP, HSDP, DDP, TP, PP); {name} parallelism is not built \
                 yet"
            )));
        }
    }
    Ok(dims)
}

/// `training.mixed_precision_reduce`: the dtype gradients are reduce-scattered in.
pub(super) fn reduce_dtype(cfg: &JobConfig) -> Result<DType> {
    match cfg.training.mixed_precision_reduce.as_str() {
        "float32" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        s => Err(Error::Config(format!(
            "training.mixed_precision_reduce = \"{s}\": expected \"float32\" or \"bfloat16\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(overrides: &[&str]) -> JobConfig {
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        JobConfig::from_toml_str("", "test.toml", &ov).unwrap()
    }

    #[test]
    fn pipeline_layouts_meet_the_schedule_rules() {
        let e = parallel_dims(
            &cfg(&[
                "--parallelism.pipeline_parallel_degree=4",
                "--training.local_batch_size=2",
            ]),
            4,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("2 microbatches for 4 pipeline ranks"), "{e}");
        let e = parallel_dims(
            &cfg(&[
                "--parallelism.pipeline_parallel_degree=4",
                "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
                "--training.local_batch_size=6",
            ]),
            4,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a multiple of the 4 pipeline ranks"), "{e}");
        // A layout the schedules accept is one pipelines run.
        let ok = parallel_dims(
            &cfg(&[
                "--parallelism.pipeline_parallel_degree=4",
                "--training.local_batch_size=8",
            ]),
            4,
        );
        assert_eq!(ok.unwrap().degrees.pp, 4);
    }
}
