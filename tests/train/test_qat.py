"""Quantization-aware steps: forwards see exactly what an int8 checkpoint stores, the optimizer updates the floats."""

import torch
from torch import nn

from sttp_compress.compress.convert import compress
from sttp_compress.io.quantize import dequantize_state, quantize_state
from sttp_compress.train.qat import rounded_parameters, rounded_storage, stored_rounding


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 10))
    compress(m, rank={"0": 6})
    return m


def test_stored_rounding_is_what_an_int8_checkpoint_loads():
    m = _model()
    state = m.state_dict()
    loaded = dequantize_state(quantize_state(state))
    names = {id(p): k for k, p in m.named_parameters()}
    params = rounded_parameters(m)
    assert params and all(p.dim() >= 2 for p in params)
    for p in params:
        assert torch.equal(stored_rounding(p), loaded[names[id(p)]]), names[id(p)]
        assert not torch.equal(stored_rounding(p), p)  # it does round


def test_forwards_use_the_rounded_values_and_steps_update_the_floats():
    m = _model()
    floats = [p.detach().clone() for p in rounded_parameters(m)]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(5, 24)
    seen = []
    hook = m[2].register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.detach().clone()))
    with rounded_storage(m):
        out = m(x)
        for p, f in zip(rounded_parameters(m), floats):  # rounded in place during the step
            assert torch.equal(p, stored_rounding(f))
        out.square().mean().backward()
        grads = [p.grad.clone() for p in rounded_parameters(m)]
        opt.step()  # straight-through: the gradient at the rounded point moves the float values
        for p, f, g in zip(rounded_parameters(m), floats, grads):
            torch.testing.assert_close(p.detach(), f - 0.1 * g)
        after_step = [p.detach().clone() for p in rounded_parameters(m)]
        m(x)  # the next forward rounds the updated floats
        m(x)  # a second forward without a step (validation) keeps the floats aside, not the rounded copy
    hook.remove()
    for p, a in zip(rounded_parameters(m), after_step):  # the floats are back when the block ends
        assert torch.equal(p.detach(), a)
    assert len(seen) == 3 and torch.equal(seen[0], stored_rounding(floats[-1]))  # the layer computed with it
