"""compress.batchnorm: a BatchNorm folded into its eval-mode affine computes what the BatchNorm computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sttp_compress.compress.batchnorm import BATCHNORMS, ChannelAffine, affine_names, attach_affines, fold_batchnorm_


def _trained(model: nn.Module, shape: tuple[int, ...], steps: int = 4) -> nn.Module:
    """The model with running statistics and affine parameters away from their initial values."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(3 * torch.randn(16, *shape, dtype=torch.float64) + 1)
        for m in model.modules():
            if isinstance(m, BATCHNORMS) and m.affine:
                m.weight.uniform_(-2, 2)
                m.bias.uniform_(-1, 1)
    return model.eval()


CASES = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                                     nn.BatchNorm2d(4, affine=False)), (3, 6, 6)),
    "linear (N, C)": (lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, eps=1e-3)), (5,)),
    "conv1d (N, C, L)": (lambda: nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6)), (2, 9)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 4, 4, 4)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_folded_model_computes_the_eval_mode_outputs(case):
    build, shape = CASES[case]
    model = _trained(build().double(), shape)
    x = torch.randn(5, *shape, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        bns = [n for n, m in model.named_modules() if "BatchNorm" in type(m).__name__]
        assert fold_batchnorm_(model) == bns
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
        model.train()  # no batch statistics any more: train mode computes the same map
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert affine_names(model) == bns and all(isinstance(model.get_submodule(n), ChannelAffine) for n in bns)
    assert not [k for k in model.state_dict() if "running" in k or "num_batches" in k]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_affine_runs_as_a_batch_norm_with_positive_eps_whose_variance_makes_one(dtype):
    """torch 2.11 refuses ε = 0 in F.batch_norm, eval mode too (a folded model failed on a GPU machine's; 2.14
    takes it): ε > 0 with variance 1 − ε, whose sum is
    exactly 1 in every float dtype, so the map stays weight·x + bias (to the dtype's rounding)."""
    m = ChannelAffine(8).to(dtype)
    assert m.eps > 0 and bool(((m.var + m.eps) == 1).all()) and m.var.dtype == dtype
    torch.manual_seed(0)
    with torch.no_grad():
        m.weight.uniform_(-2, 2)
        m.bias.uniform_(-1, 1)
        x = torch.randn(4, 8, 5, 5).to(dtype)
        expected = x.double() * m.weight.double().view(1, -1, 1, 1) + m.bias.double().view(1, -1, 1, 1)
        tol = 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(m(x).double(), expected, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_a_folded_model_runs_on_cuda():
    """On CUDA the folded model computes what it computes on the CPU."""
    build, shape = CASES["conv2d"]
    model = _trained(build().double(), shape).float()
    fold_batchnorm_(model)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model.cuda()(x.cuda()).cpu(), model.cpu()(x), rtol=1e-4, atol=1e-4)


def test_the_affine_is_gamma_over_sigma_and_beta_minus_its_mean_term():
    bn = nn.BatchNorm1d(3, eps=0.5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([3.5, 0.5, 1.5]))
        bn.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0, 1.0]))
    model = nn.Sequential(bn)
    fold_batchnorm_(model)
    a = torch.tensor([2.0 / 2.0, 1.0 / 1.0, -1.0 / 2.0 ** 0.5])  # γ/√(v + ε)
    torch.testing.assert_close(model[0].weight.detach(), a)
    torch.testing.assert_close(model[0].bias.detach(), torch.tensor([0.5 - 1.0, 2.0, 1.0]))  # β − a·μ


def test_a_batchnorm_without_running_statistics_stays():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert fold_batchnorm_(model) == [] and isinstance(model[1], nn.BatchNorm1d)


def test_a_shared_batchnorm_becomes_one_shared_affine_and_a_subclass_stays():
    class Custom(nn.BatchNorm1d):  # its forward may do more than normalize: not folded
        pass

    bn = nn.BatchNorm1d(3)
    model = _trained(nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 3), bn, Custom(3)).double(), (3,))
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm_(model) == ["1"]  # named once, as named_modules() names it
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert model[1] is model[3] and isinstance(model[1], ChannelAffine) and type(model[4]) is Custom
    shared = nn.BatchNorm1d(3)
    fresh = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared, Custom(3))
    attach_affines(fresh, ["1"])
    assert fresh[1] is fresh[3] and isinstance(fresh[3], ChannelAffine)
    fresh.load_state_dict(model.state_dict())  # the same keys, both names of the shared affine included
    with pytest.raises(ValueError, match="4 is a Custom, not a BatchNorm"):
        attach_affines(fresh, ["4"])


def test_the_affine_trains_its_two_vectors():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    fold_batchnorm_(model)
    model.train()
    model(torch.randn(8, 4)).square().sum().backward()
    assert model[1].weight.grad is not None and model[1].bias.grad.abs().sum() > 0
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_attaching_affines_to_a_fresh_architecture_names_what_does_not_fit():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    attach_affines(model, ["1"])
    assert isinstance(model[1], ChannelAffine) and model[1].num_features == 2
    with pytest.raises(ValueError, match="0 is a Conv2d, not a BatchNorm"):
        attach_affines(model, ["0"])
    with pytest.raises(ValueError, match="7 is not a module"):
        attach_affines(model, ["7"])
