"""Tests for sttp_compress.io.sources: checkpoint loading, --arch specs, atomic writes, sizes."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import textwrap

import pytest
import torch
from collections import OrderedDict
from safetensors.torch import save_file
from torch import nn

from sttp_compress.io import outputs
from sttp_compress.errors import UserError
from sttp_compress.io.outputs import atomic_torch_save, atomic_write
from sttp_compress.io.sources import (
    load_model,
    load_weights,
    parse_size,
    resolve_arch,
)

def _tiny() -> nn.Module:
    """A tiny conv + linear net with a BatchNorm (so an integer buffer is present)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)
    )


def _tiny_arch_file(tmp_path) -> str:
    """Write a .py file whose build() makes the same architecture as _tiny(); return its spec."""
    (tmp_path / "tiny_arch.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(16, 5))
    """))
    return f"{tmp_path / 'tiny_arch.py'}:build"


def _error(excinfo, *fragments: str) -> str:
    """Check a UserError message is one line and contains every fragment; return it."""
    msg = str(excinfo.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert "\x1b" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def _assert_same(state: dict, reference: dict) -> None:
    assert list(state) == list(reference)
    for k, v in reference.items():
        assert state[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
        torch.testing.assert_close(state[k], v.float() if v.is_floating_point() else v,
                                   rtol=0, atol=0)


# --------------------------------------------------------------------------- load_weights


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_plain_state_dict_round_trip(tmp_path, suffix):
    sd = _tiny().state_dict()
    path = tmp_path / f"w{suffix}"
    torch.save(sd, path)
    out = load_weights(path)
    assert isinstance(out, dict) and out._metadata == sd._metadata  # module versions kept
    _assert_same(out, sd)
    assert out["1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_wrapper_dicts_are_unwrapped_and_metadata_dropped(tmp_path, key):
    sd = _tiny().state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "arch": "tiny", "lr": 0.1, key: sd, "optimizer": {"step": 3}}, path)
    _assert_same(load_weights(path), sd)


def test_module_prefix_is_stripped_even_inside_a_wrapper(tmp_path):
    sd = _tiny().state_dict()
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    _assert_same(load_weights(path), sd)


def test_module_prefix_kept_when_not_shared_by_all_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"module.a": torch.ones(2), "b": torch.zeros(2)}, path)
    assert list(load_weights(path)) == ["module.a", "b"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tensors_are_upcast_with_values_preserved(tmp_path, dtype):
    half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _tiny().state_dict().items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    out = load_weights(path)
    for k, v in half.items():
        if v.is_floating_point():
            assert out[k].dtype == torch.float32
            assert torch.equal(out[k], v.float())
        else:
            assert out[k].dtype == v.dtype and torch.equal(out[k], v)


def test_float64_is_left_alone(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2, dtype=torch.float64)}, path)
    assert load_weights(path)["w"].dtype == torch.float64


def test_safetensors_round_trip_with_upcast(tmp_path):
    sd = {k: v.contiguous() for k, v in _tiny().state_dict().items()}
    sd["0.weight"] = sd["0.weight"].half()
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    out = load_weights(path)
    assert sorted(out) == sorted(sd)  # safetensors stores keys sorted
    assert out["0.weight"].dtype == torch.float32
    assert torch.equal(out["0.weight"], sd["0.weight"].float())
    assert torch.equal(out["4.bias"], sd["4.bias"])


def test_safetensors_content_under_another_suffix_is_recognised(tmp_path):
    path = tmp_path / "w.bin"
    save_file({"a": torch.arange(3.0)}, str(path))
    assert torch.equal(load_weights(path)["a"], torch.arange(3.0))


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_name_the_first_bad_key(tmp_path, bad, word):
    sd = _tiny().state_dict()
    sd["0.bias"][1] = bad
    sd["4.weight"][0, 0] = bad
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(UserError) as ei:
        load_weights(path)
    msg = _error(ei, "bad.pt", "'0.bias'", word)
    assert "4.weight" not in msg


def test_nan_in_safetensors_half_is_detected(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}, str(path))
    with pytest.raises(UserError) as ei:
        load_weights(path)
    _error(ei, "'x'", "NaN")


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as ei:
        load_weights(tmp_path / "nope.pt")
    _error(ei, "no such file", "nope.pt")


def test_directory_is_refused(tmp_path):
    with pytest.raises(UserError) as ei:
        load_weights(tmp_path)
    _error(ei, "directory")


def _corrupt_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_tiny().state_dict(), good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save(_tiny().state_dict(), legacy, _use_new_zipfile_serialization=False)
    st = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(100)}, str(st))
    files = {
        "random.pt": os.urandom(4096),
        "half.pt": data[: len(data) // 2],
        "legacy_half.pt": legacy.read_bytes()[: legacy.stat().st_size // 2],
        "empty.pt": b"",
        "text.pth": b"hello, I am not a checkpoint\n",
        "random.safetensors": os.urandom(4096),
        "half.safetensors": st.read_bytes()[: st.stat().st_size // 2],
        "empty.safetensors": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return list(files)


def test_corrupt_truncated_and_empty_files(tmp_path):
    for name in _corrupt_files(tmp_path):
        for trust in (False, True):
            with pytest.raises(UserError) as ei:
                load_weights(tmp_path / name, trust_pickle=trust)
            msg = _error(ei, name)
            assert "not a readable PyTorch or safetensors checkpoint" in msg, msg


def test_many_random_files_all_give_the_corrupt_message(tmp_path):
    path = tmp_path / "r.pt"
    for i in range(60):
        path.write_bytes(os.urandom(64 + i))
        with pytest.raises(UserError) as ei:
            load_weights(path)
        _error(ei, "not a readable")


def test_pickled_module_needs_trust(tmp_path):
    model = _tiny()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(UserError) as ei:
        load_weights(path)
    _error(ei, "full.pt", "pickled Python code", "arch", "trust_pickle")
    with pytest.raises(UserError) as ei:
        load_model(path, arch="torchvision:resnet18")
    _error(ei, "trust_pickle")

    loaded = load_weights(path, trust_pickle=True)
    assert isinstance(loaded, nn.Sequential)
    _assert_same(loaded.state_dict(), model.state_dict())


def test_trusted_half_module_is_made_float32(tmp_path):
    model = _tiny().half()
    path = tmp_path / "half_full.pt"
    torch.save(model, path)
    loaded = load_model(path, trust_pickle=True)
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded[0].weight, model[0].weight.float())


def test_trusted_module_with_nan_is_refused(tmp_path):
    model = _tiny()
    with torch.no_grad():
        model[4].bias[0] = float("nan")
    path = tmp_path / "nan_full.pt"
    torch.save(model, path)
    with pytest.raises(UserError) as ei:
        load_weights(path, trust_pickle=True)
    _error(ei, "'4.bias'", "NaN")


def test_checkpoint_with_python_objects_needs_trust_then_unwraps(tmp_path):
    sd = _tiny().state_dict()
    path = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": sd}, path)
    with pytest.raises(UserError) as ei:
        load_weights(path)
    _error(ei, "argparse.Namespace", "trust_pickle", "arch")
    _assert_same(load_weights(path, trust_pickle=True), sd)


def test_trusted_wrapper_holding_a_module(tmp_path):
    path = tmp_path / "wrap.pt"
    torch.save({"model": _tiny(), "epoch": 3}, path)
    assert isinstance(load_weights(path, trust_pickle=True), nn.Sequential)


def test_trusted_pickle_with_unimportable_class(tmp_path):
    pkg = tmp_path / "gone"
    pkg.mkdir()
    (pkg / "vanishing_mod.py").write_text(
        "from torch import nn\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.l = nn.Linear(2, 2)\n"
    )
    sys.path.insert(0, str(pkg))
    try:
        import vanishing_mod

        torch.save(vanishing_mod.Net(), tmp_path / "net.pt")
    finally:
        sys.path.remove(str(pkg))
        sys.modules.pop("vanishing_mod", None)
    with pytest.raises(UserError) as ei:
        load_weights(tmp_path / "net.pt", trust_pickle=True)
    _error(ei, "net.pt", "cannot be imported", "vanishing_mod", "arch")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_refused(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    for trust in (False, True):
        with pytest.raises(UserError) as ei:
            load_weights(path, trust_pickle=trust)
        _error(ei, "ts.pt", "TorchScript", "arch")


def test_dict_without_state_dict_lists_candidates(tmp_path):
    path = tmp_path / "multi.pt"
    torch.save({"net": _tiny().state_dict(), "ema": _tiny().state_dict(), "step": 1}, path)
    with pytest.raises(UserError) as ei:
        load_weights(path)
    _error(ei, "multi.pt", "net", "ema")


@pytest.mark.parametrize("obj, word", [
    ({"step": 1, "name": "x"}, "non-tensor"),
    ({}, "empty"),
    ([torch.ones(2)], "list"),
    (torch.ones(2), "Tensor"),
])
def test_things_that_are_not_state_dicts(tmp_path, obj, word):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(UserError) as ei:
        load_weights(path)
    _error(ei, "odd.pt", word)


# --------------------------------------------------------------------------- resolve_arch


def test_torchvision_spec_with_kwargs():
    model = resolve_arch("torchvision:resnet18?num_classes=10")
    assert model.fc.out_features == 10


def test_torchvision_unknown_model_suggests_names():
    with pytest.raises(UserError) as ei:
        resolve_arch("torchvision:resnet181")
    _error(ei, "torchvision:resnet181", "resnet18")


def test_torchvision_bad_kwarg_is_a_user_error():
    with pytest.raises(UserError) as ei:
        resolve_arch("torchvision:resnet18?bogus_option=1")
    _error(ei, "torchvision:resnet18?bogus_option=1", "bogus_option")


def test_dotted_module_spec_with_kwargs():
    model = resolve_arch("torch.nn:Linear?in_features=3&out_features=2&bias=False")
    assert isinstance(model, nn.Linear)
    assert model.weight.shape == (2, 3) and model.bias is None


def test_dotted_attribute_path():
    model = resolve_arch("torch:nn.Linear?in_features=4&out_features=1")
    assert isinstance(model, nn.Linear) and model.in_features == 4


def test_file_spec_with_sibling_import_and_kwargs(tmp_path):
    (tmp_path / "blocks_sibling_x1.py").write_text(
        "from torch import nn\ndef block(n):\n    return nn.Linear(n, n)\n"
    )
    (tmp_path / "my_model.py").write_text(textwrap.dedent("""
        from torch import nn
        import blocks_sibling_x1
        SEEN = {}
        def build(width=2, name="x", act=None, shape=(1,)):
            SEEN.update(width=width, name=name, act=act, shape=shape)
            return nn.Sequential(blocks_sibling_x1.block(width), nn.ReLU())
        class Holder:
            make = staticmethod(lambda: nn.Identity())
    """))
    before = list(sys.path)
    try:
        model = resolve_arch(f"{tmp_path / 'my_model.py'}:build?width=6&name=abc&act=None&shape=(2, 3)")
        assert sys.path == before
        assert isinstance(model[0], nn.Linear) and model[0].in_features == 6
        mod = [m for n, m in sys.modules.items() if n.startswith("_sttp_arch_my_model_")]
        assert mod and mod[-1].SEEN == {"width": 6, "name": "abc", "act": None, "shape": (2, 3)}
        assert isinstance(resolve_arch(f"{tmp_path / 'my_model.py'}:Holder.make"), nn.Identity)
    finally:
        sys.modules.pop("blocks_sibling_x1", None)


def test_relative_file_spec(tmp_path, monkeypatch):
    (tmp_path / "rel_model.py").write_text("from torch import nn\nbuild = lambda: nn.Tanh()\n")
    monkeypatch.chdir(tmp_path)
    assert isinstance(resolve_arch("rel_model.py:build"), nn.Tanh)


@pytest.mark.parametrize("spec, fragment", [
    ("resnet18", "MODULE:FACTORY"),
    (":build", "MODULE:FACTORY"),
    ("torch.nn:", "MODULE:FACTORY"),
    ("torch.nn:Linear?in_features", "key=value"),
    ("torch.nn:Linear?in_features=1&in_features=2", "twice"),
    ("torch.nn:1bad", "not a Python name"),
    ("no_such_module_xyz:build", "no module named 'no_such_module_xyz'"),
    ("torch.nn:NoSuchLayer", "no attribute 'NoSuchLayer'"),
    ("torch.nn:Linear", "calling Linear failed"),
    ("torch.nn:Linear?in_features=2&out_features=-5", "calling Linear failed"),
    ("torch:zeros?size=(3,)", "not a torch.nn.Module"),
    ("torch:__version__", "not callable"),
    ("missing_dir/model.py:build", "no such file"),
])
def test_bad_specs(spec, fragment):
    with pytest.raises(UserError) as ei:
        resolve_arch(spec)
    _error(ei, spec, fragment)


def test_file_spec_failures_are_user_errors(tmp_path):
    (tmp_path / "broken.py").write_text("def build(:\n")
    (tmp_path / "raises.py").write_text("import does_not_exist_abc\n")
    (tmp_path / "ok.py").write_text("def build():\n    raise ValueError('nope\\nsecond line')\n")
    before = list(sys.path)
    cases = [("broken.py:build", "SyntaxError"), ("raises.py:build", "does_not_exist_abc"),
             ("ok.py:build", "nope second line"), ("ok.py:other", "no attribute 'other'")]
    for spec, fragment in cases:
        full = f"{tmp_path}/{spec}"
        with pytest.raises(UserError) as ei:
            resolve_arch(full)
        _error(ei, full, fragment)
        assert sys.path == before


# --------------------------------------------------------------------------- load_model


def test_load_model_from_state_dict(tmp_path):
    ref = _tiny()
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v.half() if v.is_floating_point() else v
                               for k, v in ref.state_dict().items()}}, path)
    model = load_model(path, arch=_tiny_arch_file(tmp_path))
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model[0].weight, ref[0].weight.half().float())


def test_load_model_needs_arch_for_state_dict(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_tiny().state_dict(), path)
    with pytest.raises(UserError) as ei:
        load_model(path)
    _error(ei, "w.pt", "state_dict", "arch")


def test_load_model_mismatch_message(tmp_path):
    (tmp_path / "resnetish.py").write_text(textwrap.dedent("""
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(3, 64, 7, bias=False)
                self.bn1 = nn.BatchNorm2d(64)
                self.fc = nn.Linear(64, 10)
    """))
    arch = f"{tmp_path / 'resnetish.py'}:Net"
    sd = resolve_arch(arch).state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del sd["fc.weight"], sd["fc.bias"]
    sd["head.weight"] = torch.zeros(3)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(UserError) as ei:
        load_model(path, arch=arch)
    _error(ei, f"checkpoint does not match arch {arch}: "
               "2 missing (fc.weight, fc.bias), 1 unexpected (head.weight), "
               "1 mis-shaped (conv1.weight: checkpoint [64, 3, 3, 3] vs model [64, 3, 7, 7])")


def test_load_model_mismatch_lists_at_most_three(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({f"extra{i}": torch.zeros(1) for i in range(5)}, path)
    with pytest.raises(UserError) as ei:
        load_model(path, arch="torch.nn:Linear?in_features=2&out_features=2")
    msg = _error(ei, "2 missing (weight, bias)", "5 unexpected (extra0, extra1, extra2, ...)")
    assert "extra3" not in msg and "mis-shaped" not in msg


def test_load_model_trusted_module_ignores_arch(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(_tiny().train(), path)
    model = load_model(path, arch="torchvision:resnet18", trust_pickle=True)
    assert isinstance(model, nn.Sequential) and not model.training


# --------------------------------------------------------------------------- atomic_write


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_creates_file_with_normal_permissions(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"data"))
    assert target.read_bytes() == b"data"
    assert _leftovers(tmp_path) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_uses_hidden_temp_in_same_folder(tmp_path):
    seen = []
    atomic_write(tmp_path / "m.pt", lambda tmp: (seen.append(tmp), open(tmp, "w").write("x")))
    tmp = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path)
    # hidden, named by the writer's pid (so a killed run's leftovers are recognised), short whatever the target
    assert os.path.basename(tmp).startswith(f"{outputs.TEMP_PREFIX}{os.getpid()}-") and tmp.endswith(".tmp")


def test_atomic_write_cleans_up_when_writer_raises(tmp_path):
    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(tmp_path / "out.pt", boom)
    assert _leftovers(tmp_path) == []

    (tmp_path / "old.pt").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "old.pt", boom, force=True)
    assert _leftovers(tmp_path) == ["old.pt"]
    assert (tmp_path / "old.pt").read_bytes() == b"old"


def test_atomic_write_refuses_to_overwrite_without_force(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    called = []
    with pytest.raises(UserError) as ei:
        atomic_write(target, called.append)
    _error(ei, "out.pt exists", "force")
    assert not called and target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["out.pt"]


def test_atomic_write_overwrites_with_force_keeping_mode(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"), force=True)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == ["out.pt"]


def test_atomic_write_bad_folders(tmp_path):
    with pytest.raises(UserError) as ei:
        atomic_write(tmp_path / "no_dir" / "out.pt", lambda tmp: None)
    _error(ei, "out.pt", "does not exist")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as ei:
        atomic_write(tmp_path / "afile" / "out.pt", lambda tmp: None)
    _error(ei, "out.pt", "not a folder")
    with pytest.raises(UserError) as ei:
        atomic_write(tmp_path, lambda tmp: None, force=True)
    _error(ei, "directory")


def test_atomic_write_unwritable_folder(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    with pytest.raises(UserError) as ei:
        atomic_write(tmp_path / "out.pt", lambda tmp: None)
    _error(ei, "out.pt", "not writable", "Permission denied")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write anywhere")
def test_atomic_write_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError) as ei:
            atomic_write(folder / "out.pt", lambda tmp: None)
        _error(ei, "not writable")
    finally:
        folder.chmod(0o700)


def test_atomic_torch_save_round_trip(tmp_path):
    sd = _tiny().state_dict()
    target = tmp_path / "sd.pt"
    atomic_torch_save(sd, target)
    _assert_same(load_weights(target), sd)
    with pytest.raises(UserError):
        atomic_torch_save(sd, target)
    atomic_torch_save({"a": torch.ones(1)}, target, force=True)
    assert list(load_weights(target)) == ["a"]
    assert _leftovers(tmp_path) == ["sd.pt"]


# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize("text, expected", [
    ("123", 123),
    ("5MB", 5_000_000),
    ("5mb", 5_000_000),
    ("10 MB", 10_000_000),
    (" 10MB ", 10_000_000),
    ("4.5MiB", 4_718_592),
    ("300kB", 300_000),
    ("300KB", 300_000),
    ("300KiB", 307_200),
    ("1GB", 1_000_000_000),
    ("1GiB", 2**30),
    ("1gib", 2**30),
    ("2TB", 2 * 10**12),
    ("7B", 7),
    ("2M", 2_000_000),
    ("1.5k", 1500),
    (".5MB", 500_000),
    ("5e6", 5_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "abc", "5XB", "-5MB", "5 M B", "1,000", "nan", "inf",
                                  "0", "0.1B", "5MB5", "5..5MB"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError) as ei:
        parse_size(text)
    _error(ei, repr(text))


def test_state_dict_metadata_survives_loading_with_and_without_a_prefix(tmp_path):
    """load_state_dict reads each module's version from the state dict's _metadata (torchvision's MNASNet refuses
    to load without it); it survives the wrapper, the 'module.' prefix and the upcast."""
    import torchvision

    model = torchvision.models.mnasnet0_5()
    state = model.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    wrapped = OrderedDict(("module." + k, v.half() if v.is_floating_point() else v) for k, v in state.items())
    wrapped._metadata = OrderedDict(("module" + ("." + k if k else ""), v) for k, v in state._metadata.items())
    torch.save({"state_dict": wrapped}, tmp_path / "ddp.pt")
    for name in ("plain.pt", "ddp.pt"):
        loaded = load_weights(tmp_path / name)
        assert loaded._metadata == state._metadata, name
        assert isinstance(load_model(tmp_path / name, "torchvision:mnasnet0_5"), torchvision.models.MNASNet)
