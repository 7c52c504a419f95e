"""`leapalign` command line: train, build-tiny, show-config.

    leapalign train experiments/quickstart.yaml method.leapalign.alpha=0.1 train.seed=3
    leapalign train experiments/world/grpo.yaml train.resume=true
    leapalign build-tiny /tmp/tiny-flux
    leapalign show-config experiments/quickstart.yaml leap.distribution=beta

Bad input (config, prompt file, model folder ...) prints one line saying what to fix and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leapalign.config import Config

from leapalign.logs import quiet_libraries

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError, PermissionError)


def cmd_train(args: argparse.Namespace) -> int:
    from leapalign.config import load_config

    cfg = load_config(args.config, args.overrides)
    quiet_libraries()
    if cfg.train.torch_threads:
        import torch

        torch.set_num_threads(cfg.train.torch_threads)
    check_inputs(cfg)
    # Held-out accuracy of the base model first (miniature-world prompts: the exact evaluator).
    before = None
    if cfg.eval.prompts and not cfg.train.resume:
        from leapalign.evaluation import is_world_prompt_set, load_eval_prompts

        if is_world_prompt_set(load_eval_prompts(cfg.eval.prompts, cfg.eval.num_prompts)):
            before = _evaluate(cfg)
    run_id, output_dir = train_on_ray(cfg) if cfg.ray.enabled else train_locally(cfg)
    if before is not None:
        _report_evaluation(cfg, before, output_dir, run_id)
    return 0


def check_inputs(cfg: Config) -> None:
    """Prompt files, the model folder and the output folder, checked before anything is evaluated or written."""
    from leapalign.data import load_prompts
    from leapalign.models.flux import resolve_model_path
    from leapalign.training import check_output_dir

    resolve_model_path(cfg.model.path)
    load_prompts(cfg.train.prompts)
    if cfg.eval.prompts:
        load_prompts(cfg.eval.prompts)
    check_output_dir(cfg)
    if cfg.train.resume and not cfg.ray.enabled:
        from leapalign.training import latest_local_checkpoint

        if latest_local_checkpoint(Path(cfg.train.output_dir)) is None:
            raise FileNotFoundError(
                f"train.resume=true but {Path(cfg.train.output_dir) / 'checkpoints'} holds no checkpoint; "
                f"drop train.resume to start the run"
            )


def train_locally(cfg: Config) -> tuple[str | None, Path]:
    """This process, no Ray. Checkpoints in OUTPUT/checkpoints; train.resume=true continues the same MLflow run."""
    import json

    from leapalign.io import atomic_path
    from leapalign.tracking import RUN_RECORD, MLflowTracker, ResumableTracker, open_tracker
    from leapalign.train import train
    from leapalign.training import clear_output_dir

    out_dir = Path(cfg.train.output_dir)
    record_path = out_dir / RUN_RECORD
    record = json.loads(record_path.read_text()) if cfg.train.resume and record_path.is_file() else None
    if cfg.train.overwrite:
        clear_output_dir(cfg)
    reward_fn = None
    if cfg.reward.actor:  # a served reward: the only Ray this path touches (imported lazily)
        from leapalign.distributed.reward_actor import make_reward_fn

        reward_fn = make_reward_fn(cfg.reward)
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
    from leapalign.distributed.ray_train import run_on_ray

    result = run_on_ray(cfg)
    m = result.metrics
    print(
        f"done: step {m.get('step', 0)}/{cfg.train.iterations} on {cfg.ray.num_workers} Ray worker(s), final loss "
        f"{m.get('loss', float('nan')):.4f}, reward {m.get('reward/mean', float('nan')):.4f}; outputs in "
        f"{result.output_dir}; checkpoints in {result.run_dir}"
        + (f"; MLflow run {result.run_id} ({cfg.tracking.uri})" if result.run_id else "")
    )
    return result.run_id, Path(result.output_dir)


def _evaluate(cfg: Config, run_dir: Path | None = None):
    from leapalign.world.evaluate import evaluate_stage

    return evaluate_stage(cfg, run_dir)


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


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from leapalign.models.tiny import build_tiny_flux

    quiet_libraries()
    path = build_tiny_flux(args.out_dir, seed=args.seed)
    print(f"tiny Flux saved to {path}")
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    import yaml

    from leapalign.config import config_to_dict, load_config

    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leapalign",
        description="LeapAlign (arXiv 2604.15311): align Flux with reward gradients at any generation step.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run LeapAlign training from a YAML config")
    p.add_argument("config", help="YAML config, e.g. experiments/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.leapalign.alpha=0.1")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("build-tiny", help="save a random tiny Flux as a diffusers folder (for tests/demos)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_tiny)
    p = sub.add_parser("show-config", help="print the resolved config (defaults <- YAML <- overrides)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_show_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"leapalign: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
