"""The CLIP-style reward (ClipScore), the miniature scorer's training pieces, and the shipped scorer."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from leapalign.rewards.base import build_reward
from leapalign.rewards.clip_score import CLIP_IMAGE_MEAN, MINI_SCORER_DIR, ClipScore
from leapalign.world import evaluate_image, parse_caption, render_scene
from leapalign.world.scorer import (
    ScorerRecipe,
    ScorerSpec,
    build_eval_pairs,
    build_scorer_model,
    build_scorer_tokenizer,
    degrade_images,
    encode_texts,
    render_batch,
    roc_auc,
    sample_hard_negative,
    sample_training_scene,
    train_and_save,
    train_scorer,
)

TINY = ScorerSpec(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2,
                  projection_dim=16)  # fmt: skip
PROMPTS = ["a red circle", "two blue squares", "a circle that is cyan and a square that is red"]


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory):
    """A randomly initialised tiny CLIPModel + tokenizer saved as an HF folder, no preprocessor config."""
    tokenizer = build_scorer_tokenizer()
    model = build_scorer_model(TINY, len(tokenizer), seed=0)
    folder = tmp_path_factory.mktemp("clip") / "random-clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ AUC


def test_roc_auc_hand_cases():
    assert roc_auc([0.3, 0.3], [0.3, 0.3, 0.3]) == 0.5, "constant scores: every pair is a tie -> 0.5"
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0, "perfect separation -> 1.0"
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0, "perfectly reversed -> 0.0"
    # Pairs won: 0.9 beats all 3; 0.4 loses to 0.5, ties 0.4, beats 0.1 (1.5); 0.6 beats all 3 -> 7.5 / 9.
    assert roc_auc([0.9, 0.4, 0.6], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9), "hand example with one tie"


def test_roc_auc_matches_pair_counting_with_many_ties():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, size=37), rng.integers(0, 5, size=23)  # heavy ties
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert roc_auc(pos, neg) == pytest.approx(wins / (pos.size * neg.size), abs=1e-12), (
        "U / (n+ n-) = pair win rate"
    )


# ------------------------------------------------------------------------------------------ ClipScore


def test_clip_score_shape_gradient_and_frozen_weights(random_clip_dir):
    reward = ClipScore(random_clip_dir, device="cpu")
    assert reward.image_mean.tolist() == pytest.approx(CLIP_IMAGE_MEAN), (
        "no preprocessor_config -> CLIP defaults"
    )
    assert reward.scale == pytest.approx(reward.model.logit_scale.exp().item()), (
        "default scale = logit_scale.exp()"
    )
    images = torch.rand(3, 3, 40, 48, requires_grad=True)  # not the model's 32 px: exercises resize + crop
    rewards = reward(images, PROMPTS)
    assert rewards.shape == (3,), f"one reward per image, got {tuple(rewards.shape)}"
    assert torch.isfinite(rewards).all(), f"rewards must be finite: {rewards}"
    rewards.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all(), "d reward / d image must be finite"
    assert images.grad.abs().sum() > 0, "d reward / d image must be non-zero"
    assert not reward.model.training, "the reward model must be in eval mode"
    leaked = [n for n, p in reward.model.named_parameters() if p.requires_grad or p.grad is not None]
    assert not leaked, f"no gradient may reach the CLIP weights: {leaked[:3]}"


def test_clip_score_text_cache_equals_fresh_encoding(random_clip_dir):
    reward = ClipScore(random_clip_dir, scale=1.0, device="cpu")
    reward(torch.rand(3, 3, 32, 32), PROMPTS)  # fills the cache, the prompts padded together
    cached = reward.encode_prompts([PROMPTS[2]])
    with torch.no_grad():
        fresh = encode_texts(reward.model, reward.tokenizer, [PROMPTS[2]])  # alone, no padding
    assert len(reward._text_embeds) == 3, "one cache entry per distinct prompt"
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=1e-5, msg="cached text embedding != fresh one")
    images = torch.rand(2, 3, 32, 32)
    value = reward(images, PROMPTS[:2])
    image_embeds = reward.encode_images(images)
    expected = (image_embeds * encode_texts(reward.model, reward.tokenizer, PROMPTS[:2])).sum(-1)
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5, msg="scale=1 reward must be the cosine")


def test_clip_score_rejects_bad_images(random_clip_dir):
    reward = ClipScore(random_clip_dir, device="cpu")
    with pytest.raises(ValueError, match="permute"):
        reward(torch.rand(2, 32, 32, 3), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"x / 255"):
        reward(torch.rand(2, 3, 32, 32) * 255, PROMPTS[:2])
    with pytest.raises(ValueError, match="pair up"):
        reward(torch.rand(2, 3, 32, 32), PROMPTS)


def test_missing_folder_is_a_helpful_file_not_found(tmp_path):
    missing = tmp_path / "no-such-scorer"
    with pytest.raises(FileNotFoundError) as info:
        build_reward("clip_score", {"path": str(missing)})
    message = str(info.value)
    assert str(missing) in message and "python -m leapalign.world.scorer --out" in message, message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ClipScore(tmp_path / "empty")


# ------------------------------------------------------------------------------------ scorer pieces


def test_hard_negatives_are_false_and_captions_true_by_the_exact_evaluator():
    rng = np.random.default_rng(0)
    held_out = frozenset()
    for _ in range(36):
        scene = sample_training_scene(rng, held_out)
        image = render_scene(scene)
        negative, kind = sample_hard_negative(scene, parse_caption(scene.caption), rng)
        assert evaluate_image(image, scene.caption)["correct"], f"own caption must hold: {scene.caption!r}"
        assert not evaluate_image(image, negative)["correct"], (
            f"{kind} negative {negative!r} holds for {scene.caption!r}"
        )


def test_degrade_images_is_seeded_and_stays_in_range():
    scenes = [sample_training_scene(np.random.default_rng(i), frozenset()) for i in range(4)]
    clean = render_batch(scenes, 32)
    first = degrade_images(clean, torch.Generator().manual_seed(3))
    again = degrade_images(clean, torch.Generator().manual_seed(3))
    assert first.shape == clean.shape and torch.equal(first, again), "same seed -> same degraded images"
    assert 0.0 <= first.min() and first.max() <= 1.0, "degraded images stay in [0, 1]"
    assert (first - clean).abs().mean() > 0.01, "degradation must change the images"


def test_twenty_training_steps_lower_the_loss_deterministically():
    recipe = ScorerRecipe(steps=20, batch_size=16, hard_negatives=2, lr=3e-3, warmup_steps=2, seed=0)
    stats = ([0.94, 0.94, 0.94], [0.24, 0.24, 0.23])
    _, _, _, history = train_scorer(TINY, recipe, image_stats=stats, progress=False)
    losses = [h["loss"] for h in history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, f"loss must fall over 20 steps: {losses}"
    _, _, _, rerun = train_scorer(TINY, replace(recipe, steps=3), image_stats=stats, progress=False)
    assert [h["loss"] for h in rerun] == losses[:3], "same seed -> the same loss sequence (CPU)"


def test_train_and_save_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        train_and_save(tmp_path / "taken", TINY, ScorerRecipe(steps=1), progress=False)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"], (
        "the destination must be untouched"
    )


# ------------------------------------------------------------------------------- the shipped scorer


def test_shipped_mini_scorer_ranks_matching_captions_above_hard_negatives():
    assert (MINI_SCORER_DIR / "config.json").is_file(), (
        f"train it: python -m leapalign.world.scorer --out {MINI_SCORER_DIR}"
    )
    reward = build_reward("clip_score", {"path": str(MINI_SCORER_DIR), "device": "cpu"})
    pairs = build_eval_pairs(60, seed=123)  # held-out eval split: every prompt mentions a held-out pair
    images = render_batch([p["scene"] for p in pairs], 32)
    with torch.no_grad():
        match = reward(images, [p["scene"].caption for p in pairs]).numpy()
        hard = reward(images, [p["hard"] for p in pairs]).numpy()
    margin, auc = float(np.mean(match - hard)), roc_auc(match, hard)
    assert margin > 0, (
        f"matching captions must score above one-edit negatives on average, margin {margin:.3f}"
    )
    assert auc >= 0.85, f"held-out hard-negative AUC {auc:.3f} < 0.85"
