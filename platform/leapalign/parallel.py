"""Everything torch.distributed: the ranks' collectives and how data-parallel workers share the
transformer: none, DDP (LoRA) or FSDP2 (full fine-tuning).

    LocalContext       one process: rank 0 of 1; TorchDistContext: the same methods over an initialised
                       process group (Ray Train workers): metric means, votes, count sums, gathers (of
                       tensors, and of objects: the split held-out evaluation's per-image results)
    resolve_strategy   ray.strategy=auto -> none (one worker), ddp (LoRA), fsdp2 (full fine-tuning)
    Parallel           wrap the transformer; `accumulate(sync)` around each micro-batch (no gradient
                       all-reduce until the last one); `clip_grad_norm` (DTensor grads too);
                       `full_model_state` (the unsharded weights for export, gathered to CPU)
    save_state         sharded checkpoint with torch.distributed.checkpoint (DCP): weights, AdamW, EMA,
    load_state         plus train_state.pt (step, random streams; torch.load(weights_only=True)).
                       A checkpoint written by N workers loads on any number (DCP reshards).

Plain torch.distributed; no Ray here (leapalign.distributed sets up the process group).

Why these two: a LoRA adapter is a few MB, so replicating it (DDP: one bucketed all-reduce of the
gradients, overlapped with backward) costs nothing; full fine-tuning of a 12B Flux holds 12B x (4 weights +
4 grads + 8 AdamW) bytes = 192 GB, which only fits when sharded (FSDP2: every rank keeps 1/N of each and
all-gathers one block's weights at a time).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leapalign.config import STRATEGIES

log = logging.getLogger("leapalign")

DCP_FOLDER_MARKER = ".metadata"  # what torch.distributed.checkpoint writes last: a complete checkpoint
TRAIN_STATE_FILE = "train_state.pt"


# ----------------------------------------------------------------------------- ranks


class LocalContext:
    """One process. Ray Train workers use TorchDistContext (same methods over torch.distributed)."""

    rank = 0
    world_size = 1
    has_process_group = False  # DDP / FSDP2 need one (Ray Train workers, or torch.distributed set up)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every rank's metrics averaged (the global batch's mean: ranks hold equal shares)."""
        return metrics

    def all_true(self, flag: bool) -> bool:
        return flag

    def sum_counts(self, values: list[int]) -> list[int]:
        """Integer counts summed over ranks, in one collective."""
        return [int(v) for v in values]

    def all_gather(self, tensor: Tensor) -> Tensor:
        """[n, ...] from every rank -> [world_size * n, ...] in rank order."""
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """A picklable object from every rank -> their list, in rank order (held-out results per image)."""
        return [obj]


class TorchDistContext(LocalContext):
    """Data parallel over an initialised torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    has_process_group = True

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)  # every rank logs the same keys (same method, same skip decision)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        self._dist.all_reduce(values)  # one collective for all metrics
        return dict(zip(keys, (values / self.world_size).tolist(), strict=True))

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0])
        self._dist.all_reduce(value, op=self._dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    def sum_counts(self, values: list[int]) -> list[int]:
        totals = torch.tensor(values, dtype=torch.int64)
        self._dist.all_reduce(totals)
        return totals.tolist()

    def all_gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def all_gather_object(self, obj: Any) -> list[Any]:
        parts: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(parts, obj)
        return parts


# ----------------------------------------------------------------------------- sharing the transformer


def resolve_strategy(strategy: str, world_size: int, finetune_mode: str) -> str:
    """auto: one worker -> none; LoRA -> ddp; full fine-tuning -> fsdp2. Explicit choices are checked."""
    if strategy not in STRATEGIES:
        raise ValueError(f"ray.strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        if world_size == 1:
            return "none"
        return "ddp" if finetune_mode == "lora" else "fsdp2"
    if strategy == "none" and world_size > 1:
        raise ValueError(
            f"ray.strategy=none with {world_size} workers would let their weights drift apart (no gradient "
            f"sync): use ddp, fsdp2 or auto"
        )
    if strategy == "fsdp2" and finetune_mode == "lora":
        raise ValueError("ray.strategy=fsdp2 is for full fine-tuning; LoRA uses ddp (or auto)")
    return strategy


def is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_numel(tensor: Tensor) -> int:
    """Elements this rank holds: its shard of a DTensor, all of a plain tensor."""
    return tensor.to_local().numel() if is_dtensor(tensor) else tensor.numel()


def flux_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP2 shards one by one: Flux's double- and single-stream blocks."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


class Parallel:
    """One strategy's view of the trained transformer; `strategy="none"` is the single-process loop."""

    def __init__(self, strategy: str, *, world_size: int = 1, rank: int = 0, cpu_offload: bool = False):
        self.strategy, self.world_size, self.rank, self.cpu_offload = strategy, world_size, rank, cpu_offload
        self.ddp: torch.nn.Module | None = None
        self.module: torch.nn.Module | None = None

    @property
    def sharded(self) -> bool:
        """Sharded weights: every rank must take part in every forward (grids, evaluation, export)."""
        return self.strategy == "fsdp2"

    def wrap(self, transformer: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
        """Wrap in place (fsdp2) or around (ddp). Returns the module to call for forwards with a graph
        (the DDP wrapper, whose hooks reduce gradients) or None (call the transformer itself)."""
        self.module = transformer
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: Flux has no buffers that change; skips a collective per forward.
            self.ddp = DistributedDataParallel(
                transformer,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
            return self.ddp
        if self.strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import (
                CPUOffloadPolicy,
                MixedPrecisionPolicy,
                OffloadPolicy,
                fully_shard,
            )

            mesh = init_device_mesh(device.type, (self.world_size,))
            # GPU: bf16 weights in the forward and backward, fp32 gradient reduction and fp32 master weights.
            # CPU: fp32 throughout (gloo and CPU kernels gain nothing from bf16, and the numbers stay exact).
            mixed = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if device.type == "cuda"
                else MixedPrecisionPolicy()
            )
            offload = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
            for block in flux_blocks(transformer):
                fully_shard(block, mesh=mesh, mp_policy=mixed, offload_policy=offload)
            fully_shard(transformer, mesh=mesh, mp_policy=mixed, offload_policy=offload)
        return None

    @contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are reduced only when `sync` (the last)."""
        if self.strategy == "ddp" and not sync:
            with self.ddp.no_sync():
                yield
        elif self.strategy == "fsdp2":
            self.module.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        else:
            yield

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """The global gradient norm (before clipping), the same on every rank; DTensor grads included."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if is_dtensor(norm):
            norm = norm.full_tensor()
        return float(norm)  # CPU-GPU sync: one per optimizer step

    def full_model_state(self, transformer: torch.nn.Module) -> dict[str, Tensor]:
        """Every weight unsharded, on CPU. Collective under fsdp2 (call on every rank); rank 0 gets it all."""
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in transformer.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )


# ----------------------------------------------------------------------------- DCP checkpoints


def single_rank() -> bool:
    """True without a process group or with one rank: DCP then skips its collectives (no_dist).

    With one rank they gather nothing, yet they cost: on the quickstart's 1-worker Ray run (2 cores) every
    update after the first checkpoint took 1.7x as long, 0.37 -> 0.62 s, in 2 of 2 runs, and stayed at
    0.37 s with no_dist (2 of 2; bench/README.md, "platform overhead"). The same slowdown after a save over
    a 1-rank gloo group in one process showed in 2 of 5 runs; what the collectives leave behind (gloo's
    threads and the OpenMP thread pool are the suspects) is not pinned down.
    """
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_world_size() == 1


def save_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_shadow: dict[str, Tensor] | None,
    train_state: dict[str, Any],
    is_main: bool,
    copy_shadow: dict[str, Tensor] | None = None,
) -> None:
    """Write this rank's shards of weights, AdamW and EMA into `folder` (DCP), and rank 0 the train state.

    Every rank calls it (a collective). Ray gives each rank its own fresh folder and merges them into one
    checkpoint in storage, so an interrupted write never replaces a good checkpoint. Only the trained
    weights are saved (LoRA: the adapter); frozen weights come from the model folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if ema_shadow is not None:
        state["ema"] = ema_shadow
    if copy_shadow is not None:  # a method's weight copy (DiffusionNFT's old policy, AWM's EMA policy)
        state["policy_copy"] = copy_shadow
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=single_rank())
    if is_main:
        torch.save(train_state, folder / TRAIN_STATE_FILE)


def load_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_shadow: dict[str, Tensor] | None,
    copy_shadow: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Load a save_state folder written by any number of ranks into this rank's (possibly sharded) state;
    the EMA (and weight copy) shadow tensors are filled in place. Returns the train state (no pickle: weights_only=True)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if not (folder / DCP_FOLDER_MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {DCP_FOLDER_MARKER})")
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if ema_shadow is not None:
        state["ema"] = ema_shadow
    if copy_shadow is not None:
        state["policy_copy"] = copy_shadow
    # Raises on a trained key the checkpoint lacks.
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=single_rank())
    # strict=False: the frozen weights (LoRA's base model) are not in the checkpoint and stay as loaded.
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    return torch.load(folder / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)


def is_dcp_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / DCP_FOLDER_MARKER).is_file()
