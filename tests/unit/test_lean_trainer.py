"""LeanTorchTrainer: the per-run helper actors this platform's runs do not use are left out, by the class
names of Ray's default callbacks (checked here against Ray's own list, so a Ray release that renames them
fails this test instead of silently starting the helpers again). No cluster is needed: the list is built
from the trainer's configuration."""

from __future__ import annotations

import pytest
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from leapalign.distributed.ray_train import PRIVATE_CLUSTER_ENV, LeanTorchTrainer

HELPERS = {"DatasetsCallback", "PlacementGroupCleanerCallback"}


def names(trainer_cls, **kwargs) -> set[str]:
    trainer = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kwargs)
    return {type(callback).__name__ for callback in trainer._create_default_callbacks()}


def test_ray_starts_both_helpers_by_default(monkeypatch):
    monkeypatch.delenv(PRIVATE_CLUSTER_ENV, raising=False)
    assert HELPERS <= names(TorchTrainer), f"Ray's default callbacks: {sorted(names(TorchTrainer))}"


@pytest.mark.parametrize("private", [False, True])
def test_the_lean_trainer_leaves_out_what_its_runs_do_not_use(monkeypatch, private):
    if private:
        monkeypatch.setenv(PRIVATE_CLUSTER_ENV, "1")
    else:
        monkeypatch.delenv(PRIVATE_CLUSTER_ENV, raising=False)
    got = names(LeanTorchTrainer)
    assert "DatasetsCallback" not in got, "no datasets, no dataset manager"
    assert ("PlacementGroupCleanerCallback" in got) != private, (
        f"the placement-group cleaner only on a shared cluster (private={private}): {sorted(got)}"
    )
    assert names(TorchTrainer) - HELPERS <= got, "every other default callback is kept"


def test_building_the_list_starts_no_ray():
    import ray

    before = ray.is_initialized()
    names(LeanTorchTrainer)
    assert ray.is_initialized() == before, "building the callbacks must not start (or join) a Ray cluster"


def test_a_run_given_datasets_keeps_their_manager(monkeypatch):
    monkeypatch.setenv(PRIVATE_CLUSTER_ENV, "1")
    # A dataset factory, called only when workers start (a Dataset itself would start Ray here).
    got = names(LeanTorchTrainer, datasets={"train": lambda: None})
    assert "DatasetsCallback" in got, f"datasets are sharded by their manager: {sorted(got)}"
