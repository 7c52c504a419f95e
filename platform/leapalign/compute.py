"""Compute accounting: what one update costs, counted whole, and wall time per phase.

Methods are compared at equal compute, so compute is measured, not assumed. `ComputeMeter` counts every
call of the update's three models, in images (a call on a batch of B counts B), and every backward through
one: the transformer (through `FluxPolicy.velocity_fn`; a hook on the call's output fires exactly when
autograd reaches it), the VAE decoder (`FluxPolicy.decode`, the same hook) and the reward model (counted
where the methods score images; its backward runs inside the reward call, `rewards_and_gradients`).

Two units, logged side by side:
    compute/nfe     transformer forward-equivalents: forwards + 2 x backwards (+1 x backwards when gradient
                    checkpointing recomputes the forward), as before; the transformer alone
    compute/flops   FLOPs of everything: each model's calls times its FLOPs per image, measured once per run
                    with torch.utils.flop_counter on the run's own shapes (`UnitCosts.measure`): matmuls,
                    convolutions and attention, forward and backward, the checkpointing recompute included

The direct methods run the decoder and the reward forward and backward on every image (DRaFT-LV three
times); GRPO runs them forward only, once per image. `trace=True` also records, per transformer call, the
sigma, whether it recorded a graph and the gradient norm that reached its output: what the tests use to
check which steps a method touches.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

PARTS = ("transformer", "decoder", "reward")


@dataclass
class CallRecord:
    sigma: float
    batch: int
    graph: bool  # the call's output carries a graph (a backward may reach it)
    grad_norm: float | None = None  # norm of d loss / d output, once the backward reached it


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs per image of each model's forward and backward, measured on the run's shapes."""

    transformer_forward: float
    transformer_backward: float  # gradients of the trained weights and the input (+ checkpointing recompute)
    decoder_forward: float
    decoder_backward: float  # the pixels' gradient with respect to the latents (the VAE is frozen)
    reward_forward: float
    reward_backward: float  # the reward's gradient with respect to the pixels (the reward is frozen)

    def as_metrics(self) -> dict[str, float]:
        return {f"cost/{k}_gflops": v / 1e9 for k, v in asdict(self).items()}


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of everything `fn` runs (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


_CPU_ATTENTION_REGISTERED = False


def register_cpu_attention_flops() -> None:
    """torch's flop counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches to
    here; it does the same arithmetic, so it gets the same formulas."""
    global _CPU_ATTENTION_REGISTERED
    if _CPU_ATTENTION_REGISTERED:
        return
    from torch.utils.flop_counter import (
        register_flop_formula,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    aten = torch.ops.aten

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(
        grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
    ) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _CPU_ATTENTION_REGISTERED = True


def backward_nfe(checkpointing: bool) -> int:
    """A backward through a transformer call in forward-equivalents: 2, plus 1 when gradient checkpointing
    recomputes the forward (as the literature counts). The methods' cost formulas use it too."""
    return 3 if checkpointing else 2


@dataclass
class ComputeMeter:
    checkpointing: bool = False  # backward recomputes the forward (gradient checkpointing)
    trace: bool = False  # keep a CallRecord per transformer call (tests)
    forwards: int = 0  # images through the transformer, all calls
    backwards: int = 0  # images whose transformer output gradient was computed
    decodes: int = 0  # images through the VAE decoder
    decode_backwards: int = 0
    rewards: int = 0  # images scored by the reward model
    reward_backwards: int = 0  # images whose reward gradient (d r / d pixels) was computed
    records: list[CallRecord] = field(default_factory=list)

    def reset(self) -> None:
        self.forwards = self.backwards = self.decodes = self.decode_backwards = 0
        self.rewards = self.reward_backwards = 0
        self.records = []

    @property
    def nfe(self) -> int:
        """Transformer image forward-equivalents since the last reset."""
        return self.forwards + backward_nfe(self.checkpointing) * self.backwards

    def flops(self, costs: UnitCosts) -> float:
        """FLOPs of everything counted since the last reset."""
        return (
            self.forwards * costs.transformer_forward
            + self.backwards * costs.transformer_backward
            + self.decodes * costs.decoder_forward
            + self.decode_backwards * costs.decoder_backward
            + self.rewards * costs.reward_forward
            + self.reward_backwards * costs.reward_backward
        )

    def count(self, output: Tensor, sigma: Tensor) -> Tensor:
        """Count one transformer call (batch = output.shape[0]); hook its backward when it has a graph."""
        batch = output.shape[0]
        self.forwards += batch
        record = None
        if self.trace:
            record = CallRecord(float(sigma), batch, output.requires_grad)
            self.records.append(record)
        if output.requires_grad:

            def on_backward(grad: Tensor) -> None:
                self.backwards += batch
                if record is not None:
                    record.grad_norm = float(grad.detach().norm())

            output.register_hook(on_backward)
        return output

    def count_decode(self, images: Tensor) -> Tensor:
        """Count one decoder call; its backward when autograd reaches the images."""
        batch = images.shape[0]
        self.decodes += batch
        if images.requires_grad:

            def on_backward(grad: Tensor) -> None:
                self.decode_backwards += batch

            images.register_hook(on_backward)
        return images

    def count_reward(self, batch: int, backward: bool) -> None:
        """Count one reward call on `batch` images; `backward`: it also computed d r / d pixels."""
        self.rewards += batch
        if backward:
            self.reward_backwards += batch


class PhaseTimer:
    """Wall seconds per named phase; synchronises CUDA at each boundary so GPU work is not misattributed."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()  # CPU-GPU sync: the price of honest per-phase times on GPU
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": value for name, value in self.seconds.items()}

    def reset(self) -> None:
        self.seconds.clear()
