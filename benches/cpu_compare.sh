#!/usr/bin/env bash
# Side-by-side CPU training throughput: titan vs the PyTorch eager reference (same Llama 3 debug
# architecture and vocabulary 2048, batch 8, AdamW, 2 threads), alternating runs, medians.
# Usage: benches/cpu_compare.sh [PYTHON] [SEQ] [ROUNDS] [STEPS]   (run by hand; needs torch)
set -euo pipefail
py="${1:-python3}"; seq="${2:-256}"; rounds="${3:-3}"; steps="${4:-6}"
titan="${TITAN:-target/release/titan}"
t=(); r=()
for i in $(seq "$rounds"); do
  r+=("$("$py" benches/torch_llama_ref.py --flavor debugmodel --seq "$seq" --batch 8 --steps "$steps" --warmup 1 --device cpu --threads 2 | sed -n 's/.*"tokens_per_s": \([0-9.]*\).*/\1/p')")
  t+=("$(RAYON_NUM_THREADS=2 "$titan" bench --config configs/llama3_debugmodel.toml --steps "$steps" --warmup 1 --training.device cpu --training.seq_len "$seq" | sed -n 's/.*"tokens_per_s":\([0-9.]*\).*/\1/p')")
  echo "round $i: torch ${r[-1]} tok/s, titan ${t[-1]} tok/s, ratio $(awk -v a="${t[-1]}" -v b="${r[-1]}" 'BEGIN{printf "%.2f", a/b}')"
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mt=$(med "${t[@]}"); mr=$(med "${r[@]}")
echo "seq $seq median: titan $mt tok/s, torch $mr tok/s, ratio $(awk -v a="$mt" -v b="$mr" 'BEGIN{printf "%.2f", a/b}') (load $(cut -d' ' -f1-3 /proc/loadavg))"
