"""Precomputed text conditioning: T5 + CLIP prompt embeddings on disk, so training never loads the text encoders.

`leapalign embed PROMPTS... OUT` runs FluxPipeline.encode_prompt once per prompt and writes what it returns
(prompt_embeds [L, D_t5], pooled_prompt_embeds [D_clip] per prompt) to a cache folder; `model.text_cache=OUT`
makes `FluxPolicy.encode_prompts` read them instead, and the pipeline is loaded with text_encoder=None,
text_encoder_2=None, tokenizer=None, tokenizer_2=None. A cache folder holds

    manifest.json             the model (path, revision, fingerprint, one sha256 per text-component file),
                              max_sequence_length, dtype, per-prompt shapes, shard names, source prompt files
    index.parquet             prompt (string) -> shard (int32), row (int32): read once, a dict in memory
    shard-00000.safetensors   prompt_embeds [n, L, D_t5], pooled_prompt_embeds [n, D_clip] for <= shard_size
                              prompts; rows are read lazily (memory-mapped), one prompt at a time

The shards are written one by one, each atomically, into a hidden folder beside OUT (`.OUT.partial`), which
is renamed into place once the index and manifest are written: a crash never leaves half a cache, and the
same command run again keeps the finished shards and encodes the rest (`CachePlan`). On one machine
`write_text_cache` encodes them in this process; `leapalign embed --actors N` hands them to Ray Data actors
(leapalign.distributed.data_jobs), each shard's batches the same, so the caches are identical.

The fingerprint is the sha256 over the sha256 of every file in text_encoder/, text_encoder_2/, tokenizer/ and
tokenizer_2/ of a local folder (what decides the embeddings besides max_sequence_length and dtype): contents,
not paths or mtimes, so a copied or moved model folder still matches and a retrained encoder with the same
shapes does not. The folder is read once per process (about 5-10 s for T5-XXL); a weight file in a Hugging
Face cache snapshot is a link to a blob named by that same sha256, so it costs no reading. A hub id is
fingerprinted by the commit its revision resolves to, which pins every file without fetching the encoders.

Why one file over 500 lines: the format is written and read here, side by side (shards, index, manifest,
fingerprint, the partial folder's request): a field changed in one place and not the other breaks every cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from leapalign.io import atomic_path

if TYPE_CHECKING:
    from leapalign.config import Config

log = logging.getLogger("leapalign")

FORMAT = "leapalign-text-cache/1"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
MANIFEST, INDEX, PLAN, SHARD_NAME = "manifest.json", "index.parquet", "plan.json", "shard-{:05d}.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
# (real path, size, mtime_ns) -> sha256: a process reads a model file once, whoever asks.
_file_digests: dict[tuple[str, int, int], str] = {}


class TextCacheError(ValueError):
    """The cache cannot serve this run (missing prompt, other model, other length or dtype); says how to fix it."""


# ----------------------------------------------------------------------------- model fingerprint


def file_sha256(path: Path) -> str:
    """sha256 of a file's content; a Hugging Face cache blob's name already is it (no read)."""
    real = path.resolve()
    if path.is_symlink() and real.parent.name == "blobs" and _SHA256_NAME.fullmatch(real.name):
        return real.name  # LFS files: blob name = sha256 of the content
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        with real.open("rb") as f:
            _file_digests[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _file_digests[key]


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub id (and revision) resolves to: it pins every file, and costs one small download."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["model_index.json"])).name


def model_fingerprint(path: str, revision: str | None = None) -> dict[str, object]:
    """{"fingerprint": sha256, "files": {name: digest}} of the text components of a Flux model.

    A local folder: the sha256 of every file under text_encoder*/ and tokenizer*/. A hub id: its commit
    (nothing of the text encoders is fetched; pin model.revision to keep a cache valid across pushes).
    """
    from leapalign.data import resolve_model_path

    local = resolve_model_path(path)
    folder = Path(local)
    if not folder.is_dir():
        files = {f"hub:{local}": hub_commit(local, revision)}
    else:
        found = [f for name in TEXT_COMPONENTS for f in sorted((folder / name).rglob("*")) if f.is_file()]
        files = {f.relative_to(folder).as_posix(): file_sha256(f) for f in found}
    if not files:
        raise FileNotFoundError(
            f"{folder} has no {'/, '.join(TEXT_COMPONENTS)}/ folders: not a diffusers Flux folder with text encoders"
        )
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, "files": files}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- writing


@dataclass
class CachePlan:
    """A checked `leapalign embed`: what each shard holds, where the shards are written, which are done.

    Shards are written one by one into `partial` (a hidden folder beside the cache, named after it), each
    atomically (temp file, then rename): a stopped or failed embed keeps its finished shards, and the same
    command run again encodes only the others (`todo`). `plan.json` there says what the shards were made
    for; a partial folder of another request (other prompts, model, length, dtype, shard size) is discarded.
    """

    out_dir: Path
    partial: Path
    prompts: list[str]  # deduplicated, in order
    shard_size: int
    max_sequence_length: int
    dtype: torch.dtype
    model: dict[str, object]  # path, revision, fingerprint, files
    sources: list[str]
    request: dict[str, object] = field(default_factory=dict)  # what plan.json records
    stale: bool = False  # the partial folder holds another request's shards

    @property
    def num_shards(self) -> int:
        return -(-len(self.prompts) // self.shard_size)

    def shard_prompts(self, number: int) -> list[str]:
        return self.prompts[number * self.shard_size : (number + 1) * self.shard_size]

    def shard_path(self, number: int) -> Path:
        return self.partial / SHARD_NAME.format(number)

    @property
    def todo(self) -> list[int]:
        """Shard numbers not yet written (a written shard is complete: it appeared by a rename)."""
        return [n for n in range(self.num_shards) if self.stale or not self.shard_path(n).is_file()]


def plan_text_cache(
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    model_path: str,
    revision: str | None,
    max_sequence_length: int,
    dtype: torch.dtype,
    sources: Sequence[str],
    shard_size: int = 256,
    overwrite: bool = False,
) -> CachePlan:
    """Check the request (destination, sizes, prompts, model) and open its partial folder, keeping the shards
    an interrupted run of the same request finished. Nothing is encoded here."""
    out_dir = Path(out_dir)
    check_cache_destination(out_dir, overwrite)
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: use >= 1")
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ValueError("no prompts to embed: give at least one prompt file with a non-empty line")
    model = {"path": model_path, "revision": revision, **model_fingerprint(model_path, revision)}
    plan = CachePlan(
        out_dir, out_dir.with_name(f".{out_dir.name}.partial"), unique, shard_size, max_sequence_length,
        dtype, model, list(sources),
    )  # fmt: skip
    plan.request = {
        "format": FORMAT,
        "fingerprint": model["fingerprint"],
        "max_sequence_length": max_sequence_length,
        "dtype": dtype_name(dtype),
        "shard_size": shard_size,
        "prompts": hashlib.sha256(json.dumps(unique).encode()).hexdigest(),
    }
    record = plan.partial / PLAN
    if plan.partial.is_dir() and (not record.is_file() or json.loads(record.read_text()) != plan.request):
        plan.stale = True  # shards of another request: discarded by open(), not read by todo
    return plan


def open_partial(plan: CachePlan) -> None:
    """Create the partial folder (discarding one of another request) and record the request: the first write
    of an embed, after every check."""
    if plan.stale:
        log.info("%s holds shards of another embed request: starting over", plan.partial)
        shutil.rmtree(plan.partial)
        plan.stale = False
    plan.partial.mkdir(parents=True, exist_ok=True)
    if not (plan.partial / PLAN).is_file():
        with atomic_path(plan.partial / PLAN) as tmp:
            tmp.write_text(json.dumps(plan.request, indent=2))


def encode_shard(
    encode: Callable[[list[str]], tuple[Tensor, Tensor]], prompts: Sequence[str], batch_size: int
) -> dict[str, Tensor]:
    """One shard's tensors: prompt_embeds [n, L, D_t5], pooled_prompt_embeds [n, D_clip], encoded
    `batch_size` prompts per call (the batches are the same whoever encodes the shard)."""
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        prompt_embeds, pooled_prompt_embeds = encode(list(prompts[i : i + batch_size]))
        embeds.append(prompt_embeds.detach().cpu())
        pooled.append(pooled_prompt_embeds.detach().cpu())
    return {
        "prompt_embeds": torch.cat(embeds).contiguous(),  # [n, L, D_t5]
        "pooled_prompt_embeds": torch.cat(pooled).contiguous(),  # [n, D_clip]
    }


def write_shard(plan: CachePlan, number: int, tensors: dict[str, Tensor]) -> Path:
    """Shard `number` into the partial folder, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    length = tensors["prompt_embeds"].shape[1]
    if length != plan.max_sequence_length:
        raise ValueError(
            f"encode returned {length} tokens per prompt, expected max_sequence_length={plan.max_sequence_length}"
        )
    for name, tensor in tensors.items():  # e.g. a GPU's bfloat16 planned, a CPU actor's float32 made
        if tensor.dtype != plan.dtype:
            raise ValueError(f"shard {number}: {name} is {tensor.dtype}, the cache is {plan.dtype}")
    count = len(plan.shard_prompts(number))
    if tensors["prompt_embeds"].shape[0] != count:
        raise ValueError(
            f"shard {number}: {tensors['prompt_embeds'].shape[0]} embeddings for {count} prompts"
        )
    path = plan.shard_path(number)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "num_prompts": str(count)})
    return path


def finish_text_cache(plan: CachePlan) -> Path:
    """Index and manifest of a plan whose every shard is written; the partial folder becomes the cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors import safe_open

    if plan.todo:
        raise RuntimeError(
            f"{len(plan.todo)} of {plan.num_shards} shards are not written yet: {plan.partial}"
        )
    shapes: dict[str, dict[str, object]] = {}
    with safe_open(str(plan.shard_path(0)), framework="pt", device="cpu") as shard:
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            tensor = shard.get_slice(name)
            # every shard is the plan's dtype (write_shard): the header gives the shape
            shapes[name] = {"shape": list(tensor.get_shape()[1:]), "dtype": dtype_name(plan.dtype)}
    index_shard = [n for n in range(plan.num_shards) for _ in plan.shard_prompts(n)]
    index_row = [r for n in range(plan.num_shards) for r in range(len(plan.shard_prompts(n)))]
    index = pa.table(
        {
            "prompt": pa.array(plan.prompts, pa.string()),
            "shard": pa.array(index_shard, pa.int32()),
            "row": pa.array(index_row, pa.int32()),
        }
    )
    pq.write_table(index, plan.partial / INDEX)
    manifest = {
        "format": FORMAT,
        "model": plan.model,
        "max_sequence_length": plan.max_sequence_length,
        "dtype": dtype_name(plan.dtype),
        "tensors": shapes,
        "num_prompts": len(plan.prompts),
        "shard_size": plan.shard_size,
        "shards": [SHARD_NAME.format(n) for n in range(plan.num_shards)],
        "sources": plan.sources,
    }
    (plan.partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for leftover in [plan.partial / PLAN, *plan.partial.glob(".*.tmp*")]:  # the request; killed writes' temps
        leftover.unlink()
    replace_folder(plan.partial, plan.out_dir)
    return plan.out_dir


def write_text_cache(
    encode: Callable[[list[str]], tuple[Tensor, Tensor]],
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    model_path: str,
    revision: str | None,
    max_sequence_length: int,
    dtype: torch.dtype,
    sources: Sequence[str],
    shard_size: int = 256,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Embed `prompts` (deduplicated, in order) with `encode` in this process and write a cache folder at
    `out_dir` (resumable: see CachePlan). leapalign.distributed.data_jobs does the same on Ray Data actors.

    encode(prompts) -> (prompt_embeds [B, L, D_t5], pooled_prompt_embeds [B, D_clip]): what
    FluxPipeline.encode_prompt returns for this model, max_sequence_length and dtype.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use >= 1")
    plan = plan_text_cache(
        prompts, out_dir, model_path=model_path, revision=revision, max_sequence_length=max_sequence_length,
        dtype=dtype, sources=sources, shard_size=shard_size, overwrite=overwrite,
    )  # fmt: skip
    open_partial(plan)
    for number in tqdm(plan.todo, desc="embed", unit="shard", disable=not progress):
        write_shard(plan, number, encode_shard(encode, plan.shard_prompts(number), batch_size))
    return finish_text_cache(plan)


def check_cache_destination(out_dir: Path, overwrite: bool) -> None:
    """Never replace a folder that is not a text cache; replace a cache only when asked."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file()):
        raise FileExistsError(f"{out_dir} exists and is not a text cache: choose another output folder")
    if (out_dir / MANIFEST).is_file() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a text cache: add --overwrite to replace it")


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target` by renames (an old `target` is removed only after the new one is in place)."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


# ----------------------------------------------------------------------------- reading


class TextCache:
    """A cache folder opened for reading: the index in memory, shard rows read on demand."""

    def __init__(self, folder: str | Path):
        import pyarrow.parquet as pq

        self.folder = Path(folder).expanduser()
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"model.text_cache={str(folder)!r} is not a text cache (no {manifest_path}); build one with "
                f"`leapalign embed TRAIN_PROMPTS [EVAL_PROMPTS] {folder} --config CONFIG`, or set model.text_cache=null"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TextCacheError(
                f"{self.folder}: format {self.manifest.get('format')!r}, this version reads {FORMAT!r}; "
                f"rebuild it with leapalign embed ... --overwrite"
            )
        index = pq.read_table(self.folder / INDEX).to_pydict()
        self.index = {
            p: (s, r) for p, s, r in zip(index["prompt"], index["shard"], index["row"], strict=True)
        }  # prompt -> (shard, row)
        self.max_sequence_length = int(self.manifest["max_sequence_length"])
        self.dtype = DTYPES[self.manifest["dtype"]]
        self._shards: dict[int, object] = {}  # shard number -> safe_open handle (memory-mapped)

    def __len__(self) -> int:
        return len(self.index)

    def rebuild_command(self, *extra_sources: str, **model: object) -> str:
        """The `leapalign embed` line that rebuilds this cache (with more prompt files or model settings)."""
        settings = {
            "model": self.manifest["model"]["path"],
            "max-sequence-length": self.max_sequence_length,
            "dtype": self.manifest["dtype"],
            **{k.replace("_", "-"): v for k, v in model.items()},
        }
        flags = " ".join(f"--{k} {v}" for k, v in settings.items())
        sources = " ".join([*self.manifest["sources"], *extra_sources])
        return f"leapalign embed {sources} {self.folder} {flags} --overwrite"

    # ------------------------------------------------------------------ checks (cheap first)

    def check_max_sequence_length(self, max_sequence_length: int) -> None:
        if max_sequence_length != self.max_sequence_length:
            raise TextCacheError(
                f"text cache {self.folder} holds embeddings for max_sequence_length={self.max_sequence_length}, "
                f"this run uses model.max_sequence_length={max_sequence_length}: set "
                f"model.max_sequence_length={self.max_sequence_length}, or rebuild the cache: "
                + self.rebuild_command(max_sequence_length=max_sequence_length)
            )

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype != self.dtype:
            raise TextCacheError(
                f"text cache {self.folder} holds {self.manifest['dtype']} embeddings, this run loads the model "
                f"in {dtype_name(dtype)} (model.dtype): set model.dtype={self.manifest['dtype']}, or rebuild "
                f"the cache: " + self.rebuild_command(dtype=dtype_name(dtype))
            )

    def check_model(self, path: str, revision: str | None = None) -> None:
        """The model's text components must be the ones the cache was built from (contents, not paths)."""
        cached = self.manifest["model"]
        current = model_fingerprint(path, revision)
        if current["fingerprint"] == cached["fingerprint"]:
            return
        old, new = cached["files"], current["files"]
        differs = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise TextCacheError(
            f"text cache {self.folder} was built from model {cached['path']!r} (text fingerprint "
            f"{cached['fingerprint'][:12]}), model.path={path!r} has other text components (fingerprint "
            f"{current['fingerprint'][:12]}; differing: {', '.join(differs[:4])}"
            f"{' ...' if len(differs) > 4 else ''}): rebuild the cache: " + self.rebuild_command(model=path)
        )

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """The prompts (deduplicated, in order) that the cache does not hold."""
        return [p for p in dict.fromkeys(prompts) if p not in self.index]

    # ------------------------------------------------------------------ lookups

    def _shard(self, number: int):
        if number not in self._shards:
            from safetensors import safe_open

            self._shards[number] = safe_open(
                str(self.folder / self.manifest["shards"][number]), framework="pt", device="cpu"
            )
        return self._shards[number]

    def lookup(
        self, prompts: Sequence[str], max_sequence_length: int, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """prompt_embeds [B, L, D_t5], pooled_prompt_embeds [B, D_clip] and text_ids [L, 3] (zeros), as
        FluxPipeline.encode_prompt returns them for these prompts."""
        self.check_max_sequence_length(max_sequence_length)
        missing = self.missing(prompts)
        if missing:
            raise TextCacheError(
                f"prompt {missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} is not "
                f"in the text cache {self.folder} ({len(self)} prompts from {', '.join(self.manifest['sources'])}); "
                f"add the prompt file that holds it and rebuild: " + self.rebuild_command("PROMPT_FILE")
            )
        embeds, pooled = [], []
        for prompt in prompts:
            number, row = self.index[prompt]
            shard = self._shard(number)
            embeds.append(shard.get_slice("prompt_embeds")[row : row + 1])  # [1, L, D_t5]
            pooled.append(shard.get_slice("pooled_prompt_embeds")[row : row + 1])  # [1, D_clip]
        prompt_embeds = torch.cat(embeds).to(device)
        pooled_prompt_embeds = torch.cat(pooled).to(device)
        # encode_prompt makes text_ids in the CLIP encoder's dtype, the dtype of the pooled embedding.
        text_ids = torch.zeros(max_sequence_length, 3, device=device, dtype=pooled_prompt_embeds.dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids


# ----------------------------------------------------------------------------- a run's prompts


def run_prompt_sets(cfg: Config) -> dict[str, list[str]]:
    """Every prompt a `leapalign train` run encodes, by prompt file: all training prompts (the sampler and the
    sample grids draw from them) and the held-out prompts that evaluation uses (before/after and during)."""
    from leapalign.data import load_prompts

    sets = {cfg.train.prompts: load_prompts(cfg.train.prompts)}
    if cfg.eval.prompts:
        used = max(cfg.eval.num_prompts, cfg.eval.every_num_prompts)
        sets[cfg.eval.prompts] = [*sets.get(cfg.eval.prompts, []), *load_prompts(cfg.eval.prompts)[:used]]
    return sets


def run_device(cfg: Config) -> torch.device:
    """Where the run's model lives (model.dtype=auto depends on it): Ray GPU workers, else this machine's."""
    cuda = cfg.ray.use_gpu if cfg.ray.enabled else torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def check_run_text_cache(cfg: Config) -> TextCache:
    """model.text_cache serves this run: its length, dtype, every prompt, then the model (hashing: last)."""
    from leapalign.data import pick_dtype

    assert cfg.model.text_cache is not None
    cache = TextCache(cfg.model.text_cache)
    cache.check_max_sequence_length(cfg.model.max_sequence_length)
    cache.check_dtype(pick_dtype(cfg.model.dtype, run_device(cfg)))
    for source, prompts in run_prompt_sets(cfg).items():
        missing = cache.missing(prompts)
        if missing:
            raise TextCacheError(
                f"text cache {cache.folder} lacks {len(missing)} of the {len(set(prompts))} prompts this run uses "
                f"from {source} (e.g. {missing[0]!r}); rebuild it with every prompt file of the run: "
                + cache.rebuild_command(*([source] if source not in cache.manifest["sources"] else []))
            )
    cache.check_model(cfg.model.path, cfg.model.revision)
    return cache
