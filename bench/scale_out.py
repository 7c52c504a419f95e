"""CPU benchmark: per-worker memory and step time of full fine-tuning, replicated (DDP) vs sharded (FSDP2).

    .venv/bin/python bench/scale_out.py                  # 1 and 2 workers, ddp and fsdp2; ~2 min on 2 cores
    .venv/bin/python bench/scale_out.py --steps 3 --json /tmp/scale_out.json

What runs: the project's own LeapAlign update (leapalign_loss -> backward -> TrainingRun.apply_gradients:
clip, AdamW, EMA) through `TrainingRun`, so the transformer is wrapped by leapalign.parallel exactly as in a
Ray Train worker; here the workers are plain processes (torch.multiprocessing, gloo on 127.0.0.1), which
is all a Ray Train worker adds for this measurement. Full fine-tuning (every weight trained, fp32) of a
small random Flux (leapalign.models.tiny with 4 double + 4 single blocks, 4 heads x 32: ~4M weights) so
that the trained state, not the activations, dominates, as it does for Flux.1-dev. The global batch is
fixed at 2 (1 worker x 2, or 2 workers x 1): strong scaling.

Columns, per worker (the largest over ranks):
- `state MiB`: bytes of the weights, gradients' room and AdamW moments plus the EMA that the rank holds
  between updates (its shards under FSDP2; the whole model under DDP). Exact.
- `peak MiB`: state + the peak of tensor bytes allocated during one update (torch profiler memory events:
  activations, gathered weights, gradients). Exact and repeatable; blind to non-tensor memory.
- `step s`: median wall time of --steps updates after a warm-up (gloo on a shared 2-core machine: read the
  trend, not the digits).
Expected: FSDP2's per-worker state and peak fall from 1 to 2 workers (each rank holds half the weights, grads
and AdamW moments); DDP's do not (every rank holds everything).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_bytes(tensor) -> int:
    """Bytes this rank holds for a tensor (its shard for a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def held_state_bytes(run) -> int:
    """Trained weights + AdamW moments + EMA shadow held by this rank (+ grads' room: same as the weights)."""
    import torch

    total = 0
    for p in run.params:
        total += 2 * local_bytes(p)  # weight + its gradient (allocated in every update)
        for value in run.optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += local_bytes(value)
    if run.ema is not None:
        total += sum(local_bytes(s) for s in run.ema.shadow)
    return total


def peak_tensor_bytes(fn) -> int:
    """Peak of the live bytes of tensors allocated during fn() (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def worker(rank: int, world: int, port: int, job: dict, queue) -> None:
    import torch
    import torch.distributed as dist

    sys.path[:0] = [str(REPO / "platform"), str(REPO)]
    from leapalign.config import load_config
    from leapalign.methods import DIRECT_METHODS
    from leapalign.parallel import TorchDistContext
    from leapalign.run import TrainingRun

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(
        REPO / "experiments" / "tiny_demo.yaml",
        [
            f"model.path={job['model']}",
            f"train.output_dir={job['out']}/{job['strategy']}_{world}",
            "finetune.mode=full",
            f"ray.strategy={job['strategy']}",
            f"train.batch_size={2 // world}",
            f"sampler.num_steps={job['num_steps']}",
            "reward.serve=false",
            "tracking.enabled=false",
        ],
    )
    run = TrainingRun(cfg, dist=TorchDistContext(), on_step_end=lambda *a: None, progress=False)
    loss_fn = DIRECT_METHODS["leapalign"]

    def update() -> None:
        prompts = run.prompt_order.next_batch()
        with run.parallel.accumulate(sync=True):
            loss, _ = loss_fn(run.policy, prompts, run.reward_fn, cfg, run.sigmas, run.rng)
            loss.backward()
        run.apply_gradients(0, True, None)

    update()  # warm-up: AdamW state, one-time allocations
    state = held_state_bytes(run)
    dist.barrier()
    peak = peak_tensor_bytes(update)
    times = []
    for _ in range(job["steps"]):
        dist.barrier()
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    queue.put({"rank": rank, "state": state, "peak": state + peak, "step_s": statistics.median(times)})
    dist.destroy_process_group()


def measure(strategy: str, world: int, job: dict, timeout_s: float) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    job = {**job, "strategy": strategy}
    procs = [ctx.Process(target=worker, args=(r, world, port, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        rows = [queue.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {
        "strategy": strategy,
        "workers": world,
        "state_mib": max(r["state"] for r in rows) / MIB,
        "peak_mib": max(r["peak"] for r in rows) / MIB,
        "step_s": max(r["step_s"] for r in rows),
    }


def format_table(results: list[dict]) -> str:
    lines = [f"{'strategy':<10}{'workers':>8}{'state MiB':>12}{'peak MiB':>12}{'step s':>9}"]
    for r in results:
        lines.append(
            f"{r['strategy']:<10}{r['workers']:>8}{r['state_mib']:>12.2f}{r['peak_mib']:>12.2f}{r['step_s']:>9.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument(
        "--steps", type=int, default=3, help="timed updates per configuration (after a warm-up)"
    )
    parser.add_argument("--num-steps", type=int, default=6, help="sampling steps N of each LeapAlign update")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path[:0] = [str(REPO / "platform"), str(REPO)]
    from leapalign.models.tiny import TinyFluxSpec, build_tiny_flux

    with tempfile.TemporaryDirectory(prefix="scale-out-bench-") as tmp:
        spec = TinyFluxSpec(
            num_layers=4, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
            axes_dims_rope=(8, 12, 12),
        )  # fmt: skip
        model = build_tiny_flux(Path(tmp) / "flux", spec, seed=0)
        job = {"model": str(model), "out": tmp, "steps": args.steps, "num_steps": args.num_steps}
        results = []
        for strategy in args.strategies:
            for world in args.workers:
                print(f"{strategy} x {world} ...", file=sys.stderr, flush=True)
                results.append(measure(strategy, world, job, args.timeout))
                print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    by = {(r["strategy"], r["workers"]): r for r in results}
    if ("fsdp2", 1) in by and ("fsdp2", 2) in by:
        one, two = by[("fsdp2", 1)], by[("fsdp2", 2)]
        print(
            f"fsdp2 per-worker peak: 1 -> 2 workers x{two['peak_mib'] / one['peak_mib']:.2f} "
            f"(state x{two['state_mib'] / one['state_mib']:.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
