#!/usr/bin/env bash
# Set up .venv for moe-apps on a fresh machine: torch + torchvision, torchrec with the fbgemm build that
# loads here (fbgemm-gpu-cpu without an NVIDIA driver, fbgemm-gpu with one), then the project in
# editable mode with its dev tools. Every pip call obeys scripts/constraints.txt, the one place the
# versions are pinned. Idempotent: a stamp skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  FBGEMM=fbgemm-gpu OTHER_FBGEMM=fbgemm-gpu-cpu
else
  FBGEMM=fbgemm-gpu-cpu OTHER_FBGEMM=fbgemm-gpu
fi

stamp="$VENV/.moe-apps-setup"
want="$(cat pyproject.toml scripts/constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16) $FBGEMM"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import torchrec, moe_core, moe_apps" 2>/dev/null; then
  echo "setup: $VENV is up to date ($FBGEMM)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
install() { pip install -q -c scripts/constraints.txt "$@"; }

echo "setup: torch, torchvision"
install torch torchvision
echo "setup: $FBGEMM, torchrec"
# torchrec's metadata asks for the CUDA fbgemm-gpu wheel: install it without dependencies and add its
# other needs by hand, so that only the fbgemm build chosen above is present (both builds install the
# same `fbgemm_gpu` module, hence the uninstall of the other one).
pip uninstall -q -y "$OTHER_FBGEMM" 2>/dev/null || true
install "$FBGEMM"
install --no-deps torchrec
install tensordict torchmetrics tqdm pyre-extensions
echo "setup: moe-apps (editable) with dev tools"
install -e ".[dev]"
"$VENV/bin/python" -c "import torch, torchvision, torchrec; print('setup: torch', torch.__version__, 'torchvision', torchvision.__version__, 'torchrec', torchrec.__version__)"
echo "$want" > "$stamp"
