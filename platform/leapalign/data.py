"""Prompt files: plain text (one prompt per line) or Parquet with a `prompt` column.

Errors say which file and how to fix it; nothing here writes.
"""

from __future__ import annotations

from pathlib import Path

from leapalign.models.flux import PACKAGE_DIR


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
