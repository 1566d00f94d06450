"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from sttp_compress.evaluate import run as evaluate
@pytest.fixture
def fast_eval_timing(monkeypatch):
    """sttp-eval times only the minimum number of forward passes, so tests that measure latency stay fast."""
    monkeypatch.setattr(evaluate, "TIMING_BUDGET_S", 0.0)
    monkeypatch.setattr(evaluate, "WARMUP_RUNS", 1)
