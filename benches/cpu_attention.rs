//! CPU causal attention forward and backward through the `Backend` (f32). Throughput counts
//! causal FLOPs (forward: two GEMMs over the lower triangle; backward: five, i.e. 2.5×), so
//! Gelem/s = GFLOP/s. Run: `cargo bench --bench cpu_attention`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use titan::backend::cpu::CpuBackend;
use titan::backend::{AttnShape, Backend, Buf, DeviceMem};
use titan::DType;

const SHAPES: &[(&str, AttnShape)] = &[
    // Llama 3 debugmodel (dim 256, 16 heads), one sequence of 2048.
    (
        "debug_b1_s2048_h16_d16",
        AttnShape {
            batch: 1,
            seq: 2048,
            n_heads: 16,
            n_kv_heads: 16,
            head_dim: 16,
        },
    ),
    // Llama 3 8B head geometry (32 heads, 8 kv heads, head_dim 128), seq 1024.
    (
        "8b_b1_s1024_h32kv8_d128",
        AttnShape {
            batch: 1,
            seq: 1024,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
        },
    ),
];

fn filled(be: &CpuBackend, len: usize, seed: u32) -> (Box<dyn DeviceMem>, Buf) {
    let mem = be.alloc(len * 4).unwrap();
    let b = Buf::new(mem.ptr(), len, DType::F32);
    let vals: Vec<u8> = (0..len)
        .flat_map(|i| {
            let x = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32
                / 2048.0
                - 1.0;
            x.to_le_bytes()
        })
        .collect();
    be.upload(b, &vals).unwrap();
    (mem, b)
}

fn bench_attention(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut group = c.benchmark_group("cpu_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for &(name, s) in SHAPES {
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (_q, q) = filled(&be, s.q_len(), 1);
        let (_k, k) = filled(&be, s.kv_len(), 2);
        let (_v, v) = filled(&be, s.kv_len(), 3);
        let (_o, o) = filled(&be, s.q_len(), 4);
        let (_l, l) = filled(&be, s.lse_len(), 5);
        let (_g, g) = filled(&be, s.q_len(), 6);
        let (_dq, dq) = filled(&be, s.q_len(), 7);
        let (_dk, dk) = filled(&be, s.kv_len(), 8);
        let (_dv, dv) = filled(&be, s.kv_len(), 9);
        group.throughput(Throughput::Elements(s.fwd_flops() as u64));
        group.bench_with_input(BenchmarkId::new("fwd", name), &s, |bench, &s| {
            bench.iter(|| be.attention_fwd(q, k, v, o, l, s, scale).unwrap())
        });
        be.attention_fwd(q, k, v, o, l, s, scale).unwrap();
        group.throughput(Throughput::Elements((2.5 * s.fwd_flops()) as u64));
        group.bench_with_input(BenchmarkId::new("bwd", name), &s, |bench, &s| {
            bench.iter(|| {
                be.attention_bwd(q, k, v, o, g, l, dq, dk, dv, s, scale)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
