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
    /// Per request, its arena (empty: all in arena 0), and each arena's size (`with_regions`).
    pub region: Vec<u8>,
    pub region_peak: [usize; 2],
}

fn align(b: usize) -> usize {
    b.div_ceil(ALIGN).max(1) * ALIGN
}

/// Places `ids` (requests of one arena) at offsets into `offsets`; returns the arena's size.
fn pack(requests: &[Request], ids: &[usize], offsets: &mut [usize]) -> usize {
    let mut order = ids.to_vec();
    // Largest first; ties by earlier start for a stable, deterministic plan.
    order.sort_by(|&a, &b| {
        let (ra, rb) = (&requests[a], &requests[b]);
        align(rb.bytes)
            .cmp(&align(ra.bytes))
            .then(ra.first.cmp(&rb.first))
            .then(a.cmp(&b))
    });
    // Placed buffers, kept as (offset, size, first, last).
    let mut placed: Vec<(usize, usize, u32, u32)> = Vec::with_capacity(order.len());
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
    peak
}

impl Plan {
    pub fn new(requests: Vec<Request>) -> Plan {
        Plan::with_regions(requests, Vec::new())
    }

    /// Requests over two arenas, each packed on its own: request k in arena `region[k]` (0 or
    /// 1; all in 0 when `region` is empty). A pipeline stage tape keeps what lives across its
    /// passes in an arena of its own and its passes' transient buffers in one its rank's tapes
    /// share.
    pub fn with_regions(requests: Vec<Request>, region: Vec<u8>) -> Plan {
        let mut offsets = vec![0usize; requests.len()];
        let mut region_peak = [0usize; 2];
        for (r, peak) in region_peak.iter_mut().enumerate() {
            let ids: Vec<usize> = (0..requests.len())
                .filter(|&k| region.get(k).map_or(0, |&x| x as usize) == r)
                .collect();
            *peak = pack(&requests, &ids, &mut offsets);
        }
        let unplanned = requests.iter().map(|r| align(r.bytes)).sum();
        Plan {
            requests,
            offsets,
            peak: region_peak[0] + region_peak[1],
            region,
            region_peak,
            unplanned,
        }
    }

    /// The arena request `seq` lies in (`with_regions`).
    pub fn region(&self, seq: usize) -> usize {
        self.region.get(seq).map_or(0, |&r| r as usize)
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
                let same = self.region(a) == self.region(b);
                if same && ra.first <= rb.last && rb.first <= ra.last {
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
    fn two_regions_are_packed_apart() {
        // Request 0 and 2 overlap in time: alone in region 0 each, apart; 1 overlaps both but
        // lies in region 1, so it starts at 0 of its own arena.
        let r = |bytes, first, last| Request { bytes, first, last };
        let reqs = vec![r(1000, 0, 4), r(300, 1, 3), r(200, 2, 5), r(100, 6, 7)];
        let p = Plan::with_regions(reqs.clone(), vec![0, 1, 0, 1]);
        p.verify().unwrap();
        assert_eq!(
            (p.region(0), p.region(1), p.region(2), p.region(3)),
            (0, 1, 0, 1)
        );
        assert_eq!((p.offsets[0], p.offsets[2]), (0, 1024));
        assert_eq!((p.offsets[1], p.offsets[3]), (0, 0));
        assert_eq!(p.region_peak, [1024 + 256, 512]);
        assert_eq!(p.peak, 1024 + 256 + 512);
        // Overlapping offsets of one region are an error; across regions they are not.
        let mut bad = p.clone();
        bad.offsets[2] = 0;
        assert!(bad.verify().is_err());
        let one = Plan::new(reqs);
        assert_eq!(one.region_peak, [one.peak, 0]);
        assert_eq!(one.region(3), 0);
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
