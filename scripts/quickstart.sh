#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded defaults: LeapAlign on the miniature world
# (the shipped pretrained mini Flux + learned scorer), one Ray Train worker on a private local Ray
# cluster, MLflow in ./mlflow.db. Prints held-out accuracy before/after; extra key=value arguments
# override experiments/quickstart.yaml (e.g. train.seed=1, ray.enabled=false).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/leapalign train experiments/quickstart.yaml "$@"
