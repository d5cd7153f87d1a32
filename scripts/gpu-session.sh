#!/usr/bin/env bash
# One device-tool call: unpack bundle.tar.xz (scripts/gpu-bundle.sh) and run everything in it,
# most important first (bundle's run-gpu.sh), under one deadline in seconds ($1, default 300).
# Results: $OUT/results.txt and $OUT/summary.txt.
# Device call: command `bash scripts/gpu-session.sh 300`, carry ["bundle.tar.xz"].
set -u
b=/tmp/titan-bundle
mkdir -p "$b" && tar xJf bundle.tar.xz -C "$b" || { echo "cannot unpack bundle.tar.xz"; exit 1; }
TITAN_DEADLINE="${1:-300}" exec "$b/run-gpu.sh"
