#!/usr/bin/env bash
# Builds everything that must run on a GPU machine (which has no Rust toolchain) into ./bundle:
#   bundle/bin/titan            release binary (--features cuda)
#   bundle/tests/<name>         every test executable (lib unit tests + tests/*.rs), release
#   bundle/benches/<name>       every bench executable
#   bundle/configs/, bundle/torch_llama_ref.py   what the end-to-end benchmark and its PyTorch
#                               reference read there
#   bundle/run-gpu.sh           runs all of it there, output to $OUT/results.txt (or ./results.txt)
#   bundle/ptxas-report.txt     registers / shared memory / spills per kernel
# Binaries are stripped. The same tree is packed as ./bundle.tar.xz (git-ignored: name it in the
# device call's carry list); it must stay under 64 MiB, the device tool's carry limit.
# On the GPU machine: mkdir -p /tmp/b && tar xJf bundle.tar.xz -C /tmp/b && /tmp/b/run-gpu.sh
# Usage: scripts/gpu-bundle.sh   (NVCC / CARGO_TARGET_DIR are honoured as for cargo build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bundle="$root/bundle"
rm -rf "$bundle" "$root/bundle.tar.xz"
stage="$bundle"
mkdir -p "$stage/bin" "$stage/tests" "$stage/benches"

# Executables cargo reports (one JSON line per artifact), for a given cargo subcommand.
executables() {
  cargo "$@" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    # Test harnesses only (profile.test): not the plain binaries or examples cargo also builds.
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kinds = m["target"]["kind"]
        print(m["target"]["name"], ",".join(kinds), m["executable"])
'
}

echo "== building (release, --features cuda)"
cargo build --release --features cuda --bin titan
cargo test --release --features cuda --no-run
cargo bench --features cuda --no-run

cp "$(cargo build --release --features cuda --bin titan --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])
' | tail -n 1)" "$stage/bin/titan"

executables test --release --features cuda --no-run | while read -r name kind exe; do
  case "$kind" in
    lib) dst="$stage/tests/lib-$name" ;;
    bin) dst="$stage/tests/bin-$name" ;;
    *) dst="$stage/tests/$name" ;;
  esac
  cp "$exe" "$dst"
done
executables bench --features cuda --no-run | while read -r name kind exe; do
  case "$kind" in
    bench) cp "$exe" "$stage/benches/$name" ;;
  esac
done

if command -v strip >/dev/null; then
  strip "$stage"/bin/* "$stage"/tests/* "$stage"/benches/* 2>/dev/null || true
fi
report=$(ls -t "${CARGO_TARGET_DIR:-$root/target}"/release/build/titan-*/out/ptxas-report.txt 2>/dev/null | head -n 1 || true)
if [ -n "$report" ]; then cp "$report" "$stage/ptxas-report.txt"; fi
cp "$root/scripts/run-gpu.sh" "$bundle/run-gpu.sh"
chmod +x "$bundle/run-gpu.sh"
cp -r "$root/configs" "$bundle/configs"
cp "$root/benches/torch_llama_ref.py" "$bundle/torch_llama_ref.py"
( cd "$bundle" && find . -type f | sort | xargs ls -la ) > "$root/bundle.manifest.tmp"
mv "$root/bundle.manifest.tmp" "$bundle/MANIFEST.txt"
tar -C "$bundle" -cJf "$root/bundle.tar.xz" .

size=$(stat -c %s "$root/bundle.tar.xz")
echo "== bundle: $bundle ($(du -sm "$bundle" | cut -f1) MiB), packed: $root/bundle.tar.xz ($((size / 1024 / 1024)) MiB)"
cat "$bundle/MANIFEST.txt"
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "bundle.tar.xz is over 64 MiB: drop test executables that need no GPU" >&2
  exit 1
fi
echo "== on the GPU machine, with bundle.tar.xz in the current folder, this runs everything and"
echo "   writes \$OUT/results.txt (./results.txt without OUT) and summary.txt:"
echo "mkdir -p /tmp/titan-bundle && tar xJf bundle.tar.xz -C /tmp/titan-bundle && TITAN_DEADLINE=900 /tmp/titan-bundle/run-gpu.sh"
