"""A one-rank DCP checkpoint (a 1-worker Ray run) runs no collective and round-trips exactly.

DCP's collectives slowed every later update of a 1-worker Ray run by 1.7x on 2 cores (leapalign/parallel.py
single_rank); with one rank they are skipped (no_dist).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from leapalign.parallel import load_state, save_state, single_rank

COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
               "all_reduce", "all_gather", "barrier", "broadcast")  # fmt: skip


def test_one_rank_checkpoint_runs_no_collective_and_round_trips(tmp_path, monkeypatch):
    assert single_rank(), "no process group: one rank"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert single_rank(), "a process group of one rank"
        calls: list[str] = []
        for name in COLLECTIVES:
            original = getattr(dist, name)
            monkeypatch.setattr(
                dist, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k)
            )
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
        save_state(tmp_path / "ckpt", model, optimizer, ema, {"step": 7}, is_main=True)

        again = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        again_optimizer = torch.optim.AdamW(again.parameters(), lr=0.1)
        again(torch.randn(3, 4)).sum().backward()  # AdamW state to load into
        again_optimizer.step()
        again_ema = {k: torch.zeros_like(v) for k, v in ema.items()}
        state = load_state(tmp_path / "ckpt", again, again_optimizer, again_ema)
    finally:
        dist.destroy_process_group()
    assert calls == [], f"a one-rank save and load run no collective: {calls}"
    assert state["step"] == 7, f"the train state: {state}"
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), f"weight {key} round-trips exactly"
        assert torch.equal(again_ema[key], ema[key]), f"EMA {key} round-trips exactly"
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], again_optimizer.state[q]["exp_avg_sq"]), "AdamW"
