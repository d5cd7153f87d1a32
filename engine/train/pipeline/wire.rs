//! The pp group's point-to-point traffic on one rank.
//!
//! Under NCCL a send waits on the GPU until its peer posts the matching recv, and one rank's
//! calls run in order on its communication stream, so two neighbours that each send before they
//! receive (1F1B's steady state: an activation one way, a gradient the other) would wait on each
//! other forever. Sends are therefore posted lazily, as torch pairs them in `batch_isend_irecv`:
//! each joins one NCCL group (`group_start` .. `group_end`) with the next recv this rank needs,
//! or with the `flush` at the end of the schedule. The rank would block at that recv anyway, and
//! every send it held back is one it produced before reaching it; the operations of one group
//! progress independently, so a peer waiting for one of them gets it once this rank reaches its
//! next recv, which it does without waiting on anyone (it only computes in between: the host
//! waits for each group to complete before it goes on, so nothing else it blocks on, a download
//! or a free, can be behind a peer). A schedule that runs on the host communicators (whose sends
//! never wait) therefore runs here. The CPU runs take the same path (the host communicators
//! accept groups and sends to oneself as NCCL does), so the threaded tests exercise it.
//!
//! Messages between two ranks arrive in the order they were sent, without labels, and
//! activations and gradients share a pair under interleaving, so each message is named by the
//! sender's schedule (the order of its sends to this rank) and kept until the action that needs
//! it. A rank's transfers to itself (pp = 1, every stage on one rank) go through the
//! communicator too, so one GPU exercises the NCCL calls.

use crate::backend::{Backend, Buf, DeviceMem};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::parallel::schedule::{Action, Schedule, Transfer};
use crate::tensor::DType;
use std::collections::{HashMap, VecDeque};

pub(super) struct Wire<'c> {
    comm: &'c dyn Communicator,
    /// Per sending rank: what it sends this rank, in its order.
    expect: Vec<VecDeque<Transfer>>,
    /// Received ahead of the action that reads it.
    stash: HashMap<Transfer, Box<dyn DeviceMem>>,
    /// Sends not yet posted: (buffer, peer).
    pending: Vec<(Buf, usize)>,
    /// The buffers of pending sends that no tape holds any more (a stage's input gradient).
    kept: Vec<Box<dyn DeviceMem>>,
}

impl<'c> Wire<'c> {
    /// The traffic of `rows` (every pp rank's actions, in order; `s` says where each stage
    /// lives) as seen by rank `me`.
    pub fn new(comm: &'c dyn Communicator, s: &Schedule, rows: &[Vec<Action>], me: usize) -> Self {
        let expect = rows
            .iter()
            .map(|row| {
                row.iter()
                    .filter_map(|a| s.send_after(a))
                    .filter(|t| t.to_rank == me)
                    .collect()
            })
            .collect();
        Wire {
            comm,
            expect,
            stash: HashMap::new(),
            pending: Vec::new(),
            kept: Vec::new(),
        }
    }

    /// Queues `buf` for `peer`; `keep` holds its memory when the tape that owned it goes first.
    /// The caller keeps any other buffer alive until the next `take` or `flush`.
    pub fn send(&mut self, buf: Buf, peer: usize, keep: Option<Box<dyn DeviceMem>>) {
        self.pending.push((buf, peer));
        self.kept.extend(keep);
    }

    /// Message `t` (`len` elements of `dtype`), received into a new buffer of `be`: the
    /// messages its sender sent this rank before it are received (and kept) first, each in a
    /// group with the sends pending here.
    pub fn take(
        &mut self,
        t: Transfer,
        len: usize,
        dtype: DType,
        be: &dyn Backend,
    ) -> Result<Box<dyn DeviceMem>> {
        loop {
            if let Some(m) = self.stash.remove(&t) {
                return Ok(m);
            }
            let next = self.expect[t.from_rank].pop_front().ok_or_else(|| {
                let what = if t.gradient {
                    "the gradient"
                } else {
                    "the output"
                };
                Error::Comm(format!(
                    "pipeline: rank {} never sends {what} of stage {} microbatch {}",
                    t.from_rank, t.stage, t.microbatch
                ))
            })?;
            let m = be.alloc(len * dtype.size())?;
            let buf = Buf::new(m.ptr(), len, dtype);
            self.grouped(|c| c.recv(buf, t.from_rank))?;
            self.stash.insert(next, m);
        }
    }

    /// Posts the pending sends (the end of a schedule).
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.grouped(|_| Ok(()))
    }

    /// One group: the pending sends, then `last`; the group is closed whatever fails.
    fn grouped(&mut self, last: impl FnOnce(&dyn Communicator) -> Result<()>) -> Result<()> {
        let c = self.comm;
        c.group_start()?;
        let mut r = self.pending.iter().try_for_each(|&(b, p)| c.send(b, p));
        if r.is_ok() {
            r = last(c);
        }
        let end = c.group_end();
        self.pending.clear();
        // The host waits here, with the sends posted, for the group to complete (under NCCL,
        // with the communicator's timeout): freeing memory and downloads synchronize the
        // compute stream, which is ordered after the group, and a host blocked there with
        // sends still held back could wait on a peer that waits on them. After it, the sent
        // buffers may go.
        let done = r.and(end).and_then(|()| c.wait());
        self.kept.clear();
        done
    }

    /// Bytes held for messages: received ahead of their action, or waiting to be sent.
    pub fn bytes(&self) -> usize {
        self.stash
            .values()
            .chain(&self.kept)
            .map(|m| m.bytes())
            .sum()
    }
}
