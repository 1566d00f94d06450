"""int8 storage: per-row quantization, exact orthonormality after rounding, smaller files, damaged files refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sttp_compress as sc
from sttp_compress.compress.convert import parametrization
from sttp_compress.core.forms import layer_originals
from sttp_compress.errors import UserError
from sttp_compress.io.checkpoint import read_compressed, stored_state
from sttp_compress.io.quantize import (BLOCK, PACKED, SCALES, dequantize_rows, dequantize_state, pack_scales,
                                       quantize_rows, quantize_state, storage_errors, unpack_scales)


def test_blocks_round_to_within_half_a_step_and_zero_rows_survive():
    torch.manual_seed(0)
    t = torch.randn(5, 10, 13) * torch.tensor([1.0, 10.0, 0.01, 0.0, 3.0]).reshape(5, 1, 1)  # rows of 130 values
    q, scale = quantize_rows(t)
    assert q.dtype == torch.int8 and q.shape == t.shape and scale.shape == (5, 3)  # blocks of 64: 64 + 64 + 2
    assert scale.dtype == torch.float16  # half the bytes of float32 scales; the values round against it
    assert int(q.abs().max()) == 127
    back = dequantize_rows(q, scale)
    step = scale.repeat_interleave(BLOCK, dim=1)[:, :130].reshape(5, 10, 13)  # each value's own block scale
    assert bool(((back - t).abs() <= step / 2 + 1e-7).all())
    assert bool((back[3] == 0).all()) and bool((scale[3] == 1.0).all())


def test_scales_outside_float16s_range_stay_float32_and_float32_scales_still_load():
    torch.manual_seed(0)
    for size in (1e-9, 1e7):  # absmax/127 below float16's smallest normal number, above its largest
        t = torch.randn(4, 100) * size
        q, scale = quantize_rows(t)
        assert scale.dtype == torch.float32
        step = scale.repeat_interleave(BLOCK, dim=1)[:, :100]
        assert bool(((dequantize_rows(q, scale) - t).abs() <= step / 2 * (1 + 1e-6)).all())
    q, scale = quantize_rows(torch.randn(4, 100))
    old = {"w": q, SCALES + "w": scale.float()}  # a file written with float32 scales
    torch.testing.assert_close(dequantize_state(old)["w"], dequantize_rows(q, scale), rtol=0, atol=0)


def test_vectors_are_stored_in_float16_where_it_keeps_them_to_its_precision_as_a_whole():
    state = {"bias": torch.tensor([0.5, -3.0, 0.0, 1e-3]), "running_var": torch.tensor([1.0, 1e-7, 0.3]),
             "tiny": torch.tensor([1e-7, 3e-7]), "big": torch.tensor([1e6]), "steps": torch.tensor(7),
             "w": torch.randn(3, 5)}
    stored = quantize_state(state)
    assert stored["bias"].dtype == torch.float16 and stored["steps"].dtype == torch.int64
    # a dead channel's 1e-7 goes subnormal beside variances near 1 (absolute error < 3e-8); a tensor of tiny values
    # alone would lose a tenth of itself, and 1e6 is beyond float16's largest number: both keep float32
    assert stored["running_var"].dtype == torch.float16
    assert stored["tiny"].dtype == torch.float32 and stored["big"].dtype == torch.float32
    back = dequantize_state(stored)
    assert all(back[k].dtype == torch.float32 for k in ("bias", "running_var", "tiny", "big", "w"))
    torch.testing.assert_close(back["bias"], state["bias"].half().float(), rtol=0, atol=0)
    torch.testing.assert_close(back["bias"], state["bias"], rtol=2 ** -11, atol=0)
    assert float((back["running_var"] - state["running_var"]).norm()) <= 2 ** -11 * float(state["running_var"].norm())
    assert float((back["running_var"] - state["running_var"]).abs().max()) < 3e-8 + 2 ** -11 * 0.3
    assert torch.equal(back["tiny"], state["tiny"]) and torch.equal(back["big"], state["big"])


def test_a_compressed_layers_own_vectors_keep_float32_for_one_value_float16_would_round_by_more_than_2_9():
    # W = U Σ Vᵀ diag(γ) with γ = 1/√c: the small γ_j belong to the columns with the largest inputs, so each value
    # needs its own precision. 2e-5 is subnormal in float16 but kept to 0.15% (2^-9.4) of itself, finer than the
    # int8 matrix it scales; 1e-6 would be off by up to 3%
    key = "fc.parametrizations.weight.original3"
    gamma = torch.tensor([3.0, 1.0, 2e-5])
    stored = quantize_state({key: gamma, "fc.bias": gamma.clone()})
    assert stored[key].dtype == torch.float16 and stored["fc.bias"].dtype == torch.float16
    back = dequantize_state(stored)[key]
    assert bool(((back - gamma).abs() <= 2 ** -9 * gamma.abs()).all())
    assert float((back - gamma).abs()[2]) > 2 ** -11 * 2e-5  # the subnormal one did lose more than a normal one
    tiny = torch.tensor([3.0, 1.0, 1e-6])
    stored = quantize_state({key: tiny, "fc.bias": tiny.clone()})
    assert stored[key].dtype == torch.float32 and torch.equal(dequantize_state(stored)[key], tiny)
    assert stored["fc.bias"].dtype == torch.float16  # a bias adds: its 1e-6 may go subnormal
    assert quantize_state({key: torch.tensor([1.0, 7e4])})[key].dtype == torch.float32  # beyond float16's largest


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    sc.compress_(net, sc.CompressConfig(rank=8))
    return net.eval()


def test_int8_checkpoint_is_smaller_loads_with_orthonormal_frames_and_close_weights(tmp_path):
    net = model()
    f32 = sc.save(net, tmp_path / "f32.sttp.safetensors", arch=None)
    i8 = sc.save(net, tmp_path / "i8.sttp.safetensors", arch=None, dtype="int8")
    data = {n: read_compressed(tmp_path / f"{n}.sttp.safetensors")["state_dict"] for n in ("f32", "i8")}
    nbytes = {n: sum(t.numel() * t.element_size() for t in d.values()) for n, d in data.items()}
    assert i8 < f32 and nbytes["i8"] < 0.4 * nbytes["f32"]  # tensors (the header is the same)
    loaded = model()  # the same structure; its parameters are replaced by the file's
    state = stored_state(read_compressed(tmp_path / "i8.sttp.safetensors"), "i8", loaded)
    loaded.load_state_dict(state)
    for name in ("2", "5"):
        p = parametrization(loaded[int(name)])
        for frames in p.frames(layer_originals(loaded[int(name)], p)):  # (n, d, r) each
            eye = torch.eye(frames.shape[-1]).expand(frames.shape[0], -1, -1)
            torch.testing.assert_close(frames.transpose(1, 2) @ frames, eye, atol=2e-6, rtol=0)
        W, Wq = net[int(name)].weight.detach(), loaded[int(name)].weight.detach()
        assert 0 < float((Wq - W).norm() / W.norm()) < 0.02
    errors = storage_errors(net, quantize_state(net.state_dict()))
    assert set(errors) == {"2", "5"} and all(0 < e < 0.02 for e in errors.values())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert float((loaded(x) - net(x)).norm() / net(x).norm()) < 0.05


def test_packing_keeps_each_matrixs_scales_and_their_dtype():
    torch.manual_seed(0)
    state = quantize_state({"a": torch.randn(5, 130), "b": 1e-6 * torch.randn(3, 2, 40), "c": torch.randn(7),
                            "d": torch.randn(2, 64)})
    packed, wide = pack_scales(state)
    assert wide == ["b"] and not [k for k in packed if k.startswith(SCALES)]  # b's blocks are below float16's range
    assert packed[PACKED + "float16"].shape == (5 * 3 + 2 * 1,) and packed[PACKED + "float16"].dtype == torch.float16
    assert packed[PACKED + "float32"].shape == (3 * 2,) and packed[PACKED + "float32"].dtype == torch.float32
    back = unpack_scales(packed, wide)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert unpack_scales(state, []) is state  # per-matrix scales (format 3) pass through
    with pytest.raises(ValueError, match="17 values.*need 23 float16 scales"):
        unpack_scales(packed, [])  # b's scales looked for in the float16 tensor
    with pytest.raises(ValueError, match="recorded for 'c', not an int8 tensor"):
        unpack_scales(packed, ["b", "c"])


def test_an_int8_file_holds_one_scales_tensor_and_damaged_ones_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "i8.sttp.safetensors"
    sc.save(model(), path, dtype="int8")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    assert header["format_version"] == "4" and "int8_scales_float32" not in header
    assert [k for k in tensors if "int8_scale" in k] == [PACKED + "float16"]
    tensors[PACKED + "float16"] = tensors[PACKED + "float16"][:-1]
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(UserError, match=r"damaged sttp-compress checkpoint: packed scales .* do not fit"):
        read_compressed(path)


def test_a_format_3_int8_file_with_a_scale_tensor_a_matrix_loads_and_one_without_is_damaged(tmp_path):
    """int8 files written before format 4 kept each matrix's scales under SCALES + name: they load to the same
    model; a matrix without its scales is a damaged checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    net = model()
    sc.save(net, tmp_path / "v4.sttp.safetensors", dtype="int8")
    with safe_open(str(tmp_path / "v4.sttp.safetensors"), framework="pt") as f:
        header = {**f.metadata(), "format_version": "3"}
    old = {k: v.contiguous() for k, v in quantize_state(net.state_dict()).items() if v.numel()}
    save_file(old, str(tmp_path / "v3.sttp.safetensors"), metadata=header)
    states = [stored_state(read_compressed(tmp_path / f"{v}.sttp.safetensors"), v) for v in ("v3", "v4")]
    assert set(states[0]) == set(states[1]) and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    del old[next(k for k in old if k.startswith(SCALES))]
    save_file(old, str(tmp_path / "v3.sttp.safetensors"), metadata=header)
    with pytest.raises(UserError, match=r"damaged sttp-compress checkpoint: int8 tensor .* no fitting per-row scale"):
        stored_state(read_compressed(tmp_path / "v3.sttp.safetensors"), "v3")


def test_bad_dtype_names_the_choices(tmp_path):
    with pytest.raises(UserError, match="dtype must be one of float32, float16, bfloat16, int8"):
        sc.save(model(), tmp_path / "x.sttp.safetensors", dtype="int4")


def test_stored_values_are_what_a_checkpoint_gives_back():
    """`stored_values` rounds as the file does: int8 matrices through their block scales, vectors to float16
    (integers untouched), float16 every floating tensor; dtypes stay those of the model."""
    from sttp_compress.io.checkpoint import stored_values

    torch.manual_seed(0)
    state = {"w": torch.randn(8, 100), "b": torch.randn(8), "n": torch.tensor(3)}
    back = stored_values(state, "int8")
    assert torch.equal(back["w"], dequantize_state(quantize_state(state))["w"])
    assert not torch.equal(back["w"], state["w"]) and back["w"].dtype == torch.float32
    assert torch.equal(back["b"], state["b"].half().float()) and torch.equal(back["n"], state["n"])
    half = stored_values(state, "float16")
    assert torch.equal(half["b"], state["b"].half().float()) and not torch.equal(half["b"], state["b"])
    assert torch.equal(stored_values(state, "float32")["w"], state["w"])
    with pytest.raises(UserError, match="dtype"):
        stored_values(state, "int4")


@pytest.mark.parametrize("rows,stored", [(300, torch.int16), (40000, torch.int32)])
def test_smaller_storages_keep_row_orders_in_the_narrowest_integers_and_load_them_back(tmp_path, rows, stored):
    """float16 and int8 files store a row order (int64 in the model) as int16, or int32 past 32,767 rows; it loads
    back as the same int64 permutation and the loaded model gives the model's outputs (to the storage's rounding).
    float32 files keep int64."""
    from sttp_compress.compress.convert import compress_module

    torch.manual_seed(0)
    emb = nn.Embedding(rows, 8)
    order = torch.randperm(rows)
    compress_module(emb, rank=4, row_weight=torch.rand(rows) + 0.5, row_order=order)
    net = nn.Sequential(emb)
    x = torch.randint(0, rows, (5, 3))
    for dtype, want in (("int8", stored), ("float16", stored), ("float32", torch.int64)):
        path = tmp_path / f"e-{dtype}.sttp.safetensors"
        sc.save(net, path, arch=None, dtype=dtype)
        data = read_compressed(path)
        key = next(k for k in data["state_dict"] if k.endswith("row_order"))
        assert data["state_dict"][key].dtype == want
        back = nn.Sequential(nn.Embedding(rows, 8))
        compress_module(back[0], rank=4, row_weight=torch.ones(rows), row_order=torch.arange(rows))
        back.load_state_dict(stored_state(data, path, back))
        got = dict(back.named_buffers())[key]
        assert got.dtype == torch.int64 and torch.equal(got, order)
        with torch.no_grad():  # the rows land where they were: the file's model gives the model's outputs
            torch.testing.assert_close(back(x), net(x), **({} if dtype == "float32" else {"rtol": 0.05, "atol": 0.05}))
