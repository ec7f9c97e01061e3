#!/usr/bin/env bash
# Set up the environment for this repository (idempotent: a second run only checks).
#
#   VENV=.venv (default)   virtual environment to create or reuse. Point it at an existing environment
#                          (e.g. VENV=$CONDA_PREFIX) to keep its torch and its own official Detectron2.
#   PYTHON=python3         interpreter used to create the venv when it does not exist.
#
# Steps: 1. venv with torch + torchvision (kept if torch already imports)
#        2. Detectron2 (kept if `import detectron2` works; else built from the PyPI sdist by
#           tools/build_detectron2.py)
#        3. pip install -e .[dev]  (skipped when setup.py is unchanged since the last run)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PIP_C=(-c "$REPO/constraints.txt")

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] torch present: $("$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
else
  echo "[setup] installing torch + torchvision"
  "$PY" -m pip install -q "${PIP_C[@]}" torch torchvision
fi

if "$PY" -c "import detectron2.layers, detectron2.data" 2>/dev/null; then
  echo "[setup] detectron2 present: $("$PY" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))')"
else
  echo "[setup] building Detectron2 v0.6 from the PyPI sdist"
  # Build requirements of the sdist's setup.py (no build isolation) and its runtime pins.
  "$PY" -m pip install -q "${PIP_C[@]}" setuptools wheel Pillow
  "$PY" tools/build_detectron2.py --constraints "$REPO/constraints.txt"
fi

# Real sample images for the stardist_nuclei dataset: only the wheel's data files are read, so its
# heavy dependencies (TensorFlow, numba) are not installed.
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('stardist')" 2>/dev/null; then
  "$PY" -m pip install -q "${PIP_C[@]}" --no-deps stardist
fi

STAMP="$VENV/.d2ext-installed"
HASH=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && "$PY" -c "import d2ext" 2>/dev/null; then
  echo "[setup] this package already installed (editable)"
else
  echo "[setup] pip install -e .[dev]"
  "$PY" -m pip install -q "${PIP_C[@]}" -e ".[dev]"
  echo "$HASH" > "$STAMP"
fi
echo "[setup] done: $PY"
