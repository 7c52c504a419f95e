"""Shared fixtures: a tiny real Flux saved as a diffusers folder, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _quiet() -> None:
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    dl.set_verbosity_error()
    dl.disable_progress_bar()
    tl.set_verbosity_error()
    tl.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from leapalign.models.tiny import build_tiny_flux

    _quiet()
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)


def tiny_overrides(model_dir: Path, out_dir: Path, **extra) -> list[str]:
    """key=value overrides that point experiments/tiny_demo.yaml at test folders, MLflow off."""
    values = {
        "model.path": str(model_dir),
        "train.output_dir": str(out_dir),
        "tracking.enabled": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


TINY_CONFIG = REPO / "experiments" / "tiny_demo.yaml"
