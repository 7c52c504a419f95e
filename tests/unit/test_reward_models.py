"""The reward registry and the published scorers (PickScore, HPSv2.1, CLIPScore, aesthetic) on tiny random
models written in each ORIGINAL checkpoint format, loaded through the real loaders, scored against a
reference computation of the original formula on the same weights:

- PickScore: transformers CLIPProcessor + CLIPModel on uint8 PIL images, logit_scale.exp() * cos.
- HPSv2.1: an open_clip state dict {"state_dict": ...} in a .pt file; the reference is open_clip's
  VisionTransformer / TextTransformer forward re-implemented below in plain torch on the raw state dict
  (this is what validates the open_clip -> transformers mapping).
- Aesthetic: CLIP image embeds -> L2 normalise -> the MLP head's affine layers by hand.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from leapalign.rewards import REWARD_PATHS, RewardError, available_rewards, build_reward
from leapalign.rewards.aesthetic import AestheticScore
from leapalign.rewards.checkpoints import CheckpointError, check_open_clip_state_dict, infer_clip_config
from leapalign.rewards.clip_score import ClipScore, HPSv21, PickScore
from leapalign.rewards.convert import add_subparser
from leapalign.rewards.preprocess import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from tests.unit.test_preprocess import hpsv2_reference, torchvision_reference

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a red cat", "a blue dog on a sofa", "two cats"]
# Tiny towers; the real ViT-H-14 is width 1280 x 32 layers (vision), 1024 x 24 (text), embed 1024.
IMAGE, PATCH, WIDTH, LAYERS, HEADS, EMBED = 16, 4, 32, 2, 2, 16


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable character table (byte-level BPE)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_clip_tokenizer():
    """A byte-level CLIP BPE in OpenAI's layout: 256 bytes, 256 bytes + </w>, merges, then
    <|startoftext|>, <|endoftext|> as the LAST ids (open_clip pools text at argmax(token id))."""
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in sorted({w for p in PROMPTS for w in p.split()}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1], *pieces[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=77
    )


def tiny_clip_config(vocab_size: int, hidden_act: str):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=77,
                         hidden_act=hidden_act, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1, projection_dim=EMBED),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_act=hidden_act,
                           projection_dim=EMBED),
        projection_dim=EMBED,
    )  # fmt: skip


def save_random_clip(folder: Path, vocab_size: int, hidden_act: str, seed: int) -> Path:
    """A random CLIPModel saved as the Hub repos hold it (config.json + model.safetensors); LayerNorms and
    biases randomised too, so every mapped tensor matters."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(vocab_size, hidden_act))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def write_processor(folder: Path, tokenizer, resample: int = 3) -> Path:
    """Tokenizer files + preprocessor_config.json in the old feature-extractor form the laion repo uses."""
    import json

    tokenizer.save_pretrained(folder)
    config = {"crop_size": IMAGE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_IMAGE_MEAN),
              "image_std": list(CLIP_IMAGE_STD), "resample": resample, "size": IMAGE}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return folder


def random_open_clip_state_dict(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """An open_clip CLIP ViT state dict with open_clip's own key names and layouts, random values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, centre=0.0):
        return centre + scale * torch.randn(*shape, generator=g)

    grid = IMAGE // PATCH
    sd = {"visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH), "visual.class_embedding": rand(WIDTH),
          "visual.positional_embedding": rand(grid * grid + 1, WIDTH), "visual.proj": rand(WIDTH, EMBED),
          "token_embedding.weight": rand(vocab_size, WIDTH), "positional_embedding": rand(77, WIDTH, scale=0.05),
          "text_projection": rand(WIDTH, EMBED), "logit_scale": torch.tensor(math.log(100.0))}  # fmt: skip
    for norm in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[f"{norm}.weight"], sd[f"{norm}.bias"] = rand(WIDTH, scale=0.1, centre=1.0), rand(WIDTH, scale=0.1)
    for prefix in ("visual.", ""):
        for i in range(LAYERS):
            b = f"{prefix}transformer.resblocks.{i}."
            for norm in ("ln_1", "ln_2"):
                sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"] = (
                    rand(WIDTH, scale=0.1, centre=1.0),
                    rand(WIDTH, scale=0.1),
                )
            sd[f"{b}attn.in_proj_weight"], sd[f"{b}attn.in_proj_bias"] = (
                rand(3 * WIDTH, WIDTH),
                rand(3 * WIDTH),
            )
            sd[f"{b}attn.out_proj.weight"], sd[f"{b}attn.out_proj.bias"] = rand(WIDTH, WIDTH), rand(WIDTH)
            sd[f"{b}mlp.c_fc.weight"], sd[f"{b}mlp.c_fc.bias"] = rand(4 * WIDTH, WIDTH), rand(4 * WIDTH)
            sd[f"{b}mlp.c_proj.weight"], sd[f"{b}mlp.c_proj.bias"] = rand(WIDTH, 4 * WIDTH), rand(WIDTH)
    return sd


# ------------------------------------------------------------ open_clip's forward, in plain torch


def _resblock(x, sd, b, mask):
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x)); nn.MultiheadAttention."""
    batch, tokens, width = x.shape
    head_dim = width // HEADS
    y = F.layer_norm(x, (width,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], eps=1e-5)
    q, k, v = (y @ sd[b + "attn.in_proj_weight"].T + sd[b + "attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, HEADS, head_dim).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(head_dim) + mask).softmax(dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + attended @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
    y = F.layer_norm(x, (width,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], eps=1e-5)
    hidden = F.gelu(y @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])  # ViT-H-14: nn.GELU
    return x + hidden @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]


def open_clip_encode_image(sd, pixel_values):
    x = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=PATCH)  # [B, W, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    for i in range(LAYERS):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", 0.0)
    pooled = F.layer_norm(x[:, 0], (WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return F.normalize(pooled @ sd["visual.proj"], dim=-1)


def open_clip_encode_text(sd, tokens):
    """tokens [B, 77], zero-padded like open_clip's tokenize(); pooled at argmax (the end-of-text id)."""
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    mask = torch.full((77, 77), float("-inf"), dtype=x.dtype).triu(1)  # causal
    for i in range(LAYERS):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", mask)
    x = F.layer_norm(x, (WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    return F.normalize(x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ sd["text_projection"], dim=-1)


def open_clip_tokens(tokenizer, prompts):
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    return torch.tensor([row + [0] * (77 - len(row)) for row in rows])


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """Tokenizer + laion-style preprocessor_config.json: what laion/CLIP-ViT-H-14-laion2B-s32B-b79K ships."""
    return write_processor(tmp_path_factory.mktemp("processor"), build_clip_tokenizer())


@pytest.fixture(scope="module")
def vocab_size(tokenizer_dir):
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory, vocab_size):
    """Like yuvalkirstain/PickScore_v1: config.json + weights, no processor files."""
    return save_random_clip(tmp_path_factory.mktemp("pickscore"), vocab_size, "gelu", seed=1)


@pytest.fixture(scope="module")
def hps_state_dict(vocab_size):
    return random_open_clip_state_dict(vocab_size, seed=2)


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory, hps_state_dict):
    """Like HPS_v2.1_compressed.pt: torch.save({"state_dict": open_clip state dict})."""
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": hps_state_dict}, path)
    return path


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory, vocab_size):
    """Like openai/clip-vit-large-patch14 (quick_gelu, its processor config) + the head's .pth state dict."""
    root = tmp_path_factory.mktemp("aesthetic")
    clip_dir = save_random_clip(root / "clip", vocab_size, "quick_gelu", seed=3)
    write_processor(clip_dir, build_clip_tokenizer())
    g = torch.Generator().manual_seed(4)
    widths = [EMBED, 1024, 128, 64, 16, 1]
    head = {}
    for n, index in enumerate((0, 2, 4, 6, 7)):
        head[f"layers.{index}.weight"] = torch.randn(widths[n + 1], widths[n], generator=g) / math.sqrt(
            widths[n]
        )
        head[f"layers.{index}.bias"] = 0.1 * torch.randn(widths[n + 1], generator=g)
    torch.save(head, root / "sac+logos+ava1-l14-linearMSE.pth")
    return clip_dir, root / "sac+logos+ava1-l14-linearMSE.pth"


def uint8_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def as_batch(images):
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images]).float() / 255


# --------------------------------------------------------------------------------------- registry


def test_importing_rewards_does_not_import_transformers():
    code = "import sys, leapalign.rewards as r; r.build_reward('color_match'); print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "platform"), "PATH": ""},
        check=True,
    )
    assert out.stdout.strip() == "False", f"transformers imported eagerly: {out.stdout} {out.stderr[-500:]}"


def test_registry_names_resolve_and_unknown_names_list_them():
    expected = {
        "color_match",
        "brightness",
        "clip_score",
        "pickscore",
        "hpsv2.1",
        "aesthetic",
        "world_layout",
    }
    assert expected <= set(REWARD_PATHS), f"missing registry entries: {expected - set(REWARD_PATHS)}"
    with pytest.raises(ValueError) as info:
        build_reward("hpsv3")
    assert all(name in str(info.value) for name in expected), f"the error must list the names: {info.value}"
    from leapalign.rewards.base import resolve_reward

    for name in sorted(expected):
        assert callable(resolve_reward(name)), f"{name} -> {REWARD_PATHS[name]} must resolve to a factory"
    assert set(available_rewards()) >= expected, "available_rewards lists every table entry"


def test_plugins_by_import_path_and_bad_options():
    plugin = build_reward("leapalign.rewards.simple:Brightness")
    value = plugin(torch.full((1, 3, 4, 4), 0.5), ["x"])
    assert value.item() == pytest.approx(0.5), f"a plugin path builds the factory: brightness {value}"
    with pytest.raises(ValueError, match="could not be imported"):
        build_reward("no_such_package.rewards:Thing")
    with pytest.raises(ValueError, match="no callable 'Nope'"):
        build_reward("leapalign.rewards.simple:Nope")
    with pytest.raises(ValueError, match="bad reward.options"):
        build_reward("pickscore", {"scael": "cosine"})  # checked before any weights load


# -------------------------------------------------------------------------------------- PickScore


def test_pickscore_matches_clipprocessor_and_clipmodel(pickscore_dir, tokenizer_dir):
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(tokenizer_dir)
    model = CLIPModel.from_pretrained(pickscore_dir).eval()
    reward = build_reward(
        "pickscore",
        {"path": str(pickscore_dir), "processor_path": str(tokenizer_dir), "scale": "logit", "device": "cpu"},
    )
    # At the model's size the processor only rescales: exact. Resized, it rounds to uint8 twice (we do not).
    for sizes, bound in [([(IMAGE, IMAGE)] * 3, 1e-4), ([(40, 24), (24, 40), (23, 31)], 0.03)]:
        arrays = uint8_images(sizes, seed=len(sizes[0]))
        expected = []
        with torch.no_grad():  # the PickScore README's computation, one image at a time (mixed sizes)
            text = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_embs = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
            for i, array in enumerate(arrays):
                pixels = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
                image_embs = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
                expected.append(model.logit_scale.exp() * (text_embs[i] @ image_embs[0]))
        expected = torch.stack(expected)
        with torch.no_grad():
            ours = torch.cat([reward(as_batch([a]), [p]) for a, p in zip(arrays, PROMPTS, strict=True)])
        diff = (ours - expected).abs().max().item()
        assert diff < bound, (
            f"PickScore {sizes}: max |ours - original| = {diff:.2e} (scores {expected.tolist()})"
        )
    cosine = PickScore(pickscore_dir, processor_path=str(tokenizer_dir), scale="cosine", device="cpu")
    images = as_batch(uint8_images([(IMAGE, IMAGE)] * 3))
    with torch.no_grad():
        ratio = reward(images, PROMPTS) / cosine(images, PROMPTS)
    assert torch.allclose(ratio, model.logit_scale.exp().expand(3), rtol=1e-5), f"logit / cosine = {ratio}"
    assert len(cosine._text_embeds) == 3, "one cached text embedding per distinct prompt"


# ---------------------------------------------------------------------------------------- HPSv2.1


def test_hpsv21_matches_open_clip_forward_on_the_raw_state_dict(hps_file, hps_state_dict, tokenizer_dir):
    from transformers import AutoTokenizer

    reward = HPSv21(
        hps_file,
        processor_path=str(tokenizer_dir),
        vision_heads=HEADS,
        text_heads=HEADS,
        device="cpu",
        dtype="float64",
    )
    assert reward.model.config.vision_config.hidden_act == "gelu", "ViT-H-14 is GELU, not quick_gelu"
    sd = {k: v.double() for k, v in hps_state_dict.items()}
    tokens = open_clip_tokens(AutoTokenizer.from_pretrained(tokenizer_dir), PROMPTS)
    arrays = uint8_images([(IMAGE, IMAGE), (30, 20), (21, 37)], seed=9)
    with torch.no_grad():
        pixels = torch.stack(
            [torch.from_numpy(hpsv2_reference(a, IMAGE)) for a in arrays]
        )  # HPSv2 preprocess_val
        expected = (open_clip_encode_image(sd, pixels) * open_clip_encode_text(sd, tokens)).sum(-1)
        ours = torch.cat([reward(as_batch([a]).double(), [p]) for a, p in zip(arrays, PROMPTS, strict=True)])
        # The mapping alone: our pixel_values through both networks.
        same_pixels = torch.cat([reward.transform(as_batch([a]).double()) for a in arrays])
        mapped = (
            reward.encode_images(as_batch(arrays[:1]).double())[0] @ open_clip_encode_text(sd, tokens)[0]
        ).item()
        unmapped = (open_clip_encode_image(sd, same_pixels[:1]) @ open_clip_encode_text(sd, tokens)[0]).item()
    assert abs(mapped - unmapped) < 1e-12, f"open_clip -> CLIPModel mapping: {mapped} vs {unmapped}"
    diff = (ours - expected).abs().max().item()
    assert diff < 1e-6, (
        f"HPSv2.1 raw cosine: max |ours - open_clip reference| = {diff:.2e} ({expected.tolist()})"
    )
    assert expected.abs().max() < 1 and expected.std() > 1e-3, f"cosines vary and are cosines: {expected}"


def test_convert_command_writes_a_folder_that_scores_the_same(tmp_path, hps_file, tokenizer_dir):
    parser = argparse.ArgumentParser(prog="leapalign")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "hpsv2.1"
    flags = ["--tokenizer", str(tokenizer_dir), "--vision-heads", str(HEADS), "--text-heads", str(HEADS)]
    args = parser.parse_args(["reward", "convert", str(hps_file), str(out), *flags])
    assert args.func(args) == 0, "the handler returns exit code 0"
    written = sorted(p.name for p in out.iterdir())
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
        assert name in written, f"{name} missing from the converted folder: {written}"
    images = as_batch(uint8_images([(24, 24), (24, 24), (24, 24)], seed=5))
    with torch.no_grad():
        from_folder = build_reward("hpsv2.1", {"path": str(out), "device": "cpu"})(images, PROMPTS)
        from_file = HPSv21(
            hps_file, processor_path=str(tokenizer_dir), vision_heads=HEADS, text_heads=HEADS, device="cpu"
        )(images, PROMPTS)
    assert torch.allclose(from_folder, from_file, atol=1e-6), f"folder {from_folder} vs .pt {from_file}"
    again = parser.parse_args(["reward", "convert", str(hps_file), str(out), *flags])
    with pytest.raises(FileExistsError, match="not an empty folder"):
        again.func(again)


def test_vit_h14_config_is_inferred_from_shapes_alone():
    # ViT-H-14 shapes on the meta device: no memory, the real sizes.
    shapes = {"visual.conv1.weight": (1280, 3, 14, 14), "visual.positional_embedding": (257, 1280),
              "visual.proj": (1280, 1024), "token_embedding.weight": (49408, 1024),
              "positional_embedding": (77, 1024), "text_projection": (1024, 1024)}  # fmt: skip
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    for i in range(32):
        sd[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.empty(5120, 1280, device="meta")
    for i in range(24):
        sd[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.empty(4096, 1024, device="meta")
    config = infer_clip_config(sd)
    v, t = config.vision_config, config.text_config
    got = (
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.image_size,
        v.patch_size,
        v.intermediate_size,
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.eos_token_id,
        config.projection_dim,
        v.hidden_act,
    )
    assert got == (1280, 32, 16, 224, 14, 5120, 1024, 24, 16, 49407, 1024, "gelu"), f"ViT-H-14 config: {got}"
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\)"):
        check_open_clip_state_dict(sd, config, "vit-h")  # only the anchors are present


@pytest.mark.parametrize(
    "case, message",
    [
        ("list", "holds list, not a state dict"),
        ("pickled_object", "weights_only=True"),
        (
            "missing",
            r"missing keys \(2\): \['visual.ln_post.weight', 'transformer.resblocks.1.mlp.c_proj.bias'\]",
        ),
        ("wrong_shape", r"visual.proj \(16, 32\) \(expected \(32, 16\)\)"),
        ("unexpected", r"unexpected keys \(1\).*ls_1.gamma"),
        ("nan", "hold NaN or inf"),
        ("not_open_clip", "not an open_clip CLIP ViT state dict"),
    ],
)
def test_bad_hps_checkpoints_say_what_is_wrong(tmp_path, hps_state_dict, tokenizer_dir, case, message):
    sd = dict(hps_state_dict)
    if case == "missing":
        del sd["visual.ln_post.weight"], sd["transformer.resblocks.1.mlp.c_proj.bias"]
    elif case == "wrong_shape":
        sd["visual.proj"] = sd["visual.proj"].T.contiguous()
    elif case == "unexpected":
        sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    elif case == "nan":
        sd["visual.ln_pre.bias"] = torch.full((WIDTH,), float("nan"))
    elif case == "not_open_clip":
        sd = {"model.diffusion_model.weight": torch.zeros(2)}
    content = {"list": [torch.zeros(2)], "pickled_object": {"state_dict": sd, "args": Namespace(lr=1)}}.get(
        case, {"state_dict": sd}
    )
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        HPSv21(path, processor_path=str(tokenizer_dir), vision_heads=HEADS, text_heads=HEADS, device="cpu")


def test_heads_that_cannot_be_inferred_ask_for_the_option(hps_file, tokenizer_dir):
    with pytest.raises(ValueError, match="pass vision_heads"):
        HPSv21(hps_file, processor_path=str(tokenizer_dir), device="cpu")  # width 32 / head width 64 = 0
    with pytest.raises(ValueError, match="pass processor_path"):
        build_reward("clip_score", {"path": str(hps_file)})  # weights only: no tokenizer next to them


# --------------------------------------------------------------------------------------- CLIPScore


def test_clip_score_scales(pickscore_dir, tokenizer_dir):
    images = as_batch(uint8_images([(IMAGE, IMAGE)] * 3, seed=8))
    scores = {}
    for scale in ("logit", "cosine", "clipscore", 2.5):
        reward = ClipScore(pickscore_dir, scale=scale, processor_path=str(tokenizer_dir), device="cpu")
        with torch.no_grad():
            scores[scale] = reward(images, PROMPTS)
    cos = scores["cosine"]
    assert torch.allclose(scores["logit"], reward.model.logit_scale.exp() * cos, rtol=1e-5), (
        "logit_scale * cos"
    )
    assert torch.allclose(scores["clipscore"], 100 * cos.clamp_min(0), rtol=1e-5), "100 * max(cos, 0)"
    assert torch.allclose(scores[2.5], 2.5 * cos, rtol=1e-5), "a number multiplies the cosine"
    with pytest.raises(ValueError, match="clipscore"):
        ClipScore(pickscore_dir, scale="percent", processor_path=str(tokenizer_dir), device="cpu")


# --------------------------------------------------------------------------------------- aesthetic


def test_aesthetic_matches_normalised_clip_embedding_through_the_head(aesthetic_files):
    from transformers import CLIPModel

    clip_dir, head_file = aesthetic_files
    reward = build_reward(
        "aesthetic", {"head_path": str(head_file), "clip_path": str(clip_dir), "device": "cpu"}
    )
    model = CLIPModel.from_pretrained(clip_dir).eval()
    head = torch.load(head_file, weights_only=True)
    for sizes, bound in [([(IMAGE, IMAGE)] * 2, 1e-5), ([(40, 24), (19, 35)], 2e-3)]:  # uint8 rounding
        arrays = uint8_images(sizes, seed=sizes[0][1])
        pixels = torch.stack([torch.from_numpy(torchvision_reference(a, IMAGE)) for a in arrays]).float()
        with (
            torch.no_grad()
        ):  # simple_inference.py: encode_image, normalise, MLP (Linear layers, no activations)
            x = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            for index in (0, 2, 4, 6, 7):
                x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
            expected = x[:, 0]
            ours = torch.cat([reward(as_batch([a]), ["ignored"]) for a in arrays])
        diff = (ours - expected).abs().max().item()
        assert diff < bound, (
            f"aesthetic {sizes}: max |ours - original| = {diff:.2e} (scores {expected.tolist()})"
        )
    with torch.no_grad():
        together = reward(as_batch(arrays[:1] * 2), ["one prompt", "another prompt"])
    assert torch.allclose(together, ours[:1].expand(2), atol=1e-6), "the aesthetic score ignores the prompt"


def test_aesthetic_head_errors_name_the_fix(tmp_path, aesthetic_files):
    clip_dir, head_file = aesthetic_files
    with pytest.raises(ValueError, match="improved-aesthetic-predictor"):
        AestheticScore(clip_path=str(clip_dir), device="cpu")  # no head_path
    head = torch.load(head_file, weights_only=True)
    del head["layers.7.bias"]
    torch.save(head, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['layers.7.bias'\]"):
        AestheticScore(str(tmp_path / "partial.pth"), clip_path=str(clip_dir), device="cpu")
    widths = [768, 1024, 128, 64, 16, 1]  # a head for CLIP ViT-L/14: the original's sizes
    wide = {}
    for n, index in enumerate((0, 2, 4, 6, 7)):
        wide[f"layers.{index}.weight"] = torch.zeros(widths[n + 1], widths[n])
        wide[f"layers.{index}.bias"] = torch.zeros(widths[n + 1])
    torch.save(wide, tmp_path / "vit-l.pth")
    with pytest.raises(CheckpointError, match="takes 768-dim embeddings but the CLIP model gives 16"):
        AestheticScore(str(tmp_path / "vit-l.pth"), clip_path=str(clip_dir), device="cpu")


# ------------------------------------------------------------------------ gradients and bad input


def build_scorer(name, pickscore_dir, tokenizer_dir, hps_file, aesthetic_files, dtype="float64"):
    if name == "pickscore":
        return PickScore(pickscore_dir, processor_path=str(tokenizer_dir), device="cpu", dtype=dtype)
    if name == "hpsv2.1":
        return HPSv21(
            hps_file,
            processor_path=str(tokenizer_dir),
            vision_heads=HEADS,
            text_heads=HEADS,
            device="cpu",
            dtype=dtype,
        )
    if name == "clip_score":
        return ClipScore(
            pickscore_dir, scale="clipscore", processor_path=str(tokenizer_dir), device="cpu", dtype=dtype
        )
    return AestheticScore(
        str(aesthetic_files[1]), clip_path=str(aesthetic_files[0]), device="cpu", dtype=dtype
    )


@pytest.mark.parametrize("name", ["pickscore", "hpsv2.1", "clip_score", "aesthetic"])
def test_reward_gradients_match_finite_differences(
    name, pickscore_dir, tokenizer_dir, hps_file, aesthetic_files
):
    reward = build_scorer(name, pickscore_dir, tokenizer_dir, hps_file, aesthetic_files)
    # 2 images x 3 x 10 x 14: resize + crop (pad for HPSv2); values away from the [0, 1] clip kinks.
    images = (0.3 + 0.4 * torch.rand(2, 3, 10, 14, generator=torch.Generator().manual_seed(1))).double()
    images.requires_grad_(True)
    prompts = PROMPTS[:2]
    if name == "clip_score":
        with torch.no_grad():
            assert (reward(images, prompts) > 0).all(), (
                "clipscore's max(cos, 0) must be active for this check"
            )
    # The full Jacobian [2, 2 * 3 * 10 * 14]: also checks d r[0] / d image[1] == 0 (per-image rewards).
    assert torch.autograd.gradcheck(lambda x: reward(x, prompts), (images,), eps=1e-6, atol=1e-6), name
    reward(images, prompts).sum().backward()
    leaked = [n for n, p in reward.model.named_parameters() if p.requires_grad or p.grad is not None]
    assert not leaked and images.grad.abs().sum() > 0, f"{name}: grads reach pixels only, not {leaked[:3]}"


@pytest.mark.parametrize("name", ["pickscore", "hpsv2.1", "aesthetic"])
def test_bad_input_and_nan_outputs_are_clear_errors(
    name, pickscore_dir, tokenizer_dir, hps_file, aesthetic_files
):
    reward = build_scorer(name, pickscore_dir, tokenizer_dir, hps_file, aesthetic_files, dtype="float32")
    images = torch.rand(2, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match=r"x / 255"):
        reward(images * 255, PROMPTS[:2])
    with pytest.raises(ValueError, match="permute"):
        reward(images.permute(0, 2, 3, 1), PROMPTS[:2])
    with pytest.raises(ValueError, match="pair up"):
        reward(images, PROMPTS)
    if name != "aesthetic":
        with pytest.raises(ValueError, match="prompt 1 is empty"):
            reward(images, ["a cat", ""])
    with torch.no_grad():
        reward.model.visual_projection.weight[0, 0] = float("nan")  # as an fp16 overflow would
    with pytest.raises(RewardError, match=r"non-finite rewards at batch index \[0, 1\].*dtype='float32'"):
        reward(images, PROMPTS[:2])
