"""Tests for sttp_compress.errors: library messages name options in Python terms, the CLI in flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sttp_compress.cli import _main, compress_app, flag_name
from sttp_compress.compress.convert import compress_to_target
from sttp_compress.errors import UserError, option_names, terms


def test_terms_reads_marked_options_as_python_names_by_default():
    assert terms("‹max_size› and ‹ratio› only") == "max_size and ratio only"
    assert terms("no marks, --kept as is") == "no marks, --kept as is"


def test_option_names_renders_marks_inside_the_block_only():
    e = UserError("‹batch_size› must be positive")
    with option_names(flag_name):
        assert str(e) == "--batch-size must be positive"
        with option_names(str.upper):
            assert str(e) == "BATCH_SIZE must be positive"
        assert terms("‹min_sts_spearman›") == "--min-sts-spearman"
    assert str(e) == "batch_size must be positive"


def test_the_same_error_reads_in_api_terms_and_in_cli_flags(tmp_path, capsys):
    with pytest.raises(UserError, match=r"^ratio must be > 1 \(original/compressed parameters\), got 0.5$"):
        compress_to_target(nn.Sequential(nn.Linear(8, 8)), ratio=0.5)
    model = tmp_path / "m.pt"
    torch.save(nn.Linear(8, 8).state_dict(), model)
    code = _main(compress_app, "sttp-compress", [str(model), "--arch", "torch.nn:Linear?in_features=8&out_features=8",
                                                 "--ratio", "0.5"])
    assert code == 2
    assert "--ratio must be > 1" in capsys.readouterr().err
