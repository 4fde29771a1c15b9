#!/usr/bin/env bash
# Runs the bundled one-shot pipeline on the real data in ../shared/data and prints where the
# results are. First call: installs voxflow's PyTorch (for libtorch) and builds (~5 min).
# Extra arguments go to `voxflow run` (e.g. --threads 2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --quiet --bin voxflow
exec ./target/release/voxflow run pipelines/oneshot-aseg.toml "$@"
