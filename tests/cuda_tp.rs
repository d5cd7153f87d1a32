//! The tensor-parallel code path on one GPU: the debugmodel's TP plan applied with a tp group of
//! one NCCL rank, so every TP op (token all-gathers and reduce-scatters, the vocabulary-parallel
//! embedding, the loss over vocabulary shards, the partial-gradient all-reduce) runs through the
//! CUDA kernels and NCCL; the loss and gradients must match the CPU's within bf16 tolerance
//! (needs a CUDA device and NCCL: `scripts/install-cuda-toolchain.sh --nccl`). On the CPU, the
//! same one-rank group must reproduce the plain path.

mod train_common;

use std::time::Duration;
use titan::backend::{cpu::CpuBackend, Backend};
use titan::dist::{Communicator, HostComm};
use titan::parallel::tp::TensorParallel;
use titan::params::ParamStore;
use titan::tape::{Placement, Tape};
use titan::tensor::DType;
use titan::train::device::select_rank_backend;
use train_common::tmp;

/// (loss, the f32 gradients of every parameter) of one micro-batch of the debugmodel with the
/// TP plan on a tp group of one (`sp`: sequence parallel, `lp`: loss parallel), or without TP
/// when `comm` is None.
fn tp_step(
    be: &dyn Backend,
    comm: Option<Box<dyn Communicator>>,
    dtype: DType,
    (sp, lp): (bool, bool),
) -> (f32, Vec<Vec<f32>>) {
    let d = tmp("cuda-tp");
    // Degree 2 only makes the model folder declare its plan; the group below has one rank.
    let cfg = train_common::debug_config(
        &d,
        &[
            "--training.seq_len=64",
            "--parallelism.tensor_parallel_degree=2",
        ],
    )
    .unwrap();
    let spec = titan::registry().find("llama3").unwrap();
    let args = titan::model::resolve::run_args(spec, &cfg, Some(259)).unwrap();
    let (model, builder) = spec.build_for(args.as_ref(), &cfg).unwrap();
    assert!(!builder.tp_plan.is_empty());
    let tp = comm.map(|c| TensorParallel::new(c, builder.tp_dims(), sp, lp));
    let store = ParamStore::materialize_sharded(builder, be, dtype, None, tp).unwrap();
    model.init_weights(&store, be, 7).unwrap();
    let (b, s) = (2, 64);
    let tokens: Vec<i32> = (0..b * s).map(|i| (i * 37 % 259) as i32).collect();
    let labels: Vec<i32> = (0..b * s).map(|i| ((i * 37 + 11) % 259) as i32).collect();
    let mut t = Tape::new(be, &store, Placement::Owned);
    let x = t.input_i32(&tokens, [b, s]).unwrap();
    let y = t.input_i32(&labels, [b * s]).unwrap();
    let loss = spec
        .loss_of(model.as_ref(), &mut t, x, y, 1.0 / (b * s) as f32)
        .unwrap();
    t.backward(loss).unwrap();
    let l = t.to_vec_f32(loss).unwrap()[0];
    let grads = store
        .ids()
        .map(|id| store.read_f32(be, store.local_grad(id)).unwrap())
        .collect();
    (l, grads)
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn tp_ops_of_a_one_rank_group_equal_the_plain_path_on_the_cpu() {
    // What the CUDA test below relies on: a tp group of one runs the TP ops (collectives of one
    // rank, the shard kernels over the whole vocabulary) with the plain path's results.
    let cpu = CpuBackend::new();
    let (l0, g0) = tp_step(&cpu, None, DType::F32, (true, true));
    for modes in [(true, true), (false, true), (true, false)] {
        let host = HostComm::local_comms(1).into_iter().next();
        let (l, g) = tp_step(&cpu, host, DType::F32, modes);
        assert!(((l - l0) / l0).abs() < 1e-6, "{modes:?}: {l} vs {l0}");
        for (i, (a, b)) in g.iter().zip(&g0).enumerate() {
            assert!(
                rel(a, b) < 1e-5,
                "{modes:?}: parameter {i}: rel {:.2e}",
                rel(a, b)
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn tp_ops_on_cuda_with_nccl_match_the_cpu() {
    for modes in [(true, true), (false, false)] {
        let cpu = CpuBackend::new();
        let host = HostComm::local_comms(1).into_iter().next().unwrap();
        let (l_cpu, g_cpu) = tp_step(&cpu, Some(host), DType::F32, modes);
        let host = HostComm::local_comms(1).into_iter().next().unwrap();
        let (be, world) = select_rank_backend("cuda", Some(host), Duration::from_secs(60)).unwrap();
        let nccl = world.expect("a CUDA rank has an NCCL world");
        assert!(nccl.describe().contains("nccl"), "{}", nccl.describe());
        let (l_gpu, g_gpu) = tp_step(be.as_ref(), Some(nccl), DType::BF16, modes);
        println!("{modes:?}: loss cpu {l_cpu} cuda {l_gpu}");
        assert!(
            ((l_gpu - l_cpu) / l_cpu).abs() < 2e-2,
            "{modes:?}: {l_gpu} vs {l_cpu}"
        );
        for (i, (g, c)) in g_gpu.iter().zip(&g_cpu).enumerate() {
            let e = rel(g, c);
            assert!(e < 5e-2, "{modes:?}: parameter {i} gradient rel L2 {e:.3e}");
        }
    }
}
