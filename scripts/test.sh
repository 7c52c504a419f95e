#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# AVX2 kernels on every x86-64 CPU (train.cpu_isa=avx2, platform/leapalign/numerics.py): the pinned numbers hold
# on AVX2 and AVX-512 machines alike.
export ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT ONEDNN_MAX_CPU_ISA=AVX2
# Idle OpenMP threads sleep instead of spinning: test processes, Ray workers and replicas share 2 cores, a
# loaded machine, where spinning threads take the cores others need (bench/README.md; timing only; passed on
# to Ray workers and replicas, leapalign/numerics.py THREAD_KEYS).
export OMP_WAIT_POLICY=PASSIVE
# A loaded 2-core machine can take over Ray Train's default 60 s to start a worker group.
export RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=300
# One token for every Ray cluster the tests start (none is written to ~/.ray: two test processes would race).
export RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')}"
# Two test processes: tests one by one, except that a module with a module-scoped Ray cluster stays in one
# process (its xdist_group); the slowest tests are listed at the end.
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 "$@"
