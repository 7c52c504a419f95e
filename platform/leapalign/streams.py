"""Independent random streams: every draw a run makes comes from a stream named for its job and its seed.

A stream is seeded from (seed, stream name, indices...) through numpy's SeedSequence, which hashes its
entropy and spawn key together: stream "noise" of seed 3 shares no state with stream "steps" of seed 3 or
with stream "noise" of seed 4 (consecutive integer seeds, as `manual_seed(s)` and `manual_seed(s + 1)` would
give, are independent too). Changing one choice (say the leap-pair law) keeps the other streams' draws.

    init      the global torch RNG at start-up (the LoRA adapter's initial weights)
    prompts   the order of the training prompts
    noise     initial latents, and any re-noising (DRaFT-LV)
    steps     which steps a method trains (leap pairs, ReFL's t, DRTune's offsets, GRPO's plans and shuffles)
    sde       GRPO's SDE noise; DiffusionNFT's and AWM's forward-process noise eps
    grid      the sample grids' noise (before / after / every train.sample_every)
    eval      held-out evaluation noise: seeded by EVAL_SEED (never by train.seed: every run and method sees
              the same images' noise, so comparisons are paired) and by (replicate, prompt index), so an image
              does not depend on the batch it was sampled in
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

STREAMS = ("init", "prompts", "noise", "steps", "sde", "grid", "eval")
EVAL_SEED = 20_000  # the evaluation stream's seed: the same for every run


def stream_seed(seed: int, name: str, *indices: int) -> int:
    """A 63-bit seed for torch.Generator.manual_seed, from (seed, stream name, indices)."""
    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r}: use one of {', '.join(STREAMS)}")
    if seed < 0 or any(i < 0 for i in indices):
        raise ValueError(f"seeds and stream indices are non-negative integers, got {seed}, {indices}")
    key = (zlib.crc32(name.encode()), *indices)  # a stable number per stream name
    state = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1  # torch seeds are signed 64-bit


def stream(seed: int, name: str, *indices: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` (CPU by default: the same draws on every device) for the stream."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, name, *indices))


class PromptOrder:
    """The order a run draws its training prompts in (the "prompts" stream): shuffled passes over the
    list. Its state is part of a checkpoint.

    Global: every rank draws the global batch (world_size x batch_size prompts, the same on every rank)
    and keeps its slice, so the order does not depend on the number of workers.
    """

    def __init__(self, prompts: list[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.prompts = prompts
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = stream(seed, "prompts")
        self.order: list[int] = []

    def next_batch(self) -> list[str]:
        batch = []
        for _ in range(self.batch_size * self.world_size):
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            batch.append(self.prompts[self.order.pop()])
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
