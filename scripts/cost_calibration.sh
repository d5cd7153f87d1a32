#!/usr/bin/env bash
# Predicted (`titan plan --device cpu`) vs measured (`titan bench`) step time of the debug model
# on this CPU at world 1, 2 and 4 (FSDP, the same global batch of 8 x 256). A benchmark: run it
# by hand on a quiet machine, never from tests.
#   scripts/cost_calibration.sh [ROUNDS]
# The plan right after each bench measures this machine's GEMM peak (metrics::measure_gemm_peak,
# all cores) and copy bandwidth itself. (The bench's own start-up peak is not used: with several
# rank threads it is one rank's pool, measured while the other ranks measure theirs.)
set -euo pipefail
TITAN=${TITAN:-target/release/titan}
CFG=configs/llama3_debugmodel.toml
ROUNDS=${1:-1}
printf '| round | world | measured ms/step | plan: peak TFLOP/s, copy GB/s | predicted ms/step | predicted / measured |\n'
printf '| --- | --- | --- | --- | --- | --- |\n'
for r in $(seq 1 "$ROUNDS"); do
  for w in 1 2 4; do
    b=$((8 / w))
    layout=(--training.local_batch_size "$b" --parallelism.data_parallel_shard_degree "$w")
    out=$("$TITAN" bench --nproc-per-node "$w" --config "$CFG" --steps 10 --warmup 3 "${layout[@]}")
    meas=$(grep -o '([0-9.]* ms/step' <<<"$out" | tr -d '(' | cut -d' ' -f1)
    plan=$("$TITAN" plan --config "$CFG" --device cpu --world-size "$w" "${layout[@]}")
    pred=$(awk '$1 == "step" {print $2}' <<<"$plan")
    peak=$(grep -o 'peak [0-9.]* TFLOP/s' <<<"$plan" | cut -d' ' -f2)
    bw=$(grep -o 'memory [0-9]* GB/s' <<<"$plan" | cut -d' ' -f2)
    peak="$peak, $bw"
    ratio=$(awk -v p="$pred" -v m="$meas" 'BEGIN {printf "%.2f", p / m}')
    printf '| %s | %s | %s | %s | %s | %s |\n' "$r" "$w" "$meas" "$peak" "$pred" "$ratio"
  done
done
