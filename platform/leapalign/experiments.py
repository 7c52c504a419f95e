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
    overrides: {eval.every_nfe: 2000}   # every run (file-based runs too), before the command line's key=value
    budget_flops: 2.0e12                # or budget_nfe: each run stops once it has used this much compute
    seeds: [0, 1, 2, 3, 4]
    metric: eval/overall
    reference: LeapAlign                # the row the others are compared against (default: LeapAlign's)
    target_share: 0.5                   # compute to reach base + 50% of the best method's gain
    runs:                               # label -> dotted overrides, or a config file of its own
      LeapAlign: ../world/leapalign.yaml
      GRPO: {method.name: grpo, optim.lr: 3.0e-4}
    tune:                               # optional: tune every method alike first, then run the seeds
      trials: 6                         # per method
      prompts: assets/prompts/world/validation.parquet   # never the reported (test) split
      seed: 1000                        # the tuning trials' train.seed
      budget_flops: 2.0e12              # per trial (default: the runs' budget)
      space: {optim.lr: {loguniform: [1.0e-4, 3.0e-3]}}  # every method
      per_run: {GRPO: {method.grpo.clip_range: {loguniform: [3.0e-5, 1.0e-3]}}}

Why one file over 500 lines: the two spec formats share their parsing (search spaces, budgets, metric
checks); each format is documented above, beside its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leapalign.config import (
    Config,
    ConfigError,
    _yaml_float,
    config_to_dict,
    flatten_config,
    load_config,
    with_cli_overrides,
    with_overrides,
)
from leapalign.preflight import preflight

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
    flat = flatten_config(base)
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


def active_overrides(params: dict[str, Any], search: dict[str, ParamSpec], base: Config) -> dict[str, Any]:
    """The sampled params whose `when` condition holds (the others would not change the run)."""
    flat = flatten_config(base)
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
    check_selection_prompts(base.eval.prompts, f"{path}")
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict) or not search_raw:
        raise ConfigError(f"{path}: `search:` must map at least one dotted config key to a distribution")
    search = {key: parse_param(key, value) for key, value in search_raw.items()}
    check_search_space(base, search)
    preflight(base, run_folder=False)  # each trial checks its own folder when it starts
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
class TuneSpec:
    """The tuning phase of a compare spec: each method searched alike on a validation split."""

    trials: int  # per method (the same for every method)
    budget: dict[str, float]  # per trial: {"nfe": N} or {"flops": F}
    seed: int  # every tuning trial's train.seed, none of the final runs' seeds
    prompts: str  # eval.prompts of the tuning trials: a validation split, never the reported test split
    space: dict[str, dict[str, ParamSpec]]  # label -> its searched keys (the shared space plus its own)
    metric: str


@dataclass
class CompareSpec:
    name: str
    path: Path
    base: Config  # the spec's base config with its overrides and the command line's
    runs: dict[str, dict[str, Any] | Path]  # label -> dotted overrides of base, or a config file of its own
    seeds: list[int]
    budget: dict[str, float]  # {"nfe": N} (transformer forward-equivalents) or {"flops": F} (whole update)
    metric: str = "eval/overall"
    overrides: dict[str, Any] = field(default_factory=dict)  # the spec's overrides (every run)
    cli_overrides: list[str] = field(default_factory=list)  # the command line's (every run, last)
    reference: str = ""  # the row every other method is compared against (default: LeapAlign's)
    target_share: float = 0.5  # compute to reach base + this share of the best method's gain
    tune: TuneSpec | None = None

    @property
    def unit(self) -> str:
        return next(iter(self.budget))

    @property
    def budget_nfe(self) -> int:  # kept for callers that print the budget
        return int(self.budget.get("nfe", 0))

    def budget_text(self) -> str:
        if self.unit == "flops":
            return f"{self.budget['flops'] / 1e12:.2f} TFLOPs of whole updates (transformer, VAE decoder, reward)"
        return f"{self.budget['nfe']:,.0f} transformer image forward-equivalents"

    def budget_overrides(self, budget: dict[str, float] | None = None) -> dict[str, Any]:
        budget = budget or self.budget
        if "flops" in budget:
            return {"train.max_flops": float(budget["flops"]), "train.max_nfe": 0}
        return {"train.max_nfe": int(budget["nfe"]), "train.max_flops": 0.0}

    def run_config(self, label: str, seed: int, params: dict[str, Any] | None = None) -> Config:
        """A final run's config: the method's own settings, the spec's and the command line's overrides, the
        tuned parameters (when the spec tunes), the seed and the budget."""
        run = self.runs[label]
        if isinstance(run, Path):  # a method's own config file: the spec's shared overrides go on top
            cfg = with_cli_overrides(with_overrides(load_config(run), self.overrides), self.cli_overrides)
        else:
            cfg = with_cli_overrides(with_overrides(self.base, run), self.cli_overrides)
        return with_overrides(cfg, {**(params or {}), "train.seed": seed, **self.budget_overrides()})

    def tuning_config(self, label: str, params: dict[str, Any]) -> Config:
        """A tuning trial: the method's config with the sampled parameters, a tuning seed, the validation
        prompts and the tuning budget."""
        assert self.tune is not None
        cfg = self.run_config(label, self.tune.seed, params)
        # A trial needs no curve, only its score at the end (on eval.final_num_prompts validation prompts).
        overrides = {"eval.prompts": self.tune.prompts, "eval.every": 0, "eval.every_nfe": 10**12}
        return with_overrides(cfg, {**overrides, **self.budget_overrides(self.tune.budget)})


def _budget(raw: dict[str, Any], where: str, budget_nfe: int | None = None) -> dict[str, float]:
    if budget_nfe is not None:
        raw = {"budget_nfe": budget_nfe}
    given = {k: raw[k] for k in ("budget_nfe", "budget_flops") if raw.get(k) is not None}
    if len(given) != 1:
        raise ConfigError(
            f"{where}: give one compute budget per run: budget_nfe (transformer image forward-equivalents) or "
            f"budget_flops (FLOPs of the whole update, e.g. 2.5e12)"
        )
    ((key, value),) = given.items()
    value = _yaml_float(value) if isinstance(value, str) else value
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 1:
        raise ConfigError(f"{where}: {key}={value!r}; give a positive number")
    return {"nfe": int(value)} if key == "budget_nfe" else {"flops": float(value)}


def check_selection_prompts(path: str | None, where: str) -> None:
    """Searches select on validation prompts: a file that declares itself the test split is refused."""
    from leapalign.data import TEST_SPLITS, prompt_split

    if path and prompt_split(path) in TEST_SPLITS:
        raise ConfigError(
            f"{where}: eval.prompts={path} is the reported test split; searches select on a validation split "
            f"(e.g. assets/prompts/world/validation.parquet), never on the prompts a report is made on"
        )


def check_eval_cadence(cfg: Config, budget: dict[str, float], where: str) -> None:
    """Compute-to-target needs curves: an evaluation at least every 2k NFE, or 10 points per run."""
    every = cfg.eval.every_nfe
    if every <= 0:
        raise ConfigError(
            f"{where}: set eval.every_nfe (a held-out point every so much compute) for the curves"
        )
    allowed = max(2000, budget["nfe"] / 10) if "nfe" in budget else 2000
    if every > allowed:
        raise ConfigError(
            f"{where}: eval.every_nfe={every} leaves the curves too coarse for compute-to-target; use <= {allowed:.0f} "
            f"(every 2k NFE, or 10 points per run)"
        )


def _parse_tune(
    raw: Any, path: Path, runs: dict, seeds: list[int], run_budget: dict, metric: str
) -> TuneSpec:
    where = f"{path}: tune"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: give a mapping (trials, space, per_run, prompts, seed, budget_nfe | budget_flops)"
        )
    _check_keys(
        raw, {"trials", "space", "per_run", "prompts", "seed", "budget_nfe", "budget_flops", "metric"}, path
    )
    trials = raw.get("trials")
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(
            f"{where}.trials={trials!r}: give the number of trials per method (the same for all)"
        )
    tune_seed = raw.get("seed", 1000)
    if not isinstance(tune_seed, int) or tune_seed < 0 or tune_seed in seeds:
        raise ConfigError(f"{where}.seed={tune_seed!r}: an integer >= 0, not one of the final seeds {seeds}")
    prompts = raw.get("prompts")
    if not isinstance(prompts, str) or not prompts:
        raise ConfigError(f"{where}.prompts: name the validation prompt file the trials are scored on")
    shared = raw.get("space") or {}
    per_run = raw.get("per_run") or {}
    if not isinstance(shared, dict) or not isinstance(per_run, dict):
        raise ConfigError(f"{where}.space and {where}.per_run map dotted keys to distributions")
    unknown = sorted(set(per_run) - set(runs))
    if unknown:
        raise ConfigError(f"{where}.per_run: unknown run label(s) {unknown}; the runs are {sorted(runs)}")
    space = {}
    for label in runs:
        keys = {**shared, **(per_run.get(label) or {})}
        if not keys:
            raise ConfigError(
                f"{where}: run {label!r} has nothing to search; give tune.space or tune.per_run.{label}"
            )
        space[label] = {key: parse_param(key, value) for key, value in keys.items()}
        grids = [key for key, param in space[label].items() if param.kind == "grid"]
        if grids:
            raise ConfigError(
                f"{where}: {grids} use grid; tuning draws at random (choice, uniform, loguniform, randint)"
            )
    budget = _budget(raw, where) if raw.get("budget_nfe") or raw.get("budget_flops") else dict(run_budget)
    if set(budget) != set(run_budget):
        raise ConfigError(f"{where}: budget in the runs' unit ({next(iter(run_budget))}), please")
    return TuneSpec(trials, budget, tune_seed, prompts, space, str(raw.get("metric", metric)))


def load_compare_spec(
    path: str | Path,
    config_overrides: list[str] | None = None,
    *,
    budget_nfe: int | None = None,
    seeds: list[int] | None = None,
    labels: list[str] | None = None,
) -> CompareSpec:
    """Parse and check a compare spec; every run's config (tuning trials' too) is built and validated here."""
    from leapalign.methods import update_nfe_range

    path = Path(path)
    raw = _read_spec(path)
    _check_keys(
        raw,
        {"name", "base", "overrides", "runs", "seeds", "budget_nfe", "budget_flops", "metric", "reference",
         "target_share", "tune"},
        path,
    )  # fmt: skip
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
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds={seeds!r}; give a non-empty list of distinct integers >= 0")
    budget = _budget(raw, str(path), budget_nfe)
    overrides = raw.get("overrides") or {}
    spec = CompareSpec(
        name=str(raw.get("name") or path.stem),
        path=path,
        base=base,
        runs=runs,
        seeds=seeds,
        budget=budget,
        metric=str(raw.get("metric", "eval/overall")),
        overrides=dict(overrides),
        cli_overrides=list(config_overrides or []),
        target_share=float(raw.get("target_share", 0.5)),
    )
    if not 0 < spec.target_share <= 1:
        raise ConfigError(f"{path}: target_share={spec.target_share}; use a share in (0, 1]")
    configs = {}
    for label in runs:
        try:
            configs[label] = spec.run_config(label, seeds[0])
        except ConfigError as err:
            raise ConfigError(f"{path}: run {label!r}: {err}") from None
    default_reference = next(
        (lab for lab, c in configs.items() if c.method.name == "leapalign"), next(iter(runs))
    )
    spec.reference = str(raw.get("reference") or default_reference)
    if spec.reference not in runs:
        raise ConfigError(
            f"{path}: reference={spec.reference!r} is not a run label; the runs are {sorted(runs)}"
        )
    for label, cfg in configs.items():
        where = f"{path}: run {label!r}"
        check_eval_cadence(cfg, budget, where)
        if "nfe" in budget:
            workers = cfg.ray.num_workers if cfg.ray.enabled else 1
            lowest, highest = (n * workers for n in update_nfe_range(cfg))
            if budget["nfe"] < lowest:
                raise ConfigError(
                    f"budget_nfe={budget['nfe']} cannot fit one update of run {label!r} ({lowest} image "
                    f"forward-equivalents with {workers} worker(s)); raise budget_nfe or shrink train.batch_size / "
                    f"the method's steps"
                )
            if cfg.train.iterations * highest < budget["nfe"]:
                raise ConfigError(
                    f"run {label!r}: train.iterations={cfg.train.iterations} ends before budget_nfe={budget['nfe']} "
                    f"is spent (at most {highest} per update); raise train.iterations"
                )
    if raw.get("tune") is not None:
        spec.tune = _parse_tune(raw["tune"], path, runs, seeds, budget, spec.metric)
        check_selection_prompts(spec.tune.prompts, f"{path}: tune.prompts")
        for label in runs:
            try:  # every value each distribution can produce makes a valid tuning config
                trial_cfg = spec.tuning_config(label, {})
                check_search_space(trial_cfg, spec.tune.space[label])
            except ConfigError as err:
                raise ConfigError(f"{path}: tuning run {label!r}: {err}") from None
            check_metric(spec.tune.metric, [trial_cfg])
            preflight(trial_cfg, run_folder=False)
    for cfg in configs.values():
        preflight(cfg, run_folder=False)
    check_metric(spec.metric, list(configs.values()))
    return spec


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
