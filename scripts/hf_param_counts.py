#!/usr/bin/env python3
"""Prints transformers' parameter count (`num_parameters()`, a tied embedding counted once) of
every published Qwen3 dense shape and titan's qwen3 debugmodel, built on the meta device (no
weights, no download). models/qwen3/model/config.rs tests titan's counts against these numbers.
Run by hand: /work/torchvenv/bin/python scripts/hf_param_counts.py (needs torch, transformers).
"""
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
F = {"0.6B": (1024, 28, 16, 3072, True), "1.7B": (2048, 28, 16, 6144, True), "4B": (2560, 36, 32, 9728, True),
     "8B": (4096, 36, 32, 12288, False), "14B": (5120, 40, 40, 17408, False), "32B": (5120, 64, 64, 25600, False)}
for name, (d, l, h, f, tie) in F.items():
    c = Qwen3Config(hidden_size=d, num_hidden_layers=l, num_attention_heads=h, num_key_value_heads=8, head_dim=128,
                    intermediate_size=f, vocab_size=151936, tie_word_embeddings=tie)
    with torch.device("meta"):
        m = Qwen3ForCausalLM(c)
    print(name, m.num_parameters())
c = Qwen3Config(hidden_size=256, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=2048, tie_word_embeddings=True)
with torch.device("meta"):
    m = Qwen3ForCausalLM(c)
print("debugmodel", m.num_parameters())
