"""Many training runs as Ray Tune trials: the engine of `leapalign sweep` and `leapalign compare`.

Each trial is a Ray Train run (Train V2's pattern: a Tune function trainable that fits a TorchTrainer
with TuneReportCallback, through `run_on_ray`), so a trial is exactly a `leapalign train` run: the same
checkpoints, restarts, MLflow logging and numbers. Workers report metrics every step, so a scheduler
(ASHA) sees the held-out curve as it is evaluated, and a trial it stops releases its workers at once.

Folders under the experiment's out_dir:
    tune/        Ray Tune's experiment state (what `Tuner.restore` resumes from)
    train/<id>/  each trial's Ray Train storage (checkpoints, run record)
    runs/<id>/   each trial's run folder (config.yaml, metrics.jsonl, weights, grids)
    experiment.json   the parent MLflow run a resumed experiment reattaches to
Resuming (the same command again): finished trials are kept, unfinished ones restart from their own
newest checkpoint, and every MLflow run and step exists once (nested runs reattach by run record).

Why one file over 500 lines: the trial engine (plans, callbacks, resume) and the two commands built on
it, which differ only in their plans; the reports themselves are leapalign.reports and
leapalign.comparison.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from leapalign.config import Config, with_overrides
from leapalign.distributed.ray_train import (
    RunStorage,
    absolute_paths,
    connect_ray,
    run_on_ray,
)
from leapalign.distributed.reward_service import ensure_reward_service, reward_service_resources
from leapalign.io import atomic_path
from leapalign.tracking import MLflowTracker, NullTracker, Tracker

log = logging.getLogger("leapalign")

TRIAL_FUNCTION_CPUS = 0.01  # the Tune function only waits on its TorchTrainer; the workers hold the CPUs
EXPERIMENT_RECORD = "experiment.json"


@dataclass
class TrialPlan:
    """What the Tune driver needs; built by `leapalign sweep` / `leapalign compare`."""

    name: str
    out_dir: Path
    base: Config  # the shared settings (tracking, ray resources, eval); absolute paths
    param_space: dict[str, Any]  # Tune domains (grid_search, uniform, choice, ...)
    configure: Callable[[dict[str, Any]], Config]  # a trial's params -> its run config (absolute paths)
    expand: Callable[[dict[str, Any]], dict[str, Any]]  # a trial's params -> what it changes (for reports)
    metric: str
    mode: str = "max"
    searcher: str = "random"  # grid | random | optuna
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "fifo"})
    num_samples: int = 1
    seed: int = 0
    kind: str = "sweep"  # sweep | compare: the parent MLflow run's tag
    run_label: Callable[[dict[str, Any]], str] = lambda params: ""  # a trial's MLflow run name


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]  # as sampled
    overrides: dict[str, Any]  # as applied to the config
    status: str  # TERMINATED (finished or stopped early) | ERROR
    metrics: dict[str, Any]  # the last reported metrics
    output_dir: Path
    error: str | None = None


def trial_main(params: dict[str, Any], plan: TrialPlan, parent_run_id: str | None) -> None:
    """One trial: the base config plus the trial's overrides, trained through run_on_ray (its preflight
    first: a trial's inputs are checked as a `leapalign train` run's)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(params, plan, tune.get_context().get_trial_id())
    run_on_ray(cfg, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id, show_progress=False)


def trial_config(params: dict[str, Any], plan: TrialPlan, trial_id: str) -> Config:
    """A trial's run config: its own run folder, Train storage and MLflow run name; a trial restarted by a
    resumed experiment continues its own Train run (and its MLflow run)."""
    storage_path = str(plan.out_dir / "train")
    cfg = with_overrides(
        plan.configure(params),
        {
            "train.output_dir": str(plan.out_dir / "runs" / trial_id),
            "ray.storage_path": storage_path,
            "ray.run_name": trial_id,
            "tracking.run_name": plan.run_label(params) or trial_id,
        },
    )
    resume = RunStorage(storage_path, trial_id).read_record() is not None
    return with_overrides(cfg, {"train.resume": resume, "train.overwrite": not resume})


def per_trial_resources(cfg: Config) -> dict[str, float]:
    resources = {"CPU": TRIAL_FUNCTION_CPUS + cfg.ray.num_workers * cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = float(cfg.ray.num_workers)
    return resources


def max_concurrent_trials(cfg: Config, cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once beside the reward replicas, from each trial's workers
    (at least one). More would start trial functions whose workers only wait for CPUs."""
    need = per_trial_resources(cfg)
    reward = reward_service_resources(cfg)
    free = {kind: cluster.get(kind, 0.0) - reward.get(kind, 0.0) for kind in need}
    fits = [math.floor(free[kind] / amount + 1e-9) for kind, amount in need.items() if amount > 0]
    return max(1, min(fits))


class ReleaseOrphanedWorkers(tune.Callback):
    """Frees every worker placement group whose Train controller is dead, so the next trials get its CPUs.

    A group outlives its controller in two ways: ASHA stops a trial by killing it with its controller
    mid-run, and a controller killed while its trial ends can have just started a retry group (seen on a
    loaded machine: the trial's function returned, the controller's worker died with it, the failure
    policy asked for a new group, and the controller was gone). Such groups live until the job ends, and
    the next trial waits on their CPUs for ever. Ray Train's own cleaner (one detached actor per run)
    finds them through the dashboard's State API, which private clusters run without
    (ray_train.LeanTorchTrainer leaves it out there). Here the driver reads the GCS tables itself (no
    dashboard): a group of this job, not detached, whose creating actor is dead, is removed. The driver's
    own groups (Tune's trial bundles) have no creating actor; a live controller's group is kept.
    """

    EVERY_S = 1.0  # between scans from Tune's event loop (a scan reads two small GCS tables)

    def __init__(self) -> None:
        self.next_scan = 0.0

    def on_step_begin(self, iteration, trials, **info) -> None:
        if time.monotonic() >= self.next_scan:
            self.release()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.release()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.release()

    def on_experiment_end(self, trials, **info) -> None:
        self.release()

    def release(self) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        self.next_scan = time.monotonic() + self.EVERY_S
        for group in orphaned_groups():
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))
                log.debug("removed placement group %s: its controller is dead", group)
            except Exception as err:  # removed meanwhile (by Ray Train): nothing held
                log.debug("placement group %s: %s", group, err)


def orphaned_groups() -> list[str]:
    """This job's placement groups (hex ids), not detached and not removed, whose creating actor is dead."""
    from ray._private.state import actors, state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = ray.ActorID(group.creator_actor_id)
        ours = group.creator_job_id.hex() == job and not group.is_detached and not creator.is_nil()
        if not ours or group.state == removed:
            continue
        # The GCS marks creator_actor_dead when the creator dies, but not on a group that a dying creator
        # registers after that: ask the actor table too.
        if group.creator_actor_dead or actors(actor_id=creator.hex()).get("State") in ("DEAD", None):
            orphans.append(group.placement_group_id.hex())
    return orphans


class TrialsBar(tune.Callback):
    """The sweep's or comparison's console: one bar of finished trials, with how many run and wait.

    Tune's own status tables are off (verbose=0); every trial's numbers are in MLflow and its run folder."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc = total, desc
        self._bar = None
        self.running: set[str] = set()
        self.failed = 0

    def __getstate__(self) -> dict[str, Any]:  # Tune stores its callbacks with the experiment
        return {**self.__dict__, "_bar": None}

    @property
    def bar(self):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit="trial", dynamic_ncols=True)
        return self._bar

    def _show(self) -> None:
        left = max(0, self.bar.total - self.bar.n - len(self.running))
        postfix = {"running": len(self.running), "waiting": left}
        if self.failed:
            postfix["failed"] = self.failed
        self.bar.set_postfix(postfix)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id in self.running:
            self.running.discard(trial.trial_id)
            self.bar.update(1)
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        self.on_trial_complete(iteration, trials, trial)

    def on_experiment_end(self, trials, **info) -> None:
        self.bar.close()


def count_trials(plan: TrialPlan) -> int:
    """Trials Tune will run: every grid point num_samples times (random/optuna: num_samples draws)."""
    points = 1
    for domain in plan.param_space.values():
        if isinstance(domain, dict) and "grid_search" in domain:
            points *= len(domain["grid_search"])
    return points * plan.num_samples


ASHA_STATE = "asha_state.pkl"


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a killed sweep: Tune restores the searcher but hands a resumed experiment
    the scheduler as it was pickled at the start, with empty rungs, so the trials left after a resume
    would be compared only among themselves (or run to the end unchallenged). This one writes its state
    after every event that changes it and reads it back on its first event after a restart. It also
    remembers whom it stopped: a driver killed between ASHA's STOP and Tune acting on it resumes that trial
    from its checkpoint, and Ray's rungs, which already hold its value, would let it run on."""

    def __init__(self, state_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_path = str(state_path)
        self._restored = False
        self._stopped: set[str] = set()

    def _load_once(self) -> None:
        if not self._restored:
            self._restored = True
            if os.path.isfile(self._state_path):
                self.restore(self._state_path)  # updates __dict__ (this flag and the path come back as saved)
                log.info("ASHA: rungs restored from %s", self._state_path)

    def _save(self) -> None:
        with atomic_path(Path(self._state_path)) as tmp:
            self.save(str(tmp))

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_once()
        if trial.trial_id in self._stopped:
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            self._stopped.add(trial.trial_id)  # cut at a rung (not the normal end at max_t)
        self._save()
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._load_once()
        if trial.trial_id in self._trial_info:  # a restored trial may be unknown to the saved rungs
            super().on_trial_remove(tune_controller, trial)
        self._save()


def build_search(plan: TrialPlan):
    """(search_alg, scheduler) for the plan's searcher and scheduler names."""
    search_alg = None
    if plan.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=plan.metric, mode=plan.mode, seed=plan.seed)
    scheduler = None
    if plan.scheduler.get("name") == "asha":
        scheduler = ResumableASHA(
            plan.out_dir / "tune" / ASHA_STATE,
            time_attr="step",
            metric=plan.metric,
            mode=plan.mode,
            max_t=int(plan.scheduler.get("max_t", plan.base.train.iterations)),
            grace_period=int(plan.scheduler.get("grace_period", 1)),
            reduction_factor=float(plan.scheduler.get("reduction_factor", 2)),
        )
    return search_alg, scheduler


def open_parent_run(plan: TrialPlan, resume: bool) -> Tracker:
    if not plan.base.tracking.enabled:
        return NullTracker()
    record_path = plan.out_dir / EXPERIMENT_RECORD
    cfg = plan.base
    if resume and record_path.is_file():
        run_id = json.loads(record_path.read_text())["mlflow_run_id"]
        return MLflowTracker(cfg.tracking.uri, cfg.tracking.experiment, run_id=run_id)
    tracker = MLflowTracker(
        cfg.tracking.uri, cfg.tracking.experiment, plan.name, tags={"leapalign.kind": plan.kind}
    )
    with atomic_path(record_path) as tmp:
        tmp.write_text(json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": cfg.tracking.uri}))
    return tracker


def run_trials(plan: TrialPlan, *, restart: bool = False) -> tuple[list[TrialRecord], Tracker]:
    """Run (or resume) every trial; returns their records and the open parent MLflow run (caller ends it)."""
    # Held-out metrics arrive only at evaluation steps; the other steps' reports lack them by design.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    plan.base = absolute_paths(plan.base)
    tune_path = plan.out_dir / "tune"
    resume = not restart and tune.Tuner.can_restore(str(tune_path / "trials"))
    if not resume:
        (tune_path / ASHA_STATE).unlink(missing_ok=True)  # a new experiment's ASHA starts with empty rungs
    connected = connect_ray(plan.base)
    parent: Tracker = NullTracker()
    try:
        # The trials' reward on Ray Serve, deployed once here: each trial's run_on_ray finds it running.
        ensure_reward_service(plan.base)
        parent = open_parent_run(plan, resume)
        cluster = ray.cluster_resources()
        concurrent = max_concurrent_trials(plan.base, cluster)
        log.info("%s: %s trials at most %d at a time (%s per trial)", plan.name, plan.kind, concurrent,
                 per_trial_resources(plan.base))  # fmt: skip
        trainable = tune.with_resources(
            tune.with_parameters(trial_main, plan=plan, parent_run_id=getattr(parent, "run_id", None)),
            {"cpu": TRIAL_FUNCTION_CPUS},
        )
        if resume:
            log.info("resuming %s from %s: finished trials are kept", plan.name, tune_path)
            tuner = tune.Tuner.restore(
                str(tune_path / "trials"), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            search_alg, scheduler = build_search(plan)
            tuner = tune.Tuner(
                trainable,
                param_space=plan.param_space,
                tune_config=tune.TuneConfig(
                    metric=plan.metric if search_alg is None and scheduler is None else None,
                    mode=plan.mode if search_alg is None and scheduler is None else None,
                    search_alg=search_alg,
                    scheduler=scheduler,
                    num_samples=plan.num_samples,
                    max_concurrent_trials=concurrent,
                ),
                run_config=tune.RunConfig(
                    name="trials",
                    storage_path=str(tune_path),
                    failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[
                        ReleaseOrphanedWorkers(),
                        TrialsBar(count_trials(plan), f"{plan.kind} {plan.name}"),
                    ],
                    verbose=0,
                ),
            )
        grid = tuner.fit()
        records = []
        trial_ids = {trial.path: trial.trial_id for trial in grid._experiment_analysis.trials}
        for result in grid:
            params = dict(result.config or {})
            metrics = dict(result.metrics or {})
            trial_id = trial_ids.get(result.path) or metrics["trial_id"]
            records.append(
                TrialRecord(
                    trial_id=trial_id,
                    params=params,
                    overrides=plan.expand(params),
                    status="ERROR" if result.error else "TERMINATED",
                    metrics=metrics,
                    output_dir=plan.out_dir / "runs" / trial_id,
                    error=str(result.error) if result.error else None,
                )
            )
    except BaseException as err:
        parent.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if connected:
            ray.shutdown()
    return sorted(records, key=lambda r: r.trial_id), parent


def tune_domain(kind: str, values: tuple[Any, ...], searcher: str):
    """A Tune search-space domain for one parsed distribution."""
    if kind == "grid":
        return tune.choice(list(values)) if searcher == "optuna" else tune.grid_search(list(values))
    if kind == "choice":
        return tune.grid_search(list(values)) if searcher == "grid" else tune.choice(list(values))
    low, high = values
    if kind == "uniform":
        return tune.uniform(float(low), float(high))
    if kind == "loguniform":
        return tune.loguniform(float(low), float(high))
    return tune.randint(int(low), int(high))


def close_trial_runs(plan: TrialPlan, records: list[TrialRecord]) -> None:
    """A trial the scheduler stopped leaves its MLflow run RUNNING (its workers were killed): mark it KILLED."""
    if not plan.base.tracking.enabled:
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    for record in records:
        run_record = RunStorage(str(plan.out_dir / "train"), record.trial_id).read_record()
        if run_record is None:
            continue
        # The store the trial logged to (its run record says which): closing it is housekeeping, and a run
        # that cannot be found there is reported, not fatal to the experiment's results.
        uri = run_record.get("tracking_uri") or plan.base.tracking.uri
        try:
            client = mlflow.MlflowClient(uri)
            run = client.get_run(run_record["mlflow_run_id"])
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
        except MlflowException as err:
            log.warning("trial %s: its MLflow run in %s could not be closed: %s", record.trial_id, uri, err)


# ----------------------------------------------------------------------------- the two commands


def tune_methods(
    spec, out_dir: Path, *, restart: bool = False
) -> tuple[dict[str, dict[str, Any]], list[dict]]:
    """The tuning phase of a compare spec: `tune.trials` random draws of every method's search space, each a
    run on the validation prompts at the tuning budget; each method keeps its best trial's parameters (the
    final validation metric). Returns (label -> chosen overrides, every trial's record). The choice is saved
    (tuning/chosen.json) so a resumed comparison runs the same final configs."""
    from leapalign.reports import read_metrics

    tune_spec = spec.tune
    folder = out_dir / "tuning"
    chosen_path = folder / "chosen.json"
    if chosen_path.is_file() and not restart:
        saved = json.loads(chosen_path.read_text())
        return saved["chosen"], saved["trials"]
    labels = list(spec.runs)
    driver_cwd = Path.cwd()
    # One Tune experiment for every method: the grid over methods, each drawing its own keys (namespaced, so
    # methods may search one key over different ranges); a trial applies only its method's keys.
    space = {"run": tune.grid_search(labels)}
    for label in labels:
        for key, param in tune_spec.space[label].items():
            space[f"{label}::{key}"] = tune_domain(param.kind, param.values, "random")

    def own(params: dict[str, Any]) -> dict[str, Any]:
        label = params["run"]
        return {key: params[f"{label}::{key}"] for key in tune_spec.space[label]}

    plan = TrialPlan(
        name=f"{spec.name}-tuning",
        out_dir=folder,
        base=spec.base,
        param_space=space,
        # Built inside the trial (its parameters are drawn there), whose working folder is not the driver's.
        configure=lambda params: absolute_paths(
            spec.tuning_config(params["run"], own(params)), cwd=driver_cwd
        ),
        expand=lambda params: {"run": params["run"], **own(params)},
        metric=tune_spec.metric,
        searcher="random",
        num_samples=tune_spec.trials,
        seed=tune_spec.seed,
        kind="tuning",
        run_label=lambda params: f"{params['run']} tuning",
    )
    records, parent = run_trials(plan, restart=restart)
    close_trial_runs(plan, records)
    trials, chosen = [], {}
    for record in records:
        final = record.metrics.get(tune_spec.metric)
        curve = [r[tune_spec.metric] for r in read_metrics(record.output_dir) if tune_spec.metric in r]
        value = curve[-1] if curve else (final if final is not None else math.nan)
        trials.append({"run": record.params["run"], "trial_id": record.trial_id, "params": own(record.params),
                       "value": float(value), "error": record.error})  # fmt: skip
    for label in labels:
        finished = [
            t for t in trials if t["run"] == label and t["error"] is None and math.isfinite(t["value"])
        ]
        if not finished:
            raise RuntimeError(f"no tuning trial of {label!r} finished; see {folder}")
        chosen[label] = max(finished, key=lambda t: t["value"])["params"]
    with atomic_path(chosen_path) as tmp:
        tmp.write_text(json.dumps({"chosen": chosen, "trials": trials}, indent=2, default=str))
    parent.log_artifact(chosen_path)
    parent.end("FINISHED")
    return chosen, trials


def run_compare(spec, out_dir: Path, *, restart: bool = False) -> Path:
    """`leapalign compare`: (the tuning phase, when the spec has one, then) every (run label, seed) as a trial
    at the spec's compute budget on the test prompts, then the report with its statistics."""
    # One cluster for both phases: its Serve reward deployment serves the tuning and the final runs.
    connected = connect_ray(absolute_paths(spec.base))
    try:
        return _run_compare(spec, out_dir, restart=restart)
    finally:
        if connected:
            ray.shutdown()


def _run_compare(spec, out_dir: Path, *, restart: bool) -> Path:
    from leapalign.comparison import compare_report

    runs = spec.runs
    chosen, tuning = tune_methods(spec, out_dir, restart=restart) if spec.tune is not None else ({}, [])
    # Every (label, seed) config is built and made absolute here, in the driver: trials run elsewhere.
    configs = {
        (label, seed): absolute_paths(spec.run_config(label, seed, chosen.get(label)))
        for label in runs
        for seed in spec.seeds
    }
    plan = TrialPlan(
        name=spec.name,
        out_dir=out_dir,
        base=spec.base,
        param_space={"run": tune.grid_search(list(runs)), "train.seed": tune.grid_search(list(spec.seeds))},
        configure=lambda params: configs[(params["run"], params["train.seed"])],
        expand=lambda params: {"run": params["run"], "train.seed": params["train.seed"]},
        metric=spec.metric,
        searcher="grid",
        kind="compare",
        run_label=lambda params: f"{params['run']} seed {params['train.seed']}",
    )
    records, parent = run_trials(plan, restart=restart)
    close_trial_runs(plan, records)
    failed = [r for r in records if r.status == "ERROR"]
    for record in failed:
        log.error("run %s (%s) failed: %s", record.trial_id, record.params, record.error)
    ran = {(r.params["run"], int(r.params["train.seed"])): r for r in records}
    entries = []
    for label in runs:
        for seed in spec.seeds:  # every run asked for, a missing one included: the report names it
            record = ran.get((label, seed))
            folder = record.output_dir if record else out_dir / "runs" / "missing"
            error = (record.error or None) if record else "never ran (no trial record)"
            entries.append(
                (label, seed, folder, error if record is None or record.status == "ERROR" else None)
            )
    from leapalign.distributed.data_jobs import sample_report_grid_on_ray

    report = compare_report(
        spec, absolute_paths(spec.base), entries, out_dir / "report", chosen, tuning,
        sample_grid=sample_report_grid_on_ray,
    )  # fmt: skip
    parent.log_params({"compare.budget": json.dumps(spec.budget), "compare.seeds": str(spec.seeds),
                       "compare.runs": ", ".join(runs), "compare.metric": spec.metric,
                       "compare.reference": spec.reference, "compare.tuned": spec.tune is not None})  # fmt: skip
    parent.log_artifact(out_dir / "report", "report")
    parent.end("FAILED" if failed else "FINISHED")
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(records)} runs failed (named in the report); the report covers the others: {report}"
        )
    return report


def run_sweep(spec, out_dir: Path, *, restart: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """`leapalign sweep`: the search as Tune trials, then the results table, plots and the best config."""
    from leapalign.experiments import active_overrides, config_yaml
    from leapalign.reports import sweep_report

    search = spec.search
    base = spec.base
    absolute = absolute_paths(base)
    plan = TrialPlan(
        name=spec.name,
        out_dir=out_dir,
        base=base,
        param_space={key: tune_domain(p.kind, p.values, spec.searcher) for key, p in search.items()},
        configure=lambda params: with_overrides(absolute, active_overrides(params, search, base)),
        expand=lambda params: active_overrides(params, search, base),
        metric=spec.metric,
        mode=spec.mode,
        searcher=spec.searcher,
        scheduler=spec.scheduler,
        num_samples=spec.num_samples,
        seed=spec.seed,
        kind="sweep",
    )
    records, parent = run_trials(plan, restart=restart)
    close_trial_runs(plan, records)
    trials = [
        {"trial_id": r.trial_id, "status": r.status, "run_dir": r.output_dir, "params": r.overrides}
        for r in records
    ]
    report_dir = out_dir / "report"
    best = sweep_report(
        trials, list(search), spec.metric, spec.mode, report_dir, iterations=base.train.iterations
    )
    best_path = out_dir / "best.yaml"
    if best is not None:
        record = next(r for r in records if r.trial_id == best["trial_id"])
        best_cfg = with_overrides(
            plan.base,
            {**record.overrides, "train.output_dir": str(out_dir / "best_run"), "ray.run_name": None},
        )
        header = (
            f"# Best trial {record.trial_id} of sweep {spec.name}: final {spec.metric} = "
            f"{best[f'final/{spec.metric}']:.4f}\n# leapalign train {best_path}\n"
        )
        with atomic_path(best_path) as tmp:
            tmp.write_text(header + config_yaml(best_cfg))
        parent.log_metrics({f"best/{spec.metric}": best[f"final/{spec.metric}"]}, step=0)
        parent.log_artifact(best_path)
    parent.log_params({"sweep.searcher": spec.searcher, "sweep.metric": spec.metric, "sweep.mode": spec.mode,
                       "sweep.num_samples": spec.num_samples, "sweep.scheduler": json.dumps(spec.scheduler),
                       "sweep.search": json.dumps({k: [p.kind, list(p.values), p.when] for k, p in search.items()})})  # fmt: skip
    parent.log_artifact(report_dir, "report")
    parent.end("FINISHED")
    return best_path, best
