"""freeze/unfreeze/frozen: the compressed model's function with plain tensors, state_dict unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sttp_compress.compress.convert import compress_module, parametrization
from sttp_compress.core.spectral_tt import is_parametrized
from sttp_compress.compress.serve import freeze, frozen, is_frozen, unfreeze


def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 96),
                          nn.GELU(), nn.Linear(96, 80), nn.Linear(80, 5)).double()
    compress_module(model[0], 4)
    compress_module(model[2], 6)
    compress_module(model[4], 10)  # model[5] stays dense
    return model.eval()


def test_freeze_keeps_the_function_the_state_dict_and_the_classes():
    model = small_model()
    x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert freeze(model) == {"0": "dense", "2": "dense", "4": "dense"}
    assert [type(m) for m in model] == [nn.Conv2d, nn.Flatten, nn.Linear, nn.GELU, nn.Linear, nn.Linear]
    assert all(is_frozen(model[i]) for i in (0, 2, 4)) and not is_frozen(model[5])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert list(model.state_dict()) == list(sd)  # the frozen weights are not saved: still a compressed checkpoint
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    assert freeze(model) == {}  # already frozen: nothing to do
    unfreeze(model)
    assert all(is_parametrized(model[i]) and not is_frozen(model[i]) for i in (0, 2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_unfreeze_follows_parameter_changes_again():
    model = small_model()
    freeze(model)
    spectrum = len(parametrization(model[2]).groups)  # the originals: frame groups, then the spectrum
    with torch.no_grad():
        getattr(model[2].parametrizations.weight, f"original{spectrum}").mul_(2.0)
        stale = model[2].weight.clone()
    unfreeze(model)
    torch.testing.assert_close(model[2].weight.detach(), 2 * stale)


def test_frozen_restores_the_mode_and_leaves_a_callers_freeze_alone():
    model = small_model().train()
    freeze(model[4:5])
    with frozen(model) as m:
        assert m is model and not model.training and not torch.is_grad_enabled()
        assert all(is_frozen(model[i]) for i in (0, 2, 4))
    assert model.training and torch.is_grad_enabled()
    assert not is_frozen(model[0]) and not is_frozen(model[2]) and is_frozen(model[4])


def test_frozen_weights_move_with_the_model_and_survive_deepcopy():
    model = small_model()
    freeze(model)
    model.float()
    assert model[2].weight.dtype == torch.float32
    assert model[2].parametrizations.weight.original0.dtype == torch.float32
    # leaves that require grad, like the dense parameters they stand for (autocast caches their casts)
    assert model[2].weight.is_leaf and model[2].weight.requires_grad
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    unfreeze(twin)
    assert is_parametrized(twin[2]) and is_frozen(model[2])


def test_shortcut_auto_runs_the_factors_form_on_large_calls_only():
    torch.manual_seed(0)
    m = nn.Linear(96, 96).double()
    compress_module(m, 8)
    m.eval()
    x_small, x_big = torch.randn(2, 96, dtype=torch.float64), torch.randn(50, 96, dtype=torch.float64)
    with torch.no_grad():
        want_small, want_big = m(x_small), m(x_big)
    saving = 2 * 96 * 96 - (2 * 8 * (96 + 96) + 8)
    assert freeze(m, "auto", overhead={"cpu": 10 * saving}) == {"": "factors"}
    assert m._sttp_saving == saving  # calls of fewer than 10 rows run the dense weight
    calls = []
    orig_linear = F.linear

    def spy(x, w, b=None):
        calls.append(tuple(w.shape))
        return orig_linear(x, w, b)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "linear", spy)
        small, big = m(x_small), m(x_big)
    # 2 rows: the dense weight; 50 rows: V σ, then U, the rank 8 padded with zeros to 16
    assert calls == [(96, 96), (16, 96), (96, 16)]
    torch.testing.assert_close(small, want_small, rtol=0, atol=0)
    torch.testing.assert_close(big, want_big, rtol=1e-12, atol=1e-12)
    unfreeze(m)
    assert "forward" not in m.__dict__ and not hasattr(m, "_sttp_vs")
    with torch.no_grad():
        torch.testing.assert_close(m(x_big), want_big, rtol=0, atol=0)


def test_shortcut_factors_keeps_no_dense_weight_and_runs_the_factors_on_every_call():
    torch.manual_seed(0)
    m = nn.Linear(96, 96).double()
    compress_module(m, 8)
    m.eval()
    x = torch.randn(1, 96, dtype=torch.float64)
    with torch.no_grad():
        want, W = m(x), m.weight.detach().clone()
    assert freeze(m, "factors") == {"": "factors"}
    assert set(m._buffers) == {"_sttp_vs", "_sttp_u"}  # no dense weight: U and V σ, rank 8 padded to 16
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)  # one row: still the factors
        torch.testing.assert_close(m.weight, W, rtol=1e-12, atol=1e-12)  # rebuilt when read
    unfreeze(m)
    assert type(m).__name__ == "ParametrizedLinear" and m.weight.shape == (96, 96)


def test_shortcut_skips_embeddings_convolutions_and_multihead_attention():
    torch.manual_seed(0)
    emb, mha = nn.Embedding(64, 48), nn.MultiheadAttention(48, 4)
    compress_module(emb, 6)
    compress_module(mha.out_proj, 6)
    model = nn.ModuleDict({"emb": emb, "mha": mha}).eval()
    ids = torch.randint(0, 64, (5, 3))
    with torch.no_grad():
        h = emb(ids)
        want = mha(h, h, h)[0]
    assert freeze(model, "auto", overhead={"cpu": 0.0}) == {"emb": "dense", "mha.out_proj": "dense"}
    with torch.no_grad():
        torch.testing.assert_close(mha(emb(ids), emb(ids), emb(ids))[0], want, rtol=0, atol=0)


def test_padded_linear_runs_its_cropped_factors():
    torch.manual_seed(0)
    m = nn.Linear(97, 89).double()  # both sizes prime: the tensorization pads rows and columns
    compress_module(m, 8)
    p = parametrization(m)
    assert p.tt.d_out > 89 and p.tt.d_in > 97
    m.eval()
    x = torch.randn(3, 97, dtype=torch.float64)
    with torch.no_grad():
        want, W = m(x), m.weight.detach().clone()
    assert freeze(m, "factors") == {"": "factors"}
    assert m._sttp_u.shape == (89, 16) and m._sttp_vs.shape == (16, 97)  # padding cropped, rank 8 aligned to 16
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.weight, W, rtol=1e-12, atol=1e-12)


def test_shortcut_factors_looks_embedding_rows_up_in_its_factors():
    torch.manual_seed(0)
    # wide rows: U (40 x 16) and (V σ)ᵀ (16 x 2048) are the smallest form (a TT lookup's suffix table would hold
    # 8 x 5 x 2048 values); the 12-row table is smaller than any factored form
    emb, small = nn.Embedding(40, 2048, padding_idx=0), nn.Embedding(12, 64)
    compress_module(emb, 8)
    compress_module(small, 8)
    model = nn.ModuleDict({"emb": emb, "small": small}).eval()
    ids = torch.randint(0, 40, (4, 7))
    with torch.no_grad():
        want, W = emb(ids), emb.weight.detach().clone()
    assert freeze(model, "auto") == {"emb": "dense", "small": "dense"}  # the speed-first rule: plain lookups
    unfreeze(model)
    assert freeze(model, "factors") == {"emb": "factors", "small": "dense"}
    assert {k for k, v in emb._buffers.items() if v is not None} == {"_sttp_vs", "_sttp_u"}
    assert emb._sttp_u.shape == (40, 16) and emb._sttp_vs.shape == (16, 2048)
    assert set(small._buffers) == {"weight"}
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emb.weight, W, rtol=1e-5, atol=1e-6)
    unfreeze(model)
    assert type(emb).__name__ == "ParametrizedEmbedding" and "forward" not in emb.__dict__


def test_factors_of_row_ordered_and_scaled_layers_keep_the_weight():
    """A distilled text model's token embedding is row-ordered and row-scaled: its factors carry the scales and
    the weight's row order; a column-scaled Linear's V carries its column scales."""
    torch.manual_seed(0)
    emb, lin = nn.Embedding(1009, 64).double(), nn.Linear(96, 300).double()
    compress_module(emb, 8, row_weight=torch.rand(1009, dtype=torch.float64) + 0.5, row_order=torch.randperm(1009))
    compress_module(lin, 8, col_weight=torch.rand(96, dtype=torch.float64) + 0.5)
    model = nn.ModuleDict({"emb": emb, "lin": lin}).eval()
    ids, x = torch.randint(0, 1009, (4, 7)), torch.randn(5, 96, dtype=torch.float64)
    with torch.no_grad():
        want_e, want_l, W = emb(ids), lin(x), emb.weight.detach().clone()
    assert freeze(model, "factors") == {"emb": "factors", "lin": "factors"}
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), want_e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(emb.weight, W, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin(x), want_l, rtol=1e-12, atol=1e-12)


def test_an_embedding_at_full_rank_is_looked_up_through_its_tensor_train():
    """At rank = width (a distilled token embedding's pinned rank) U is as large as the table; two tables of the
    U chain (its first modes, then the rest with (V σ)ᵀ folded in) hold a fraction of it and give the same rows."""
    torch.manual_seed(0)
    emb = nn.Embedding(1009, 32).double()  # 1009 rows: prime, padded to 1020 = 2 x 2 x 3 x 5 x 17
    compress_module(emb, 32, row_weight=torch.rand(1009, dtype=torch.float64) + 0.5, row_order=torch.randperm(1009),
                    col_weight=torch.rand(32, dtype=torch.float64) + 0.5)
    p = parametrization(emb)
    emb.eval()
    ids = torch.randint(0, 1009, (6, 5))
    with torch.no_grad():
        want, W = emb(ids), emb.weight.detach().clone()
    assert freeze(emb, "factors") == {"": "factors"}
    assert set(emb._buffers) == {"_sttp_a", "_sttp_c", "_sttp_rows", "_sttp_rho"}
    stored = emb._sttp_a.numel() + emb._sttp_c.numel() + 2 * 1009
    assert stored < 1009 * 32 / 2  # the lookup's tables, order and row scales: under half the table
    assert p.tt.middle == 32 and 32 * (1009 + 32) > 1009 * 32  # where U and (V σ)ᵀ would hold more than the table
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(emb.weight, W, rtol=1e-12, atol=1e-12)
    unfreeze(emb)
    assert type(emb).__name__ == "ParametrizedEmbedding" and not hasattr(emb, "_sttp_lo")
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), want, rtol=0, atol=0)


def test_bad_shortcut_is_rejected():
    model = small_model()
    with pytest.raises(ValueError, match=r"shortcut must be one of \('none', 'auto', 'factors'\)"):
        freeze(model, "tt")
    # refused before anything changed: no layer frozen, every compressed layer still parametrized
    assert not any(is_frozen(m) for m in model)
    assert all(is_parametrized(model[i]) for i in (0, 2, 4))
