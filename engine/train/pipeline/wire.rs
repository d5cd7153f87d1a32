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
//! it (`Book`: the same bookkeeping, without the data, is what the memory plan replays). A send
//! reads its buffer when it is posted, so a stage tape's arena that a held-back send reads is
//! retired here and freed for reuse only after the group that posts it. A rank's transfers to
//! itself (pp = 1, every stage on one rank) go through the communicator too, so one GPU
//! exercises the NCCL calls.

use crate::backend::{Buf, DeviceMem};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::parallel::schedule::{Action, Schedule, Transfer};
use crate::tensor::DType;
use std::collections::{HashMap, HashSet, VecDeque};

/// Which messages rank `me` receives, in each sender's order, and which came ahead of the action
/// that reads them.
pub(super) struct Book {
    /// Per sending rank: what it sends this rank, in its order.
    expect: Vec<VecDeque<Transfer>>,
    ahead: HashSet<Transfer>,
}

impl Book {
    /// The traffic of `rows` (every pp rank's actions, in order; `s` says where each stage
    /// lives) as seen by rank `me`.
    pub fn new(s: &Schedule, rows: &[Vec<Action>], me: usize) -> Self {
        let expect = rows
            .iter()
            .map(|row| {
                row.iter()
                    .filter_map(|a| s.send_after(a))
                    .filter(|t| t.to_rank == me)
                    .collect()
            })
            .collect();
        Book {
            expect,
            ahead: HashSet::new(),
        }
    }

    /// The messages to receive now to have `t`, in order, `t` last (the others come ahead);
    /// none when `t` came ahead.
    pub fn receive(&mut self, t: Transfer) -> Result<Vec<Transfer>> {
        if self.ahead.remove(&t) {
            return Ok(Vec::new());
        }
        let mut got = Vec::new();
        loop {
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
            got.push(next);
            if next == t {
                return Ok(got);
            }
            self.ahead.insert(next);
        }
    }
}

/// What a pool holds: device memory, or (replayed by the memory plan) its size.
pub(super) trait Room {
    fn room(&self) -> usize;
}

impl Room for Box<dyn DeviceMem> {
    fn room(&self) -> usize {
        self.bytes()
    }
}

impl Room for usize {
    fn room(&self) -> usize {
        *self
    }
}

/// Stage tapes' arenas and received messages, reused across microbatches and steps: a take
/// gets a free buffer of exactly the size asked, or a new one. Exact sizes keep every later step
/// within what the first allocated (at each point as many of each size are in use as then).
pub(super) struct Pool<T> {
    free: Vec<T>,
    /// Bytes allocated so far, free or in use.
    pub allocated: usize,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            free: Vec::new(),
            allocated: 0,
        }
    }
}

impl<T: Room> Pool<T> {
    pub fn take(&mut self, bytes: usize, alloc: impl FnOnce(usize) -> Result<T>) -> Result<T> {
        if let Some(i) = self.free.iter().position(|m| m.room() == bytes) {
            return Ok(self.free.swap_remove(i));
        }
        let m = alloc(bytes)?;
        self.allocated += bytes;
        Ok(m)
    }

    pub fn put(&mut self, m: T) {
        self.free.push(m);
    }
}

pub(super) struct Wire<'c> {
    comm: &'c dyn Communicator,
    book: Book,
    /// Received ahead of the action that reads it.
    stash: HashMap<Transfer, Box<dyn DeviceMem>>,
    /// Sends not yet posted: (buffer, peer).
    pending: Vec<(Buf, usize)>,
    /// Memory that pending sends read, held until they are posted.
    kept: Vec<Box<dyn DeviceMem>>,
    /// Memory no send reads any more, for the caller to reuse (`released`).
    done: Vec<Box<dyn DeviceMem>>,
}

impl<'c> Wire<'c> {
    /// As `Book::new`, over `comm`.
    pub fn new(comm: &'c dyn Communicator, s: &Schedule, rows: &[Vec<Action>], me: usize) -> Self {
        Wire {
            comm,
            book: Book::new(s, rows, me),
            stash: HashMap::new(),
            pending: Vec::new(),
            kept: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Queues `buf` for `peer`. Its memory must stay alive until it is posted: the caller holds
    /// it, or hands it over with `retire`.
    pub fn send(&mut self, buf: Buf, peer: usize) {
        self.pending.push((buf, peer));
    }

    /// Memory the caller is done with, which pending sends may still read: held until they are
    /// posted, then returned by `released`.
    pub fn retire(&mut self, m: Box<dyn DeviceMem>) {
        match self.pending.is_empty() {
            true => self.done.push(m),
            false => self.kept.push(m),
        }
    }

    /// The retired memory that no send reads any more.
    pub fn released(&mut self) -> Vec<Box<dyn DeviceMem>> {
        std::mem::take(&mut self.done)
    }

    /// Message `t` (`len` elements of `dtype`), received into a buffer from `alloc` (bytes):
    /// the messages its sender sent this rank before it are received (and kept) first, each in
    /// a group with the sends pending here.
    pub fn take(
        &mut self,
        t: Transfer,
        len: usize,
        dtype: DType,
        alloc: &mut dyn FnMut(usize) -> Result<Box<dyn DeviceMem>>,
    ) -> Result<Box<dyn DeviceMem>> {
        for next in self.book.receive(t)? {
            let m = alloc(len * dtype.size())?;
            let buf = Buf::new(m.ptr(), len, dtype);
            self.grouped(|c| c.recv(buf, t.from_rank))?;
            self.stash.insert(next, m);
        }
        self.stash
            .remove(&t)
            .ok_or_else(|| Error::Comm(format!("pipeline: {t:?} was received twice")))
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
        let posted = r.and(end).and_then(|()| c.wait());
        self.done.append(&mut self.kept);
        posted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::dist::HostComm;
    use crate::parallel::schedule::Kind;

    #[test]
    fn retired_memory_comes_back_only_after_the_sends_that_read_it() {
        let be = CpuBackend::new();
        let comm = HostComm::local_comms(1).pop().unwrap();
        // Two stages on one rank: stage 0's outputs go to stage 1 through the rank itself.
        let s = Schedule::of(Kind::Interleaved1F1B, 1, 2, 2).unwrap();
        let mut wire = Wire::new(comm.as_ref(), &s, &s.per_rank, 0);
        let out = be.alloc(16).unwrap();
        be.fill(Buf::new(out.ptr(), 4, DType::F32), 2.5).unwrap();
        wire.send(Buf::new(out.ptr(), 4, DType::F32), 0);
        wire.retire(out);
        assert!(wire.released().is_empty(), "a pending send still reads it");
        // The first message the rank reads: stage 0's output of microbatch 0 (sent above).
        let t = s.per_rank[0].iter().find_map(|a| s.recv_before(a)).unwrap();
        assert_eq!((t.stage, t.microbatch, t.gradient), (0, 0, false));
        let mut alloc = |n: usize| be.alloc(n);
        let got = wire.take(t, 4, DType::F32, &mut alloc).unwrap();
        let mut v = [0f32; 4];
        be.download(
            Buf::new(got.ptr(), 4, DType::F32),
            bytemuck::cast_slice_mut(&mut v),
        )
        .unwrap();
        assert_eq!(v, [2.5; 4]);
        assert_eq!(wire.released().len(), 1, "the group posted the send");
        // Nothing pending: retired memory is free at once.
        wire.retire(got);
        assert_eq!(wire.released().len(), 1);
        // A message no rank sends is an error naming it, not a wait.
        let never = Transfer {
            gradient: true,
            from_rank: 0,
            to_rank: 0,
            stage: 1,
            microbatch: 7,
        };
        let Err(e) = wire.take(never, 4, DType::F32, &mut alloc) else {
            panic!("a message nobody sends was received");
        };
        assert!(
            e.to_string()
                .contains("never sends the gradient of stage 1 microbatch 7"),
            "{e}"
        );
    }
}
