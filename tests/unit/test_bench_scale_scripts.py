"""The scale-out benchmarks import and parse their arguments here (they run on GPUs or take minutes)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import REPO


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flux_gpu_scale_parses_and_refuses_full_size_without_cuda():
    bench = load_bench("flux_gpu_scale")
    args = bench.parse_args([])
    assert args.modes == ["lora", "full"] and args.res is None and args.steps == 25, f"defaults {args}"
    args = bench.parse_args(["--modes", "full", "--res", "512", "--batch", "2", "--cpu-offload"])
    assert (args.modes, args.res, args.batch, args.cpu_offload) == (["full"], 512, 2, True), f"{args}"
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "4"])  # the leap pair needs N >= 6
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs CUDA"):
            bench.main(["--modes", "lora"])  # never a 12B model on CPU


def test_scale_out_bench_parses():
    bench = load_bench("scale_out")
    args = bench.parse_args(["--strategies", "fsdp2", "--workers", "2", "--steps", "1"])
    assert (args.strategies, args.workers, args.steps) == (["fsdp2"], [2], 1), f"{args}"
    table = bench.format_table(
        [{"strategy": "fsdp2", "workers": 2, "state_mib": 1.0, "peak_mib": 2.0, "step_s": 0.1}]
    )
    assert "fsdp2" in table and "2.00" in table, table
