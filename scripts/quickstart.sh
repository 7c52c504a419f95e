#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded defaults: local process, local MLflow
# store (sqlite:///mlflow.db), a tiny Flux built here. Extra key=value arguments override the config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
[ -f .cache/tiny-flux/model_index.json ] || .venv/bin/leapalign build-tiny .cache/tiny-flux
exec .venv/bin/leapalign train experiments/tiny_demo.yaml "$@"
