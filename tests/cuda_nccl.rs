//! The NCCL communicator (`NcclComm`) on real GPUs against host computations: every collective in
//! f32 and bf16 at odd sizes, outputs poisoned with NaN first, the ordering against the compute
//! stream, the host-side argument checks, and a dead peer turning into an error within the
//! timeout. Every test has its own deadline.
//!
//! The device tests are `#[ignore = "needs a CUDA device"]`; run them on a GPU machine with
//! `cargo test --release --features cuda --test cuda_nccl -- --ignored --test-threads=1`, with
//! NCCL on the library path as `libnccl.so` (`scripts/install-cuda-toolchain.sh --nccl`, or
//! scripts/run-gpu.sh, which links the wheel's libnccl.so.2). The multi-GPU tests use every GPU
//! present and return early, saying so, with fewer than two.
#![cfg(feature = "cuda")]

use half::bf16;
use std::sync::mpsc::channel;
use std::time::Duration;
use titan::backend::cuda::CudaBackend;
use titan::backend::{Backend, Buf, DeviceMem};
use titan::dist::nccl::nccl_version;
use titan::dist::{Communicator, HostComm, NcclComm, ReduceOp};
use titan::DType;

/// Runs `body` on its own thread; fails the test if it does not finish within `secs`.
fn with_deadline(secs: u64, body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = channel();
    let h = std::thread::spawn(move || {
        body();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().unwrap(),
        Err(_) if h.is_finished() => h.join().unwrap(), // the body panicked: show why
        Err(_) => panic!("test did not finish within {secs} s"),
    }
}

fn gpu(ordinal: usize) -> CudaBackend {
    CudaBackend::new(ordinal).unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

fn device_count() -> usize {
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Device buffers of one backend, kept alive until the test ends.
struct Dev {
    be: CudaBackend,
    keep: Vec<Box<dyn DeviceMem>>,
}

impl Dev {
    fn new(ordinal: usize) -> Dev {
        Dev {
            be: gpu(ordinal),
            keep: Vec::new(),
        }
    }

    fn put(&mut self, dtype: DType, vals: &[f32]) -> Buf {
        let bytes: Vec<u8> = match dtype {
            DType::BF16 => vals
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let m = self.be.alloc(bytes.len()).unwrap();
        let b = Buf::new(m.ptr(), vals.len(), dtype);
        self.keep.push(m);
        self.be.upload(b, &bytes).unwrap();
        b
    }

    fn poisoned(&mut self, dtype: DType, n: usize) -> Buf {
        self.put(dtype, &vec![f32::NAN; n])
    }

    /// Reads `b` after the communicator's work on it is done (`wait`, then the compute stream).
    fn get(&self, comm: &dyn Communicator, b: Buf) -> Vec<f32> {
        comm.wait().unwrap();
        let mut bytes = vec![0u8; b.bytes()];
        self.be.download(b, &mut bytes).unwrap();
        match b.dtype {
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
}

/// Rank r's n inputs, already representable in `dtype` (distinct per rank and index).
fn input(dtype: DType, r: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = ((r * 7919 + i * 104_729) % 1000) as f32 * 0.013 - 6.1;
            if dtype == DType::BF16 {
                bf16::from_f32(v).to_f32()
            } else {
                v
            }
        })
        .collect()
}

/// The element-wise reduction of `parts` in f32.
fn reduce(op: ReduceOp, parts: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        for (a, x) in acc.iter_mut().zip(p) {
            *a = match op {
                ReduceOp::Sum | ReduceOp::Avg => *a + x,
                ReduceOp::Max => a.max(*x),
                ReduceOp::Min => a.min(*x),
            };
        }
    }
    if op == ReduceOp::Avg {
        acc.iter_mut().for_each(|a| *a /= parts.len() as f32);
    }
    acc
}

/// Element-wise closeness: exact for Max/Min (no arithmetic), else relative to the magnitude of
/// the summands (NCCL sums in its own order; bf16 rounds at every hop).
fn assert_close(what: &str, dtype: DType, got: &[f32], want: &[f32], scale: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = if dtype == DType::BF16 { 2e-2 } else { 1e-5 } * scale.max(1.0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i} is {g}, expected {w} (tolerance {tol})"
        );
    }
}

const BOTH: [DType; 2] = [DType::F32, DType::BF16];
const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];
const SIZES: [usize; 4] = [1, 7, 1001, 65_537];

/// A world of one: rank 0 on GPU 0, bootstrapped by a one-thread local host communicator.
fn world1(dev: &Dev) -> NcclComm {
    let host = HostComm::local_world(1).pop().unwrap();
    NcclComm::new(&dev.be, &host, Duration::from_secs(60)).unwrap()
}

// ---- runs anywhere ------------------------------------------------------------------------------

/// Without NCCL on the library path (this build machine) the probe is a clean error saying how to
/// install it; with NCCL it is a 2.x version. Never a panic.
#[test]
fn nccl_probe_returns_version_or_error_never_panics() {
    let r = std::panic::catch_unwind(nccl_version).expect("nccl_version panicked");
    match r {
        Ok((major, minor, patch)) => {
            eprintln!("NCCL {major}.{minor}.{patch} loaded");
            assert!(major == 2 && minor >= 18, "NCCL {major}.{minor}.{patch}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("libnccl.so"), "unexpected error text: {msg}");
            eprintln!("no NCCL here, as expected: {msg}");
        }
    }
}

// ---- one GPU ----------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn world1_collectives_match_host() {
    with_deadline(120, || {
        let mut d = Dev::new(0);
        let c = world1(&d);
        assert_eq!(c.describe(), "rank 0 of 1 (nccl, cuda:0)");
        assert_eq!((c.rank(), c.size()), (0, 1));
        for dtype in BOTH {
            for n in SIZES {
                let x = input(dtype, 0, n);
                // A reduction over one rank is that rank's values, bit for bit.
                for op in OPS {
                    let b = d.put(dtype, &x);
                    c.all_reduce(b, op).unwrap();
                    assert_eq!(d.get(&c, b), x, "all_reduce {op:?} {dtype} n {n}");
                }
                let (s, g) = (d.put(dtype, &x), d.poisoned(dtype, n));
                c.all_gather(s, g).unwrap();
                assert_eq!(d.get(&c, g), x, "all_gather {dtype} n {n}");
                for op in [ReduceOp::Sum, ReduceOp::Max] {
                    let (s, o) = (d.put(dtype, &x), d.poisoned(dtype, n));
                    c.reduce_scatter(s, o, op).unwrap();
                    assert_eq!(d.get(&c, o), x, "reduce_scatter {op:?} {dtype} n {n}");
                }
                let b = d.put(dtype, &x);
                c.broadcast(b, 0).unwrap();
                assert_eq!(d.get(&c, b), x, "broadcast {dtype} n {n}");
                // To itself: only inside a group (outside, the send would wait for a recv
                // queued behind it on the same stream).
                let (s, r) = (d.put(dtype, &x), d.poisoned(dtype, n));
                c.group_start().unwrap();
                c.send(s, 0).unwrap();
                c.recv(r, 0).unwrap();
                c.group_end().unwrap();
                assert_eq!(d.get(&c, r), x, "send/recv to self {dtype} n {n}");
            }
        }
        c.barrier().unwrap();
    });
}

/// Compute-stream work before a collective is visible to it, and the collective's result is
/// visible to compute work after it, with no host wait in between: a fill on the compute stream,
/// an all-gather on the communication stream, a copy on the compute stream, then one download.
/// 64 MiB keeps each step long enough that a missing event wait shows as stale data.
#[test]
#[ignore = "needs a CUDA device"]
fn world1_orders_against_the_compute_stream() {
    with_deadline(120, || {
        let mut d = Dev::new(0);
        let c = world1(&d);
        let n = 1 << 24;
        let (src, mid, out) = (
            d.poisoned(DType::F32, n),
            d.poisoned(DType::F32, n),
            d.poisoned(DType::F32, n),
        );
        for round in 0..3 {
            let v = 1.5 + round as f32;
            d.be.fill(src, v).unwrap();
            c.all_gather(src, mid).unwrap();
            d.be.copy(mid, out).unwrap();
            let got = d.get(&c, out);
            let bad = got.iter().position(|x| *x != v);
            assert!(bad.is_none(), "round {round}: element {bad:?} is not {v}");
        }
    });
}

/// Wrong arguments are errors before anything reaches NCCL, and leave the communicator usable.
#[test]
#[ignore = "needs a CUDA device"]
fn world1_rejects_bad_arguments_and_stays_usable() {
    with_deadline(120, || {
        let mut d = Dev::new(0);
        let c = world1(&d);
        let x = d.put(DType::F32, &[1.0, 2.0, 3.0]);
        let small = d.poisoned(DType::F32, 2);
        let ints = Buf::new(x.ptr, 3, DType::I32);
        let err = |r: titan::Result<()>| r.unwrap_err().to_string();
        assert!(err(c.all_reduce(ints, ReduceOp::Sum)).contains("i32"));
        assert!(err(c.all_gather(x, small)).contains("all_gather"));
        assert!(err(c.reduce_scatter(x, small, ReduceOp::Sum)).contains("reduce_scatter"));
        assert!(err(c.broadcast(x, 1)).contains("root 1"));
        assert!(err(c.send(x, 0)).contains("inside group_start"));
        assert!(err(c.recv(x, 3)).contains("peer 3"));
        assert!(err(c.group_end()).contains("without group_start"));
        c.all_reduce(x, ReduceOp::Sum).unwrap();
        assert_eq!(d.get(&c, x), vec![1.0, 2.0, 3.0]);
    });
}

// ---- every GPU present ----------------------------------------------------------------------

/// Runs `body(rank, world)` on one thread per GPU, each with its own backend and communicator.
fn on_every_gpu(secs: u64, body: fn(&mut Dev, &NcclComm)) {
    let n = device_count();
    if n < 2 {
        eprintln!("{n} CUDA device(s): the multi-GPU NCCL test needs 2 or more; skipped");
        return;
    }
    with_deadline(secs, move || {
        let handles: Vec<_> = HostComm::local_world(n)
            .into_iter()
            .enumerate()
            .map(|(r, host)| {
                std::thread::spawn(move || {
                    let mut d = Dev::new(r);
                    let c = NcclComm::new(&d.be, &host, Duration::from_secs(60)).unwrap();
                    assert_eq!(c.describe(), format!("rank {r} of {n} (nccl, cuda:{r})"));
                    body(&mut d, &c);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn all_gpus_collectives_match_host() {
    on_every_gpu(300, |d, c| {
        let (r, size) = (c.rank(), c.size());
        for dtype in BOTH {
            for n in [1, 1001, 65_537] {
                let all: Vec<Vec<f32>> = (0..size).map(|q| input(dtype, q, n)).collect();
                let scale = size as f32 * 6.1;
                for op in OPS {
                    let b = d.put(dtype, &all[r]);
                    c.all_reduce(b, op).unwrap();
                    let what = format!("all_reduce {op:?} {dtype} n {n} rank {r}");
                    assert_close(&what, dtype, &d.get(c, b), &reduce(op, &all), scale);
                }
                let (s, g) = (d.put(dtype, &all[r]), d.poisoned(dtype, n * size));
                c.all_gather(s, g).unwrap();
                assert_eq!(
                    d.get(c, g),
                    all.concat(),
                    "all_gather {dtype} n {n} rank {r}"
                );
                // reduce_scatter: rank r gets slice r of the reduction of everyone's n * size.
                let wide: Vec<Vec<f32>> = (0..size).map(|q| input(dtype, q, n * size)).collect();
                for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                    let (s, o) = (d.put(dtype, &wide[r]), d.poisoned(dtype, n));
                    c.reduce_scatter(s, o, op).unwrap();
                    let want = reduce(op, &wide)[r * n..(r + 1) * n].to_vec();
                    let what = format!("reduce_scatter {op:?} {dtype} n {n} rank {r}");
                    assert_close(&what, dtype, &d.get(c, o), &want, scale);
                }
                let b = d.put(dtype, &all[r]);
                c.broadcast(b, size - 1).unwrap();
                assert_eq!(
                    d.get(c, b),
                    all[size - 1],
                    "broadcast {dtype} n {n} rank {r}"
                );
                // A ring exchange in one group: send to the next rank, receive from the previous.
                let (next, prev) = ((r + 1) % size, (r + size - 1) % size);
                let (s, o) = (d.put(dtype, &all[r]), d.poisoned(dtype, n));
                c.group_start().unwrap();
                c.send(s, next).unwrap();
                c.recv(o, prev).unwrap();
                c.group_end().unwrap();
                assert_eq!(
                    d.get(c, o),
                    all[prev],
                    "ring send/recv {dtype} n {n} rank {r}"
                );
            }
        }
        c.barrier().unwrap();
        // The first two ranks form a sub-group; the others do not call split.
        if r < 2 {
            let g = c.split(&[0, 1]).unwrap();
            assert_eq!((g.rank(), g.size()), (r, 2));
            let b = d.put(DType::F32, &[r as f32 + 1.0; 5]);
            g.all_reduce(b, ReduceOp::Sum).unwrap();
            assert_eq!(d.get(g.as_ref(), b), vec![3.0; 5], "sub-group all_reduce");
            g.barrier().unwrap();
        }
        c.barrier().unwrap();
    });
}

/// Rank 0 all-reduces while rank 1 never does: rank 0's wait fails within the timeout with an
/// error naming rank 0 and a dead or stuck peer, and every later call repeats it.
#[test]
#[ignore = "needs a CUDA device"]
fn all_gpus_missing_peer_is_an_error_within_the_timeout() {
    on_every_gpu(120, |d, c| {
        c.barrier().unwrap();
        c.set_timeout(Duration::from_secs(3));
        if c.rank() == 0 {
            let b = d.put(DType::F32, &[1.0; 64]);
            let t = std::time::Instant::now();
            c.all_reduce(b, ReduceOp::Sum).unwrap();
            let e = c.wait().unwrap_err().to_string();
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "took {:?}",
                t.elapsed()
            );
            assert!(
                e.contains("rank 0 of") && e.contains("dead or stuck"),
                "{e}"
            );
            let again = c.all_reduce(b, ReduceOp::Sum).unwrap_err().to_string();
            assert!(again.contains("aborted"), "{again}");
        }
        // Every rank's drop ends within its 3 s timeout (an abort when finalizing cannot finish).
    });
}
