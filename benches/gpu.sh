#!/usr/bin/env bash
# Runs the prebuilt registration bench on a machine with an NVIDIA GPU, without building:
# the binary built here is carried over, and libtorch comes from that machine's PyTorch 2.11
# (LD_LIBRARY_PATH is searched before the binary's baked-in run path).
#
# Usage: benches/gpu.sh [BENCH_BINARY] [FILTER]
#   BENCH_BINARY defaults to the newest target/release/deps/register-* executable.
#   FILTER keeps the cases whose name contains it (e.g. 1mm).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-}"
if [[ -z "$bin" ]]; then
    bin=$(ls -t target/release/deps/register-* 2>/dev/null | grep -v '\.d$' | head -n 1 || true)
fi
if [[ -z "$bin" || ! -x "$bin" ]]; then
    echo "gpu.sh: no bench binary; build it with 'cargo bench --bench register --no-run'" >&2
    exit 2
fi
python="${PYTHON:-python3}"
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$bin" ${2:+"$2"}
# Several subjects per device call (the register node's `batch`): seconds per pair.
VOXFLOW_BENCH_BATCH="${VOXFLOW_BENCH_BATCH:-4}" "$bin" "fs->oasis 1mm"
