#!/usr/bin/env python3
"""Checks that transformers loads a titan-exported Hugging Face folder and agrees with titan.

    titan eval --hf-checkpoint EXPORT --tokens ids.json --dump-logits logits.safetensors
    /work/torchvenv/bin/python scripts/check_hf_export.py EXPORT ids.json logits.safetensors

Prints the relative L2 difference of transformers' float32 logits (model(ids).logits) and titan's
dump, and both losses (labels = input ids, transformers' shift). Exits 1 above 1e-5.
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main():
    folder, ids_path, dump_path = sys.argv[1:4]
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(json.load(open(ids_path)))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    titan = load_file(dump_path)["logits"].double()
    err = ((out.logits.double() - titan).norm() / out.logits.double().norm()).item()
    v = titan.shape[-1]
    titan_loss = torch.nn.functional.cross_entropy(titan[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    print(f"logits rel L2 {err:.3e}; loss transformers {out.loss.item():.6f} titan {titan_loss.item():.6f}")
    sys.exit(0 if err < 1e-5 else 1)


if __name__ == "__main__":
    main()
