//! What a log line shows: loss, grad norm, lr, tokens/s, TFLOP/s, MFU, planned and actual peak
//! memory, step time, ETA. FLOPs per token follow torchtitan (6 N_non-embedding + 12 l h q t);
//! peak FLOP/s comes from a per-device table, or on the CPU from a GEMM measured at start-up
//! (stated as measured in the log).

use crate::backend::{Backend, Buf, Gemm};
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Dense bf16 tensor-core peak of known devices (FLOP/s), matched by substring of the name.
pub fn device_peak_flops(device_name: &str) -> Option<f64> {
    let n = device_name.to_ascii_uppercase();
    let table: [(&str, f64); 7] = [
        ("H200", 989e12),
        ("H100 PCIE", 756e12),
        ("H100", 989e12),
        ("H800", 989e12),
        ("A100", 312e12),
        ("L40S", 362e12),
        ("A10", 125e12),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|&(_, v)| v)
}

/// Where the MFU denominator came from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Peak {
    pub flops: f64,
    pub source: String,
}

/// Measures the backend's f32 GEMM rate (the best of several 1024^3 products, after a warm-up):
/// the honest "peak" for MFU on a CPU, where no datasheet number applies. The best run, not the
/// median, so that a machine busy at start-up understates the peak less (MFU is then an upper
/// bound only if the training run was quieter than the best measurement).
pub fn measure_gemm_peak(be: &dyn Backend) -> Result<Peak> {
    let n = 1024;
    let mem = be.alloc(3 * n * n * 4)?;
    let a = Buf::new(mem.ptr(), n * n, DType::F32);
    let b = Buf::new(mem.ptr() + (n * n * 4) as u64, n * n, DType::F32);
    let c = Buf::new(mem.ptr() + (2 * n * n * 4) as u64, n * n, DType::F32);
    be.fill(a, 0.5)?;
    be.fill(b, 0.25)?;
    let g = Gemm::new(n, n, n, false, false, 0.0);
    be.gemm(&g, a, b, c)?;
    be.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        be.gemm(&g, a, b, c)?;
        be.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let flops = g.flops() / best;
    Ok(Peak {
        flops,
        source: format!("measured f32 GEMM {n}^3 on {}", be.name()),
    })
}

/// Measures the backend's copy rate (bytes read + written per second, the median of 9 copies
/// of a 16 MiB buffer after a warm-up): the memory bandwidth the CPU cost model uses. The median
/// and a buffer past the caches, because on this VM the best of several 8 MiB copies ranged
/// from 57 to 176 GB/s between runs, far above what the step's memory-bound kernels reach
/// (33-49 GB/s, docs/PERFORMANCE.md).
pub fn measure_copy_bandwidth(be: &dyn Backend) -> Result<f64> {
    let n = 4 << 20; // f32 elements: 16 MiB
    let mem = be.alloc(2 * n * 4)?;
    let a = Buf::new(mem.ptr(), n, DType::F32);
    let b = Buf::new(mem.ptr() + (n * 4) as u64, n, DType::F32);
    be.fill(a, 1.0)?;
    be.fill(b, 0.0)?;
    be.copy(a, b)?;
    be.synchronize()?;
    let mut times = Vec::with_capacity(9);
    for _ in 0..9 {
        let t = Instant::now();
        be.copy(a, b)?;
        be.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n * 4) as f64 / times[times.len() / 2])
}

/// One step's numbers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub tflops: f64,
    pub mfu_pct: f64,
    pub step_time_s: f64,
    pub memory_planned_gib: f64,
    pub memory_actual_gib: f64,
    pub eta_s: f64,
}

impl StepMetrics {
    pub fn log_line(&self) -> String {
        format!(
            "step {:>5}  loss {:>8.4}  grad_norm {:>7.4}  lr {:.2e}  tok/s {:>9.0}  TFLOP/s {:>7.3}  MFU {:>5.2}%  mem {:.2}/{:.2} GiB  step {:.3}s  eta {}",
            self.step,
            self.loss,
            self.grad_norm,
            self.lr,
            self.tokens_per_s,
            self.tflops,
            self.mfu_pct,
            self.memory_planned_gib,
            self.memory_actual_gib,
            self.step_time_s,
            fmt_duration(self.eta_s)
        )
    }
}

pub fn fmt_duration(s: f64) -> String {
    if !s.is_finite() {
        return "-".into();
    }
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// Appends one JSON object per logged step to `<dump>/metrics.jsonl`.
pub struct MetricsWriter {
    path: PathBuf,
    /// None on ranks that only keep the history (rank 0 writes the file).
    file: Option<std::fs::File>,
    pub history: Vec<StepMetrics>,
}

impl MetricsWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsWriter {
            path,
            file: Some(file),
            history: Vec::new(),
        })
    }
    /// Keeps the history without writing a file (the ranks other than rank 0).
    pub fn history_only(dir: &Path) -> Self {
        MetricsWriter {
            path: dir.join("metrics.jsonl"),
            file: None,
            history: Vec::new(),
        }
    }
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        self.write_json(m)?;
        self.history.push(m.clone());
        Ok(())
    }
    /// Appends any other record (validation results) as one JSON line.
    pub fn write_json(&mut self, record: &impl serde::Serialize) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let line = serde_json::to_string(record).map_err(|e| Error::Other(e.to_string()))?;
        writeln!(file, "{line}").map_err(|e| Error::io(&self.path, e))
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}
