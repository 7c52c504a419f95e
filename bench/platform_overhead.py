"""Platform overhead: wall time per update against the update's own time, on both execution paths.

    .venv/bin/python bench/platform_overhead.py                  # 60 updates per path, 2 rounds
    .venv/bin/python bench/platform_overhead.py --updates 10     # a quick check

The quickstart config (experiments/quickstart.yaml, seed 0, no held-out evaluation: it is timed apart)
runs through the real command, `leapalign train`, once in one process (ray.enabled=false) and once on
the Ray path (a private cluster, one Ray Train worker, the reward on a Ray Serve deployment), rounds
interleaved. From each run's metrics.jsonl: the wall time between the end of its first and its last
update (`time/wall_s`) over the sum of those updates' own time (`time/step_s`: rollout, backward,
optimizer). 1.00 means nothing outside the updates costs time; the issue's goal is <= 1.10 on both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(path: str, updates: int, out: Path) -> dict:
    command = [
        sys.executable, "-m", "leapalign", "train", str(REPO / "experiments" / "quickstart.yaml"),
        f"ray.enabled={'true' if path == 'ray' else 'false'}", f"train.iterations={updates}", "eval.prompts=null",
        f"train.output_dir={out}", f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}", "train.overwrite=true",
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    command_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{path} run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r and r["step"] >= 1]
    wall = rows[-1]["time/wall_s"] - rows[0]["time/wall_s"]
    own = sum(r["time/step_s"] for r in rows[1:])
    return {"ratio": wall / own, "wall_s": wall, "step_s": own / (len(rows) - 1), "command_s": command_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"one process": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for round_ in range(args.rounds):
            for name, path in (("one process", "local"), ("ray", "ray")):
                result = one_run(path, args.updates, Path(tmp) / f"{path}-{round_}")
                results[name].append(result)
                print(f"round {round_ + 1} {name}: wall/step {result['ratio']:.3f}", file=sys.stderr)
    print(f"quickstart config, {args.updates} updates per run, {args.rounds} round(s); ratio = wall time from the "
          f"first to the last update / the updates' own time (median over rounds)")  # fmt: skip
    print("| path | wall / update time | update s | whole command s |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r['ratio'] for r in rows):.3f} | "
              f"{statistics.median(r['step_s'] for r in rows):.3f} | {statistics.median(r['command_s'] for r in rows):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
