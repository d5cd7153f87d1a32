#!/usr/bin/env bash
# One device call: unpack the bundle (scripts/gpu-bundle.sh, packed as bundle.tar.xz), run the
# CUDA tests, the end-to-end training benchmark next to the PyTorch reference, then the kernel
# benches, all under one deadline (seconds, $1). Output in $OUT/gpu.txt.
# Device call: command `bash scripts/gpu-session.sh 300`, carry ["bundle.tar.xz"].
set -u
deadline=$((SECONDS + ${1:-300}))
out="${OUT:-$PWD}"; mkdir -p "$out"; res="$out/gpu.txt"; : > "$res"
b=/tmp/titan-bundle; mkdir -p $b && tar xJf bundle.tar.xz -C $b
libdirs=""
for sp in $(python3 -c 'import site,sys; print(" ".join(site.getsitepackages()+sys.path))'); do
  for sub in nvidia/cu13/lib nvidia/cublas/lib nvidia/nccl/lib nvidia/cuda_runtime/lib; do
    [ -d "$sp/$sub" ] && libdirs="$libdirs:$sp/$sub"
  done
done
mkdir -p /tmp/nccl-link; for d in ${libdirs//:/ }; do [ -e "$d/libnccl.so.2" ] && ln -sf "$d/libnccl.so.2" /tmp/nccl-link/libnccl.so; done
export LD_LIBRARY_PATH="/tmp/nccl-link$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$res"
run() { # name, max seconds, cmd...
  local n="$1" lim="$2"; shift 2
  local left=$((deadline - SECONDS)); [ "$left" -lt 10 ] && { echo "SKIP $n (deadline)" | tee -a "$res"; return; }
  [ "$lim" -gt "$left" ] && lim=$left
  echo "==== $n" | tee -a "$res"; local t0=$SECONDS
  timeout "$lim" "$@" 2>&1 | tee -a "$res"; echo "==== $n rc=${PIPESTATUS[0]} $((SECONDS-t0))s" | tee -a "$res"
}
run "test cuda_train" 40 $b/tests/cuda_train --ignored --test-threads=1 --nocapture
run "titan bench 1B" 70 $b/bin/titan bench --config configs/llama3_1b.toml --steps 5 --warmup 2 --training.seq_len 4096 --training.local_batch_size 2 --activation_checkpoint.mode none --training.device cuda --model.hf_assets_path=
run "torch ref 1B" 60 python3 benches/torch_llama_ref.py --flavor 1B --seq 4096 --batch 2 --steps 5 --warmup 2
for t in cuda_ops cuda_attention; do run "test $t" 60 $b/tests/$t --ignored --test-threads=1; done

run "bench cuda_kernels" 60 $b/benches/cuda_kernels --bench --warm-up-time 0.3 --measurement-time 0.7 --noplot
echo "==== summary" | tee -a "$res"; grep -E "^==== .*rc=|^test result|FAILED|panicked|^bench:|^torch-ref|SUMMARY|SKIP" "$res" | tee "$out/summary.txt"
