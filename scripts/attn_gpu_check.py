#!/usr/bin/env python3
"""Checks and times kernels/attention.cu on a GPU machine without the Rust toolchain.

Build the fatbin on the CPU box (the tuning variants are optional):
  $NVCC -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -I kernels \
        -DATTN_TUNING -fatbin kernels/attention.cu -o attention.fatbin
then on the GPU machine: python3 attn_gpu_check.py attention.fatbin [all|check|variants|bench|small|profile].
Loads the fatbin through the driver API (ctypes), feeds it torch tensors and compares with a
float64 torch reference (autograd for the backward). Prints relative L2 errors, a determinism
check, and per-kernel timings next to torch's own SDPA. CFG mirrors engine/backend/cuda/attention.rs.
"""
import ctypes
import math
import sys

import torch

# D -> launch shapes: fwd (warps, m16 tiles per warp, key tile), dkv (warps, query tile), dq (warps, key tile)
CFG = {
    16: dict(fwd=(4, 1, 64), dkv=(4, 64), dq=(4, 64)),
    32: dict(fwd=(4, 1, 64), dkv=(4, 64), dq=(4, 32)),
    64: dict(fwd=(4, 2, 64), dkv=(4, 64), dq=(4, 64)),
    128: dict(fwd=(4, 2, 32), dkv=(4, 32), dq=(4, 32)),
}
# Variants built with -DATTN_TUNING: (D, tag, shape) per kernel kind.
VARIANTS = {
    "fwd": [(128, "w8m1n64", (8, 1, 64)), (64, "w8m1n64", (8, 1, 64))],
    "dkv": [(128, "w8q32", (8, 32)), (64, "w8q64", (8, 64))],
    "dq": [(128, "w4n32s", (4, 32)), (128, "w4n64", (4, 64)), (64, "w4n64s", (4, 64))],
}

cu = ctypes.CDLL("libcuda.so.1")


def ck(r, what):
    if r != 0:
        name = ctypes.c_char_p()
        cu.cuGetErrorName(r, ctypes.byref(name))
        raise RuntimeError(f"{what}: CUresult {r} {name.value}")


class Kernels:
    def __init__(self, path):
        torch.zeros(1, device="cuda")  # primary context current on this thread
        self.data = ctypes.create_string_buffer(open(path, "rb").read())
        self.mod = ctypes.c_void_p()
        ck(cu.cuModuleLoadData(ctypes.byref(self.mod), self.data), "cuModuleLoadData")
        self.fns = {}

    def fn(self, name, smem):
        if name not in self.fns:
            f = ctypes.c_void_p()
            ck(cu.cuModuleGetFunction(ctypes.byref(f), self.mod, name.encode()), name)
            ck(cu.cuFuncSetAttribute(f, 8, smem), "set smem " + name)  # MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.fns[name] = f
        return self.fns[name]

    def launch(self, name, grid, block, smem, args):
        f = self.fn(name, smem)
        keep = []
        for a in args:
            if isinstance(a, torch.Tensor):
                keep.append(ctypes.c_uint64(a.data_ptr()))
            elif isinstance(a, float):
                keep.append(ctypes.c_float(a))
            elif isinstance(a, tuple) and a[0] == "i64":
                keep.append(ctypes.c_longlong(a[1]))
            else:
                keep.append(ctypes.c_int(a))
        params = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.pointer(x), ctypes.c_void_p) for x in keep])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        ck(cu.cuLaunchKernel(f, grid[0], grid[1], grid[2], block, 1, 1, smem, stream, params, None), name)


def fwd_smem(d, c):
    nw, mw, bn = c
    return (16 * nw * mw + 4 * bn) * (d + 8) * 2


def dkv_smem(d, c):
    nw, bmq = c
    return (2 * 16 * nw + 4 * bmq) * (d + 8) * 2 + 16 * bmq


def dq_smem(d, c):
    nw, bn = c
    return (2 * 16 * nw + 4 * bn) * (d + 8) * 2


def cdiv(a, b):
    return (a + b - 1) // b


def attn_fwd(K, q, k, v, scale, tag="bf16", c=None):
    b, s, h, d = q.shape
    hkv = k.shape[2]
    c = c or CFG[d]["fwd"]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, h, s), float("nan"), device=q.device, dtype=torch.float32)
    K.launch(f"attn_fwd_d{d}_{tag}", (cdiv(s, 16 * c[0] * c[1]), h, b), 32 * c[0], fwd_smem(d, c),
             [q, k, v, out, lse, s, h, hkv, scale])
    return out, lse


def attn_bwd(K, q, k, v, out, dout, lse, scale, dkv=("bf16", None), dq_=("bf16", None)):
    b, s, h, d = q.shape
    hkv = k.shape[2]
    delta = torch.full((b, h, s), float("nan"), device=q.device, dtype=torch.float32)
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    rows = b * s * h
    K.launch(f"attn_bwd_delta_d{d}_bf16", (cdiv(rows * d // 8, 256), 1, 1), 256, 0, [out, dout, delta, ("i64", rows), s, h])
    c = dkv[1] or CFG[d]["dkv"]
    K.launch(f"attn_bwd_dkv_d{d}_{dkv[0]}", (cdiv(s, 16 * c[0]), hkv, b), 32 * c[0], dkv_smem(d, c),
             [q, k, v, dout, lse, delta, dk, dv, s, h, hkv, scale])
    c = dq_[1] or CFG[d]["dq"]
    K.launch(f"attn_bwd_dq_d{d}_{dq_[0]}", (cdiv(s, 16 * c[0]), h, b), 32 * c[0], dq_smem(d, c),
             [q, k, v, dout, lse, delta, dq, s, h, hkv, scale])
    return dq, dk, dv


def reference(q, k, v, dout, scale):
    """float64 causal GQA attention with autograd."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    qd = q.double().requires_grad_()
    kd = k.double().requires_grad_()
    vd = v.double().requires_grad_()
    qh = qd.permute(0, 2, 1, 3)
    kh = kd.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    vh = vd.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    sc = (qh @ kh.transpose(-1, -2)) * scale
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    sc = sc.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)
    o = torch.softmax(sc, dim=-1) @ vh
    do = dout.double().permute(0, 2, 1, 3)
    o.backward(do)
    return o.permute(0, 2, 1, 3).detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def rel(a, r, floor):
    """Relative L2 error; the denominator is floored at `floor` because some exact gradients are
    zero (seq 1: dS = P (dP - delta) = 0), where any rounding would read as a huge ratio."""
    a = a.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - r).norm() / max(r.norm().item(), floor)).item()


def check(K, b, s, h, hkv, d, fwd=("bf16", None), dkv=("bf16", None), dq_=("bf16", None)):
    torch.manual_seed(1000 * s + 10 * d + h)
    q = torch.randn(b, s, h, d, device="cuda").bfloat16()
    k = torch.randn(b, s, hkv, d, device="cuda").bfloat16()
    v = torch.randn(b, s, hkv, d, device="cuda").bfloat16()
    dout = torch.randn(b, s, h, d, device="cuda").bfloat16()
    scale = 1.0 / math.sqrt(d)
    out, lse = attn_fwd(K, q, k, v, scale, *fwd)
    dq, dk, dv = attn_bwd(K, q, k, v, out, dout, lse, scale, dkv, dq_)
    dq2, dk2, dv2 = attn_bwd(K, q, k, v, out, dout, lse, scale, dkv, dq_)
    torch.cuda.synchronize()
    det = torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)
    ro, rl, rdq, rdk, rdv = reference(q, k, v, dout, scale)
    fl = 1e-3 * dout.double().norm().item()
    e = [rel(out, ro, 1e-30), rel(lse, rl, 1e-30), rel(dq, rdq, fl), rel(dk, rdk, fl), rel(dv, rdv, fl)]
    return e, det


def bench(K, b, s, h, d, iters=20):
    """Times each kernel (and every tuning variant for this head dim) on preallocated buffers.
    Returns rows (label, ms, TFLOP/s) with fwd FLOPs 2*b*h*s*s*d and bwd FLOPs 2.5x that."""
    torch.manual_seed(7)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda").bfloat16() for _ in range(4))
    scale = 1.0 / math.sqrt(d)
    flops = 4.0 * b * h * d * s * s / 2.0
    out, lse = attn_fwd(K, q, k, v, scale)
    delta = torch.empty(b, h, s, device="cuda")
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rows = b * s * h

    def timeit(fn):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(iters):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
        ts.sort()
        return ts[len(ts) // 2]

    def fwd(tag, c):
        return lambda: K.launch(f"attn_fwd_d{d}_{tag}", (cdiv(s, 16 * c[0] * c[1]), h, b), 32 * c[0],
                                fwd_smem(d, c), [q, k, v, out, lse, s, h, h, scale])

    def dkv(tag, c):
        return lambda: K.launch(f"attn_bwd_dkv_d{d}_{tag}", (cdiv(s, 16 * c[0]), h, b), 32 * c[0], dkv_smem(d, c),
                                [q, k, v, dout, lse, delta, dk, dv, s, h, h, scale])

    def dqk(tag, c):
        return lambda: K.launch(f"attn_bwd_dq_d{d}_{tag}", (cdiv(s, 16 * c[0]), h, b), 32 * c[0], dq_smem(d, c),
                                [q, k, v, dout, lse, delta, dq, s, h, h, scale])

    dl = lambda: K.launch(f"attn_bwd_delta_d{d}_bf16", (cdiv(rows * d // 8, 256), 1, 1), 256, 0,
                          [out, dout, delta, ("i64", rows), s, h])
    res = []
    res.append(("fwd", timeit(fwd("bf16", CFG[d]["fwd"])), 1.0))
    for (dd, tag, c) in VARIANTS["fwd"]:
        if dd == d:
            res.append((f"fwd {tag}", timeit(fwd(tag, c)), 1.0))
    dl()
    res.append(("bwd delta", timeit(dl), 0.0))
    res.append(("bwd dkv", timeit(dkv("bf16", CFG[d]["dkv"])), 0.0))
    for (dd, tag, c) in VARIANTS["dkv"]:
        if dd == d:
            res.append((f"bwd dkv {tag}", timeit(dkv(tag, c)), 0.0))
    res.append(("bwd dq", timeit(dqk("bf16", CFG[d]["dq"])), 0.0))
    for (dd, tag, c) in VARIANTS["dq"]:
        if dd == d:
            res.append((f"bwd dq {tag}", timeit(dqk(tag, c)), 0.0))

    def total():
        dl()
        dkv("bf16", CFG[d]["dkv"])()
        dqk("bf16", CFG[d]["dq"])()
    res.append(("bwd total", timeit(total), 2.5))
    # torch SDPA (cuDNN / flash backend) on the same card, [b, h, s, d] layout.
    qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ot = sdpa(qt, kt, vt, is_causal=True, scale=scale)
    dot = dout.transpose(1, 2).contiguous()
    res.append(("torch sdpa fwd", timeit(lambda: sdpa(qt, kt, vt, is_causal=True, scale=scale)), 1.0))
    res.append(("torch sdpa bwd", timeit(lambda: torch.autograd.grad(ot, (qt, kt, vt), dot, retain_graph=True)), 2.5))
    return [(lab, ms, (flops * f / (ms * 1e-3) / 1e12) if f else float("nan")) for (lab, ms, f) in res]


def main():
    K = Kernels(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "all"
    print(torch.cuda.get_device_name(), flush=True)
    bad = 0
    if mode in ("all", "check", "small"):
        cases = []
        dims = [16, 32, 64, 128] if mode != "small" else [64]
        seqs = [1, 17, 129, 1000] if mode != "small" else [17, 129]
        for d in dims:
            for s in seqs:
                cases.append((2, s, 8, 2, d))
                cases.append((1, s, 4, 4, d))
        if mode != "small":
            cases.append((1, 4096, 8, 2, 128))
            cases.append((2, 2048, 4, 1, 64))
        print(f"{'b':>2} {'seq':>5} {'h':>3} {'hkv':>3} {'d':>4} | {'out':>8} {'lse':>8} {'dq':>8} {'dk':>8} {'dv':>8} det")
        for (b, s, h, hkv, d) in cases:
            e, det = check(K, b, s, h, hkv, d)
            ok = det and all(x == x and x < 1e-2 for x in e)
            bad += not ok
            print(f"{b:>2} {s:>5} {h:>3} {hkv:>3} {d:>4} | " + " ".join(f"{x:8.1e}" for x in e)
                  + f" {'yes' if det else 'NO'}{'' if ok else '  <-- FAIL'}", flush=True)
    if mode in ("all", "check", "variants"):
        # Every tuning variant on a GQA tail shape and an MHA shape before it is timed.
        for kind, lst in VARIANTS.items():
            for (d, tag, c) in lst:
                for (b, s, h, hkv) in [(2, 1000, 8, 2), (1, 257, 4, 4)]:
                    kw = {"fwd": dict(fwd=(tag, c)), "dkv": dict(dkv=(tag, c)), "dq": dict(dq_=(tag, c))}[kind]
                    e, det = check(K, b, s, h, hkv, d, **kw)
                    ok = det and all(x == x and x < 1e-2 for x in e)
                    bad += not ok
                    print(f"{kind} {tag:>9} d{d:<3} {b}x{s}x{h}/{hkv} | " + " ".join(f"{x:8.1e}" for x in e)
                          + f" {'yes' if det else 'NO'}{'' if ok else '  <-- FAIL'}", flush=True)
    if mode == "profile":
        # One forward and backward at the bench shape, for ncu.
        b, s, h, d = 4, 4096, 16, 128
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda").bfloat16() for _ in range(4))
        out, lse = attn_fwd(K, q, k, v, 1.0 / math.sqrt(d))
        attn_bwd(K, q, k, v, out, dout, lse, 1.0 / math.sqrt(d))
        torch.cuda.synchronize()
    if mode in ("all", "bench"):
        for (b, s, h, d) in [(4, 4096, 16, 128), (4, 4096, 32, 64), (1, 16384, 16, 128)]:
            print(f"--- b{b} s{s} h{h} d{d} (causal)", flush=True)
            for (lab, ms, tf) in bench(K, b, s, h, d):
                print(f"  {lab:<22} {ms:8.3f} ms  {tf:7.1f} TFLOP/s", flush=True)
    print("FAILURES:", bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
