"""Compute accounting: transformer forward-equivalents (NFE) per update, and wall time per phase.

Methods are compared at equal compute, so compute is measured, not assumed. `ComputeMeter` counts
every transformer call made through `FluxPolicy.velocity_fn`, in images (a call on a batch of B
counts B), and every backward through such a call (a hook on the call's output fires exactly when
autograd reaches it). One update then costs

    nfe = forwards + 2 * backwards (+ 1 * backwards when gradient checkpointing recomputes the forward)

image forward-equivalents. The VAE and the reward model are not counted: they are the same for
every method per image, and small beside the transformer. `trace=True` also records, per call, the
sigma, whether it recorded a graph and the gradient norm that reached its output: what the tests use
to check which steps a method touches.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class CallRecord:
    sigma: float
    batch: int
    graph: bool  # the call's output carries a graph (a backward may reach it)
    grad_norm: float | None = None  # norm of d loss / d output, once the backward reached it


@dataclass
class ComputeMeter:
    checkpointing: bool = False  # backward recomputes the forward (gradient checkpointing)
    trace: bool = False  # keep a CallRecord per call (tests)
    forwards: int = 0  # images through the transformer, all calls
    backwards: int = 0  # images whose output gradient was computed
    records: list[CallRecord] = field(default_factory=list)

    def reset(self) -> None:
        self.forwards = self.backwards = 0
        self.records = []

    @property
    def nfe(self) -> int:
        """Image forward-equivalents since the last reset."""
        return self.forwards + (3 if self.checkpointing else 2) * self.backwards

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
