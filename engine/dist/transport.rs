//! Point-to-point byte transport under the host communicators: tagged messages between world
//! ranks, FIFO per (sender, tag), with a deadline on every receive and a "peer lost" state that
//! turns a dead rank into an error naming it instead of a hang.

use crate::error::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

pub trait Transport: Send + Sync {
    fn world_rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Queues `bytes` for world rank `peer`; never waits for the matching receive.
    fn send(&self, peer: usize, tag: u64, bytes: Vec<u8>) -> Result<()>;
    /// The next message from `peer` with `tag`, or an error once `deadline` passes or the peer
    /// is lost.
    fn recv(&self, peer: usize, tag: u64, deadline: Instant) -> Result<Vec<u8>>;
    /// "local" or "tcp".
    fn kind(&self) -> &'static str;
    /// How errors name a peer: "rank 3" or "rank 3 (node 1, 10.0.0.2:29511)".
    fn peer_name(&self, peer: usize) -> String;
}

#[derive(Default)]
struct Slots {
    queues: HashMap<(usize, u64), VecDeque<Vec<u8>>>,
    /// Peers whose connection is gone, with why.
    lost: HashMap<usize, String>,
}

/// The receive side of one rank: messages by (sender, tag), woken on arrival or loss.
#[derive(Default)]
pub struct Mailbox {
    slots: Mutex<Slots>,
    arrived: Condvar,
}

impl Mailbox {
    pub fn deliver(&self, from: usize, tag: u64, bytes: Vec<u8>) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.queues.entry((from, tag)).or_default().push_back(bytes);
        self.arrived.notify_all();
    }

    /// Marks `peer` lost: pending and future receives from it fail with `why`.
    pub fn lose(&self, peer: usize, why: String) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.lost.entry(peer).or_insert(why);
        self.arrived.notify_all();
    }

    pub fn take(
        &self,
        from: usize,
        tag: u64,
        deadline: Instant,
        name: impl Fn() -> String,
    ) -> Result<Vec<u8>> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(m) = s.queues.get_mut(&(from, tag)).and_then(|q| q.pop_front()) {
                return Ok(m);
            }
            if let Some(why) = s.lost.get(&from) {
                return Err(Error::Comm(format!("lost {}: {why}", name())));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Comm(format!(
                    "timed out waiting for {} (it did not reach the same collective; raise \
                     comm.train_timeout_seconds if it is only slow)",
                    name()
                )));
            }
            s = self
                .arrived
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Ranks as threads of one process: each rank's handle delivers into the others' mailboxes.
pub struct LocalTransport {
    rank: usize,
    boxes: Arc<Vec<Mailbox>>,
}

impl LocalTransport {
    /// One handle per rank of a world of `n` threads.
    pub fn world(n: usize) -> Vec<LocalTransport> {
        let boxes: Arc<Vec<Mailbox>> = Arc::new((0..n).map(|_| Mailbox::default()).collect());
        (0..n)
            .map(|rank| LocalTransport {
                rank,
                boxes: boxes.clone(),
            })
            .collect()
    }
}

impl Drop for LocalTransport {
    /// A rank thread that ends (an error, a panic) is lost to the others at once.
    fn drop(&mut self) {
        for (r, b) in self.boxes.iter().enumerate() {
            if r != self.rank {
                b.lose(self.rank, "its thread ended".into());
            }
        }
    }
}

impl Transport for LocalTransport {
    fn world_rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.boxes.len()
    }
    fn send(&self, peer: usize, tag: u64, bytes: Vec<u8>) -> Result<()> {
        self.boxes[peer].deliver(self.rank, tag, bytes);
        Ok(())
    }
    fn recv(&self, peer: usize, tag: u64, deadline: Instant) -> Result<Vec<u8>> {
        self.boxes[self.rank].take(peer, tag, deadline, || self.peer_name(peer))
    }
    fn kind(&self) -> &'static str {
        "local"
    }
    fn peer_name(&self, peer: usize) -> String {
        format!("rank {peer}")
    }
}
