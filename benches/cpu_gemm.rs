//! CPU GEMM throughput through `Backend::gemm` (f32, and bf16 storage), on the shapes that
//! dominate CPU training: a square reference, the Llama projections and their weight gradients. Criterion reports
//! "elem/s" with one element = one FLOP, i.e. Gelem/s = GFLOP/s.
//! Run: `cargo bench --bench cpu_gemm` (compare with `benches/torch_matmul.py`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use titan::backend::cpu::CpuBackend;
use titan::backend::{Backend, Buf, DeviceMem, Gemm};
use titan::DType;

/// (name, M, N, K, a stored [K, M] (Aᵀ·B, a weight gradient), b stored [N, K] as a Linear weight)
const SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("square_1024", 1024, 1024, 1024, false, false),
    ("square_2048", 2048, 2048, 2048, false, false),
    ("debug_qkv_16384x768x256", 16384, 768, 256, false, true),
    ("debug_w1_16384x768x256_nn", 16384, 768, 256, false, false),
    // Weight gradients of the debugmodel at batch 8 × seq 256 (2048 tokens): w1 and wq.
    ("debug_dw1_768x256x2048_tn", 768, 256, 2048, true, false),
    ("debug_dwq_256x256x2048_tn", 256, 256, 2048, true, false),
    ("proj_4096x8192x2048", 4096, 8192, 2048, false, true),
];

fn buf(be: &CpuBackend, len: usize, dt: DType, seed: u32) -> (Box<dyn DeviceMem>, Buf) {
    let mem = be.alloc(len * dt.size()).unwrap();
    let b = Buf::new(mem.ptr(), len, dt);
    // Small deterministic values; any finite data gives the same speed.
    let vals: Vec<f32> = (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5
        })
        .collect();
    let f = be.alloc(len * 4).unwrap();
    let fb = Buf::new(f.ptr(), len, DType::F32);
    be.upload(fb, bytemuck_bytes(&vals)).unwrap();
    be.cast(fb, b).unwrap();
    (mem, b)
}

fn bytemuck_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern of the slice is valid to read as u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn bench_gemm(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut group = c.benchmark_group("cpu_gemm");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &(name, m, n, k, ta, tb) in SHAPES {
        let g = Gemm::new(m, n, k, ta, tb, 0.0);
        group.throughput(Throughput::Elements(g.flops() as u64));
        for dt in [DType::F32, DType::BF16] {
            if dt == DType::BF16 && m * n * k > 1 << 33 {
                continue; // the bf16 path only adds conversions; the big shape is slow enough
            }
            let (_a, a) = buf(&be, m * k, dt, 1);
            let (_b, b) = buf(&be, k * n, dt, 2);
            let (_c, cb) = buf(&be, m * n, DType::F32, 3);
            group.bench_with_input(BenchmarkId::new(name, dt.name()), &g, |bench, g| {
                bench.iter(|| be.gemm(g, a, b, cb).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_gemm);
criterion_main!(benches);
