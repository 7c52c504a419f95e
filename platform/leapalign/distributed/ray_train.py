"""Ray Train execution: `train()` on N TorchTrainer workers, one MLflow run, checkpoints in Ray storage.

    leapalign train experiments/tiny_demo.yaml ray.num_workers=2 ray.cpus_per_worker=0.5
    leapalign train experiments/tiny_demo.yaml train.iterations=20 train.resume=true   # continue a stopped run

Driver (`run_on_ray`): check what a user can get wrong (model folder, prompts, reward, tracking server,
storage path) before any work; start or join a Ray cluster; create (or, resuming, reattach to) the MLflow
run; fit a TorchTrainer (Train V2); close the run. Workers (`train_worker`): Ray has set up
torch.distributed (gloo on CPU; gloo + NCCL on GPU); each calls `train()` with a TorchDistContext, and the
run wraps the transformer for ray.strategy (leapalign.parallel: DDP for LoRA, FSDP2 for full fine-tuning).

Checkpoints: every train.checkpoint_every steps and at the last step, every rank writes its shards of the
weights, AdamW state and EMA with torch.distributed.checkpoint (DCP) into a folder of its own, rank 0 adds
train_state.pt (step, the global prompt-order and noise streams); Ray merges the ranks' folders into one
DCP checkpoint, STORAGE/RUN/checkpoint_<step>. A restarted worker group (FailureConfig(max_failures)) and
a new `leapalign train ... train.resume=true` (same STORAGE/RUN: Train V2 restores it) continue from the
newest one with the same numbers an uninterrupted run would give, with any number of workers (DCP
reshards; keep the global batch ray.num_workers x train.batch_size to keep the numbers).

MLflow without duplicates: rank 0 logs every step as it ends (live curves) and, when it starts, asks MLflow
for the last step it holds; steps replayed after a restart or a resume (the same numbers again) are dropped
(tracking.ResumableTracker). Metrics also reach Ray every step, so a Tune scheduler sees the curve.

Why one file over 500 lines: the driver and the worker of one Ray Train run, which pass each other the
config, the checkpoint hook and the run's identity.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch.distributed
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from leapalign.config import Config, with_overrides
from leapalign.distributed.progress import ForwardWarnings, RunProgress, follow, step_headline
from leapalign.distributed.reward_service import (
    absolute_reward_paths,
    ensure_reward_service,
    make_reward_fn,
    reward_service_resources,
)
from leapalign.numerics import process_env
from leapalign.parallel import TorchDistContext
from leapalign.preflight import USER_ERRORS, preflight
from leapalign.run_folder import StepEnd, StepHook, clear_output_dir
from leapalign.tracking import (
    RUN_RECORD,
    MLflowTracker,
    NullTracker,
    ResumableTracker,
    Tracker,
    open_tracker,
)
from leapalign.train import train

log = logging.getLogger("leapalign")

# Fault-injection hook for tests and drills: with LEAPALIGN_FAULT_EXIT_AT_STEP=N, rank
# LEAPALIGN_FAULT_RANK (default 0) kills its process (os._exit(1), like an OOM kill) at the end of step N,
# after logging the step's metrics and before reporting its checkpoint when one is due: the moment that
# would duplicate MLflow metrics if anything did. LEAPALIGN_FAULT_MARKER names a file created first; an
# existing file disarms the hook, so the fault happens once. The driver forwards these to the workers.
FAULT_STEP_ENV = "LEAPALIGN_FAULT_EXIT_AT_STEP"
FAULT_RANK_ENV = "LEAPALIGN_FAULT_RANK"
FAULT_MARKER_ENV = "LEAPALIGN_FAULT_MARKER"
FAULT_GRACE_S = 3.0  # seconds between the injected fault's decision and the exit


# ----------------------------------------------------------------------------- driver


@dataclass
class RayRunResult:
    metrics: dict[str, Any]  # rank 0's metrics at the newest checkpoint ("step", "loss", ...)
    checkpoint_path: str | None  # newest checkpoint folder in storage
    run_dir: str  # STORAGE/RUN: checkpoints, Ray's run state, the run record
    output_dir: Path  # rank 0's run folder (config, metrics.jsonl, weights, grids)
    run_id: str | None  # the MLflow run


def run_on_ray(
    cfg: Config,
    *,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    show_progress: bool = True,
) -> RayRunResult:
    """Train on Ray workers. User errors (ValueError, PermissionError, ...) are raised before any work.

    callbacks: Ray Train callbacks (a Tune trial passes TuneReportCallback); parent_run_id: nest this run's
    MLflow run under a sweep's or comparison's parent run; show_progress: the driver draws the run's bar
    and prints the workers' warnings (a sweep's trials draw none: the sweep has its own bar).
    """
    cfg = absolute_paths(cfg)
    preflight(cfg)
    check_fault_injection()
    storage = RunStorage(cfg.ray.storage_path, cfg.ray.run_name or Path(cfg.train.output_dir).name)
    record = storage.read_record() if cfg.train.resume else None
    if cfg.train.resume and record is None:
        raise FileNotFoundError(
            f"train.resume=true but {storage.uri} holds no run to continue; drop train.resume to start one, or "
            f"set ray.storage_path / ray.run_name to the stopped run's"
        )
    if not cfg.train.resume and not cfg.train.overwrite and storage.holds_run():
        raise FileExistsError(
            f"{storage.uri} already holds a run of this name; continue it with train.resume=true, replace it "
            f"with train.overwrite=true (its checkpoints are deleted), or choose another ray.run_name"
        )
    storage.check_writable()
    fault_env = fault_injection_env()
    connected = connect_ray(cfg)
    tracker: Tracker = NullTracker()
    try:
        check_cluster(cfg, private=connected and wants_private_cluster(cfg))
        # The reward on Ray Serve (reward.serve, default on this path): deployed now, or found running (a
        # sweep's driver deploys it once for all trials). A private cluster takes it down with it; on a shared
        # one it stays for the next run (python -m reward_servers.serve --stop APP to remove it).
        cfg = ensure_reward_service(cfg)
        if cfg.train.overwrite:
            storage.clear()  # Train V2 would otherwise resume a run folder of the same name
            clear_output_dir(cfg)
        tracker = open_tracker(cfg, record, parent_run_id=parent_run_id)
        storage.write_record({"mlflow_run_id": tracker.run_id, "tracking_uri": cfg.tracking.uri})
        progress = RunProgress.remote() if show_progress else None
        trainer = LeanTorchTrainer(
            train_worker,
            train_loop_config={"cfg": cfg, "run_id": tracker.run_id, "progress": progress},
            # CPU tensors (the all-ranks-step vote) go through gloo, CUDA gradients through NCCL.
            torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if cfg.ray.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.ray.num_workers,
                use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
                placement_strategy=cfg.ray.placement,
            ),
            run_config=RunConfig(
                name=storage.name,
                storage_path=cfg.ray.storage_path,
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                worker_runtime_env=worker_env(cfg, fault_env),
                callbacks=callbacks,
            ),
        )
        try:
            with follow(cfg, progress, cfg.method.name) if progress is not None else nullcontext():
                result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise_user_error(err)
            raise
    except BaseException as err:
        tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")  # resumable either way
        raise
    finally:
        if connected:
            ray.shutdown()
    tracker.end("FINISHED")
    return RayRunResult(
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        run_dir=storage.uri,
        output_dir=Path(cfg.train.output_dir),
        run_id=tracker.run_id,
    )


def absolute_paths(cfg: Config, cwd: str | os.PathLike[str] | None = None) -> Config:
    """Workers need not start in the driver's folder: pin relative local paths to the driver's cwd.

    `cwd` is that folder when the call runs elsewhere (a Tune trial builds its config inside the trial,
    whose working folder is the trial's own): default the current one.

    ray.storage_path unset: ray_results beside the output folder (outputs/ray_results/RUN for outputs/RUN).

    Paths that only exist inside the installed package (shipped prompt files) stay relative: each worker
    resolves them against its own install.
    """
    root = Path(cwd) if cwd is not None else Path.cwd()

    def here(path: str) -> Path:
        return root / Path(path).expanduser()  # an absolute path stays itself

    output_dir = os.path.normpath(here(cfg.train.output_dir))
    updates: dict[str, Any] = {"train.output_dir": output_dir}
    if cfg.ray.storage_path is None:
        updates["ray.storage_path"] = os.path.join(os.path.dirname(output_dir), "ray_results")
    elif "://" not in cfg.ray.storage_path:
        updates["ray.storage_path"] = os.path.normpath(here(cfg.ray.storage_path))
    for key, value, kind in (
        ("model.path", cfg.model.path, "dir"),
        ("train.prompts", cfg.train.prompts, "file"),
        ("eval.prompts", cfg.eval.prompts, "file"),
        ("model.text_cache", cfg.model.text_cache, "dir"),
    ):
        if value and (here(value).is_dir() if kind == "dir" else here(value).is_file()):
            updates[key] = str(here(value).resolve())
    updates.update(absolute_reward_paths(cfg.reward, root))  # reward replicas do not start here either
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        updates["tracking.uri"] = "sqlite:///" + os.path.normpath(here(uri.removeprefix("sqlite:///")))
    return with_overrides(cfg, updates)


def check_fault_injection() -> None:
    """The fault-injection variables (FAULT_STEP_ENV) make sense only with a marker file."""
    if os.environ.get(FAULT_STEP_ENV) and not os.environ.get(FAULT_MARKER_ENV):
        raise ValueError(
            f"{FAULT_STEP_ENV} needs {FAULT_MARKER_ENV}=FILE, or the fault repeats on every restart"
        )


class RunStorage:
    """STORAGE/RUN on a local folder, NFS or an object store, through pyarrow.fs as Ray Train uses it."""

    def __init__(self, storage_path: str, name: str):
        import pyarrow.fs

        self.name = name
        self.uri = f"{storage_path.rstrip('/')}/{name}"
        self.fs, self.path = pyarrow.fs.FileSystem.from_uri(self.uri)

    def check_writable(self) -> None:
        probe = f"{self.path}/.leapalign_write_test"
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as err:
            raise PermissionError(
                f"ray.storage_path: cannot write checkpoints to {self.uri} ({err}); choose a folder you can "
                f"write to (on a multi-node cluster: shared storage such as NFS or s3://bucket/path)"
            ) from None

    def read_record(self) -> dict[str, Any] | None:
        import pyarrow.fs

        if self.fs.get_file_info(f"{self.path}/{RUN_RECORD}").type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(f"{self.path}/{RUN_RECORD}") as f:
            return json.loads(f.read().decode())

    def write_record(self, record: dict[str, Any]) -> None:
        with self.fs.open_output_stream(f"{self.path}/{RUN_RECORD}") as f:
            f.write(json.dumps(record).encode())

    def holds_run(self) -> bool:
        import pyarrow.fs

        entries = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        return any(not info.base_name.startswith(".") for info in entries)

    def clear(self) -> None:
        if self.holds_run():
            log.warning("train.overwrite=true: starting %s over (its old checkpoints are removed)", self.uri)
            self.fs.delete_dir_contents(self.path, missing_dir_ok=True)


def worker_env(cfg: Config, extra: dict[str, str]) -> dict[str, Any]:
    """The workers' runtime_env: train.cpu_isa's kernel pins (read when a worker's libraries start), the
    driver's OpenMP thread settings (leapalign.numerics.THREAD_KEYS) and the fault-injection variables."""
    return {"env_vars": {**process_env(cfg.train.cpu_isa), **extra}}


def fault_injection_env() -> dict[str, str]:
    return {k: os.environ[k] for k in (FAULT_STEP_ENV, FAULT_RANK_ENV, FAULT_MARKER_ENV) if k in os.environ}


def wants_private_cluster(cfg: Config) -> bool:
    """No cluster named (ray.address) and none given by `ray job submit` (RAY_ADDRESS): connect_ray starts a
    private one on this machine, unless this process is connected already."""
    return cfg.ray.address is None and not os.environ.get("RAY_ADDRESS")


def connect_ray(cfg: Config) -> bool:
    """Join or start a Ray cluster; True when this call did (and must disconnect), False when reusing one.

    ray.address unset: under `ray job submit` (RAY_ADDRESS set) the job's cluster, else a new private
    cluster on this machine that lives as long as this process.
    """
    if ray.is_initialized():
        return False
    quiet_ray_console()
    if wants_private_cluster(cfg):
        import ray._private.ray_constants as ray_constants

        # On Linux Ray binds a node to the host's routable address, even when given 127.0.0.1, unless it
        # believes multi-node clusters are off; then every process of this private cluster listens on
        # 127.0.0.1 only. The constant is read at import, so it is set for this process and its children.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        # Train V2 starts a node-preemption watcher (one more process) with every worker group; a private
        # cluster on this machine has no node to lose to preemption. Read by the Train controller, which
        # inherits this process's environment through the raylet.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        # The Train controller polls its workers every 0.2 s instead of Ray's 2 s, so it sees a worker group
        # start or finish (or die) sooner: a tuned comparison's 4 tiny trials took 65 s against 77 s at 1 s
        # and 87-92 s at 2 s, for the same CPU (bench/README.md). At 0.05 s a run hung. Read by the controller.
        os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, "0.2")
        os.environ[PRIVATE_CLUSTER_ENV] = "1"
        # No dashboard: its one use here was the State API that Train V2's placement-group cleaner polls,
        # and a private cluster's runs start no cleaner (LeanTorchTrainer). Saves its processes' start.
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    else:
        ray.init(address=cfg.ray.address, logging_level=logging.WARNING, log_to_driver=False)
    quiet_ray_console()
    return True


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Set ("1") by connect_ray before it starts a private cluster, so the cluster's processes (Tune trials too)
# inherit it: nothing outlives this machine's driver there (LeanTorchTrainer).
PRIVATE_CLUSTER_ENV = "LEAPALIGN_PRIVATE_CLUSTER"


class LeanTorchTrainer(TorchTrainer):
    """TorchTrainer without two helper actors that every Train V2 run starts (each a process: about 1.5-2 s
    of CPU on a small machine, bench/README.md) and that this platform's runs have no use for:

    - the dataset manager, which shards Ray Data datasets for the workers: runs pass no datasets;
    - on a private cluster, the detached placement-group cleaner, which watches the controller (polling the
      dashboard's State API) to remove its placement groups should it die: the whole cluster dies with the
      driver, and a sweep removes the groups of dead controllers itself (tune_runner.ReleaseOrphanedWorkers).

    Selected by class name from Ray's default callbacks (a private method of the trainer): should a Ray
    release rename them, the run keeps them and works as before."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        unused = set() if self.datasets else {"DatasetsCallback"}
        if os.environ.get(PRIVATE_CLUSTER_ENV) == "1":
            unused.add("PlacementGroupCleanerCallback")
        return [callback for callback in callbacks if type(callback).__name__ not in unused]


# Console lines of Ray's that a user of this command cannot act on; they stay in Ray's log files.
RAY_NOISE = (
    "Token authentication is enabled for this Ray cluster",  # our private cluster sets it up itself
    "Started Serve in namespace",
    "Connecting to existing Serve app",
    "PYTHON worker processes have been started",  # the raylet, when Tune starts trials, controllers, workers
)


class _DropRayNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in RAY_NOISE)


def quiet_ray_console() -> None:
    """The driver's console: our bar, our warnings, the results. Workers' output is not streamed
    (log_to_driver=False: it is in Ray's session logs and the run's train.log; our warnings reach the
    driver as notes, leapalign.distributed.progress); Ray's own driver-side chatter is filtered here."""
    noise = _DropRayNoise()
    for name in ("ray", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(noise)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # The raylet's warnings reach the driver through its error channel, printed without a logger.
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if not getattr(printer, "leapalign_filtered", False):

        def print_without_noise(data, ignore_prefix: bool = False):
            lines = [line for line in data.get("lines", []) if not any(n in line for n in RAY_NOISE)]
            if lines:
                printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

        print_without_noise.leapalign_filtered = True
        ray_worker.print_to_stdstream = print_without_noise


def check_cluster(cfg: Config, private: bool) -> None:
    """Resources a private cluster can never grow into (the workers and the reward replicas).

    A shared cluster may add nodes (autoscaling), so there Ray Train waits for resources instead.
    """
    if private:
        total = ray.cluster_resources()
        reward = reward_service_resources(cfg)  # the reward replicas' share (reward.serve=true)
        need_cpus = cfg.ray.num_workers * cfg.ray.cpus_per_worker + reward["CPU"]
        if need_cpus > total.get("CPU", 0) + 1e-9:
            raise ValueError(
                f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker}"
                + (f" + the reward replicas' {reward['CPU']:g}" if reward["CPU"] else "")
                + f" needs {need_cpus:g} CPUs but this machine has {total.get('CPU', 0):g}: lower either (e.g. "
                f"ray.cpus_per_worker=0.5"
                + (", reward.cpus_per_replica=0.5, or reward.serve=false)" if reward["CPU"] else ")")
            )
        need_gpus = (cfg.ray.num_workers if cfg.ray.use_gpu else 0) + reward["GPU"]
        if need_gpus > total.get("GPU", 0) + 1e-9:
            raise ValueError(
                f"ray.use_gpu={str(cfg.ray.use_gpu).lower()} with ray.num_workers={cfg.ray.num_workers} and "
                f"{reward['GPU']:g} GPUs for the reward replicas needs {need_gpus:g} GPUs; this machine has "
                f"{total.get('GPU', 0):g}: set ray.use_gpu=false, fewer workers or reward.gpus_per_replica=0"
            )


def raise_user_error(err: Exception) -> None:
    """A worker's bad-input error (e.g. an unknown reward option) as itself, so the CLI prints one line."""
    for _, failure in sorted(getattr(err, "worker_failures", {}).items()):
        cause = getattr(failure, "cause", failure)  # RayTaskError carries the worker's exception as .cause
        if isinstance(cause, USER_ERRORS):
            raise cause from None


# ----------------------------------------------------------------------------- workers


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: `train()` over torch.distributed; checkpoints to Ray, metrics to MLflow."""
    from leapalign.logs import quiet_libraries

    cfg: Config = loop_config["cfg"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    dist = TorchDistContext()
    rank = dist.rank
    # Which Ray node each rank runs on (rank order), recorded in every checkpoint's meta.json.
    worker_nodes: list[str | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())
    tracker: Tracker = NullTracker()
    if rank == 0 and loop_config["run_id"] is not None:
        tracker = ResumableTracker(
            MLflowTracker(cfg.tracking.uri, cfg.tracking.experiment, run_id=loop_config["run_id"])
        )
    progress = loop_config.get("progress")
    if rank == 0 and progress is not None:  # our warnings reach the driver's console (no log streaming)
        logging.getLogger("leapalign").addHandler(ForwardWarnings(progress, rank))
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as checkpoint_dir:
        resume_from = None
        if checkpoint_dir is not None:
            resume_from = Path(checkpoint_dir)  # a DCP folder: loads on any number of workers
            meta = json.loads((Path(checkpoint_dir) / "meta.json").read_text())
            if isinstance(tracker, ResumableTracker):  # an event log: one point per resume
                tracker.tracker.log_metrics({"ray/resumed_from_step": meta["step"]}, step=meta["step"])
        train(
            cfg,
            reward_fn=make_reward_fn(cfg.reward),
            tracker=tracker,
            dist=dist,
            resume_from=resume_from,
            on_step_end=checkpoint_hook(cfg, dist, worker_nodes, progress),
            device=str(get_device()),
            progress=False,
        )


def checkpoint_hook(
    cfg: Config,
    dist: TorchDistContext,
    worker_nodes: list[str | None],
    progress=None,
) -> StepHook:
    """train()'s on_step_end: rank 0's step to the driver's bar every step; reports to Ray only where they
    matter: at checkpoints (every train.checkpoint_every steps and the last), at held-out evaluations (what
    a Tune scheduler ranks).

    ray.train.report costs a step: Train V2 keeps one unconsumed report per worker and its controller
    polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), so reporting every step held each step until the
    poll (measured: 1.55 s of a 2.0 s step on the quickstart). It is also a barrier: every rank calls it at
    the same steps (StepEnd's fields are the same on every rank), each with its own folder (its DCP shards;
    rank 0 also .metadata, train_state.pt, meta.json), merged by Ray into one checkpoint_<step> folder.
    """

    def on_step_end(end: StepEnd) -> None:
        step = end.step
        if dist.is_main and progress is not None:
            progress.update.remote(step, step_headline(end.metrics))  # fire-and-forget
        checkpoint_due = step % cfg.train.checkpoint_every == 0 or end.final
        if not checkpoint_due:
            maybe_inject_fault(step, dist.rank)
            if end.evaluated:
                ray.train.report({"step": step, **end.metrics})
            return
        with tempfile.TemporaryDirectory(prefix="leapalign-ckpt-", ignore_cleanup_errors=True) as tmp:
            end.save(Path(tmp))  # DCP: every rank its shards (a collective)
            if dist.is_main:
                meta = {"step": step, "num_workers": dist.world_size, "worker_nodes": worker_nodes}
                (Path(tmp) / "meta.json").write_text(json.dumps(meta))
            maybe_inject_fault(step, dist.rank)
            ray.train.report(
                {"step": step, **end.metrics},
                checkpoint=Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{step:06d}",
            )

    return on_step_end


def maybe_inject_fault(step: int, rank: int) -> None:
    """The fault-injection hook described at FAULT_STEP_ENV; a no-op unless that variable is set."""
    if os.environ.get(FAULT_STEP_ENV) != str(step) or int(os.environ.get(FAULT_RANK_ENV, "0")) != rank:
        return
    marker = Path(os.environ[FAULT_MARKER_ENV])
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    log.warning("fault injection: rank %d exits at step %d (%s=%s)", rank, step, FAULT_STEP_ENV, step)
    # Train V2's controller collects reports by polling; a crash within a poll interval of the last
    # checkpoint report can beat its registration and restart from an older checkpoint (seen on an
    # idle machine). Real failures are not that punctual: give the controller time to register it.
    time.sleep(FAULT_GRACE_S)
    os._exit(1)
