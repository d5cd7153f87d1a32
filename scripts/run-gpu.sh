#!/usr/bin/env bash
# Runs a bundle made by scripts/gpu-bundle.sh (this script sits in its root, beside bin/, tests/,
# benches/, configs/) on a GPU machine without Rust, most important first, under one deadline:
#   1. the CUDA tests (--ignored): a whole training step and trainer steps against the CPU,
#      every kernel against its CPU twin, flash attention against an f64 reference, the NCCL
#      communicator against host computations (every GPU present), the tensor- and
#      pipeline-parallel paths at world 1 over NCCL against the CPU;
#   2. the end-to-end benchmark (`titan bench`, Llama 3 1B, seq 4096) and, right after it on the
#      same GPU, the PyTorch reference (torch_llama_ref.py) when python3 has torch;
#   3. the CUDA kernel benches (criterion, short times), then the reference with torch.compile;
#   4. every other test executable (the CPU suite), as time allows.
# Output: $OUT/results.txt (./results.txt when OUT is unset), a summary at its end and in
# $OUT/summary.txt. CUDA libraries come from python3's nvidia wheels (cuBLAS, NCCL; a libnccl.so
# symlink is made for cudarc) plus the driver's libcuda.
# Knobs: TITAN_DEADLINE (seconds for everything, default 900), TITAN_ONLY (regex on executable
# names, e.g. '^cuda_'), TITAN_BENCH_STEPS (timed steps of the end-to-end bench, default 5).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$PWD}"
mkdir -p "$out"
res="$out/results.txt"
: > "$res"
deadline=$((SECONDS + ${TITAN_DEADLINE:-900}))
only="${TITAN_ONLY:-.}"
steps="${TITAN_BENCH_STEPS:-5}"
log() { echo "$@" | tee -a "$res"; }

# ---- libraries from python3's site-packages ---------------------------------------------------
libdirs=""
for sp in $(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))' 2>/dev/null); do
  for sub in nvidia/cu13/lib nvidia/cublas/lib nvidia/nccl/lib nvidia/cuda_runtime/lib nvidia/cuda_nvrtc/lib; do
    if [ -d "$sp/$sub" ] && [[ ":$libdirs:" != *":$sp/$sub:"* ]]; then libdirs="$libdirs:$sp/$sub"; fi
  done
done
ncdir="${TMPDIR:-/tmp}/titan-nccl-link"
mkdir -p "$ncdir"
IFS=':' read -ra dirs <<< "${libdirs#:}"
for d in "${dirs[@]}"; do
  if [ -e "$d/libnccl.so.2" ]; then ln -sf "$d/libnccl.so.2" "$ncdir/libnccl.so"; break; fi
done
export LD_LIBRARY_PATH="$ncdir${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "== $(date -u) on $(hostname)"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$res"
ls "${dirs[@]}" 2>/dev/null | grep -E "libcublas|libnccl" | sort -u | tr '\n' ' ' | tee -a "$res"; echo | tee -a "$res"

status=()
run() {  # name, most seconds, command...: cut to the time left, skipped when under 10 s remain
  local name="$1" limit="$2"; shift 2
  [[ "$name" =~ $only ]] || return 0
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 10 ]; then log "SKIP $name (deadline)"; status+=("$name skipped"); return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  log ""
  log "==== $name: $*"
  local t0=$SECONDS
  (cd "$here" && timeout "$limit" "$@") 2>&1 | tee -a "$res"
  local rc=${PIPESTATUS[0]}
  log "==== $name: exit $rc in $((SECONDS - t0)) s"
  status+=("$name rc=$rc $((SECONDS - t0))s")
}

# ---- 1. device tests --------------------------------------------------------------------------
# The whole step first, then every other tests/cuda_*.rs (kernels, attention, NCCL, the TP and
# pipeline paths at world 1).
for n in cuda_train $(cd "$here/tests" && ls cuda_* 2>/dev/null | grep -vx cuda_train); do
  [ -x "$here/tests/$n" ] && run "test $n" 180 "$here/tests/$n" --ignored --test-threads=1 --nocapture
done

# ---- 2. end to end: titan, then PyTorch on the same GPU ---------------------------------------
run "bench titan 1B" 150 "$here/bin/titan" bench --config configs/llama3_1b.toml --steps "$steps" \
  --warmup 2 --training.seq_len 4096 --training.local_batch_size 2 \
  --activation_checkpoint.mode none --training.device cuda --model.hf_assets_path=
has_torch=0
python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && has_torch=1
if [ "$has_torch" = 1 ]; then
  run "bench torch-ref 1B" 150 env PYTHONUNBUFFERED=1 python3 torch_llama_ref.py --flavor 1B \
    --seq 4096 --batch 2 --steps "$steps" --warmup 2
else
  log "(python3 has no CUDA torch: no PyTorch reference)"
fi

# ---- 3. kernel benches ------------------------------------------------------------------------
for b in "$here"/benches/cuda_*; do
  [ -x "$b" ] || continue
  run "bench $(basename "$b")" 150 "$b" --bench --warm-up-time 0.5 --measurement-time 1 --noplot
done

# ---- 3b. the PyTorch reference again with torch.compile (slower to start) -------------------
if [ "$has_torch" = 1 ]; then
  run "bench torch-ref 1B compile" 240 env PYTHONUNBUFFERED=1 python3 torch_llama_ref.py --flavor 1B \
    --seq 4096 --batch 2 --steps "$steps" --warmup 2 --compile
fi

# ---- 4. everything else -----------------------------------------------------------------------
for t in "$here"/tests/*; do
  [ -x "$t" ] || continue
  n="$(basename "$t")"
  case "$n" in cuda_*) run "test $n (not device)" 120 "$t" ;; *) run "test $n" 240 "$t" ;; esac
done

# ---- summary ----------------------------------------------------------------------------------
{
  echo ""
  echo "================ SUMMARY ================"
  for s in "${status[@]}"; do echo "$s"; done
  echo "-- tests:"
  grep -E "^test result:|^test .* FAILED|panicked at" "$res"
  echo "-- end to end and kernels:"
  grep -E "^bench: tokens/s|^torch-ref|^attention b|^SUMMARY" "$res"
} > "$out/summary.txt"
tee -a "$res" < "$out/summary.txt"
