//! CPU twins of `cuda_kernels.rs`: the memory-bound ops in GB/s (compulsory bytes: each input
//! read once, each output written once) next to a copy baseline measured in the same run, at
//! the Llama 3 debugmodel's step sizes (batch 8 × seq 256: 2048 tokens, dim 256, FFN 768, vocab
//! 2048) in f32, the CPU's compute dtype. Those buffers (2-6 MB) sit between L2 and L3, as in
//! training; a second copy baseline at 64 MiB shows the DRAM-side rate.
//!
//! Run: `cargo bench --bench cpu_kernels` (threads: RAYON_NUM_THREADS); a final `SUMMARY`
//! table with GB/s and % of the first copy baseline is printed to stdout.

use criterion::{Criterion, Throughput};
use std::time::Instant;
use titan::backend::cpu::CpuBackend;
use titan::backend::RopeShape;
use titan::DType;

#[path = "common/kernels.rs"]
mod kernels;
use kernels::{memory_bound, ok, Bench, Mem, Sizes};

fn benches(mem: &mut Mem) -> Vec<Bench<'static>> {
    let mut v = Vec::new();
    // Copy baselines: `Backend::copy` (f32) at the elementwise size, then at 64 MiB.
    for (n, what) in [(2048 * 768, "6 MiB"), (1 << 24, "64 MiB")] {
        let (src, dst) = (mem.buf(n, DType::F32, 1.0), mem.buf(n, DType::F32, 0.0));
        v.push(Bench::new(
            &format!("copy f32 {what}"),
            8 * n as u64,
            0.0,
            Box::new(move |b| ok(b.copy(src, dst), "copy")),
        ));
    }
    let sizes = Sizes {
        n: 2048 * 768,
        rows: 2048,
        dim: 256,
        rope: RopeShape {
            batch: 8,
            seq: 256,
            heads: 16,
            head_dim: 16,
        },
        vocab: 2048,
        ce_rows: 2048,
        params: 6 << 20,
    };
    v.extend(memory_bound(mem, &sizes, DType::F32).0);
    v
}

fn main() {
    let be = CpuBackend::new();
    let mut mem = Mem {
        be: &be,
        keep: Vec::new(),
    };
    let list = benches(&mut mem);
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
        .configure_from_args();
    for bench in &list {
        let mut group = c.benchmark_group("cpu");
        group.throughput(Throughput::Bytes(bench.bytes));
        group.bench_function(&bench.name, |b| b.iter(|| (bench.run)(&be)));
        group.finish();
    }
    c.final_summary();

    // A compact table (medians of 9 timed calls after 2 warm-up calls) for logs and reports.
    println!("SUMMARY cpu threads={}", rayon::current_num_threads());
    let mut copy_gbs = 0.0;
    for bench in &list {
        for _ in 0..2 {
            (bench.run)(&be);
        }
        let mut t: Vec<f64> = (0..9)
            .map(|_| {
                let t0 = Instant::now();
                (bench.run)(&be);
                t0.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        let s = t[4];
        let gbs = bench.bytes as f64 / s / 1e9;
        if copy_gbs == 0.0 {
            copy_gbs = gbs;
        }
        println!(
            "SUMMARY {:<44} {:>9.3} ms {:>8.1} GB/s {:>5.1}% of copy",
            bench.name,
            s * 1e3,
            gbs,
            100.0 * gbs / copy_gbs
        );
    }
}
