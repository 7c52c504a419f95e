"""Reward models on Ray Serve, and the RewardFn that training workers call them through.

    driver:   cfg = ensure_reward_service(cfg)          # deploy the configured reward, or find it running
    workers:  reward_fn = make_reward_fn(cfg.reward)    # a RewardFn (ServedReward, or a WeightedSum of them)
              rewards = reward_fn(images, prompts)      # [B], wired into autograd

Each reward model is one Serve application holding one deployment of `RewardModel`. Serve gives us what
the plain actors did by hand: replicas (Ray actors) with declared resources (fractional GPUs), a replica
count or autoscaling, health checks and replacement of dead replicas, request batching (`@serve.batch`),
and a runtime_env per deployment. What stays ours: the reward, built by name from the one registry
(leapalign.rewards.base) exactly as in process; the gradient bridge; and re-sending a request whose
replica died under it (Serve re-routes only requests that no replica has accepted yet).

Gradients do not cross the wire as graphs. For the direct-gradient methods a replica returns the rewards
AND grad[b] = d r[b] / d image[b]; every reward is per image (r[b] depends on image b only), so one
backward of rewards.sum() gives all B of them, and on the worker the chain rule is exact:
d loss / d image[b] = (d loss / d r[b]) * grad[b]. `PixelGradients` puts that product into the worker's
graph, so `loss.backward()` works as with any reward. A reward built in process takes the same route
(rewards/configured.py: the same function computes r and grad on both sides), so values and gradients are
the in-process ones bit for bit when the replica and the worker use the same torch threads (a replica
uses int(reward.cpus_per_replica); batching other workers' images into one forward can move the last bit).

Arrays travel as numpy (zero-copy through the object store; torch tensors are pickled and copied) in
float32, or float64 when the caller sends float64. The Serve HTTP proxy is not started (handles only);
a Serve instance someone else started keeps its own proxy settings.

Application names: `leapalign-reward-<name>-<hash of the reward and its serving settings>`, so runs and
sweep trials with the same reward share one deployment (ensure_reward_service finds it), and a config
saved with such a name deploys it again on a fresh cluster. Lifetime: applications live until
`serve.delete(app)` (or `python -m reward_servers.serve --stop APP`), `serve.shutdown()` or the cluster
stops; a private cluster started by `leapalign train` takes them with it.

Why one file over 500 lines: both sides of the gradient bridge (the replica's `RewardModel` and the
worker's `ServedReward`) and the deployment that joins them, read together; what is served (the plan
and its checks, no Ray) is leapalign.rewards.serving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from torch import Tensor

from leapalign.config import RewardConfig, with_overrides
from leapalign.rewards.base import (
    RewardError,
    RewardFn,
    build_reward,
    check_rewards,
    resolve_reward,
)
from leapalign.rewards.configured import (
    PixelGradients,
    WeightedSum,
    build_configured_reward,
    check_gradients,
    check_reward_inputs,
    rewards_and_gradients,
    wire_dtype,
)
from leapalign.rewards.serving import (
    AUTO_APP_PREFIX,
    ServingSpec,
    check_reward,
    serves_reward,
    serving_plan,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from leapalign.config import Config

log = logging.getLogger("leapalign")

DEPLOYMENT = "RewardModel"  # the one deployment in each reward application
READY_TIMEOUT_S = 600.0  # a replica builds its reward (weights download, load) within this
_WIRE_DTYPES = (np.float32, np.float64)  # what travels; bf16/fp16 images are sent as float32


class RewardServiceError(ValueError):
    """A reward application that cannot be deployed, found or reached; the message says what to do."""


def reward_service_resources(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs the reward replicas reserve on a cluster where nothing serves them yet."""
    if not serves_reward(cfg):
        return {"CPU": 0.0, "GPU": 0.0}
    parts = [
        p
        for p in serving_plan(cfg.reward, cfg.train.cpu_isa)
        if p.app is None or p.app.startswith(AUTO_APP_PREFIX)
    ]
    return {
        "CPU": sum(p.spec.replicas * p.spec.cpus_per_replica for p in parts),
        "GPU": sum(p.spec.replicas * p.spec.gpus_per_replica for p in parts),
    }


def absolute_reward_paths(reward_cfg: RewardConfig, cwd: Path | None = None) -> dict[str, Any]:
    """Dotted updates pinning reward option values that name an existing relative path to the caller's
    folder (`cwd`, default the current one): replicas and workers do not start there. Shipped assets
    (assets/mini-scorer) do not exist relative to the caller and stay relative: the replica resolves them
    against its own install."""
    root = cwd if cwd is not None else Path.cwd()

    def pinned(options: dict[str, Any]) -> dict[str, Any]:
        out = dict(options)
        for key, value in options.items():
            looks_like_path = isinstance(value, str) and ("/" in value or value.startswith(("~", ".")))
            if looks_like_path and not os.path.isabs(value) and "://" not in value:
                path = root / Path(value).expanduser()
                if path.exists():
                    out[key] = str(path.resolve())
        return out

    if reward_cfg.name != RewardConfig.WEIGHTED_SUM:
        options = pinned(reward_cfg.options)
        return {"reward.options": options} if options != reward_cfg.options else {}
    components = {
        label: {**spec, "options": pinned(spec.get("options") or {})} if isinstance(spec, dict) else spec
        for label, spec in reward_cfg.options.items()
    }
    return {"reward.options": components} if components != reward_cfg.options else {}


# ----------------------------------------------------------------------------- the deployment


@dataclass
class _Request:
    kind: str  # "score" (values) | "grad" (values and d r / d image)
    images: np.ndarray  # [b, 3, H, W] float32/float64 in [0, 1]
    prompts: list[str]
    size: int  # images counted against max_batch; capped at it, so a larger request runs alone, unsplit


def _batch_images(requests: list[_Request]) -> int:
    return sum(r.size for r in requests)


class RewardModel:
    """One replica: a registered reward built once, serving batched `score` / `score_and_grad` calls.

    Requests queue in the replica's event loop; `@serve.batch` hands them over in batches of up to
    max_batch images, waiting up to batch_wait_ms for company. One thread runs the reward (one model, one
    stream), so requests that arrive during a forward pass join the next batch.
    """

    def __init__(
        self,
        reward_name: str,
        options: dict[str, Any],
        *,
        max_batch: int,
        batch_wait_ms: float,
        torch_threads: int,
        device: str,
        version: str,
    ):
        torch.set_num_threads(torch_threads)  # what the caller's process would use for the same numbers
        self.reward_name, self.options, self.version = reward_name, dict(options), version
        self.device = torch.device(device)
        factory = resolve_reward(reward_name)
        build_options = dict(options)
        if "device" not in build_options and _accepts(factory, "device"):
            build_options["device"] = str(self.device)  # scorers that place themselves: where Ray put us
        self.reward: RewardFn = build_reward(reward_name, build_options)
        if isinstance(self.reward, torch.nn.Module):  # served rewards are frozen: no weight grads, no dropout
            self.reward.to(self.device).eval().requires_grad_(False)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.source = f"reward {reward_name!r} (Serve replica {self.replica})"
        for batched in (self._score_batch, self._grad_batch):
            batched.set_max_batch_size(max_batch)
            batched.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self._stats = {
            "calls": 0,
            "batches": 0,
            "images": 0,
            "largest_batch": 0,
            "errors": 0,
            "compute_s": 0.0,
        }

    def describe(self) -> dict[str, Any]:
        return {"reward": self.reward_name, "options": self.options, "version": self.version}

    def stats(self) -> dict[str, Any]:
        """This replica's counters (a handle call reaches one replica, whichever the router picks)."""
        return {
            **self._stats,
            "replica": self.replica,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
        }

    def flops(self, images: np.ndarray, prompts: list[str]) -> tuple[float, float]:
        """(forward, backward) FLOPs per image of this replica's reward, measured here (leapalign.costs)."""
        from leapalign.costs import reward_flops

        return reward_flops(self.reward, _as_tensor(images).to(self.device), list(prompts))

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes it replace the replica. A CUDA error
        is sticky (every later call would fail), and synchronize is where it surfaces."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    async def score(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
        """images [B, 3, H, W] in [0, 1] -> (rewards [B] in the images' dtype, {"replica", "batch"})."""
        result = await self._score_batch(self._request("score", images, prompts))
        if isinstance(result, Exception):
            raise result
        return result

    async def score_and_grad(
        self, images: np.ndarray, prompts: list[str]
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """-> (rewards [B], grad [B, 3, H, W] with grad[b] = d rewards[b] / d images[b], info)."""
        result = await self._grad_batch(self._request("grad", images, prompts))
        if isinstance(result, Exception):
            raise result
        return result

    def _request(self, kind: str, images: np.ndarray, prompts: list[str]) -> _Request:
        """Checked here, before it can share a batch: a bad request fails alone."""
        self._stats["calls"] += 1
        if not isinstance(images, np.ndarray) or images.dtype not in _WIRE_DTYPES:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"{self.source}: images must be a float32 or float64 numpy array, got {got}")
        check_reward_inputs(_as_tensor(images), prompts, self.source)  # shape, pairing, range, NaN, prompts
        return _Request(kind, images, list(prompts), min(len(prompts), self.max_batch))

    # The decorators' sizes are replaced in __init__ by the deployment's max_batch / batch_wait_ms.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_batch_images)
    async def _score_batch(self, requests: list[_Request]) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_batch_images)
    async def _grad_batch(self, requests: list[_Request]) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, requests)

    def _run(self, requests: list[_Request]) -> list:
        """One forward (+ one backward of rewards.sum()) per image shape; each request gets its slice, or
        the exception that concerns it (a NaN fails only the request it belongs to)."""
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.images.shape[1:], r.images.dtype), []).append(i)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            t0 = time.perf_counter()
            try:
                rewards, grads = self._forward(group[0].kind, group)
            except Exception as err:  # the batch failed as a whole: every caller hears why, none hangs
                self._stats["errors"] += len(group)
                for i in indices:
                    results[i] = err
                continue
            batch = sum(len(r.prompts) for r in group)
            stats = self._stats
            stats["compute_s"] += time.perf_counter() - t0
            stats["batches"] += 1
            stats["images"] += batch
            stats["largest_batch"] = max(stats["largest_batch"], batch)
            info = {"replica": self.replica, "batch": batch}
            offset = 0
            for i, r in zip(indices, group, strict=True):
                n = len(r.prompts)
                r_rewards, r_grads = (
                    rewards[offset : offset + n],
                    None if grads is None else grads[offset : offset + n],
                )
                offset += n
                try:
                    check_rewards(torch.from_numpy(r_rewards), n, source=self.source)
                    if r_grads is not None:
                        check_gradients(torch.from_numpy(r_grads), self.source)
                except RewardError as err:
                    stats["errors"] += 1
                    results[i] = err
                    continue
                results[i] = (r_rewards, info) if r_grads is None else (r_rewards, r_grads, info)
        return results

    def _forward(self, kind: str, group: list[_Request]) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch through the reward exactly as CheckedReward runs it in process."""
        prompts = [p for r in group for p in r.prompts]
        images = np.concatenate([r.images for r in group]) if len(group) > 1 else group[0].images
        pixels = torch.from_numpy(np.array(images, copy=True)).to(self.device)  # [N, 3, H, W], writable
        if kind == "score":
            with torch.no_grad():
                rewards = self.reward(pixels, prompts)  # [N]
            if not isinstance(rewards, Tensor) or rewards.shape != (len(prompts),):
                check_rewards(rewards, len(prompts), source=self.source)  # shape errors fail the whole batch
            return rewards.detach().to("cpu", pixels.dtype).numpy(), None
        rewards, grads = rewards_and_gradients(self.reward, pixels, prompts, self.source)  # [N], [N, 3, H, W]
        return rewards.to("cpu", pixels.dtype).numpy(), grads.to("cpu").numpy()


def _accepts(factory: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- deploying


def start_serve() -> None:
    """Serve on the connected cluster with no HTTP proxy: rewards are called through handles only. If
    someone already started Serve, its settings stay (and its proxy, if any, binds where they chose)."""
    serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})


def deploy_reward(app: str, spec: ServingSpec, *, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Deploy (or update) `app` serving `spec`, and wait until its replicas are up."""
    start_serve()
    autoscaling = None
    if spec.max_replicas > spec.replicas:
        autoscaling = {
            "min_replicas": spec.replicas,
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": 2,
        }
    actor_options: dict[str, Any] = {"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica}
    if spec.runtime_env:
        actor_options["runtime_env"] = spec.runtime_env
    deployment = serve.deployment(RewardModel).options(
        name=DEPLOYMENT,
        num_replicas=None if autoscaling else spec.replicas,
        autoscaling_config=autoscaling,
        ray_actor_options=actor_options,
        # Two batches' worth of one-image callers: the next batch fills while one computes.
        max_ongoing_requests=max(8, 2 * spec.max_batch),
        health_check_period_s=10.0,
        health_check_timeout_s=120.0,  # a GPU busy with a long backward still answers within this
        max_constructor_retry_count=3,  # bad options fail the deployment in seconds, not after 20 tries
        logging_config={"enable_access_log": False},  # no log line per reward call
    )
    application = deployment.bind(
        spec.reward,
        spec.options,
        max_batch=spec.max_batch,
        batch_wait_ms=spec.batch_wait_ms,
        torch_threads=spec.torch_threads,
        device="cuda" if spec.gpus_per_replica > 0 else "cpu",
        version=spec.version,
    )
    serve.run_many(
        [serve.RunTarget(application, name=app, route_prefix=None)], wait_for_applications_running=False
    )
    try:
        wait_until_running(app, spec, timeout_s)
    except RewardServiceError:
        serve.delete(app)  # nothing half-deployed stays behind; the next try starts clean
        raise


def wait_until_running(app: str, spec: ServingSpec, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RewardServiceError(
                f"Serve application {app!r} could not build reward {spec.reward!r} with options "
                f"{spec.options!r}: {_failure_reason(status)}"
            )
        if time.monotonic() > deadline:
            raise RewardServiceError(
                f"Serve application {app!r} ({spec.reward!r}) was not running after {timeout_s:.0f} s: is there "
                f"room for {spec.replicas} replica(s) of {spec.cpus_per_replica:g} CPU, {spec.gpus_per_replica:g} "
                f"GPU? (`ray status` shows free resources; lower reward.replicas / reward.cpus_per_replica)"
            )
        time.sleep(0.2)


def _failure_reason(status: Any) -> str:
    """The last line of the replica's traceback (the reward's own error), else Serve's message."""
    messages = [status.message, *(d.message for d in status.deployments.values())]
    for message in messages:
        lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
        if errors:
            return errors[-1]
    return next((m for m in messages if m), "no reason given")


def ensure_reward_service(cfg: Config, *, timeout_s: float = READY_TIMEOUT_S) -> Config:
    """Deploy the configured reward on Ray Serve, or find it running; returns cfg naming what serves it.

    The sweep driver calls it once before its trials start; each trial's run_on_ray calls it again and finds
    the same applications running. Returns cfg unchanged when the reward is built in process (ray.enabled
    false or reward.serve=false). Needs a connected Ray cluster.
    """
    if not serves_reward(cfg):
        return cfg
    check_reward(cfg)  # an unknown name fails here, not after a replica has tried to build it
    apps: dict[str | None, str] = {}
    for part in serving_plan(cfg.reward, cfg.train.cpu_isa):
        auto = part.app is None or part.app.startswith(AUTO_APP_PREFIX)  # a saved config's auto name is stale
        app = part.spec.auto_app if auto else part.app
        what = f"reward.app={app!r}" if part.label is None else f"reward.options.{part.label}.app={app!r}"
        running = _app_status(app)
        if running is None and not auto:
            raise RewardServiceError(
                f"{what} is not running on this cluster: start it with `python -m reward_servers.serve "
                f"{part.spec.reward} --app {app}`, or drop the app setting to deploy it from this config"
            )
        if running is None:
            log.info("deploying reward %r as Serve application %r", part.spec.reward, app)
            deploy_reward(app, part.spec, timeout_s=timeout_s)
        else:
            if running != "RUNNING":  # deploying, or replacing a replica: wait for it
                wait_until_running(app, part.spec, timeout_s)
            _check_serves(app, part.spec, what)
        apps[part.label] = app
    if cfg.reward.name != RewardConfig.WEIGHTED_SUM:
        return with_overrides(cfg, {"reward.app": apps[None]})
    options = {label: {**spec, "app": apps[label]} for label, spec in cfg.reward.components().items()}
    return with_overrides(cfg, {"reward.options": options})


def _app_status(app: str) -> str | None:
    status = serve.status().applications.get(app)
    return (
        None if status is None or status.status in ("DELETING", "NOT_STARTED") else str(status.status.value)
    )


def _check_serves(app: str, spec: ServingSpec, what: str) -> None:
    """The run's config (logged to MLflow) must say what the application really serves."""
    served = serve.get_app_handle(app).describe.remote().result(timeout_s=120)
    if served["reward"] != spec.reward or served["options"] != spec.options:
        raise RewardServiceError(
            f"{what} serves reward {served['reward']!r} with options {served['options']!r}, but the config "
            f"says {spec.reward!r} with {spec.options!r}; make them agree"
        )


def delete_reward_service(cfg: Config) -> None:
    """Delete the applications ensure_reward_service named in cfg (after a run that owned them)."""
    for part in serving_plan(cfg.reward, cfg.train.cpu_isa):
        if part.app is not None and _app_status(part.app) is not None:
            serve.delete(part.app)


# ----------------------------------------------------------------------------- the worker's RewardFn


class ServedReward:
    """A RewardFn backed by a Serve application: values, and gradients when the images need them.

    Calls with images that require grad (and grad mode on) use score_and_grad; others, and `score`, fetch
    values only (GRPO, evaluation). A request whose replica dies is sent again (Serve has replaced or is
    replacing it) until max_wait_s; a reward error (NaN, bad input) is raised at once, never retried.
    """

    def __init__(
        self, app: str, *, label: str | None = None, max_wait_s: float = 300.0, call_timeout_s: float = 900.0
    ):
        self.app, self.label = app, label
        self.max_wait_s, self.call_timeout_s = max_wait_s, call_timeout_s
        self.source = f"served reward {label or app!r}"
        self.retries = 0  # requests sent again after their replica died
        self.replicas_seen: set[str] = set()  # replicas that answered (two replicas serving one run: 2)
        self.largest_batch = 0  # most images in one forward that served this caller
        self._handle: DeploymentHandle | None = None
        self._lock = threading.Lock()

    # The handle and the lock are process-local: a pickled ServedReward looks the application up again.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _handle=None, _lock=threading.Lock())

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B] (with a graph to images if they need one)."""
        return self.start(images, prompts)()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Values only, no graph."""
        return self.start(images, prompts, values_only=True)()

    def start(
        self, images: Tensor, prompts: Sequence[str], values_only: bool = False
    ) -> Callable[[], Tensor]:
        """Send the request now; the returned function waits for the answer (WeightedSum overlaps them)."""
        check_reward_inputs(images, prompts, self.source)
        prompts = list(prompts)
        grad = not values_only and torch.is_grad_enabled() and images.requires_grad
        method = "score_and_grad" if grad else "score"
        wire = (
            images.detach().to("cpu", wire_dtype(images.dtype)).contiguous().numpy()
        )  # CPU-GPU sync here on CUDA
        response = self._send(method, wire, prompts)

        def finish() -> Tensor:
            answer = self._receive(response, method, wire, prompts)
            rewards = _as_tensor(answer[0]).to(images.device, images.dtype)  # [B]
            if not grad:
                return rewards
            grads = answer[1]
            if grads.shape != wire.shape:
                raise RewardError(
                    f"{self.source} returned a gradient of shape {grads.shape}, expected {wire.shape}"
                )
            return PixelGradients.apply(images, rewards, _as_tensor(grads).to(images.device))

        return finish

    def flops(self, images: Tensor, prompts: Sequence[str]) -> tuple[float, float]:
        """(forward, backward) FLOPs per image, measured in a replica (where the reward's arithmetic runs)."""
        wire = images.detach().to("cpu", wire_dtype(images.dtype)).contiguous().numpy()
        return tuple(
            self._get_handle().flops.remote(wire, list(prompts)).result(timeout_s=self.call_timeout_s)
        )

    def stats(self) -> dict[str, Any]:
        """Counters of one replica (whichever the router picks)."""
        return self._get_handle().stats.remote().result(timeout_s=self.call_timeout_s)

    # -- plumbing ------------------------------------------------------------------------------

    def _get_handle(self) -> DeploymentHandle:
        with self._lock:
            if self._handle is None:
                try:
                    self._handle = serve.get_app_handle(self.app)
                except Exception as err:  # RayServeException, or Serve not running on this cluster
                    raise RewardServiceError(
                        f"{self.source}: no Serve application {self.app!r} on this cluster ({err}); "
                        f"deploy it with ensure_reward_service(cfg) or `python -m reward_servers.serve`"
                    ) from None
            return self._handle

    def _send(self, method: str, images: np.ndarray, prompts: list[str]):
        return getattr(self._get_handle(), method).remote(images, prompts)

    def _receive(self, response, method: str, images: np.ndarray, prompts: list[str]):
        deadline = time.monotonic() + self.max_wait_s
        while True:
            try:
                answer = response.result(timeout_s=self.call_timeout_s)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:  # the replica died under it
                if isinstance(err, RayTaskError):
                    raise self._user_error(err) from None
                if time.monotonic() > deadline:
                    raise RewardServiceError(
                        f"{self.source}: no replica of {self.app!r} answered {method} within {self.max_wait_s:.0f} s "
                        f"after {self.retries} retries (last: {type(err).__name__}); is the application healthy? "
                        f"(serve.status())"
                    ) from None
                self.retries += 1
                log.warning(
                    "%s: replica died during %s; sending it again (retry %d)",
                    self.source,
                    method,
                    self.retries,
                )
                response = self._send(method, images, prompts)  # Serve routes it to a live replica
                continue
            except TimeoutError:
                raise RewardServiceError(
                    f"{self.source}: {self.app!r} did not answer {method} within {self.call_timeout_s:.0f} s"
                ) from None
            except RayTaskError as err:  # the reward itself raised inside the replica: retrying won't help
                raise self._user_error(err) from None
            info = answer[-1]
            self.replicas_seen.add(info["replica"])
            self.largest_batch = max(self.largest_batch, info["batch"])
            check_rewards(_as_tensor(np.asarray(answer[0])), len(prompts), source=self.source)
            return answer

    @staticmethod
    def _user_error(err: RayTaskError) -> Exception:
        """The replica's RewardError / ValueError as itself (its message names the reward and replica)."""
        cause = getattr(err, "cause", None)
        if isinstance(cause, RewardError):
            return RewardError(str(cause))
        if isinstance(cause, ValueError):
            return ValueError(str(cause))
        return err


def _as_tensor(array: np.ndarray) -> Tensor:
    """A tensor sharing the array's memory. Arrays from the object store are read-only views; the tensors
    made here are only read (never updated in place), so sharing beats a copy (25 MB at 512 px, batch 8)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def make_reward_fn(reward_cfg: RewardConfig) -> RewardFn:
    """The run's RewardFn: the applications ensure_reward_service named, else the reward built in process."""
    parts = serving_plan(reward_cfg) if reward_cfg.serve else []
    if not parts or any(part.app is None for part in parts):
        return build_configured_reward(reward_cfg)
    if reward_cfg.name != RewardConfig.WEIGHTED_SUM:
        return ServedReward(parts[0].app, label=reward_cfg.name)
    return WeightedSum.of({p.label: (p.weight, ServedReward(p.app, label=p.label)) for p in parts})
