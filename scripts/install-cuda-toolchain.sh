#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI into .venv-cuda (no system CUDA needed).
# Versions are pinned together: an unpinned nvvm/crt pulls a newer PTX ISA that this ptxas rejects.
# build.rs finds nvcc at .venv-cuda/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${TITAN_CUDA_VENV:-$root/.venv-cuda}"
if ls "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  echo "cuda toolchain: already installed in $venv"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
nvcc=$(ls "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc)
"$nvcc" --version | tail -n 2
echo "cuda toolchain: $nvcc"
