"""io.checkpoint and io.sources' trust rule: what a compressed checkpoint holds, the round trip, which
recorded architecture specs are built on their own."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sttp_compress.compress.batchnorm import ChannelAffine, fold_batchnorm_
from sttp_compress.compress.convert import compress
from sttp_compress.errors import UserError
from sttp_compress.example import DigitsCNN
from sttp_compress.io.checkpoint import (FORMAT, FORMAT_VERSION, checkpoint_payload, load_compressed, read_compressed,
                                         recorded_arch, save_compressed)
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
    assert payload["format"] == FORMAT and payload["format_version"] == 3 < FORMAT_VERSION  # the lowest that holds it
    assert payload["batchnorm_affine"] == []
    assert payload["arch"] == DIGITS and payload["dtype"] == "float16" and payload["meta"] == {"params_original": 1}
    assert set(payload["layers"]) and all({"weight_shape", "rank", "method", "spectrum"} <= set(c)
                                          for c in payload["layers"].values())
    assert set(payload["state_dict"]) == set(model.state_dict())
    assert {t.dtype for t in payload["state_dict"].values() if t.is_floating_point()} == {torch.float16}
    with pytest.raises(UserError, match="dtype"):
        checkpoint_payload(model, DIGITS, "int3")


@pytest.mark.parametrize("name", ["m.sttp.safetensors", "m.sttp.pt"])
@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-2)])
def test_round_trip(model, tmp_path, name, dtype, tol):
    path = tmp_path / name
    size = save_compressed(model, path, DIGITS, dtype=dtype)
    data = read_compressed(path)
    assert size == path.stat().st_size and data["dtype"] == dtype
    assert data["format_version"] == (3 if name.endswith(".safetensors") else 1)
    rebuilt, info = load_compressed(path)
    assert "state_dict" not in info and info["arch"] == DIGITS
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=tol, atol=tol)
    with pytest.raises(UserError, match="exists"):
        save_compressed(model, path, DIGITS)


def test_any_safetensors_reader_opens_the_checkpoint(model, tmp_path):
    """The file is plain safetensors: the state dict's tensors, and JSON metadata; no pickle."""
    path = tmp_path / "m.sttp.safetensors"
    save_compressed(model, path, DIGITS, meta={"params_original": 620170})
    with safe_open(str(path), framework="pt") as f:
        header, keys = f.metadata(), set(f.keys())
        torch.testing.assert_close(f.get_tensor("features.0.weight"), model.state_dict()["features.0.weight"])
    empty = {k for k, v in model.state_dict().items() if v.numel() == 0}  # frames with no free parameter
    assert empty and keys == set(model.state_dict()) - empty  # format 3 leaves them to the recorded structure
    assert header["format"] == FORMAT and header["format_version"] == "3" and header["arch"] == DIGITS
    assert json.loads(header["meta"]) == {"params_original": 620170}
    assert json.loads(header["layers"]) == checkpoint_payload(model, DIGITS)["layers"]
    assert not path.read_bytes().startswith(b"PK")  # not a torch zip


def test_format_2_files_with_their_zero_size_tensors_still_load(model, tmp_path):
    """Format 2 stored every tensor, the zero-size ones too: such a file loads to the same model."""
    from safetensors.torch import save_file

    path = tmp_path / "v2.sttp.safetensors"
    save_compressed(model, path, DIGITS)
    with safe_open(str(path), framework="pt") as f:
        header = {**f.metadata(), "format_version": "2"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=header)
    rebuilt, info = load_compressed(path, DIGITS)
    assert info["format_version"] == 2
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.fixture(scope="module")
def folded(model):
    """The compressed DigitsCNN with its BatchNorms (trained statistics) folded into their affines."""
    torch.manual_seed(1)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for bn in (m.features[3], m.features[7]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    reference = copy.deepcopy(m)
    assert fold_batchnorm_(m) == ["features.3", "features.7"]
    return m, reference


@pytest.mark.parametrize("name", ["m.sttp.safetensors", "m.sttp.pt"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("int8", 5e-2)])
def test_folded_batchnorms_round_trip_as_affines_in_format_4(folded, tmp_path, name, dtype, tol):
    """A folded model's file records its affines (format 4) and loads back as the same model; in eval mode it
    computes what the model with its BatchNorms computed."""
    m, reference = folded
    path = tmp_path / name
    save_compressed(m, path, DIGITS, dtype=dtype)
    data = read_compressed(path)
    assert data["batchnorm_affine"] == ["features.3", "features.7"]
    assert data["format_version"] == (4 if name.endswith(".safetensors") else 1)
    assert not [k for k in data["state_dict"] if "running" in k or "num_batches" in k]
    rebuilt, _ = load_compressed(path)
    assert isinstance(rebuilt.features[3], ChannelAffine) and isinstance(rebuilt.features[7], ChannelAffine)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), reference(x), rtol=tol, atol=tol)


def test_a_folded_int8_file_is_smaller_by_the_running_statistics(folded, tmp_path):
    m, reference = folded
    sizes = [save_compressed(net, tmp_path / f"{i}.sttp.safetensors", DIGITS, dtype="int8")
             for i, net in enumerate((reference, m))]
    channels = 64 + 128  # two float16 vectors a channel, the counters and their header entries less
    assert sizes[0] - sizes[1] > 2 * 2 * channels


def test_a_recorded_affine_the_architecture_cannot_take_is_one_user_error(folded, tmp_path):
    from safetensors.torch import save_file

    m, _ = folded
    path = tmp_path / "m.sttp.safetensors"
    save_compressed(m, path, DIGITS)
    with safe_open(str(path), framework="pt") as f:
        header, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(path), metadata={**header, "batchnorm_affine": json.dumps(["features.3", "features.0"])})
    with pytest.raises(UserError, match="does not match .*features.0 is a Conv2d, not a BatchNorm"):
        load_compressed(path)
    save_file(state, str(path), metadata={**header, "batchnorm_affine": json.dumps({"features.3": 1})})
    with pytest.raises(UserError, match="damaged.*'batchnorm_affine' is"):
        read_compressed(path)


def test_damaged_safetensors_metadata_is_one_user_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.sttp.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "format_version": "2", "layers": "{oops"})
    with pytest.raises(UserError, match="metadata 'layers' is not JSON"):
        read_compressed(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "format_version": "9"})
    with pytest.raises(UserError, match="format version 9"):
        read_compressed(path)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(UserError, match="not a readable sttp-compress checkpoint"):
        read_compressed(path)


def test_recorded_arch_keeps_no_path_of_this_machine(tmp_path):
    assert recorded_arch("models/net.py:build?width=2") == ("net.py:build?width=2", {})
    assert recorded_arch(f"{tmp_path}/net.py:build") == ("net.py:build", {})
    assert recorded_arch("torchvision:resnet18?num_classes=10") == ("torchvision:resnet18?num_classes=10", {})
    assert recorded_arch(DIGITS) == (DIGITS, {})
    assert recorded_arch(None) == (None, {})
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    spec, check = recorded_arch(f"hf:{folder}")
    assert spec == "hf:my-encoder" and len(check["hf_config_sha256"]) == 64


NET = """import torch.nn as nn
def build():
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
"""


def test_a_checkpoint_moved_to_another_folder_opens_with_the_moved_architecture(tmp_path):
    """Written in one folder, moved with its architecture file elsewhere (the old folder gone), reopened by
    the API and sttp-eval with the architecture's new place; the checkpoint records no old path."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    (first / "net.py").write_text(NET)
    torch.manual_seed(0)
    ns: dict = {}
    exec(NET, ns)
    torch.save(ns["build"]().state_dict(), first / "net.pt")
    cli = [sys.executable, "-c", "from sttp_compress.cli import compress_main; compress_main()"]
    done = subprocess.run(cli + [str(first / "net.pt"), "--arch", f"{first / 'net.py'}:build", "--rank", "4",
                                 "--include", "*", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert str(first).encode() not in (first / "net.sttp.safetensors").read_bytes()
    shutil.move(first, second)
    moved = second / "net.sttp.safetensors"
    with pytest.raises(UserError, match="net.py:build"):  # a file spec needs the user's word
        load_compressed(moved)
    model, info = load_compressed(moved, arch=f"{second / 'net.py'}:build")
    assert info["arch"] == "net.py:build"
    dense = ns["build"]()
    dense.load_state_dict(torch.load(second / "net.pt", weights_only=True))
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert 0 < (model(x) - dense(x)).norm() < dense(x).norm()  # rank 4 of 32: close, not equal
    run = subprocess.run([sys.executable, "-c", "from sttp_compress.cli import eval_main; eval_main()", str(moved),
                          "--arch", f"{second / 'net.py'}:build", "--input-shape", "32", "--quiet"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr


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
