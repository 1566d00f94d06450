"""Tests for sttp_compress.evaluate.report: report.json / report.md / PNG plots and the terminal summary."""

from __future__ import annotations

import copy
import io
import json
import os

import pytest
from rich.console import Console

from sttp_compress.errors import UserError
from sttp_compress.evaluate.report import human_bytes, render_markdown, summary_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layer(name: str, shape: list[int], rank: int, compressed: int, err: float) -> dict:
    """One synthetic layer entry."""
    original = 1
    for d in shape:
        original *= d
    return {"name": name, "type": "Conv2d" if len(shape) == 4 else "Linear", "shape": shape,
            "modes": [2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3], "tt_ranks": [1, 2, 4, 8, rank, 8, 4, 2, 1],
            "rank": rank, "params_original": original, "params_compressed": compressed, "rel_error": err}


def _report(finetune: bool = True) -> dict:
    """A synthetic report with 5 layers, one skipped layer and (optionally) a fine-tune block."""
    layers = [
        _layer("layer1.0.conv1", [64, 64, 3, 3], 8, 3_100, 0.2134),
        _layer("layer2.0.conv_2", [128, 128, 3, 3], 12, 9_800, 0.25),
        _layer("layer3.0.conv1", [256, 256, 3, 3], 16, 40_000, 0.3012),
        _layer("layer4.0.conv1", [512, 512, 3, 3], 32, 170_000, 0.35),
        _layer("fc", [1000, 512], 24, 36_000, 0.1),
    ]
    report = {
        "format_version": 1, "tool_version": "0.1.0", "method": "sttp", "spectrum": "free",
        "target": {"ratio": 10.0}, "allocation": "greedy",
        "model": {"path": "resnet18.pt", "arch": "torchvision:resnet18"},
        "totals": {"params_original": 11_689_512, "params_compressed": 1_160_800, "ratio": 10.0703,
                   "z_percent": 90.07, "size_bytes_original": 46_830_571, "size_bytes_compressed": 4_702_133},
        "layers": layers,
        "skipped": [{"name": "conv1", "reason": "too small to gain from compression (9408 params)"}],
        "finetune": None,
        "evaluation": {"top1": 68.5, "top5": 88.1, "latency_ms": {"cpu": 12.25}},
        "timings": {"load": 0.52, "convert": 12.3, "save": 0.4, "total": 13.22},
    }
    if finetune:
        report["finetune"] = {
            "epochs": 3, "steps": 1200, "seconds": 340.5, "device": "cuda:0",
            "original_val_accuracy": 69.76, "val_accuracy_before": 55.1, "val_accuracy_after": 68.2,
            "curve": [{"epoch": 1, "train_loss": 1.9, "val_accuracy": 64.0},
                      {"epoch": 2, "train_loss": 1.4, "val_accuracy": 67.3},
                      {"epoch": 3, "train_loss": 1.2, "val_accuracy": 68.2}],
        }
    return report


def _spectra() -> dict:
    """Singular spectra for 5 layers (only the 4 largest get plotted), with a zero to test the log axis."""
    before = [10.0 / (i + 1) for i in range(64)]
    return {name: (before, before[:8] + [0.0]) for name in
            ["layer1.0.conv1", "layer2.0.conv_2", "layer3.0.conv1", "layer4.0.conv1", "fc"]}


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 5_000


def test_write_report_full(tmp_path):
    report = _report()
    original = copy.deepcopy(report)
    out = tmp_path / "nested" / "report"
    paths = write_report(report, out, spectra=_spectra())

    assert report == original  # input not mutated
    assert set(paths) == {"json", "md", "params", "rel_error", "spectra", "finetune"}
    assert all(p.parent == out and p.is_file() for p in paths.values())
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths.values())  # no temp files left

    assert json.loads(paths["json"].read_text()) == report
    text = paths["json"].read_text()
    assert text.index('"format_version"') < text.index('"tool_version"') < text.index('"method"')
    assert text.startswith('{\n  "format_version": 1')

    md = paths["md"].read_text()
    for layer in report["layers"]:
        assert layer["name"] in md
    assert "10.07x" in md
    assert "too small to gain from compression" in md
    assert "## Fine-tuning" in md and "69.76 %" in md and "68.20 %" in md
    for key in ("params", "rel_error", "spectra", "finetune"):
        assert f"]({paths[key].name})" in md
        _assert_png(paths[key])


def test_no_spectra_no_finetune(tmp_path):
    report = _report(finetune=False)
    paths = write_report(report, tmp_path, spectra=None)
    assert set(paths) == {"json", "md", "params", "rel_error"}
    assert not (tmp_path / "spectra.png").exists()
    assert not (tmp_path / "finetune.png").exists()
    md = paths["md"].read_text()
    assert "Fine-tuning" not in md and "finetune.png" not in md and "spectra.png" not in md
    assert write_report(report, tmp_path / "b", spectra={}).keys() == paths.keys()


def test_rewrite_drops_stale_plots(tmp_path):
    write_report(_report(), tmp_path, spectra=_spectra())
    assert (tmp_path / "finetune.png").exists()
    write_report(_report(finetune=False), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["params.png", "rel_error.png", "report.json", "report.md"]


def test_finetune_curve_without_accuracy(tmp_path):
    report = _report()
    ft = report["finetune"]
    ft.update(original_val_accuracy=None, val_accuracy_before=None, val_accuracy_after=None,
              curve=[{"epoch": 0.5, "train_loss": 0.8, "val_accuracy": None}])
    paths = write_report(report, tmp_path)
    _assert_png(paths["finetune"])
    assert "n/a" in paths["md"].read_text()


def test_report_dir_is_a_file(tmp_path):
    blocker = tmp_path / "report"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as info:
        write_report(_report(), blocker, spectra=_spectra())
    assert "\n" not in str(info.value)
    assert blocker.read_text() == "not a folder"
    assert os.listdir(tmp_path) == ["report"]

    with pytest.raises(UserError):
        write_report(_report(), blocker / "sub")
    assert os.listdir(tmp_path) == ["report"]


def test_failure_midway_rolls_back(tmp_path, monkeypatch):
    from sttp_compress.evaluate import report as report_mod
    real = report_mod.atomic_write

    def flaky(path, write, force=False):
        if str(path).endswith("report.md"):
            raise UserError(f"cannot write {path}: No space left on device")
        real(path, write, force=force)

    monkeypatch.setattr(report_mod, "atomic_write", flaky)
    out = tmp_path / "a" / "b"
    with pytest.raises(UserError):
        write_report(_report(), out)
    assert os.listdir(tmp_path) == []  # created files and folders removed again


def test_render_markdown_is_pure():
    report = _report()
    original = copy.deepcopy(report)
    images = ["params.png", "rel_error.png"]
    md = render_markdown(report, images)
    assert md == render_markdown(report, images)
    assert report == original and images == ["params.png", "rel_error.png"]
    assert "![params](params.png)" in md and "![rel_error](rel_error.png)" in md
    assert "2·2·2·2·2·2·2·2·2·3·3" in md
    assert "512×512×3×3" in md
    assert "46.83 MB → 4.70 MB" in md
    assert "11,689,512 → 1,160,800" in md
    assert "ratio 10x" in md and "90.07 %" in md
    assert "0.213" in md and "0.301" in md
    assert "`layer2.0.conv_2`" in md
    assert "## Plots" not in render_markdown(report, [])


def test_render_markdown_minimal_report():
    md = render_markdown({"method": "svdp", "target": {"rank": 32}, "layers": [], "skipped": []}, [])
    assert "rank 32" in md and "Skipped" not in md


def test_summary_table_caps_rows():
    report = _report()
    base = report["layers"][0]
    report["layers"] = [dict(base, name=f"blocks.{i}.conv", params_original=1000 + i) for i in range(45)]
    table = summary_table(report)
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "… 15 more layers" in text
    assert "Total" in text and "10.07x" in text
    assert "blocks.44.conv" in text and "blocks.0.conv" not in text  # largest layers are shown
    assert table.row_count == 30 + 1 + 1


def test_summary_table_small():
    table = summary_table(_report())
    assert table.row_count == 5 + 1
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(table)
    assert "more layers" not in console.export_text()


@pytest.mark.parametrize("n, expected", [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1500, "1.5 kB"), (999_960, "1.0 MB"),
    (44_700_000, "44.7 MB"), (46_830_571, "46.8 MB"), (1_200_000_000, "1.2 GB"), (-2_500, "-2.5 kB"),
])
def test_human_bytes(n, expected):
    assert human_bytes(n) == expected


def test_finetune_section_counts_images_or_texts():
    report = _report()
    report["finetune"].update(steps=40, epochs=2, images_per_s=1234.6)
    md = render_markdown(report, [])
    assert "| Epochs | 2 (40 steps) |" in md and "| Throughput | 1,235 images/s |" in md
    block = {k: v for k, v in report["finetune"].items() if k != "images_per_s"}
    report["finetune"] = {**block, "texts_per_s": 812.2, "epochs": 0.37, "steps": 1200, "val_cosine_before": 0.9,
                          "val_cosine_after": 0.95}
    md = render_markdown(report, [])
    assert "| Steps | 1,200 steps (0.37 passes over the texts) |" in md and "| Throughput | 812 texts/s |" in md
    assert "Epochs" not in md.split("## Fine-tuning")[1].split("##")[0]


def test_spectra_keep_the_values_above_rounding_and_name_the_layers_rank():
    from sttp_compress.evaluate.report import meaningful_singular_values

    assert meaningful_singular_values([10.0, 1.0, 1e-3, 1e-7, 0.0, float("nan")]) == [10.0, 1.0, 1e-3]
    assert meaningful_singular_values([0.0, -1.0]) == []
