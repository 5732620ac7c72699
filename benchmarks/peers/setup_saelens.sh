#!/usr/bin/env bash
# Make a separate virtual environment with SAELens, for benchmarks/peers/saelens_roundtrip.py.
#
# Why separate: SAELens pins transformer-lens < 4 while saekit uses TransformerLens 4's
# TransformerBridge, so both cannot live in one environment.  The round-trip script only
# needs torch + safetensors + sae-lens there; saekit itself is not installed into it.
#
# Usage: bash benchmarks/peers/setup_saelens.sh [VENV_DIR]   (default: $SAELENS_VENV or /work/venv-saelens)
set -euo pipefail

VENV="${1:-${SAELENS_VENV:-/work/venv-saelens}}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# torch first, pinned to saekit's version, so sae-lens does not pull a different (CUDA) build.
"$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/pip" install --quiet sae-lens safetensors
"$VENV/bin/python" -c "import sae_lens, torch; print('sae-lens', sae_lens.__version__, 'torch', torch.__version__)"
echo "SAELens venv ready: $VENV"
