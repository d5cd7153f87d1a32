#!/usr/bin/env python3
"""Writes tests/fixtures/hf/: tiny random Hugging Face Llama and Qwen3 checkpoints + float64 references.

Run by hand (needs torch, transformers (>= 4.51 for Qwen3; the fixtures were made with 5.x),
safetensors, tokenizers):
    /work/torchvenv/bin/python scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [--models a,b,...]

`--models` takes a comma-separated list of fixture names (the model names below and `tokenizer`);
only those folders are (re)written, so adding a fixture need not regenerate the others. Default:
all of them. The random weights and inputs of a model depend only on its position in MODELS (its
seed), so regenerating one fixture alone gives the same files as a full run.

Llama fixtures (`LlamaForCausalLM`): mha_tied, gqa_untied_sharded, llama3_scaled_mqa, bf16_gqa.
Qwen3 fixtures (`Qwen3ForCausalLM`): qwen3_gqa_tied, qwen3_untied_sharded. Qwen3 is Llama plus a
per-head RMSNorm of q and k over head_dim (`self_attn.q_norm.weight` / `k_norm.weight`, shape
[head_dim], applied before rotary), with head_dim taken from the config; both Qwen3 fixtures use a
head_dim different from hidden_size / num_attention_heads, GQA and random norm weights.

Each model folder holds what `save_pretrained` writes (config.json, model.safetensors or shards
with model.safetensors.index.json), `inputs.json` (a list of token-id lists) and
`reference.safetensors`: `logits` [batch, seq, vocab] and `loss` (float64), and `grad.<hf name>`
for every parameter (computed in float64, stored as float32 to keep the fixtures small).

Why not `model.double()`: transformers' Llama keeps the rotary cos/sin, RMSNorm and the attention
softmax in float32 even for a float64 model, so its "f64" output carries f32 rounding. The
reference here is an independent float64 implementation of the same math; it is checked against
the transformers float32 model (rel. L2 < 1e-5) so it provably computes what transformers does.
"""

import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}

MODELS = [
    # name, config kwargs, extra
    ("mha_tied", dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=72, vocab_size=67,
                      rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5), {}),
    ("gqa_untied_sharded", dict(hidden_size=56, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=60, vocab_size=71,
                                rope_theta=1234.5, tie_word_embeddings=False, rms_norm_eps=1e-6),
     {"max_shard_size": "60KB"}),
    ("llama3_scaled_mqa", dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=50, vocab_size=61,
                               rope_theta=50000.0, tie_word_embeddings=False,
                               max_position_embeddings=64,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}),
     {"legacy_config": True}),
    ("bf16_gqa", dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=6,
                      num_key_value_heads=3, intermediate_size=44, vocab_size=53,
                      rope_theta=500000.0, tie_word_embeddings=True), {"dtype": torch.bfloat16}),
    # Qwen3: head_dim is not hidden_size / num_attention_heads in either (40/4=10 vs 12; 36/6=6 vs 8).
    ("qwen3_gqa_tied", dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=12, intermediate_size=56, vocab_size=67,
                            rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                            max_position_embeddings=128, attention_bias=False,
                            use_sliding_window=False, hidden_act="silu"),
     {"arch": "qwen3"}),
    ("qwen3_untied_sharded", dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
                                  num_key_value_heads=3, head_dim=8, intermediate_size=52,
                                  vocab_size=71, rope_theta=10000.0, tie_word_embeddings=False,
                                  rms_norm_eps=1e-6, max_position_embeddings=128,
                                  attention_bias=False, use_sliding_window=False, hidden_act="silu"),
     {"arch": "qwen3", "max_shard_size": "40KB"}),
]
BATCH, SEQ = 2, 9


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def inv_freq_f64(cfg):
    hd = head_dim(cfg)
    theta = cfg["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    sc = cfg.get("rope_scaling")
    if sc:
        old = sc["original_max_position_embeddings"]
        low_wl, high_wl = old / sc["low_freq_factor"], old / sc["high_freq_factor"]
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / sc["factor"], inv)
        smooth = (old / wl - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / sc["factor"] + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def reference_forward(p, cfg, ids, qk_norm=False):
    """float64 Llama forward: every op, including norms, rotary tables and softmax, in f64.

    qk_norm=True gives Qwen3: q and k, reshaped to [b, s, heads, head_dim], go through an RMSNorm
    over head_dim (weights self_attn.q_norm.weight / k_norm.weight, [head_dim]) before rotary.
    head_dim comes from the config when it is there (q_proj is [heads*head_dim, hidden])."""
    d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = head_dim(cfg), cfg["rms_norm_eps"]
    b, s = ids.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq_f64(cfg)[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    cos, sin = ang.cos(), ang.sin()
    mask = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    x = p["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        L = f"model.layers.{i}."
        h = rms(x, p[L + "input_layernorm.weight"])
        q = (h @ p[L + "self_attn.q_proj.weight"].T).view(b, s, nh, hd)
        k = (h @ p[L + "self_attn.k_proj.weight"].T).view(b, s, nkv, hd)
        v = (h @ p[L + "self_attn.v_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
        if qk_norm:
            q = rms(q, p[L + "self_attn.q_norm.weight"])
            k = rms(k, p[L + "self_attn.k_norm.weight"])
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, nh * hd)
        x = x + o @ p[L + "self_attn.o_proj.weight"].T
        h = rms(x, p[L + "post_attention_layernorm.weight"])
        g = h @ p[L + "mlp.gate_proj.weight"].T
        u = h @ p[L + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ p[L + "mlp.down_proj.weight"].T
    x = rms(x, p["model.norm.weight"])
    out = p.get("lm_head.weight", p["model.embed_tokens.weight"])
    return x @ out.T


def next_token_loss(logits, ids):
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_model(out_dir, name, kw, extra, seed):
    torch.manual_seed(seed)
    arch = extra.get("arch", "llama")
    config_cls, model_cls = ARCHS[arch]
    cfg = config_cls(initializer_range=0.15, **kw)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random norm weights so a swapped norm mapping cannot pass
        for n, t in model.named_parameters():
            if n.endswith("norm.weight"):
                t.copy_(1.0 + 0.2 * torch.randn_like(t))
    dtype = extra.get("dtype", torch.float32)
    model = model.to(dtype)
    folder = os.path.join(out_dir, name)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, max_shard_size=extra.get("max_shard_size", "50GB"))
    gen = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)  # not needed by titan
    if extra.get("legacy_config"):
        # Real Llama 3.x checkpoints use the transformers 4 spelling: top-level rope_theta and
        # rope_scaling. Keep one fixture in that form so both spellings are parsed.
        path = os.path.join(folder, "config.json")
        c = json.load(open(path))
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        c["rope_scaling"] = rp
        json.dump(c, open(path, "w"), indent=2, sort_keys=True)

    ids = torch.randint(0, kw["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    json.dump(ids.tolist(), open(os.path.join(folder, "inputs.json"), "w"))

    # float64 reference from the saved (possibly bf16) weights.
    state = {n: t.detach().double().clone().requires_grad_(True) for n, t in model.named_parameters()}
    ref_cfg = dict(kw)
    ref_cfg.setdefault("rms_norm_eps", 1e-6)
    logits = reference_forward(state, ref_cfg, ids, qk_norm=(arch == "qwen3"))
    loss = next_token_loss(logits, ids)
    loss.backward()

    # The reference must agree with transformers itself (float32 model, same weights).
    # (A fresh float32 model: casting to bf16 also rounds the rotary inv_freq buffer.)
    m32 = model_cls(cfg).eval()
    m32.load_state_dict({n: t.float() for n, t in model.state_dict().items()})
    with torch.no_grad():
        hf = m32(input_ids=ids, labels=ids)
    e_logits = rel_l2(hf.logits, logits.detach())
    e_loss = abs(hf.loss.item() - loss.item()) / abs(loss.item())
    assert e_logits < 1e-5 and e_loss < 1e-5, (name, e_logits, e_loss)

    ref = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(1)}
    if dtype == torch.float32:
        for n, t in state.items():
            ref["grad." + n] = t.grad.float().contiguous()
    save_file(ref, os.path.join(folder, "reference.safetensors"))
    print(f"{name}: loss {loss.item():.6f}; f64 reference vs transformers f32: logits {e_logits:.2e}, loss {e_loss:.2e}")


def make_tokenizer(out_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = ("titan trains llama models on the cpu and on cuda. the tape records every op; "
            "backward replays it in reverse. checkpoints are folders of safetensors shards. ") * 4
    # Small enough (60 ids) that the mha_tied model (vocab 67) can train on its output.
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "[UNK]"])
    tok.train_from_iterator([text], trainer)
    folder = os.path.join(out_dir, "tokenizer")
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    sample = "the tape records every op. titan trains llama models.\n"
    open(os.path.join(folder, "sample.txt"), "w").write(sample)
    json.dump({"text": sample, "ids": tok.encode(sample).ids, "vocab_size": tok.get_vocab_size()},
              open(os.path.join(folder, "sample_ids.json"), "w"))
    print(f"tokenizer: vocab {tok.get_vocab_size()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    names = [m[0] for m in MODELS] + ["tokenizer"]
    ap.add_argument("--models", default=",".join(names),
                    help="comma-separated fixture names to (re)write; default all: " + ",".join(names))
    a = ap.parse_args()
    want = [n.strip() for n in a.models.split(",") if n.strip()]
    unknown = sorted(set(want) - set(names))
    if unknown:
        ap.error(f"unknown --models {unknown}; known: {names}")
    os.makedirs(a.out, exist_ok=True)
    for i, (name, kw, extra) in enumerate(MODELS):
        if name in want:
            make_model(a.out, name, kw, extra, seed=1000 + i)  # seed by position, not by selection
    if "tokenizer" in want:
        make_tokenizer(a.out)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.out) for f in fs)
    print(f"total {total / 1e6:.2f} MB in {a.out}")


if __name__ == "__main__":
    main()
