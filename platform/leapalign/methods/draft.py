"""Full backpropagation through the sampler (DRaFT / AlignProp style): the cost reference.

Every Euler step keeps its graph, so activation memory grows linearly with the number of steps
(gradient checkpointing inside the transformer trades that memory for recomputation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leapalign.sampling import VelocityFn, euler_step


def full_backprop_rollout(velocity_fn: VelocityFn, latents: Tensor, sigmas: Tensor) -> Tensor:
    """x_0 [B, S, C] with a graph through all N model calls."""
    x = latents.detach()
    with torch.enable_grad():
        for i in range(len(sigmas) - 1):
            x = euler_step(x, velocity_fn(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    return x
