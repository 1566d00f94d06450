"""`sttp-compress --gpus N ...`: the same command, started N times on this machine by torchrun's launcher.

A thin wrapper over `torch.distributed.run` (what the `torchrun` command runs): it is exactly

    torchrun --standalone --nproc-per-node N -m sttp_compress.cli <the same arguments without --gpus>

with the launcher's own log lines silenced (each process reports its errors itself) and the
exit code of the first process that failed (2 for bad input) as this command's exit code.
Several machines: run torchrun yourself with its rendezvous flags (docs/usage.md, "Multi-GPU").
"""

from __future__ import annotations

import logging
import os

import torch

from sttp_compress.train import distributed
from sttp_compress.errors import UserError

__all__ = ["launch_self", "torchrun_args", "without_option"]


def without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` and `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def torchrun_args(nproc: int, cli_args: list[str]):
    """torchrun's parsed arguments for N processes on this machine running `python -m sttp_compress.cli ARGS`.

    ARGS are set after parsing so that torchrun's parser never reads them as its own options.
    """
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module",
                                         "sttp_compress.cli"])
    args.training_script_args = list(cli_args)
    return args


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def launch_self(nproc: int, argv: list[str], device: str = "auto") -> int:
    """Run this command's arguments (minus --gpus) in `nproc` processes; return the exit code.

    `device` cpu starts N CPU processes on the gloo backend (for trying the multi-process path
    without GPUs); otherwise N CUDA devices must be present.
    """
    if distributed.launched():
        raise UserError("--gpus starts its own processes; do not combine it with torchrun")
    if nproc < 1:
        raise UserError(f"--gpus must be at least 1, got {nproc}")
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"with --gpus process i uses cuda:i; pass --device cuda or auto (or cpu for N CPU "
                        f"processes), not {device!r}")
    if device != "cpu":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < nproc:
            raise UserError(f"--gpus {nproc} needs {nproc} CUDA devices; this machine has {found} "
                            "(several machines: see docs/usage.md, Multi-GPU)")
    # torchrun would pin every process to 1 thread; rank 0's conversion runs on the CPU, so share them out
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cpus() // nproc)))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        run(torchrun_args(nproc, without_option(argv, "--gpus")))
    except ChildFailedError as e:
        # the first process that exited with a code (2: bad input); the others were stopped by signal
        failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
        codes = [f.exitcode for f in failures if f.exitcode > 0]
        return codes[0] if codes else 1
    return 0
