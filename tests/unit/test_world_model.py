"""The miniature-world model: pretraining runs end to end and its folder loads like real Flux."""

from __future__ import annotations

import json

import pytest
import torch

from leapalign.models.flux import FluxPolicy
from leapalign.world.evaluate import EvalResult, format_comparison
from leapalign.world.pretrain import PretrainConfig, pretrain
from leapalign.world.prompts import build_prompt_sets, read_prompts, write_prompts


def test_pretrain_smoke_saves_loadable_flux_folder(tmp_path):
    prompts = tmp_path / "train.parquet"
    table, _ = build_prompt_sets(seed=0, n_train=48, n_eval=6)
    write_prompts(table, prompts)
    cfg = PretrainConfig(n_train=48, vae_steps=3, vae_batch=8, flow_steps=3, flow_batch=8)
    stats = pretrain(tmp_path / "mini", cfg, prompt_file=prompts)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), f"non-finite stats {stats}"
    info = json.loads((tmp_path / "mini" / "pretrain.json").read_text())
    assert info["config"]["flow_steps"] == 3, "pretrain.json records the config"
    policy = FluxPolicy.from_pretrained(str(tmp_path / "mini"), device="cpu")
    assert policy.vae.config.scaling_factor == pytest.approx(stats["vae/scaling_factor"]), "latent norm saved"
    images = policy.generate(["a red circle"], num_steps=3, height=32, width=32, guidance_scale=3.5,
                             generator=torch.Generator().manual_seed(0), max_sequence_length=16)  # fmt: skip
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1, "image in [0, 1]"
    with pytest.raises(FileExistsError, match="not empty"):
        pretrain(tmp_path / "mini", cfg, prompt_file=prompts)


def test_shipped_prompt_files_are_the_seeded_split():
    from leapalign.data import resolve_data_path

    train = read_prompts(resolve_data_path("assets/prompts/world/train.parquet"))
    held_out = read_prompts(resolve_data_path("assets/prompts/world/eval.parquet"))
    expected_train, expected_eval = build_prompt_sets(seed=0, n_train=len(train), n_eval=len(held_out))
    assert [r.prompt for r in train] == expected_train.column("prompt").to_pylist(), (
        "train file != seed 0 split"
    )
    assert [r.prompt for r in held_out] == expected_eval.column("prompt").to_pylist(), (
        "eval file != seed 0 split"
    )
    assert not {r.prompt for r in train} & {r.prompt for r in held_out}, (
        "a held-out prompt leaked into training"
    )


def test_format_comparison_reports_per_category_change():
    images = torch.zeros(2, 3, 4, 4)
    before = EvalResult(0.25, 0.3, {"counting": 0.5, "position": 0.0}, 2, images, ["x", "y"])
    after = EvalResult(0.5, 0.6, {"counting": 0.75, "position": 0.25}, 2, images, ["x", "y"])
    table = format_comparison(before, after)
    assert "counting     50.0     75.0    +25.0" in table, table
    assert "overall      25.0     50.0    +25.0" in table, table
    assert before.metrics("eval/before")["eval/before/position"] == 0.0, "metrics are namespaced"
