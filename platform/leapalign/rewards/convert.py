"""`leapalign reward convert`: an open_clip checkpoint (HPS_v2.1_compressed.pt) -> a transformers CLIPModel folder.

    leapalign reward convert HPS_v2.1_compressed.pt models/hpsv2.1
    leapalign train ... reward.name=hpsv2.1 reward.options.path=models/hpsv2.1

The folder holds config.json + model.safetensors (save_pretrained), the tokenizer and a
preprocessor_config.json, so it loads with CLIPModel.from_pretrained / AutoTokenizer.from_pretrained
and needs neither the .pt file nor a tokenizer download at training time. The weights are mapped as in
checkpoints.py and checked first: a wrong file stops with the keys or shapes that are off.
"""

from __future__ import annotations

import argparse
import shutil
import uuid
from pathlib import Path

from leapalign.rewards.checkpoints import clip_from_open_clip, load_state_dict_file
from leapalign.rewards.clip_score import VIT_H_PROCESSOR, check_tokenizer, resolve_dtype
from leapalign.rewards.preprocess import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD


def convert_open_clip_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    tokenizer: str = VIT_H_PROCESSOR,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    dtype: str | None = None,
) -> Path:
    """Write the CLIPModel folder of an open_clip CLIP ViT state-dict file; returns the folder.

    tokenizer: folder or Hub id of the CLIPTokenizer (open_clip's SimpleTokenizer vocabulary);
    dtype: None keeps the file's precision, else "float32", "float16", "bfloat16".
    """
    from transformers import AutoTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a file: download HPS_v2.1_compressed.pt from the Hub repo xswu/HPSv2"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists and is not an empty folder: choose a new folder or remove it"
        )
    # 1. Read, check and map the weights (errors name the keys / shapes that are off).
    state_dict = load_state_dict_file(
        checkpoint, "an open_clip CLIP state dict (e.g. HPS_v2.1_compressed.pt)"
    )
    model = clip_from_open_clip(
        state_dict,
        str(checkpoint),
        dtype=None if dtype is None else resolve_dtype(dtype),
        vision_heads=vision_heads,
        text_heads=text_heads,
        hidden_act=hidden_act,
    )
    try:
        text_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no tokenizer could be loaded from {tokenizer!r} ({err})") from err
    check_tokenizer(text_tokenizer, model, tokenizer)
    # 2. Write into a temporary sibling and rename: a crash never leaves half a model folder.
    image_size = int(model.config.vision_config.image_size)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_IMAGE_MEAN),
        image_std=list(CLIP_IMAGE_STD),
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        text_tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `reward` (with its `convert` command) to the `leapalign` command line; returns its parser."""
    reward = subparsers.add_parser("reward", help="reward model tools (convert weights)")
    commands = reward.add_subparsers(dest="reward_command", required=True)
    p = commands.add_parser(
        "convert",
        help="convert an open_clip checkpoint (HPS_v2.1_compressed.pt) to a transformers CLIPModel folder",
    )
    p.add_argument("checkpoint", help="open_clip state-dict file, e.g. HPS_v2.1_compressed.pt")
    p.add_argument("out_dir", help="new (or empty) folder for the CLIPModel, tokenizer and processor config")
    p.add_argument(
        "--tokenizer",
        default=VIT_H_PROCESSOR,
        help=f"CLIPTokenizer folder or Hub id (default {VIT_H_PROCESSOR})",
    )
    p.add_argument(
        "--vision-heads", type=int, default=None, help="default: from open_clip's configs (ViT-H: 16)"
    )
    p.add_argument("--text-heads", type=int, default=None, help="default: width / 64 (ViT-H-14: 16)")
    p.add_argument("--hidden-act", choices=["gelu", "quick_gelu"], default="gelu", help="ViT-H-14: gelu")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="default: the file's"
    )
    p.set_defaults(func=cmd_reward_convert)
    return reward


def cmd_reward_convert(args: argparse.Namespace) -> int:
    out_dir = convert_open_clip_checkpoint(
        args.checkpoint,
        args.out_dir,
        tokenizer=args.tokenizer,
        vision_heads=args.vision_heads,
        text_heads=args.text_heads,
        hidden_act=args.hidden_act,
        dtype=args.dtype,
    )
    print(f"wrote {out_dir}; use it with reward.name=hpsv2.1 reward.options.path={out_dir}")
    return 0
