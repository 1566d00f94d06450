"""activation.input_scales: per-feature second moments of each Linear's inputs, floored and powered."""

import pytest
import torch
from torch import nn

from sttp_compress.activation import ENERGY_FLOOR, calibration_batches, input_scales


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
