"""Specs of many-run experiments: `leapalign sweep` (a search over config keys) and `leapalign compare`
(methods x seeds at an equal compute budget). Plain Python: parsed and checked here, before any Ray
starts; leapalign.distributed.tune_runner runs them as Ray Tune trials, leapalign.reports writes the report.

A sweep spec (YAML; paths relative to the spec file):

    name: world_leap                    # outputs/sweeps/<name>, the MLflow parent run's name
    base: ../quickstart.yaml            # the run config every trial starts from
    overrides: {train.iterations: 60}   # dotted keys applied to every trial
    search:                             # dotted keys -> a distribution
      leap.distribution: {choice: [uniform, sigma_range, beta]}
      method.leapalign.alpha: {uniform: [0.0, 1.0]}
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      leap.beta_a: {uniform: [0.5, 4.0], when: {leap.distribution: beta}}   # only used when it applies
      train.seed: {grid: [0, 1]}
    searcher: random                    # grid | random | optuna
    num_samples: 8                      # random/optuna: trials (default 8); grid: repeats (default 1)
    metric: eval/overall                # what the searcher and the scheduler optimise (must be reported)
    mode: max
    scheduler: {name: asha, grace_period: 20, reduction_factor: 2}   # or {name: fifo}

A compare spec:

    name: world_methods
    base: ../quickstart.yaml
    overrides: {eval.every_nfe: 5000}
    budget_nfe: 40000                   # every run stops once it has used this much compute
    seeds: [0, 1, 2]
    metric: eval/overall
    runs:                               # label -> dotted overrides
      LeapAlign: {method.name: leapalign}
      GRPO: {method.name: grpo, optim.lr: 3.0e-4}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leapalign.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    with_cli_overrides,
    with_overrides,
)
from leapalign.training import check_run_inputs

SEARCHERS = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


# ----------------------------------------------------------------------------- search spaces


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key: a distribution and, optionally, the condition under which it applies."""

    key: str  # dotted config key
    kind: str  # uniform | loguniform | randint | choice | grid
    values: tuple[Any, ...]  # (low, high) for uniform/loguniform/randint; the options for choice/grid
    when: dict[str, Any] = field(default_factory=dict)  # {dotted key: value}: applied only when all hold

    def active(self, params: dict[str, Any], base: dict[str, Any]) -> bool:
        return all(params.get(key, base.get(key)) == value for key, value in self.when.items())


def parse_param(key: str, raw: Any) -> ParamSpec:
    where = f"search.{key}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: give a mapping such as {{uniform: [0, 1]}} or {{choice: [a, b]}}")
    raw = dict(raw)
    when = raw.pop("when", {}) or {}
    if not isinstance(when, dict):
        raise ConfigError(
            f"{where}.when: give a mapping of dotted keys to values, e.g. {{leap.distribution: beta}}"
        )
    if len(raw) != 1:
        raise ConfigError(
            f"{where}: name exactly one distribution out of {', '.join(DISTRIBUTIONS)}; got {sorted(raw)}"
        )
    ((kind, values),) = raw.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: give a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(f"{where}.{kind}: give [low, high] as two numbers, got {values}")
        low, high = values
        if not low < high:
            raise ConfigError(
                f"{where}.{kind}: the range [{low}, {high}] is empty or inverted; need low < high"
            )
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}.loguniform: low={low} must be > 0")
        if kind == "randint" and not all(float(v).is_integer() for v in values):
            raise ConfigError(f"{where}.randint: give integer bounds, got {values}")
    return ParamSpec(key, kind, tuple(values), dict(when))


def check_search_space(base: Config, search: dict[str, ParamSpec]) -> None:
    """Every key exists in the config and every value the distribution can produce is a valid value."""
    flat = base_flat(base)
    for spec in search.values():
        for key in spec.when:
            if key not in flat and key not in search:
                raise ConfigError(f"search.{spec.key}.when: {key!r} is not a config key")
        samples = list(spec.values)
        if spec.kind == "randint":
            samples = [int(spec.values[0]), int(spec.values[1]) - 1]
        for value in samples:
            try:
                with_overrides(base, {spec.key: value, **spec.when})
            except ConfigError as err:
                raise ConfigError(f"search.{spec.key}: {err}") from None


def base_flat(cfg: Config) -> dict[str, Any]:
    from leapalign.config import flatten_config

    return flatten_config(cfg)


def active_overrides(params: dict[str, Any], search: dict[str, ParamSpec], base: Config) -> dict[str, Any]:
    """The sampled params whose `when` condition holds (the others would not change the run)."""
    flat = base_flat(base)
    return {
        key: value for key, value in params.items() if key not in search or search[key].active(params, flat)
    }


# ----------------------------------------------------------------------------- metrics a config reports


STEP_METRICS = (
    "loss",
    "reward/mean",
    "reward/std",
    "grad_norm",
    "compute/nfe",
    "compute/nfe_total",
    "time/step_s",
)


def reported_metrics(cfg: Config) -> set[str]:
    """Metric names every step (or every evaluation) of a run with this config reports."""
    names = set(STEP_METRICS)
    if cfg.eval.during_training:
        from leapalign.evaluation import is_world_prompt_set, load_eval_prompts

        if cfg.eval.reward:
            names.add(f"eval/reward/{cfg.reward.name}")
        if is_world_prompt_set(load_eval_prompts(cfg.eval.prompts, cfg.eval.every_num_prompts)):
            from leapalign.world.scenes import CATEGORIES

            names |= {"eval/overall", "eval/image_accuracy", *(f"eval/{c}" for c in CATEGORIES)}
    return names


def check_metric(metric: str, cfgs: list[Config]) -> None:
    for cfg in cfgs:
        names = reported_metrics(cfg)
        if metric not in names:
            hint = ""
            if metric.startswith("eval/") and not cfg.eval.during_training:
                hint = " (held-out metrics need eval.prompts and eval.every or eval.every_nfe)"
            raise ConfigError(
                f"metric {metric!r} is never reported by runs of this config{hint}; reported: "
                f"{', '.join(sorted(names))}"
            )


# ----------------------------------------------------------------------------- specs


def _read_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"spec file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"spec file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"spec file {path} must hold a mapping (name:, base:, ...)")
    return raw


def _base_config(raw: dict[str, Any], spec_path: Path, config_overrides: list[str]) -> Config:
    base_path = raw.get("base")
    if not base_path:
        raise ConfigError(f"{spec_path}: `base:` names the run config every trial starts from")
    base_file = (spec_path.parent / base_path).resolve()
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{spec_path}: `overrides:` must map dotted keys to values")
    cfg = with_overrides(load_config(base_file), overrides)
    return with_cli_overrides(cfg, config_overrides)


def _check_keys(raw: dict[str, Any], allowed: set[str], path: Path) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{path}: unknown spec key(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}"
        )


@dataclass
class SweepSpec:
    name: str
    path: Path
    base: Config
    search: dict[str, ParamSpec]
    searcher: str = "random"
    num_samples: int = 8
    metric: str = "eval/overall"
    mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "fifo"})
    seed: int = 0


def load_sweep_spec(path: str | Path, config_overrides: list[str] | None = None) -> SweepSpec:
    path = Path(path)
    raw = _read_spec(path)
    _check_keys(
        raw,
        {
            "name",
            "base",
            "overrides",
            "search",
            "searcher",
            "num_samples",
            "metric",
            "mode",
            "scheduler",
            "seed",
        },
        path,
    )
    base = _base_config(raw, path, config_overrides or [])
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict) or not search_raw:
        raise ConfigError(f"{path}: `search:` must map at least one dotted config key to a distribution")
    search = {key: parse_param(key, value) for key, value in search_raw.items()}
    check_search_space(base, search)
    check_run_inputs(base)
    searcher = raw.get("searcher", "random")
    if searcher not in SEARCHERS:
        raise ConfigError(f"{path}: unknown searcher {searcher!r}; choose one of {', '.join(SEARCHERS)}")
    if searcher == "grid":
        bad = [s.key for s in search.values() if s.kind not in ("grid", "choice")]
        if bad:
            raise ConfigError(
                f"{path}: searcher grid needs grid/choice values; {', '.join(bad)} are distributions"
            )
    scheduler = raw.get("scheduler") or {"name": "fifo"}
    if not isinstance(scheduler, dict) or scheduler.get("name") not in SCHEDULERS:
        raise ConfigError(
            f"{path}: unknown scheduler {scheduler!r}; use {{name: fifo}} or {{name: asha, ...}}"
        )
    unknown = set(scheduler) - {"name", "grace_period", "reduction_factor", "max_t"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown scheduler option(s) {sorted(unknown)}; asha takes grace_period, reduction_factor, max_t"
        )
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode={mode!r}; use max or min")
    num_samples = raw.get("num_samples", 1 if searcher == "grid" else 8)  # grid: every point once
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"{path}: num_samples={num_samples!r}; use an integer >= 1")
    spec = SweepSpec(
        name=str(raw.get("name") or path.stem),
        path=path,
        base=base,
        search=search,
        searcher=searcher,
        num_samples=num_samples,
        metric=str(raw.get("metric", "eval/overall")),
        mode=mode,
        scheduler=dict(scheduler),
        seed=int(raw.get("seed", 0)),
    )
    check_metric(spec.metric, [base])
    return spec


@dataclass
class CompareSpec:
    name: str
    path: Path
    base: Config  # the spec's base config with its overrides and the command line's
    runs: dict[str, dict[str, Any] | Path]  # label -> dotted overrides of base, or a config file of its own
    seeds: list[int]
    budget_nfe: int
    metric: str = "eval/overall"
    overrides: dict[str, Any] = field(default_factory=dict)  # the spec's overrides (every run)
    cli_overrides: list[str] = field(default_factory=list)  # the command line's (every run, last)

    def run_config(self, label: str, seed: int) -> Config:
        run = self.runs[label]
        if isinstance(run, Path):  # a method's own config file: the spec's shared overrides go on top
            cfg = with_cli_overrides(with_overrides(load_config(run), self.overrides), self.cli_overrides)
        else:
            cfg = with_cli_overrides(with_overrides(self.base, run), self.cli_overrides)
        return with_overrides(cfg, {"train.seed": seed, "train.max_nfe": self.budget_nfe})


def load_compare_spec(
    path: str | Path,
    config_overrides: list[str] | None = None,
    *,
    budget_nfe: int | None = None,
    seeds: list[int] | None = None,
    labels: list[str] | None = None,
) -> CompareSpec:
    """Parse and check a compare spec; every run's config is built (and so validated) here."""
    from leapalign.methods import update_nfe_range

    path = Path(path)
    raw = _read_spec(path)
    _check_keys(raw, {"name", "base", "overrides", "runs", "seeds", "budget_nfe", "metric"}, path)
    base = _base_config(raw, path, config_overrides or [])
    runs_raw = raw.get("runs") or {}
    if not isinstance(runs_raw, dict) or not runs_raw:
        raise ConfigError(
            f"{path}: `runs:` must map labels to dotted overrides (e.g. GRPO: {{method.name: grpo}})"
        )
    runs: dict[str, dict[str, Any] | Path] = {}
    for label, run in runs_raw.items():
        if isinstance(run, str):  # a config file, relative to the spec
            run_path = (path.parent / run).resolve()
            if not run_path.is_file():
                raise ConfigError(f"{path}: run {label!r}: config file {run_path} does not exist")
            runs[str(label)] = run_path
        elif isinstance(run, dict) or run is None:
            runs[str(label)] = dict(run or {})
        else:
            raise ConfigError(
                f"{path}: run {label!r} must be a config file path or a mapping of dotted overrides"
            )
    if labels:
        missing = sorted(set(labels) - set(runs))
        if missing:
            raise ConfigError(f"unknown run label(s) {missing}; {path} has {sorted(runs)}")
        runs = {label: runs[label] for label in labels}
    seeds = list(seeds if seeds is not None else raw.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds={seeds!r}; give a non-empty list of integers")
    budget = budget_nfe if budget_nfe is not None else raw.get("budget_nfe")
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError(
            f"{path}: budget_nfe={budget!r}; give the compute budget per run in image forward-equivalents"
        )
    spec = CompareSpec(
        str(raw.get("name") or path.stem),
        path,
        base,
        runs,
        seeds,
        budget,
        str(raw.get("metric", "eval/overall")),
    )
    configs = []
    for label in runs:
        try:
            cfg = spec.run_config(label, seeds[0])
        except ConfigError as err:
            raise ConfigError(f"{path}: run {label!r}: {err}") from None
        workers = cfg.ray.num_workers if cfg.ray.enabled else 1
        lowest = update_nfe_range(cfg)[0] * workers
        if budget < lowest:
            raise ConfigError(
                f"budget_nfe={budget} cannot fit one update of run {label!r} ({lowest} image forward-equivalents "
                f"with {workers} worker(s)); raise budget_nfe or shrink train.batch_size / the method's steps"
            )
        if cfg.train.iterations * update_nfe_range(cfg)[1] * workers < budget:
            raise ConfigError(
                f"run {label!r}: train.iterations={cfg.train.iterations} ends before budget_nfe={budget} is spent "
                f"(at most {update_nfe_range(cfg)[1] * workers} per update); raise train.iterations"
            )
        configs.append(cfg)
    for cfg in {(c.model.path, c.train.prompts, c.eval.prompts, c.reward.name): c for c in configs}.values():
        check_run_inputs(cfg)
    check_metric(spec.metric, configs)
    return spec


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
