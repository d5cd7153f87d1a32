//! The memory-bound kernel list shared by `cpu_kernels.rs` and `cuda_kernels.rs`: every op at a
//! given size and activation dtype, each with the compulsory bytes one call moves (inputs read
//! once, outputs written once), so both benches report GB/s against a copy baseline.

use titan::backend::{
    AdamW, AdamWBufs, Backend, Buf, Copy2d, CrossEntropy, CrossEntropyShard, CrossEntropyStats,
    DeviceMem, EmbeddingShard, RmsNorm, RmsNormBwd, RmsNormResidual, RopeShape,
};
use titan::DType;

/// One timed call.
pub type Run<'a> = Box<dyn Fn(&dyn Backend) + 'a>;

pub struct Bench<'a> {
    pub name: String,
    /// Compulsory bytes moved per call (memory-bound ops) or 0.
    pub bytes: u64,
    /// FLOPs per call (GEMMs, which only the CUDA bench lists) or 0.
    #[allow(dead_code)]
    pub flops: f64,
    pub run: Run<'a>,
}

impl<'a> Bench<'a> {
    pub fn new(name: &str, bytes: u64, flops: f64, run: Run<'a>) -> Self {
        Bench {
            name: name.to_string(),
            bytes,
            flops,
            run,
        }
    }
}

/// Buffers that live as long as the bench list.
pub struct Mem<'a> {
    pub be: &'a dyn Backend,
    pub keep: Vec<Box<dyn DeviceMem>>,
}

impl Mem<'_> {
    /// A buffer filled with `value`.
    pub fn buf(&mut self, len: usize, dtype: DType, value: f32) -> Buf {
        let m = self.be.alloc(len * dtype.size()).expect("alloc");
        let b = Buf::new(m.ptr(), len, dtype);
        self.keep.push(m);
        self.be.fill(b, value).expect("fill");
        b
    }
    /// I32 ids uniformly spread over [0, below) (a fixed LCG).
    pub fn ids(&mut self, len: usize, below: usize) -> Buf {
        let b = self.buf(len, DType::I32, 0.0);
        let mut s = 0x1234_5678_9abc_def1u64;
        let bytes: Vec<u8> = (0..len)
            .flat_map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 33) % below as u64) as i32).to_le_bytes()
            })
            .collect();
        self.be.upload(b, &bytes).expect("upload ids");
        b
    }
}

pub fn ok(r: titan::Result<()>, what: &str) {
    if let Err(e) = r {
        panic!("{what}: {e}");
    }
}

/// The sizes of one device's list.
pub struct Sizes {
    /// Elements of the elementwise ops.
    pub n: usize,
    /// RMSNorm / embedding rows and model dim.
    pub rows: usize,
    pub dim: usize,
    pub rope: RopeShape,
    pub vocab: usize,
    /// Cross-entropy rows (over `vocab`).
    pub ce_rows: usize,
    /// AdamW / sum-of-squares parameters.
    pub params: usize,
}

/// Elementwise, rmsnorm, rope, embedding, cross-entropy, AdamW and sum-of-squares benches with
/// activations in `dt`, plus the vocabulary-parallel embedding / loss and copy_2d as rank 1 of 2
/// sees them; the buffers `a`, `b`, `o`, `o2` (n elements of dt) and `f` (n f32) are
/// returned too for callers that add their own (GEMMs).
pub fn memory_bound(mem: &mut Mem, z: &Sizes, dt: DType) -> (Vec<Bench<'static>>, [Buf; 5]) {
    let mut v = Vec::new();
    let e = dt.size() as u64;
    let (n, nb) = (z.n, z.n as u64);
    let a = mem.buf(n, dt, 0.5);
    let bb = mem.buf(n, dt, 0.25);
    let o = mem.buf(n, dt, 0.0);
    let o2 = mem.buf(n, dt, 0.0);
    let f = mem.buf(n, DType::F32, 0.5);
    v.push(Bench::new(
        &format!("fill {dt}"),
        e * nb,
        0.0,
        Box::new(move |b| ok(b.fill(o, 1.0), "fill")),
    ));
    v.push(Bench::new(
        &format!("add {dt}"),
        3 * e * nb,
        0.0,
        Box::new(move |b| ok(b.add(a, bb, o), "add")),
    ));
    v.push(Bench::new(
        &format!("scale {dt}"),
        2 * e * nb,
        0.0,
        Box::new(move |b| ok(b.scale(o, 1.0), "scale")),
    ));
    v.push(Bench::new(
        &format!("cast f32->{dt}"),
        (4 + e) * nb,
        0.0,
        Box::new(move |b| ok(b.cast(f, o), "cast")),
    ));
    v.push(Bench::new(
        &format!("swiglu_fwd {dt}"),
        3 * e * nb,
        0.0,
        Box::new(move |b| ok(b.swiglu_fwd(a, bb, o), "swiglu_fwd")),
    ));
    // dgate lands in the f32 scratch reinterpreted as dt (only its first n elements).
    let dg = f.reinterpret(dt).slice(0, n);
    v.push(Bench::new(
        &format!("swiglu_bwd {dt}"),
        5 * e * nb,
        0.0,
        Box::new(move |b| ok(b.swiglu_bwd(o2, a, bb, o, dg), "swiglu_bwd")),
    ));

    let (rows, dim) = (z.rows, z.dim);
    let s = z.rope;
    let qn = s.batch * s.seq * s.heads * s.head_dim;
    assert!(
        rows * dim <= n && qn <= n,
        "rmsnorm / rope views must fit the {n}-element buffers"
    );
    let rd = (rows * dim) as u64;
    let x = a.slice(0, rows * dim);
    let r = bb.slice(0, rows * dim);
    let h = o2.slice(0, rows * dim);
    let out = o.slice(0, rows * dim);
    let w = mem.buf(dim, dt, 1.0);
    let rstd = mem.buf(rows, DType::F32, 1.0);
    let dw = mem.buf(dim, DType::F32, 0.0);
    let norm = RmsNorm {
        x,
        w,
        out,
        rstd,
        rows,
        dim,
        eps: 1e-5,
    };
    v.push(Bench::new(
        &format!("rmsnorm_fwd {dt} {rows}x{dim}"),
        2 * e * rd,
        0.0,
        Box::new(move |b| ok(b.rmsnorm_fwd(&norm), "rmsnorm_fwd")),
    ));
    let fused = RmsNormResidual {
        x,
        residual: r,
        w,
        h,
        out,
        rstd,
        rows,
        dim,
        eps: 1e-5,
    };
    v.push(Bench::new(
        &format!("rmsnorm_residual_fwd {dt} {rows}x{dim}"),
        4 * e * rd,
        0.0,
        Box::new(move |b| ok(b.rmsnorm_residual_fwd(&fused), "rmsnorm_residual_fwd")),
    ));
    let bwd = RmsNormBwd {
        dout: r,
        x,
        w,
        rstd,
        dx: out,
        dw,
        rows,
        dim,
    };
    v.push(Bench::new(
        &format!("rmsnorm_bwd {dt} {rows}x{dim}"),
        3 * e * rd,
        0.0,
        Box::new(move |b| ok(b.rmsnorm_bwd(&bwd), "rmsnorm_bwd")),
    ));

    let half = s.seq * s.head_dim / 2;
    let cos = mem.buf(half, DType::F32, 1.0);
    let sin = mem.buf(half, DType::F32, 0.0);
    let (q, qo) = (a.slice(0, qn), o.slice(0, qn));
    v.push(Bench::new(
        &format!(
            "rope_fwd {dt} {}x{}x{}x{}",
            s.batch, s.seq, s.heads, s.head_dim
        ),
        2 * e * qn as u64,
        0.0,
        Box::new(move |b| ok(b.rope_fwd(q, qo, cos, sin, s), "rope_fwd")),
    ));

    let vocab = z.vocab;
    let table = mem.buf(vocab * dim, dt, 0.5);
    let dtable = mem.buf(vocab * dim, DType::F32, 0.0);
    let ids = mem.ids(rows, vocab);
    v.push(Bench::new(
        &format!("embedding_fwd {dt} {rows}x{dim}"),
        2 * e * rd + 4 * rows as u64,
        0.0,
        Box::new(move |b| ok(b.embedding_fwd(table, ids, out, dim), "embedding_fwd")),
    ));
    // dout read once + each touched dtable row read and written once (f32).
    v.push(Bench::new(
        &format!("embedding_bwd {dt} {rows}x{dim}"),
        e * rd + 8 * rd,
        0.0,
        Box::new(move |b| ok(b.embedding_bwd(out, ids, dtable, dim), "embedding_bwd")),
    ));

    // Rank 1 of a 2-way vocabulary split holds rows hi.. : about half the ids hit its table.
    let hi = vocab / 2;
    let shard = EmbeddingShard {
        table: table.slice(hi * dim, (vocab - hi) * dim),
        ids,
        out,
        dim,
        row0: hi,
        vocab,
    };
    v.push(Bench::new(
        &format!("embedding_shard_fwd {dt} {rows}x{dim} (1 of 2)"),
        3 * e * rd / 2 + 4 * rows as u64,
        0.0,
        Box::new(move |b| ok(b.embedding_shard_fwd(&shard), "embedding_shard_fwd")),
    ));
    let dshard = EmbeddingShard {
        table: dtable.slice(hi * dim, (vocab - hi) * dim),
        ..shard
    };
    v.push(Bench::new(
        &format!("embedding_shard_bwd {dt} {rows}x{dim} (1 of 2)"),
        e * rd + 4 * rd,
        0.0,
        Box::new(move |b| ok(b.embedding_shard_bwd(&dshard), "embedding_shard_bwd")),
    ));

    // Cross-entropy with dlogits written in place of the logits.
    let ce_rows = z.ce_rows;
    let logits = if ce_rows * vocab <= n {
        a.slice(0, ce_rows * vocab)
    } else {
        mem.buf(ce_rows * vocab, dt, 0.5)
    };
    let targets = mem.ids(ce_rows, vocab);
    let losses = mem.buf(ce_rows, DType::F32, 0.0);
    let cb = (ce_rows * vocab) as u64;
    let ce = CrossEntropy {
        logits,
        targets,
        losses,
        dlogits: logits,
        rows: ce_rows,
        vocab,
        ignore_index: -100,
        grad_scale: 1.0,
    };
    v.push(Bench::new(
        &format!("cross_entropy {dt} {ce_rows}x{vocab} (in place)"),
        2 * e * cb,
        0.0,
        Box::new(move |b| ok(b.cross_entropy(&ce), "cross_entropy")),
    ));
    // The vocabulary-parallel loss on rank 1's vocab - hi columns (its own logits block), the
    // other rank's stats already gathered beside its own; then the block copied into the
    // gathered [ce_rows, vocab] logits.
    let cols = vocab - hi;
    let part = mem.buf(ce_rows * cols, dt, 0.5);
    let stats = mem.buf(2 * ce_rows * 3, DType::F32, 1.0);
    let st = CrossEntropyStats {
        logits: part,
        targets,
        stats: stats.slice(ce_rows * 3, ce_rows * 3),
        rows: ce_rows,
        vocab: cols,
        col0: hi,
        ignore_index: -100,
    };
    let pb = (ce_rows * cols) as u64;
    v.push(Bench::new(
        &format!("cross_entropy_stats {dt} {ce_rows}x{cols} (1 of 2)"),
        e * pb + 12 * ce_rows as u64,
        0.0,
        Box::new(move |b| ok(b.cross_entropy_stats(&st), "cross_entropy_stats")),
    ));
    let sh = CrossEntropyShard {
        logits: part,
        targets,
        stats,
        losses,
        dlogits: part,
        rows: ce_rows,
        vocab: cols,
        col0: hi,
        shards: 2,
        vocab_total: vocab,
        ignore_index: -100,
        grad_scale: 1.0,
    };
    v.push(Bench::new(
        &format!("cross_entropy_shard {dt} {ce_rows}x{cols} (in place, 1 of 2)"),
        2 * e * pb,
        0.0,
        Box::new(move |b| ok(b.cross_entropy_shard(&sh), "cross_entropy_shard")),
    ));
    let gathered = mem.buf(ce_rows * vocab, dt, 0.0);
    let cp = Copy2d {
        src: part,
        dst: gathered.slice(hi, ce_rows * vocab - hi),
        rows: ce_rows,
        cols,
        src_stride: cols,
        dst_stride: vocab,
    };
    v.push(Bench::new(
        &format!("copy_2d {dt} {ce_rows}x{cols} into {ce_rows}x{vocab}"),
        2 * e * pb,
        0.0,
        Box::new(move |b| ok(b.copy_2d(&cp), "copy_2d")),
    ));

    // AdamW on f32 params, with a compute copy when activations are not f32.
    let pn = z.params;
    let (p, g, m1, m2) = (
        mem.buf(pn, DType::F32, 0.1),
        mem.buf(pn, DType::F32, 0.01),
        mem.buf(pn, DType::F32, 0.0),
        mem.buf(pn, DType::F32, 0.0),
    );
    let copy = (dt != DType::F32).then(|| mem.buf(pn, dt, 0.0));
    let gs = mem.buf(1, DType::F32, 1.0);
    let hp = AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 10,
    };
    let copy_name = copy.map_or(String::new(), |_| format!(" (+{dt} copy)"));
    let bufs = AdamWBufs {
        param: p,
        grad: g,
        m: m1,
        v: m2,
        compute: copy,
        grad_scale: gs,
    };
    v.push(Bench::new(
        &format!("adamw f32 {}Mi{copy_name}", pn >> 20),
        (28 + copy.map_or(0, |_| e)) * pn as u64,
        0.0,
        Box::new(move |b| ok(b.adamw(&bufs, &hp), "adamw")),
    ));
    let sq = mem.buf(1, DType::F32, 0.0);
    v.push(Bench::new(
        &format!("sum_squares f32 {}Mi", pn >> 20),
        4 * pn as u64,
        0.0,
        Box::new(move |b| ok(b.sum_squares(&[p], sq), "sum_squares")),
    ));
    (v, [a, bb, o, o2, f])
}
