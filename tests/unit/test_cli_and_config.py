"""The real entry point: exact two-step losses, bad input, config layering, and no Ray in the core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leapalign.config import ConfigError, flatten_config, load_config, with_overrides
from tests.conftest import REPO, TINY_CONFIG, leapalign_main, tiny_overrides

# Measured once on this code (CPU, fp32, seed 0, train.cpu_isa=avx2: the same AVX2 kernels on every x86-64
# CPU) and pinned: any change to the math, the random streams or the defaults shows up here. The first loss
# comes before any optimizer step and is pinned tightly; the second (after one AdamW step, where the last
# bits of a gradient can flip a sign) at 1e-4, with run-to-run identity checked exactly elsewhere.
EXPECTED_TWO_STEP_LOSSES = [1.918647050857544, 1.6614084243774414]


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leapalign", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_two_step_cli_run_gives_exact_losses(tiny_flux_dir, tmp_path):
    out = tmp_path / "run"
    # One process: the Ray path gives the same numbers (tests/integration/test_ray_train.py).
    overrides = tiny_overrides(tiny_flux_dir, out, **{"train.iterations": 2, "ray.enabled": "false"})
    code, err = leapalign_main("train", str(TINY_CONFIG), *overrides)
    assert code == 0, f"CLI failed: {err[-2000:]}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == [1, 2], f"steps logged: {[r['step'] for r in records]}"
    assert losses[0] == pytest.approx(EXPECTED_TWO_STEP_LOSSES[0], rel=1e-6), f"first loss {losses}"
    assert losses[1] == pytest.approx(EXPECTED_TWO_STEP_LOSSES[1], rel=1e-4), f"second loss {losses}"
    for name in ("config.yaml", "samples_before.png", "samples_after.png", "lora", "lora_ema"):
        assert (out / name).exists(), f"{name} missing from the run folder"
    saved = load_config(out / "config.yaml")
    assert saved.train.iterations == 2 and saved.model.path == str(tiny_flux_dir), "resolved config not saved"


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("unknown key", ["method.leapalign.alpah=0.3"], "unknown config key(s) method.leapalign.alpah"),
        ("alpha out of range", ["method.leapalign.alpha=1.5"], "outside [0, 1]"),
        ("moved key", ["method.alpha=0.1"], "method.alpha is now method.leapalign.alpha"),
        ("unknown method", ["method.name=dpo"], "method.name='dpo': choose one of leapalign, refl"),
        ("unknown method option", ["method.grpo.clip=0.2"], "unknown config key(s) method.grpo.clip"),
        ("bad method option", ["method.grpo.group_size=1"], "a group needs >= 2 images"),
        ("resolution", ["sampler.height=40"], "multiple of 16"),
        ("wrong type", ["train.batch_size=two"], "expected an integer"),
        ("missing model", ["model.path=./no/such/model"], "model folder './no/such/model' not found"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tiny_flux_dir, tmp_path, case, extra, message):
    out = tmp_path / "run"
    code, stderr = leapalign_main("train", str(TINY_CONFIG), *tiny_overrides(tiny_flux_dir, out), *extra)
    assert code == 2, f"{case}: exit code {code}, stderr {stderr[-500:]}"
    assert message in stderr, f"{case}: message should contain {message!r}, got {stderr[-500:]!r}"
    assert "Traceback" not in stderr, f"{case}: a user error must not print a traceback"
    assert not out.exists(), f"{case}: the run folder must not be created"


def test_malformed_yaml_and_empty_prompts(tiny_flux_dir, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  path: [unclosed\n")
    code, stderr = leapalign_main("train", str(bad_yaml))
    assert code == 2 and "not valid YAML" in stderr, f"malformed YAML: {stderr[-500:]}"

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "run"
    code, stderr = leapalign_main(
        "train", str(TINY_CONFIG), *tiny_overrides(tiny_flux_dir, out), f"train.prompts={empty}"
    )
    assert code == 2 and "holds no prompts" in stderr, f"empty prompts: {stderr[-500:]}"
    assert not out.exists(), "no run folder for an empty prompt file"


def test_config_layers_defaults_yaml_overrides(tmp_path):
    cfg = load_config(
        TINY_CONFIG, ["method.leapalign.alpha=0.1", "finetune.lora_target_modules=[to_q, to_k]"]
    )
    assert cfg.method.leapalign.alpha == 0.1 and cfg.method.options.alpha == 0.1, "override beats YAML"
    assert cfg.sampler.height == 32, "YAML beats defaults"
    assert cfg.optim.beta2 == 0.999, "defaults fill the rest"
    assert cfg.finetune.lora_target_modules == ("to_q", "to_k"), "lists become tuples"
    flat = flatten_config(cfg)
    assert flat["method.leapalign.alpha"] == 0.1 and flat["leap.distribution"] == "uniform", "dotted keys"
    assert flat["method.grpo.clip_range"] == 1e-4, "every method's section is a dotted key too"
    swept = with_overrides(cfg, {"leap.distribution": "beta", "leap.beta_a": 2})
    assert swept.leap.distribution == "beta" and swept.leap.beta_a == 2.0, "sweep overrides apply"
    with pytest.raises(ConfigError, match="unknown config key"):
        with_overrides(cfg, {"leap.shape": 2})
    with pytest.raises(ConfigError, match="leap.gap=12 must be < sampler.num_steps=10"):
        with_overrides(cfg, {"leap.distribution": "fixed_gap", "leap.gap": 12})


def test_help_and_module_entry_point():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "build-tiny" in proc.stdout, proc.stdout
    script = str(Path(sys.executable).with_name("leapalign"))
    exe = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert exe.returncode == 0 and "LeapAlign" in exe.stdout, "the `leapalign` console script must work"


def test_core_never_imports_ray():
    """Every module outside leapalign/distributed imports without ray (ruff's banned imports check the
    source; this checks what importing them really loads)."""
    package = REPO / "platform" / "leapalign"
    core = sorted(
        "leapalign." + ".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
        for p in package.rglob("*.py")
        if "distributed" not in p.parts and p.name != "__main__.py"
    )
    code = (
        f"import sys, {', '.join(core)}\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the core imported ray: {proc.stderr[-1000:]}"


def test_every_shipped_config_and_spec_is_valid():
    from leapalign.experiments import load_compare_spec, load_sweep_spec

    configs = sorted((REPO / "experiments").rglob("*.yaml"))
    checked = []
    for path in configs:
        head = path.read_text().splitlines()[0]
        if path.parent.name == "compare":
            spec = load_compare_spec(path)
            assert len(spec.runs) >= 2 and next(iter(spec.budget.values())) > 0, (
                f"{path}: >= 2 runs, a budget"
            )
        elif path.parent.name == "sweeps":
            spec = load_sweep_spec(path)
            assert spec.search, f"{path}: a search space"
        else:
            load_config(path)
        if path.name != "base.yaml":
            assert head.startswith("# ") and ("leapalign" in head or "ray job submit" in head), (
                f"{path}: the first line is the launch command, got {head!r}"
            )
        checked.append(path.name)
    assert {"world_methods.yaml", "world_ablations.yaml", "world_leap.yaml", "leapalign_hpsv2.yaml"} <= set(
        checked
    ), f"shipped experiments: {checked}"


def test_concurrent_trials_leave_room_for_the_reward_replicas():
    """A sweep on 2 CPUs with a served reward (1 CPU) runs one trial at a time: more trial functions
    would start workers that only wait for CPUs the replica holds."""
    from leapalign.distributed.tune_runner import max_concurrent_trials, per_trial_resources

    cfg = with_overrides(load_config(REPO / "experiments" / "tiny_demo.yaml"), {"ray.cpus_per_worker": 0.9})
    assert per_trial_resources(cfg) == {"CPU": pytest.approx(0.91)}, "trial function + one worker"
    served = with_overrides(cfg, {"reward.serve": True, "reward.cpus_per_replica": 1.0})
    in_worker = with_overrides(cfg, {"reward.serve": False})
    assert max_concurrent_trials(served, {"CPU": 2.0}) == 1, "2 CPUs - 1 for the replica hold one trial"
    assert max_concurrent_trials(in_worker, {"CPU": 2.0}) == 2, "without the replica: two trials"
    assert max_concurrent_trials(served, {"CPU": 8.0}) == 7, "8 - 1 CPUs hold seven 0.91-CPU trials"
    assert max_concurrent_trials(served, {"CPU": 0.5}) == 1, (
        "at least one trial (Ray then says what is missing)"
    )


def test_sweep_num_samples_defaults_to_one_pass_of_a_grid(tiny_flux_dir, tmp_path):
    """A grid searcher runs every grid point once unless num_samples says more; random/optuna draw 8."""
    import yaml

    from leapalign.experiments import load_sweep_spec

    for searcher, values, expected in (
        ("grid", {"grid": [0.0, 1.0]}, 1),
        ("random", {"uniform": [0.0, 1.0]}, 8),
    ):
        spec = {
            "base": str(REPO / "experiments" / "tiny_demo.yaml"),
            "overrides": {"model.path": str(tiny_flux_dir)},
            "search": {"method.leapalign.alpha": values},
            "searcher": searcher,
            "metric": "loss",
            "mode": "min",
        }
        path = tmp_path / f"{searcher}.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert load_sweep_spec(path).num_samples == expected, f"{searcher}: default num_samples {expected}"
