"""nn.MultiheadAttention: its packed q/k/v projection `in_proj_weight` is compressed like a Linear weight."""

import pytest
import torch
from torch import nn

from sttp_compress.train.bank import WeightBank
from sttp_compress.io.checkpoint import load_compressed, save_compressed
from sttp_compress.compress.convert import (candidate_layers, compress, compress_module, compress_to_target,
                                   compressed_layers, count_parameters, decompress, parametrization)
from sttp_compress.core.tt import TTShape

E, HEADS = 24, 4

FACTORY = '''
import torch
from torch import nn


def tiny_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24),
                         nn.TransformerEncoder(nn.TransformerEncoderLayer(24, 4, 48, dropout=0.0, batch_first=True), 2),
                         nn.Linear(24, 5))
'''


def tiny_encoder() -> nn.Module:
    ns: dict = {}
    exec(FACTORY, ns)  # noqa: S102 - the same factory the checkpoint test writes to a file
    return ns["tiny_encoder"]().eval()


def test_in_proj_weight_is_a_candidate_named_after_it():
    chosen, skipped = candidate_layers(tiny_encoder())
    assert "1.layers.0.self_attn.in_proj_weight" in chosen
    assert "1.layers.0.self_attn.out_proj" in chosen
    assert isinstance(chosen["1.layers.1.self_attn.in_proj_weight"], nn.MultiheadAttention)
    assert skipped["2"] == "final classifier kept dense"


def test_separate_qkv_weights_are_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, kdim=4, vdim=4), nn.Linear(8, 2))
    _, skipped = candidate_layers(model)
    assert "separate q/k/v" in skipped["1.in_proj_weight"]


@pytest.mark.parametrize("rank", [2, 5, 16])
def test_dof_is_the_formula(rank):
    mha = nn.MultiheadAttention(E, HEADS)
    dense_rest = count_parameters(mha) - 3 * E * E
    p = compress_module(mha, rank)
    assert p.dof() == TTShape.from_dims([3 * E], [E], rank).dof()
    assert count_parameters(mha) == p.dof() + dense_rest
    assert tuple(mha.in_proj_weight.shape) == (3 * E, E)


@pytest.mark.parametrize("batch_first", [False, True])
def test_forward_equals_dense_at_full_rank(batch_first):
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
    comp = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
    comp.load_state_dict(dense.state_dict())
    compress_module(comp, 3 * E)  # full rank: the TT-SVD is exact
    x = torch.randn(5, 3, E, dtype=torch.float64)
    for mode in (dense.train, comp.train), (dense.eval, comp.eval):
        for set_mode in mode:
            set_mode()
        want = dense(x, x, x)[0]
        torch.testing.assert_close(comp(x, x, x)[0], want)
        with torch.no_grad():  # eval + no_grad takes MHA's fused fast path
            torch.testing.assert_close(comp(x, x, x)[0], dense(x, x, x)[0])


def test_compress_to_target_reports_decompresses_and_trains_with_the_bank():
    model = tiny_encoder()
    x = torch.randn(2, 7, 12)
    parts = compress_to_target(model, rank=6)
    names = [layer["name"] for layer in parts["layers"]]
    assert "1.layers.0.self_attn.in_proj_weight" in names
    row = next(layer for layer in parts["layers"] if layer["name"] == "1.layers.0.self_attn.in_proj_weight")
    assert row["type"] == "MultiheadAttention" and row["shape"] == [72, 24]
    assert set(compressed_layers(model)) == set(names)

    model.train()
    ref = model(x)
    bank = WeightBank(model).attach()
    torch.testing.assert_close(model(x), ref)  # the bank builds the same weights, MHA included
    bank.detach()

    model.eval()
    with torch.no_grad():
        y = model(x)
    decompress(model)
    mha = model[1].layers[0].self_attn
    assert isinstance(mha.in_proj_weight, nn.Parameter) and not compressed_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)


def test_rank_map_by_layer_name():
    model = tiny_encoder()
    out = compress(model, rank={"1.layers.1.self_attn.in_proj_weight": 4})
    assert list(out) == ["1.layers.1.self_attn.in_proj_weight"]
    assert parametrization(model[1].layers[1].self_attn).rank == 4


def test_checkpoint_round_trip(tmp_path):
    (tmp_path / "arch.py").write_text(FACTORY)
    arch = f"{tmp_path / 'arch.py'}:tiny_encoder"
    model = tiny_encoder()
    compress_to_target(model, ratio=2.0)
    assert any(n.endswith("in_proj_weight") for n in compressed_layers(model))
    save_compressed(model, tmp_path / "m.sttp.safetensors", arch)
    loaded, info = load_compressed(tmp_path / "m.sttp.safetensors", arch)
    assert set(info["layers"]) == set(compressed_layers(model))
    x = torch.randn(2, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
