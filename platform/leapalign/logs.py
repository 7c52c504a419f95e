"""Quiet third-party output so the training bar and our own log lines stay readable."""

from __future__ import annotations

import logging
import os


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
