"""Quiet third-party output so the training bar and our own log lines stay readable."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path


def quiet_libraries() -> None:
    """Library load bars and advisories drown the training bar; errors still show."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    # Our own INFO lines stay; other libraries' INFO records (e.g. Ray Train logging every report of a
    # worker, metrics and all, under a file-path logger name) only from WARNING up.
    level = logging.getLogger().getEffectiveLevel()
    own = logging.getLogger("leapalign")
    if own.level == logging.NOTSET:
        own.setLevel(level)
    logging.getLogger().setLevel(max(level, logging.WARNING))


STEP_LOG = logging.getLogger("leapalign.steps")  # one line per update: the run's log file only
STEP_LOG.propagate = False
STEP_LOG.setLevel(logging.INFO)
RUN_LOG = "train.log"


@contextmanager
def run_log_file(folder: Path | None):
    """Inside: our log records (INFO and up) and one line per update also go to FOLDER/train.log (appended
    on resume). None: nothing (ranks other than 0). The handler is removed on the way out, so runs in one
    long-lived process (tests, a Ray worker restarted in place) never write into each other's files."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / RUN_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    own = logging.getLogger("leapalign")
    if own.getEffectiveLevel() > logging.INFO:
        own.setLevel(logging.INFO)
    own.addHandler(handler)
    STEP_LOG.addHandler(handler)
    try:
        yield
    finally:
        own.removeHandler(handler)
        STEP_LOG.removeHandler(handler)
        handler.close()
