//! The host communicators (`local`: ranks as threads; `tcp`: real sockets on loopback) against a
//! sequential reference: every collective at odd sizes, f32 and bf16, sub-groups, and the
//! failure cases (a rank that dies, a rank that never arrives) as errors naming the rank. Every
//! test runs under its own deadline.

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};
use titan::backend::Buf;
use titan::dist::tcp::{Rendezvous, TcpTransport};
use titan::dist::{Communicator, HostComm, ReduceOp};
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
        Err(_) => {
            if h.is_finished() {
                // The body panicked: surface its message.
                h.join().unwrap();
            }
            panic!("test did not finish within {secs} s");
        }
    }
}

fn buf(v: &mut [f32]) -> Buf {
    Buf::new(v.as_mut_ptr() as u64, v.len(), DType::F32)
}

/// Rank r's input of n values (distinct per rank and index, inexact in binary).
fn input(r: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((r * 7919 + i * 104_729) % 1000) as f32 * 0.013 - 6.1)
        .collect()
}

/// Every collective on `comms` (one per rank, run on threads), checked against a sequential
/// reduction in rank order.
fn exercise(comms: Vec<Box<dyn Communicator>>) {
    let size = comms.len();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let r = c.rank();
                for n in [1usize, 7, 1000, 4099] {
                    // all_reduce sum / avg / max, compared with the rank-order reference.
                    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                        let mut x = input(r, n);
                        c.all_reduce(buf(&mut x), op).unwrap();
                        for (i, got) in x.iter().enumerate() {
                            let mut acc = input(0, n)[i];
                            for q in 1..size {
                                let v = input(q, n)[i];
                                acc = if op == ReduceOp::Max {
                                    acc.max(v)
                                } else {
                                    acc + v
                                };
                            }
                            if op == ReduceOp::Avg {
                                acc *= 1.0 / size as f32;
                            }
                            assert_eq!(*got, acc, "all_reduce {op:?} n {n} i {i} rank {r}");
                        }
                    }
                    // all_gather: rank order.
                    let mut s = input(r, n);
                    let mut g = vec![f32::NAN; n * size];
                    c.all_gather(buf(&mut s), buf(&mut g)).unwrap();
                    for q in 0..size {
                        assert_eq!(&g[q * n..(q + 1) * n], &input(q, n)[..], "all_gather");
                    }
                    // reduce_scatter: my slice of the sum.
                    let mut s = input(r, n * size);
                    let mut out = vec![f32::NAN; n];
                    c.reduce_scatter(buf(&mut s), buf(&mut out), ReduceOp::Sum)
                        .unwrap();
                    for (i, got) in out.iter().enumerate() {
                        let mut acc = input(0, n * size)[r * n + i];
                        for q in 1..size {
                            acc += input(q, n * size)[r * n + i];
                        }
                        assert_eq!(*got, acc, "reduce_scatter");
                    }
                    // broadcast from the last rank.
                    let mut b = input(r, n);
                    c.broadcast(buf(&mut b), size - 1).unwrap();
                    assert_eq!(b, input(size - 1, n), "broadcast");
                }
                // bf16: reduced in f32, rounded once.
                let vals: Vec<half::bf16> = (0..33)
                    .map(|i| half::bf16::from_f32(0.1 * (i + r) as f32))
                    .collect();
                let mut x = vals.clone();
                let b = Buf::new(x.as_mut_ptr() as u64, x.len(), DType::BF16);
                c.all_reduce(b, ReduceOp::Sum).unwrap();
                for (i, v) in x.iter().enumerate() {
                    let want: f32 = (0..size)
                        .map(|q| half::bf16::from_f32(0.1 * (i + q) as f32).to_f32())
                        .sum();
                    assert_eq!(*v, half::bf16::from_f32(want), "bf16 all_reduce");
                }
                // send / recv around a ring (every rank sends first: sends never wait).
                if size > 1 {
                    let mut out = input(r, 17);
                    let mut got = vec![f32::NAN; 17];
                    let (next, prev) = ((r + 1) % size, (r + size - 1) % size);
                    c.send(buf(&mut out), next).unwrap();
                    c.recv(buf(&mut got), prev).unwrap();
                    assert_eq!(got, input(prev, 17), "ring send/recv");
                }
                // Sends to oneself (a pipeline with every stage on one rank), as under NCCL:
                // only inside a group, received in the order sent, of the size sent.
                let (mut a, mut b) = (input(r, 9), input(r + size, 9));
                let e = c.send(buf(&mut a), r).unwrap_err().to_string();
                assert!(e.contains("only send to itself inside group_start"), "{e}");
                c.group_start().unwrap();
                c.send(buf(&mut a), r).unwrap();
                c.send(buf(&mut b), r).unwrap();
                let (mut x, mut y) = (vec![f32::NAN; 9], vec![f32::NAN; 9]);
                c.recv(buf(&mut x), r).unwrap();
                c.recv(buf(&mut y), r).unwrap();
                c.send(buf(&mut a), r).unwrap();
                let mut short = vec![f32::NAN; 8];
                let e = c.recv(buf(&mut short), r).unwrap_err().to_string();
                assert!(
                    e.contains("recv of 32 bytes from itself, which sent 36"),
                    "{e}"
                );
                c.group_end().unwrap();
                assert_eq!((x, y), (a.clone(), b.clone()), "send / recv to oneself");
                let e = c.group_end().unwrap_err().to_string();
                assert!(e.contains("group_end without group_start"), "{e}");
                c.barrier().unwrap();
                // A sub-group of the even ranks reduces among itself only.
                let evens: Vec<usize> = (0..size).filter(|q| q % 2 == 0).collect();
                if r % 2 == 0 {
                    let g = c.split(&evens).unwrap();
                    assert_eq!((g.rank(), g.size()), (r / 2, evens.len()));
                    let mut x = vec![r as f32 + 1.0; 5];
                    g.all_reduce(buf(&mut x), ReduceOp::Sum).unwrap();
                    let want: f32 = evens.iter().map(|&q| q as f32 + 1.0).sum();
                    assert_eq!(x, vec![want; 5], "sub-group all_reduce");
                }
                c.barrier().unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn local(n: usize) -> Vec<Box<dyn Communicator>> {
    HostComm::local_world(n)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect()
}

/// A free loopback port (bound then released; tests each take their own).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` tcp ranks of one world on loopback, connected concurrently (as separate processes would).
fn tcp(n: usize, timeout: Duration) -> Vec<Box<dyn Communicator>> {
    let port = free_port();
    let hs: Vec<_> = (0..n)
        .map(|rank| {
            std::thread::spawn(move || {
                let r = Rendezvous {
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    rank,
                    world: n,
                    node: rank,
                    timeout,
                };
                let c = HostComm::world(Arc::new(TcpTransport::connect(&r).unwrap()));
                Box::new(c) as Box<dyn Communicator>
            })
        })
        .collect();
    let mut comms: Vec<Box<dyn Communicator>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    comms.sort_by_key(|c| c.rank());
    comms
}

#[test]
fn local_collectives_match_the_reference() {
    with_deadline(60, || {
        exercise(local(3));
        exercise(local(4));
        exercise(local(1));
    });
}

#[test]
fn tcp_collectives_match_the_reference() {
    with_deadline(60, || {
        exercise(tcp(3, Duration::from_secs(20)));
        exercise(tcp(2, Duration::from_secs(20)));
    });
}

/// Rank 1 leaves (its communicator is dropped) while rank 0 waits in an all-reduce: rank 0 gets
/// an error naming rank 1 at once, long before its timeout.
fn lost_rank_is_named(mut comms: Vec<Box<dyn Communicator>>) -> String {
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    c0.set_timeout(Duration::from_secs(30));
    let t = Instant::now();
    let h = std::thread::spawn(move || {
        let mut x = vec![1.0f32; 64];
        c0.all_reduce(buf(&mut x), ReduceOp::Sum)
            .unwrap_err()
            .to_string()
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(c1);
    let e = h.join().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    e
}

#[test]
fn a_lost_rank_is_an_error_naming_it() {
    with_deadline(60, || {
        let e = lost_rank_is_named(local(2));
        assert!(e.contains("lost rank 1"), "{e}");
        let e = lost_rank_is_named(tcp(2, Duration::from_secs(20)));
        assert!(
            e.contains("lost rank 1 (node 1") && e.contains("closed"),
            "{e}"
        );
    });
}

#[test]
fn a_rank_that_never_arrives_times_out_naming_it() {
    with_deadline(60, || {
        let comms = local(3);
        comms[0].set_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let mut x = vec![1.0f32; 8];
        // Ranks 1 and 2 are alive but never call the collective.
        let e = comms[0]
            .all_reduce(buf(&mut x), ReduceOp::Sum)
            .unwrap_err()
            .to_string();
        assert!(e.contains("timed out waiting for rank 1"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        let mut g = vec![0.0f32; 3];
        let e = comms[0]
            .all_gather(buf(&mut x), buf(&mut g))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be 3 x the send buffer"), "{e}");
    });
}

#[test]
fn tcp_rendezvous_errors() {
    with_deadline(60, || {
        // Nobody serves the store: rank 1 gives up at the init timeout naming rank 0.
        let r = Rendezvous {
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
            rank: 1,
            world: 2,
            node: 1,
            timeout: Duration::from_millis(500),
        };
        let e = TcpTransport::connect(&r).err().unwrap().to_string();
        assert!(e.contains("rendezvous store (rank 0)"), "{e}");
        // Rank 0 alone in a world of 2: times out naming the missing rank.
        let r = Rendezvous {
            rank: 0,
            node: 0,
            master_port: free_port(),
            ..r
        };
        let e = TcpTransport::connect(&r).err().unwrap().to_string();
        assert!(e.contains("ranks [1]"), "{e}");
    });
}
