"""`leapalign` command line: train, build-tiny, show-config.

    leapalign train experiments/quickstart.yaml method.alpha=0.1 train.seed=3
    leapalign build-tiny /tmp/tiny-flux
    leapalign show-config experiments/quickstart.yaml leap.distribution=beta

Bad input (config, prompt file, model folder ...) prints one line saying what to fix and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError, PermissionError)


def _quiet_libraries() -> None:
    """Library load bars and advisories drown the training bar; errors still show."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from leapalign.config import load_config
    from leapalign.train import make_tracker, train

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    tracker = make_tracker(cfg)
    try:
        result = train(cfg, tracker=tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    done = [m for m in result.history if not m.get("skipped")]
    last = done[-1] if done else {}
    print(
        f"done: {len(done)}/{len(result.history)} steps applied, final loss {last.get('loss', float('nan')):.4f}, "
        f"reward {last.get('reward/mean', float('nan')):.4f}; outputs in {result.output_dir}"
        + (f"; MLflow run {result.run_id} ({cfg.tracking.uri})" if result.run_id else "")
    )
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from leapalign.models.tiny import build_tiny_flux

    _quiet_libraries()
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
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.alpha=0.1")
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
