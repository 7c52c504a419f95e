"""What gets trained: the Flux transformer made trainable (a LoRA adapter or every weight, fp32 master
weights) and the EMA of the trained weights.

    setup_policy       load Flux (diffusers), make the transformer trainable, compile the no-grad calls
    apply_finetune     LoRA via peft or full fine-tuning (the benchmarks call it on their own models)
    EMA                exponential moving average of the trained weights; `swapped()` evaluates with it
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from leapalign.config import Config, FinetuneConfig, compile_enabled
from leapalign.models.flux import FluxPolicy


def setup_policy(cfg: Config, device: str | None = None) -> FluxPolicy:
    """Load the Flux folder and make the transformer trainable (LoRA adapter or every weight)."""
    device_obj = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mixed = cfg.finetune.mixed_precision
    autocast = device_obj.type == "cuda" if mixed == "auto" else mixed == "bf16"
    policy = FluxPolicy.from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=device_obj,
        revision=cfg.model.revision,
        autocast=autocast,
        text_cache=cfg.model.text_cache,
    )
    policy.check_resolution(cfg.sampler.height, cfg.sampler.width)
    apply_finetune(policy.transformer, cfg.finetune)
    if compile_enabled(cfg.sampler.compile, device_obj.type, cfg.train.cpu_isa):
        policy.compile_no_grad_calls()
    return policy


def apply_finetune(transformer: torch.nn.Module, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    """LoRA via peft or full fine-tuning; trainable weights kept in fp32 (master weights)."""
    transformer.requires_grad_(False)
    if cfg.mode == "lora":
        from peft import LoraConfig

        transformer.add_adapter(
            LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules)
            )
        )
    else:
        transformer.requires_grad_(True)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = trainable_parameters(transformer)
    if not params:
        raise ValueError(
            f"finetune: nothing to train; no module matches lora_target_modules={cfg.lora_target_modules}"
        )
    for p in params:
        p.data = p.data.float()
    transformer.train()
    return params


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class EMA:
    """Exponential moving average of the trained weights (fp32); evaluate with `swapped()`."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """shadow <- d shadow + (1 - d) weights, d = `decay` (a scheduled one) or the fixed self.decay."""
        decay = self.decay if decay is None else decay
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - decay)

    @contextmanager
    def swapped(self):
        """Inside: the model holds the EMA weights; afterwards the trained ones again."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params, strict=True)]
