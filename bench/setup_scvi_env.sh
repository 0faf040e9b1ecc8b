#!/usr/bin/env bash
# Create the benchmark environment .bench-venv with scvi-tools, beside (never inside)
# ldvae's own .venv. scvi-tools is only ever used by bench/compare_scvi.py.
#
#   bash bench/setup_scvi_env.sh            # creates /path/to/repo/.bench-venv
#   BENCH_VENV=/tmp/bv bash bench/setup_scvi_env.sh
#
# torch is pinned to the CPU build used by ldvae's environment, so pip never pulls a
# CUDA torch while resolving scvi-tools' dependencies. On a CUDA machine set
# TORCH_SPEC to the torch already installed there (e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BENCH_VENV=${BENCH_VENV:-.bench-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SCVI_SPEC=${SCVI_SPEC:-scvi-tools==1.4.2}

if [ -x "$BENCH_VENV/bin/python" ] && "$BENCH_VENV/bin/python" -c "import scvi" 2>/dev/null; then
    echo "$BENCH_VENV already has scvi-tools $("$BENCH_VENV/bin/python" -c 'import scvi; print(scvi.__version__)')"
    exit 0
fi
"$PYTHON" -m venv "$BENCH_VENV"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" > "$constraints"
"$BENCH_VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
# scanpy + scikit-misc: the benchmark selects seurat_v3 HVGs in the same way in both envs.
"$BENCH_VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" \
    "$SCVI_SPEC" scanpy scikit-misc psutil
"$BENCH_VENV/bin/python" -c "import torch, scvi; print('bench env: torch', torch.__version__, '| scvi-tools', scvi.__version__)"
