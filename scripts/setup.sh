#!/usr/bin/env bash
# Set up .venv on a fresh machine (Python 3.11): CPU torch first and alone, then the project.
# Installs with uv where it can be had (about 40 s cold on 2 cores, 2026-12-08), with pip otherwise (about 80 s).
# uv compiles bytecode as pip does (UV_COMPILE_BYTECODE): uv does not by default, and where the environment sets
# PYTHONDONTWRITEBYTECODE (this machine does) every process, each Ray worker included, would compile torch, ray and
# diffusers from source on import: 14.3 s instead of 6.5 s per process here, the suite about twice as long.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VPY=.venv/bin/python
[ -x "$VPY" ] || "$PY" -m venv .venv
[ -x .venv/bin/uv ] || "$VPY" -m pip install --quiet --disable-pip-version-check uv 2>/dev/null || true

install() {  # pip-style arguments; uv when the venv has it
  if [ -x .venv/bin/uv ]; then
    UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 .venv/bin/uv pip install --quiet --python "$VPY" "$@"
  else
    "$VPY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
      | grep -v "is ignored: it is neither a file nor a directory" || true
  fi
}

# torch first and alone: the pinned CPU wheel. A bare `torch` resolved from PyPI among the other
# requirements is a multi-GB CUDA build on a CPU machine. uv reads no pip configuration, so it gets the
# wheel's file from pip's find-links; where there is none, pip installs torch (it knows its find-links).
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  links="${PIP_FIND_LINKS:-} $("$VPY" -m pip config get global.find-links 2>/dev/null || true)"
  wheel=""
  for file in $(for dir in $links; do echo "${dir#file://}"/torch-2.13.0+cpu-cp311-*.whl; done); do
    [ -z "$wheel" ] && [ -f "$file" ] && wheel=$file
  done
  if [ -n "$wheel" ] && [ -x .venv/bin/uv ]; then
    install "$wheel"
  else
    "$VPY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
  fi
fi
if ! "$VPY" -c "import leapalign, ray, diffusers, mlflow, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.leapalign-installed ]; then
  install -e ".[dev]"
  "$VPY" -c "import leapalign, ray, diffusers, mlflow, peft, pytest"
  touch .venv/.leapalign-installed
fi
