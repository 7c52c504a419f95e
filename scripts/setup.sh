#!/usr/bin/env bash
# Set up .venv on a fresh machine (Python 3.11): CPU torch first and alone, then the project.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# torch first and alone: the pinned CPU wheel. Letting pip resolve a bare `torch` among the other
# requirements pulls a multi-GB CUDA build on a CPU machine.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet torch==2.13.0
fi
if ! .venv/bin/python -c "import leapalign, ray, diffusers, mlflow, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.leapalign-installed ]; then
  .venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import leapalign, ray, diffusers, mlflow, peft, pytest"
  touch .venv/.leapalign-installed
fi
