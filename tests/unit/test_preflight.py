"""One preflight (leapalign.preflight) for every entry: the same bad input stops `leapalign train` (in this
process and on Ray), the Ray driver that every Ray run and Tune trial goes through, `leapalign compare`
and `leapalign sweep` before anything starts, with the same message; nothing is written."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from leapalign.cli import main
from leapalign.config import load_config, with_cli_overrides
from leapalign.preflight import USER_ERRORS
from tests.conftest import TINY_CONFIG

ENTRIES = ("train here", "train on Ray", "Ray driver", "Tune trial", "compare", "sweep")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def bad_input(case: str, tmp: Path) -> tuple[dict[str, str], str]:
    """(overrides, the message every entry must give) for one kind of bad input."""
    empty = tmp / "empty.txt"
    empty.write_text("\n")
    return {
        "missing model": (
            {"model.path": str(tmp / "no_model")},
            f"model folder {str(tmp / 'no_model')!r} not found",
        ),
        "empty prompts": ({"train.prompts": str(empty)}, f"prompt file {empty} holds no prompts"),
        "missing held-out prompts": (
            {"eval.prompts": str(tmp / "no.txt")},
            f"prompt file {str(tmp / 'no.txt')!r} not found",
        ),
        "unknown reward": ({"reward.name": "no_such_reward"}, "unknown reward 'no_such_reward'"),
        "bad reward option": ({"reward.options": "{bogus: 1}"}, "bad reward.options {'bogus': 1}"),
        "missing text cache": ({"model.text_cache": str(tmp / "no_cache")}, "is not a text cache"),
        "unreachable tracking server": (
            {"tracking.enabled": "true", "tracking.uri": f"http://127.0.0.1:{closed_port()}"},
            "is unreachable",
        ),
    }[case]


INPUTS = ("empty.txt", "spec.yaml")  # what a test writes before the entry runs


def run_entry(entry: str, tmp: Path, model: Path, overrides: dict[str, str], capsys, metric="loss") -> str:
    """The message `entry` stops with: it must stop with a user error before anything starts. metric: a
    spec's (loss: every run reports it)."""
    values = {
        "model.path": str(model),
        "train.output_dir": str(tmp / "run"),
        "tracking.enabled": "false",
        "ray.storage_path": str(tmp / "ray_results"),
        **overrides,
    }
    args = [f"{k}={v}" for k, v in values.items()]
    if entry in ("compare", "sweep"):
        spec = spec_file(entry, tmp, {k: yaml.safe_load(v) for k, v in values.items()}, metric)
        code = main([entry, str(spec), "--out", str(tmp / "out")])
    elif entry.startswith("train"):
        code = main(["train", str(TINY_CONFIG), *args, f"ray.enabled={str(entry == 'train on Ray').lower()}"])
    else:
        from leapalign.distributed.ray_train import run_on_ray
        from leapalign.distributed.tune_runner import TrialPlan, trial_config

        cfg = with_cli_overrides(load_config(TINY_CONFIG), [*args, "ray.enabled=true"])
        if entry == "Tune trial":
            plan = TrialPlan("bad", tmp / "out", cfg, {}, lambda params: cfg, lambda params: {}, "loss")
            cfg = trial_config({}, plan, "trial_0")
        with pytest.raises(USER_ERRORS) as caught:
            run_on_ray(cfg)
        return str(caught.value)
    assert code == 2, f"{entry}: exit {code}"
    return capsys.readouterr().err


def spec_file(kind: str, tmp: Path, overrides: dict, metric: str) -> Path:
    """A compare or sweep spec over experiments/tiny_demo.yaml with these config overrides."""
    spec = {"name": "bad", "base": str(TINY_CONFIG), "metric": metric}
    if kind == "compare":
        overrides = {**overrides, "train.iterations": 100, "eval.every_nfe": 100}
        spec |= {"budget_nfe": 1000, "runs": {"LeapAlign": {}, "ReFL": {"method.name": "refl"}}}
    else:
        spec |= {"search": {"optim.lr": {"grid": [1e-3, 1e-2]}}, "searcher": "grid"}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "overrides": overrides}))
    return path


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "empty prompts",
        "missing held-out prompts",
        "unknown reward",
        "bad reward option",
        "missing text cache",
        "unreachable tracking server",
    ],
)
def test_every_entry_stops_bad_input_with_the_same_message(tiny_flux_dir, tmp_path, capsys, entry, case):
    overrides, message = bad_input(case, tmp_path)
    got = run_entry(entry, tmp_path, tiny_flux_dir, overrides, capsys)
    assert message in got, f"{entry}, {case}: want {message!r} in {got[-600:]!r}"
    assert "Traceback" not in got, f"{entry}, {case}: a user error prints one line"
    written = sorted(p.name for p in tmp_path.iterdir() if p.name not in INPUTS)
    assert written == [], f"{entry}, {case}: nothing may be written, found {written}"


@pytest.mark.parametrize("entry", ["train here", "train on Ray", "Ray driver"])
def test_a_run_never_replaces_an_old_one_silently(tiny_flux_dir, tmp_path, capsys, entry):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    got = run_entry(entry, tmp_path, tiny_flux_dir, {}, capsys)
    want = f"train.output_dir={tmp_path / 'run'} already holds a run (metrics.jsonl); continue it with"
    assert want in got, f"{entry}: {got}"


def test_a_local_resume_needs_a_checkpoint(tiny_flux_dir, tmp_path, capsys):
    got = run_entry("train here", tmp_path, tiny_flux_dir, {"train.resume": "true"}, capsys)
    want = f"train.resume=true but {tmp_path / 'run' / 'checkpoints'} holds no checkpoint"
    assert want in got, got


@pytest.mark.parametrize("entry", ["compare", "sweep"])
def test_a_specs_base_folder_is_not_its_runs_folder(tiny_flux_dir, tmp_path, capsys, entry):
    """Each run of a spec gets a folder of its own: a run in the base config's output folder is no error
    (the spec then stops at its next check, a metric no run reports)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    got = run_entry(entry, tmp_path, tiny_flux_dir, {}, capsys, metric="eval/position")
    assert "is never reported" in got and "already holds" not in got, got
