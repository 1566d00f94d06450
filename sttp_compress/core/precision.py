"""float32 matmul and convolution precision (TF32 or full IEEE float32) on CUDA: read, set and restore it.

torch has two APIs for it: the legacy one (`torch.set_float32_matmul_precision`, `torch.backends.cudnn.allow_tf32`,
`torch.backends.cuda.matmul.allow_tf32`) and, since torch 2.9, the `fp32_precision` attributes. Once the new
attributes are set (as torch's docs now advise), every legacy read raises ("you have used mix of the legacy
and new APIs"); and setting them in a process that used the legacy API (or none) makes
`torch.get_float32_matmul_precision()`, which torch.compile reads, raise in turn. So the precision is read
through the new attributes (they never raise and follow legacy settings) and set through the API the process
already uses: the legacy one while its flags still read, else the new one. Nothing else in the package
touches either API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["PRECISIONS", "cuda_matmul_tf32", "cudnn_conv_tf32", "float32_precision"]

PRECISIONS = ("tf32", "ieee")


def _new_api() -> bool:
    """Whether this torch has the `fp32_precision` attributes (torch >= 2.9)."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _legacy_reads() -> bool:
    """Whether the legacy flags still read (no new-API setting has been made in this process)."""
    try:
        return torch.backends.cuda.matmul.allow_tf32 is not None and torch.backends.cudnn.allow_tf32 is not None
    except RuntimeError:
        return False


def _resolved(*levels: object) -> str:
    """The first `fp32_precision` other than 'none' from the most specific level up ('none' throughout: IEEE)."""
    for level in levels:
        value = getattr(level, "fp32_precision", "none")
        if value != "none":
            return value
    return "ieee"


def cuda_matmul_tf32() -> bool:
    """Whether float32 matmuls on CUDA run as TF32 now."""
    if not _new_api():
        return torch.get_float32_matmul_precision() != "highest"
    return _resolved(torch.backends.cuda.matmul, torch.backends) == "tf32"


def cudnn_conv_tf32() -> bool:
    """Whether float32 convolutions on cuDNN run as TF32 now."""
    if not _new_api():
        return bool(torch.backends.cudnn.allow_tf32)
    return _resolved(torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends) == "tf32"


class _Setting:
    """One precision setting: how to read and write it, and its value for 'tf32' / 'ieee'."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], object], tf32: Any, ieee: Any):
        self.get, self.put, self.values = get, put, {"tf32": tf32, "ieee": ieee}


def _settings(matmul: str | None, conv: str | None) -> list[tuple[_Setting, Any]]:
    """The settings to make for `matmul` / `conv` (None: leave it), in the API the process uses."""
    if _new_api() and not _legacy_reads():
        mm = _Setting(lambda: torch.backends.cuda.matmul.fp32_precision,
                      lambda v: setattr(torch.backends.cuda.matmul, "fp32_precision", v), "tf32", "ieee")
        cv = _Setting(lambda: torch.backends.cudnn.conv.fp32_precision,
                      lambda v: setattr(torch.backends.cudnn.conv, "fp32_precision", v), "tf32", "ieee")
    else:  # the matmul precision, not the matmul allow_tf32 flag: that one leaves the precision unreadable
        mm = _Setting(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "high", "highest")
        cv = _Setting(lambda: torch.backends.cudnn.allow_tf32,
                      lambda v: setattr(torch.backends.cudnn, "allow_tf32", v), True, False)
    wanted = ((mm, matmul, cuda_matmul_tf32), (cv, conv, cudnn_conv_tf32))
    # a precision already in force is left alone: nothing the caller set changes, on CUDA or beside it (the
    # legacy matmul precision also sets the CPU's oneDNN matmuls)
    return [(s, s.values[value]) for s, value, now in wanted if value is not None and now() != (value == "tf32")]


@contextmanager
def float32_precision(matmul: str | None = None, conv: str | None = None) -> Iterator[None]:
    """CUDA float32 matmuls (cuBLAS) and convolutions (cuDNN) at `matmul` / `conv` precision inside ('tf32' or
    'ieee'; None leaves one as it is), the caller's settings restored after, also when the body raises. Where the
    precision asked is already in force, nothing is set."""
    for value in (matmul, conv):
        if value is not None and value not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {value!r}")
    settings = _settings(matmul, conv)
    before = [s.get() for s, _ in settings]
    try:
        for s, value in settings:
            s.put(value)
        yield
    finally:
        for (s, _), value in zip(settings, before):
            s.put(value)
