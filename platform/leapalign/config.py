"""Typed run configuration: defaults <- YAML file <- `key=value` overrides.

Every field has a default and a one-line comment (unit, valid range). `__post_init__` rejects bad
values with a message that says how to fix them. Unknown keys are errors. The dotted keys used on
the command line (`method.alpha=0.3`) are the same ones Ray Tune search spaces and MLflow params use.
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


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 25  # Euler ODE steps of the training rollout (paper: 25); >= 2
    eval_num_steps: int = 50  # steps for evaluation samples (paper: 50); >= 1
    height: int = 720  # pixels; a multiple of 16
    width: int = 720  # pixels; a multiple of 16
    guidance_scale: float = 3.5  # Flux guidance embedding (distilled CFG); >= 0

    def __post_init__(self) -> None:
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


METHODS = ("leapalign",)
WEIGHTINGS = ("both", "d_j", "d_0", "none")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "leapalign"  # alignment method
    alpha: float = (
        0.3  # gradient discount on the model input at step j; 0..1 (paper: 0.3 HPSv2.1, 0.1 PickScore)
    )
    tau: float = 0.1  # floor of each trajectory distance in the similarity weight; > 0 (w <= 1/tau)
    hinge: float = 0.55  # lambda: loss = w * max(0, lambda - reward); reward units
    weighting: str = "both"  # similarity weight from: both | d_j | d_0 | none (ablation)
    reward_on: str = (
        "final"  # reward on the real decoded x_0 (final) or on the leap's x_hat_0 (leap; ablation)
    )

    def __post_init__(self) -> None:
        _check(self.name in METHODS, f"method.name={self.name!r}: choose one of {', '.join(METHODS)}")
        _check(
            0.0 <= self.alpha <= 1.0,
            f"method.alpha={self.alpha} is outside [0, 1]: 1 keeps the full nested gradient, 0 drops it",
        )
        _check(self.tau > 0, f"method.tau={self.tau}: the distance floor must be > 0 (paper: 0.1)")
        _check(math.isfinite(self.hinge), f"method.hinge={self.hinge}: must be a finite number")
        _check(
            self.weighting in WEIGHTINGS,
            f"method.weighting={self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}",
        )
        _check(
            self.reward_on in ("final", "leap"), f"method.reward_on={self.reward_on!r}: choose final or leap"
        )


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
    name: str = "color_match"  # reward (leapalign.rewards.REWARDS); with reward.actor set, what it serves
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward factory
    actor: str | None = None  # name of a running Ray reward actor (reward_servers/); None = build in process
    namespace: str = "leapalign"  # Ray namespace the reward actor lives in

    def __post_init__(self) -> None:
        _check(bool(self.name), "reward.name is empty: name a reward (e.g. color_match)")
        _check(
            self.actor is None or bool(self.actor.strip()),
            "reward.actor is empty: name a running reward actor (python -m reward_servers.serve NAME) "
            "or leave it unset (null) to build the reward in process",
        )
        _check(bool(self.namespace), "reward.namespace is empty: use the namespace the actor was started in")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 300  # optimizer steps (paper: 300); >= 1
    batch_size: int = 4  # prompts per micro-batch (one leap pair per micro-batch); >= 1
    grad_accum: int = 1  # micro-batches per optimizer step; >= 1
    seed: int = 0  # seeds noise, prompt order and leap pairs; same seed -> same numbers
    prompts: str = "assets/prompts/demo.txt"  # .txt (one per line) or .parquet with a `prompt` column
    output_dir: str = "outputs/run"  # where config, weights, grids go; created if missing
    sample_every: int = 0  # save a sample grid every N steps; 0 = only before and after
    num_samples: int = 4  # prompts in each sample grid; >= 1
    log_every: int = 1  # log metrics every N steps; >= 1
    torch_threads: int = 0  # torch CPU threads per process; 0 keeps torch's default (1 avoids oversubscription on shared cores)

    def __post_init__(self) -> None:
        _check(self.iterations >= 1, f"train.iterations={self.iterations}: use >= 1")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size}: use >= 1")
        _check(self.grad_accum >= 1, f"train.grad_accum={self.grad_accum}: use >= 1")
        _check(self.sample_every >= 0, f"train.sample_every={self.sample_every}: use >= 0")
        _check(self.num_samples >= 1, f"train.num_samples={self.num_samples}: use >= 1")
        _check(self.log_every >= 1, f"train.log_every={self.log_every}: use >= 1")
        _check(
            self.torch_threads >= 0, f"train.torch_threads={self.torch_threads}: use >= 0 (0 = torch default)"
        )
        _check(bool(self.prompts), "train.prompts is empty: give a .txt or .parquet prompt file")


@dataclass(frozen=True)
class EvalConfig:
    prompts: str | None = (
        None  # held-out prompt file (.parquet of the miniature world); None skips evaluation
    )
    num_prompts: int = 120  # evaluate the first N prompts of the file; >= 1
    images_per_prompt: int = 1  # samples per prompt (different noise); >= 1
    batch_size: int = 32  # prompts per sampling batch; >= 1
    use_ema: bool = True  # evaluate the EMA weights after training (as the paper does)

    def __post_init__(self) -> None:
        _check(self.num_prompts >= 1, f"eval.num_prompts={self.num_prompts}: use >= 1")
        _check(self.images_per_prompt >= 1, f"eval.images_per_prompt={self.images_per_prompt}: use >= 1")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size}: use >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow
    uri: str = "sqlite:///mlflow.db"  # MLflow tracking URI (sqlite file or http://host:port server)
    experiment: str = "leapalign"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name; None lets MLflow pick one


@dataclass(frozen=True)
class RayConfig:
    enabled: bool = True  # train on Ray Train workers; false = this one process, no Ray
    address: str | None = None  # None = the `ray job submit` cluster, else a new one on 127.0.0.1; or auto
    num_workers: int = 1  # data-parallel workers; >= 1 (global batch = workers * batch_size * grad_accum)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker; > 0
    use_gpu: bool = False  # one GPU per worker, NCCL for gradients; false = CPU workers (gloo)
    storage_path: str | None = None  # checkpoints in STORAGE/RUN; None = ray_results beside train.output_dir
    run_name: str | None = None  # the run's folder under storage_path; None = train.output_dir's name
    checkpoint_every: int = 50  # persist a checkpoint every N optimizer steps and at the last; >= 1
    keep_checkpoints: int = 2  # newest checkpoints kept in storage; >= 1
    max_failures: int = 3  # worker failures survived by restarting from the last checkpoint; -1 = no limit
    resume: bool = False  # continue run_name from its last checkpoint (same MLflow run); false = start over

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, f"ray.num_workers={self.num_workers}: use >= 1")
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
        _check(self.checkpoint_every >= 1, f"ray.checkpoint_every={self.checkpoint_every}: use >= 1")
        _check(self.keep_checkpoints >= 1, f"ray.keep_checkpoints={self.keep_checkpoints}: use >= 1")
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
        if self.leap.distribution == "fixed_gap":
            _check(
                self.leap.gap < self.sampler.num_steps,
                f"leap.gap={self.leap.gap} must be < sampler.num_steps={self.sampler.num_steps}",
            )


# ----------------------------------------------------------------------------- building and merging


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
            f"valid keys here: {', '.join(sorted(where + n for n in names))}"
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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        _check(isinstance(child, dict), f"override {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["method.alpha=0.1", "train.seed=3"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(bool(sep) and bool(key.strip()), f"override {item!r} is not key=value (e.g. method.alpha=0.1)")
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


def read_yaml(path: str | Path) -> dict[str, Any]:
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
    return data


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
    """Dotted keys (`method.alpha`) -> values, as logged to MLflow and searched by Ray Tune."""
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


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
