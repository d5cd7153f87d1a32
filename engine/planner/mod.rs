//! Static memory planner. A step is the same sequence of buffer requests every time (the model and
//! shapes are fixed by the config), so we trace one step, record every request's size and lifetime
//! (first and last op that touches it, counting forward, backward and recompute), and pack all of
//! them into one arena: larger buffers first, each at the lowest offset where it fits between the
//! already placed buffers whose lifetimes overlap (best fit over the gaps). Replays then take the
//! k-th request's offset from the plan and allocate nothing.

pub mod cost;

use crate::error::{Error, Result};

pub const ALIGN: usize = 256;

/// One traced buffer request: size in bytes and the inclusive op-clock interval it is live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub bytes: usize,
    pub first: u32,
    pub last: u32,
}

/// The result: an offset per request (in request order) and the arena size.
#[derive(Clone, Debug)]
pub struct Plan {
    pub requests: Vec<Request>,
    pub offsets: Vec<usize>,
    /// Arena bytes: the planned peak of the step's transient memory.
    pub peak: usize,
    /// What the same requests would need with no reuse at all (for the report).
    pub unplanned: usize,
}

fn align(b: usize) -> usize {
    b.div_ceil(ALIGN).max(1) * ALIGN
}

impl Plan {
    pub fn new(requests: Vec<Request>) -> Plan {
        let mut order: Vec<usize> = (0..requests.len()).collect();
        // Largest first; ties by earlier start for a stable, deterministic plan.
        order.sort_by(|&a, &b| {
            let (ra, rb) = (&requests[a], &requests[b]);
            align(rb.bytes)
                .cmp(&align(ra.bytes))
                .then(ra.first.cmp(&rb.first))
                .then(a.cmp(&b))
        });
        let mut offsets = vec![0usize; requests.len()];
        // Placed buffers, kept as (offset, size, first, last).
        let mut placed: Vec<(usize, usize, u32, u32)> = Vec::with_capacity(requests.len());
        let mut peak = 0usize;
        for &i in &order {
            let r = requests[i];
            let size = align(r.bytes);
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .filter(|p| p.2 <= r.last && r.first <= p.3)
                .map(|p| (p.0, p.0 + p.1))
                .collect();
            busy.sort_unstable();
            // Best fit: the smallest gap that holds `size`; else the end of the busy range.
            let mut best: Option<(usize, usize)> = None; // (gap size, offset)
            let mut cursor = 0usize;
            for &(s, e) in &busy {
                if s > cursor {
                    let gap = s - cursor;
                    if gap >= size && best.is_none_or(|(g, _)| gap < g) {
                        best = Some((gap, cursor));
                    }
                }
                cursor = cursor.max(e);
            }
            let off = best.map(|(_, o)| o).unwrap_or(cursor);
            offsets[i] = off;
            placed.push((off, size, r.first, r.last));
            peak = peak.max(off + size);
        }
        let unplanned = requests.iter().map(|r| align(r.bytes)).sum();
        Plan {
            requests,
            offsets,
            peak,
            unplanned,
        }
    }

    /// Offset of the `seq`-th request, checking the replay asks for the same size as the trace.
    pub fn offset(&self, seq: usize, bytes: usize) -> Result<usize> {
        match self.requests.get(seq) {
            Some(r) if r.bytes == bytes => Ok(self.offsets[seq]),
            Some(r) => Err(Error::Backend(format!(
                "memory plan mismatch: request {seq} is {bytes} bytes, the plan traced {} (the step changed shape)",
                r.bytes
            ))),
            None => Err(Error::Backend(format!(
                "memory plan mismatch: request {seq} beyond the {} traced requests",
                self.requests.len()
            ))),
        }
    }

    /// Checks the plan's invariant: no two buffers with overlapping lifetimes overlap in memory.
    pub fn verify(&self) -> Result<()> {
        let n = self.requests.len();
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by_key(|&i| self.offsets[i]);
        for (a_pos, &a) in idx.iter().enumerate() {
            let (ra, oa) = (self.requests[a], self.offsets[a]);
            let ea = oa + align(ra.bytes);
            for &b in &idx[a_pos + 1..] {
                let ob = self.offsets[b];
                if ob >= ea {
                    break;
                }
                let rb = self.requests[b];
                if ra.first <= rb.last && rb.first <= ra.last {
                    return Err(Error::Backend(format!(
                        "plan overlap between requests {a} and {b}"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_lifetimes_share_memory() {
        let reqs = vec![
            Request {
                bytes: 1000,
                first: 0,
                last: 1,
            },
            Request {
                bytes: 1000,
                first: 2,
                last: 3,
            },
            Request {
                bytes: 500,
                first: 1,
                last: 2,
            },
        ];
        let p = Plan::new(reqs);
        p.verify().unwrap();
        assert_eq!(p.offsets[0], p.offsets[1]);
        assert_eq!(p.peak, 1024 + 512);
        assert_eq!(p.unplanned, 1024 * 2 + 512);
    }

    #[test]
    fn random_plans_never_overlap() {
        let mut s = 12345u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20 {
            let reqs: Vec<Request> = (0..200)
                .map(|_| {
                    let a = (next() % 100) as u32;
                    let len = (next() % 30) as u32;
                    Request {
                        bytes: 1 + (next() % 100_000) as usize,
                        first: a,
                        last: a + len,
                    }
                })
                .collect();
            let p = Plan::new(reqs);
            p.verify().unwrap();
            assert!(p.peak <= p.unplanned);
        }
    }

    #[test]
    fn replay_size_mismatch_is_an_error() {
        let p = Plan::new(vec![Request {
            bytes: 64,
            first: 0,
            last: 0,
        }]);
        assert!(p.offset(0, 64).is_ok());
        assert!(p.offset(0, 65).is_err());
        assert!(p.offset(1, 64).is_err());
    }
}
