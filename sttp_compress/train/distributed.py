"""Multi-process fine-tuning under torchrun: joining the process group and the few collectives the job needs.

`torchrun --nproc-per-node N -m sttp_compress.cli ...` starts N copies of the command with
WORLD_SIZE/RANK/LOCAL_RANK in their environment. Each copy joins the process group (NCCL on
CUDA, gloo on CPU) and uses cuda:LOCAL_RANK. Rank 0 (the "main" process) converts the model and
broadcasts the result, shows progress and writes every file; fine-tuning runs under
`DistributedDataParallel` with the data sharded across ranks (see train/loop.py, data/images.py).

Errors: a `UserError` inside `agreed()` (or `run_on_main`) on any rank becomes a `SharedUserError`
with the same message on every rank, so all ranks stop together instead of waiting on a
collective the failed rank never joins; only rank 0 prints it (cli.py).

Test hook: with STTP_DEBUG_STATE_DIR=DIR set, every rank saves its model state after the
conversion and after fine-tuning to DIR/rank<R>-<stage>.pt (tests compare them across ranks).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sttp_compress.errors import SharedUserError, UserError

__all__ = ["launched", "active", "rank", "world", "local_rank", "is_main", "setup", "teardown",
           "SharedUserError", "agreed", "raise_agreed", "run_on_main", "all_sum", "broadcast_object",
           "broadcast_state", "average_buffers", "check_equal", "barrier", "debug_dump_state",
           "convert_once", "process_device"]

# Rank 0 converts the model while the others wait in a broadcast: allow for a long conversion.
TIMEOUT = datetime.timedelta(minutes=60)
DEBUG_STATE_ENV = "STTP_DEBUG_STATE_DIR"


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) as one of several."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """True while a process group of more than one process is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (the launcher's RANK before set-up and after tear-down; 0 alone)."""
    return dist.get_rank() if active() else (_env_int("RANK", 0) if launched() else 0)


def world() -> int:
    """Number of processes in the job (1 without a launcher)."""
    return dist.get_world_size() if active() else (_env_int("WORLD_SIZE", 1) if launched() else 1)


def local_rank() -> int:
    """This process's rank on its machine: the CUDA device it uses."""
    return _env_int("LOCAL_RANK", 0) if launched() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that shows progress and writes files."""
    return rank() == 0


def _wants_cuda(device: str) -> bool:
    """Whether a --device value asks for CUDA (auto does when CUDA is available)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def setup(device: str = "auto") -> torch.device:
    """Join the launcher's process group (NCCL for CUDA, gloo for CPU) and return this process's device.

    The group is joined first, even when `device` is unusable, so that the error reaches every
    rank through `agreed()`: call this, then validate inside `with agreed():`.
    """
    device = str(device)
    cuda = _wants_cuda(device) and torch.cuda.is_available()
    if cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device("cuda", local_rank())} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
        except TypeError:  # torch without device_id
            dist.init_process_group(backend, timeout=TIMEOUT)
    with agreed():
        return process_device(device)


def process_device(device: str) -> torch.device:
    """The device of this process under a launcher: cuda:LOCAL_RANK for CUDA, else CPU; UserError if unusable."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"under torchrun each process uses cuda:LOCAL_RANK; pass ‹device› cuda, cpu or auto, "
                        f"not {device!r}")
    if not _wants_cuda(device):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("‹device› cuda requested but CUDA is not available")
    if local_rank() >= torch.cuda.device_count():
        raise UserError(f"process with LOCAL_RANK {local_rank()} has no GPU: this machine has "
                        f"{torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", local_rank())


def teardown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# errors that stop every rank together


def raise_agreed(error: BaseException | None) -> None:
    """Collective: raise SharedUserError on every rank if any rank passes an error (its message, lowest rank first)."""
    if not active():
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, message = failed[0]
        suffix = "" if r == rank() or r == 0 else f" (on rank {r})"
        raise SharedUserError(message + suffix) from (error if error is not None else None)


@contextmanager
def agreed() -> Iterator[None]:
    """Run a block on every rank; a UserError on any rank is raised on all of them (see module notes)."""
    error = None
    try:
        yield
    except UserError as e:
        if not active():
            raise
        error = e
    raise_agreed(error)


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run fn() on rank 0 only and return its (picklable) result on every rank.

    A UserError on rank 0 becomes a SharedUserError on every rank; any other exception on rank 0
    is re-raised there and stops the others with a SharedUserError naming it.
    """
    if not active():
        return fn()
    payload: list[Any] = [None]
    error = None
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except UserError as e:
            payload[0] = ("error", str(e))
        except Exception as e:  # a bug on rank 0: tell the others, then fail loudly here
            error = e
            payload[0] = ("error", f"rank 0 failed: {type(e).__name__}: {e}")
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "error":
        raise SharedUserError(value)
    return value


# ---------------------------------------------------------------------------------------------
# the conversion, once


def convert_once(model: nn.Module, convert: Callable[[nn.Module], Any],
                 device: torch.device | str | None = None) -> Any:
    """Run `convert(model)` (compresses it in place) on rank 0 only; every rank ends with the same model.

    The conversion (rank allocation and TT-SVDs: the expensive, numerically delicate part) runs
    once. Rank 0 broadcasts its result and each layer's config (rank, method, spectrum); the other
    ranks attach the same structures without a TT-SVD, then every parameter and buffer is
    broadcast from rank 0, so all ranks hold bit-identical models. The model is moved to `device`
    first (the process's GPU under NCCL). Returns convert's (picklable) result on every rank.
    """
    if not active():
        return convert(model)
    from sttp_compress.compress.convert import attach_structure, compressed_layers

    def on_main() -> tuple[Any, dict]:
        result = convert(model)
        return result, {n: p.config() for n, p in compressed_layers(model).items()}

    result, plan = run_on_main(on_main)
    if not is_main():
        modules = dict(model.named_modules())
        for name, cfg in plan.items():
            attach_structure(modules[name], cfg)
    if device is not None:
        model.to(device)
    broadcast_state(model)
    return result


# ---------------------------------------------------------------------------------------------
# tensors


def all_sum(t: Tensor) -> Tensor:
    """Sum `t` over ranks in place (on the process group's device) and return it; a no-op alone."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Overwrite every parameter and buffer (or only the buffers) with rank `src`'s values, in place."""
    if not active():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    comm = _comm_device()
    with torch.no_grad():
        for t in tensors:
            if t.device == comm:
                dist.broadcast(t.data, src=src)
            else:  # e.g. a CPU tensor under NCCL: through the process's GPU
                buf = t.data.to(comm)
                dist.broadcast(buf, src=src)
                t.data.copy_(buf)


def _comm_device() -> torch.device:
    """Where the process group's collectives take tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_buffers(module: nn.Module, kinds: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)) -> None:
    """Average the floating-point buffers of `kinds` modules over ranks (BatchNorm statistics)."""
    if not active():
        return
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, kinds):
                for b in m.buffers(recurse=False):
                    if b.is_floating_point():
                        dist.all_reduce(b.data, op=dist.ReduceOp.SUM)
                        b.data.div_(dist.get_world_size())


def check_equal(value: int, what: str) -> None:
    """Raise SharedUserError on every rank unless every rank passes the same integer."""
    if not active():
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, int(value))
    if len(set(values)) > 1:
        raise SharedUserError(f"{what} differs across processes ({values}); every rank must see the same data")


# ---------------------------------------------------------------------------------------------
# test hook


def debug_dump_state(module: nn.Module, stage: str) -> None:
    """Save this rank's state to $STTP_DEBUG_STATE_DIR/rank<R>-<stage>.pt when that variable is set (tests)."""
    folder = os.environ.get(DEBUG_STATE_ENV)
    if not folder:
        return
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, os.path.join(folder, f"rank{rank()}-{stage}.pt"))
