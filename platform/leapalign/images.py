"""Image grids: what people would rather see than read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def make_grid(
    rows: list[torch.Tensor],
    captions: list[str] | None = None,
    row_labels: list[str] | None = None,
    tile: int = 128,
) -> Image.Image:
    """Rows of images ([B, 3, H, W] each, same B) -> one picture; tiles upscaled (nearest) to `tile` px."""
    cols = rows[0].shape[0]
    label_w = 90 if row_labels else 0
    caption_h = 28 if captions else 0
    grid = Image.new("RGB", (label_w + cols * tile, caption_h + len(rows) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(captions or []):
        draw.text((label_w + c * tile + 3, 2), _wrap(text, tile), fill="black")
    for r, images in enumerate(rows):
        if row_labels:
            draw.text((4, caption_h + r * tile + tile // 2 - 6), row_labels[r], fill="black")
        for c, array in enumerate(to_uint8(images)):
            tile_image = Image.fromarray(array).resize((tile, tile), Image.NEAREST)
            grid.paste(tile_image, (label_w + c * tile, caption_h + r * tile))
    return grid


def _wrap(text: str, tile: int) -> str:
    width = max(8, tile // 6)
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:2])


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    grid.save(tmp)
    tmp.replace(path)
    return path
