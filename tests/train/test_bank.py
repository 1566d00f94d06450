"""WeightBank: the weights and gradients of a training step equal those of per-layer builds."""

import copy

import pytest
import torch
from torch import nn

from sttp_compress.train.bank import WeightBank, _walk
from sttp_compress.compress.convert import compress


def model(method="sttp", spectrum="free"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
                      nn.Flatten(), nn.Linear(16 * 2 * 2, 12), nn.Linear(12, 10), nn.Linear(10, 7)).double()
    # layers of equal and different shapes and ranks: chains share prefixes, split, and end at all levels
    compress(m, rank={"0": 4, "2": 3, "4": 4, "6": 5, "7": 2, "8": 7}, method=method, spectrum=spectrum)
    return m.train()


def step_grads(m, x):
    m.zero_grad()
    out = m(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,spectrum,waste", [("sttp", "free", None), ("sttp", "identity", None),
                                                   ("sttp", "lipschitz", None), ("svdp", "free", None),
                                                   ("sttp", "free", 4.0), ("svdp", "free", 4.0)])
def test_bank_step_equals_per_layer_step(method, spectrum, waste):
    """Also with frames of several shapes padded into shared calls (max_waste 4: the GPU default's path)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    a, b = model(method, spectrum), model(method, spectrum)
    out_a, grads_a = step_grads(a, x)
    bank = WeightBank(b, max_waste=waste).attach()
    if method == "sttp":
        assert len(list(_walk(bank.tree))) < sum(len(c[2]) for c in bank.chains)  # some levels batched
    out_b, grads_b = step_grads(b, x)
    if waste is not None:
        assert len(bank._plan(x.device).buckets) < len(bank.shapes)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=1e-10, msg=n)
    bank.detach()  # back to per-layer builds
    out_c, _ = step_grads(b, x)
    torch.testing.assert_close(out_c, out_a, rtol=0, atol=1e-12)


def test_empty_originals_are_constants():
    """Frames without free entries (−I) have 0-sized originals: not trainable, and not inputs of the build."""
    m = model()
    originals = [p for n, p in m.named_parameters() if "parametrizations" in n]
    empty = [p for p in originals if p.numel() == 0]
    assert empty and not any(p.requires_grad for p in empty)
    assert all(p.requires_grad for p in originals if p.numel())
    bank = WeightBank(m)
    assert len(bank.inputs) == len(originals) - len(empty) and all(p.numel() for p in bank.inputs)
    opt_params = [p for p in m.parameters() if p.requires_grad]
    m(torch.randn(1, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in opt_params) and all(p.grad is None for p in empty)


def test_bank_is_skipped_in_eval_and_without_grad():
    m = model()
    bank = WeightBank(m).attach()
    calls = []
    build = bank.build
    bank.build = lambda: calls.append(1) or build()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        m(x)
    m.eval()
    m(x)
    assert calls == []
    m.train()
    m(x)
    assert calls == [1]
    assert bank.weights is None  # cleared after the forward
    copy.deepcopy(m)  # a model with a bank attached can still be copied
