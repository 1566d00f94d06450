"""Tests for sttp_compress.core.precision: TF32 settings under either of torch's APIs.

torch's API state is sticky (once its new attributes are set, legacy reads raise for the rest of the
process), so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sttp_compress.core.precision import cuda_matmul_tf32, float32_precision

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")

# how a user may have set the precision before calling us
USER_SETTINGS = {
    "untouched": "",
    "legacy flags": "torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = False",
    "legacy precision": "torch.set_float32_matmul_precision('high')",
    "new attributes": "torch.backends.cuda.matmul.fp32_precision = 'tf32'; torch.backends.cudnn.conv.fp32_precision = 'ieee'",
    "new global": "torch.backends.fp32_precision = 'tf32'",
}

CHECK = """
import torch
from sttp_compress.core.precision import cuda_matmul_tf32, float32_precision

def reads():
    out = {}
    for name, read in (("precision", torch.get_float32_matmul_precision),
                       ("matmul", lambda: torch.backends.cuda.matmul.fp32_precision),
                       ("conv", lambda: torch.backends.cudnn.conv.fp32_precision),
                       ("legacy matmul", lambda: torch.backends.cuda.matmul.allow_tf32),
                       ("legacy conv", lambda: torch.backends.cudnn.allow_tf32)):
        try:
            out[name] = read()
        except RuntimeError:
            out[name] = "raises"
    out["matmul"] = "ieee" if out["matmul"] == "none" else out["matmul"]  # none: IEEE, torch's default
    return out

before = reads()
for matmul, conv in (("ieee", "ieee"), ("tf32", None), ("ieee", None)):
    with float32_precision(matmul, conv):
        inside = reads()
        assert cuda_matmul_tf32() is (matmul == "tf32"), (matmul, inside)
        if conv is not None:
            assert inside["conv"] in (conv, "none"), inside  # none: inherits, IEEE here
        if before["precision"] != "raises":  # torch.compile reads it: what read before still reads
            assert inside["precision"] != "raises", (matmul, conv, inside)
    assert reads() == before, (matmul, conv, reads(), before)
try:
    with float32_precision("tf32", "tf32"):
        raise KeyError("boom")
except KeyError:
    pass
assert reads() == before, ("after a raise", reads(), before)
print("ok")
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy API")
@pytest.mark.parametrize("user", list(USER_SETTINGS))
def test_sets_restores_and_keeps_readable_whatever_api_the_user_chose(user):
    proc = _python("import torch\n" + USER_SETTINGS[user] + "\n" + CHECK)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy API")
def test_finetune_and_export_run_when_the_user_set_the_new_api():
    """Reading torch.backends.cuda.matmul.allow_tf32 raised here: sc.finetune failed with a traceback for anyone
    who had set `torch.backends.fp32_precision`, as torch's docs now advise."""
    code = textwrap.dedent("""
        import tempfile, torch
        from pathlib import Path
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        import sttp_compress as sc

        torch.backends.fp32_precision = "tf32"
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        student = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        student.load_state_dict(teacher.state_dict())
        sc.compress_(student, sc.CompressConfig(rank=2), filter_fn=lambda m, n: True)
        x = torch.randn(64, 16)
        data = DataLoader(TensorDataset(x, teacher(x).argmax(1)), batch_size=16)
        sc.finetune(student, teacher, data, sc.FinetuneConfig(steps=2, tf32=True))
        with tempfile.TemporaryDirectory() as tmp:
            sc.export(student.eval(), Path(tmp) / "s.pt2", x[:2])
        assert torch.backends.fp32_precision == "tf32" and torch.backends.cuda.matmul.fp32_precision == "tf32"
        print("ok")
    """)
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_reads_and_restores_in_this_process():
    before = cuda_matmul_tf32()
    with float32_precision(matmul="tf32"):
        assert cuda_matmul_tf32()
        with float32_precision(matmul="ieee"):
            assert not cuda_matmul_tf32()
        assert cuda_matmul_tf32()
    assert cuda_matmul_tf32() is before


def test_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        with float32_precision(matmul="fp16"):
            pass


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy API")
def test_a_precision_already_in_force_sets_nothing():
    """Asking for what is in force touches no setting, the CPU's oneDNN matmuls included (the legacy matmul
    precision would set them too)."""
    code = textwrap.dedent("""
        import torch
        from sttp_compress.core.precision import float32_precision
        torch.set_float32_matmul_precision("medium")  # the user's choice: bf16 oneDNN matmuls on the CPU
        state = lambda: (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                         torch.backends.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision())
        before = state()
        with float32_precision(matmul="tf32", conv="tf32"):  # what "medium" and the default already give
            assert state() == before, (state(), before)
        with float32_precision(matmul="ieee"):
            assert state()[1] == "ieee"
        assert state() == before, (state(), before)
        print("ok")
    """)
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
