"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch

from sttp_compress.evaluate import run as evaluate


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip with a reason on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
@pytest.fixture
def fast_eval_timing(monkeypatch):
    """sttp-eval times only the minimum number of forward passes, so tests that measure latency stay fast."""
    monkeypatch.setattr(evaluate, "TIMING_BUDGET_S", 0.0)
    monkeypatch.setattr(evaluate, "WARMUP_RUNS", 1)
