#!/usr/bin/env python3
"""PyTorch eager reference for titan's training benchmarks (run by hand; not part of CI).

The same Llama 3 architecture as titan's models/llama3 (RMSNorm, rotary half-split pairs with
llama3 frequency scaling, GQA attention, SwiGLU, tied or untied output), written here from the
math, trained with AdamW on random tokens. Prints tokens/s and MFU in the same conventions as
`titan bench` so the two can be compared on one machine in one run.

  python3 benches/torch_llama_ref.py --flavor 1B --seq 4096 --batch 2 --steps 10   # GPU
  python3 benches/torch_llama_ref.py --flavor debugmodel --seq 256 --batch 8 --device cpu --threads 2
"""
import argparse, json, math, time
import torch
import torch.nn as nn
import torch.nn.functional as F

FLAVORS = {
    "debugmodel": dict(dim=256, n_layers=6, n_heads=16, n_kv_heads=16, vocab=2048, ffn=768, tie=False, scale=None),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab=128256, ffn=8192, tie=True, scale=32.0),
    "3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab=128256, ffn=8192, tie=True, scale=32.0),
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab=128256, ffn=14336, tie=False, scale=8.0),
}


def rope_tables(head_dim, seq, theta, scale, device):
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scale is not None:
        old, lo, hi = 8192.0, 1.0, 4.0
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, freqs / scale, freqs)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        freqs = torch.where(mid, (1 - smooth) * freqs / scale + smooth * freqs, scaled)
    ang = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def apply_rope(x, cos, sin):  # x [b, s, h, d], pairs (i, i + d/2)
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).type_as(x)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h, kv = c["dim"], c["n_heads"], c["n_kv_heads"]
        self.h, self.kv, self.hd = h, kv, d // h
        self.wq = nn.Linear(d, h * self.hd, bias=False)
        self.wk = nn.Linear(d, kv * self.hd, bias=False)
        self.wv = nn.Linear(d, kv * self.hd, bias=False)
        self.wo = nn.Linear(h * self.hd, d, bias=False)
        self.w1 = nn.Linear(d, c["ffn"], bias=False)
        self.w3 = nn.Linear(d, c["ffn"], bias=False)
        self.w2 = nn.Linear(c["ffn"], d, bias=False)
        self.n1 = nn.RMSNorm(d, eps=1e-5)
        self.n2 = nn.RMSNorm(d, eps=1e-5)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        y = self.n1(x)
        q = apply_rope(self.wq(y).view(b, s, self.h, self.hd), cos, sin)
        k = apply_rope(self.wk(y).view(b, s, self.kv, self.hd), cos, sin)
        v = self.wv(y).view(b, s, self.kv, self.hd)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.kv != self.h)
        x = x + self.wo(o.transpose(1, 2).reshape(b, s, -1))
        y = self.n2(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))


class Llama(nn.Module):
    def __init__(self, c, seq, device):
        super().__init__()
        self.emb = nn.Embedding(c["vocab"], c["dim"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
        self.norm = nn.RMSNorm(c["dim"], eps=1e-5)
        self.out = None if c["tie"] else nn.Linear(c["dim"], c["vocab"], bias=False)
        self.cos, self.sin = rope_tables(c["dim"] // c["n_heads"], seq, 500000.0, c["scale"], device)

    def forward(self, tok):
        x = self.emb(tok)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        x = self.norm(x)
        w = self.emb.weight if self.out is None else self.out.weight
        return F.linear(x, w)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", default="1B", choices=FLAVORS)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--vocab", type=int, default=0, help="override the flavor's vocabulary")
    ap.add_argument("--peak", type=float, default=989e12, help="peak FLOP/s for MFU (H100/H200 bf16 dense)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    c = dict(FLAVORS[a.flavor])
    if a.vocab:
        c["vocab"] = a.vocab
    dev = torch.device(a.device)
    model = Llama(c, a.seq, dev).to(dev)
    n = sum(p.numel() for p in model.parameters())
    fwd = torch.compile(model) if a.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=dev.type == "cuda")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        tok = torch.randint(0, c["vocab"], (a.batch, a.seq + 1), device=dev)
        with amp:
            logits = fwd(tok[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, c["vocab"]), tok[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    tps = a.batch * a.seq * a.steps / dt
    l, h, d = c["n_layers"], c["n_heads"], c["dim"]
    f_tt = 6 * (n - c["vocab"] * d) + 12 * l * h * (d // h) * a.seq
    f_llmc = 6 * n + 6 * l * d * a.seq
    print(f"torch-ref: {a.flavor} {n/1e9:.3f}B params, batch {a.batch} x seq {a.seq}, compile={a.compile}, "
          f"{1e3*dt/a.steps:.1f} ms/step, loss {loss.item():.4f}")
    print(f"torch-ref: tokens/s {tps:.0f} | torchtitan MFU {100*tps*f_tt/a.peak:.2f}% | llm.c MFU {100*tps*f_llmc/a.peak:.2f}%")
    print(json.dumps({"bench": "torch_ref", "flavor": a.flavor, "tokens_per_s": tps, "compile": a.compile,
                      "mfu_torchtitan_pct": 100 * tps * f_tt / a.peak, "mfu_llmc_pct": 100 * tps * f_llmc / a.peak}))


if __name__ == "__main__":
    main()
