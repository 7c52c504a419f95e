"""The one input check every entry runs before it starts anything, with the same messages everywhere:
`leapalign train` (in this process and on Ray), `leapalign compare` and `leapalign sweep` (every run config
of the spec) and each Tune trial (through leapalign.distributed.ray_train.run_on_ray).

What it saves: a typo in a path or a reward option otherwise fails after minutes (Ray start-up, the base
model's evaluation, a worker's retries). Reads, never writes. What only the Ray driver can check (its
storage, the cluster's resources) it checks itself, after this.
"""

from __future__ import annotations

from pathlib import Path

from leapalign.config import Config
from leapalign.data import load_prompts, resolve_model_path
from leapalign.rewards.serving import check_reward
from leapalign.run_folder import check_output_dir, resume_checkpoint
from leapalign.tracking import check_tracking_uri

# The errors that mean "fix your input": the command line prints their one line and exits 2, and the Ray
# driver raises a worker's as itself (ray_train.raise_user_error).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError, PermissionError)


class JobFailed(RuntimeError):
    """A job's worker failed (e.g. a Ray Data actor of `embed` / `eval --actors`): the command says it in one
    line and exits 1 (not 2: the input was fine)."""


def preflight(cfg: Config, *, run_folder: bool = True) -> None:
    """The model folder, the prompt files, the reward, the run folder, the text cache, the tracking server.

    run_folder=False: cfg is a spec's base (sweep, compare), whose runs get folders of their own (each
    trial checks its own when it starts). Otherwise a new run never replaces an old one silently, and a
    local train.resume=true needs a checkpoint to continue from (a Ray run's is in its storage: the
    driver checks it).
    """
    resolve_model_path(cfg.model.path)
    load_prompts(cfg.train.prompts)
    if cfg.eval.prompts:
        load_prompts(cfg.eval.prompts)
    check_reward(cfg)  # served: names and options; built in process: built here once, as the run will
    if run_folder:
        check_output_dir(cfg)
        if cfg.train.resume and not cfg.ray.enabled:
            resume_checkpoint(Path(cfg.train.output_dir))
    if cfg.model.text_cache:  # every prompt the run encodes (train + held-out) must be cached, for this model
        from leapalign.text_cache import check_run_text_cache

        check_run_text_cache(cfg)
    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.uri)
