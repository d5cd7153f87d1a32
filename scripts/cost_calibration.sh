#!/usr/bin/env bash
# Predicted (`titan plan --device cpu`) vs measured (`titan bench`) step time of the debug model
# on this CPU at world 1, 2 and 4 (FSDP), with tensor parallel (tp 2 at world 2, tp 2 x FSDP 2 at
# world 4) and with pipelines (pp 2 at world 2, pp 2 x tp 2 at world 4, the config's schedule),
# the same global batch of 8 x 256. A benchmark: run it by hand on a quiet machine,
# never from tests.
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
# world:tp:pp layouts; the data-parallel ranks (world / tp / pp) share the global batch of 8.
LAYOUTS=${LAYOUTS:-"1:1:1 2:1:1 4:1:1 2:2:1 4:2:1 2:1:2 4:2:2"}
for r in $(seq 1 "$ROUNDS"); do
  for l in $LAYOUTS; do
    IFS=: read -r w tp pp <<<"$l"
    b=$((8 * tp * pp / w))
    layout=(--training.local_batch_size "$b" --parallelism.tensor_parallel_degree "$tp"
      --parallelism.pipeline_parallel_degree "$pp"
      --parallelism.data_parallel_shard_degree "$((w / tp / pp))")
    out=$("$TITAN" bench --nproc-per-node "$w" --config "$CFG" --steps 10 --warmup 3 "${layout[@]}")
    meas=$(grep -o '([0-9.]* ms/step' <<<"$out" | tr -d '(' | cut -d' ' -f1)
    plan=$("$TITAN" plan --config "$CFG" --device cpu --world-size "$w" "${layout[@]}")
    pred=$(awk '$1 == "step" {print $2}' <<<"$plan")
    peak=$(grep -o 'peak [0-9.]* TFLOP/s' <<<"$plan" | cut -d' ' -f2)
    bw=$(grep -o 'memory [0-9]* GB/s' <<<"$plan" | cut -d' ' -f2)
    peak="$peak, $bw"
    ratio=$(awk -v p="$pred" -v m="$meas" 'BEGIN {printf "%.2f", p / m}')
    printf '| %s | %s (tp %s, pp %s) | %s | %s | %s | %s |\n' "$r" "$w" "$tp" "$pp" "$meas" "$peak" \
      "$pred" "$ratio"
  done
done
