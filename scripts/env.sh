# Sourced by the other scripts: makes sure voxflow's own PyTorch (for libtorch) is installed in
# a per-user cache shared by every clone, and exports what the tch build needs.
# The first call downloads torch==2.11.0 from PyPI (~80 s); later calls reuse it.
set -euo pipefail
VOXFLOW_TORCH_VERSION=2.11.0
VOXFLOW_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/voxflow"
VOXFLOW_VENV="$VOXFLOW_CACHE/torch-$VOXFLOW_TORCH_VERSION"
if ! "$VOXFLOW_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$VOXFLOW_TORCH_VERSION')" 2>/dev/null; then
    echo "voxflow: installing torch==$VOXFLOW_TORCH_VERSION into $VOXFLOW_VENV (once per user)" >&2
    mkdir -p "$VOXFLOW_CACHE"
    python3 -m venv "$VOXFLOW_VENV"
    "$VOXFLOW_VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$VOXFLOW_TORCH_VERSION" numpy
fi
export VIRTUAL_ENV="$VOXFLOW_VENV"
export PATH="$VOXFLOW_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# tch 0.24 was released against an earlier libtorch; its API is what voxflow uses and it runs
# on 2.11, which is what the GPU image ships.
export LIBTORCH_BYPASS_VERSION_CHECK=1
