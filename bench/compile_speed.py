"""Eager vs compiled (sampler.compile) and 1 vs 2 torch threads: the quickstart's update and evaluation.

    .venv/bin/python bench/compile_speed.py                  # 3 rounds, 30 updates, 600 held-out images
    .venv/bin/python bench/compile_speed.py --quick          # 1 round, 6 updates, 64 images (a smoke test)

Every variant runs in a fresh process on experiments/quickstart.yaml in one process (ray.enabled=false,
seed 0, train.cpu_isa=native: compiled CPU code needs the machine's own kernels), rounds interleaved so that a busy machine slows every variant alike. Reported per variant: the
median update (after 3 warm-up updates), the base model's evaluation of the held-out prompts (images/s), the
first call's extra seconds (compile, with the inductor cache cold in round 1 and warm after), and the
numbers: the first update's loss (before any optimizer step: later updates drift apart chaotically) and the
evaluation images, against the eager run with the same threads. "today" is the quickstart as it was: one
thread, eager.
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
VARIANTS = (
    ("today: 1 thread, eager", 1, "false"),
    ("2 threads, eager", 2, "false"),
    ("2 threads, compiled", 2, "true"),
)


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    from leapalign.config import load_config
    from leapalign.evaluation import load_eval_prompts, sample_images
    from leapalign.logs import quiet_libraries
    from leapalign.methods import DIRECT_METHODS
    from leapalign.run import TrainingRun
    from leapalign.world.judge import evaluate_batch

    quiet_libraries()
    overrides = [
        "ray.enabled=false", "tracking.enabled=false", "eval.prompts=null", f"train.torch_threads={args.threads}",
        "train.cpu_isa=native",  # compiled CPU code needs the native kernels (leapalign.config.compile_enabled)
        f"sampler.compile={args.compile}", f"train.output_dir={args.out}/run",
    ]  # fmt: skip
    cfg = load_config(REPO / "experiments" / "quickstart.yaml", overrides)
    run = TrainingRun(cfg, progress=False)
    eval_cfg = load_config(
        REPO / "experiments" / "quickstart.yaml", [f"sampler.compile={args.compile}", "train.cpu_isa=native"]
    )
    prompts = load_eval_prompts(eval_cfg.eval.prompts, args.eval_prompts)
    # 1. The base model's evaluation (no update yet); the first batch alone carries the compile.
    start = time.perf_counter()
    sample_images(run.policy, eval_cfg, prompts[: eval_cfg.eval.batch_size], progress=False)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    images, shown = sample_images(run.policy, eval_cfg, prompts, progress=False)
    eval_s = time.perf_counter() - start
    batches = -(-len(prompts) // eval_cfg.eval.batch_size)
    # 2. Updates (the no-grad rollout steps are the compiled calls; the two graph calls stay eager).
    loss_fn = DIRECT_METHODS[cfg.method.name]
    times, losses = [], []
    for _ in range(args.updates):
        start = time.perf_counter()
        loss, _ = loss_fn(run.policy, run.prompt_order.next_batch(), run.reward_fn, cfg, run.sigmas, run.rng)
        loss.backward()
        run.parallel.clip_grad_norm(run.params, cfg.optim.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    np.save(Path(args.out) / "images.npy", images.numpy())
    scores = evaluate_batch(images.numpy(), shown)
    steady = times[3:] if len(times) > 3 else times
    print(json.dumps({
        "update_s": statistics.median(steady), "first_update_s": times[0], "losses": losses,
        "eval_s": eval_s, "eval_images": len(images), "compile_s": first_s - eval_s / batches,
        "overall": float(scores["overall"]),
    }))  # fmt: skip


def run_variant(threads: int, compile_: str, updates: int, eval_prompts: int, cache: Path, out: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--compile", compile_,
               "--updates", str(updates), "--eval-prompts", str(eval_prompts), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"variant threads={threads} compile={compile_} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", default="false")
    parser.add_argument("--out", default=None)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--eval-prompts", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, 6 updates, 64 images")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.rounds, args.updates, args.eval_prompts = 1, 6, 64
    import numpy as np

    results: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="compile-bench-") as tmp:
        cache = Path(tmp) / "inductor"  # cold in round 1, warm afterwards (as on a user's machine)
        images = {}
        for round_ in range(args.rounds):
            for name, threads, compile_ in VARIANTS:
                out = Path(tmp) / f"{threads}-{compile_}"
                out.mkdir(exist_ok=True)
                result = run_variant(threads, compile_, args.updates, args.eval_prompts, cache, out)
                results[name].append(result)
                images[name] = np.load(out / "images.npy")
                print(f"round {round_ + 1}: {name}: update {result['update_s']:.3f} s, eval {result['eval_s']:.1f} s",
                      file=sys.stderr)  # fmt: skip
    today = results[VARIANTS[0][0]]
    base_update = statistics.median(r["update_s"] for r in today)
    base_eval = statistics.median(r["eval_s"] for r in today)
    print(f"quickstart config, one process, {args.updates} updates (median after 3), "
          f"{today[0]['eval_images']} held-out images, median of {args.rounds} round(s)")  # fmt: skip
    header = ("variant", "update s", "x today", "eval s", "x today", "first batch +s (cold / warm cache)",
              "1st loss vs eager", "images vs eager", "held-out overall")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, threads, _ in VARIANTS:
        rows = results[name]
        update = statistics.median(r["update_s"] for r in rows)
        evaluation = statistics.median(r["eval_s"] for r in rows)
        extra = [r["compile_s"] for r in rows]
        warm = f"{statistics.median(extra[1:]):.1f}" if len(extra) > 1 else "-"
        eager = next(n for n, t, c in VARIANTS if t == threads and c == "false")
        loss_diff = abs(rows[0]["losses"][0] - results[eager][0]["losses"][0]) / abs(
            results[eager][0]["losses"][0]
        )
        pixel_diff = float(np.abs(images[name] - images[eager]).max())
        print(f"| {name} | {update:.3f} | {base_update / update:.2f} | {evaluation:.1f} | {base_eval / evaluation:.2f} "
              f"| {extra[0]:.1f} / {warm} | {loss_diff:.1e} | {pixel_diff:.1e} | {100 * rows[0]['overall']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
