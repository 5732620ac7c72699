#!/usr/bin/env bash
# Make a separate virtual environment with the original Codebook Features library (PyPI
# `codebook-features` 0.1.2), for benchmarks/codebook_speed.py.
#
# Why separate: the library pins transformer-lens 1.7.0 and needs the versions of its own
# lock file (found from outside: newer transformers/datasets break its TokFSM script), while
# saekit uses TransformerLens 4.  torch is pinned to saekit's CPU build so both sides run
# the same kernels; the triton wheel the library pulls in is removed (CPU only).
#
# Usage: bash benchmarks/peers/setup_codebook_features.sh [VENV_DIR]
#        (default: $CODEBOOK_VENV or /work/venvs/codebook-features)
set -euo pipefail

VENV="${1:-${CODEBOOK_VENV:-/work/venvs/codebook-features}}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/pip" install --quiet "codebook-features==0.1.2" "torch==$TORCH_VERSION" \
    "transformers==4.34.1" "accelerate==0.24.0" "datasets==2.14.6" "numpy==1.26.4" "pyarrow==14.0.1" \
    "pandas==2.1.2" "typeguard==2.13.3" "jaxtyping==0.2.23" "scipy==1.11.3" "scikit-learn==1.3.2" \
    "evaluate==0.4.1" "einops==0.7.0"
"$VENV/bin/pip" uninstall --quiet --yes triton 2>/dev/null || true
"$VENV/bin/python" -c "import codebook_features.models, torch, transformers; print('codebook-features 0.1.2, torch', torch.__version__, 'transformers', transformers.__version__)"
echo "Codebook Features venv ready: $VENV"
