"""io.checkpoint and io.sources' trust rule: what a compressed checkpoint holds, the round trip, which
recorded architecture specs are built on their own."""

from __future__ import annotations

import pytest
import torch

from sttp_compress.compress.convert import compress
from sttp_compress.errors import UserError
from sttp_compress.example import DigitsCNN
from sttp_compress.io.checkpoint import (FORMAT, FORMAT_VERSION, checkpoint_payload, load_compressed, portable_arch,
                                         read_compressed, save_compressed)
from sttp_compress.io.sources import recorded_arch_problem

DIGITS = "sttp_compress.example:DigitsCNN"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DigitsCNN()
    assert compress(m, rank=4)
    return m.eval()


def test_payload_holds_the_format_the_layers_and_the_state(model):
    payload = checkpoint_payload(model, DIGITS, "float16", {"params_original": 1})
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    assert payload["arch"] == DIGITS and payload["dtype"] == "float16" and payload["meta"] == {"params_original": 1}
    assert set(payload["layers"]) and all({"weight_shape", "rank", "method", "spectrum"} <= set(c)
                                          for c in payload["layers"].values())
    assert set(payload["state_dict"]) == set(model.state_dict())
    assert {t.dtype for t in payload["state_dict"].values() if t.is_floating_point()} == {torch.float16}
    with pytest.raises(UserError, match="dtype"):
        checkpoint_payload(model, DIGITS, "int3")


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-2)])
def test_round_trip(model, tmp_path, dtype, tol):
    path = tmp_path / "m.sttp.pt"
    size = save_compressed(model, path, DIGITS, dtype=dtype)
    assert size == path.stat().st_size and read_compressed(path)["dtype"] == dtype
    rebuilt, info = load_compressed(path)
    assert "state_dict" not in info and info["arch"] == DIGITS
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=tol, atol=tol)
    with pytest.raises(UserError, match="exists"):
        save_compressed(model, path, DIGITS)


def test_portable_arch_makes_file_specs_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable_arch("models/net.py:build") == f"{tmp_path}/models/net.py:build"
    assert portable_arch("torchvision:resnet18?num_classes=10") == "torchvision:resnet18?num_classes=10"
    assert portable_arch(None) is None


@pytest.mark.parametrize("spec,runs_code", [
    ("torchvision:resnet18?num_classes=10", False),
    (DIGITS, False),
    ("torchvision:resnet18?weights='DEFAULT'", True),
    ("torchvision:resnet18?weights_backbone='X'", True),
    ("torchvision:models.resnet18", True),
    ("os:system?command='ls'", True),
    ("sttp_compress.cli:compress_main", True),
    ("net.py:build", True),
    ("hf:/no/such/folder", True),
    ("no colon at all", True),
    ("", True),
])
def test_which_recorded_specs_are_data(spec, runs_code):
    assert (recorded_arch_problem(spec) is not None) == runs_code


def test_a_local_hf_folder_is_data(tmp_path):
    assert recorded_arch_problem(f"hf:{tmp_path}") is None
