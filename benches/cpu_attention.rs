//! CPU causal attention forward and backward through the `Backend` (f32). Throughput counts
//! causal FLOPs (forward: two GEMMs over the lower triangle; backward: five, i.e. 2.5×), so
//! Gelem/s = GFLOP/s. Run: `cargo bench --bench cpu_attention`.
//!
//! On a shared machine wall time mostly measures the other users. With `TITAN_CPU_TIME=1` the
//! bench instead prints, per shape, the minimum over 5 calls of the CPU time all threads spent
//! (from /proc/self/task/*/schedstat) divided by the thread count: what a quiet machine would
//! show as wall time. docs/PERFORMANCE.md's attention table was measured that way.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use titan::backend::cpu::CpuBackend;
use titan::backend::{AttnBwd, AttnFwd, AttnShape, Backend, Buf, DeviceMem};
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
    // The debugmodel at the short-sequence speed point: batch 8 × seq 256.
    (
        "debug_b8_s256_h16_d16",
        AttnShape {
            batch: 8,
            seq: 256,
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

/// One shape's inputs, outputs and gradients (the memory lives as long as the case).
struct Case {
    _mem: Vec<Box<dyn DeviceMem>>,
    s: AttnShape,
    scale: f32,
    /// q, k, v, out, lse, dout, dq, dk, dv
    b: [Buf; 9],
}

impl Case {
    fn new(be: &CpuBackend, s: AttnShape) -> Case {
        let lens = [
            s.q_len(),
            s.kv_len(),
            s.kv_len(),
            s.q_len(),
            s.lse_len(),
            s.q_len(),
            s.q_len(),
            s.kv_len(),
            s.kv_len(),
        ];
        let (mem, bufs): (Vec<_>, Vec<_>) = (1u32..)
            .zip(lens)
            .map(|(seed, len)| filled(be, len, seed))
            .unzip();
        Case {
            _mem: mem,
            s,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            b: bufs.try_into().unwrap(),
        }
    }
    fn fwd(&self, be: &CpuBackend) {
        let [q, k, v, out, lse, ..] = self.b;
        be.attention_fwd(&AttnFwd {
            q,
            k,
            v,
            out,
            lse,
            shape: self.s,
            scale: self.scale,
        })
        .unwrap()
    }
    fn bwd(&self, be: &CpuBackend) {
        let [q, k, v, out, lse, dout, dq, dk, dv] = self.b;
        be.attention_bwd(&AttnBwd {
            q,
            k,
            v,
            out,
            dout,
            lse,
            dq,
            dk,
            dv,
            shape: self.s,
            scale: self.scale,
        })
        .unwrap()
    }
}

fn bench_attention(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut group = c.benchmark_group("cpu_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for &(name, s) in SHAPES {
        let case = Case::new(&be, s);
        group.throughput(Throughput::Elements(s.fwd_flops() as u64));
        group.bench_function(BenchmarkId::new("fwd", name), |bench| {
            bench.iter(|| case.fwd(&be))
        });
        case.fwd(&be);
        group.throughput(Throughput::Elements((2.5 * s.fwd_flops()) as u64));
        group.bench_function(BenchmarkId::new("bwd", name), |bench| {
            bench.iter(|| case.bwd(&be))
        });
    }
    group.finish();
}

/// Nanoseconds of CPU time used so far by all threads of this process (Linux).
fn cpu_ns() -> Option<f64> {
    let mut t = 0f64;
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let s = std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
        t += s.split_whitespace().next()?.parse::<f64>().ok()?;
    }
    Some(t)
}

/// Minimum over `n` runs of (wall seconds, CPU seconds / threads).
fn min_times(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let threads = rayon::current_num_threads() as f64;
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    for _ in 0..n {
        let (c0, t0) = (cpu_ns().unwrap_or(0.0), std::time::Instant::now());
        f();
        wall = wall.min(t0.elapsed().as_secs_f64());
        cpu = cpu.min((cpu_ns().unwrap_or(0.0) - c0) / 1e9 / threads);
    }
    (wall, cpu)
}

fn cpu_time_report() {
    let be = CpuBackend::new();
    for &(name, s) in SHAPES {
        let case = Case::new(&be, s);
        let (fw, fc) = min_times(5, || case.fwd(&be));
        let (bw, bc) = min_times(5, || case.bwd(&be));
        let f = s.fwd_flops();
        println!(
            "{name}: fwd cpu {:.1} ms ({:.1} GFLOP/s), wall {:.1} ms | bwd cpu {:.1} ms ({:.1} GFLOP/s), wall {:.1} ms",
            fc * 1e3,
            f / fc / 1e9,
            fw * 1e3,
            bc * 1e3,
            2.5 * f / bc / 1e9,
            bw * 1e3
        );
    }
}

criterion_group!(benches, bench_attention);

fn main() {
    if std::env::var_os("TITAN_CPU_TIME").is_some() {
        cpu_time_report();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
