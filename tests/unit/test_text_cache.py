"""Precomputed text conditioning (`leapalign embed`, model.text_cache) on the tiny Flux: cached embeddings are
bit-identical to FluxPipeline.encode_prompt, training from them gives exactly the losses of training with the
encoders (LeapAlign and GRPO) without ever building a text encoder, and a cache that cannot serve a run (missing
prompt, other model, other length or dtype) stops it with a message saying how to rebuild it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import CLIPTextModel, T5EncoderModel

from leapalign.config import load_config
from leapalign.data import load_prompts
from leapalign.finetune import setup_policy
from leapalign.models.flux import FluxPolicy
from leapalign.text_cache import TextCache, TextCacheError, write_text_cache
from leapalign.train import train
from tests.conftest import REPO, TINY_CONFIG, leapalign_main, tiny_overrides

LENGTH = 16  # experiments/tiny_demo.yaml: model.max_sequence_length
FAST = {"sampler.eval_num_steps": 2, "train.num_samples": 1}
EXTRA = ["a red cube", "two green circles left of a blue square"]  # besides the demo prompts


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "leapalign", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def encoder_policy(model_dir) -> FluxPolicy:
    return FluxPolicy.from_pretrained(str(model_dir), dtype="float32", device="cpu")


def build_cache(model_dir, out, prompts, shard_size=3):
    policy = encoder_policy(model_dir)

    def encode(batch):
        cond = policy.encode_prompts(batch, LENGTH)
        return cond.prompt_embeds, cond.pooled_prompt_embeds

    return write_text_cache(
        encode, prompts, out, model_path=str(model_dir), revision=None, max_sequence_length=LENGTH,
        dtype=torch.float32, sources=["demo.txt", "extra.txt"], shard_size=shard_size, batch_size=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo_prompts():
    return load_prompts(load_config(TINY_CONFIG).train.prompts)


@pytest.fixture(scope="module")
def cache_dir(tiny_flux_dir, tmp_path_factory, demo_prompts):
    return build_cache(tiny_flux_dir, tmp_path_factory.mktemp("cache") / "text", [*demo_prompts, *EXTRA])


def cfg_for(model_dir, out_dir, **extra):
    return load_config(TINY_CONFIG, tiny_overrides(model_dir, out_dir, **{**FAST, **extra}))


@pytest.fixture
def count_encoders(monkeypatch):
    """How many CLIPTextModel / T5EncoderModel objects get built (the real __init__ runs; it is only counted)."""
    built = {"CLIPTextModel": 0, "T5EncoderModel": 0}
    for cls in (CLIPTextModel, T5EncoderModel):
        original = cls.__init__

        def counted(self, *args, _original=original, _name=cls.__name__, **kwargs):
            built[_name] += 1
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    return built


def text_modules(policy: FluxPolicy) -> list[str]:
    """Names of every text-encoder module reachable from the policy's pipeline."""
    found = []
    for component in policy.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            found += [
                type(m).__name__
                for m in component.modules()
                if isinstance(m, (CLIPTextModel, T5EncoderModel))
            ]
    return found


def test_cached_embeddings_are_bit_identical_to_encode_prompt(tiny_flux_dir, cache_dir, demo_prompts):
    prompts = [*demo_prompts, *EXTRA]
    unique = list(dict.fromkeys(prompts))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["num_prompts"] == len(unique), f"{manifest['num_prompts']} cached, {len(unique)} unique"
    shards = sorted(p.name for p in cache_dir.glob("shard-*.safetensors"))
    assert len(shards) == math.ceil(len(unique) / 3) == len(manifest["shards"]), (
        f"3 prompts per shard: {shards}"
    )
    cache = TextCache(cache_dir)
    asked = [unique[-1], unique[0], unique[4], unique[0]]  # across shards, out of order, repeated
    cached = cache.lookup(asked, LENGTH, "cpu")
    live = encoder_policy(tiny_flux_dir).pipe.encode_prompt(asked, prompt_2=None, max_sequence_length=LENGTH)
    for name, got, want in zip(
        ("prompt_embeds", "pooled_prompt_embeds", "text_ids"), cached, live, strict=True
    ):
        assert got.dtype == want.dtype and got.shape == want.shape, (
            f"{name}: {got.dtype} {got.shape} vs {want.shape}"
        )
        assert torch.equal(got, want), f"{name}: max |diff| {(got - want).abs().max().item()}"
    assert cached[0].shape == (4, LENGTH, 32), f"prompt_embeds [B, L, D_t5], got {tuple(cached[0].shape)}"


@pytest.mark.parametrize(
    "method, extra",
    [
        ("leapalign", {"train.iterations": 3}),
        # Two updates per rollout: the second one's PPO ratio is not 1, so its loss is not exactly 0.
        ("grpo", {"train.iterations": 2, "method.grpo.group_size": 2, "method.grpo.updates_per_rollout": 2}),
    ],
)
def test_training_from_the_cache_gives_exactly_the_losses_of_training_with_encoders(
    tiny_flux_dir, cache_dir, tmp_path, count_encoders, method, extra
):
    values = {"method.name": method, **extra}
    with_encoders = train(cfg_for(tiny_flux_dir, tmp_path / "encoders", **values), progress=False).history
    assert count_encoders == {"CLIPTextModel": 1, "T5EncoderModel": 1}, (
        f"the encoder run builds both: {count_encoders}"
    )
    cached_cfg = cfg_for(tiny_flux_dir, tmp_path / "cached", **values, **{"model.text_cache": str(cache_dir)})
    from_cache = train(cached_cfg, progress=False).history
    assert count_encoders == {"CLIPTextModel": 1, "T5EncoderModel": 1}, (
        f"the cached run built encoders: {count_encoders}"
    )
    for key in ("loss", "grad_norm", "reward/mean"):
        want, got = [m[key] for m in with_encoders], [m[key] for m in from_cache]
        assert got == want, f"{method} {key}: cache {got} vs encoders {want}"
    assert len(from_cache) == extra["train.iterations"], f"{len(from_cache)} updates"
    assert any(m["loss"] != 0 for m in from_cache), f"a non-trivial comparison: {from_cache}"
    grid = (tmp_path / "cached" / "samples_after.png").read_bytes()
    assert grid == (tmp_path / "encoders" / "samples_after.png").read_bytes(), (
        "sample grids encode prompts too"
    )


def test_a_cached_policy_has_no_text_encoders_or_tokenizers(
    tiny_flux_dir, cache_dir, tmp_path, count_encoders
):
    policy = setup_policy(cfg_for(tiny_flux_dir, tmp_path, **{"model.text_cache": str(cache_dir)}), "cpu")
    pipe = policy.pipe
    loaded = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    assert all(v is None for v in loaded.values()), (
        f"loaded text components: {[k for k, v in loaded.items() if v]}"
    )
    assert text_modules(policy) == [], f"text encoder modules in the policy: {text_modules(policy)}"
    assert sum(count_encoders.values()) == 0, f"text encoders constructed: {count_encoders}"
    cond = policy.encode_prompts(EXTRA, LENGTH)
    assert cond.prompt_embeds.shape == (2, LENGTH, 32) and cond.pooled_prompt_embeds.shape == (2, 32), (
        f"{tuple(cond.prompt_embeds.shape)}, {tuple(cond.pooled_prompt_embeds.shape)}"
    )


def test_a_prompt_missing_from_the_cache_is_named_with_the_fix(tiny_flux_dir, cache_dir):
    policy = FluxPolicy.from_pretrained(
        str(tiny_flux_dir), dtype="float32", device="cpu", text_cache=str(cache_dir)
    )
    with pytest.raises(TextCacheError) as info:
        policy.encode_prompts(["a red cube", "a purple dodecahedron"], LENGTH)
    message = str(info.value)
    assert "'a purple dodecahedron'" in message and "leapalign embed" in message, message
    assert str(cache_dir) in message and "--overwrite" in message, (
        f"says which cache and how to rebuild: {message}"
    )


@pytest.mark.parametrize("which", ["train", "eval"])
def test_cli_refuses_a_run_with_uncached_prompts_before_writing(tiny_flux_dir, cache_dir, tmp_path, which):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na purple dodecahedron\n")
    out = tmp_path / "run"
    key = {"train": "train.prompts", "eval": "eval.prompts"}[which]
    overrides = tiny_overrides(tiny_flux_dir, out, **{"model.text_cache": str(cache_dir), key: str(prompts)})
    proc = run_cli("train", str(TINY_CONFIG), *overrides, "ray.enabled=false", "train.iterations=1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-800:]}"
    assert len(lines) == 1 and "'a purple dodecahedron'" in lines[0], f"one line naming the prompt: {lines}"
    assert "leapalign embed" in lines[0] and str(prompts) in lines[0], f"says how to fix it: {lines[0]}"
    assert not out.exists(), f"nothing written before the check: {sorted(out.rglob('*'))}"


def test_a_cache_for_another_model_length_or_dtype_is_refused(tiny_flux_dir, cache_dir, tmp_path):
    from leapalign.models.tiny import build_tiny_flux

    other = build_tiny_flux(tmp_path / "other-flux", seed=1)  # same shapes, other weights
    with pytest.raises(TextCacheError) as info:
        FluxPolicy.from_pretrained(str(other), dtype="float32", device="cpu", text_cache=str(cache_dir))
    message = str(info.value)
    assert "text_encoder/model.safetensors" in message and str(other) in message, (
        f"says what differs: {message}"
    )
    assert "leapalign embed" in message, message
    moved = shutil.copytree(tiny_flux_dir, tmp_path / "moved-flux")  # same contents, new path and mtimes
    policy = FluxPolicy.from_pretrained(str(moved), dtype="float32", device="cpu", text_cache=str(cache_dir))
    assert policy.text_cache is not None and len(policy.text_cache) == 10, (
        "a moved model folder still matches"
    )
    with pytest.raises(TextCacheError, match=r"max_sequence_length=16.*model.max_sequence_length=32"):
        policy.encode_prompts(EXTRA, 32)
    with pytest.raises(TextCacheError, match=r"holds float32 embeddings.*in float64"):
        FluxPolicy.from_pretrained(
            str(tiny_flux_dir), dtype="float64", device="cpu", text_cache=str(cache_dir)
        )
    overrides = tiny_overrides(tiny_flux_dir, tmp_path / "run", **{"model.text_cache": str(cache_dir)})
    proc = run_cli("train", str(TINY_CONFIG), *overrides, "ray.enabled=false", "model.max_sequence_length=24")
    assert proc.returncode == 2 and "max_sequence_length=16" in proc.stderr, proc.stderr[-800:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists(), proc.stderr


def test_embed_command_writes_shards_atomically(tiny_flux_dir, tmp_path, demo_prompts):
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(EXTRA) + "\n")
    out = tmp_path / "caches" / "text"
    args = [
        str(extra),
        str(out),
        "--config",
        str(TINY_CONFIG),
        "--model",
        str(tiny_flux_dir),
        "--shard-size",
        "4",
    ]
    code, err = leapalign_main("embed", *args)
    assert code == 0, err[-800:]
    unique = list(dict.fromkeys([*demo_prompts, *EXTRA]))
    manifest = json.loads((out / "manifest.json").read_text())
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert len(shards) == math.ceil(len(unique) / 4) == 3, f"{len(unique)} prompts, 4 per shard: {shards}"
    assert (manifest["num_prompts"], manifest["max_sequence_length"], manifest["dtype"]) == (
        len(unique),
        16,
        "float32",
    ), f"{manifest['num_prompts']}, {manifest['max_sequence_length']}, {manifest['dtype']}"
    assert manifest["sources"][-1] == str(extra) and len(manifest["sources"]) == 2, manifest["sources"]
    assert TextCache(out).missing(unique) == [], "every prompt of the config and the extra file is indexed"
    assert sorted(p.name for p in out.parent.iterdir()) == ["text"], "no temp folder left beside the cache"
    before = (out / "manifest.json").read_text()
    code, err = leapalign_main("embed", *args)
    assert code == 2 and "--overwrite" in err, err[-800:]
    assert (out / "manifest.json").read_text() == before, "a refused embed leaves the cache as it was"
    code, err = leapalign_main(
        "embed", str(tmp_path / "nope.txt"), str(tmp_path / "other"), "--model", str(tiny_flux_dir)
    )
    assert code == 2 and "nope.txt" in err, err[-800:]
    assert not (tmp_path / "other").exists(), "nothing written for a missing prompt file"


HUB_SCRIPT = """
import json, sys, torch
from leapalign.models.flux import FluxPolicy
from leapalign.text_cache import model_fingerprint, write_text_cache
snapshot, local, out = sys.argv[1:]
encoders = FluxPolicy.from_pretrained("org/tiny-flux", dtype="float32", device="cpu")
def encode(batch):
    cond = encoders.encode_prompts(batch, 16)
    return cond.prompt_embeds, cond.pooled_prompt_embeds
write_text_cache(encode, ["a red cube"], out, model_path="org/tiny-flux", revision=None, max_sequence_length=16,
                 dtype=torch.float32, sources=["x.txt"])
cached = FluxPolicy.from_pretrained("org/tiny-flux", dtype="float32", device="cpu", text_cache=out)
print(json.dumps({
    "hub": model_fingerprint("org/tiny-flux")["files"],
    "same_as_local": model_fingerprint(snapshot)["fingerprint"] == model_fingerprint(local)["fingerprint"],
    "text_encoder": repr(cached.pipe.text_encoder),
    "equal": torch.equal(cached.encode_prompts(["a red cube"], 16).prompt_embeds,
                         encoders.encode_prompts(["a red cube"], 16).prompt_embeds),
}))
"""


def fake_hub_cache(model_dir, cache, repo="org--tiny-flux", commit="c0ffee" * 6 + "beef"):
    """A Hugging Face cache holding `model_dir` as models--org--tiny-flux at `commit` (blobs + snapshot links)."""
    import hashlib
    import os

    root = cache / f"models--{repo}"
    snapshot = root / "snapshots" / commit
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir()
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = file.read_bytes()
        # LFS files (weights) are stored under their sha256, git files under their sha1, as the hub does.
        lfs = file.suffix == ".safetensors"
        blob = root / "blobs" / (hashlib.sha256(data) if lfs else hashlib.sha1(data)).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot, commit


def test_a_hub_model_is_pinned_by_its_commit_and_never_loads_encoders(tiny_flux_dir, tmp_path):
    snapshot, commit = fake_hub_cache(tiny_flux_dir, tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = [str(snapshot), str(tiny_flux_dir), str(tmp_path / "cache")]
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hub"] == {"hub:org/tiny-flux": commit}, (
        f"a hub id is fingerprinted by its commit: {result}"
    )
    assert result["same_as_local"], (
        "a snapshot (blob links) fingerprints like the same files in a plain folder"
    )
    assert result["text_encoder"] == "None" and result["equal"], (
        f"hub id + cache: no encoders, same embeds {result}"
    )


@pytest.mark.parametrize("command", ["embed", "eval"])
def test_a_bad_actor_pool_stops_before_anything_is_written(tiny_flux_dir, tmp_path, command):
    """--actors 0 (or a negative CPU count): exit 2, one line, no partial folder, no cache, no Ray started."""
    out = tmp_path / "out"
    args = {
        "embed": ["embed", "assets/prompts/demo.txt", str(out), "--model", str(tiny_flux_dir)],
        "eval": ["eval", "base", "assets/prompts/demo.txt", "--config", str(TINY_CONFIG), "--out", str(out),
                 f"model.path={tiny_flux_dir}", "tracking.enabled=false"],
    }[command]  # fmt: skip
    assert leapalign_main(*args, "--actors", "0")[0] == 2, f"{command} --actors 0 must exit 2"
    assert leapalign_main(*args, "--actors", "1", "--cpus-per-actor", "-1")[0] == 2, (
        f"{command}: negative CPUs exit 2"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"nothing written: {list(tmp_path.iterdir())}"
