#!/usr/bin/env bash
# Runs a bundle made by scripts/gpu-bundle.sh (this script sits in its root, beside bin/, tests/,
# benches/) on a GPU machine without Rust: every test executable (device tests with --ignored on
# one thread, then the normal tests), then every bench with short criterion times. Output goes to $OUT/results.txt
# (./results.txt when OUT is unset); a summary follows at the end. CUDA libraries come from
# python3's nvidia wheels (cuBLAS, NCCL; a libnccl.so symlink is made for cudarc) plus the driver's
# libcuda. Knobs: TITAN_ONLY (regex on executable names, e.g. '^cuda_'), TITAN_BENCHES (regex on
# bench names, default '^cuda_'), TITAN_TEST_TIMEOUT and
# TITAN_BENCH_TIMEOUT (seconds per executable). The whole bundle is meant to fit ~6 minutes.
# Note: test executables run from a copy of the repo on that machine; tests that read files via
# the build-time CARGO_MANIFEST_DIR may not find them there.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$PWD}"
mkdir -p "$out"
res="$out/results.txt"
: > "$res"
log() { echo "$@" | tee -a "$res"; }
t_test="${TITAN_TEST_TIMEOUT:-240}"
t_bench="${TITAN_BENCH_TIMEOUT:-200}"
only="${TITAN_ONLY:-.}"   # regex on executable names: run only these
benches="${TITAN_BENCHES:-^cuda_}"   # benches to run (CPU benches are for the CPU box)

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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$res"
ls "${dirs[@]}" 2>/dev/null | grep -E "libcublas|libnccl" | sort -u | tr '\n' ' ' | tee -a "$res"; echo | tee -a "$res"

status=()
run() {  # name, timeout, command...
  local name="$1" limit="$2"; shift 2
  log ""
  log "==== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$res"
  local rc=${PIPESTATUS[0]}
  log "==== $name: exit $rc in $((SECONDS - t0)) s"
  status+=("$name rc=$rc $((SECONDS - t0))s")
}

# ---- tests ----------------------------------------------------------------------------------------
for t in "$here"/tests/*; do
  [ -x "$t" ] || continue
  n="$(basename "$t")"
  [[ "$n" =~ $only ]] || continue
  run "test $n (device, --ignored)" "$t_test" "$t" --ignored --test-threads=1 --nocapture
  run "test $n" "$t_test" "$t"
done

# ---- benches --------------------------------------------------------------------------------------
for b in "$here"/benches/*; do
  [ -x "$b" ] || continue
  n="$(basename "$b")"
  [[ "$n" =~ $only && "$n" =~ $benches ]] || continue
  run "bench $n" "$t_bench" "$b" --bench --warm-up-time 1 --measurement-time 2 --noplot
done

# ---- summary --------------------------------------------------------------------------------------
log ""
log "================ SUMMARY ================"
for s in "${status[@]}"; do log "$s"; done
log "-- test results:"
grep -E "^test result:|^test .* FAILED|panicked at" "$res" | tee -a "$res.summary" >/dev/null
cat "$res.summary" 2>/dev/null | tee -a "$res"
rm -f "$res.summary"
log "-- bench summary:"
grep "^SUMMARY" "$res" | sort -u | tee -a "$res.summary2" >/dev/null
cat "$res.summary2" 2>/dev/null | tee -a "$res"
rm -f "$res.summary2"
