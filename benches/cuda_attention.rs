//! Causal flash attention on the CUDA backend: forward and backward TFLOP/s.
//!
//! FLOPs follow the FlashAttention convention: forward 4·b·h·s²·d / 2 (two GEMMs over the lower
//! triangle), backward 2.5x that (its five GEMMs; the deterministic scheme here actually does
//! seven, recomputing S and dP in the dQ kernel). Criterion's "elem/s" is FLOP/s; one summary line
//! per case prints TFLOP/s from CUDA-event timing. `cargo bench --features cuda --bench cuda_attention`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use titan::backend::cuda::CudaBackend;
use titan::backend::{AttnBwd, AttnFwd, AttnShape, Backend, Buf, DeviceMem};
use titan::tensor::DType;

struct Dev {
    _mem: Box<dyn DeviceMem>,
    buf: Buf,
}

/// Random bf16 in [-2, 2) (never zeros: they time faster than real data).
fn random(be: &CudaBackend, len: usize, seed: u64) -> Dev {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let host: Vec<bf16> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16::from_f32((x >> 40) as f32 / (1u64 << 22) as f32 - 2.0)
        })
        .collect();
    let mem = be.alloc(len * 2).expect("alloc");
    let buf = Buf::new(mem.ptr(), len, DType::BF16);
    be.upload(buf, bytemuck::cast_slice(&host)).expect("upload");
    Dev { _mem: mem, buf }
}

fn zeros_f32(be: &CudaBackend, len: usize) -> Dev {
    let mem = be.alloc(len * 4).expect("alloc");
    let buf = Buf::new(mem.ptr(), len, DType::F32);
    be.fill(buf, 0.0).expect("fill");
    Dev { _mem: mem, buf }
}

fn attention(c: &mut Criterion) {
    let be = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cuda_attention bench needs a CUDA device: {e}");
            std::process::exit(1);
        }
    };
    println!("device: {}", be.device_name());
    // (head_dim, n_heads, n_kv_heads): 8B-class MHA-shaped, 1B-class, and 8B's 32:8 grouping.
    for (d, h, hkv) in [(128, 16, 16), (64, 32, 32), (128, 32, 8)] {
        let s = AttnShape {
            batch: 4,
            seq: 4096,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
        };
        let (q, k, v, dout) = (
            random(&be, s.q_len(), 1),
            random(&be, s.kv_len(), 2),
            random(&be, s.kv_len(), 3),
            random(&be, s.q_len(), 4),
        );
        let (out, dq, dk, dv) = (
            random(&be, s.q_len(), 5),
            random(&be, s.q_len(), 6),
            random(&be, s.kv_len(), 7),
            random(&be, s.kv_len(), 8),
        );
        let lse = zeros_f32(&be, s.lse_len());
        let scale = 1.0 / (d as f32).sqrt();
        let fwd_args = AttnFwd {
            q: q.buf,
            k: k.buf,
            v: v.buf,
            out: out.buf,
            lse: lse.buf,
            shape: s,
            scale,
        };
        let bwd_args = AttnBwd {
            q: q.buf,
            k: k.buf,
            v: v.buf,
            out: out.buf,
            dout: dout.buf,
            lse: lse.buf,
            dq: dq.buf,
            dk: dk.buf,
            dv: dv.buf,
            shape: s,
            scale,
        };
        let fwd = || be.attention_fwd(&fwd_args);
        let bwd = || be.attention_bwd(&bwd_args);
        fwd().expect("attention_fwd");
        let flops = s.fwd_flops();
        let (tf, tb) = (
            be.time_ms(3, 20, fwd).expect("time fwd"),
            be.time_ms(3, 20, bwd).expect("time bwd"),
        );
        println!(
            "attention b4 s4096 h{h}/{hkv} d{d}: fwd {tf:.3} ms {:.1} TFLOP/s | bwd {tb:.3} ms {:.1} TFLOP/s",
            flops / tf / 1e9,
            2.5 * flops / tb / 1e9
        );

        let mut g = c.benchmark_group(format!("attention_b4_s4096_h{h}_kv{hkv}_d{d}"));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(300));
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function("fwd", |bch| {
            bch.iter_custom(|n| {
                Duration::from_secs_f64(
                    be.time_ms(0, n as usize, fwd).expect("fwd") * 1e-3 * n as f64,
                )
            })
        });
        g.throughput(Throughput::Elements((2.5 * flops) as u64));
        g.bench_function("bwd", |bch| {
            bch.iter_custom(|n| {
                Duration::from_secs_f64(
                    be.time_ms(0, n as usize, bwd).expect("bwd") * 1e-3 * n as f64,
                )
            })
        });
        g.finish();
    }
}

criterion_group!(benches, attention);
criterion_main!(benches);
