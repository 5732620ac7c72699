#!/usr/bin/env bash
# The peer venv for benchmarks/peers/compare.py: SAELens (via setup_saelens.sh), then
# dictionary_learning and sparsify into the same venv.
#
# Why these steps: SAELens pins transformer-lens < 4 (saekit uses 4), so the peers live apart
# from saekit.  dictionary-learning depends on nnsight, which pulls torchvision and, left alone,
# a CUDA build of torch; a constraints file holds torch at saekit's version (CPU build), and
# torchvision, which none of the code we run imports, is removed afterwards.  eai-sparsify
# installs against the same torch.  A peer that fails to install is reported and skipped by
# compare.py; this script stops at the first failure.
#
# Usage: bash benchmarks/peers/setup_peers.sh [VENV_DIR]   (default: $SAELENS_VENV or /work/venv-saelens)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${SAELENS_VENV:-/work/venv-saelens}}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

bash "$HERE/setup_saelens.sh" "$VENV"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" dictionary-learning eai-sparsify
"$VENV/bin/pip" uninstall --quiet -y torchvision || true
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
import dictionary_learning, sae_lens, sparsify  # noqa: F401  (each must import)
print("peers:", ", ".join(f"{p} {md.version(p)}" for p in ("sae-lens", "dictionary-learning", "eai-sparsify")), "| torch", torch.__version__)
EOF
echo "peer venv ready: $VENV"
