"""The same CPU numbers on every x86-64 machine: pin the kernels' instruction set (train.cpu_isa).

Three libraries pick their CPU kernels by the machine's instruction set, and AVX-512 kernels sum in another
order than AVX2 ones, so the last bits of a matmul differ between CPU families. Adam's first steps turn
those bits into a different run (measured: an AVX2 and an AVX-512 machine agreed on the quickstart's first
loss to 2e-6 and parted after the first update). `train.cpu_isa: avx2` pins all three to AVX2, which every
x86-64 CPU of the last decade runs:

    ATEN_CPU_CAPABILITY=avx2   PyTorch's own kernels (elementwise, reductions, softmax, norms)
    MKL_CBWR=AVX2,STRICT       MKL's BLAS (matmuls): conditional numerical reproducibility on the AVX2 code
                               path; STRICT also makes a row's result independent of the other rows of its
                               batch (measured: 6 of 18 linear shapes differed by batch without it, 0 with)
    ONEDNN_MAX_CPU_ISA=AVX2    oneDNN (convolutions, the VAE and the reward's vision tower)

Each is read once per process, when the library first runs a kernel: the variables must be in the
environment before then. `leapalign` sets them before it touches torch (the CLI reads the config first),
Ray workers and reward replicas get them through their runtime_env, and the scripts export them for tests.
Thread counts change summation order too: pin train.torch_threads (a Ray worker and a served reward use
their own settings, the same on every machine). GPUs are unaffected.
"""

from __future__ import annotations

import os
import sys

# OpenMP's thread settings, passed on from this process's environment to every process a run starts (Ray
# workers and reward replicas through their runtime_env: a remote cluster does not inherit the driver's
# environment). Nothing is forced: measured on 2 cores (bench/README.md), OMP_WAIT_POLICY=PASSIVE cut a Ray
# worker's quickstart update from 5.3 to 1.5 s on a loaded machine but doubled it on a quiet one (0.28 -> 0.63 s
# in one process, 0.37 -> 0.66 s on the Ray path). Timing only: the numbers do not change.
THREAD_KEYS = ("OMP_WAIT_POLICY",)
CPU_ISAS = ("native", "avx2")
ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {},
}


def cpu_isa_env(isa: str) -> dict[str, str]:
    """The environment variables that pin `isa` (nothing for native)."""
    if isa not in ISA_ENV:
        raise ValueError(f"train.cpu_isa={isa!r}: use one of {', '.join(CPU_ISAS)}")
    return dict(ISA_ENV[isa])


def thread_env() -> dict[str, str]:
    """The THREAD_KEYS this process's environment sets."""
    return {key: os.environ[key] for key in THREAD_KEYS if key in os.environ}


def process_env(isa: str) -> dict[str, str]:
    """What a process this run starts (Ray worker, reward replica) needs in its environment: the kernel pins
    of `isa` and the thread settings."""
    return {**thread_env(), **cpu_isa_env(isa)}


def use_cpu_isa(isa: str) -> None:
    """Pin this process's CPU kernels to `isa` (native: leave them), before any kernel has run.

    Raises RuntimeError when torch already chose other kernels in this process (the variables are read
    once): then set them in the environment before Python starts (scripts/test.sh shows how)."""
    env = cpu_isa_env(isa)
    if not env:
        return
    os.environ.update(env)
    if "torch" in sys.modules:
        import torch

        chosen = torch.backends.cpu.get_cpu_capability()
        if chosen not in ("AVX2", "DEFAULT") and chosen.upper() != env["ATEN_CPU_CAPABILITY"].upper():
            raise RuntimeError(
                f"train.cpu_isa={isa}: torch already runs {chosen} kernels in this process; start Python with "
                + " ".join(f"{k}={v}" for k, v in env.items())
                + " in the environment (or use train.cpu_isa=native)"
            )
