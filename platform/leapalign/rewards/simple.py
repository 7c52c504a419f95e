"""Small differentiable in-process rewards: for tests, demos and sanity checks of the math."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NAMED_COLORS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}  # fmt: skip


class ColorMatch:
    """r = 1 - mean |image - colour|: a fixed colour, or the first colour word of each prompt."""

    def __init__(self, color: str | None = None, from_prompt: bool = True, default: str = "red"):
        for name in (color, default):
            if name is not None and name not in NAMED_COLORS:
                raise ValueError(f"unknown colour {name!r}: choose one of {', '.join(NAMED_COLORS)}")
        self.color, self.from_prompt, self.default = color, from_prompt, default

    def target(self, prompt: str) -> tuple[float, float, float]:
        if self.color is not None or not self.from_prompt:
            return NAMED_COLORS[self.color or self.default]
        for word in prompt.lower().replace(",", " ").split():
            if word in NAMED_COLORS:
                return NAMED_COLORS[word]
        return NAMED_COLORS[self.default]

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        targets = torch.tensor([self.target(p) for p in prompts], dtype=images.dtype, device=images.device)
        return 1.0 - (images - targets[:, :, None, None]).abs().mean(dim=(1, 2, 3))  # [B]


class Brightness:
    """r = mean luminance (ITU-R BT.601 weights); ignores the prompt."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * weights[None, :, None, None]).sum(dim=1).mean(dim=(1, 2))
