"""Independent random streams: no stream of one seed equals any stream of another, and the evaluation's
noise belongs to each image, whatever batch it is sampled in."""

from __future__ import annotations

import itertools

import pytest
import torch

from leapalign.methods.common import StepRandomness
from leapalign.streams import STREAMS, PromptOrder, stream, stream_seed


def draws(generator: torch.Generator) -> tuple[int, ...]:
    return tuple(torch.randint(0, 2**31, (16,), generator=generator).tolist())


def test_no_stream_of_one_seed_equals_any_stream_of_another():
    seeds = range(10)
    seen = {(seed, name): draws(stream(seed, name)) for seed in seeds for name in STREAMS}
    for (a, draws_a), (b, draws_b) in itertools.combinations(seen.items(), 2):
        assert draws_a != draws_b, f"streams {a} and {b} draw the same numbers"
    # The old scheme's overlap: seed s's step stream was seed s + 1's noise (and its prompt order).
    for s in seeds:
        mine, next_seed = StepRandomness.seeded(s), StepRandomness.seeded(s + 1)
        assert draws(mine.steps) != draws(next_seed.noise), f"seed {s}'s steps == seed {s + 1}'s noise"
    orders = {tuple(PromptOrder(list(range(50)), 50, s).next_batch()) for s in seeds}
    assert len(orders) == len(seeds), "every seed its own prompt order"


def test_streams_are_fixed_functions_of_seed_and_name():
    assert stream_seed(0, "noise") == stream_seed(0, "noise"), "deterministic"
    assert stream_seed(0, "eval", 0, 5) != stream_seed(0, "eval", 0, 6), "indices make streams"
    # SeedSequence is the same on every platform: a changed value means every run's numbers changed.
    assert stream_seed(0, "noise") == 0x3206281128857082, "SeedSequence(0, crc32('noise')) >> 1, pinned"
    assert 0 <= stream_seed(123, "steps") < 2**63, "a valid torch seed"
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_seed(0, "nosie")
    with pytest.raises(ValueError, match="non-negative"):
        stream_seed(-1, "noise")


def test_evaluation_noise_does_not_depend_on_the_batch(tiny_flux_dir, tmp_path):
    from leapalign.config import load_config
    from leapalign.evaluation import eval_latents, sample_images
    from leapalign.models.flux import FluxPolicy
    from tests.conftest import TINY_CONFIG, tiny_overrides

    cfg = load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path, **{"eval.batch_size": 3}))
    policy = FluxPolicy.from_pretrained(str(tiny_flux_dir), device="cpu")
    whole = eval_latents(policy, cfg, [0, 1, 2, 3], replicate=0)
    parts = torch.cat([eval_latents(policy, cfg, [0, 1], 0), eval_latents(policy, cfg, [2, 3], 0)])
    assert torch.equal(whole, parts), "an image's noise is its own, whatever its batch"
    assert not torch.equal(eval_latents(policy, cfg, [0], 1), whole[:1]), "replicates draw other noise"
    from leapalign.evaluation import noise_set

    # The world's validation split repeats a few test captions: it must not see the test images' noise.
    assert noise_set("assets/prompts/world/validation.parquet") == 1, "validation prompts: noise set 1"
    assert noise_set("assets/prompts/world/eval.parquet") == 0 and noise_set(None) == 0, "everything else: 0"
    assert not torch.equal(eval_latents(policy, cfg, [0], 0, noise=1), whole[:1]), "another noise set"
    prompts = ["a red square", "two blue circles", "a green triangle", "a cube"]
    three, _ = sample_images(policy, cfg, prompts, progress=False)
    cfg_two = load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path, **{"eval.batch_size": 2}))
    two, _ = sample_images(policy, cfg_two, prompts, progress=False)
    assert torch.allclose(three, two, atol=1e-5), f"batches of 3 vs 2: {(three - two).abs().max():.2e}"
