"""The LAION aesthetic predictor v2 ("improved aesthetic predictor"): a linear MLP head on CLIP ViT-L/14.

Original (christophschuhmann/improved-aesthetic-predictor, simple_inference.py):

    model, preprocess = clip.load("ViT-L/14")          # OpenAI CLIP; preprocess = Resize(224, bicubic),
    image_features = model.encode_image(preprocess(pil))  # CenterCrop(224), ToTensor, Normalize
    score = mlp(image_features / ||image_features||)    # sac+logos+ava1-l14-linearMSE.pth

The head is nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)): no activations, so in eval mode it is one
affine map of the normalised embedding. Its keys are layers.{0,2,4,6,7}.{weight,bias}.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from leapalign.rewards.checkpoints import CheckpointError, check_finite_weights, load_state_dict_file
from leapalign.rewards.clip_score import check_model_output, load_clip
from leapalign.rewards.preprocess import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, check_images, open_clip_transform

AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"  # the weights of OpenAI's `clip.load("ViT-L/14")`
_HEAD_LINEARS = (0, 2, 4, 6, 7)  # Sequential indices of the Linear layers; 1, 3, 5 are Dropout
_HEAD_DROPOUT = (0.2, 0.2, 0.1)
_HOW_TO_GET = (
    f"download {AESTHETIC_HEAD_FILE} from github.com/christophschuhmann/improved-aesthetic-predictor and "
    "pass its path as reward.options.head_path"
)


def load_aesthetic_head(path: str | Path, embed_dim: int) -> AestheticHead:
    """The MLP head from its original .pth state dict, checked against the CLIP embedding size."""
    state_dict = load_state_dict_file(path, f"the aesthetic predictor head ({AESTHETIC_HEAD_FILE})")
    expected = [f"layers.{i}.{part}" for i in _HEAD_LINEARS for part in ("weight", "bias")]
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not an aesthetic predictor head: missing keys {missing}, unexpected keys "
            f"{unexpected[:8]}; expected {expected}. {_HOW_TO_GET}"
        )
    not_matrices = [f"layers.{i}.weight" for i in _HEAD_LINEARS if state_dict[f"layers.{i}.weight"].ndim != 2]
    if not_matrices:
        raise CheckpointError(f"{path}: {not_matrices} are not Linear weight matrices. {_HOW_TO_GET}")
    widths = [state_dict[f"layers.{i}.weight"].shape[1] for i in _HEAD_LINEARS] + [1]  # in-features, then 1
    wrong = [
        f"layers.{i}.weight {tuple(state_dict[f'layers.{i}.weight'].shape)} / bias "
        f"{tuple(state_dict[f'layers.{i}.bias'].shape)} (expected ({widths[n + 1]}, {widths[n]}) / ({widths[n + 1]},))"
        for n, i in enumerate(_HEAD_LINEARS)
        if state_dict[f"layers.{i}.weight"].shape != (widths[n + 1], widths[n])
        or state_dict[f"layers.{i}.bias"].shape != (widths[n + 1],)
    ]
    if wrong:
        raise CheckpointError(f"{path}: the head's layers do not chain: {wrong}")
    if widths[0] != embed_dim:
        raise CheckpointError(
            f"{path} takes {widths[0]}-dim embeddings but the CLIP model gives {embed_dim}: the head belongs to "
            f"CLIP ViT-L/14 ({AESTHETIC_CLIP}, 768); pass the matching clip_path"
        )
    check_finite_weights(state_dict, str(path))
    head = AestheticHead(widths)
    head.load_state_dict(state_dict)
    return head


class AestheticHead(nn.Module):
    """The predictor's MLP, module for module (so its .pth loads with strict key matching)."""

    def __init__(self, widths: list[int]):  # [768, 1024, 128, 64, 16, 1] in the original
        super().__init__()
        linears = [nn.Linear(widths[n], widths[n + 1]) for n in range(len(widths) - 1)]
        self.layers = nn.Sequential(
            linears[0], nn.Dropout(_HEAD_DROPOUT[0]), linears[1], nn.Dropout(_HEAD_DROPOUT[1]),
            linears[2], nn.Dropout(_HEAD_DROPOUT[2]), linears[3], linears[4],
        )  # fmt: skip

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


class AestheticScore:
    """LAION aesthetic predictor v2: r = MLP(CLIP ViT-L/14 image embedding / its norm); ignores the prompt.

    Options: head_path (the .pth file, or a folder / Hub repo holding `head_filename`), clip_path (default
    openai/clip-vit-large-patch14), device, dtype. Scale: the original's, roughly 1-10 (typical generated
    images 5-7). The paper has no aesthetic run: put the hinge lambda above the base model's typical score
    (e.g. 7) rather than take one from another reward's scale.
    """

    name = "aesthetic"

    def __init__(
        self,
        head_path: str | None = None,
        clip_path: str = AESTHETIC_CLIP,
        head_filename: str = AESTHETIC_HEAD_FILE,
        device: str | None = None,
        dtype: str | None = None,
    ):
        if head_path is None:
            raise ValueError(f"the aesthetic reward needs its head weights: {_HOW_TO_GET}")
        loaded = load_clip(clip_path, device=device, dtype=dtype, need_tokenizer=False)
        self.model, self.source = loaded.model, loaded.source
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        head_file = resolve_head_file(head_path, head_filename)
        head = load_aesthetic_head(head_file, int(self.model.config.projection_dim))
        self.head = head.to(self.device, self.dtype).eval().requires_grad_(False)
        # OpenAI clip's own transform: torchvision Resize + CenterCrop on PIL, OpenAI mean / std.
        self.transform = open_clip_transform(
            int(self.model.config.vision_config.image_size), CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
        )

    def encode_images(self, images: Tensor) -> Tensor:
        """Normalised image_embeds [B, D]; keeps the graph to the pixels."""
        pixel_values = self.transform(images.to(self.device)).to(self.dtype)  # [B, 3, S, S]
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output  # [B, hidden]
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1] (prompts only fix B) -> rewards [B] on the images' device."""
        check_images(images, len(prompts))
        rewards = self.head(self.encode_images(images)).squeeze(-1)  # [B]
        check_model_output(rewards, self.name, self.dtype)
        return rewards.to(images.device, images.dtype)


def resolve_head_file(head_path: str | Path, head_filename: str) -> str:
    """A local .pth file, or `head_filename` in a local folder or a Hub repo."""
    from transformers.utils import cached_file

    local = Path(head_path).expanduser()
    if local.is_file():
        return str(local)
    if local.is_dir():
        if (local / head_filename).is_file():
            return str(local / head_filename)
        raise FileNotFoundError(f"{local} has no {head_filename}; {_HOW_TO_GET}")
    try:
        return cached_file(str(head_path), head_filename)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"aesthetic head {head_path!r} not found ({err}); {_HOW_TO_GET}") from None
