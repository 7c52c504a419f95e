"""CPU benchmark: time and peak memory of one update as the number of sampling steps N grows.

    .venv/bin/python bench/cpu_memory.py                       # ~3 CPU-min; 7.5 min on 2 busy shared cores
    .venv/bin/python bench/cpu_memory.py --quick               # smoke test, ~1 min
    .venv/bin/python bench/cpu_memory.py --steps 10 50 --reps 5 --json /tmp/cpu_memory.json

Methods, each one full update (rollout, decode, reward, backward, grad clip, AdamW step) built from
the project's own pieces on a small random Flux (leapalign.models.tiny) with a LoRA r8 adapter
(leapalign.finetune.apply_finetune), fp32 on CPU:
  leapalign    rollout_with_leaps -> FluxPolicy.decode(x_0) -> reward -> similarity_weight, hinge_loss
  full_ckpt    full_backprop_rollout (graph through all N steps), gradient checkpointing on
  full         full_backprop_rollout, gradient checkpointing off
  refl         refl_rollout (one step with a graph, leap to x_hat_0)
leapalign and refl run with gradient checkpointing on, as in training (FinetuneConfig default) and
in shared/bench/flux_gpu_anchor.py. The leap pair is fixed at k = 2, j = N // 2 like the anchor and
ReFL's step at the middle of its window (t = N - 6 for N >= 11): which steps carry the graph does
not change the cost, and fixed steps keep the medians comparable. The reward is ColorMatch("red")
with a hinge above any reachable reward, so every sample sends a gradient.

How memory is measured (the part that is easy to get wrong):
- Every (method, N) runs in a FRESH child process, so no other measurement's allocations linger.
  The parent imports no torch: the kernel carries the size of the process that spawned a child
  into the child's ru_maxrss (as a floor that nothing resets), and a small parent keeps that floor
  far below what a child measures.
- In the child: build the model, run one warm-up update of the same method and N (optimizer state,
  oneDNN primitives and other one-time allocations land in the baseline, not in the measurement),
  then gc + malloc_trim(0) so that freed heap pages go back to the OS (otherwise glibc would serve
  the measured update from memory it kept, hiding part of its peak), read VmRSS as the baseline,
  and reset the kernel's high-water mark by writing "5" to /proc/self/clear_refs (Linux >= 4.0;
  this resets VmHWM, and ru_maxrss down to that floor). Then exactly one update runs and VmHWM - baseline is its
  peak extra memory; ru_maxrss is read as a cross-check. Without clear_refs (other kernels) the
  child says so and falls back to max(0, VmHWM - baseline), which can only under-report.
  RSS is what the OS sees, and it moves by a few MiB from run to run with malloc's arena and
  fragmentation state (at 80 px LeapAlign's ~30 MiB read 27-34 MiB across N and runs, with no
  trend; at 64 px 19-22 MiB), so a ratio of two small RSS peaks carries about +-10% noise. RSS also overstates what
  full backprop needs: glibc's dynamic mmap threshold moves mid-sized tensors into the heap, whose
  freed holes stay resident. With MALLOC_MMAP_THRESHOLD_=131072 in the environment (children
  inherit it) full_ckpt at N=50 read 77 MiB RSS for 50 MiB of tensors instead of 291 MiB, at the
  price of slower updates (a page fault per large allocation); the default is left as users get it.
- One last update runs under the torch profiler, whose memory events give the peak of live TENSOR
  bytes allocated during the update: exact and repeatable (no allocator noise), blind to
  non-tensor memory. It is the column to read for "does memory grow with N".
- Time is the median of --reps further updates in the same child, with no trimming in between (the
  steady state of a training loop), as CPU time of the child (time.process_time) and wall time.
  Ratios use CPU time: on a machine shared with other jobs, wall time measured how busy the others
  were (in one run here full backprop at N=10 came out 0.6x LeapAlign's wall time), while with one
  torch thread the child's CPU time is its own work and equals wall time on an idle machine. Torch
  runs on --threads threads (default 1): on 2 cores shared with other jobs, 2 OpenMP threads were
  10-100x slower than 1 whenever another process was busy.

Prints progress on stderr, a JSON line per measurement on stdout, then a table: time per update,
peak extra RSS and peak tensor bytes with ratios to LeapAlign at the same N (measured in the same
run), and per method the ratios N_max / N_min. Expected: LeapAlign flat in N (two transformer graphs,
whatever N), full backprop growing linearly, ReFL flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime

METHODS = ("leapalign", "full_ckpt", "full", "refl")

# Model and workload sizes. "default": activations dominate (256 image tokens, 64 text tokens,
# hidden 128, 2 double + 2 single blocks, ~1.9M transformer weights); "quick": the tiny test model.
SIZES = {
    "default": dict(
        num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
        axes_dims_rope=(8, 12, 12), resolution=64, batch_size=1, max_sequence_length=64,
    ),
    "quick": dict(
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        axes_dims_rope=(4, 6, 6), resolution=32, batch_size=1, max_sequence_length=16,
    ),
}  # fmt: skip
LORA_RANK = 8
GUIDANCE_SCALE = 3.5
ALPHA = 0.3  # LeapAlign gradient discount (HPSv2.1 setting)
TAU = 0.1  # similarity-weight floor
HINGE = 1.0  # ColorMatch rewards lie in [0, 1]: every sample is below the hinge and sends a gradient
REFL_LAST_STEPS = 11  # ReFL's window: the last m = 11 steps
PROMPT = "a red square"


# ----------------------------------------------------------------------------- child: one measurement


def read_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM (and ru_maxrss) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the OS (no-op without glibc)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_tensor_bytes(fn) -> int | None:
    """Peak of the live bytes of tensors allocated during fn(), from the torch profiler's memory events.

    Counts what the c10 allocator hands out (tensors), not what malloc keeps: exact and repeatable,
    a cross-check on the RSS figure. None where this torch build does not expose the raw events.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        ]
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):  # stable: same-time events keep their order
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(job: dict) -> dict:
    """Build the model, warm up, measure one update's peak extra RSS, time `reps` updates, then
    measure one update's peak tensor bytes under the profiler."""
    import resource
    import statistics

    import torch

    from leapalign.config import FinetuneConfig
    from leapalign.finetune import apply_finetune
    from leapalign.methods.full_backprop import full_backprop_rollout
    from leapalign.methods.leapalign import hinge_loss, rollout_with_leaps, similarity_weight
    from leapalign.methods.refl import refl_rollout
    from leapalign.models.flux import FluxPolicy
    from leapalign.models.tiny import TinyFluxSpec, build_tiny_flux_pipeline
    from leapalign.rewards.simple import ColorMatch

    method, num_steps, size = job["method"], job["num_steps"], SIZES[job["size"]]
    torch.set_num_threads(job["threads"])
    t_build = time.perf_counter()
    spec = TinyFluxSpec(
        num_layers=size["num_layers"],
        num_single_layers=size["num_single_layers"],
        attention_head_dim=size["attention_head_dim"],
        num_attention_heads=size["num_attention_heads"],
        axes_dims_rope=size["axes_dims_rope"],
    )
    policy = FluxPolicy(build_tiny_flux_pipeline(spec, seed=0), torch.device("cpu"))
    finetune = FinetuneConfig(
        mode="lora", lora_rank=LORA_RANK, lora_alpha=LORA_RANK, gradient_checkpointing=method != "full"
    )
    params = apply_finetune(policy.transformer, finetune)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    reward_fn = ColorMatch(color="red")
    height = width = size["resolution"]
    prompts = [PROMPT] * size["batch_size"]
    cond = policy.encode_prompts(prompts, size["max_sequence_length"])  # frozen: encoded once
    sigmas = policy.sigmas(num_steps, height, width)  # [N + 1]
    k, j = 2, num_steps // 2  # the anchor's pair; needs N >= 6
    refl_step = (max(0, num_steps - REFL_LAST_STEPS) + num_steps - 1) // 2
    noise = torch.Generator().manual_seed(0)
    build_s = time.perf_counter() - t_build

    def update() -> float:
        latents, image_ids = policy.prepare_latents(len(prompts), height, width, noise)  # [B, S, 4C]
        velocity = policy.velocity_fn(cond, image_ids, GUIDANCE_SCALE)
        if method == "leapalign":
            leap = rollout_with_leaps(velocity, latents, sigmas, k, j, alpha=ALPHA)
            rewards = reward_fn(policy.decode(leap.x0, height, width), prompts)  # [B]
            weight = similarity_weight(leap.d_j, leap.d_0, TAU)  # [B], no grad
        elif method == "refl":
            x0_hat = refl_rollout(velocity, latents, sigmas, refl_step)
            rewards = reward_fn(policy.decode(x0_hat, height, width), prompts)
            weight = torch.ones_like(rewards)
        else:
            x0 = full_backprop_rollout(velocity, latents, sigmas)
            rewards = reward_fn(policy.decode(x0, height, width), prompts)
            weight = torch.ones_like(rewards)
        loss = hinge_loss(rewards, weight, HINGE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    # 1. Warm-up: one-time allocations become part of the baseline.
    t0 = time.perf_counter()
    update()
    warmup_s = time.perf_counter() - t0
    # 2. Memory: exactly one update after a clean baseline and a reset high-water mark.
    release_free_memory()
    baseline_kib = read_status_kib("VmRSS")
    reset_ok = reset_peak_rss()
    hwm_before_kib = read_status_kib("VmHWM")
    t0 = time.perf_counter()
    update()
    memory_update_s = time.perf_counter() - t0
    hwm_kib = read_status_kib("VmHWM")
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # 3. Time: steady-state updates, no trimming in between.
    times, cpu_times = [], []
    for _ in range(job["reps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        update()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    # 4. Tensor bytes, last: the profiler's own allocations fragment the heap; with a profiled
    #    warm-up, LeapAlign's RSS peak at N=50 (80 px) read 11 MiB (35%) higher than without one.
    tensor_peak = peak_tensor_bytes(update)
    return {
        "event": "measurement",
        "method": method,
        "num_steps": num_steps,
        "size": job["size"],
        "image_tokens": policy.image_seq_len(height, width),
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu_times),
        "all_s": [round(t, 4) for t in times],
        "all_cpu_s": [round(t, 4) for t in cpu_times],
        "memory_update_s": round(memory_update_s, 4),
        "warmup_s": round(warmup_s, 4),
        "build_s": round(build_s, 2),
        "peak_extra_mib": max(0, hwm_kib - baseline_kib) / 1024,
        "peak_tensor_mib": tensor_peak / 2**20 if tensor_peak is not None else None,
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_rss_mib": hwm_kib / 1024,
        "ru_maxrss_mib": maxrss_kib / 1024,
        "hwm_reset": reset_ok and hwm_before_kib <= baseline_kib + 1024,
        "trainable_params": sum(p.numel() for p in params),
        "threads": job["threads"],
    }


# ----------------------------------------------------------------------------- parent: run children, report


def run_child(job: dict, timeout_s: float) -> dict:
    """One measurement in a fresh interpreter; its last stdout line is the result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"child {job['method']} N={job['num_steps']} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def format_table(results: list[dict], methods: list[str], steps: list[int]) -> str:
    by_key = {(r["method"], r["num_steps"]): r for r in results}
    lines = [
        f"{'method':<11}{'N':>4}{'cpu s/upd':>11}{'vs leap':>9}{'wall s/upd':>12}"
        f"{'RSS MiB':>10}{'vs leap':>9}{'tensor MiB':>12}{'vs leap':>9}",
    ]
    for n in steps:
        leap = by_key.get(("leapalign", n))
        for m in methods:
            r = by_key[(m, n)]
            vs_leap = {
                key: ratio(r[key] or 0.0, leap[key] or 0.0) if leap else "n/a"
                for key in ("median_cpu_s", "peak_extra_mib", "peak_tensor_mib")
            }
            lines.append(
                f"{m:<11}{n:>4}{r['median_cpu_s']:>11.3f}{vs_leap['median_cpu_s']:>9}{r['median_s']:>12.3f}"
                f"{r['peak_extra_mib']:>10.1f}{vs_leap['peak_extra_mib']:>9}"
                f"{r['peak_tensor_mib'] or float('nan'):>12.1f}{vs_leap['peak_tensor_mib']:>9}"
            )
    lo, hi = min(steps), max(steps)
    if lo != hi:
        lines.append(f"\nN={hi} / N={lo}:")
        for m in methods:
            a, b = by_key[(m, hi)], by_key[(m, lo)]
            lines.append(
                f"  {m:<11} cpu time {ratio(a['median_cpu_s'], b['median_cpu_s']):>7}"
                f"   RSS {ratio(a['peak_extra_mib'], b['peak_extra_mib']):>7}"
                f"   tensor {ratio(a['peak_tensor_mib'] or 0.0, b['peak_tensor_mib'] or 0.0):>7}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], help="sampling steps N (>= 6)")
    parser.add_argument("--reps", type=int, default=3, help="timed updates per (method, N); median reported")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="tiny model, N in {6, 12}, 1 rep: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (see docstring)")
    parser.add_argument("--json", type=str, default=None, help="write config + all measurements here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per child")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return

    size = "quick" if args.quick else "default"
    steps = [6, 12] if args.quick and args.steps == [10, 25, 50] else sorted(args.steps)
    reps = 1 if args.quick else args.reps
    if min(steps) < 6:
        parser.error("--steps: every N must be >= 6 (the leap pair is k = 2, j = N // 2)")
    # Interleaved by N so that a slow spell on the shared machine hits all methods of one N alike.
    jobs = [
        dict(method=m, num_steps=n, reps=reps, size=size, threads=args.threads)
        for n in steps
        for m in args.methods
    ]
    print(f"cpu_memory: {len(jobs)} fresh processes, size={size} {SIZES[size]}", file=sys.stderr, flush=True)
    results = []
    start = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        result = run_child(job, args.timeout)
        results.append(result)
        print(json.dumps(result), flush=True)
        warn = "" if result["hwm_reset"] else "  (high-water mark NOT reset: peak may be under-reported)"
        tensor_mib = result["peak_tensor_mib"] or float("nan")
        print(
            f"[{i}/{len(jobs)}] {job['method']:<10} N={job['num_steps']:<3} "
            f"{result['median_cpu_s']:.3f} cpu s/update ({result['median_s']:.3f} wall), "
            f"peak +{result['peak_extra_mib']:.1f} MiB RSS, {tensor_mib:.1f} MiB tensors "
            f"(elapsed {time.perf_counter() - start:.0f} s){warn}",
            file=sys.stderr,
            flush=True,
        )
    table = format_table(results, args.methods, steps)
    print("\n" + table)
    if args.json:
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "config": {
                "size": size,
                **SIZES[size],
                "lora_rank": LORA_RANK,
                "steps": steps,
                "reps": reps,
                "threads": args.threads,
                "alpha": ALPHA,
                "tau": TAU,
                "hinge": HINGE,
            },
            "results": results,
            "table": table,
            "elapsed_s": round(time.perf_counter() - start, 1),
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
