"""compress.convert: which layers are candidates, conversion at a rank or a ratio, the report rows, undo."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sttp_compress.compress.convert import (candidate_layers, compress_to_target, compressed_layers, count_parameters,
                                            decompress)
from sttp_compress.errors import UserError


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _eq9(modes: list[int], ranks: list[int]) -> int:
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(modes)) - sum(r * r for r in ranks[1:-1])


def test_first_conv_and_classifier_stay_dense_unless_included():
    chosen, skipped = candidate_layers(net())
    assert list(chosen) == ["2", "6"] and "first" in skipped["0"] and "classifier" in skipped["8"]
    chosen, skipped = candidate_layers(net(), include=["*"], exclude=["6"])
    assert list(chosen) == ["0", "2", "8"] and "exclude" in skipped["6"]


def test_rank_target_rows_follow_eq9_and_the_totals_add_up():
    model = net()
    before = count_parameters(model)
    parts = compress_to_target(model, rank=4)
    names = [row["name"] for row in parts["layers"]]
    assert names == ["2", "6"] and set(compressed_layers(model)) == set(names)
    for row in parts["layers"]:
        assert row["rank"] == 4 and row["params_compressed"] == _eq9(row["modes"], row["tt_ranks"])
        assert math.prod(row["modes"]) == row["params_original"] and 0 < row["rel_error"] < 1
    saved = sum(r["params_original"] - r["params_compressed"] for r in parts["layers"])
    assert parts["totals"]["params_original"] == before
    assert parts["totals"]["params_compressed"] == before - saved == count_parameters(model)
    assert [s["name"] for s in parts["skipped"]] == ["0", "8"]


def test_a_rank_that_suffices_reconstructs_exactly():
    model = net().double()
    want = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in ("2", "6")}
    parts = compress_to_target(model, rank=64)
    for row in parts["layers"]:
        assert row["rel_error"] < 1e-10, row
    for name, m in model.named_modules():
        if name in want:
            torch.testing.assert_close(m.weight, want[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0])
def test_ratio_target_is_reached_from_above_within_three_percent(ratio):
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256),
                         nn.ReLU(), nn.Linear(256, 10))
    parts = compress_to_target(wide, ratio=ratio)
    assert ratio <= parts["totals"]["ratio"] <= 1.03 * ratio


def test_pinned_ranks_and_bad_pins():
    parts = compress_to_target(net(), ratio=2.0, layer_ranks={"6": 3})
    assert {r["name"]: r["rank"] for r in parts["layers"]}["6"] == 3
    with pytest.raises(UserError, match="not a layer to compress"):
        compress_to_target(net(), ratio=2.0, layer_ranks={"0": 3})
    with pytest.raises(UserError, match="positive integer"):
        compress_to_target(net(), ratio=2.0, layer_ranks={"6": 0})


def test_decompress_gives_plain_modules_with_the_current_weights():
    model = net().eval()
    compress_to_target(model, rank=4)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    decompress(model)
    assert not compressed_layers(model) and type(model[2]) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_report_rank_is_the_largest_tt_rank_and_the_spectrum_rank_the_middle_bond():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3))
    (row, _) = compress_to_target(model, rank=96, include=["*"])["layers"]
    assert row["tt_ranks"][6] == 64 and max(row["tt_ranks"]) == 96  # 64 = 2^6: six output modes, then the middle
    assert row["rank"] == 96 and row["spectrum_rank"] == 64  # σ has d_out = 64 entries at most


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(11, 20, 3),  # C_in 11 > 7: the tensorization pads it
                                  lambda: nn.Linear(24, 40)])
@pytest.mark.parametrize("scaled", [False, True])
def test_report_spectra_are_the_singular_values_before_and_after(make, scaled):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    W0 = model[0].weight.detach().clone()
    rows = W0.shape[0]
    parts = compress_to_target(model, rank=5, include=["*"], spectra_of=1,
                               row_weights={"0": torch.rand(rows) + 0.5} if scaled else None)
    before, after = parts["spectra"]["0"]
    W1 = model[0].weight.detach().double().reshape(rows, -1)
    want_before = torch.linalg.svdvals(W0.double().reshape(rows, -1))
    torch.testing.assert_close(torch.tensor(before, dtype=torch.float64), want_before, rtol=1e-4, atol=1e-5)
    assert len(after) == 5  # the spectrum rank; the rest are zero
    torch.testing.assert_close(torch.tensor(after, dtype=torch.float64), torch.linalg.svdvals(W1)[:5], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("d_in", [1024, 1100])  # 1100 = 2^2·5^2·11 pads its columns only (tt.pads_columns_only)
def test_big_layer_error_from_factors_matches_the_dense_difference(d_in, monkeypatch):
    """Layers above EXACT_NUMEL get their report error from the factors (no dense copy, inner product in blocks
    of ranks, here 3 ranks a block); it must equal ‖W0 − W1‖/‖W0‖ computed from the rebuilt weight in float64."""
    from sttp_compress.compress import convert

    monkeypatch.setattr(convert, "FACTOR_BLOCK", 3 * d_in)
    torch.manual_seed(0)
    layer = nn.Linear(d_in, 300)
    W0 = layer.weight.detach().clone().double()
    row = compress_to_target(nn.Sequential(layer), rank=40, include=["*"])["layers"][0]
    W1 = layer.weight.detach().double()
    expected = float((W1 - W0).norm() / W0.norm())
    assert 0.05 < expected < 1 and row["rel_error"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("row_weighted", [False, True])
def test_a_lone_large_layer_shares_the_reports_gram_with_its_tt_svd(row_weighted, monkeypatch):
    """A lone layer is not profiled, so the report's spectrum computes W Wᵀ itself: an unscaled float32 layer above
    EXACT_NUMEL hands that Gram to its TT-SVD (one Gram, not two); a row-scaled one (another matrix) does not. The
    spectrum and the weights equal those of the conversion without a report spectrum."""
    from sttp_compress.core import tt

    def convert(spectra_of: int) -> tuple[dict, torch.Tensor, int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1100, 300))
        calls = []
        with monkeypatch.context() as m:
            m.setattr(tt, "gram_chain", lambda *a, **k: calls.append(a[0].shape) or gram_chain(*a, **k))
            weights = {"0": torch.rand(300) + 0.5} if row_weighted else None
            parts = compress_to_target(model, ratio=4, include=["*"], row_weights=weights, spectra_of=spectra_of)
        return parts, model[0].weight.detach(), len(calls)

    gram_chain = tt.gram_chain
    torch.manual_seed(0)
    W0 = nn.Linear(1100, 300).weight.detach().double()
    parts, W, calls = convert(spectra_of=4)
    parts_own, W_own, calls_own = convert(spectra_of=0)
    assert (calls, calls_own) == (0 if row_weighted else 1, 0)
    assert parts["layers"][0]["rank"] == parts_own["layers"][0]["rank"] and parts_own["spectra"] == {}
    before = parts["spectra"]["0"][0]
    assert before == pytest.approx(torch.linalg.svdvals(W0).tolist(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(W, W_own, rtol=0, atol=2e-5 * float(W_own.abs().max()))


@pytest.mark.parametrize("d_in,row_weighted", [(1100, False), (1024, True)])  # 1100 pads its columns only
def test_a_large_layer_converts_from_the_allocations_gram(d_in, row_weighted, monkeypatch):
    """A float32 layer above EXACT_NUMEL takes its U chain from the Gram W Wᵀ that the allocation's profile computed
    (no second pass over W's unfoldings); the result equals the conversion that computes its own Grams."""
    from sttp_compress.compress.allocate import LayerOptions
    from sttp_compress.core import tt

    def convert(gram_known: bool) -> tuple[dict, torch.Tensor, int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d_in, 300), nn.Linear(300, 200))  # two layers: a lone one is not profiled
        calls = []
        with monkeypatch.context() as m:
            m.setattr(tt, "gram_chain", lambda *a, **k: calls.append(a[0].shape) or gram_chain(*a, **k))
            if not gram_known:
                m.setattr(LayerOptions, "gram", lambda self: None)
            weights = {"0": torch.rand(300) + 0.5} if row_weighted else None
            row = compress_to_target(model, ratio=4, include=["*"], row_weights=weights)["layers"][0]
        return row, model[0].weight.detach(), len(calls)

    gram_chain = tt.gram_chain
    row, W, calls = convert(gram_known=True)
    row_own, W_own, calls_own = convert(gram_known=False)
    assert (calls, calls_own) == (1, 0) and row["rank"] == row_own["rank"]
    assert row["rel_error"] == pytest.approx(row_own["rel_error"], rel=1e-5)
    torch.testing.assert_close(W, W_own, rtol=0, atol=2e-5 * float(W_own.abs().max()))
