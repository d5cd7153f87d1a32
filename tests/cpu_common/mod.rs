//! Helpers shared by the CPU backend tests: a seeded generator, host buffers that are poisoned
//! before an op writes them, f64 read-back and the relative-L2 comparison.
#![allow(dead_code)]

use half::bf16;
use titan::backend::cpu::CpuBackend;
use titan::backend::{Backend, Buf, DeviceMem};
use titan::{DType, Error};

/// xorshift64*: tiny, seeded, good enough for test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1), rounded to an f32 value so f32 storage is exact.
    pub fn uniform(&mut self) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (2.0 * u - 1.0) as f32 as f64
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|_| (self.uniform() * scale) as f32 as f64)
            .collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A buffer with its owning allocation.
pub struct Tensor {
    _mem: Box<dyn DeviceMem>,
    pub buf: Buf,
}

pub fn encode(data: &[f64], dt: DType) -> Vec<u8> {
    match dt {
        DType::F32 => data
            .iter()
            .flat_map(|&x| (x as f32).to_le_bytes())
            .collect(),
        DType::BF16 => data
            .iter()
            .flat_map(|&x| bf16::from_f64(x).to_le_bytes())
            .collect(),
        DType::I32 => data
            .iter()
            .flat_map(|&x| (x as i32).to_le_bytes())
            .collect(),
    }
}

pub fn upload(be: &CpuBackend, data: &[f64], dt: DType) -> Tensor {
    let mem = be.alloc(data.len() * dt.size()).expect("alloc");
    let buf = Buf::new(mem.ptr(), data.len(), dt);
    be.upload(buf, &encode(data, dt)).expect("upload");
    Tensor { _mem: mem, buf }
}

pub fn upload_i32(be: &CpuBackend, data: &[i32]) -> Tensor {
    let d: Vec<f64> = data.iter().map(|&x| x as f64).collect();
    upload(be, &d, DType::I32)
}

/// An output buffer full of NaN (i32::MIN for ids), so any element the op forgets shows up.
pub fn poisoned(be: &CpuBackend, len: usize, dt: DType) -> Tensor {
    let fill = if dt == DType::I32 {
        i32::MIN as f64
    } else {
        f64::NAN
    };
    upload(be, &vec![fill; len], dt)
}

pub fn download(be: &CpuBackend, b: Buf) -> Vec<f64> {
    let mut raw = vec![0u8; b.bytes()];
    be.download(b, &mut raw).expect("download");
    match b.dtype {
        DType::F32 => raw
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DType::BF16 => raw
            .chunks(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::I32 => raw
            .chunks(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
    }
}

/// ‖got − want‖ / ‖want‖ (absolute when want is all zero); panics on NaN or length mismatch.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "non-finite value in result"
    );
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Tolerance for a result stored in `dt`: f32 must match to 1e-5, bf16 to 1e-2.
pub fn tol(dt: DType) -> f64 {
    if dt == DType::BF16 {
        1e-2
    } else {
        1e-5
    }
}

pub fn check(what: &str, dt: DType, got: &[f64], want: &[f64]) {
    let e = rel_l2(got, want);
    assert!(
        e < tol(dt),
        "{what} ({dt}): relative L2 error {e:e} >= {:e}",
        tol(dt)
    );
    if dt == DType::BF16 && want.iter().any(|&x| x != 0.0) {
        // The rounding must actually have happened: a bf16 result can't be f32-exact.
        assert!(
            e > 1e-5,
            "{what} (bf16): error {e:e} suspiciously small, was bf16 storage used?"
        );
    }
}

/// `n` split into `k` contiguous ranges of sizes differing by at most one (the first ones larger).
pub fn split(n: usize, k: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..k {
        let len = n / k + usize::from(i < n % k);
        out.push((start, start + len));
        start += len;
    }
    out
}

pub fn is_shape(r: titan::Result<()>, op: &str) -> bool {
    matches!(r, Err(Error::Shape { op: o, .. }) if o == op)
}

pub fn is_dtype(r: titan::Result<()>, op: &str) -> bool {
    matches!(r, Err(Error::DType { op: o, .. }) if o == op)
}

pub fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}
