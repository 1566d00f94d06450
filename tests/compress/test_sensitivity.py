"""Layer sensitivities: measured on the model's outputs, the model left as it was, and used by the pipeline."""

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sttp_compress.compress.allocate import LayerOptions
from sttp_compress.compress.convert import compress_module, weight_of
from sttp_compress.compress.sensitivity import SENSITIVITY_RANGE, layer_sensitivities, model_outputs, output_gap
from sttp_compress.errors import UserError
from sttp_compress.pipeline import CompressJob, run_compress
from sttp_compress.train.loop import FinetuneConfig


class TwoPaths(nn.Module):
    """y = loud(x) + damping · quiet(x): an error in `quiet` reaches the output damping² as large (squared)."""

    def __init__(self, damping: float):
        super().__init__()
        self.damping = damping
        torch.manual_seed(0)
        self.loud, self.quiet = nn.Linear(48, 48), nn.Linear(48, 48)
        self.quiet.load_state_dict(self.loud.state_dict())  # the same weight error at the same rank

    def forward(self, x):
        return self.loud(x) + self.damping * self.quiet(x)


def _convert(m: nn.Module, r: int) -> None:
    compress_module(m, r)


def test_output_gap_is_the_relative_squared_distance_over_all_batches():
    ref = [torch.ones(2, 3), 2 * torch.ones(1, 3)]
    out = [torch.ones(2, 3), torch.ones(1, 3)]
    assert output_gap(out, ref) == pytest.approx(3 / (6 + 12))
    assert output_gap(ref, ref) == 0.0


def test_a_layer_whose_error_is_damped_downstream_is_less_sensitive_and_the_model_is_unchanged():
    model = TwoPaths(0.3)
    batches = [(torch.randn(32, 48, generator=torch.Generator().manual_seed(i)), None) for i in range(2)]
    before = model_outputs(model, batches)
    params = {n: p.clone() for n, p in model.state_dict().items()}
    s = layer_sensitivities(model, {"loud": 4, "quiet": 4}, batches, _convert, weight_of, LayerOptions.unit_cost)
    assert s == {"loud": 1.0, "quiet": pytest.approx(0.09, rel=1e-3)}  # two layers: the median is the larger
    assert isinstance(model.loud, nn.Linear) and not hasattr(model.loud, "parametrizations")
    assert all(torch.equal(p, params[n]) for n, p in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(model_outputs(model, batches), before))


def test_sensitivities_are_relative_to_the_median_and_clamped():
    model = TwoPaths(0.01)
    batches = [torch.randn(16, 48, generator=torch.Generator().manual_seed(0))]
    s = layer_sensitivities(model, {"loud": 4, "quiet": 4}, batches, _convert, weight_of, LayerOptions.unit_cost)
    # the gap ratio (1e4) is beyond the clamp
    assert s == {"loud": 1.0, "quiet": pytest.approx(1 / SENSITIVITY_RANGE)}


def _job(tmp_path, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 32, generator=gen), torch.randint(0, 4, (160,), generator=gen)
    data = (TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:]))
    return CompressJob(module=model, arch="torch.nn:Identity", output=str(tmp_path / "m.sttp.safetensors"),
                       progress=False, datasets=data,
                       finetune=FinetuneConfig(epochs=0, batch_size=16, workers=0, device="cpu"), **kw)


def test_the_sensitivity_allocation_reports_each_layers_sensitivity_and_meets_the_ratio(tmp_path):
    report, _ = run_compress(_job(tmp_path, ratio=3.0, allocation="sensitivity"))
    sens = [l["sensitivity"] for l in report["layers"]]
    assert len(sens) == 3 and max(sens) > min(sens) > 0 and 1.0 in sens  # the median layer is 1
    assert report["totals"]["ratio"] >= 3.0
    (tmp_path / "plain").mkdir()
    plain, _ = run_compress(_job(tmp_path / "plain", ratio=3.0))
    assert all("sensitivity" not in l for l in plain["layers"])


@pytest.mark.parametrize("change,fragment", [({"ratio": None, "rank": 4}, "give ratio"),
                                             ({"datasets": None, "finetune": None}, "needs data")])
def test_the_sensitivity_allocation_refuses_jobs_it_cannot_measure(tmp_path, change, fragment):
    job = _job(tmp_path, ratio=3.0, allocation="sensitivity")
    for key, value in change.items():
        setattr(job, key, value)
    with pytest.raises(UserError, match=fragment):
        run_compress(job)
    assert not (tmp_path / "m.sttp.safetensors").exists()


@pytest.mark.parametrize("bn_recalibrate,epochs,expected", [(0, 0, False), (2, 0, True), (0, 1, True)])
def test_batch_statistics_where_the_run_re_estimates_them(tmp_path, monkeypatch, bn_recalibrate, epochs, expected):
    """Sensitivities see batch statistics when ‹bn_recalibrate› or a training fine-tune will renormalize."""
    seen = []

    def spy(*args, batch_statistics=False, **kw):
        seen.append(batch_statistics)
        return {}

    monkeypatch.setattr(sys.modules["sttp_compress.compress.sensitivity"], "layer_sensitivities", spy)
    job = _job(tmp_path, ratio=3.0, allocation="sensitivity", bn_recalibrate=bn_recalibrate)
    job.finetune.epochs = epochs
    run_compress(job)
    assert seen == [expected]


def test_batch_statistics_normalize_by_the_batch_and_leave_the_stored_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).eval()
    model[1].running_mean.fill_(3.0)  # stale statistics: eval mode is far from the batch's own
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 8)
    (y,) = model_outputs(model, [x], batch_statistics=True)
    assert torch.allclose(y.mean(0), model[1].bias.detach(), atol=1e-5)  # normalized by the batch's mean
    (y_eval,) = model_outputs(model, [x])
    assert not torch.allclose(y, y_eval, atol=0.1)
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert not model.training and not model[1].training
