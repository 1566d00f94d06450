"""pipeline: the sttp-compress job as a Python API (in-memory model and data), its checks and its outputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sttp_compress.errors import UserError
from sttp_compress.pipeline import CompressJob, collapsed, default_output, run_compress, state_size_bytes
from sttp_compress.train.loop import FinetuneConfig


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 32, generator=gen), torch.randint(0, 4, (96,), generator=gen)
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def test_default_output_and_state_size(tmp_path):
    assert default_output(str(tmp_path / "model.pt")) == tmp_path / "model.sttp.safetensors"
    model = net().half()
    assert state_size_bytes(model) == 4 * sum(p.numel() for p in model.parameters())  # counted as float32


def test_an_in_memory_job_writes_checkpoint_and_report_together(tmp_path):
    out = tmp_path / "m.sttp.safetensors"
    job = CompressJob(module=net(), arch="torch.nn:Identity", rank=4, output=str(out), progress=False,
                      datasets=data(), finetune=FinetuneConfig(epochs=2, batch_size=16, workers=0, device="cpu"))
    report, extras = run_compress(job)
    assert extras["output"] == out and out.is_file()
    on_disk = json.loads((tmp_path / "m.sttp.report" / "report.json").read_text())
    assert on_disk == report
    assert report["totals"]["size_bytes_compressed"] == out.stat().st_size
    assert report["finetune"]["epochs"] == 2 and len(report["finetune"]["curve"]) == 2
    assert [l["name"] for l in report["layers"]] == ["0", "2"]  # the classifier (last Linear) stays dense
    timings = report["timings"]
    assert set(timings) == {"load", "convert", "finetune", "save", "total"} and timings["finetune"] > 0
    assert timings["total"] >= timings["load"] + timings["convert"] + timings["finetune"]


@pytest.mark.parametrize("change,fragment", [({"dtype": "int3"}, "dtype"), ({"method": "tucker"}, "method"),
                                             ({"rank": None}, "ratio"), ({"augment": "x"}, "augment")])
def test_bad_jobs_fail_before_any_work(tmp_path, change, fragment):
    job = CompressJob(module=net(), rank=4, output=str(tmp_path / "m.sttp.safetensors"), progress=False)
    for key, value in change.items():
        setattr(job, key, value)
    with pytest.raises(UserError, match=fragment):
        run_compress(job)
    assert list(tmp_path.iterdir()) == []


def test_a_fine_tune_that_keeps_under_half_the_original_accuracy_counts_as_collapsed():
    """Measured on an H100: MobileNetV2 at ratio 46 ended at 10% (chance) with exit 0; the CLI now warns."""
    assert collapsed({"original_val_accuracy": 88.2, "val_accuracy_after": 10.0})
    assert collapsed({"original_val_accuracy": 88.2, "val_accuracy_after": 44.0})
    assert not collapsed({"original_val_accuracy": 88.2, "val_accuracy_after": 80.6})
    assert not collapsed({"val_cosine_after": 0.2})  # text distillation: no accuracies
