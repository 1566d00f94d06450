"""Free cores: training without the orthonormal gauge, and the exact way back to STTP's parameters."""

import pytest
import torch
from torch import nn

from sttp_compress import compress_module, count_parameters
from sttp_compress.train.bank import WeightBank
from sttp_compress.core.forms import layer_originals
from sttp_compress.train.freecores import free_cores, free_frames, gauge_released, release_gauge, restore_gauge
from sttp_compress.core.householder import frame

LAYERS = [
    ("linear", lambda: nn.Linear(48, 40), dict(rank=5)),
    ("conv", lambda: nn.Conv2d(6, 12, 3), dict(rank=4)),
    ("svdp", lambda: nn.Linear(30, 20), dict(rank=6, method="svdp")),
    ("embedding, padded rows, weighted and ordered",
     lambda: nn.Embedding(37, 12),  # 37 is padded to 40
     dict(rank=6, row_weight=torch.rand(37) + 0.5, row_order=torch.randperm(37))),
    ("column-scaled", lambda: nn.Linear(24, 18), dict(rank=4, col_weight=torch.rand(24) + 0.5)),
]


def _perturb(m, scale=0.3):
    with torch.no_grad():
        for X in free_frames(m):
            X.add_(scale * torch.randn_like(X))


@pytest.mark.parametrize("name,make,kw", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_restoring_the_gauge_keeps_the_trained_weight_and_the_dof(name, make, kw):
    torch.manual_seed(0)
    m = make().double()
    p = compress_module(m, **kw)
    n_params, before = count_parameters(m), m.weight.detach().clone()
    release_gauge(m)
    torch.testing.assert_close(m.weight, before)  # releasing changes nothing
    assert gauge_released(m)
    _perturb(m)  # a free core is no longer a frame
    trained = m.weight.detach().clone()
    assert (trained - before).abs().max() > 0.1
    restore_gauge(m)
    assert not gauge_released(m) and free_frames(m) is None
    torch.testing.assert_close(m.weight, trained, rtol=1e-9, atol=1e-9)
    assert count_parameters(m) == n_params
    assert sum(o.numel() for o in layer_originals(m, p)) == p.dof()
    assert "(free)" not in repr(p)
    assert all(o.requires_grad for o in layer_originals(m, p))
    for (d, r, red), P in zip(p.groups, layer_originals(m, p)):  # the originals generate orthonormal frames again
        X = frame(P, d, r, red)
        torch.testing.assert_close(X.transpose(-1, -2) @ X, torch.eye(r, dtype=X.dtype).expand(len(X), r, r))


def test_free_cores_train_and_only_they_take_gradients():
    torch.manual_seed(0)
    m = nn.Linear(32, 24)
    p = compress_module(m, rank=4)
    x, target = torch.randn(64, 32), torch.randn(64, 24)
    with free_cores(m):
        params = [q for q in m.parameters() if q.requires_grad]
        assert {id(q) for q in params} == {id(q) for q in free_frames(m)} | {id(layer_originals(m, p)[-1]), id(m.bias)}
        opt = torch.optim.Adam(params, lr=1e-2)
        first = None
        for _ in range(50):
            loss = (m(x) - target).pow(2).mean()
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained = m.weight.detach().clone()
    assert loss.item() < 0.9 * first
    assert free_frames(m) is None
    torch.testing.assert_close(m.weight, trained, rtol=1e-5, atol=1e-6)


def test_bank_builds_free_cores_like_the_layers_and_refuses_a_mix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 20)).double()
    for layer, rank in zip(model, (4, 3, 3, 5)):
        compress_module(layer, rank=rank)
    release_gauge(model)
    for layer in model:
        _perturb(layer)
    bank = WeightBank(model)
    assert bank.free
    for W, layer in zip(bank._build(*bank.inputs), model):
        torch.testing.assert_close(W, layer.weight)
    restore_gauge(model[1])
    with pytest.raises(ValueError, match="every layer's cores free"):
        WeightBank(model)


def test_release_needs_the_free_spectrum_and_changes_nothing_otherwise():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    compress_module(model[0], rank=3)
    compress_module(model[1], rank=3, spectrum="lipschitz")
    with pytest.raises(ValueError, match="free spectrum"):
        release_gauge(model)
    assert not gauge_released(model)


def test_the_parametrization_keeps_no_state_of_the_free_cores():
    """Releasing adds the layer's `free_cores` and takes nothing into SpectralTT; restoring leaves the layer as
    it was (same attributes, state_dict keys and class forward); a copy of a released model is its own."""
    import copy

    torch.manual_seed(0)
    m = nn.Linear(20, 16).double()
    p = compress_module(m, rank=3)
    attrs, keys = set(vars(p)), set(m.state_dict())
    release_gauge(m)
    assert set(vars(p)) == attrs
    assert {k for k in m.state_dict() if k not in keys} == {f"free_cores.{i}" for i in range(len(p.groups))}
    twin = copy.deepcopy(m)
    _perturb(twin)
    trained = twin.weight.detach().clone()
    assert (trained - m.weight).abs().max() > 0.1  # the copy reads its own free cores
    restore_gauge(m)
    assert set(m.state_dict()) == keys and "forward" not in vars(m.parametrizations.weight)
    restore_gauge(twin)
    torch.testing.assert_close(twin.weight, trained, rtol=1e-9, atol=1e-9)


def test_free_cores_are_not_weight_decayed():
    """Free cores are frames, not dense weights: the optimizer puts them with the reflectors, without weight
    decay (decay would shrink every frame, and the weight with it: found on an H100, accuracy at chance)."""
    from sttp_compress.train.loop import FinetuneConfig, build_optimizer

    m = nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 8))
    compress_module(m[0], rank=4)
    release_gauge(m)
    opt = build_optimizer(m, FinetuneConfig(optimizer="adamw", weight_decay=0.1))
    decayed = {id(q) for g in opt.param_groups if g["weight_decay"] > 0 for q in g["params"]}
    assert decayed == {id(m[1].weight)}
    assert all(id(q) not in decayed for q in free_frames(m[0]))
