"""The torchao-style Python API (sttp_compress/api.py, docs/python-api.md): compress_, finetune, save, load."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

import sttp_compress as sc
from sttp_compress.compress.convert import compressed_layers
from sttp_compress.example import DigitsCNN, digits_data

DIGITS = "sttp_compress.example:DigitsCNN"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN().eval()


def test_compress_in_place_keeps_layer_types_and_reaches_the_ratio():
    model = _model()
    types = {n: type(m) for n, m in model.named_modules()}
    report = sc.compress_(model, sc.CompressConfig(ratio=10))
    assert all(isinstance(m, types[n]) for n, m in model.named_modules() if n in types)  # parametrize subclasses
    assert abs(report["totals"]["ratio"] - 10) / 10 < 0.03
    assert sc.count_parameters(model) == report["totals"]["params_compressed"]
    assert "features.0" not in compressed_layers(model)  # the first convolution stays dense by default


def test_filter_fn_chooses_among_every_layer_it_is_shown():
    model = _model()
    seen = []

    def only_convs(module: nn.Module, name: str) -> bool:
        seen.append((name, type(module).__name__))
        return isinstance(module, nn.Conv2d)

    sc.compress_(model, sc.CompressConfig(rank=4), filter_fn=only_convs)
    assert {n for n, _ in seen} == {"features.0", "features.2", "features.6", "classifier.1", "classifier.3"}
    assert set(compressed_layers(model)) == {"features.0", "features.2", "features.6"}  # the first conv too
    with pytest.raises(sc.UserError, match="filter_fn accepts no layer"):
        sc.compress_(_model(), sc.CompressConfig(rank=4), filter_fn=lambda m, n: False)


@pytest.mark.parametrize("config,message", [
    (sc.CompressConfig(), "exactly one of ratio or rank"),
    (sc.CompressConfig(ratio=10, rank=4), "exactly one of ratio or rank"),
    (sc.CompressConfig(ratio=0.5), r"^ratio must be > 1"),
    ({"ratio": 10}, "config must be a CompressConfig"),
])
def test_bad_configs_are_one_line_errors_in_python_terms(config, message):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sc.UserError, match=message):
        sc.compress_(model, config)
    assert not compressed_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_finetune_save_and_load(tmp_path):
    model = _model()
    teacher = copy.deepcopy(model)
    sc.compress_(model, sc.CompressConfig(ratio=10))
    train, val = digits_data()
    block = sc.finetune(model, teacher, DataLoader(train, batch_size=64, shuffle=True),
                        sc.FinetuneConfig(steps=6, device="cpu", workers=0), val_loader=DataLoader(val, batch_size=256))
    assert block["steps"] == 6 and 0 <= block["val_accuracy_after"] <= 100
    path = tmp_path / "digits.sttp.safetensors"
    size = sc.save(model, path, arch=DIGITS)
    assert size == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["arch"] == DIGITS
    loaded = sc.load(path)
    x = val.tensors[0][:16]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training
    sc.save(model, path, arch=DIGITS)  # overwrites, as torch.save does
    with pytest.raises(sc.UserError, match="exists"):
        sc.save(model, path, arch=DIGITS, overwrite=False)
