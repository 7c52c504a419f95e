"""`leapalign` command line: train, eval, compare, seeds, sweep, reward convert, build-tiny, embed, show-config.

    leapalign train experiments/quickstart.yaml method.leapalign.alpha=0.1 train.seed=3
    leapalign train experiments/world/grpo.yaml train.resume=true
    leapalign eval outputs/quickstart assets/prompts/world/eval.parquet
    leapalign eval base outputs/run_a outputs/run_b assets/prompts/world/eval.parquet --actors 2
    leapalign compare experiments/compare/world_methods.yaml
    leapalign seeds outputs/quickstart_seed0 outputs/quickstart_seed1
    leapalign sweep experiments/sweeps/world_leap.yaml
    leapalign reward convert HPS_v2.1_compressed.pt OUT
    leapalign build-tiny /tmp/tiny-flux
    leapalign embed --config experiments/quickstart.yaml outputs/text-cache   # then model.text_cache=...
    leapalign show-config experiments/quickstart.yaml leap.distribution=beta

Bad input (config, prompt file, model folder ...) prints one line saying what to fix and exits 2
(leapalign.preflight checks a run's inputs before anything starts).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leapalign.config import Config

from leapalign.io import atomic_path
from leapalign.logs import quiet_libraries
from leapalign.numerics import use_cpu_isa


def cmd_train(args: argparse.Namespace) -> int:
    from leapalign.config import load_config
    from leapalign.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    use_cpu_isa(cfg.train.cpu_isa)  # before any kernel runs in this process
    quiet_libraries()
    if cfg.train.torch_threads:
        import torch

        torch.set_num_threads(cfg.train.torch_threads)
    preflight(cfg)
    # Held-out accuracy of the base model (miniature-world prompts: the exact evaluator). On the Ray path it
    # runs in a thread while the cluster starts, the reward deploys and the workers load (mostly waiting on
    # processes: the evaluation fills that time); in one process it runs first.
    before: Future | None = None
    if cfg.eval.prompts and not cfg.train.resume:
        from leapalign.evaluation import is_world_prompt_set, load_eval_prompts

        if is_world_prompt_set(load_eval_prompts(cfg.eval.prompts, cfg.eval.num_prompts)):
            before = _in_background(_evaluate, cfg, None, not cfg.ray.enabled)
            if not cfg.ray.enabled:
                before.result()  # in one process the evaluation and the training would share the cores
    run_id, output_dir = train_on_ray(cfg) if cfg.ray.enabled else train_locally(cfg)
    if before is not None:
        _report_evaluation(cfg, before.result(), output_dir, run_id)
    return 0


def _in_background(fn, *args) -> Future:
    """fn(*args) in a thread; .result() returns its value or raises its error."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leapalign-eval")
    future = executor.submit(fn, *args)
    executor.shutdown(wait=False)
    return future


def train_locally(cfg: Config) -> tuple[str | None, Path]:
    """This process, no Ray. Checkpoints in OUTPUT/checkpoints; train.resume=true continues the same MLflow run."""
    from leapalign.run_folder import clear_output_dir
    from leapalign.tracking import RUN_RECORD, MLflowTracker, ResumableTracker, open_tracker
    from leapalign.train import train

    out_dir = Path(cfg.train.output_dir)
    record_path = out_dir / RUN_RECORD
    record = json.loads(record_path.read_text()) if cfg.train.resume and record_path.is_file() else None
    if cfg.train.overwrite:
        clear_output_dir(cfg)
    from leapalign.rewards.configured import build_configured_reward

    reward_fn = build_configured_reward(cfg.reward)  # one process, no Ray: never served (reward.serve unused)
    tracker = open_tracker(cfg, record)
    if isinstance(tracker, MLflowTracker):
        tracker = ResumableTracker(tracker)
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": cfg.tracking.uri}))
    try:
        result = train(cfg, reward_fn=reward_fn, tracker=tracker)
    except BaseException as err:
        tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    done = [m for m in result.history if not m.get("skipped")]
    last = done[-1] if done else {}
    print(
        f"done: {len(done)}/{len(result.history)} steps applied, final loss {last.get('loss', float('nan')):.4f}, "
        f"reward {last.get('reward/mean', float('nan')):.4f}; outputs in {result.output_dir}"
        + (f"; MLflow run {result.run_id} ({cfg.tracking.uri})" if result.run_id else "")
    )
    return result.run_id, Path(result.output_dir)


def train_on_ray(cfg: Config) -> tuple[str | None, Path]:
    """The same loop on Ray Train workers (imported only here: the core never imports ray)."""
    from leapalign.distributed.ray_train import run_on_ray  # noqa: TID251 (the entry reaches the Ray edge)

    result = run_on_ray(cfg)
    m = result.metrics
    print(
        f"done: step {m.get('step', 0)}/{cfg.train.iterations} on {cfg.ray.num_workers} Ray worker(s), final loss "
        f"{m.get('loss', float('nan')):.4f}, reward {m.get('reward/mean', float('nan')):.4f}; outputs in "
        f"{result.output_dir}; checkpoints in {result.run_dir}"
        + (f"; MLflow run {result.run_id} ({cfg.tracking.uri})" if result.run_id else "")
    )
    return result.run_id, Path(result.output_dir)


def _evaluate(cfg: Config, run_dir: Path | None = None, progress: bool = True):
    from leapalign.world.evaluate import evaluate_stage

    return evaluate_stage(cfg, run_dir, progress=progress)


def _report_evaluation(cfg: Config, before, output_dir: Path, run_id: str | None) -> None:
    """Aligned vs base on the held-out prompts: printed, saved, and logged to the training's MLflow run."""
    from leapalign.tracking import MLflowTracker, NullTracker
    from leapalign.world.evaluate import report_comparison

    after = _evaluate(cfg, output_dir)
    tracker = NullTracker()
    if cfg.tracking.enabled and run_id is not None:
        tracker = MLflowTracker(cfg.tracking.uri, cfg.tracking.experiment, run_id=run_id)
    table = report_comparison(before, after, output_dir, tracker, step=cfg.train.iterations)
    tracker.end("FINISHED")
    print(f"held-out accuracy ({after.n} images, exact rule-based evaluator), base vs aligned:\n{table}")
    print(f"before/after grid: {output_dir / 'eval_before_after.png'}")


def cmd_eval(args: argparse.Namespace) -> int:
    """Base or trained weights (one or several) on a prompt set: images, a Parquet table and a summary per
    weights, an MLflow run each; in this process, or with --actors N on a Ray Data actor pool."""
    from leapalign.config import load_config
    from leapalign.evaluation import evaluate_weights, plan_eval, write_eval_folder
    from leapalign.tracking import MLflowTracker, NullTracker

    # WEIGHTS... PROMPTS [key=value ...]: argparse gives one list; an override has "=" and names no path.
    overrides = [a for a in args.weights if "=" in a and not Path(a).exists()]
    positional = [a for a in args.weights if a not in overrides]
    args.overrides = [*overrides, *args.overrides]
    weights, prompts_path = positional[:-1], positional[-1] if positional else ""
    if not weights:
        raise ValueError(
            "give WEIGHTS... PROMPTS: 'base', LoRA/transformer/run folders, then the prompt file"
        )
    config = args.config
    if config is None:  # a run folder (or a weights folder inside one) carries its resolved config
        for folder in (Path(weights[0]), Path(weights[0]).parent):
            if (folder / "config.yaml").is_file():
                config = folder / "config.yaml"
                break
    if config is None:
        raise ValueError(
            f"--config is needed: {weights[0]} is not inside a run folder with a config.yaml (the config "
            f"names the base model and the sampler settings)"
        )
    cfg = load_config(config, args.overrides)
    use_cpu_isa(cfg.train.cpu_isa)
    quiet_libraries()
    if cfg.train.torch_threads:
        import torch

        torch.set_num_threads(cfg.train.torch_threads)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    on_ray = args.actors is not None
    # Before anything is written: weights, prompts, metric names (and the pool's size).
    plan = plan_eval(cfg, weights, prompts_path, metrics, args.num_prompts, build_rewards=not on_ray)
    if on_ray:
        from leapalign.distributed.data_jobs import ActorResources  # noqa: TID251 (the entry reaches the Ray edge)

        resources = ActorResources(args.actors, args.cpus_per_actor, args.gpus_per_actor)
    name = plan.names[0] if len(weights) == 1 else "+".join(plan.names)
    out_dir = Path(args.out or f"outputs/eval/{name}-{Path(prompts_path).stem}")
    folders = [out_dir] if len(weights) == 1 else [out_dir / n for n in plan.names]
    sampled = {}
    if on_ray:
        from leapalign.distributed.data_jobs import run_eval_job  # noqa: TID251

        sampled = run_eval_job(cfg, plan, resources=resources)
    summaries = {}
    for which, folder in enumerate(folders):
        tracker = NullTracker()
        if cfg.tracking.enabled:
            run_name = f"{plan.names[which]} on {Path(prompts_path).name}"
            tracker = MLflowTracker(cfg.tracking.uri, "eval", run_name=run_name)
        report = None
        try:
            if on_ray:
                images, per_image = sampled[which]
                report = write_eval_folder(plan, which, folder, images, per_image, tracker)
            else:
                report = evaluate_weights(cfg, plan, which, folder, tracker)
        finally:
            tracker.end("FINISHED" if report is not None else "FAILED")
        summaries[plan.names[which]] = report.summary
    if len(folders) > 1:
        with atomic_path(out_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps({"prompts": prompts_path, "weights": dict(zip(plan.names, plan.weights, strict=True)),
                                       "summary": summaries}, indent=2))  # fmt: skip
    keys = list(dict.fromkeys(k for summary in summaries.values() for k in summary))
    width = max(len(k) for k in ["metric", *keys])
    print(f"{'metric':<{width}}  " + "  ".join(f"{n:>10}" for n in summaries))
    for key in keys:
        print(
            f"{key:<{width}}  " + "  ".join(f"{s.get(key, float('nan')):>10.4f}" for s in summaries.values())
        )
    print(f"images, eval.parquet and summary.json in {', '.join(str(f) for f in folders)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Methods x seeds at an equal compute budget, as concurrent Ray Train runs; then the report."""
    from leapalign.experiments import load_compare_spec

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    labels = [s.strip() for s in args.runs.split(",")] if args.runs else None
    spec = load_compare_spec(
        args.spec, args.overrides, budget_nfe=args.budget_nfe, seeds=seeds, labels=labels
    )
    quiet_libraries()
    from leapalign.distributed.tune_runner import run_compare  # noqa: TID251

    out_dir = Path(args.out or f"outputs/compare/{spec.name}").resolve()
    report = run_compare(spec, out_dir, restart=args.restart)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def cmd_seeds(args: argparse.Namespace) -> int:
    """Held-out accuracy over several seeds of one config: mean, 95% interval, range (reports.seed_summary)."""
    from leapalign.reports import format_seed_summary, seed_summary

    summary = seed_summary([Path(d) for d in args.run_dirs])
    print(format_seed_summary(summary))
    if args.json:
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A Ray Tune search over config keys; every trial a Ray Train run, every run in MLflow."""
    from leapalign.experiments import load_sweep_spec

    spec = load_sweep_spec(args.spec, args.overrides)
    if args.num_samples:
        spec.num_samples = args.num_samples
    quiet_libraries()
    from leapalign.distributed.tune_runner import run_sweep  # noqa: TID251

    out_dir = Path(args.out or f"outputs/sweeps/{spec.name}").resolve()
    best_path, best = run_sweep(spec, out_dir, restart=args.restart)
    if best is None:
        print(f"no trial reported {spec.metric}; see {out_dir / 'report'}")
        return 1
    shown = {k: v for k, v in best.items() if k not in ("status",)}
    print(f"best trial: {json.dumps(shown, default=str)}")
    print(f"best config: {best_path} (train it again: leapalign train {best_path})")
    print(f"table and plots: {out_dir / 'report'}")
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from leapalign.models.tiny import build_tiny_flux

    quiet_libraries()
    path = build_tiny_flux(args.out_dir, seed=args.seed)
    print(f"tiny Flux saved to {path}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """T5 + CLIP prompt embeddings of prompt files (and a config's train/eval prompts) into a text cache: in
    this process, or with --actors N on a Ray Data pool of text-encoder replicas. Resumable either way."""
    from dataclasses import replace

    from leapalign.config import Config, ModelConfig, load_config
    from leapalign.data import load_prompts, pick_dtype, resolve_model_path
    from leapalign.text_cache import plan_text_cache, run_prompt_sets, write_text_cache

    cfg = load_config(args.config) if args.config else None
    flags = {"path": args.model, "max_sequence_length": args.max_sequence_length, "dtype": args.dtype}
    model = replace(cfg.model if cfg else ModelConfig(), **{k: v for k, v in flags.items() if v is not None})
    sources = dict.fromkeys([*(run_prompt_sets(cfg) if cfg else []), *args.prompts])  # whole files, in order
    sets = {source: load_prompts(source) for source in sources}  # checked before anything is written
    if not sets:
        raise ValueError("no prompts: give prompt files (leapalign embed TRAIN.txt EVAL.txt OUT) or --config")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError(f"--shard-size {args.shard_size} --batch-size {args.batch_size}: use >= 1")
    resolve_model_path(model.path)
    prompts = [p for ps in sets.values() for p in ps]
    out = Path(args.out).absolute()
    if args.actors is not None:
        import torch

        from leapalign.distributed.data_jobs import ActorResources, run_embed_job  # noqa: TID251

        resources = ActorResources(args.actors, args.cpus_per_actor, args.gpus_per_actor)  # checked first
        # model.dtype=auto: what the actors' device gives (bfloat16 on GPU actors, float32 on CPU ones)
        device = "cuda" if resources.gpus > 0 or (args.device or "").startswith("cuda") else "cpu"
        dtype = pick_dtype(model.dtype, torch.device(device))
        plan = plan_text_cache(
            prompts, out, model_path=model.path, revision=model.revision,
            max_sequence_length=model.max_sequence_length, dtype=dtype, sources=list(sets),
            shard_size=args.shard_size, overwrite=args.overwrite,
        )  # fmt: skip
        if plan.num_shards > len(plan.todo):
            print(f"resuming: {plan.num_shards - len(plan.todo)} of {plan.num_shards} shards already written")
        job_cfg = replace(cfg or Config(), model=model)
        _, encoded = run_embed_job(job_cfg, plan, batch_size=args.batch_size, resources=resources)
        print(f"{encoded} shards encoded on {resources.actors} Ray Data actor(s)")
    else:
        from leapalign.text_cache import check_cache_destination

        check_cache_destination(out, args.overwrite)
        quiet_libraries()
        from leapalign.models.flux import FluxPolicy

        policy = FluxPolicy.from_pretrained(
            model.path, dtype=model.dtype, device=args.device, revision=model.revision
        )  # with its text encoders

        def encode(batch: list[str]):
            cond = policy.encode_prompts(batch, model.max_sequence_length)
            return cond.prompt_embeds, cond.pooled_prompt_embeds

        out = write_text_cache(
            encode, prompts, out, model_path=model.path, revision=model.revision,
            max_sequence_length=model.max_sequence_length, dtype=pick_dtype(model.dtype, policy.device),
            sources=list(sets), shard_size=args.shard_size, batch_size=args.batch_size, overwrite=args.overwrite,
            progress=True,
        )  # fmt: skip
    print(
        f"embedded {len(set(prompts))} prompts from {', '.join(sets)} into {out}; use model.text_cache={out}"
    )
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    import yaml

    from leapalign.config import config_to_dict, load_config

    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def add_actor_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--actors", type=int, default=None,
        help=f"run on Ray Data with this many actors ({what}): the job's cluster under `ray job submit`, "
        "else a private one on this machine (default: this process, no Ray)",
    )  # fmt: skip
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs each actor reserves (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leapalign",
        description="LeapAlign (arXiv 2604.15311): align Flux with reward gradients at any generation step.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="one training run (any method.name) from a YAML config")
    p.add_argument("config", help="YAML config, e.g. experiments/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.leapalign.alpha=0.1")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "eval",
        help="score base or trained weights on a prompt set (fixed noise)",
        usage="leapalign eval WEIGHTS [WEIGHTS ...] PROMPTS [key=value ...] [options]",
    )
    p.add_argument(
        "weights",
        nargs="+",
        metavar="WEIGHTS PROMPTS",
        help="'base', LoRA folders, transformer folders or run output folders (several: one folder each under "
        "--out, paired on the same noise), then the .txt or .parquet prompt file (world prompts enable "
        "'world'); then dotted key=value overrides of the config",
    )
    p.add_argument(
        "--metrics", help="comma-separated: world and/or reward names (default: world + reward.name)"
    )
    p.add_argument("--config", help="run config (default: the config.yaml of the run folder)")
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts (default eval.num_prompts)")
    p.add_argument("--out", help="output folder (default outputs/eval/WEIGHTS-PROMPTS)")
    add_actor_options(p, "policy replicas sampling and scoring")
    p.set_defaults(func=cmd_eval, overrides=[])
    p = sub.add_parser("compare", help="methods x seeds at equal compute on Ray, with a report")
    p.add_argument("spec", help="compare spec, e.g. experiments/compare/world_methods.yaml")
    p.add_argument("--budget-nfe", type=int, default=None, help="override the spec's compute budget per run")
    p.add_argument("--seeds", help="override the spec's seeds, e.g. 0,1,2")
    p.add_argument("--runs", help="only these run labels, e.g. LeapAlign,GRPO")
    p.add_argument("--out", help="output folder (default outputs/compare/NAME)")
    p.add_argument("--restart", action="store_true", help="start over instead of resuming an interrupted one")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of every run's config")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("seeds", help="held-out accuracy over seeds of one config: mean, 95%% interval, range")
    p.add_argument("run_dirs", nargs="+", help="run folders with an eval.json, e.g. outputs/quickstart_seed*")
    p.add_argument("--json", help="also write the summary to this JSON file")
    p.set_defaults(func=cmd_seeds)
    p = sub.add_parser("sweep", help="Ray Tune search over config keys (grid, random, optuna; ASHA)")
    p.add_argument("spec", help="sweep spec, e.g. experiments/sweeps/world_leap.yaml")
    p.add_argument("--num-samples", type=int, default=None, help="override the spec's num_samples")
    p.add_argument("--out", help="output folder (default outputs/sweeps/NAME)")
    p.add_argument(
        "--restart", action="store_true", help="start over instead of resuming an interrupted sweep"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of every trial's base config")
    p.set_defaults(func=cmd_sweep)
    from leapalign.rewards.convert import add_subparser as add_reward_commands

    add_reward_commands(sub)  # leapalign reward convert CKPT OUT
    p = sub.add_parser("build-tiny", help="save a random tiny Flux as a diffusers folder (for tests/demos)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_tiny)
    p = sub.add_parser(
        "embed", help="precompute T5 + CLIP prompt embeddings: train with model.text_cache=OUT"
    )
    p.add_argument("prompts", nargs="*", help="prompt files (.txt or .parquet): train and eval prompts alike")
    p.add_argument("out", help="cache folder to write (atomically)")
    p.add_argument("--config", help="take model.* and the train/eval prompt files from this run config")
    p.add_argument("--model", help="diffusers Flux folder or hub id (default: the config's model.path)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the config's)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float64 (default: the config's model.dtype)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--shard-size", type=int, default=256, help="prompts per safetensors shard")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per encoder call")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at OUT")
    add_actor_options(p, "text-encoder replicas, one shard at a time")
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("show-config", help="print the resolved config (defaults <- YAML <- overrides)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_show_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after the options (argparse alone stops at the first option).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from leapalign.preflight import USER_ERRORS, JobFailed  # after parsing: `--help` stays quick (no torch)

    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"leapalign: error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:  # an actor's failure in `embed` / `eval --actors`: one line
        print(f"leapalign: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # a local run stopped by Ctrl-C says where it stopped (train.py)
        print(f"leapalign: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
