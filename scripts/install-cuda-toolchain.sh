#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI into .venv-cuda (no system CUDA needed).
# Versions are pinned together: an unpinned nvvm/crt pulls a newer PTX ISA that this ptxas rejects.
# build.rs finds nvcc at .venv-cuda/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc.
#
# --nccl also installs NCCL for running the GPU communicator (engine/dist/nccl.rs; not needed to
# build): the pinned nvidia-nccl-cu13 wheel (2.30.7, the API level of cudarc's bindings), plus the
# link libnccl.so -> libnccl.so.2 that cudarc's loader looks for (the wheel ships only the
# versioned name). Put the directory it prints on LD_LIBRARY_PATH when running.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${TITAN_CUDA_VENV:-$root/.venv-cuda}"
nccl=0
for a in "$@"; do
  case "$a" in
    --nccl) nccl=1 ;;
    *) echo "usage: $0 [--nccl]" >&2; exit 2 ;;
  esac
done
have_nvcc() { ls "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; }
have_nccl() { ls "$venv"/lib/python3.*/site-packages/nvidia/nccl/lib/libnccl.so.2 >/dev/null 2>&1; }
pkgs=()
have_nvcc || pkgs+=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
                    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
[ "$nccl" = 1 ] && ! have_nccl && pkgs+=(nvidia-nccl-cu13==2.30.7)
if [ ${#pkgs[@]} -eq 0 ]; then
  echo "cuda toolchain: already installed in $venv"
else
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}"
  nvcc=$(ls "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc)
  "$nvcc" --version | tail -n 2
  echo "cuda toolchain: $nvcc"
fi
if [ "$nccl" = 1 ]; then
  lib=$(dirname "$(ls "$venv"/lib/python3.*/site-packages/nvidia/nccl/lib/libnccl.so.2)")
  ln -sfn libnccl.so.2 "$lib/libnccl.so"
  echo "nccl: $lib (run with LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH})"
fi
