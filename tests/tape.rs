//! Tape, planner and activation checkpointing on the CPU reference backend.

use titan::backend::cpu::CpuBackend;
use titan::backend::Backend;
use titan::error::Error;
use titan::llama3::{infra::parallelize::apply_ac, model_spec, Llama3, Llama3Config};
use titan::parallel::ac::AcConfig;
use titan::params::{ParamStore, ParamStoreBuilder};
use titan::planner::Plan;
use titan::rng::Rng;
use titan::tape::{Placement, Tape};
use titan::tensor::DType;

fn tiny_config() -> Llama3Config {
    Llama3Config {
        dim: 48,
        n_layers: 3,
        n_heads: 6,
        n_kv_heads: Some(2),
        vocab_size: 37,
        multiple_of: 16,
        ffn_dim_multiplier: None,
        rope_theta: 10000.0,
        max_seq_len: 13,
        ..Llama3Config::default()
    }
}

fn build(be: &dyn Backend, ac: &str, opt: &str) -> (Llama3, ParamStore) {
    let mut b = ParamStoreBuilder::default();
    let mut model = Llama3::new(tiny_config(), &mut b).unwrap();
    apply_ac(&mut model, AcConfig::parse(ac, opt).unwrap());
    let store = ParamStore::materialize(b, be, DType::F32).unwrap();
    model.init_weights(&store, be, 3).unwrap();
    (model, store)
}

fn batch(seed: u64, b: usize, s: usize, vocab: usize) -> (Vec<i32>, Vec<i32>) {
    let mut r = Rng::new(seed);
    let toks: Vec<i32> = (0..b * (s + 1))
        .map(|_| r.below(vocab as u64) as i32)
        .collect();
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    for row in toks.chunks(s + 1) {
        inputs.extend_from_slice(&row[..s]);
        labels.extend_from_slice(&row[1..]);
    }
    (inputs, labels)
}

/// Loss and all parameter gradients for one micro-batch.
fn loss_and_grads(
    be: &dyn Backend,
    model: &Llama3,
    store: &ParamStore,
    placement: Placement,
) -> (f32, Vec<f32>, Plan) {
    let (b, s) = (2, 13);
    let (inputs, labels) = batch(11, b, s, 37);
    store.zero_grads(be).unwrap();
    let mut t = Tape::new(be, store, placement);
    let ti = t.input_i32(&inputs, [b, s]).unwrap();
    let tl = t.input_i32(&labels, [b * s]).unwrap();
    let loss = model_spec()
        .loss_of(model, &mut t, ti, tl, 1.0 / (b * s) as f32)
        .unwrap();
    t.backward(loss).unwrap();
    let l = t.to_vec_f32(loss).unwrap()[0];
    let plan = t.plan();
    let g = store.read_f32(be, store.flat_grad()).unwrap();
    (l, g, plan)
}

#[test]
fn planned_step_matches_owned_bitwise_and_allocates_nothing() {
    let be = CpuBackend::new();
    let (model, store) = build(&be, "none", "op");
    let (l0, g0, plan) = loss_and_grads(&be, &model, &store, Placement::Owned);
    plan.verify().unwrap();
    assert!(
        plan.peak < plan.unplanned,
        "planning must reuse memory: {} vs {}",
        plan.peak,
        plan.unplanned
    );
    let arena = be.alloc(plan.peak).unwrap();
    // Poison the arena so a planned buffer read before written would change the result.
    be.fill(
        titan::backend::Buf::new(arena.ptr(), plan.peak / 4, DType::F32),
        f32::NAN,
    )
    .unwrap();
    let before = be.alloc_count();
    for _ in 0..3 {
        let (l1, g1, _) = loss_and_grads(
            &be,
            &model,
            &store,
            Placement::Planned {
                base: arena.ptr(),
                plan: &plan,
            },
        );
        assert_eq!(l0.to_bits(), l1.to_bits());
        assert!(
            g0.iter().zip(&g1).all(|(a, b)| a.to_bits() == b.to_bits()),
            "planned grads differ"
        );
    }
    assert_eq!(be.alloc_count(), before, "planned steps must not allocate");
}

#[test]
fn activation_checkpointing_gives_identical_grads_and_lower_peak() {
    let be = CpuBackend::new();
    let (model, store) = build(&be, "none", "op");
    let (l0, g0, p0) = loss_and_grads(&be, &model, &store, Placement::Owned);
    for (mode, opt) in [("full", "op"), ("selective", "op"), ("selective", "2")] {
        let (m, st) = build(&be, mode, opt);
        let (l1, g1, p1) = loss_and_grads(&be, &m, &st, Placement::Owned);
        assert_eq!(l0.to_bits(), l1.to_bits(), "{mode}/{opt}");
        assert!(
            g0.iter().zip(&g1).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{mode}/{opt} grads differ"
        );
        p1.verify().unwrap();
        assert!(
            p1.peak < p0.peak,
            "{mode}/{opt}: AC peak {} must be below {}",
            p1.peak,
            p0.peak
        );
        // And the planned replay of the checkpointed step is exact too.
        let arena = be.alloc(p1.peak).unwrap();
        let (l2, g2, _) = loss_and_grads(
            &be,
            &m,
            &st,
            Placement::Planned {
                base: arena.ptr(),
                plan: &p1,
            },
        );
        assert_eq!(l0.to_bits(), l2.to_bits());
        assert!(g0.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    // Directional derivative of the loss along a random direction, central differences in f32
    // with a large step; the per-op f64 checks are in cpu_gradcheck.rs.
    let be = CpuBackend::new();
    let (model, store) = build(&be, "full", "op");
    let (_, g, _) = loss_and_grads(&be, &model, &store, Placement::Owned);
    let master = store.read_f32(&be, store.flat_master()).unwrap();
    let mut r = Rng::new(5);
    let dir: Vec<f32> = master
        .iter()
        .map(|&m| if m == 0.0 { 0.0 } else { r.normal() as f32 })
        .collect();
    let eval = |sign: f32, eps: f32| {
        let p: Vec<f32> = master
            .iter()
            .zip(&dir)
            .map(|(m, d)| m + sign * eps * d)
            .collect();
        be.upload(store.flat_master(), bytemuck::cast_slice(&p))
            .unwrap();
        let (l, _, _) = loss_and_grads(&be, &model, &store, Placement::Owned);
        l as f64 / 26.0
    };
    let eps = 1e-3;
    let fd = (eval(1.0, eps) - eval(-1.0, eps)) / (2.0 * eps as f64);
    let an: f64 = g.iter().zip(&dir).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rel = (fd - an).abs() / an.abs().max(1e-6);
    assert!(
        rel < 2e-2,
        "directional derivative: fd {fd} analytic {an} rel {rel}"
    );
}

#[test]
fn gradient_accumulation_over_micro_batches_matches_one_batch() {
    let be = CpuBackend::new();
    let (model, store) = build(&be, "none", "op");
    let (b, s) = (2, 13);
    let (inputs, labels) = batch(11, b, s, 37);
    let run = |parts: &[(usize, usize)]| {
        store.zero_grads(&be).unwrap();
        for &(start, n) in parts {
            let mut t = Tape::new(&be, &store, Placement::Owned);
            let ti = t
                .input_i32(&inputs[start * s..(start + n) * s], [n, s])
                .unwrap();
            let tl = t
                .input_i32(&labels[start * s..(start + n) * s], [n * s])
                .unwrap();
            let loss = model_spec()
                .loss_of(&model, &mut t, ti, tl, 1.0 / (b * s) as f32)
                .unwrap();
            t.backward(loss).unwrap();
        }
        store.read_f32(&be, store.flat_grad()).unwrap()
    };
    let whole = run(&[(0, 2)]);
    let split = run(&[(0, 1), (1, 1)]);
    let num: f64 = whole
        .iter()
        .zip(&split)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = whole.iter().map(|a| (*a as f64).powi(2)).sum();
    assert!(den > 0.0);
    assert!((num / den).sqrt() < 1e-5, "rel l2 {}", (num / den).sqrt());
}

#[test]
fn shape_and_dtype_errors_name_the_op_and_shapes() {
    let be = CpuBackend::new();
    let (_, store) = build(&be, "none", "op");
    let mut t = Tape::new(&be, &store, Placement::Owned);
    let x = t.input_f32(&[0.5; 5 * 7], [5, 7], false).unwrap();
    let w = t.input_f32(&[0.5; 3 * 8], [3, 8], false).unwrap();
    match t.linear(x, w) {
        Err(Error::Shape { op, msg }) => {
            assert_eq!(op, "linear");
            assert!(msg.contains("[5, 7]") && msg.contains("[3, 8]"), "{msg}");
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    let ids = t.input_i32(&[1, 2], [2]).unwrap();
    assert!(matches!(
        t.linear(ids, w),
        Err(Error::DType { op: "linear", .. })
    ));
    assert!(matches!(
        t.reshape(x, [4, 9]),
        Err(Error::Shape { op: "reshape", .. })
    ));
    let y = t.input_f32(&[0.5; 5 * 8], [5, 8], false).unwrap();
    assert!(matches!(t.add(x, y), Err(Error::Shape { op: "add", .. })));
}

/// Every parameter gradient of one micro-batch's backward, by name: the full backward, or
/// zero-bubble's split (input-gradient pass, then the deferred weight pass).
fn grads_by_name(be: &dyn Backend, ac: &str, tied: bool, split: bool) -> Vec<(String, Vec<f32>)> {
    let mut pb = ParamStoreBuilder::default();
    let config = Llama3Config {
        tie_embeddings: tied,
        ..tiny_config()
    };
    let mut model = Llama3::new(config, &mut pb).unwrap();
    apply_ac(&mut model, AcConfig::parse(ac, "op").unwrap());
    let store = ParamStore::materialize(pb, be, DType::F32).unwrap();
    model.init_weights(&store, be, 3).unwrap();
    let (b, s) = (2, 13);
    let (inputs, labels) = batch(11, b, s, 37);
    store.zero_grads(be).unwrap();
    let mut t = Tape::new(be, &store, Placement::Owned);
    let ti = t.input_i32(&inputs, [b, s]).unwrap();
    let tl = t.input_i32(&labels, [b * s]).unwrap();
    let loss = model_spec()
        .loss_of(&model, &mut t, ti, tl, 1.0 / (b * s) as f32)
        .unwrap();
    t.backward_from(loss, None, &[], split).unwrap();
    if split {
        // The input pass left every weight gradient to the weight pass.
        let g = store.read_f32(be, store.flat_grad()).unwrap();
        assert!(g.iter().all(|&x| x == 0.0), "weight gradients before W");
        t.backward_weights().unwrap();
    }
    let named = store.ids().map(|id| {
        let g = store.read_f32(be, store.grad(id)).unwrap();
        (store.name(id).to_string(), g)
    });
    named.collect()
}

/// Also with a tied embedding, whose gradient two deferred ops (the output projection's and the
/// embedding's) accumulate: the weight pass keeps the full backward's order.
#[test]
fn split_backward_gives_the_full_backwards_gradients_bitwise() {
    let be = CpuBackend::new();
    for (ac, tied) in [("none", false), ("full", false), ("none", true)] {
        let full = grads_by_name(&be, ac, tied, false);
        assert!(full.iter().all(|(_, g)| g.iter().any(|&x| x != 0.0)));
        assert_eq!(
            grads_by_name(&be, ac, tied, true),
            full,
            "AC {ac} tied {tied}"
        );
    }
}

/// The model split into two pipeline stages (blocks 0-1 with the embedding, block 2 with the
/// output), the hidden state and its gradient passed by hand between two tapes, gives the whole
/// model's loss and gradients: the stages draw the same initial weights and the seeded backward
/// returns the input's gradient.
#[test]
fn two_stage_chain_matches_the_whole_model() {
    use titan::parallel::pipeline::Stage;
    let be = CpuBackend::new();
    let (b, s) = (2, 13);
    let (inputs, labels) = batch(11, b, s, 37);
    let (model, store) = build(&be, "none", "op");
    let (whole_loss, whole, _) = loss_and_grads(&be, &model, &store, Placement::Owned);
    let spec = model_spec();
    let cfg = titan::train::config::JobConfig::from_toml_str("", "t.toml", &[]).unwrap();
    let stage = |layers, embedding, output| Stage {
        layers,
        embedding,
        output,
    };
    let mut stages = Vec::new();
    for st in [stage(0..2, true, false), stage(2..3, false, true)] {
        let (mut m, b) = spec.build_stages_for(&tiny_config(), &cfg, &[st]).unwrap();
        let st = ParamStore::materialize(b, &be, DType::F32).unwrap();
        m[0].init_weights(&st, &be, 3).unwrap();
        stages.push((m.remove(0), st));
    }
    let (first, last) = (&stages[0], &stages[1]);
    let mut t0 = Tape::new(&be, &first.1, Placement::Owned);
    let tokens = t0.input_i32(&inputs, [b, s]).unwrap();
    let h = first.0.forward(&mut t0, tokens).unwrap();
    assert_eq!(t0.dims(h), vec![b, s, 48]);
    let hidden = t0.to_vec_f32(h).unwrap();
    let device = |data: &[f32]| {
        let m = be.alloc(4 * data.len()).unwrap();
        be.upload(
            titan::backend::Buf::new(m.ptr(), data.len(), DType::F32),
            bytemuck::cast_slice(data),
        )
        .unwrap();
        m
    };
    let hm = device(&hidden);
    let mut t1 = Tape::new(&be, &last.1, Placement::Owned);
    let hb = titan::backend::Buf::new(hm.ptr(), hidden.len(), DType::F32);
    let x = t1.external_activation(hb, [b, s, 48], true).unwrap();
    let tl = t1.input_i32(&labels, [b * s]).unwrap();
    let loss = spec
        .loss_of(last.0.as_ref(), &mut t1, x, tl, 1.0 / (b * s) as f32)
        .unwrap();
    let dx = t1.backward_from(loss, None, &[x], false).unwrap()[0].expect("input gradient");
    assert_eq!(t1.to_vec_f32(loss).unwrap()[0], whole_loss);
    let dxm = device(&t1.to_vec_f32(dx).unwrap());
    let gb = titan::backend::Buf::new(dxm.ptr(), hidden.len(), DType::F32);
    let seed = t0.external_activation(gb, [b, s, 48], false).unwrap();
    let none = t0.backward_from(h, Some(seed), &[tokens], false).unwrap();
    assert_eq!(none, vec![None], "token ids take no gradient");
    let mut names = 0;
    for (_, st) in &stages {
        for id in st.ids() {
            let w = store.find(st.name(id)).unwrap();
            let got = st.read_f32(&be, st.grad(id)).unwrap();
            assert_eq!(
                got,
                store.read_f32(&be, store.grad(w)).unwrap(),
                "{}",
                st.name(id)
            );
            names += 1;
        }
    }
    assert_eq!(names, store.ids().count());
    assert!(whole.iter().any(|&g| g != 0.0));
}
