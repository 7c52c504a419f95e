"""What a run reads and writes on disk, in OUTPUT (train.output_dir):

    config.yaml, metrics.jsonl, train.log   the resolved config, one line per update, the run's log
    checkpoints/step_<n>.pt                 runs without Ray (Ray's are in its storage, distributed.ray_train)
    heldout/step_<n>.parquet                each held-out image's results at an evaluation step
    lora/ lora_ema/ | transformer/ ...      the trained weights in the diffusers format
    samples_*.png, eval.json, ...           grids and the before/after evaluation

The rules: a new run never replaces an old one silently (`check_output_dir`); train.overwrite=true removes
exactly RUN_FILES (`clear_output_dir`); train.resume=true continues from the newest checkpoint
(`resume_checkpoint`), whose later metrics lines are dropped (`trim_metrics_log`). After every update a
run hands a `StepEnd` to its step hook: `LocalCheckpoints` here, Ray's reports and checkpoints in
leapalign.distributed.ray_train.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from leapalign.config import Config
from leapalign.io import atomic_path
from leapalign.logs import RUN_LOG
from leapalign.tracking import RUN_RECORD

if TYPE_CHECKING:
    from leapalign.models.flux import FluxPolicy

CHECKPOINT_DIR = "checkpoints"  # local runs: OUTPUT/checkpoints/step_000050.pt
HELDOUT_DIR = "heldout"  # OUTPUT/heldout/step_000050.parquet: each held-out image's results at that step
# What a run folder holds; train.overwrite=true removes exactly these (never anything else in the folder).
RUN_FILES = (
    "config.yaml", "metrics.jsonl", RUN_RECORD, CHECKPOINT_DIR, "lora", "lora_ema", "transformer",
    "transformer_ema", "samples_before.png", "samples_after.png", "eval.json", "eval_before_after.png",
    RUN_LOG, HELDOUT_DIR,
)  # fmt: skip


def check_output_dir(cfg: Config) -> None:
    """A new run never silently replaces an old one: refuse unless resuming or train.overwrite=true."""
    out_dir = Path(cfg.train.output_dir)
    if cfg.train.resume or cfg.train.overwrite or not out_dir.is_dir():
        return
    found = sorted(name for name in RUN_FILES if (out_dir / name).exists())
    if found:
        raise FileExistsError(
            f"train.output_dir={out_dir} already holds a run ({', '.join(found[:4])}); continue it with "
            f"train.resume=true, replace it with train.overwrite=true, or choose another train.output_dir"
        )


def clear_output_dir(cfg: Config) -> None:
    """train.overwrite=true: remove the previous run's files (only RUN_FILES; nothing else in the folder)."""
    out_dir = Path(cfg.train.output_dir)
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resume_checkpoint(out_dir: Path) -> Path:
    """train.resume=true without Ray: the newest OUTPUT/checkpoints/step_<n>.pt, or the error saying so."""
    found = sorted((out_dir / CHECKPOINT_DIR).glob("step_*.pt"))
    if not found:
        raise FileNotFoundError(
            f"train.resume=true but {out_dir / CHECKPOINT_DIR} holds no checkpoint; drop train.resume to start "
            f"the run"
        )
    return found[-1]


@dataclass
class StepEnd:
    """What a step hook hears after every update, on every rank (the same step, final and evaluated
    everywhere: Ray's hook turns them into collective reports)."""

    step: int  # updates done (1-based)
    metrics: dict[str, float]  # the step's metrics (means over ranks; held-out ones where evaluated)
    save: Callable[[Path], None]  # writes this rank's checkpoint to a path
    final: bool  # the run's last step (iterations, compute budget or Ctrl-C)
    evaluated: bool  # held-out evaluation ran at this step


# on_step_end(StepEnd): Ray's hook reports metrics and checkpoints to Ray; local runs use LocalCheckpoints.
StepHook = Callable[[StepEnd], None]


class LocalCheckpoints:
    """The checkpoint hook of a run without Ray: OUTPUT/checkpoints/step_<n>.pt, newest `keep` kept."""

    def __init__(self, out_dir: Path, every: int, keep: int):
        self.folder, self.every, self.keep = out_dir / CHECKPOINT_DIR, every, keep

    def __call__(self, end: StepEnd) -> None:
        if end.step % self.every and not end.final:
            return
        end.save(self.folder / f"step_{end.step:06d}.pt")
        for old in sorted(self.folder.glob("step_*.pt"))[: -self.keep]:
            old.unlink()


def trim_metrics_log(path: Path, through_step: int) -> None:
    """Drop metrics.jsonl lines after a checkpoint's step: those steps run again and get appended."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= through_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def save_trained_weights(policy: FluxPolicy, cfg: Config, out_dir: Path) -> Path:
    """LoRA in the diffusers format (FluxPipeline.load_lora_weights) or a transformer folder."""
    if cfg.finetune.mode == "lora":
        from diffusers import FluxPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(policy.transformer))
        # The adapter config travels with the weights: without it a loader assumes lora_alpha = rank.
        metadata = policy.transformer.peft_config["default"].to_dict()
        FluxPipeline.save_lora_weights(
            str(out_dir), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
    else:
        policy.transformer.save_pretrained(str(out_dir))
    return out_dir


def save_transformer_state(transformer: torch.nn.Module, state: dict[str, Tensor], out_dir: Path) -> Path:
    """A transformer folder as `save_pretrained` writes it (config.json + safetensors shards, 10 GB each)
    from a gathered full state dict: what FluxTransformer2DModel.from_pretrained loads."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(transformer.config)
    # fully_shard swaps the class for a subclass named FSDP<name>; the folder names the model's own class.
    cls = next(c for c in type(transformer).__mro__ if not c.__name__.startswith("FSDP"))
    config = {"_class_name": cls.__name__, **{k: v for k, v in config.items() if not k.startswith("_")}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
