#!/usr/bin/env bash
# Runs the whole test suite (unit, torture corpus, end-to-end on the real data), after the
# same formatting and lint checks CI makes. First call installs voxflow's PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace "$@"
