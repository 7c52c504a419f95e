"""What a run reads from disk before any model runs: prompt files and where shipped assets live.

    PACKAGE_DIR          the installed package: shipped assets (mini-flux, mini-scorer, prompt files)
    resolve_model_path   a model folder as given, else under the package, else a hub id
    pick_dtype           model.dtype -> a torch dtype (auto: bf16 on CUDA, fp32 elsewhere)
    load_prompts         plain text (one prompt per line) or Parquet with a `prompt` column
    prompt_split         the split a prompt file declares (train / validation / eval)

Errors say which file and how to fix it; nothing here writes. A leaf of the package: it imports no other
leapalign module but the world's prompt reader (for world prompt files), so anything may import it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PACKAGE_DIR = Path(__file__).resolve().parent
TEST_SPLITS = ("eval", "test")  # splits a search must never select on


def resolve_model_path(path: str) -> str:
    """A local folder (as given, or under the installed package), else the string itself as a hub id.

    Anything that looks like a path (starts with '.', '/', '~' or has more than one '/') must exist:
    a typo should not turn into a confusing hub lookup.
    """
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        return str(candidate)
    packaged = PACKAGE_DIR / path
    if packaged.is_dir():
        return str(packaged)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.sep != "/" and os.sep in path
    if looks_local or candidate.exists():
        raise FileNotFoundError(
            f"model folder {path!r} not found (looked in {candidate.resolve()} and {packaged}). Give a diffusers "
            f"Flux folder (model_index.json + transformer/ vae/ text_encoder*/ tokenizer*/ scheduler/), build a "
            f"tiny one with `leapalign build-tiny DIR`, or a hub id such as black-forest-labs/FLUX.1-dev"
        )
    return path


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """model.dtype as a torch dtype: auto is bf16 on CUDA and fp32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def resolve_data_path(path: str) -> Path:
    """As given (relative to the cwd), else relative to the installed package (shipped assets)."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    packaged = PACKAGE_DIR / path
    if packaged.exists():
        return packaged
    raise FileNotFoundError(
        f"prompt file {path!r} not found (looked in {candidate.resolve()} and {packaged})"
    )


def load_prompts(path: str) -> list[str]:
    """Non-empty prompts from a .txt or .parquet file, in file order."""
    file = resolve_data_path(path)
    if file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(
                f"prompt file {file} is not a readable Parquet file ({err}); regenerate it"
            ) from None
        if "category" in table.column_names:
            # A miniature-world prompt file: every caption is checked against the world's vocabulary.
            from leapalign.world.prompts import read_prompts

            return [record.prompt for record in read_prompts(file)]
        if "prompt" not in table.column_names:
            raise ValueError(f"prompt file {file} has no `prompt` column (columns: {table.column_names})")
        prompts = [str(p).strip() for p in table.column("prompt").to_pylist() if p is not None]
    elif file.suffix in (".txt", ""):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {file} is not UTF-8 text: one prompt per line expected") from None
        prompts = [line.strip() for line in text.splitlines()]
    else:
        raise ValueError(
            f"prompt file {file}: use .txt (one prompt per line) or .parquet (a `prompt` column)"
        )
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompts: add at least one non-empty line or row")
    return prompts


def prompt_split(path: str | os.PathLike[str]) -> str | None:
    """The split a world prompt file declares in its Parquet metadata ("train", "validation", "eval"); the
    path as given or relative to the installed package (shipped assets), like every prompt path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = resolve_data_path(str(path))
    except FileNotFoundError:
        return None
    if source.suffix.lower() != ".parquet" or not source.is_file():
        return None
    try:
        metadata = pq.read_schema(source).metadata or {}
    except (pa.ArrowException, OSError):
        return None
    value = metadata.get(b"split")
    return value.decode() if value else None
