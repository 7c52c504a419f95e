"""Alignment methods as pure functions (no Ray), and the method table.

`METHODS` maps every `method.name` to its row: the recipe that runs it (leapalign.recipes), its loss (the
direct-gradient methods), its cost formula (each method's own file) and its config section
(`cfg.method.<name>`, leapalign.config). The direct-gradient methods share one signature,
`(policy, prompts, reward_fn, cfg, sigmas, rng) -> (loss, metrics)`, run by leapalign.recipes.direct. GRPO
has its own recipe built on methods/grpo.py; DiffusionNFT and AWM share one (leapalign.recipes.forward)
built on methods/nft.py, methods/awm.py and methods/forward_process.py.

config.py cannot import this table (its rows name config sections: that would be an import circle), so
the method names live once as MethodConfig's sections, and the table is checked against them on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leapalign.config import (
    AWMConfig,
    Config,
    DraftLVConfig,
    DRTuneConfig,
    FullBackpropConfig,
    GRPOConfig,
    LeapAlignConfig,
    MethodConfig,
    NFTConfig,
    ReFLConfig,
    method_names,
)
from leapalign.methods import awm, draft_lv, drtune, full_backprop, grpo, leapalign, nft, refl


@dataclass(frozen=True)
class Method:
    """One row of the method table."""

    recipe: str  # the loop that runs it: direct | grpo | forward (leapalign.recipes.<recipe>)
    cost: Callable[[Config], tuple[int, int]]  # (fewest, most) forward-equivalents per update on one worker
    section: type  # its config section, cfg.method.<name>
    loss: Callable[..., Any] | None = None  # direct methods: (policy, prompts, reward_fn, cfg, sigmas, rng)
    weight_copy: str | None = None  # a copy of the trained weights it keeps (TrainingRun.policy_copy)


METHODS: dict[str, Method] = {
    "leapalign": Method("direct", leapalign.update_nfe_range, LeapAlignConfig, leapalign.leapalign_loss),
    "refl": Method("direct", refl.update_nfe_range, ReFLConfig, refl.refl_loss),
    "draft_lv": Method("direct", draft_lv.update_nfe_range, DraftLVConfig, draft_lv.draft_lv_loss),
    "drtune": Method("direct", drtune.update_nfe_range, DRTuneConfig, drtune.drtune_loss),
    "full_backprop": Method(
        "direct", full_backprop.update_nfe_range, FullBackpropConfig, full_backprop.full_backprop_loss
    ),
    "grpo": Method("grpo", grpo.update_nfe_range, GRPOConfig),
    "nft": Method("forward", nft.update_nfe_range, NFTConfig, weight_copy="the old policy"),
    "awm": Method("forward", awm.update_nfe_range, AWMConfig, weight_copy="the EMA policy (KL target)"),
}
_SECTIONS = {name: type(getattr(MethodConfig(), name)) for name in method_names()}
if {name: method.section for name, method in METHODS.items()} != _SECTIONS:
    raise ImportError(f"the method table {list(METHODS)} and MethodConfig's sections {_SECTIONS} differ")

DIRECT_METHODS = {name: method.loss for name, method in METHODS.items() if method.loss is not None}


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """(fewest, most) image forward-equivalents one update costs on one worker, before running it.

    A backward through a transformer call counts 2, plus 1 when gradient checkpointing recomputes the
    forward; random step draws (ReFL's and DRTune's t) make the cost a range. `ComputeMeter` measures
    the real number during training; the tests check that it always lies in this range.
    """
    return METHODS[cfg.method.name].cost(cfg)
