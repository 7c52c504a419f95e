"""`leapalign embed` and `leapalign eval` on Ray Data (leapalign.distributed.data_jobs), on one local Ray cluster
for the module (127.0.0.1, 2 CPUs) with the tiny Flux: the Ray Data cache is the one-process cache, bit for bit,
after a failed run resumed without re-encoding its finished shards; a killed embed (its driver SIGKILLed) resumes
the same way; an evaluation of two weights gives the same
tables and images on 1 actor and on 2 actors, bit for bit, its reward served by Ray Serve; and the images and
the judge's results of one process (the reward built in process: equal to rel 1e-6).

The `ray job submit` runs of both commands are in test_ray_job.py (its token-auth head).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from leapalign.config import load_config, with_overrides
from leapalign.data import load_prompts
from leapalign.distributed.data_jobs import (
    FAULT_EMBED_SHARD_ENV,
    ActorResources,
    DataJobError,
    run_embed_job,
    run_eval_job,
)
from leapalign.distributed.reward_service import ensure_reward_service
from leapalign.evaluation import evaluate_weights, plan_eval, write_eval_folder
from leapalign.text_cache import MANIFEST, TextCache, plan_text_cache
from tests.conftest import TINY_CONFIG, local_ray, tiny_overrides
from tests.unit.test_text_cache import EXTRA, LENGTH, build_cache

# One test process for the whole module: its Ray cluster is module-scoped (scripts/test.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_data_jobs")

HALF_CPU = 0.5  # per actor: two actors and a reward replica fit the 2-CPU cluster


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray() as context:
        yield context


def tiny_cfg(model_dir: Path, tmp: Path, **extra):
    values = {"sampler.eval_num_steps": 2, "reward.cpus_per_replica": HALF_CPU, **extra}
    return load_config(TINY_CONFIG, tiny_overrides(model_dir, tmp / "run", **values))


def cache_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("shard-*.safetensors"))}


def test_embed_on_ray_data_resumes_after_a_failure_and_equals_the_one_process_cache(
    ray_cluster, tiny_flux_dir, tmp_path, monkeypatch
):
    prompts = [*load_prompts(load_config(TINY_CONFIG).train.prompts), *EXTRA]  # 10 unique: 5 shards of 2
    reference = build_cache(
        tiny_flux_dir, tmp_path / "one", prompts, shard_size=2
    )  # one process, batches of 2
    cfg = tiny_cfg(tiny_flux_dir, tmp_path)

    def plan():
        return plan_text_cache(
            prompts, tmp_path / "ray", model_path=str(tiny_flux_dir), revision=None, max_sequence_length=LENGTH,
            dtype=torch.float32, sources=["demo.txt", "extra.txt"], shard_size=2,
        )  # fmt: skip

    # 1. The actor that gets the last shard fails: the job stops, the shards written before are kept.
    monkeypatch.setenv(FAULT_EMBED_SHARD_ENV, "4")
    with pytest.raises(DataJobError, match="fault drill") as failure:
        run_embed_job(cfg, plan(), batch_size=2, resources=ActorResources(1, HALF_CPU), progress=False)
    monkeypatch.delenv(FAULT_EMBED_SHARD_ENV)
    partial = plan().partial
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in partial.glob("shard-*.safetensors")}
    assert 1 <= len(kept) <= 4 and "shard-00004.safetensors" not in kept, (
        f"the failed run keeps the shards it finished before shard 4 failed: {sorted(kept)}"
    )
    assert "the same command again" in str(failure.value), f"the error says how to resume: {failure.value}"
    assert not (tmp_path / "ray").exists(), "no cache at OUT while shards are missing"

    # 2. The same request again, on 2 actors: only the missing shards are encoded; the kept files are untouched.
    started = time.monotonic()
    out, encoded = run_embed_job(
        cfg, plan(), batch_size=2, resources=ActorResources(2, HALF_CPU), progress=False
    )
    print(f"resumed embed on 2 actors: {time.monotonic() - started:.1f}s")
    assert encoded == 5 - len(kept), f"resumed run encoded {encoded} shards, {len(kept)} of 5 were kept"
    for name, stamp in kept.items():
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{name} was rewritten on resume"
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["one", "ray"], (
        f"the partial folder became the cache: {sorted(p.name for p in tmp_path.iterdir())}"
    )

    # 3. The cache equals the one-process cache: every tensor bit for bit, the index, the manifest.
    got, want = cache_tensors(out), cache_tensors(reference)
    assert sorted(got) == sorted(want), f"shards {sorted(got)} vs {sorted(want)}"
    for shard, tensors in want.items():
        for name, tensor in tensors.items():
            assert torch.equal(got[shard][name], tensor), f"{shard} {name} differs from the one-process cache"
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(reference / "index.parquet")), "index"
    assert json.loads((out / MANIFEST).read_text()) == json.loads((reference / MANIFEST).read_text()), (
        "manifest differs from the one-process cache"
    )


def test_a_killed_embed_resumes_without_redoing_finished_shards(ray_cluster, tiny_flux_dir, tmp_path):
    """`leapalign embed --actors 1` as its own driver process on this cluster, killed (SIGKILL, no clean-up)
    while its actor holds shard 2: shards 0 and 1 are kept; the same request again encodes only 2-4."""
    prompts = [*load_prompts(load_config(TINY_CONFIG).train.prompts), *EXTRA]  # 10 unique: 5 shards of 2
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "cache"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.address_info["gcs_address"],
        FAULT_EMBED_SHARD_ENV: "2:hang",
    }
    command = [sys.executable, "-m", "leapalign", "embed", str(tmp_path / "prompts.txt"), str(out), "--model",
               str(tiny_flux_dir), "--max-sequence-length", str(LENGTH), "--shard-size", "2", "--batch-size", "2",
               "--actors", "1", "--cpus-per-actor", str(HALF_CPU)]  # fmt: skip
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)  # fmt: skip
    partial = out.with_name(f".{out.name}.partial")
    written: list[Path] = []
    deadline = time.monotonic() + 180
    while len(written) < 2:  # the one actor takes the shards in order and blocks at shard 2
        assert driver.poll() is None, f"embed exited early: {driver.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no 2 shards after 180 s: {written}"
        time.sleep(0.2)
        written = sorted(partial.glob("shard-*.safetensors"))
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written}
    assert sorted(kept) == ["shard-00000.safetensors", "shard-00001.safetensors"] and not out.exists(), (
        f"killed at shard 2: {sorted(kept)}, cache at OUT: {out.exists()}"
    )
    plan = plan_text_cache(
        prompts, out, model_path=str(tiny_flux_dir), revision=None, max_sequence_length=LENGTH,
        dtype=torch.float32, sources=[str(tmp_path / "prompts.txt")], shard_size=2,
    )  # fmt: skip
    assert plan.todo == [2, 3, 4], f"the same request again: shards {plan.todo} to do"
    cfg = tiny_cfg(tiny_flux_dir, tmp_path)
    _, encoded = run_embed_job(cfg, plan, batch_size=2, resources=ActorResources(1, HALF_CPU), progress=False)
    assert encoded == 3, f"the resumed run encoded {encoded} shards, want 3 (2, 3, 4)"
    for name, stamp in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    assert TextCache(out).missing(prompts) == [], "the resumed cache holds every prompt"


def test_eval_tables_are_the_same_on_one_actor_two_actors_and_one_process(
    ray_cluster, tiny_flux_dir, tmp_path
):
    from diffusers import FluxTransformer2DModel

    # Two weights: the base model and a transformer folder with other weights (a "trained" checkpoint).
    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_flux_dir / "transformer"))
    with torch.no_grad():
        for param in transformer.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    transformer.save_pretrained(tmp_path / "tuned")
    # 5 world prompts x 2 images in units of 2: 6 units, an odd number for 2 actors; the reward is served.
    cfg = tiny_cfg(tiny_flux_dir, tmp_path, **{"eval.images_per_prompt": 2, "eval.batch_size": 2})
    prompts = str(Path(load_config(TINY_CONFIG).train.prompts))
    weights = ["base", str(tmp_path / "tuned")]
    plan = plan_eval(cfg, weights, prompts, ["world", "color_match"], 5, build_rewards=False)
    ensure_reward_service(cfg)  # deployed once for both jobs (a job deletes only what it deployed itself)
    tables: dict[str, list[Path]] = {}
    for actors in (1, 2):
        started = time.monotonic()
        sampled = run_eval_job(cfg, plan, resources=ActorResources(actors, HALF_CPU), progress=False)
        print(f"eval on {actors} actor(s): {time.monotonic() - started:.1f}s")
        for which, name in enumerate(plan.names):
            images, per_image = sampled[which]
            folder = tmp_path / f"actors{actors}" / name
            tables.setdefault(name, []).append(
                write_eval_folder(plan, which, folder, images, per_image).table
            )
    # One process, as `leapalign eval` without --actors runs it: the reward built here, torch threads as the
    # config says (train.torch_threads=1, as in the actors and the replica: a mean's bits depend on threads).
    local = with_overrides(cfg, {"reward.serve": False})
    in_process = plan_eval(local, weights, prompts, ["world", "color_match"], 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.torch_threads)
    try:
        for which, name in enumerate(plan.names):
            tables[name].append(evaluate_weights(local, in_process, which, tmp_path / "local" / name).table)
    finally:
        torch.set_num_threads(threads)

    for name, (one, two, here) in tables.items():
        table = pq.read_table(one)
        assert table.num_rows == 10 and "reward/color_match" in table.column_names, f"{name}: {table.schema}"
        assert table.equals(pq.read_table(two)), f"{name}: 1 actor vs 2 actors give different tables"
        # One process: the same images and judge; the reward built here instead of served (its replica
        # computes the same mean in another order: last-bit differences, seen 1.2e-7).
        local_table = pq.read_table(here)
        rewards = "reward/color_match"
        assert table.drop_columns([rewards]).equals(local_table.drop_columns([rewards])), (
            f"{name}: Ray Data vs one process give different tables"
        )
        assert table.column(rewards).to_pylist() == pytest.approx(
            local_table.column(rewards).to_pylist(), rel=1e-6
        ), f"{name}: served vs in-process reward"
        for image in table.column("image").to_pylist():
            same = (one.parent / image).read_bytes() == (two.parent / image).read_bytes() == (
                here.parent / image).read_bytes()  # fmt: skip
            assert same, f"{name} {image}: the images differ between 1 actor, 2 actors and one process"
    base, tuned = (pq.read_table(tables[n][0]).column("reward/color_match").to_pylist() for n in plan.names)
    assert base != tuned, "the two weights must give different images (else the test compares nothing)"
