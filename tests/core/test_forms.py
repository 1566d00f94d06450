"""The inference shortcut: exact against the materialized weight, chosen by FLOPs, off in training."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sttp_compress.core.forms import (CALL_OVERHEAD_FLOPS, best_form, call_overhead, chain_cores, overhead_key,
                                    remove_shortcut, row_flops, shortcut_forms, tt_linear, use_shortcut)
from sttp_compress.compress.convert import compress_module, parametrization
from sttp_compress.core.tt import TTShape

SHAPES = [(24, 36, 5), (64, 48, 8), (96, 96, 40), (10, 7, 3), (45, 60, 12)]


def compressed_linear(d_out, d_in, rank, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(d_in, d_out, bias=bias).double()
    compress_module(m, rank)
    return m.eval()


def layer_originals(m):
    p = parametrization(m)
    pl = m.parametrizations.weight
    return tuple(getattr(pl, f"original{i}") for i in range(len(p.groups) + 1))


@pytest.mark.parametrize("d_out,d_in,rank", SHAPES)
def test_tt_linear_equals_the_materialized_weight(d_out, d_in, rank):
    m = compressed_linear(d_out, d_in, rank)
    u, s, v = chain_cores(parametrization(m), layer_originals(m))
    x = torch.randn(3, 4, d_in, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(tt_linear(x, u, s, v, m.bias), F.linear(x, m.weight, m.bias), rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["factors", "tt"])
@pytest.mark.parametrize("d_out,d_in,rank", SHAPES)
def test_forced_forms_are_exact_in_eval(form, d_out, d_in, rank):
    m = compressed_linear(d_out, d_in, rank, bias=rank % 2 == 0)
    model = nn.Sequential(m, nn.ReLU())
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        assert use_shortcut(model, form) == {"0": form}
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert m._sttp_shortcut._key is not None  # the shortcut really ran


@pytest.mark.parametrize("d_out,d_in,rank", SHAPES)
def test_row_flops_count_the_matmuls(d_out, d_in, rank):
    m = compressed_linear(d_out, d_in, rank, bias=False)
    shape = parametrization(m).tt
    for form in ("factors", "tt"):
        model = nn.Sequential(compressed_linear(d_out, d_in, rank, bias=False))
        use_shortcut(model, form)
        x = torch.randn(1, d_in, dtype=torch.float64)
        with torch.no_grad():
            model(x)  # build the factors outside the count
            with FlopCounterMode(display=False) as counter:
                model(x)
        assert counter.get_total_flops() == row_flops(shape, form) - shape.middle  # σ scaling is not a matmul
    assert row_flops(shape, "dense") == 2 * d_in * d_out
    assert row_flops(shape, "factors") == shape.middle * (2 * d_in + 2 * d_out + 1)


def test_auto_takes_the_fewest_flops_and_leaves_small_layers_dense():
    big = TTShape.from_dims([1024], [1024], 32)
    assert best_form(big) == "factors"
    full = TTShape.from_dims([12], [12], 12)
    assert best_form(full) == "dense"
    model = nn.Sequential(compressed_linear(256, 256, 8), compressed_linear(12, 256, 12))
    forms = use_shortcut(model)
    assert forms == {"0": "factors", "1": "dense"}
    assert shortcut_forms(model) == {"0": "factors"}


def test_auto_uses_the_dense_weight_when_the_rows_do_not_pay_for_the_extra_calls():
    saving = row_flops(TTShape.from_dims([256], [256], 8), "dense") - row_flops(TTShape.from_dims([256], [256], 8), "factors")
    model = nn.Sequential(compressed_linear(256, 256, 8))
    use_shortcut(model, overhead={"cpu": 4 * saving})
    sc = model[0]._sttp_shortcut
    with torch.no_grad():
        y3 = model(torch.randn(3, 256, dtype=torch.float64))
        assert sc._key is None  # 3 rows: the dense weight ran
        y5 = model(torch.randn(5, 256, dtype=torch.float64))
        assert sc._key is not None  # 5 rows: the factors ran
    assert y3.shape == (3, 256) and y5.shape == (5, 256)


def test_training_and_gradients_are_unchanged_and_parameter_updates_are_seen():
    m = compressed_linear(48, 64, 8)
    model = nn.Sequential(m)
    use_shortcut(model, "tt")
    x = torch.randn(4, 64, dtype=torch.float64)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).square().sum()
    loss.backward()
    assert all(p.grad is not None for p in layer_originals(m) if p.requires_grad)  # not the 0-sized (−I frames)
    opt.step()
    model.eval()
    with torch.no_grad():  # the new parameters, not factors cached before the step
        torch.testing.assert_close(model(x), F.linear(x, m.weight, m.bias), rtol=0, atol=1e-12)
    with torch.enable_grad():  # eval with gradients needed: the differentiable dense path
        y = model(x.requires_grad_())
        assert y.grad_fn is not None


def test_remove_copy_and_state_dict():
    model = nn.Sequential(compressed_linear(128, 128, 4))
    keys = set(model.state_dict())
    use_shortcut(model, "factors")
    assert set(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    x = torch.randn(2, 128, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
        assert twin[0]._sttp_shortcut.p is parametrization(twin[0])  # bound to the copy
        remove_shortcut(model)
        assert shortcut_forms(model) == {} and "forward" not in model[0].__dict__
        torch.testing.assert_close(model(x), twin(x))


def test_multihead_attention_out_proj_is_left_alone():
    mha = nn.MultiheadAttention(64, 4)
    compress_module(mha.out_proj, 4)
    assert use_shortcut(nn.Sequential(mha)) == {}


def test_bad_form_is_rejected():
    with pytest.raises(ValueError, match="form must be"):
        use_shortcut(nn.Sequential(), "fast")


def test_call_overhead_follows_the_device_and_falls_back_to_its_type():
    x = torch.zeros(3, 4)
    assert overhead_key(x) == "cpu"
    assert call_overhead(x, {"cpu": 7.0, "cuda": 1.0}) == 7.0
    assert call_overhead(x, {"cuda": 1.0}) == 0.0  # no entry: every call pays
    assert call_overhead(x.bfloat16(), CALL_OVERHEAD_FLOPS) == CALL_OVERHEAD_FLOPS["cpu"]
    # slower GEMMs (float32 on CUDA) are paid back by fewer rows
    assert CALL_OVERHEAD_FLOPS["cuda-fp32"] < CALL_OVERHEAD_FLOPS["cuda-tf32"] < CALL_OVERHEAD_FLOPS["cuda"]
