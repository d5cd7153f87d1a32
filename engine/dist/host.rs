//! The collectives of the host communicators (`local`, `tcp`), written once over a
//! `Transport`. Direct algorithms: each rank owns a contiguous chunk of a reduction, receives that
//! chunk from every other rank, reduces it in rank order (so every rank and every run gets the
//! same bits) and sends the result back. Traffic per rank for an all-reduce of n elements is
//! 2 n (size - 1) / size, the same as a ring; latency is one round instead of size - 1.

use super::transport::{LocalTransport, Transport};
use super::{Communicator, ReduceOp};
use crate::backend::Buf;
use crate::error::{Error, Result};
use crate::tensor::DType;
use half::bf16;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A group of world ranks over one transport.
pub struct HostComm {
    t: Arc<dyn Transport>,
    /// World ranks of the members, ascending; `me` indexes it.
    members: Vec<usize>,
    me: usize,
    /// Separates this group's messages from other groups' between the same two ranks.
    tag: u64,
    timeout: Mutex<Duration>,
    /// What this rank sent to itself, in order (pp = 1 pipelines).
    own: Mutex<VecDeque<Vec<u8>>>,
    /// Open `group_start`s: as under NCCL, a rank sends to itself only inside a group.
    depth: AtomicUsize,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl HostComm {
    /// The world group over `t`.
    pub fn world(t: Arc<dyn Transport>) -> HostComm {
        let n = t.world_size();
        let me = t.world_rank();
        HostComm {
            t,
            members: (0..n).collect(),
            me,
            tag: group_tag(&(0..n).collect::<Vec<_>>()),
            timeout: Mutex::new(DEFAULT_TIMEOUT),
            own: Mutex::new(VecDeque::new()),
            depth: AtomicUsize::new(0),
        }
    }

    /// `local_world` as trait objects, what `run_rank_threads` and the trainer take.
    pub fn local_comms(n: usize) -> Vec<Box<dyn Communicator>> {
        Self::local_world(n)
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator>)
            .collect()
    }

    /// `n` ranks as threads of this process: hand one communicator to each thread.
    pub fn local_world(n: usize) -> Vec<HostComm> {
        LocalTransport::world(n)
            .into_iter()
            .map(|t| HostComm::world(Arc::new(t)))
            .collect()
    }

    fn deadline(&self) -> Instant {
        Instant::now() + *self.timeout.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_to(&self, member: usize, bytes: Vec<u8>) -> Result<()> {
        self.t.send(self.members[member], self.tag, bytes)
    }

    fn recv_from(&self, member: usize, expect: usize, what: &str) -> Result<Vec<u8>> {
        let peer = self.members[member];
        let m = self.t.recv(peer, self.tag, self.deadline())?;
        if m.len() != expect {
            return Err(Error::Comm(format!(
                "{what}: {} sent {} bytes, rank {} expected {expect} (the ranks disagree on the \
                 collective's size)",
                self.t.peer_name(peer),
                m.len(),
                self.t.world_rank()
            )));
        }
        Ok(m)
    }

    /// Element range of chunk `j` when `n` elements are split over the members.
    fn chunk(&self, n: usize, j: usize) -> (usize, usize) {
        let size = self.members.len();
        (j * n / size, (j + 1) * n / size)
    }
}

/// A stable id of a member list (FNV-1a), the same on every rank.
fn group_tag(members: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &m in members {
        for b in (m as u64).to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn check_dtype(op: &str, b: Buf) -> Result<()> {
    match b.dtype {
        DType::F32 | DType::BF16 => Ok(()),
        d => Err(Error::DType {
            op: "communicator",
            msg: format!("{op}: {d} buffers are not supported (f32 and bf16 are)"),
        }),
    }
}

/// The bytes of host buffer `b` (the host communicators only see CPU-backend memory).
fn bytes_of<'a>(b: Buf) -> &'a [u8] {
    // SAFETY: a CPU-backend Buf is a live host allocation of `b.bytes()` bytes owned by the
    // caller for the duration of the collective.
    unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.bytes()) }
}

fn bytes_mut<'a>(b: Buf) -> &'a mut [u8] {
    // SAFETY: as `bytes_of`; the caller hands the buffer to the collective exclusively.
    unsafe { std::slice::from_raw_parts_mut(b.ptr as *mut u8, b.bytes()) }
}

/// Values of a dtype's raw bytes as f32.
fn to_f32(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        _ => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
    }
}

fn from_f32(dtype: DType, vals: &[f32], out: &mut [u8]) {
    match dtype {
        DType::BF16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(vals) {
                c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        _ => {
            for (c, v) in out.chunks_exact_mut(4).zip(vals) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// acc = op(acc, x) elementwise.
fn combine(op: ReduceOp, acc: &mut [f32], x: &[f32]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(x).for_each(|(a, b)| *a += b),
        ReduceOp::Max => acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.max(*b)),
        ReduceOp::Min => acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.min(*b)),
    }
}

impl HostComm {
    /// Reduces, in member order, the pieces `parts[j]` (member j's bytes of one chunk) into
    /// `out` (same dtype).
    fn reduce_parts(&self, dtype: DType, op: ReduceOp, parts: &[&[u8]], out: &mut [u8]) {
        let (mut acc, mut x) = (Vec::new(), Vec::new());
        to_f32(dtype, parts[0], &mut acc);
        for p in &parts[1..] {
            to_f32(dtype, p, &mut x);
            combine(op, &mut acc, &x);
        }
        if op == ReduceOp::Avg {
            let inv = 1.0 / parts.len() as f32;
            acc.iter_mut().for_each(|a| *a *= inv);
        }
        from_f32(dtype, &acc, out);
    }

    /// Reduce-scatter of `send` (chunk j = `self.chunk(n, j)`) into `out` = this member's
    /// reduced chunk.
    fn reduce_owned(&self, send: Buf, op: ReduceOp, out: &mut [u8], what: &str) -> Result<()> {
        let (size, es, n) = (self.members.len(), send.dtype.size(), send.len);
        let src = bytes_of(send);
        for j in (0..size).filter(|&j| j != self.me) {
            let (a, b) = self.chunk(n, j);
            self.send_to(j, src[a * es..b * es].to_vec())?;
        }
        let (a, b) = self.chunk(n, self.me);
        let mine = &src[a * es..b * es];
        let mut got: Vec<Vec<u8>> = Vec::with_capacity(size);
        for j in 0..size {
            got.push(if j == self.me {
                Vec::new()
            } else {
                self.recv_from(j, mine.len(), what)?
            });
        }
        let parts: Vec<&[u8]> = (0..size)
            .map(|j| if j == self.me { mine } else { &got[j][..] })
            .collect();
        self.reduce_parts(send.dtype, op, &parts, out);
        Ok(())
    }
}

impl Communicator for HostComm {
    fn rank(&self) -> usize {
        self.me
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce(&self, buf: Buf, op: ReduceOp) -> Result<()> {
        check_dtype("all_reduce", buf)?;
        let size = self.members.len();
        if size == 1 {
            return Ok(());
        }
        let (es, n) = (buf.dtype.size(), buf.len);
        let (a, b) = self.chunk(n, self.me);
        let mut mine = vec![0u8; (b - a) * es];
        self.reduce_owned(buf, op, &mut mine, "all_reduce")?;
        for j in (0..size).filter(|&j| j != self.me) {
            self.send_to(j, mine.clone())?;
        }
        let dst = bytes_mut(buf);
        dst[a * es..b * es].copy_from_slice(&mine);
        for j in (0..size).filter(|&j| j != self.me) {
            let (x, y) = self.chunk(n, j);
            let m = self.recv_from(j, (y - x) * es, "all_reduce")?;
            dst[x * es..y * es].copy_from_slice(&m);
        }
        Ok(())
    }

    fn all_gather(&self, send: Buf, recv: Buf) -> Result<()> {
        check_dtype("all_gather", send)?;
        let size = self.members.len();
        if recv.dtype != send.dtype || recv.len != send.len * size {
            return Err(Error::Comm(format!(
                "all_gather: receive buffer {} x {} must be {size} x the send buffer ({} x {})",
                recv.len, recv.dtype, send.len, send.dtype
            )));
        }
        let src = bytes_of(send);
        for j in (0..size).filter(|&j| j != self.me) {
            self.send_to(j, src.to_vec())?;
        }
        let dst = bytes_mut(recv);
        let w = src.len();
        dst[self.me * w..(self.me + 1) * w].copy_from_slice(src);
        for j in (0..size).filter(|&j| j != self.me) {
            let m = self.recv_from(j, w, "all_gather")?;
            dst[j * w..(j + 1) * w].copy_from_slice(&m);
        }
        Ok(())
    }

    fn reduce_scatter(&self, send: Buf, recv: Buf, op: ReduceOp) -> Result<()> {
        check_dtype("reduce_scatter", send)?;
        let size = self.members.len();
        if recv.dtype != send.dtype || send.len != recv.len * size {
            return Err(Error::Comm(format!(
                "reduce_scatter: send buffer {} x {} must be {size} x the receive buffer ({} x {})",
                send.len, send.dtype, recv.len, recv.dtype
            )));
        }
        let out = bytes_mut(recv);
        if size == 1 {
            out.copy_from_slice(bytes_of(send));
            return Ok(());
        }
        self.reduce_owned(send, op, out, "reduce_scatter")
    }

    fn broadcast(&self, buf: Buf, root: usize) -> Result<()> {
        check_dtype("broadcast", buf)?;
        let size = self.members.len();
        if root >= size {
            return Err(Error::Comm(format!(
                "broadcast: root {root} is not a member of a group of {size}"
            )));
        }
        if self.me == root {
            let src = bytes_of(buf);
            for j in (0..size).filter(|&j| j != root) {
                self.send_to(j, src.to_vec())?;
            }
        } else {
            let m = self.recv_from(root, buf.bytes(), "broadcast")?;
            bytes_mut(buf).copy_from_slice(&m);
        }
        Ok(())
    }

    fn send(&self, buf: Buf, peer: usize) -> Result<()> {
        check_dtype("send", buf)?;
        self.check_peer("send", peer)?;
        if peer == self.me {
            self.own_queue().push_back(bytes_of(buf).to_vec());
            return Ok(());
        }
        self.send_to(peer, bytes_of(buf).to_vec())
    }

    fn recv(&self, buf: Buf, peer: usize) -> Result<()> {
        check_dtype("recv", buf)?;
        self.check_peer("recv", peer)?;
        let m = if peer == self.me {
            let m = self.own_queue().pop_front();
            match m {
                Some(m) if m.len() == buf.bytes() => m,
                _ => {
                    return Err(Error::Comm(format!(
                        "{}: recv of {} bytes from itself, which sent {}",
                        self.describe(),
                        buf.bytes(),
                        m.map_or("nothing".into(), |m| format!("{} bytes", m.len()))
                    )))
                }
            }
        } else {
            self.recv_from(peer, buf.bytes(), "recv")?
        };
        bytes_mut(buf).copy_from_slice(&m);
        Ok(())
    }

    fn group_start(&self) -> Result<()> {
        self.depth.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn group_end(&self) -> Result<()> {
        self.depth
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| d.checked_sub(1))
            .map(|_| ())
            .map_err(|_| {
                Error::Comm(format!(
                    "{}: group_end without group_start",
                    self.describe()
                ))
            })
    }

    fn barrier(&self) -> Result<()> {
        let size = self.members.len();
        for j in (0..size).filter(|&j| j != self.me) {
            self.send_to(j, Vec::new())?;
        }
        for j in (0..size).filter(|&j| j != self.me) {
            self.recv_from(j, 0, "barrier")?;
        }
        Ok(())
    }

    fn split(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>> {
        let size = self.members.len();
        let sorted = ranks.windows(2).all(|w| w[0] < w[1]);
        let me = ranks.iter().position(|&r| r == self.me);
        match me {
            Some(me) if sorted && ranks.iter().all(|&r| r < size) => {
                let members: Vec<usize> = ranks.iter().map(|&r| self.members[r]).collect();
                Ok(Box::new(HostComm {
                    t: self.t.clone(),
                    tag: group_tag(&members),
                    members,
                    me,
                    timeout: Mutex::new(*self.timeout.lock().unwrap_or_else(|e| e.into_inner())),
                    own: Mutex::new(VecDeque::new()),
                    depth: AtomicUsize::new(0),
                }))
            }
            _ => Err(Error::Comm(format!(
                "split: {ranks:?} must be ascending ranks below {size} that include this rank {}",
                self.me
            ))),
        }
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
    }

    fn describe(&self) -> String {
        format!(
            "rank {} of {} ({}, world rank {})",
            self.me,
            self.members.len(),
            self.t.kind(),
            self.t.world_rank()
        )
    }
}

impl HostComm {
    /// As NCCL's: a peer in the group, itself only inside `group_start` .. `group_end`.
    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        let grouped = self.depth.load(Ordering::Relaxed) > 0;
        if peer >= self.members.len() || (peer == self.me && !grouped) {
            return Err(Error::Comm(format!(
                "{op}: peer {peer} is not another member of a group of {} (a rank may only \
                 send to itself inside group_start/group_end)",
                self.members.len()
            )));
        }
        Ok(())
    }

    fn own_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }
}
