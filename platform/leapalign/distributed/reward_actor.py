"""Reward models served as named Ray actors, and the RewardFn that training workers call them through.

    driver:   launch_reward_actor("clip", "clip_score", {...}, num_gpus=0.25)   # once per cluster
    workers:  reward_fn = ActorReward("clip")                                    # a RewardFn
              rewards = reward_fn(images, prompts)   # [B], wired into autograd

Gradients do not cross `ray.get`. For the direct-gradient methods the actor returns the rewards AND
grad[b] = d r[b] / d image[b]; since every reward is per image (r[b] depends on image b only),
`rewards.sum()` backpropagated once gives all B per-image gradients, and on the worker the chain rule
is exact: d loss / d image[b] = (d loss / d r[b]) * grad[b]. `_RemoteReward` puts that product into
the worker's graph, so `loss.backward()` works as with an in-process reward.

Requests from several workers are batched inside the actor: the first request waits up to
`max_wait_ms` for others (or until `max_batch` images are queued), one forward (+ backward) serves them
all, and each caller gets its own slice. Arrays travel as numpy (zero-copy through the object store;
torch tensors would be pickled and copied) in float32, or float64 when the caller sends float64.

Lifetime: a named actor is owned by the process that created it and dies when that process exits or
drops its handle, unless it is launched with detached=True (then it lives until `ray.kill` or the
cluster stops; `python -m reward_servers.serve NAME` does that). Either way several trials can share
one actor: launch_reward_actor uses get_if_exists=True and refuses an actor of the same name that
serves another reward.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from torch import Tensor

from leapalign.rewards.base import RewardError, RewardFn, build_reward, check_rewards

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from leapalign.config import RewardConfig

DEFAULT_NAMESPACE = "leapalign"
SERVE_HINT = "start it with `python -m reward_servers.serve NAME` (or launch_reward_actor in the driver)"
_WIRE_DTYPES = (np.float32, np.float64)  # what travels; bf16/fp16 images are sent as float32


class RewardActorError(RuntimeError):
    """A reward actor that cannot be found, started or reached; the message says what to do."""


# ----------------------------------------------------------------------------- the actor


@dataclass
class _Request:
    kind: str  # "score" (values) | "grad" (values and d r / d image)
    images: np.ndarray  # [b, 3, H, W]
    prompts: list[str]
    future: asyncio.Future
    arrived: float  # event-loop time

    @property
    def key(self) -> tuple:
        """Requests with the same key can share one forward pass."""
        return (self.kind, self.images.shape[1:], self.images.dtype)


@dataclass
class _Stats:
    calls: int = 0  # score / score_and_grad requests received
    batches: int = 0  # forward passes run
    images: int = 0  # images scored
    largest_batch: int = 0  # most images in one forward pass
    errors: int = 0  # requests answered with an error
    compute_s: float = 0.0  # time inside the reward's forward (+ backward)


class RewardServer:
    """Serves one registered reward to many training workers, batching their concurrent requests.

    An async actor: `score` and `score_and_grad` calls queue up in the event loop while one worker
    thread runs the reward, so requests that arrive during a forward pass join the next batch.
    """

    def __init__(
        self,
        reward_name: str,
        options: dict[str, Any] | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        setup_modules: Sequence[str] = (),
        device: str = "auto",
    ):
        # Modules that register extra rewards (plugins, test-only rewards) are imported here, in the
        # actor's process, so they never enter the registry of the training processes.
        for module in setup_modules:
            importlib.import_module(module)
        self.reward_name, self.options = reward_name, dict(options or {})
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.reward: RewardFn = build_reward(reward_name, self.options)
        if isinstance(self.reward, torch.nn.Module):
            # Served rewards are frozen: no weight gradients, no dropout.
            self.reward.to(self.device).eval().requires_grad_(False)
        self.source = f"reward {reward_name!r} served by actor {ray.get_runtime_context().get_actor_name()!r}"
        self._stats = _Stats()
        self._pending: list[_Request] = []  # oldest first
        self._wakeup: asyncio.Event | None = None  # made in the actor's event loop on first use
        self._batcher: asyncio.Task | None = None
        # One thread runs the reward (one model, one stream); the event loop keeps queueing requests.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self._started = time.time()

    async def describe(self) -> dict[str, Any]:
        """What this actor serves; launch_reward_actor and ActorReward check it."""
        return {"reward": self.reward_name, "options": self.options, "device": str(self.device)}

    async def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "calls": s.calls, "batches": s.batches, "images": s.images, "largest_batch": s.largest_batch,
            "errors": s.errors, "compute_s": s.compute_s, "pid": os.getpid(), "started_at": self._started,
            "torch_threads": torch.get_num_threads(),
        }  # fmt: skip

    async def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images [B, 3, H, W] float32/float64 in [0, 1] -> rewards [B], same dtype."""
        rewards, _ = await self._submit("score", images, prompts)
        return rewards

    async def score_and_grad(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (rewards [B], grad [B, 3, H, W] with grad[b] = d rewards[b] / d images[b])."""
        return await self._submit("grad", images, prompts)

    # -- batching ------------------------------------------------------------------------------

    async def _submit(self, kind: str, images: np.ndarray, prompts: list[str]):
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 3:
            got = images.shape if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"{self.source}: images must be a numpy array [B, 3, H, W], got {got}")
        if images.dtype not in _WIRE_DTYPES:
            raise ValueError(f"{self.source}: images must be float32 or float64, got {images.dtype}")
        if len(prompts) != len(images):
            raise ValueError(f"{self.source}: got {len(images)} images but {len(prompts)} prompts")
        loop = asyncio.get_running_loop()
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        request = _Request(kind, images, list(prompts), loop.create_future(), loop.time())
        self._stats.calls += 1
        self._pending.append(request)
        self._wakeup.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._serve_batches())
        return await request.future

    def _queued_images(self, key: tuple) -> int:
        return sum(len(r.prompts) for r in self._pending if r.key == key)

    async def _serve_batches(self) -> None:
        """Runs while requests are queued: wait for company, take one batch, compute, answer."""
        loop = asyncio.get_running_loop()
        pending = self._pending
        while pending:
            first = pending[0]
            # 1. Wait until max_batch images of this kind are queued or the oldest request has waited
            #    max_wait_s. Requests that arrived during the previous forward are usually past it.
            while self._queued_images(first.key) < self.max_batch:
                remaining = first.arrived + self.max_wait_s - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                except TimeoutError:
                    break
            # 2. Take requests with the oldest one's key, oldest first, up to max_batch images (a single
            #    request larger than max_batch runs alone rather than being split).
            batch, size = [], 0
            for request in list(pending):
                n = len(request.prompts)
                if request.key == first.key and (not batch or size + n <= self.max_batch):
                    batch.append(request)
                    size += n
                    pending.remove(request)
            await self._run_batch(batch, loop)

    async def _run_batch(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        kind = batch[0].kind
        prompts = [p for r in batch for p in r.prompts]
        t0 = time.perf_counter()
        try:
            images = np.concatenate([r.images for r in batch])  # [N, 3, H, W]; a writable copy
            rewards, grads = await loop.run_in_executor(self._executor, self._forward, kind, images, prompts)
        except Exception as err:  # the batch failed as a whole: every caller hears why, none hangs
            self._stats.errors += len(batch)
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        stats = self._stats
        stats.compute_s += time.perf_counter() - t0
        stats.batches += 1
        stats.images += len(prompts)
        stats.largest_batch = max(stats.largest_batch, len(prompts))
        # 3. Split. A non-finite value fails only the request it belongs to (rewards are per image).
        offset = 0
        for r in batch:
            n = len(r.prompts)
            r_rewards = rewards[offset : offset + n]
            r_grads = None if grads is None else grads[offset : offset + n]
            offset += n
            try:
                check_rewards(torch.from_numpy(r_rewards), n, source=self.source)
                if r_grads is not None and not np.isfinite(r_grads).all():
                    bad = np.flatnonzero(~np.isfinite(r_grads).reshape(n, -1).all(axis=1)).tolist()
                    raise RewardError(f"{self.source} gave a non-finite gradient for batch index {bad}")
            except RewardError as err:
                stats.errors += 1
                if not r.future.done():
                    r.future.set_exception(err)
                continue
            if not r.future.done():
                r.future.set_result((r_rewards, r_grads))

    def _forward(self, kind: str, images: np.ndarray, prompts: list[str]):
        """One forward (+ one backward of rewards.sum()) over the whole batch; runs in the worker thread."""
        pixels = torch.from_numpy(images).to(self.device)  # [N, 3, H, W]
        if kind == "score":
            with torch.no_grad():
                rewards = self.reward(pixels, prompts)  # [N]
            self._check_shape(rewards, len(prompts))
            return rewards.detach().to("cpu", pixels.dtype).numpy(), None
        with torch.enable_grad():
            pixels.requires_grad_(True)
            rewards = self.reward(pixels, prompts)  # [N]
            self._check_shape(rewards, len(prompts))
            # r[b] depends on image b only, so d sum(r) / d image[b] = d r[b] / d image[b].
            grads = None
            if rewards.requires_grad:
                (grads,) = torch.autograd.grad(rewards.sum(), pixels, allow_unused=True)
        if grads is None:  # a reward that ignores the pixels
            grads = torch.zeros_like(pixels)
        return rewards.detach().to("cpu", pixels.dtype).numpy(), grads.to("cpu").numpy()

    def _check_shape(self, rewards: Tensor, batch_size: int) -> None:
        """Shape errors fail the whole batch; finiteness is checked per request after the split."""
        if not isinstance(rewards, Tensor) or rewards.shape != (batch_size,):
            check_rewards(rewards, batch_size, source=self.source)


# ----------------------------------------------------------------------------- launching


def launch_reward_actor(
    actor_name: str,
    reward_name: str,
    options: dict[str, Any] | None = None,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    runtime_env: dict[str, Any] | None = None,
    max_restarts: int = 3,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    setup_modules: Sequence[str] = (),
    max_concurrency: int = 64,
    ready_timeout_s: float = 300.0,
) -> ActorHandle:
    """Start (or find) the named RewardServer and wait until it has built its reward.

    num_gpus may be fractional (0.25: four reward actors share a GPU). max_restarts: Ray restarts a
    crashed actor this many times (its reward is rebuilt; ActorReward retries meanwhile).
    detached=False: the actor lives while the caller holds the returned handle (keep it for the whole
    run); detached=True: it outlives the caller until ray.kill. setup_modules: modules the actor imports
    before build_reward (rewards registered outside leapalign.rewards). runtime_env: the actor's own
    environment, e.g. {"pip": [...]} for a scorer whose dependencies the trainers must not get.
    """
    if not ray.is_initialized():
        raise RewardActorError(
            "Ray is not initialized: call ray.init(address='auto') (a running cluster) or "
            "ray.init(address='local', ...) before launching a reward actor"
        )
    options = dict(options or {})
    actor_cls = ray.remote(RewardServer)
    actor = actor_cls.options(
        name=actor_name,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached" if detached else None,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        runtime_env=runtime_env,
        max_restarts=max_restarts,
        max_concurrency=max_concurrency,
    ).remote(reward_name, options, max_batch, max_wait_ms, tuple(setup_modules))
    try:
        served = ray.get(actor.describe.remote(), timeout=ready_timeout_s)
    except GetTimeoutError:
        raise RewardActorError(
            f"reward actor {actor_name!r} (namespace {namespace!r}) was not ready after {ready_timeout_s:.0f} s: "
            f"is there room for num_cpus={num_cpus}, num_gpus={num_gpus}? (`ray status` shows free resources)"
        ) from None
    except RayActorError as err:  # its __init__ raised; the last line of Ray's report is the reason
        reason = str(err).strip().splitlines()[-1]
        raise RewardActorError(
            f"reward actor {actor_name!r} failed to build reward {reward_name!r} with options {options!r}: "
            f"{reason}"
        ) from None
    if served["reward"] != reward_name or served["options"] != options:
        raise RewardActorError(
            f"an actor named {actor_name!r} in namespace {namespace!r} already serves reward "
            f"{served['reward']!r} with options {served['options']!r}, not {reward_name!r} with {options!r}; "
            f"pick another actor name or stop it with ray.kill(ray.get_actor({actor_name!r}, "
            f"namespace={namespace!r}))"
        )
    return actor


# ----------------------------------------------------------------------------- the worker's RewardFn


class _RemoteReward(torch.autograd.Function):
    """rewards [B] whose backward is the exact chain rule through per-image reward gradients."""

    @staticmethod
    def forward(ctx, images: Tensor, rewards: Tensor, grad_images: Tensor) -> Tensor:
        ctx.save_for_backward(grad_images)
        ctx.images_dtype = images.dtype
        return rewards.clone()

    @staticmethod
    def backward(ctx, grad_rewards: Tensor):
        (grad_images,) = ctx.saved_tensors  # [B, 3, H, W] = d r[b] / d image[b]
        grad = grad_rewards.to(grad_images.dtype)[:, None, None, None] * grad_images
        return grad.to(ctx.images_dtype), None, None


class ActorReward:
    """A RewardFn backed by a named RewardServer: values, and gradients when the images need them.

    Calls with images that require grad (and grad mode on) use score_and_grad; others, and `score`,
    fetch values only (GRPO). A crashed actor is retried with exponential backoff while Ray restarts it
    (max_retries tries, at most max_wait_s in all); a reward error (NaN, wrong shape) is raised at once.
    """

    def __init__(
        self,
        actor_name: str,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        expect_reward: str | None = None,
        expect_options: dict[str, Any] | None = None,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_wait_s: float = 120.0,
        call_timeout_s: float = 600.0,
    ):
        self.actor_name, self.namespace = actor_name, namespace
        self.expect_reward, self.expect_options = expect_reward, expect_options
        self.max_retries, self.backoff_s, self.max_wait_s = max_retries, backoff_s, max_wait_s
        self.call_timeout_s = call_timeout_s
        self.retries = 0  # failed tries so far (a metric: a restarting actor shows up here)
        self._actor: ActorHandle | None = None
        self._lock = threading.Lock()

    # The handle and the lock are process-local: a pickled ActorReward looks the actor up again.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_actor", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _actor=None, _lock=threading.Lock())

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B] (with a graph to images if they need one)."""
        if not (torch.is_grad_enabled() and images.requires_grad):
            return self.score(images, prompts)
        wire = self._to_wire(images, prompts)
        rewards, grads = self._call("score_and_grad", wire, list(prompts))
        if grads is None or grads.shape != wire.shape:
            raise RewardError(
                f"reward actor {self.actor_name!r} returned a gradient of shape "
                f"{None if grads is None else grads.shape}, expected {wire.shape}"
            )
        rewards_t = _as_tensor(rewards).to(images.device, images.dtype)  # [B]
        grads_t = _as_tensor(grads).to(images.device)  # [B, 3, H, W]
        return _RemoteReward.apply(images, rewards_t, grads_t)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Values only, no graph: images [B, 3, H, W] -> rewards [B] (GRPO, evaluation)."""
        rewards, _ = self._call("score", self._to_wire(images, prompts), list(prompts))
        return _as_tensor(rewards).to(images.device, images.dtype)

    def stats(self) -> dict[str, Any]:
        """The actor's counters (calls, batches, images, pid, ...)."""
        return ray.get(self._get_actor().stats.remote(), timeout=self.call_timeout_s)

    # -- plumbing ------------------------------------------------------------------------------

    def _to_wire(self, images: Tensor, prompts: Sequence[str]) -> np.ndarray:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, 3, H, W], got {got}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; they must pair up")
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        return images.detach().to("cpu", dtype).contiguous().numpy()  # CPU-GPU sync here on CUDA

    def _get_actor(self) -> ActorHandle:
        with self._lock:
            if self._actor is None:
                self._actor = self._lookup()
            return self._actor

    def _lookup(self) -> ActorHandle:
        if not ray.is_initialized():
            try:
                ray.init(address="auto", namespace=self.namespace)
            except ConnectionError as err:
                raise RewardActorError(
                    f"reward.actor={self.actor_name!r} needs a running Ray cluster ({err}); start one with "
                    f"`ray start --head`, then the reward actor: {SERVE_HINT}"
                ) from None
        try:
            actor = ray.get_actor(self.actor_name, namespace=self.namespace)
        except ValueError:
            raise RewardActorError(
                f"no reward actor named {self.actor_name!r} in namespace {self.namespace!r}; {SERVE_HINT}"
            ) from None
        if self.expect_reward is not None:
            # The run's config (logged to MLflow) must say what the actor really serves.
            served = ray.get(actor.describe.remote(), timeout=self.call_timeout_s)
            options_differ = self.expect_options and served["options"] != self.expect_options
            if served["reward"] != self.expect_reward or options_differ:
                raise RewardActorError(
                    f"reward actor {self.actor_name!r} serves {served['reward']!r} with options "
                    f"{served['options']!r}, but the config says reward.name={self.expect_reward!r}, "
                    f"reward.options={self.expect_options!r}; make them agree"
                )
        return actor

    def _call(self, method: str, images: np.ndarray, prompts: list[str]):
        self._get_actor()  # connects to the cluster if needed, fails fast on a wrong name
        images_ref = ray.put(images)  # once: retries resend the reference, not the pixels
        deadline = time.monotonic() + self.max_wait_s
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            actor = self._get_actor()
            try:
                result = ray.get(
                    getattr(actor, method).remote(images_ref, prompts), timeout=self.call_timeout_s
                )
            except RayTaskError as err:  # the reward itself raised inside the actor: retrying won't help
                # The actor's messages name the reward and the actor; drop Ray's remote traceback.
                if isinstance(err.cause, RewardError):
                    raise RewardError(str(err.cause)) from None
                if isinstance(err.cause, ValueError):
                    raise ValueError(str(err.cause)) from None
                raise
            except GetTimeoutError:
                raise RewardActorError(
                    f"reward actor {self.actor_name!r} did not answer {method} within {self.call_timeout_s:.0f} s"
                ) from None
            except (RayActorError, ActorUnavailableError) as err:  # died or restarting (max_restarts)
                last_error = err
                self.retries += 1
                with self._lock:
                    self._actor = None  # look it up again: it may have been relaunched under the name
                wait = min(self.backoff_s * 2**attempt, deadline - time.monotonic())
                if wait <= 0 or attempt == self.max_retries:
                    break
                time.sleep(wait)
                continue
            return self._check_result(method, result, len(prompts))
        raise RewardActorError(
            f"reward actor {self.actor_name!r} (namespace {self.namespace!r}) unreachable after "
            f"{self.retries} failed tries within {self.max_wait_s:.0f} s; it restarts at most max_restarts "
            f"times, so it may be dead for good: {SERVE_HINT}. Last error: {type(last_error).__name__}: "
            f"{str(last_error).splitlines()[0] if last_error else ''}"
        )

    def _check_result(self, method: str, result: Any, batch_size: int):
        rewards, grads = (result, None) if method == "score" else result
        check_rewards(_as_tensor(np.asarray(rewards)), batch_size, source=f"reward actor {self.actor_name!r}")
        return rewards, grads


def _as_tensor(array: np.ndarray) -> Tensor:
    """A tensor sharing the array's memory. Arrays from ray.get are read-only views of the object store;
    the tensors made here are only read (never updated in place), so sharing beats a copy (25 MB at
    512 px, batch 8)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def make_reward_fn(reward_cfg: RewardConfig) -> RewardFn:
    """The run's RewardFn: the named actor when reward.actor is set, else the reward built in process."""
    if reward_cfg.actor:
        return ActorReward(
            reward_cfg.actor,
            reward_cfg.namespace,
            expect_reward=reward_cfg.name,
            expect_options=dict(reward_cfg.options) or None,
        )
    return build_reward(reward_cfg.name, reward_cfg.options)
