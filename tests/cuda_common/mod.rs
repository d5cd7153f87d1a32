//! The CUDA-vs-CPU harness shared by the device op tests: one tensor on both backends, inputs
//! rounded identically, outputs poisoned with NaN on both, relative-L2 comparison.
#![allow(dead_code)]

use half::bf16;
use titan::backend::cpu::CpuBackend;
use titan::backend::cuda::CudaBackend;
use titan::backend::{Backend, Buf, DeviceMem};
use titan::DType;

// ---- harness ---------------------------------------------------------------------------------

pub struct Pair {
    pub gpu: CudaBackend,
    pub cpu: CpuBackend,
    pub keep: Vec<Box<dyn DeviceMem>>,
}

/// The same tensor on both backends.
#[derive(Clone, Copy)]
pub struct T2 {
    pub g: Buf,
    pub c: Buf,
}

impl T2 {
    /// One side of the pair, for filling an op's parameter struct per backend
    /// (`args(T2::gpu)`, `args(T2::cpu)`).
    pub fn gpu(self) -> Buf {
        self.g
    }
    pub fn cpu(self) -> Buf {
        self.c
    }
}

pub fn gpu() -> CudaBackend {
    match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => panic!("this test needs a CUDA device: {e}"),
    }
}

pub fn pair() -> Pair {
    Pair {
        gpu: gpu(),
        cpu: CpuBackend::new(),
        keep: Vec::new(),
    }
}

/// Small deterministic PRNG (xorshift64*), so failures reproduce.
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
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Zero-mean, standard deviation `scale` (uniform: cheap for the 10^7-element inputs).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        let k = scale * 3f32.sqrt();
        (0..n).map(|_| self.uniform() * k).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn to_bytes(vals: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        DType::I32 => vals
            .iter()
            .flat_map(|v| (*v as i32).to_le_bytes())
            .collect(),
    }
}

pub fn from_bytes(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
            .collect(),
        DType::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
    }
}

impl Pair {
    pub fn alloc(&mut self, len: usize, dtype: DType) -> T2 {
        let bytes = len * dtype.size();
        let mg = self.gpu.alloc(bytes).expect("gpu alloc");
        let mc = self.cpu.alloc(bytes).expect("cpu alloc");
        let t = T2 {
            g: Buf::new(mg.ptr(), len, dtype),
            c: Buf::new(mc.ptr(), len, dtype),
        };
        self.keep.push(mg);
        self.keep.push(mc);
        t
    }
    pub fn put_bytes(&mut self, t: T2, bytes: &[u8]) {
        self.gpu.upload(t.g, bytes).expect("gpu upload");
        self.cpu.upload(t.c, bytes).expect("cpu upload");
    }
    /// Values rounded to `dtype`, identical on both backends.
    pub fn put(&mut self, vals: &[f32], dtype: DType) -> T2 {
        let t = self.alloc(vals.len(), dtype);
        self.put_bytes(t, &to_bytes(vals, dtype));
        t
    }
    pub fn put_i32(&mut self, vals: &[i32]) -> T2 {
        let t = self.alloc(vals.len(), DType::I32);
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.put_bytes(t, &bytes);
        t
    }
    /// An output poisoned with NaN (0x7fc0 / 0x7fc00000 patterns) on both backends.
    pub fn out(&mut self, len: usize, dtype: DType) -> T2 {
        let t = self.alloc(len, dtype);
        self.put_bytes(t, &to_bytes(&vec![f32::NAN; len], dtype));
        t
    }
    pub fn get(&self, t: T2) -> (Vec<f32>, Vec<f32>) {
        (get(&self.gpu, t.g), get(&self.cpu, t.c))
    }
}

pub fn get(be: &dyn Backend, b: Buf) -> Vec<f32> {
    let mut bytes = vec![0u8; b.bytes()];
    be.download(b, &mut bytes).expect("download");
    from_bytes(&bytes, b.dtype)
}

pub fn tol(d: DType) -> f64 {
    match d {
        DType::BF16 => 1e-2,
        _ => 1e-5,
    }
}

/// Relative L2 error of `got` against `want`; both must be finite everywhere.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = want.iter().position(|v| !v.is_finite()) {
        panic!("{what}: reference is not finite at {i}: {}", want[i]);
    }
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: cuda output is not finite at {i}: {} (reference {})",
            got[i], want[i]
        );
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    let rel = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    assert!(
        rel < tol,
        "{what}: relative L2 error {rel:.3e} >= {tol:.0e}"
    );
    eprintln!("{what}: rel L2 {rel:.2e}");
}

pub fn assert_pair(what: &str, p: &Pair, t: T2, tol: f64) {
    let (g, c) = p.get(t);
    assert_close(what, &g, &c, tol);
}

pub const BOTH: [DType; 2] = [DType::F32, DType::BF16];
