"""Tests for sttp_compress.io.specs: --data and hf: specs parsed once into types."""

from __future__ import annotations

from pathlib import Path

import pytest

from sttp_compress.errors import UserError
from sttp_compress.io.specs import DataSpec, WithDataSpec, hf_folder, parse_data


@pytest.mark.parametrize("raw,kind,path", [
    ("./cifar10", "images", "cifar10"),
    ("tensors:d.pt", "tensors", "d.pt"),
    ("text:~/t.txt", "text", str(Path("~/t.txt").expanduser())),
    ("pairs: p.tsv", "pairs", "p.tsv"),
    ("textfile.txt", "images", "textfile.txt"),  # no prefix: a folder (checked when read)
])
def test_parse_data_gives_the_kind_and_the_path(raw, kind, path):
    spec = parse_data(raw)
    assert (spec.kind, spec.path, str(spec)) == (kind, Path(path), raw)
    assert spec.textual is (kind in ("text", "pairs"))
    assert parse_data(spec) is spec and parse_data(None) is None


@pytest.mark.parametrize("raw,expected", [("tensors:", "tensors:FILE.pt"), ("text: ", "text:FILE"),
                                          ("pairs:", "pairs:FILE")])
def test_an_empty_file_part_is_one_user_error(raw, expected):
    with pytest.raises(UserError, match=f"bad data '{raw}': expected {expected}"):
        parse_data(raw)


def test_with_data_spec_views():
    class Job(WithDataSpec):
        def __init__(self, data):
            self.data = data

    assert Job("text:a.txt").data_kind == "text" and Job(None).data_spec is None
    assert isinstance(Job("x").data_spec, DataSpec)


def test_hf_folder():
    assert hf_folder("hf:~/m") == Path("~/m").expanduser() and hf_folder("torchvision:resnet18") is None
    assert hf_folder(None) is None
    with pytest.raises(UserError, match="expected hf:DIR"):
        hf_folder("hf: ")
