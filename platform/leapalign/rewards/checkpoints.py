"""Reward weights in their original file formats: torch state-dict files and open_clip CLIP checkpoints.

open_clip -> transformers CLIPModel (HPSv2.1 ships an open_clip ViT-H-14 state dict; HF's CLIPModel is
the same network, module for module):

    open_clip                                        transformers CLIPModel
    visual.conv1.weight                              vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                           vision_model.embeddings.class_embedding
    visual.positional_embedding                      vision_model.embeddings.position_embedding.weight
    visual.ln_pre.*                                  vision_model.pre_layrnorm.*
    {visual.,}transformer.resblocks.N.ln_1.*         {vision,text}_model.encoder.layers.N.layer_norm1.*
        .attn.in_proj_{weight,bias} (q; k; v rows)       .self_attn.{q,k,v}_proj.{weight,bias}
        .attn.out_proj.*                                 .self_attn.out_proj.*
        .ln_2.*                                          .layer_norm2.*
        .mlp.c_fc.*, .mlp.c_proj.*                       .mlp.fc1.*, .mlp.fc2.*
    visual.ln_post.*                                 vision_model.post_layernorm.*
    visual.proj [width, embed]                       visual_projection.weight [embed, width] (transposed)
    token_embedding.weight                           text_model.embeddings.token_embedding.weight
    positional_embedding                             text_model.embeddings.position_embedding.weight
    ln_final.*                                       text_model.final_layer_norm.*
    text_projection [width, embed]                   text_projection.weight [embed, width] (transposed)
    logit_scale                                      logit_scale

The numbers of attention heads are not in the weights (the q/k/v projections pack them): they are
given, or taken from open_clip's model configs (head width 64, except ViT-H 80, ViT-g 88, ViT-bigG 104
in the vision tower). The activation is not in the weights either: ViT-H-14 uses GELU; OpenAI-trained
towers use quick_gelu.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

# open_clip vision head width by tower width (open_clip's model_configs); 64 for every other width.
OPEN_CLIP_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
# open_clip buffers that some versions save and that transformers rebuilds itself (the causal mask).
IGNORED_OPEN_CLIP_KEYS = frozenset({"attn_mask"})
_BLOCK_PARTS = {  # per residual block: open_clip name -> transformers name (q/k/v split separately)
    "ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}  # fmt: skip


class CheckpointError(ValueError):
    """A weights file that is not what the reward expects (format, keys, shapes or values)."""


def load_state_dict_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """A torch state dict from `path`, read with torch.load(weights_only=True).

    Accepts a plain {name: tensor} dict or one wrapped as {"state_dict": {...}} (training checkpoints,
    HPSv2's files), and strips DataParallel's "module." prefix. `what` names the file in errors.
    """
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint: torch.load(weights_only=True) refused it "
            f"({str(err).splitlines()[0]}). Expected {what}; if you trust the file, re-save its weights with "
            "torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} could not be read as a torch file ({err}): expected {what}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(
            f"{path} holds {type(loaded).__name__}{' (empty)' if isinstance(loaded, dict) else ''}, "
            f"not a state dict of tensors: expected {what}"
        )
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: entries {not_tensors[:5]} are not tensors, so this is not a state dict: expected {what}"
        )
    if all(key.startswith("module.") for key in loaded):
        loaded = {key.removeprefix("module."): value for key, value in loaded.items()}
    return loaded


def check_finite_weights(named: dict[str, Tensor], source: str) -> None:
    """A CheckpointError naming the tensors that hold NaN or inf."""
    bad = [name for name, t in named.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} weight tensors hold NaN or inf (first: {bad[:3]}); the file is corrupt or "
            "was saved after training diverged: download it again"
        )


def _count_blocks(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_clip_config(
    state_dict: dict[str, Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
) -> CLIPConfig:
    """transformers CLIPConfig of an open_clip CLIP ViT state dict: sizes from the tensor shapes."""
    from transformers import CLIPConfig

    anchors = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
               "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
               "transformer.resblocks.0.mlp.c_fc.weight"]  # fmt: skip
    missing = [key for key in anchors if key not in state_dict]
    if missing:
        found = ", ".join(list(state_dict)[:4])
        raise CheckpointError(
            f"not an open_clip CLIP ViT state dict: missing {missing} (found keys like {found}); "
            "expected an HPSv2 / open_clip checkpoint such as HPS_v2.1_compressed.pt"
        )
    vision_width, channels, patch_size, patch_w = state_dict["visual.conv1.weight"].shape
    num_positions = state_dict["visual.positional_embedding"].shape[0]
    grid = math.isqrt(num_positions - 1)
    if channels != 3 or patch_size != patch_w or grid * grid != num_positions - 1:
        raise CheckpointError(
            f"visual.conv1.weight {tuple(state_dict['visual.conv1.weight'].shape)} and "
            f"visual.positional_embedding ({num_positions} rows) do not describe a square RGB ViT"
        )
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    embed_dim = state_dict["text_projection"].shape[-1]
    vision_heads = vision_heads or vision_width // OPEN_CLIP_VISION_HEAD_WIDTH.get(vision_width, 64)
    text_heads = text_heads or text_width // 64
    for tower, width, heads in (("vision", vision_width, vision_heads), ("text", text_width, text_heads)):
        if heads < 1 or width % heads:
            raise ValueError(
                f"{tower} width {width} does not split into {heads} attention heads: pass {tower}_heads "
                "(open_clip's model config: width / head_width)"
            )
    if hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(
            f"hidden_act={hidden_act!r}: use 'gelu' (open_clip ViT-H-14) or 'quick_gelu' (OpenAI)"
        )
    return CLIPConfig(
        vision_config=dict(
            hidden_size=vision_width, num_attention_heads=vision_heads, patch_size=patch_size,
            image_size=grid * patch_size, num_hidden_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
            intermediate_size=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            hidden_act=hidden_act, layer_norm_eps=1e-5, projection_dim=embed_dim,
        ),
        text_config=dict(
            vocab_size=vocab_size, hidden_size=text_width, num_attention_heads=text_heads,
            num_hidden_layers=_count_blocks(state_dict, "transformer.resblocks."),
            intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            max_position_embeddings=state_dict["positional_embedding"].shape[0], hidden_act=hidden_act,
            layer_norm_eps=1e-5, projection_dim=embed_dim,
            # open_clip's tokenizer puts <start_of_text>, <end_of_text> last; text is pooled at <end_of_text>
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        ),
        projection_dim=embed_dim,
    )  # fmt: skip


def open_clip_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an open_clip CLIP ViT state dict of this config, with its shape."""
    vision, text, embed = config.vision_config, config.text_config, config.projection_dim
    grid = vision.image_size // vision.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (vision.hidden_size, 3, vision.patch_size, vision.patch_size),
        "visual.class_embedding": (vision.hidden_size,),
        "visual.positional_embedding": (grid * grid + 1, vision.hidden_size),
        "visual.proj": (vision.hidden_size, embed),
        "token_embedding.weight": (text.vocab_size, text.hidden_size),
        "positional_embedding": (text.max_position_embeddings, text.hidden_size),
        "text_projection": (text.hidden_size, embed),
        "logit_scale": (),
    }
    towers = (("visual.", vision, ("visual.ln_pre", "visual.ln_post")), ("", text, ("ln_final",)))
    for prefix, tower, norms in towers:
        width, mlp = tower.hidden_size, tower.intermediate_size
        for norm in norms:
            shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (width,)
        block_shapes = {
            "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
            "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
            "mlp.c_fc.weight": (mlp, width), "mlp.c_fc.bias": (mlp,),
            "mlp.c_proj.weight": (width, mlp), "mlp.c_proj.bias": (width,),
        }  # fmt: skip
        for i in range(tower.num_hidden_layers):
            shapes.update({f"{prefix}transformer.resblocks.{i}.{k}": v for k, v in block_shapes.items()})
    return shapes


def check_open_clip_state_dict(state_dict: dict[str, Tensor], config: CLIPConfig, source: str) -> None:
    """Missing keys, unexpected keys and wrong shapes, all listed in one CheckpointError."""
    expected = open_clip_shapes(config)
    problems = []
    missing = [key for key in expected if key not in state_dict]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:8]}")
    unexpected = [k for k in state_dict if k not in expected and k not in IGNORED_OPEN_CLIP_KEYS]
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}), which transformers' CLIPModel has no place for "
            f"(LayerScale, attention pooling, a timm or HF text tower?): {unexpected[:8]}"
        )
    wrong = [
        f"{key} {tuple(state_dict[key].shape)} (expected {shape})"
        for key, shape in expected.items()
        if key in state_dict
        and tuple(state_dict[key].shape) != shape
        and not (shape == () and state_dict[key].numel() == 1)  # logit_scale saved as [1]
    ]
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {wrong[:8]}")
    if problems:
        raise CheckpointError(
            f"{source} is not a plain open_clip CLIP ViT checkpoint of the size its weights suggest "
            f"(vision {config.vision_config.hidden_size} x {config.vision_config.num_hidden_layers}, text "
            f"{config.text_config.hidden_size} x {config.text_config.num_hidden_layers}): "
            + "; ".join(problems)
        )


def open_clip_to_transformers(state_dict: dict[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """The transformers CLIPModel state dict holding the same numbers (see the module docstring)."""
    sd = state_dict
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_projection.weight": sd["text_projection"].T.contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    norms = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
             "ln_final": "text_model.final_layer_norm"}  # fmt: skip
    for source, target in norms.items():
        out[f"{target}.weight"], out[f"{target}.bias"] = sd[f"{source}.weight"], sd[f"{source}.bias"]
    towers = (("visual.", "vision_model.", config.vision_config), ("", "text_model.", config.text_config))
    for prefix, target_prefix, tower in towers:
        for i in range(tower.num_hidden_layers):
            block, layer = f"{prefix}transformer.resblocks.{i}.", f"{target_prefix}encoder.layers.{i}."
            for part in ("weight", "bias"):
                # nn.MultiheadAttention packs the q, k, v projections as rows of one matrix
                q, k, v = sd[f"{block}attn.in_proj_{part}"].chunk(3, dim=0)
                out[f"{layer}self_attn.q_proj.{part}"] = q.contiguous()
                out[f"{layer}self_attn.k_proj.{part}"] = k.contiguous()
                out[f"{layer}self_attn.v_proj.{part}"] = v.contiguous()
                for source, target in _BLOCK_PARTS.items():
                    out[f"{layer}{target}.{part}"] = sd[f"{block}{source}.{part}"]
    return out


def clip_from_open_clip(
    state_dict: dict[str, Tensor],
    source: str = "open_clip checkpoint",
    dtype: torch.dtype | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
) -> CLIPModel:
    """A transformers CLIPModel with the weights of an open_clip CLIP ViT state dict (checked, then mapped)."""
    from transformers import CLIPModel

    config = infer_clip_config(
        state_dict, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act
    )
    check_open_clip_state_dict(state_dict, config, source)
    check_finite_weights(state_dict, source)
    if dtype is None:  # keep the file's precision (HPS files may be float16)
        dtype = state_dict["visual.conv1.weight"].dtype
    converted = open_clip_to_transformers(state_dict, config)
    # from_pretrained with a state dict: transformers' own loading path (meta-device init, buffers, dtype).
    return CLIPModel.from_pretrained(None, config=config, state_dict=converted, dtype=dtype)
