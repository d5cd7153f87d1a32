//! The shape-only communicator: collectives move nothing and are appended to a meta backend's
//! event log, so a step traced on the meta backend records every collective the FSDP runtime and
//! the trainer issue, in order, next to the kernels (what `planner::cost` times).

use super::{Communicator, ReduceOp};
use crate::backend::meta::{CollKind, EventLog, MetaEvent};
use crate::backend::Buf;
use crate::error::{Error, Result};
use std::time::Duration;

pub struct MetaComm {
    rank: usize,
    size: usize,
    /// Distance between consecutive members in the world (1 for dp_shard, dp_shard for
    /// dp_replicate).
    stride: usize,
    /// Which group this is, for the report ("dp_shard", "dp_replicate").
    name: &'static str,
    log: EventLog,
}

impl MetaComm {
    pub fn new(
        (rank, size, stride): (usize, usize, usize),
        name: &'static str,
        log: EventLog,
    ) -> MetaComm {
        MetaComm {
            rank,
            size,
            stride,
            name,
            log,
        }
    }

    fn push(&self, e: MetaEvent) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    fn coll(&self, kind: CollKind, bytes: usize, started: bool) -> Result<()> {
        self.push(MetaEvent::Collective {
            kind,
            group: self.size,
            span: (self.size - 1) * self.stride + 1,
            comm: self.name,
            bytes: bytes as f64,
            started,
        });
        Ok(())
    }
}

impl Communicator for MetaComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce(&self, buf: Buf, _: ReduceOp) -> Result<()> {
        self.coll(CollKind::AllReduce, buf.bytes(), false)
    }
    fn all_gather(&self, _: Buf, recv: Buf) -> Result<()> {
        self.coll(CollKind::AllGather, recv.bytes(), false)
    }
    fn all_gather_start(&self, _: Buf, recv: Buf) -> Result<()> {
        self.coll(CollKind::AllGather, recv.bytes(), true)
    }
    fn order_compute(&self) -> Result<()> {
        self.push(MetaEvent::OrderCompute);
        Ok(())
    }
    fn reduce_scatter(&self, send: Buf, _: Buf, _: ReduceOp) -> Result<()> {
        self.coll(CollKind::ReduceScatter, send.bytes(), false)
    }
    fn reduce_scatter_start(&self, send: Buf, _: Buf, _: ReduceOp) -> Result<()> {
        self.coll(CollKind::ReduceScatter, send.bytes(), true)
    }
    fn broadcast(&self, buf: Buf, _: usize) -> Result<()> {
        self.coll(CollKind::Broadcast, buf.bytes(), false)
    }
    fn send(&self, _: Buf, _: usize) -> Result<()> {
        Err(Error::Comm(
            "meta communicator: point-to-point is not modelled yet".into(),
        ))
    }
    fn recv(&self, _: Buf, _: usize) -> Result<()> {
        Err(Error::Comm(
            "meta communicator: point-to-point is not modelled yet".into(),
        ))
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn wait(&self) -> Result<()> {
        self.push(MetaEvent::Wait);
        Ok(())
    }
    fn split(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>> {
        let rank = ranks.iter().position(|&r| r == self.rank).unwrap_or(0);
        // Members keep their distance when the subgroup is evenly spaced (mesh groups are).
        let stride = match ranks {
            [a, b, ..] => (b - a) * self.stride,
            _ => self.stride,
        };
        let shape = (rank, ranks.len(), stride);
        Ok(Box::new(MetaComm::new(shape, self.name, self.log.clone())))
    }
    fn set_timeout(&self, _: Duration) {}
    fn describe(&self) -> String {
        format!("rank {} of {} (meta, {})", self.rank, self.size, self.name)
    }
}
