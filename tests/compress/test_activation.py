"""activation.input_scales: per-feature second moments of each Linear's inputs, floored and powered."""

import pytest
import torch
from torch import nn

from sttp_compress.compress.activation import ENERGY_FLOOR, calibration_batches, input_scales


def test_input_scales_are_the_rms_of_each_input_feature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double().train()
    unused = nn.Linear(5, 5)
    x = torch.randn(6, 10, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    batches = [x[:3], (x[3:], torch.zeros(3))]  # tensors and (inputs, targets) pairs
    scales = input_scales(model, {"0": model[0], "2": model[2], "1": model[1], "unused": unused}, batches)
    assert set(scales) == {"0", "2"} and model.training  # the mode is restored
    energy = x.reshape(-1, 4).square().mean(0)
    want = energy.clamp_min(ENERGY_FLOOR * energy.mean()).sqrt()  # the dead feature gets the floor
    torch.testing.assert_close(scales["0"], want)
    with torch.no_grad():
        h = model[1](model[0](x.reshape(-1, 4)))
    torch.testing.assert_close(scales["2"], h.square().mean(0).clamp_min(ENERGY_FLOOR * h.square().mean()).sqrt())
    assert input_scales(model, {"1": model[1]}, batches) == {}


def test_calibration_batches_are_fixed_by_the_seed():
    data = list(range(100))
    a, b = calibration_batches(data, 3, 8, seed=1), calibration_batches(data, 3, 8, seed=1)
    assert len(a) == 3 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], calibration_batches(data, 3, 8, seed=2)[0])


def test_refit_spectra_is_the_least_squares_spectrum_on_the_inputs():
    from sttp_compress.compress.activation import input_moments, refit_spectra
    from sttp_compress.compress.convert import compress_module, parametrization

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(24, 36)).double()
    model = nn.Sequential(nn.Linear(24, 36), nn.Linear(36, 10)).double()
    model[0].load_state_dict(reference[0].state_dict())
    mix = torch.randn(24, 24, dtype=torch.float64)
    X = torch.randn(300, 24, dtype=torch.float64) @ mix  # correlated input features
    compress_module(model[0], 5, col_weight=X.square().mean(0).sqrt())
    compress_module(model[1], 4, spectrum="lipschitz")  # not refitted: its spectrum is normalized
    moments = input_moments(model, {"0": model[0], "1": model[1]}, [X[:100], X[100:]])
    torch.testing.assert_close(moments["0"], X.T @ X / 300, rtol=1e-5, atol=1e-5)  # float32 products
    W0 = reference[0].weight.detach()

    def out_err():
        with torch.no_grad():
            return float((X @ (model[0].weight - W0).T).norm())

    before = out_err()
    assert refit_spectra(model, reference, moments) == ["0"]  # "1": lipschitz, and absent from reference
    after = out_err()
    assert after < before
    p = parametrization(model[0])
    U, s, V = p.factors(*(getattr(model[0].parametrizations.weight, f"original{i}") for i in range(p.n_originals)))
    design = torch.stack([((X @ V[:, i])[:, None] * U[:, i][None, :]).reshape(-1) for i in range(5)], 1)
    best = torch.linalg.lstsq(design, (X @ W0.T).reshape(-1, 1)).solution.squeeze(1)
    torch.testing.assert_close(s.detach(), best, rtol=1e-4, atol=1e-8)


class _Tokens(nn.Module):
    """A toy text encoder: embedding, then q/k/v-style Linears that share their input, then a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        return self.out(self.q(h) + self.k(h) * self.v(h))


def test_text_moments_count_real_tokens_only_and_shared_inputs_once():
    from sttp_compress.compress.activation import input_moments

    torch.manual_seed(0)
    model = _Tokens().double()
    ids = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 7, 8, 9, 10]])
    mask = (torch.arange(5) < torch.tensor([[3], [2], [5]])).long()
    moments = input_moments(model, dict(model.named_children()), [{"input_ids": ids, "attention_mask": mask}])
    assert set(moments) == {"q", "k", "v", "out"}
    with torch.no_grad():
        h = model.emb(ids)[mask.bool()]  # the 10 real tokens; the 5 padding positions do not count
        o = model.q(h) + model.k(h) * model.v(h)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(moments[name], h.T @ h / 10)
    torch.testing.assert_close(moments["out"], o.T @ o / 10)


def test_text_calibration_batches_group_the_same_texts_by_length():
    from sttp_compress.data.text import TokenizedTexts

    torch.manual_seed(0)
    texts = TokenizedTexts([[1] * n for n in torch.randint(1, 40, (200,)).tolist()])
    batches = calibration_batches(texts, 4, 8, seed=3)
    assert [tuple(b["input_ids"].shape)[0] for b in batches] == [8] * 4
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)  # re-batched in order of length: little padding
    chosen = torch.randperm(200, generator=torch.Generator().manual_seed(3))[:32].tolist()
    assert sorted(lengths) == sorted(len(texts.ids[i]) for i in chosen)  # the seed's 32 texts
    again = calibration_batches(texts, 4, 8, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
