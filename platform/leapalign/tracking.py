"""Run tracking: MLflow (the default) or nothing. The training loop only sees the Tracker protocol."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

RUN_RECORD = "leapalign_run.json"  # beside a run's checkpoints: the MLflow run a resumed run reattaches to


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the fix, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({err}). Start one with `mlflow server "
            f"--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 --workers 1`, or set "
            f"tracking.uri=sqlite:///mlflow.db for a local store"
        ) from None
    raise ConnectionError(f"MLflow tracking server {uri} did not answer /health with 200")


class MLflowTracker:
    """One MLflow run. `run_id` given: reattach to it (resumed runs keep one run); nested under a parent run."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        check_tracking_uri(uri)
        self._mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = dict(tags or {})
            if parent_run_id is not None:
                tags["mlflow.parentRunId"] = parent_run_id  # shows as a nested run in the MLflow UI
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._pending: list = []  # asynchronous metric batches not yet known to be written

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not waited for: MLflow's asynchronous logging writes the batches in order from a thread
        of its own (a step no longer waits ~10 ms on sqlite, more on a remote server); `flush` waits."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def flush(self) -> None:
        """Wait until every queued batch is written (raising its error, if one failed)."""
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)


# Logged with every step's metrics (evaluation at step 0 included): its last step in MLflow is the last step
# MLflow holds, which is what a resumed run must not log again.
PROGRESS_METRIC = "compute/nfe_total"


class ResumableTracker:
    """An MLflowTracker that never logs a step twice across restarts and resumes.

    Steps at or below the last one MLflow already holds (a restarted worker group or a resumed run
    replays the steps after its checkpoint, with the same numbers) are dropped on arrival.
    """

    def __init__(self, tracker: MLflowTracker):
        self.tracker = tracker
        self.run_id = tracker.run_id
        history = tracker.client.get_metric_history(tracker.run_id, PROGRESS_METRIC)
        self.logged_through = max((m.step for m in history), default=-1)

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.logged_through:
            self.tracker.log_metrics(metrics, step)
            self.logged_through = step

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def flush(self) -> None:
        self.tracker.flush()

    def end(self, status: str = "FINISHED") -> None:
        self.tracker.end(status)


def open_tracker(cfg, record: dict[str, Any] | None = None, parent_run_id: str | None = None) -> Tracker:
    """The training run's one MLflow run: new, or the stopped run's (from its run record) when resuming.

    cfg is a leapalign.config.Config; `record` is the run record ({"mlflow_run_id", "tracking_uri"}).
    """
    if not cfg.tracking.enabled:
        return NullTracker()
    run_id = record.get("mlflow_run_id") if record else None
    if run_id is None:
        return MLflowTracker(
            cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name, parent_run_id=parent_run_id
        )
    from mlflow.exceptions import MlflowException

    try:
        return MLflowTracker(cfg.tracking.uri, cfg.tracking.experiment, run_id=run_id)
    except MlflowException as err:
        raise ValueError(
            f"resuming: MLflow run {run_id} of this run is not in tracking.uri={cfg.tracking.uri} "
            f"({err.message}); resume with the tracking.uri it started with: {record.get('tracking_uri')}"
        ) from None
