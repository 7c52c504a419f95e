"""`leapalign embed` and `leapalign eval` on Ray Data: actor pools hold the models, the driver plans and writes.

    run_embed_job   the shards of a text cache (leapalign.text_cache.CachePlan) -> map_batches over an actor
                    pool of text-encoder replicas (T5 + CLIP loaded once per actor); each actor writes its
                    shards into the plan's partial folder, atomically; the driver counts them on a bar and
                    writes the index and manifest. A failed or stopped embed keeps its finished shards: the
                    same command again encodes only the others.
    run_eval_job    (weights, sampling unit) pairs (leapalign.evaluation.EvalUnit) -> map_batches over an
                    actor pool holding the policy; each actor samples a unit from its fixed noise and scores
                    it with the world's judge and the reward models (served by Ray Serve when reward.serve,
                    else built in the actor); the driver writes one folder per weights (the table of
                    `leapalign eval`) and the summary.

A thin edge: what is computed is leapalign.text_cache's and leapalign.evaluation's, the same functions the
one-process commands call on the same units, so the outputs are identical to theirs however the work is
split (tests/integration/test_data_jobs.py). The prompts are read by the driver (their order and
deduplication decide the shards: a few MB even for a million prompts); the models' work is on the actors.

Cluster: under `ray job submit` the job's cluster (RAY_ADDRESS), `ray.address` of the config, else a private
one on 127.0.0.1 for the command. The embed actors write the shards themselves: on several nodes OUT must be
on storage every node reaches (NFS/EFS at the same path), as for checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.exceptions
from tqdm.auto import tqdm

from leapalign.config import Config, with_overrides
from leapalign.distributed.ray_train import absolute_paths, connect_ray, wants_private_cluster
from leapalign.distributed.reward_service import (
    ensure_reward_service,
    make_reward_fn,
    reward_service_resources,
)
from leapalign.numerics import process_env
from leapalign.preflight import JobFailed
from leapalign.text_cache import CachePlan, encode_shard, finish_text_cache, open_partial, write_shard

log = logging.getLogger("leapalign")

# Fault injection for the resume drill and its tests: the embed actor that gets shard N fails ("N"), or
# blocks there until it is killed with its driver ("N:hang").
FAULT_EMBED_SHARD_ENV = "LEAPALIGN_FAULT_EMBED_SHARD"


class DataJobError(JobFailed):
    """An actor's failure, said in one line (Ray's own report stays in its session logs)."""


def _job_error(err: Exception, what: str) -> DataJobError:
    """The actor's own error line, found in Ray's report (RayTaskError -> UserCodeException -> its traceback)."""
    lines = [line.strip() for line in str(err).splitlines()]
    raised = [line for line in lines if re.match(r"[A-Za-z_.]*(Error|Exception): ", line)]
    ours = [line for line in raised if not line.startswith(("ray.", "UserCodeException"))]
    return DataJobError(f"{what}: {(ours or raised or [type(err).__name__])[-1]}")


@dataclass(frozen=True)
class ActorResources:
    """One actor of a pool: how many, and what each reserves."""

    actors: int = 1  # actors in the pool; >= 1
    cpus: float = 1.0  # CPUs per actor; > 0 (its torch threads: train.torch_threads, or this rounded up)
    gpus: float = 0.0  # GPUs per actor; fractions share a GPU

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus <= 0 or self.gpus < 0:
            raise ValueError(
                f"--actors {self.actors} --cpus-per-actor {self.cpus:g} --gpus-per-actor {self.gpus:g}: use "
                f"actors >= 1, CPUs > 0, GPUs >= 0"
            )

    def remote_args(self, cpu_isa: str) -> dict[str, Any]:
        return {
            "compute": ray.data.ActorPoolStrategy(size=self.actors),
            "num_cpus": self.cpus,
            "num_gpus": self.gpus,
            "runtime_env": {"env_vars": process_env(cpu_isa)},  # the kernels of train.cpu_isa: same bits
        }


def _start(cfg: Config, resources: ActorResources, served: dict[str, float] | None = None) -> bool:
    """Join or start the cluster; check that the pool (and the reward replicas it will call, `served`) fits a
    private one, which never grows; Ray Data's own bars off (ours counts shards or images). True when this
    call connected (and must disconnect)."""
    connected = connect_ray(cfg)
    private = wants_private_cluster(cfg)
    total = ray.cluster_resources()
    for kind, each in (("CPU", resources.cpus), ("GPU", resources.gpus)):
        need = resources.actors * each + (served or {}).get(kind, 0.0)
        if private and need > total.get(kind, 0) + 1e-9:
            if connected:
                ray.shutdown()
            raise ValueError(
                f"{resources.actors} actors x {each:g} {kind}s"
                + (f" + the reward replicas' {served[kind]:g}" if served and served.get(kind) else "")
                + f" need {need:g} {kind}s, this machine has {total.get(kind, 0):g}: lower --actors or "
                f"--{kind.lower()}s-per-actor"
                + (" (or reward.cpus_per_replica)" if kind == "CPU" and served else "")
            )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its failures come back as DataJobError
    return connected


def _torch_threads(cfg: Config, resources: ActorResources) -> int:
    return cfg.train.torch_threads or max(1, int(np.ceil(resources.cpus)))


def _on_actor_pool(
    cfg: Config, resources: ActorResources, items: list[dict], actor: type, **kwargs: Any
) -> ray.data.Dataset:
    """One row per item, one row per call, mapped by a pool of `actor`s built with (cfg, threads, **kwargs)."""
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        actor,
        batch_size=1,
        fn_constructor_kwargs={"cfg": cfg, "threads": _torch_threads(cfg, resources), **kwargs},
        **resources.remote_args(cfg.train.cpu_isa),
    )


# ----------------------------------------------------------------------------- embed


class _Encoder:
    """A text-encoder replica: the pipeline's T5 and CLIP, loaded once; encodes whole shards and writes them."""

    def __init__(self, cfg: Config, plan: CachePlan, batch_size: int, threads: int, fault: str | None):
        import torch

        from leapalign.models.flux import FluxPolicy

        torch.set_num_threads(threads)
        self.model, self.plan, self.batch_size = cfg.model, plan, batch_size
        at, _, self.fault_mode = (fault or "").partition(":")
        self.fault_at = int(at) if at else None
        self.policy = FluxPolicy.from_pretrained(
            cfg.model.path, dtype=cfg.model.dtype, revision=cfg.model.revision
        )  # with its text encoders; cuda when the actor has a GPU

    def encode(self, prompts: list[str]):
        cond = self.policy.encode_prompts(prompts, self.model.max_sequence_length)
        return cond.prompt_embeds, cond.pooled_prompt_embeds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for number in batch["shard"].tolist():
            if number == self.fault_at and self.fault_mode == "hang":
                threading.Event().wait()  # until the driver is killed (and this actor with it)
            if number == self.fault_at:
                raise RuntimeError(
                    f"{FAULT_EMBED_SHARD_ENV}={number}: this embed actor fails here (fault drill)"
                )
            tensors = encode_shard(self.encode, self.plan.shard_prompts(number), self.batch_size)
            write_shard(self.plan, number, tensors)
        return {"shard": batch["shard"]}


def run_embed_job(
    cfg: Config,
    plan: CachePlan,
    *,
    batch_size: int,
    resources: ActorResources,
    progress: bool = True,
    on_result: Callable[[int], None] | None = None,
) -> tuple[Path, int]:
    """Encode the plan's unwritten shards on an actor pool, then write the cache: (its folder, shards encoded
    by this call). A shard is the unit of work (one map_batches row): its batches are those of the
    one-process `write_text_cache`, so the cache is the same. on_result(prompts): as each shard lands."""
    todo = plan.todo
    cfg = absolute_paths(cfg)  # the model folder, wherever the actors run
    if todo:
        fault = os.environ.get(FAULT_EMBED_SHARD_ENV)
        connected = _start(cfg, resources)
        try:
            open_partial(plan)  # the first write: after every check, the cluster's included
            items = [{"shard": n} for n in todo]
            shards = _on_actor_pool(
                cfg, resources, items, _Encoder, plan=plan, batch_size=batch_size, fault=fault
            )
            done = plan.num_shards - len(todo)
            bar = tqdm(total=plan.num_shards, initial=done, desc="embed", unit="shard", disable=not progress)
            try:
                with bar:
                    for row in shards.iter_rows():
                        bar.update(1)
                        if on_result is not None:
                            on_result(len(plan.shard_prompts(int(row["shard"]))))
            except ray.exceptions.RayError as err:
                kept = plan.num_shards - len(plan.todo)
                raise _job_error(
                    err,
                    f"embed stopped ({kept} of {plan.num_shards} shards written and kept in {plan.partial}: "
                    f"the same command again encodes the rest)",
                ) from err
        finally:
            if connected:
                ray.shutdown()
    return finish_text_cache(plan), len(todo)


# ----------------------------------------------------------------------------- eval


class _Sampler:
    """A policy replica: samples (weights, unit) rows from their fixed noise and scores them. It holds one
    weights at a time, loaded when a row names other weights (rows come grouped by weights)."""

    def __init__(self, cfg: Config, plan, rewards: dict[str, Any], threads: int):
        import torch

        torch.set_num_threads(threads)
        self.cfg, self.plan = cfg, plan
        self.units = plan.units(cfg)
        self.rewards = {name: make_reward_fn(reward_cfg) for name, reward_cfg in rewards.items()}
        self.loaded: int | None = None
        self.policy = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from leapalign.evaluation import load_policy, sample_unit, score_unit
        from leapalign.images import to_uint8

        out: dict[str, list] = {"weights": [], "unit": [], "images": [], "results": []}
        for which, k in zip(batch["weights"].tolist(), batch["unit"].tolist(), strict=True):
            if which != self.loaded:
                self.policy, self.loaded = None, None  # one policy in memory at a time
                self.policy, self.loaded = load_policy(self.cfg, self.plan.weights[which]), which
            unit = self.units[k]
            images = sample_unit(self.policy, self.cfg, self.plan.prompts, unit, self.plan.noise)
            prompts = [self.plan.prompts[i] for i in unit.indices]
            results = score_unit(images, prompts, world=self.plan.world, rewards=self.rewards)
            out["weights"].append(which)
            out["unit"].append(k)
            out["images"].append(to_uint8(images).tobytes())  # [n, H, W, 3] uint8, shape known to the driver
            out["results"].append(json.dumps(results))  # floats round-trip exactly through JSON (repr)
        return {key: np.asarray(values, dtype=object) for key, values in out.items()}


def metric_reward_configs(cfg: Config, metrics: list[str]) -> tuple[dict[str, Any], list[str]]:
    """reward.* of each reward metric (the training reward keeps its options) and, when reward.serve, the Serve
    applications this call deployed for them (deleted afterwards; running ones are reused and kept)."""
    configs, before = {}, None
    for name in metrics:
        if name == "world":
            continue
        options = cfg.reward.options if name == cfg.reward.name else {}
        app = cfg.reward.app if name == cfg.reward.name else None
        one = with_overrides(cfg, {"reward.name": name, "reward.options": options, "reward.app": app})
        if cfg.reward.serve and cfg.ray.enabled:
            if before is None:
                from ray import serve

                before = set(serve.status().applications)
            one = ensure_reward_service(one)
        configs[name] = one.reward
    if before is None:
        return configs, []
    from ray import serve

    return configs, sorted(set(serve.status().applications) - before)


def run_eval_job(
    cfg: Config,
    plan,
    *,
    resources: ActorResources,
    progress: bool = True,
    on_result: Callable[[int], None] | None = None,
) -> dict[int, tuple[np.ndarray, dict[str, list]]]:
    """Every (weights, unit) of the plan sampled and scored on an actor pool: {weights number: (images
    [N, H, W, 3] uint8, per-image columns)}, rows in unit order, as evaluation.evaluate_weights makes them.
    on_result(images): as each unit lands."""
    from leapalign.evaluation import merge_columns, unit_columns

    cfg = absolute_paths(cfg)  # actors may run elsewhere (a job's working dir, another node)
    plan = replace(
        plan, rewards={}, weights=[w if w == "base" else str(Path(w).resolve()) for w in plan.weights]
    )
    units = plan.units(cfg)
    reward_metrics = [name for name in plan.metrics if name != "world"]
    served = {"CPU": 0.0, "GPU": 0.0}
    if cfg.reward.serve and cfg.ray.enabled:  # each reward metric: its own deployment (reward.* sizes it)
        served = {kind: len(reward_metrics) * each for kind, each in reward_service_resources(cfg).items()}
    connected = _start(cfg, resources, served)
    deployed: list[str] = []
    try:
        rewards, deployed = metric_reward_configs(cfg, plan.metrics)
        items = [{"weights": w, "unit": k} for w in range(len(plan.weights)) for k in range(len(units))]
        rows = _on_actor_pool(cfg, resources, items, _Sampler, plan=plan, rewards=rewards)
        total = len(plan.weights) * sum(len(u.indices) for u in units)
        found: dict[tuple[int, int], tuple[bytes, dict[str, list]]] = {}
        started = time.perf_counter()
        try:
            with tqdm(total=total, desc="eval", unit="image", disable=not progress) as bar:
                for row in rows.iter_rows():
                    found[(int(row["weights"]), int(row["unit"]))] = (
                        row["images"],
                        json.loads(row["results"]),
                    )
                    bar.update(len(units[int(row["unit"])].indices))
                    if on_result is not None:
                        on_result(len(units[int(row["unit"])].indices))
        except ray.exceptions.RayError as err:
            raise _job_error(err, "eval stopped (nothing written)") from err
        log.info(
            "eval: %d images in %.1f s on %d actors", total, time.perf_counter() - started, resources.actors
        )
    finally:
        if deployed:
            from ray import serve

            running = serve.status().applications
            for app in deployed:
                if app in running:
                    serve.delete(app)
        if connected:
            ray.shutdown()
    shape = (cfg.sampler.height, cfg.sampler.width, 3)
    out = {}
    for w in range(len(plan.weights)):
        images = np.concatenate(
            [np.frombuffer(found[(w, k)][0], dtype=np.uint8).reshape(-1, *shape) for k in range(len(units))]
        )
        out[w] = (
            images,
            {**unit_columns(plan, cfg), **merge_columns([found[(w, k)][1] for k in range(len(units))])},
        )
    return out


def sample_report_grid_on_ray(
    cfg: Config, runs: list[tuple[str, Path | None]], num_prompts: int = 8
) -> tuple[list[tuple[str, Any]], list[str]] | None:
    """evaluation.sample_report_grid on Ray Data: the base model and each run given (its EMA weights when it
    has them) on the same held-out prompts and noise, one actor per weights as far as the free CPUs go
    (`leapalign compare`'s picture, after its trials: the cluster is idle)."""
    import torch

    from leapalign.evaluation import is_world_prompt_set, load_eval_prompts, plan_eval

    if not cfg.eval.prompts:
        return None
    usable = [(label, d) for label, d in runs if d is not None and (Path(d) / "config.yaml").is_file()]
    cfg = with_overrides(cfg, {"eval.images_per_prompt": 1})
    world = is_world_prompt_set(load_eval_prompts(cfg.eval.prompts, num_prompts))
    metrics = ["world"] if world else [cfg.reward.name]  # the picture needs images; the judge is cheap
    weights = ["base", *[str(d) for _, d in usable]]
    plan = plan_eval(cfg, weights, cfg.eval.prompts, metrics, num_prompts, build_rewards=False)
    free = ray.available_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    resources = ActorResources(max(1, min(len(weights), int(free))), 1.0)
    sampled = run_eval_job(cfg, plan, resources=resources, progress=False)
    labels = ["base", *[label for label, _ in usable]]
    rows = [
        (label, torch.from_numpy(sampled[w][0]).permute(0, 3, 1, 2).float() / 255)
        for w, label in enumerate(labels)
    ]
    return rows, plan.prompts
