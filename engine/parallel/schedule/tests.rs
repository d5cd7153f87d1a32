use super::*;
use std::collections::HashMap;

/// Per-stage costs: F = 1, B = 2, I = W = 1 (a backward costs two forwards, split evenly).
fn unit(a: &Action) -> f64 {
    match a {
        Action::Backward { .. } => 2.0,
        _ => 1.0,
    }
}

fn v_of(kind: Kind) -> &'static [usize] {
    if kind.interleaved() {
        &[2, 3, 4]
    } else {
        &[1]
    }
}

/// Every valid (kind, pp, v, m) of a small grid.
fn grid() -> Vec<Schedule> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        for pp in 1..=6 {
            for &v in v_of(kind) {
                for m in pp..=3 * pp + 1 {
                    if kind.interleaved() && m % pp != 0 {
                        continue;
                    }
                    out.push(Schedule::of(kind, pp, v, m).unwrap());
                }
            }
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn every_pass_once_on_its_rank_and_the_simulation_finishes() {
    for s in grid() {
        let ctx = format!(
            "{:?} pp {} v {} m {}",
            s.kind, s.pp, s.stages_per_rank, s.microbatches
        );
        // Counted here, independently of `Schedule::check`.
        let mut count: HashMap<(char, usize, usize), usize> = HashMap::new();
        assert_eq!(s.per_rank.len(), s.pp, "{ctx}");
        for (r, row) in s.per_rank.iter().enumerate() {
            for a in row {
                assert_eq!(a.stage() % s.pp, r, "{ctx}: {a} on rank {r}");
                *count
                    .entry((a.letter(), a.stage(), a.microbatch()))
                    .or_default() += 1;
            }
        }
        let passes: &[char] = if s.kind == Kind::InterleavedZeroBubble {
            &['F', 'I', 'W']
        } else {
            &['F', 'B']
        };
        for stage in 0..s.pp * s.stages_per_rank {
            for mb in 0..s.microbatches {
                for &p in passes {
                    assert_eq!(
                        count.remove(&(p, stage, mb)),
                        Some(1),
                        "{ctx}: {p}{mb} stage {stage}"
                    );
                }
            }
        }
        assert!(count.is_empty(), "{ctx}: extra actions {count:?}");
        let t = s
            .simulate(&unit, 0.5)
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let work: f64 = s.per_rank.iter().flatten().map(unit).sum();
        assert!(t.makespan * s.pp as f64 >= work - 1e-9, "{ctx}");
    }
}

/// GPipe and 1F1B: the bubble is (pp - 1) forward+backward slots of the m + pp - 1 a rank
/// spans, bubble fraction (pp - 1) / (m + pp - 1) (Huang et al. 2019; Narayanan et al. 2021).
#[test]
fn gpipe_and_1f1b_bubbles_match_the_formula() {
    for kind in [Kind::GPipe, Kind::OneFOneB] {
        for pp in 1..=8 {
            for m in pp..=3 * pp + 1 {
                let t = Schedule::of(kind, pp, 1, m)
                    .unwrap()
                    .simulate(&unit, 0.0)
                    .unwrap();
                let (p, m) = (pp as f64, m as f64);
                assert!(close(t.makespan, 3.0 * (m + p - 1.0)), "{kind:?} {pp} {m}");
                assert!(
                    close(t.bubble, (p - 1.0) / (m + p - 1.0)),
                    "{kind:?} {pp} {m}: {}",
                    t.bubble
                );
            }
        }
    }
}

/// Interleaving v stages per rank divides the bubble time by v (Narayanan et al. 2021, eq. 2):
/// in per-stage units a rank works 3 v m and idles 3 (pp - 1), fraction (pp-1) / (v m + pp-1).
#[test]
fn interleaving_divides_the_bubble_by_v() {
    for pp in 2..=6 {
        for v in 2..=4 {
            for m in (1..=3).map(|k| k * pp) {
                let t = Schedule::of(Kind::Interleaved1F1B, pp, v, m)
                    .unwrap()
                    .simulate(&unit, 0.0)
                    .unwrap();
                let (p, v, m) = (pp as f64, v as f64, m as f64);
                let want = (p - 1.0) / (v * m + p - 1.0);
                assert!(
                    close(t.bubble, want),
                    "pp {pp} v {v} m {m}: {} vs {want}",
                    t.bubble
                );
            }
        }
    }
}

/// Zero bubble: the weight-gradient halves fill the waits, so its bubble is below interleaved
/// 1F1B's at the same layout; and at most ZB-H1's (pp - 1)(F + I - W) idle per rank
/// (Qi et al. 2023, section 3), here in per-stage units.
#[test]
fn zero_bubble_beats_interleaved_1f1b() {
    for pp in 2..=6 {
        for v in 2..=4 {
            for m in (1..=3).map(|k| k * pp) {
                let sim = |kind| {
                    Schedule::of(kind, pp, v, m)
                        .unwrap()
                        .simulate(&unit, 0.0)
                        .unwrap()
                };
                let (zb, i1) = (sim(Kind::InterleavedZeroBubble), sim(Kind::Interleaved1F1B));
                assert!(
                    zb.bubble < i1.bubble,
                    "pp {pp} v {v} m {m}: {} vs {}",
                    zb.bubble,
                    i1.bubble
                );
                let (p, work) = (pp as f64, (3 * v * m) as f64);
                let bound = (p - 1.0) / (work + p - 1.0);
                assert!(
                    zb.bubble <= bound + 1e-9,
                    "pp {pp} v {v} m {m}: {} > {bound}",
                    zb.bubble
                );
            }
        }
    }
}

/// 1F1B holds at most pp - rank microbatches (its warm-up plus one); GPipe holds all m.
#[test]
fn one_f_one_b_bounds_in_flight_microbatches() {
    for pp in 1..=8 {
        for m in pp..=3 * pp {
            let f1b = Schedule::of(Kind::OneFOneB, pp, 1, m).unwrap();
            let gp = Schedule::of(Kind::GPipe, pp, 1, m).unwrap();
            for r in 0..pp {
                assert_eq!(f1b.peak_in_flight(r), pp - r, "pp {pp} m {m} rank {r}");
                assert_eq!(gp.peak_in_flight(r), m, "pp {pp} m {m} rank {r}");
            }
        }
    }
}

/// With a latency c per hop, GPipe's critical path crosses pp - 1 hops forward and pp - 1 back.
#[test]
fn p2p_latency_lies_on_the_critical_path() {
    for pp in 2..=5 {
        let m = 2 * pp;
        let t = Schedule::of(Kind::GPipe, pp, 1, m)
            .unwrap()
            .simulate(&unit, 0.25)
            .unwrap();
        let want = 3.0 * (m + pp - 1) as f64 + 2.0 * 0.25 * (pp - 1) as f64;
        assert!(close(t.makespan, want), "pp {pp}: {} vs {want}", t.makespan);
        // A dependency is respected: every forward starts after the previous stage's ended.
        for row in &t.per_rank {
            for s in row {
                if let Action::Forward { stage, microbatch } = s.action {
                    if stage > 0 {
                        let prev = t.per_rank[stage - 1]
                            .iter()
                            .find(|p| {
                                p.action
                                    == Action::Forward {
                                        stage: stage - 1,
                                        microbatch,
                                    }
                            })
                            .unwrap();
                        assert!(s.start >= prev.end + 0.25 - 1e-9);
                    }
                }
            }
        }
    }
}

#[test]
fn sends_and_recvs_pair_up() {
    for s in grid() {
        let mut sends: Vec<Transfer> = Vec::new();
        let mut recvs: Vec<Transfer> = Vec::new();
        for (r, row) in s.per_rank.iter().enumerate() {
            for a in row {
                if let Some(t) = s.send_after(a) {
                    assert_eq!(t.from_rank, r);
                    sends.push(t);
                }
                if let Some(t) = s.recv_before(a) {
                    assert_eq!(t.to_rank, r);
                    recvs.push(t);
                }
            }
        }
        let key = |t: &Transfer| (t.gradient, t.stage, t.microbatch, t.from_rank, t.to_rank);
        sends.sort_by_key(key);
        recvs.sort_by_key(key);
        assert_eq!(sends, recvs);
        // One activation and one gradient per stage boundary and microbatch; they cross ranks
        // when pp > 1, and stay on the rank when pp = 1.
        let boundaries = s.pp * s.stages_per_rank - 1;
        assert_eq!(sends.len(), 2 * boundaries * s.microbatches);
        assert!(sends
            .iter()
            .all(|t| (t.from_rank != t.to_rank) == (s.pp > 1)));
    }
}

#[test]
fn a_wrong_order_is_a_deadlock_error() {
    let mut s = Schedule::of(Kind::OneFOneB, 2, 1, 2).unwrap();
    // Rank 1 runs microbatch 1's backward before its forward of it.
    s.per_rank[1] = vec![
        Action::Forward {
            stage: 1,
            microbatch: 0,
        },
        Action::Backward {
            stage: 1,
            microbatch: 1,
        },
        Action::Forward {
            stage: 1,
            microbatch: 1,
        },
        Action::Backward {
            stage: 1,
            microbatch: 0,
        },
    ];
    let e = s.simulate(&unit, 0.0).unwrap_err().to_string();
    assert!(
        e.contains("deadlock") && e.contains("B of stage 1 microbatch 1"),
        "{e}"
    );
    // Two ranks waiting on each other: rank 0 wants a gradient rank 1 sends only after it
    // got a forward rank 0 sends only after that.
    let mut s = Schedule::of(Kind::GPipe, 2, 1, 2).unwrap();
    s.per_rank[0].swap(1, 2); // F0 B0 F1 B1: B0 needs rank 1's B0, which is after its F1.
    let e = s.simulate(&unit, 0.0).unwrap_err().to_string();
    assert!(e.contains("rank 0") && e.contains("rank 1"), "{e}");
    // A weight gradient listed before its input gradient.
    let mut s = Schedule::of(Kind::InterleavedZeroBubble, 2, 2, 2).unwrap();
    let w = s.per_rank[0]
        .iter()
        .position(|a| matches!(a, Action::BackwardWeight { .. }))
        .unwrap();
    let a = s.per_rank[0].remove(w);
    s.per_rank[0].insert(0, a);
    let e = s.simulate(&unit, 0.0).unwrap_err().to_string();
    assert!(
        e.contains(&format!("rank 0: {a} waits for I of stage")),
        "{e}"
    );
    // A missing or misplaced action is refused before simulating.
    let mut s = Schedule::of(Kind::GPipe, 2, 1, 2).unwrap();
    s.per_rank[1].pop();
    assert!(s.simulate(&unit, 0.0).is_err());
    let mut s = Schedule::of(Kind::GPipe, 2, 1, 2).unwrap();
    let a = s.per_rank[1].remove(0);
    s.per_rank[0].push(a);
    let e = s.check().unwrap_err().to_string();
    assert!(e.contains("lives on rank 1"), "{e}");
}

#[test]
fn bad_layouts_are_one_clear_error() {
    let err = |name, pp, v, m| Schedule::new(name, pp, v, m).unwrap_err().to_string();
    let e = err("ZBV", 4, 2, 8);
    assert!(
        e.contains("ZBV") && e.contains("InterleavedZeroBubble") && e.contains("GPipe"),
        "{e}"
    );
    let e = err("1f1b", 4, 1, 3);
    assert!(
        e.contains("3 microbatches") && e.contains("4 pipeline ranks"),
        "{e}"
    );
    let e = err("Interleaved1F1B", 4, 2, 6);
    assert!(e.contains("multiple of the 4"), "{e}");
    let e = err("InterleavedZeroBubble", 4, 1, 8);
    assert!(e.contains("at least 2"), "{e}");
    let e = err("GPipe", 4, 2, 8);
    assert!(e.contains("one stage per rank"), "{e}");
    assert!(Schedule::new("interleavedzerobubble", 4, 2, 8).is_ok());
    // The config accepts exactly the schedules built here.
    assert_eq!(Kind::ALL.map(Kind::name).as_slice(), PIPELINE_SCHEDULES);

    let mut p = Parallelism {
        pipeline_parallel_degree: 4,
        pipeline_parallel_microbatch_size: 4,
        ..Default::default()
    };
    let e = Schedule::for_config(&p, 8).unwrap_err().to_string();
    assert!(
        e.contains("2 microbatches") && e.contains("pipeline_parallel_microbatch_size 4"),
        "{e}"
    );
    p.pipeline_parallel_microbatch_size = 1;
    p.pipeline_parallel_schedule = "Interleaved1F1B".into();
    let s = Schedule::for_config(&p, 8).unwrap();
    assert_eq!((s.pp, s.stages_per_rank, s.microbatches), (4, 2, 8));
}

#[test]
fn ascii_puts_each_action_on_its_rank_row_at_its_time() {
    let s = Schedule::of(Kind::OneFOneB, 2, 1, 2).unwrap();
    let t = s.simulate(&unit, 0.0).unwrap();
    // Rank 0: F0 F1, wait for B0 (rank 1 runs F0 at 1, B0 over 2..4), B0 4..6, B1 7..9.
    // Rank 1: F0 at 1, B0 2..4, F1 4, B1 5..7.
    let text = t.ascii(1.0);
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0], "rank 0 | F0 F1 .  .  B0 -- .  B1 --");
    assert_eq!(rows[1], "rank 1 | .  F0 B0 -- F1 B1 -- .  .");
}

/// The docs' block for one schedule at pp 4, 8 microbatches (v 2 when interleaved): the
/// timeline and a line on its bubble and activation memory.
fn docs_block(kind: Kind) -> String {
    let v = if kind.interleaved() { 2 } else { 1 };
    let s = Schedule::of(kind, 4, v, 8).unwrap();
    let t = s.simulate(&unit, 0.0).unwrap();
    let list = |f: &dyn Fn(usize) -> usize| {
        (0..s.pp)
            .map(|r| f(r).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut line = format!(
        "{}: makespan {} units, bubble {:.1}%; peak in-flight (stage, microbatch) pairs per rank: {}",
        kind.name(),
        t.makespan,
        100.0 * t.bubble,
        list(&|r| s.peak_in_flight(r))
    );
    if kind == Kind::InterleavedZeroBubble {
        line += &format!(
            " (until their I: {})",
            list(&|r| s.peak_until_input_grad(r))
        );
    }
    format!("```\n{}```\n{line}\n", t.ascii(1.0))
}

/// Prints the docs' blocks: `cargo test --release -p titan-engine --lib print_docs -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn print_docs_timelines() {
    for kind in Kind::ALL {
        println!("{}", docs_block(kind));
    }
}

/// docs/PARALLELISM.md shows the renderer's output.
#[test]
fn the_docs_show_the_generated_timelines() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PARALLELISM.md");
    let doc = std::fs::read_to_string(path).unwrap();
    for kind in Kind::ALL {
        assert!(
            doc.contains(&docs_block(kind)),
            "{kind:?}'s block is stale in {path}"
        );
    }
}

/// Transfer latency costs interleaved 1F1B only in its fill and drain, never per microbatch:
/// its warm-up runs two slots per hop ahead (Megatron's), so every steady-state input has
/// arrived by the time it is needed. The latency's cost is then the same at any m.
#[test]
fn interleaved_warm_up_hides_latency_in_the_steady_state() {
    let c = 0.3;
    for pp in 2..=6 {
        for v in 2..=4 {
            let excess = |m: usize| {
                let t = Schedule::of(Kind::Interleaved1F1B, pp, v, m)
                    .unwrap()
                    .simulate(&unit, c)
                    .unwrap();
                t.makespan - 3.0 * (v * m + pp - 1) as f64
            };
            let (a, b) = (excess(2 * pp), excess(4 * pp));
            assert!(
                a > 0.0 && close(a, b),
                "pp {pp} v {v}: {a} at m {}, {b} at m {}",
                2 * pp,
                4 * pp
            );
        }
    }
}

#[test]
fn an_absurd_layout_is_an_error_not_an_allocation() {
    let e = Schedule::of(Kind::GPipe, 1 << 20, 1, 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(e.contains("actions"), "{e}");
    let p = Parallelism {
        pipeline_parallel_degree: i64::MAX / 2,
        ..Default::default()
    };
    assert!(Schedule::check_config(&p, i64::MAX).is_ok());
    assert!(Schedule::for_config(&p, i64::MAX).is_err());
}
