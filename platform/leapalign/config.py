"""Typed run configuration: defaults <- YAML file <- `key=value` overrides.

Every field has a default and a one-line comment (unit, valid range). `__post_init__` rejects bad
values with a message that says how to fix them. Unknown keys are errors. The dotted keys used on
the command line (`method.leapalign.alpha=0.3`) are the same ones Ray Tune search spaces and MLflow params use.

Why one file over 500 lines: every key of a run, its default and its comment in one place (what
`show-config` prints and a reader greps), and the checks across sections (`Config.__post_init__`) beside
the sections they read.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or file is wrong; the message says what to change."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    path: str = "assets/mini-flux"  # diffusers Flux folder or hub id; relative paths resolve against the package, then the cwd
    dtype: str = "auto"  # weights dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float64
    max_sequence_length: int = 64  # T5 tokens per prompt (Flux.1-dev uses 512); 1..512
    revision: str | None = None  # hub revision; ignored for local folders
    text_cache: str | None = None  # folder from `leapalign embed`; no text encoders loaded. None = encode

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path is empty: give a diffusers Flux folder or a hub id")
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float64"),
            f"model.dtype={self.dtype!r}: use auto, float32, bfloat16 or float64",
        )
        _check(
            1 <= self.max_sequence_length <= 512,
            f"model.max_sequence_length={self.max_sequence_length}: T5 in Flux takes 1..512 tokens",
        )


def compile_enabled(setting: bool | str, device_type: str, cpu_isa: str = "native") -> bool:
    """sampler.compile resolved for a device: auto compiles on CUDA, where the compile (tens of seconds)
    is soon repaid; on CPU a cold compile costs about as much as it saves in a short run (bench/README.md).

    On CPU with train.cpu_isa=avx2 it is an error: torch 2.13's inductor, asked for AVX2 code by
    ATEN_CPU_CAPABILITY=avx2, returned NaN images on the tiny Flux (tests/unit/test_compile.py)."""
    enabled = setting is True or (setting == "auto" and device_type == "cuda")
    if enabled and device_type == "cpu" and cpu_isa != "native":
        raise ConfigError(
            f"sampler.compile=true on CPU needs train.cpu_isa=native (got {cpu_isa}): torch's inductor gave NaN "
            f"with AVX2 kernels; compile with native kernels, or keep the portable numbers without compile"
        )
    return enabled


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 25  # Euler ODE steps of the training rollout (paper: 25); >= 2
    eval_num_steps: int = 50  # steps for evaluation samples (paper: 50); >= 1
    height: int = 720  # pixels; a multiple of 16
    width: int = 720  # pixels; a multiple of 16
    guidance_scale: float = 3.5  # Flux guidance embedding (distilled CFG); >= 0
    # torch.compile the no-grad forwards (rollouts, eval): auto (CUDA) | true | false
    compile: bool | str = "auto"

    def __post_init__(self) -> None:
        _check(
            isinstance(self.compile, bool) or self.compile == "auto",
            f"sampler.compile={self.compile!r}: use auto (on with CUDA, off on CPU), true or false",
        )
        _check(
            self.num_steps >= 2,
            f"sampler.num_steps={self.num_steps}: LeapAlign needs two steps k < j, use >= 2",
        )
        _check(self.eval_num_steps >= 1, f"sampler.eval_num_steps={self.eval_num_steps}: use >= 1")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(
                value > 0 and value % 16 == 0,
                f"sampler.{name}={value} must be a positive multiple of 16: the VAE downsamples 8x and "
                f"latents are packed 2x2 (try {max(16, round(value / 16) * 16)})",
            )
        _check(self.guidance_scale >= 0, f"sampler.guidance_scale={self.guidance_scale}: use a value >= 0")


LEAP_DISTRIBUTIONS = ("uniform", "sigma_range", "fixed_gap", "beta")


@dataclass(frozen=True)
class LeapConfig:
    distribution: str = "uniform"  # leap pair (k < j) law: uniform | sigma_range | fixed_gap | beta
    sigma_min: float = 0.0  # sigma_range: both steps have sigma in [sigma_min, sigma_max]; 0..1
    sigma_max: float = 1.0  # sigma_range: upper end; sigma_min < sigma_max <= 1
    gap: int = 1  # fixed_gap: j - k; 1..num_steps-1
    beta_a: float = 1.0  # beta: per-step mass ~ Beta(a, b) density over sigma; > 0
    beta_b: float = 1.0  # beta: second shape parameter; > 0

    def __post_init__(self) -> None:
        _check(
            self.distribution in LEAP_DISTRIBUTIONS,
            f"leap.distribution={self.distribution!r}: choose one of {', '.join(LEAP_DISTRIBUTIONS)}",
        )
        _check(
            0.0 <= self.sigma_min < self.sigma_max <= 1.0,
            f"leap.sigma_min={self.sigma_min}, leap.sigma_max={self.sigma_max}: need 0 <= sigma_min < sigma_max <= 1",
        )
        _check(
            self.gap >= 1, f"leap.gap={self.gap}: the second leap step must come after the first, use >= 1"
        )
        _check(
            self.beta_a > 0 and self.beta_b > 0,
            f"leap.beta_a={self.beta_a}, leap.beta_b={self.beta_b}: Beta shape parameters must be > 0",
        )


# The choices of the method sections (leapalign.methods checks its arguments against the same lists).
WEIGHTINGS = ("both", "d_j", "d_0", "none")
GRPO_VARIANTS = ("flow_grpo", "dance_grpo", "mixgrpo", "fast")
SDE_KINDS = ("flow_grpo", "dance_grpo", "cps")
STD_SCOPES = ("group", "batch")


def _check_hinge(section: str, hinge: float) -> None:
    _check(math.isfinite(hinge), f"method.{section}.hinge={hinge}: must be a finite number")


@dataclass(frozen=True)
class LeapAlignConfig:
    # gradient discount on the model input at step j; 0..1 (paper: 0.3 HPSv2.1, 0.1 PickScore)
    alpha: float = 0.3
    tau: float = 0.1  # floor of each trajectory distance in the similarity weight; > 0 (w <= 1/(2 tau))
    hinge: float = 0.55  # lambda: loss = w * max(0, lambda - reward); reward units
    weighting: str = "both"  # similarity weight from: both | d_j | d_0 | none (ablation)
    # reward on the real decoded x_0 (final) or on the leap's x_hat_0 (leap; ablation)
    reward_on: str = "final"
    pairs_per_rollout: int = 1  # leap pairs drawn per rollout (beyond the paper); >= 1; cost ~N + 6P forwards

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.alpha <= 1.0,
            f"method.leapalign.alpha={self.alpha} is outside [0, 1]: 1 keeps the full nested gradient, 0 drops it",
        )
        _check(self.tau > 0, f"method.leapalign.tau={self.tau}: the distance floor must be > 0 (paper: 0.1)")
        _check_hinge("leapalign", self.hinge)
        _check(
            self.weighting in WEIGHTINGS,
            f"method.leapalign.weighting={self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}",
        )
        _check(
            self.reward_on in ("final", "leap"),
            f"method.leapalign.reward_on={self.reward_on!r}: choose final or leap",
        )
        _check(
            self.pairs_per_rollout >= 1,
            f"method.leapalign.pairs_per_rollout={self.pairs_per_rollout}: use >= 1",
        )


@dataclass(frozen=True)
class ReFLConfig:
    last_steps: int = 11  # m: the graph step t is uniform among the last m steps (paper: 11 of 25); >= 1
    hinge: float = 0.55  # loss = max(0, lambda - reward(x_hat_0))

    def __post_init__(self) -> None:
        _check(self.last_steps >= 1, f"method.refl.last_steps={self.last_steps}: use >= 1")
        _check_hinge("refl", self.hinge)


@dataclass(frozen=True)
class DraftLVConfig:
    extra_samples: int = 2  # n: re-noise sg(x_0) to the last sigma n times and take the last step again; >= 0
    hinge: float = 0.55  # loss = sum over the n + 1 last-step images of max(0, lambda - reward)

    def __post_init__(self) -> None:
        _check(self.extra_samples >= 0, f"method.draft_lv.extra_samples={self.extra_samples}: use >= 0")
        _check_hinge("draft_lv", self.hinge)


@dataclass(frozen=True)
class DRTuneConfig:
    grad_steps: int = 2  # K: evenly spaced model calls (random offset) that keep velocity gradients; >= 1
    last_steps: int = 11  # m: early stop at a step t uniform among the last m, then leap to x_hat_0; >= 1
    hinge: float = 0.55  # loss = max(0, lambda - reward(x_hat_0))

    def __post_init__(self) -> None:
        _check(self.grad_steps >= 1, f"method.drtune.grad_steps={self.grad_steps}: use >= 1")
        _check(self.last_steps >= 1, f"method.drtune.last_steps={self.last_steps}: use >= 1")
        _check_hinge("drtune", self.hinge)


@dataclass(frozen=True)
class FullBackpropConfig:
    hinge: float = 0.55  # loss = max(0, lambda - reward(x_0)); the graph spans all N steps

    def __post_init__(self) -> None:
        _check_hinge("full_backprop", self.hinge)


@dataclass(frozen=True)
class GRPOConfig:
    # which steps are stochastic and trained: flow_grpo | dance_grpo | mixgrpo | fast
    variant: str = "flow_grpo"
    sde: str = "flow_grpo"  # SDE step: flow_grpo (std a sqrt(s/(1-s))) | dance_grpo (std eta sqrt(-dt)) | cps
    noise_level: float = 0.7  # a (eta for dance_grpo); > 0 (Flow-GRPO: 0.9 Flux, 0.7 SD3.5; DanceGRPO: 0.3)
    group_size: int = 8  # G images per prompt; >= 2 (Flow-GRPO 24, DanceGRPO 12)
    shared_noise: bool = False  # the G images of a prompt start from the same noise (DanceGRPO)
    std_scope: str = "batch"  # advantage std over the gathered batch (Flow-GRPO) or per group (DanceGRPO)
    adv_clip: float = 5.0  # advantages clamped to +-adv_clip; > 0
    clip_range: float = 1e-4  # PPO ratio clip eps; > 0 (Flow-GRPO 1e-4, Fast 1e-5)
    # KL to the reference (LoRA adapter off), Flow-GRPO's: mean (mu - mu_ref)^2 / 2g^2; >= 0
    kl_beta: float = 0.0
    # flow_grpo: first int(f N) steps trained; dance_grpo: round(f N) random steps; (0, 1]
    train_fraction: float = 0.99
    window_size: int = 4  # mixgrpo: SDE steps in the sliding window; >= 1
    window_shift_every: int = 25  # mixgrpo: the window moves one step later every this many iterations; >= 1
    updates_per_rollout: int = 1  # optimizer steps per rollout batch (the samples are split among them); >= 1
    # images per transformer call when sampling and training; 0 = the whole rollout batch
    micro_batch: int = 0
    ratio: str = "standard"  # PPO importance ratio: standard | guard (GRPO-Guard's step-normalised ratio)
    # total (the summed reward's) | per_component (each reward in its group; MixGRPO)
    advantages: str = "total"

    def __post_init__(self) -> None:
        _check(
            self.variant in GRPO_VARIANTS,
            f"method.grpo.variant={self.variant!r}: choose one of {', '.join(GRPO_VARIANTS)}",
        )
        _check(self.sde in SDE_KINDS, f"method.grpo.sde={self.sde!r}: choose one of {', '.join(SDE_KINDS)}")
        _check(self.noise_level > 0, f"method.grpo.noise_level={self.noise_level}: use > 0 (0 is the ODE)")
        _check(self.group_size >= 2, f"method.grpo.group_size={self.group_size}: a group needs >= 2 images")
        _check(
            self.std_scope in STD_SCOPES,
            f"method.grpo.std_scope={self.std_scope!r}: choose batch or group",
        )
        _check(self.adv_clip > 0, f"method.grpo.adv_clip={self.adv_clip}: use > 0")
        _check(self.clip_range > 0, f"method.grpo.clip_range={self.clip_range}: use > 0 (e.g. 1e-4)")
        _check(self.kl_beta >= 0, f"method.grpo.kl_beta={self.kl_beta}: use >= 0")
        _check(
            0 < self.train_fraction <= 1,
            f"method.grpo.train_fraction={self.train_fraction}: use a value in (0, 1]",
        )
        _check(self.window_size >= 1, f"method.grpo.window_size={self.window_size}: use >= 1")
        _check(
            self.window_shift_every >= 1,
            f"method.grpo.window_shift_every={self.window_shift_every}: use >= 1",
        )
        _check(
            self.updates_per_rollout >= 1,
            f"method.grpo.updates_per_rollout={self.updates_per_rollout}: use >= 1",
        )
        _check(
            self.micro_batch >= 0, f"method.grpo.micro_batch={self.micro_batch}: use >= 0 (0 = all at once)"
        )
        _check(
            self.ratio in ("standard", "guard"), f"method.grpo.ratio={self.ratio!r}: choose standard or guard"
        )
        _check(
            self.advantages in ("total", "per_component"),
            f"method.grpo.advantages={self.advantages!r}: choose total or per_component",
        )


TIMESTEP_SAMPLINGS = ("random", "stratified")
AWM_WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")


def _check_forward_common(section: str, opts: Any) -> None:
    """The checks DiffusionNFT's and AWM's sections share (rollout groups, timesteps, copy decay, updates)."""
    where = f"method.{section}"
    _check(opts.group_size >= 2, f"{where}.group_size={opts.group_size}: a group needs >= 2 images")
    _check(opts.std_scope in STD_SCOPES, f"{where}.std_scope={opts.std_scope!r}: choose batch or group")
    _check(opts.adv_clip > 0, f"{where}.adv_clip={opts.adv_clip}: use > 0")
    _check(opts.train_timesteps >= 1, f"{where}.train_timesteps={opts.train_timesteps}: use >= 1")
    _check(
        0 < opts.timestep_range <= 1,
        f"{where}.timestep_range={opts.timestep_range}: use a value in (0, 1] (the share of steps eligible)",
    )
    _check(
        opts.timestep_sampling in TIMESTEP_SAMPLINGS,
        f"{where}.timestep_sampling={opts.timestep_sampling!r}: choose one of {', '.join(TIMESTEP_SAMPLINGS)}",
    )
    _check(opts.kl_beta >= 0, f"{where}.kl_beta={opts.kl_beta}: use >= 0")
    _check(opts.decay_rate >= 0, f"{where}.decay_rate={opts.decay_rate}: use >= 0")
    _check(
        0 <= opts.decay_cap < 1,
        f"{where}.decay_cap={opts.decay_cap}: use a value in [0, 1) (1 would freeze the weight copy)",
    )
    _check(opts.updates_per_rollout >= 1, f"{where}.updates_per_rollout={opts.updates_per_rollout}: use >= 1")
    _check(opts.micro_batch >= 0, f"{where}.micro_batch={opts.micro_batch}: use >= 0 (0 = all at once)")


@dataclass(frozen=True)
class NFTConfig:
    group_size: int = 8  # G images per prompt; >= 2 (DiffusionNFT SD3.5: 24, Flow-Factory Flux: 16)
    std_scope: str = "group"  # advantage std per group (Flow-Factory global_std=false) or over the batch
    adv_clip: float = 5.0  # A_max: r = clip(A, +-A_max) / (2 A_max) + 1/2, loss x A_max; > 0
    beta: float = 1.0  # v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v; > 0 (DiffusionNFT: 1)
    train_timesteps: int = 2  # K grid sigmas trained per sample; 1..num_steps (Flow-Factory Flux: 2)
    timestep_range: float = 0.7  # K drawn among the first int(f N) steps (noise end); (0, 1]
    # stratified (Flow-Factory) | random (DiffusionNFT: a random subset)
    timestep_sampling: str = "stratified"
    kl_beta: float = 0.0  # mean (v - v_ref)^2 to the adapter-off reference; >= 0 (DiffusionNFT: 1e-4)
    # old policy <- d old + (1 - d) theta, d = min(rate x optimizer steps, cap); >= 0
    decay_rate: float = 0.001
    decay_cap: float = 0.5  # cap of d; [0, 1), 0 = on-policy (DiffusionNFT: 0.5)
    updates_per_rollout: int = 1  # optimizer steps per rollout (the samples are split among them); >= 1
    micro_batch: int = 0  # images per transformer call when sampling and training; 0 = the whole batch

    def __post_init__(self) -> None:
        _check_forward_common("nft", self)
        _check(
            self.beta > 0, f"method.nft.beta={self.beta}: use > 0 (the loss divides by it; DiffusionNFT: 1)"
        )


@dataclass(frozen=True)
class AWMConfig:
    group_size: int = 8  # G images per prompt; >= 2 (AWM SD3.5: 24, Flow-Factory Flux: 16)
    # advantage std over the gathered batch (Flow-Factory global_std=true) or per group
    std_scope: str = "batch"
    # advantages clamped to +-adv_clip; > 0 (Flow-Factory Flux: 1; AWM: 5 rescaled to 1)
    adv_clip: float = 1.0
    clip_range: float = 1.0  # PPO ratio clip eps; > 0 (AWM and Flow-Factory: 1)
    # log p from the matching error: uniform | t | t2 | huber | ghuber (AWM default)
    weighting: str = "ghuber"
    ghuber_power: float = 0.25  # q of ghuber: -((m + 1e-10)^q - 1e-10^q) t / q; > 0
    train_timesteps: int = 4  # K grid sigmas trained per sample; 1..num_steps (AWM: 6, Flow-Factory Flux: 4)
    timestep_range: float = 0.7  # K drawn among the first int(f N) steps (noise end); (0, 1] (AWM: 0.9)
    timestep_sampling: str = "stratified"  # stratified (AWM's discrete) | random
    kl_beta: float = 0.0  # mean (v - v_ref)^2 to the adapter-off reference; >= 0 (AWM: 1e-4, Flow-Factory: 0)
    ema_kl_beta: float = 0.1  # mean (v - v_ema)^2 to the EMA policy; >= 0 (AWM: 1, Flow-Factory Flux: 0.1)
    # EMA policy <- d ema + (1 - d) theta, d = min(rate x optimizer steps, cap); >= 0
    decay_rate: float = 0.001
    decay_cap: float = 0.3  # cap of d; [0, 1) (AWM and Flow-Factory: 0.3)
    updates_per_rollout: int = 1  # optimizer steps per rollout (the samples are split among them); >= 1
    micro_batch: int = 0  # images per transformer call when sampling and training; 0 = the whole batch

    def __post_init__(self) -> None:
        _check_forward_common("awm", self)
        _check(self.clip_range > 0, f"method.awm.clip_range={self.clip_range}: use > 0 (AWM: 1)")
        _check(
            self.weighting in AWM_WEIGHTINGS,
            f"method.awm.weighting={self.weighting!r}: choose one of {', '.join(AWM_WEIGHTINGS)}",
        )
        _check(self.ghuber_power > 0, f"method.awm.ghuber_power={self.ghuber_power}: use > 0 (AWM: 0.25)")
        _check(self.ema_kl_beta >= 0, f"method.awm.ema_kl_beta={self.ema_kl_beta}: use >= 0")


@dataclass(frozen=True)
class MethodConfig:
    """method.name and one section per method. Which code runs a method and what an update of it costs is
    the method table, leapalign.methods.METHODS (it imports these sections, so the names are read here from
    the sections themselves, and the table checks that it has a row for each)."""

    name: str = "leapalign"  # leapalign | refl | draft_lv | drtune | full_backprop | grpo | nft | awm
    leapalign: LeapAlignConfig = field(default_factory=LeapAlignConfig)
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    draft_lv: DraftLVConfig = field(default_factory=DraftLVConfig)
    drtune: DRTuneConfig = field(default_factory=DRTuneConfig)
    full_backprop: FullBackpropConfig = field(default_factory=FullBackpropConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    awm: AWMConfig = field(default_factory=AWMConfig)

    def __post_init__(self) -> None:
        names = method_names()
        _check(self.name in names, f"method.name={self.name!r}: choose one of {', '.join(names)}")

    @property
    def options(self) -> Any:
        """The section of the chosen method (cfg.method.options.hinge, ...)."""
        return getattr(self, self.name)


def method_names() -> tuple[str, ...]:
    """Every method.name: the sections of MethodConfig, in their order."""
    return tuple(f.name for f in dataclasses.fields(MethodConfig) if f.name != "name")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "lora"  # lora (peft adapter) | full (every transformer weight)
    lora_rank: int = 64  # adapter rank; >= 1
    lora_alpha: float = 128.0  # adapter scale numerator (scale = alpha / rank); > 0
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # module names to adapt
    gradient_checkpointing: bool = True  # recompute transformer activations in backward
    mixed_precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | no

    def __post_init__(self) -> None:
        _check(self.mode in ("lora", "full"), f"finetune.mode={self.mode!r}: choose lora or full")
        _check(self.lora_rank >= 1, f"finetune.lora_rank={self.lora_rank}: use >= 1")
        _check(self.lora_alpha > 0, f"finetune.lora_alpha={self.lora_alpha}: use > 0")
        _check(
            len(self.lora_target_modules) > 0,
            "finetune.lora_target_modules is empty: name at least one module",
        )
        _check(
            self.mixed_precision in ("auto", "bf16", "no"),
            f"finetune.mixed_precision={self.mixed_precision!r}: choose auto, bf16 or no",
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5  # AdamW learning rate; > 0 (paper: 1e-5)
    beta1: float = 0.9  # AdamW beta1; [0, 1)
    beta2: float = 0.999  # AdamW beta2; [0, 1)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay; >= 0
    max_grad_norm: float = 1.0  # clip the global grad norm to this; > 0
    ema_decay: float = 0.995  # EMA of trained weights; [0, 1), 0 disables the EMA copy

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr}: the learning rate must be > 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}: use >= 0")
        _check(self.max_grad_norm > 0, f"optim.max_grad_norm={self.max_grad_norm}: use > 0")
        _check(0 <= self.ema_decay < 1, f"optim.ema_decay={self.ema_decay}: use a value in [0, 1)")


@dataclass(frozen=True)
class RewardConfig:
    name: str = "color_match"  # registered reward (REWARD_PATHS), "pkg.module:Factory", or weighted_sum
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory; see below
    serve: bool = True  # Ray path: each reward model is a Ray Serve deployment; false = built in every worker
    app: str | None = None  # running Serve application to call; None = deploy/reuse one named by the reward
    replicas: int = 1  # replicas per deployment, each a Ray actor holding the model; >= 1
    max_replicas: int = 0  # > replicas: autoscale up to this on queued requests; 0 = fixed at replicas
    cpus_per_replica: float = 1.0  # CPUs per replica; > 0 (its torch threads: train.torch_threads, or this)
    gpus_per_replica: float = 0.0  # GPUs per replica; fractions share a GPU (0.25: four replicas); >= 0
    max_batch: int = 32  # images per batched forward (+ backward) in a replica; >= 1
    batch_wait_ms: float = 5.0  # how long a replica waits for other callers' images before a batch; >= 0
    runtime_env: dict[str, Any] = field(default_factory=dict)  # replicas' own runtime_env; {} = the cluster's

    # reward.name of a weighted sum of rewards, each its own deployment when served; its options map a label
    # (logged as reward/<label>) to {name, weight (default 1), options, and any of SERVING_KEYS}, or to a weight.
    WEIGHTED_SUM: typing.ClassVar[str] = "weighted_sum"
    SERVING_KEYS: typing.ClassVar[tuple[str, ...]] = (
        "app", "replicas", "max_replicas", "cpus_per_replica", "gpus_per_replica", "max_batch", "batch_wait_ms",
        "runtime_env",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check(bool(self.name), "reward.name is empty: name a reward (e.g. color_match)")
        _check(
            self.app is None or bool(self.app.strip()),
            "reward.app is empty: name a running Serve application (python -m reward_servers.serve NAME) or "
            "leave it unset (null) to deploy the reward from this config",
        )
        _check(self.replicas >= 1, f"reward.replicas={self.replicas}: use >= 1")
        _check(
            self.max_replicas == 0 or self.max_replicas > self.replicas,
            f"reward.max_replicas={self.max_replicas}: use 0 (a fixed count of reward.replicas) or more than "
            f"reward.replicas={self.replicas} (autoscaling between the two)",
        )
        _check(
            self.cpus_per_replica > 0, f"reward.cpus_per_replica={self.cpus_per_replica}: use > 0 (e.g. 1)"
        )
        _check(self.gpus_per_replica >= 0, f"reward.gpus_per_replica={self.gpus_per_replica}: use >= 0")
        _check(self.max_batch >= 1, f"reward.max_batch={self.max_batch}: use >= 1")
        _check(self.batch_wait_ms >= 0, f"reward.batch_wait_ms={self.batch_wait_ms}: use >= 0")
        if self.name == self.WEIGHTED_SUM:
            self.components()  # validated now, not when the first worker builds it

    def components(self) -> dict[str, dict[str, Any]]:
        """weighted_sum: label -> {name, weight, options} plus the component's own serving settings."""
        return self.parse_components(self.options)

    @classmethod
    def parse_components(cls, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """weighted_sum options -> {label: {"name", "weight", "options", *SERVING_KEYS}}; a bare number is
        the weight of the registered reward named by the label. Serving keys left out are the top level's."""
        _check(
            isinstance(options, dict) and len(options) > 0,
            "reward.name=weighted_sum needs reward.options: {label: {name: REWARD, weight: W}, ...} "
            "(e.g. hps: {name: hpsv2.1, weight: 0.7}, clip: {name: clip_score, weight: 1.4})",
        )
        parsed = {}
        for label, spec in options.items():
            where = f"reward.options.{label}"
            _check(
                isinstance(label, str) and label.replace("_", "").replace("-", "").isalnum(),
                f"{where}: use letters, digits, _ or - in a label (it becomes the metric reward/<label>)",
            )
            _check(label not in ("mean", "std"), f"{where}: reward/{label} is taken; choose another label")
            if isinstance(spec, int | float) and not isinstance(spec, bool):
                spec = {"name": label, "weight": spec}
            _check(
                isinstance(spec, dict), f"{where}={spec!r}: expected {{name: NAME, weight: W}} or a weight"
            )
            unknown = sorted(set(spec) - {"name", "weight", "options", *cls.SERVING_KEYS})
            _check(
                not unknown,
                f"{where}: unknown key(s) {', '.join(unknown)}; valid: name, weight, options, "
                f"{', '.join(cls.SERVING_KEYS)}",
            )
            weight = spec.get("weight", 1.0)
            _check(
                isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight),
                f"{where}.weight={weight!r}: expected a finite number",
            )
            name = spec.get("name", label)
            _check(
                isinstance(name, str) and bool(name) and name != cls.WEIGHTED_SUM,
                f"{where}.name={name!r}: name one registered reward or plugin (weighted sums do not nest)",
            )
            serving = {key: spec[key] for key in cls.SERVING_KEYS if key in spec}
            try:  # the component's serving settings pass the same checks as the top level's
                _build(cls, {"name": name, "options": spec.get("options") or {}, **serving}, "reward")
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            parsed[label] = {"name": name, "weight": float(weight), "options": dict(spec.get("options") or {}),
                             **serving}  # fmt: skip
        return parsed


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 300  # updates (paper: 300; GRPO: rollout batches, each followed by its PPO steps); >= 1
    batch_size: int = 4  # prompts per micro-batch (GRPO: prompts per rollout, x group_size images); >= 1
    grad_accum: int = 1  # micro-batches per optimizer step (direct-gradient methods); >= 1
    # compute budget in transformer image forward-equivalents (compute/nfe_total); 0 = no cap
    max_nfe: int = 0
    max_flops: float = 0.0  # compute budget in FLOPs of the whole update (compute/flops_total); 0 = no cap
    seed: int = 0  # seeds noise, prompt order and the methods' step draws; same seed -> same numbers
    prompts: str = "assets/prompts/demo.txt"  # .txt (one per line) or .parquet with a `prompt` column
    output_dir: str = "outputs/run"  # where config, weights, grids, local checkpoints go; created if missing
    # replace an existing run in output_dir (its files and checkpoints); false = refuse
    overwrite: bool = False
    resume: bool = False  # continue the run in output_dir (or ray storage) from its newest checkpoint
    checkpoint_every: int = 50  # write a checkpoint every N updates and at the last; >= 1
    keep_checkpoints: int = 2  # newest checkpoints kept; >= 1
    sample_every: int = 0  # save a sample grid every N steps; 0 = only before and after
    num_samples: int = 4  # prompts in each sample grid; >= 1
    log_every: int = 1  # log metrics every N steps; >= 1
    # torch CPU threads per process; 0 = torch's default (the core count: machine-dependent numbers)
    torch_threads: int = 0
    # CPU kernels: native | avx2 (the same numbers on every x86-64 CPU; leapalign.numerics)
    cpu_isa: str = "native"

    def __post_init__(self) -> None:
        _check(self.iterations >= 1, f"train.iterations={self.iterations}: use >= 1")
        _check(self.seed >= 0, f"train.seed={self.seed}: use an integer >= 0")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size}: use >= 1")
        _check(self.grad_accum >= 1, f"train.grad_accum={self.grad_accum}: use >= 1")
        _check(self.max_nfe >= 0, f"train.max_nfe={self.max_nfe}: use >= 0 (0 = no compute cap)")
        _check(
            math.isfinite(self.max_flops) and self.max_flops >= 0,
            f"train.max_flops={self.max_flops}: use a number >= 0 (e.g. 2.5e12; 0 = no compute cap)",
        )
        _check(
            not (self.max_nfe and self.max_flops),
            "train.max_nfe and train.max_flops are two budgets for one run: set one (the other 0)",
        )
        _check(
            not (self.overwrite and self.resume),
            "train.overwrite and train.resume exclude each other: pick one",
        )
        _check(self.checkpoint_every >= 1, f"train.checkpoint_every={self.checkpoint_every}: use >= 1")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints}: use >= 1")
        _check(self.sample_every >= 0, f"train.sample_every={self.sample_every}: use >= 0")
        _check(self.num_samples >= 1, f"train.num_samples={self.num_samples}: use >= 1")
        _check(self.log_every >= 1, f"train.log_every={self.log_every}: use >= 1")
        _check(
            self.torch_threads >= 0, f"train.torch_threads={self.torch_threads}: use >= 0 (0 = torch default)"
        )
        _check(bool(self.prompts), "train.prompts is empty: give a .txt or .parquet prompt file")
        _check(
            self.cpu_isa in ("native", "avx2"),
            f"train.cpu_isa={self.cpu_isa!r}: use native (the CPU's best kernels) or avx2 (portable numbers)",
        )


@dataclass(frozen=True)
class EvalConfig:
    # held-out prompt file (world .parquet: exact evaluator + reward; .txt: reward); None = off
    prompts: str | None = None
    num_prompts: int = 120  # before/after evaluation: the first N prompts of the file; >= 1
    images_per_prompt: int = 1  # samples per prompt (different noise); >= 1
    batch_size: int = 32  # prompts per sampling batch; >= 1
    use_ema: bool = True  # evaluate the EMA weights (as the paper does)
    every: int = 0  # held-out evaluation during training every N updates (and before the first); 0 = off
    every_nfe: int = 0  # ... or whenever the cumulative compute crosses a multiple of this; 0 = off
    every_num_prompts: int = 96  # prompts of the held-out file used during training (fixed noise); >= 1
    final_num_prompts: int = 0  # the run's last evaluation on this many (eval_final/*); 0 = every_num_prompts
    reward: bool = True  # also score held-out images with the training reward (eval/reward)

    def __post_init__(self) -> None:
        _check(self.num_prompts >= 1, f"eval.num_prompts={self.num_prompts}: use >= 1")
        _check(self.images_per_prompt >= 1, f"eval.images_per_prompt={self.images_per_prompt}: use >= 1")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size}: use >= 1")
        _check(self.every >= 0 and self.every_nfe >= 0, "eval.every / eval.every_nfe: use >= 0 (0 = off)")
        _check(self.every_num_prompts >= 1, f"eval.every_num_prompts={self.every_num_prompts}: use >= 1")
        _check(
            self.final_num_prompts == 0 or self.final_num_prompts >= self.every_num_prompts,
            f"eval.final_num_prompts={self.final_num_prompts}: use 0 (as during training) or >= "
            f"eval.every_num_prompts={self.every_num_prompts} (the curve's prompts come first)",
        )

    @property
    def during_training(self) -> bool:
        return self.prompts is not None and (self.every > 0 or self.every_nfe > 0)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow
    uri: str = "sqlite:///mlflow.db"  # MLflow tracking URI (sqlite file or http://host:port server)
    experiment: str = "leapalign"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name; None lets MLflow pick one


STRATEGIES = ("auto", "none", "ddp", "fsdp2")  # ray.strategy (leapalign.parallel.resolve_strategy)


@dataclass(frozen=True)
class RayConfig:
    enabled: bool = True  # train on Ray Train workers; false = this one process, no Ray
    address: str | None = None  # None = the `ray job submit` cluster, else a new one on 127.0.0.1; or auto
    num_workers: int = 1  # data-parallel workers; >= 1 (global batch = workers * batch_size * grad_accum;
    # every random draw is made for the global batch and each worker takes its slice, so 2 workers with
    # batch_size B give the numbers of 1 worker with 2B, up to float rounding)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker; > 0
    use_gpu: bool = False  # one GPU per worker, NCCL for gradients; false = CPU workers (gloo)
    # Ray checkpoints in STORAGE/RUN; None = ray_results beside train.output_dir
    storage_path: str | None = None
    run_name: str | None = None  # the run's folder under storage_path; None = train.output_dir's name
    max_failures: int = 3  # worker failures survived by restarting from the last checkpoint; -1 = no limit
    # How the workers share the transformer (leapalign.parallel): auto = none for one worker, ddp for LoRA,
    # fsdp2 for full fine-tuning; none = one process, no gradient sync; ddp = DistributedDataParallel
    # (replicated weights, bucketed gradient all-reduce); fsdp2 = fully_shard per transformer block and on
    # the root (weights, gradients and AdamW state sharded; bf16 compute with fp32 reduction on GPU).
    strategy: str = "auto"
    cpu_offload: bool = False  # fsdp2 only: sharded weights, gradients and AdamW state live in CPU memory
    placement: str = "PACK"  # Ray placement of the workers: PACK (fill a node first) or SPREAD (one per node)

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, f"ray.num_workers={self.num_workers}: use >= 1")
        _check(
            self.strategy in STRATEGIES,
            f"ray.strategy={self.strategy!r}: use auto, none, ddp or fsdp2",
        )
        _check(
            not (self.cpu_offload and self.strategy not in ("auto", "fsdp2")),
            f"ray.cpu_offload=true needs ray.strategy=fsdp2 (or auto with full fine-tuning), not {self.strategy}",
        )
        _check(
            self.placement in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            f"ray.placement={self.placement!r}: use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD",
        )
        _check(self.cpus_per_worker > 0, f"ray.cpus_per_worker={self.cpus_per_worker}: use > 0 (e.g. 0.5)")
        _check(
            self.address is None or bool(self.address.strip()),
            "ray.address is empty: use null (local or job cluster), auto, or HEAD_IP:6379",
        )
        _check(
            self.storage_path is None or bool(self.storage_path),
            "ray.storage_path is empty: give a writable folder, an s3:// URI, or null",
        )
        _check(
            self.run_name is None or (bool(self.run_name.strip()) and "/" not in self.run_name),
            f"ray.run_name={self.run_name!r}: use a plain folder name (no '/') or null",
        )
        _check(self.max_failures >= -1, f"ray.max_failures={self.max_failures}: use >= 0, or -1 for no limit")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    leap: LeapConfig = field(default_factory=LeapConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _check(
            not (self.ray.strategy == "fsdp2" and self.finetune.mode == "lora"),
            "ray.strategy=fsdp2 shards full fine-tuning; a LoRA adapter is small enough to replicate: use "
            "ray.strategy=ddp (or auto)",
        )
        _check(
            not (self.ray.cpu_offload and self.finetune.mode == "lora"),
            "ray.cpu_offload=true offloads FSDP2 shards of full fine-tuning; with finetune.mode=lora drop it",
        )
        if self.method.name == "grpo" and self.method.grpo.kl_beta > 0:
            _check(
                self.finetune.mode == "lora",
                "method.grpo.kl_beta > 0 needs finetune.mode=lora: the reference policy is the same network with "
                "the adapter disabled (full fine-tuning would need a second copy of the transformer)",
            )
        if self.method.name == "grpo" and self.method.grpo.advantages == "per_component":
            _check(
                self.reward.name == RewardConfig.WEIGHTED_SUM,
                "method.grpo.advantages=per_component normalises each reward of a weighted sum: set reward.name="
                "weighted_sum with its components (or use advantages=total)",
            )
        if self.method.name == "grpo":
            images = self.train.batch_size * self.method.grpo.group_size
            _check(
                self.method.grpo.updates_per_rollout <= images,
                f"method.grpo.updates_per_rollout={self.method.grpo.updates_per_rollout} exceeds the "
                f"{images} images of a rollout (train.batch_size x group_size): each update needs samples",
            )
        if isinstance(self.method.options, NFTConfig | AWMConfig):  # trained on re-noised clean samples
            opts, where = self.method.options, f"method.{self.method.name}"
            _check(
                not (opts.kl_beta > 0 and self.finetune.mode != "lora"),
                f"{where}.kl_beta > 0 needs finetune.mode=lora: the reference policy is the same network with the "
                "adapter disabled (full fine-tuning would need a second copy of the transformer)",
            )
            _check(
                opts.train_timesteps <= self.sampler.num_steps,
                f"{where}.train_timesteps={opts.train_timesteps} exceeds sampler.num_steps={self.sampler.num_steps}",
            )
            images = self.train.batch_size * opts.group_size
            _check(
                opts.updates_per_rollout <= images,
                f"{where}.updates_per_rollout={opts.updates_per_rollout} exceeds the {images} images of a rollout "
                f"(train.batch_size x group_size): each update needs samples",
            )
        if self.leap.distribution == "fixed_gap":
            _check(
                self.leap.gap < self.sampler.num_steps,
                f"leap.gap={self.leap.gap} must be < sampler.num_steps={self.sampler.num_steps}",
            )


# ----------------------------------------------------------------------------- building and merging


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads 2.5e12 (no sign in the exponent) as a string: take it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; ints widen to floats, lists become tuples."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        _check(isinstance(value, list | tuple), f"{key}={value!r}: expected a list")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, key) for v in value)
    if origin is dict or annotation is dict:
        _check(isinstance(value, dict), f"{key}={value!r}: expected a mapping (key: value)")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        _check(isinstance(value, bool), f"{key}={value!r}: expected true or false")
        return value
    if annotation is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool), f"{key}={value!r}: expected an integer"
        )
        return value
    if annotation is float:
        value = _yaml_float(value)
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            f"{key}={value!r}: expected a number",
        )
        return float(value)
    if annotation is str:
        _check(isinstance(value, str), f"{key}={value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    _check(isinstance(data, dict), f"{prefix or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(where + n for n in names))}{_moved_hint(cls, unknown)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


# Keys that moved when the config grew one section per method and one checkpoint policy for every path.
_MOVED = {
    **{f"method.{k}": f"method.leapalign.{k}" for k in ("alpha", "tau", "hinge", "weighting", "reward_on")},
    **{f"ray.{k}": f"train.{k}" for k in ("checkpoint_every", "keep_checkpoints", "resume")},
}


def _moved_hint(cls: type, unknown: list[str]) -> str:
    section = {MethodConfig: "method", RayConfig: "ray"}.get(cls)
    moved = [
        f"{section}.{u} is now {_MOVED[f'{section}.{u}']}" for u in unknown if f"{section}.{u}" in _MOVED
    ]
    return f" ({'; '.join(moved)})" if moved else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        _check(isinstance(child, dict), f"override {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["method.leapalign.alpha=0.1", "train.seed=3"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(
            bool(sep) and bool(key.strip()),
            f"override {item!r} is not key=value (e.g. method.leapalign.alpha=0.1)",
        )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's sections; a top-level `base: other.yaml` (relative to this file) is read first and
    this file's values are merged over it, so a family of configs can share one base."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass a YAML file such as experiments/quickstart.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    _check(isinstance(data, dict), f"config file {path} must hold a mapping of sections (model:, train: ...)")
    base = data.pop("base", None)
    if base is None:
        return data
    _check(isinstance(base, str) and bool(base), f"{path}: `base:` must name another config file")
    base_path = (path.parent / base).resolve()
    _check(base_path not in _seen, f"{path}: `base:` chain loops back to {base_path}")
    return _merge(read_yaml(base_path, (*_seen, path.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, validated."""
    data = read_yaml(path) if path is not None else {}
    data = _merge(data, parse_overrides(overrides or []))
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in dataclasses.asdict(cfg).items()}


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Dotted keys (`method.leapalign.alpha`) -> values, as logged to MLflow and searched by Ray Tune."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict) and key != "options":
                walk(value, dotted)
            elif isinstance(value, dict):
                for opt, opt_value in value.items():
                    flat[f"{dotted}.{opt}"] = opt_value
            else:
                flat[dotted] = value

    walk(config_to_dict(cfg), "")
    return flat


def with_overrides(cfg: Config, flat: dict[str, Any]) -> Config:
    """A new config with dotted-key values replaced (used by sweeps); validated like the CLI."""
    data = config_to_dict(cfg)
    for key, value in flat.items():
        _set_dotted(data, key, value)
    return _build(Config, data, "")


def with_cli_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new config with `key=value` command-line overrides applied, validated."""
    return _build(Config, _merge(config_to_dict(cfg), parse_overrides(overrides)), "")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
