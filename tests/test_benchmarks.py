"""Smoke tests of the GPU benchmarks' scripts on this machine's CPU, on a tiny CIFAR-like folder: the teacher
training script and the frontier bench run end to end and write what they promise (results: not written)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sttp_compress as sc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> Path:
    """train/ (10 classes x 10, as CIFAR-10's class count) and test/ (10 x 2) of 8x8 noise images, tinted
    by class (8x8, not CIFAR's 32x32: MobileNetV2's stride-1 stages make 32x32 steps seconds on 2 cores)."""
    root = tmp_path_factory.mktemp("cifar")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 10), ("test", 2)):
        for c in range(10):
            name = f"class{c}"
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                x = (torch.rand(8, 8, 3, generator=g) * 128).to(torch.uint8) + 12 * c
                Image.fromarray(x.numpy()).save(root / split / name / f"{i}.png")
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_teacher_training_and_the_frontier_bench_run_on_a_tiny_set(cifar_like: Path, tmp_path: Path) -> None:
    teachers = tmp_path / "teachers"
    table = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "teachers.json"
    before = table.read_bytes() if table.exists() else None
    _run("benchmarks/train_teacher.py", "--arch", "mobilenetv2", "--data", str(cifar_like), "--out", str(teachers),
         "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--no-save")
    assert (table.read_bytes() if table.exists() else None) == before  # the smoke run is not a result
    info = json.loads((teachers / "mobilenetv2.json").read_text())
    assert info["epochs"] == 1 and info["train_images"] == 90 and info["held_out_images"] == 10 and 0 <= info["test_acc"] <= 100
    state = torch.load(teachers / "mobilenetv2.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())

    dry = _run("benchmarks/bench_frontier.py", "--teachers", str(teachers), "--data", str(cifar_like),
               "--models", "mobilenetv2", "--dtypes", "float32", "int8", "int8+fold", "int8+fold+qat",
               "--dry-run").stdout.splitlines()
    assert len(dry) == 3 * 3 + 3 * 3  # sttp, svdp, svd at 10, 20, 50; sttp in int8 at each ratio, folded, with QAT
    assert all(line.startswith("sttp-compress ") and "--epochs 10" in line for line in dry)
    assert sum("--method svdp --free-cores" in line for line in dry) == 3
    assert sum("--dtype int8" in line and "--method" not in line for line in dry) == 9
    assert sum(line.endswith("--dtype int8 --fold-batchnorm") and "int8+fold-s0" in line for line in dry) == 3
    assert sum(line.endswith("--dtype int8 --fold-batchnorm --qat-steps 300") for line in dry) == 3
    assert _run("benchmarks/bench_frontier.py", "--teachers", str(teachers), "--data", str(cifar_like),
                "--models", "mobilenetv2", "--methods", "--anchors", "4", "--dry-run").stdout == ""  # anchors only

    results = ROOT / "benchmarks" / "results" / "frontier.json"
    stored = results.read_text() if results.exists() else None
    out = _run("benchmarks/bench_frontier.py", "--teachers", str(teachers), "--data", str(cifar_like),
               "--models", "mobilenetv2", "--methods", "sttp", "--ratios", "2", "--epochs", "1", "--anchors", "4", "--no-save",
               "--out", str(tmp_path / "runs")).stdout
    rows = json.loads(out[out.index("["):])
    assert len(rows) == 2
    r, anchor = rows
    assert anchor["method"] == "weight-only" and anchor["dtype"] == "int4" and 5 < anchor["size_ratio"] < 8  # 8x less the float16 scales and rest
    assert anchor["acc_before"] is not None and anchor["acc_after"] is not None
    assert r["method"] == "sttp" and r["target_ratio"] == 2 and r["achieved_ratio"] >= 1.9
    assert r["size_bytes"] == (tmp_path / "runs" / "mobilenetv2-sttp-2-float32-s0.sttp.safetensors").stat().st_size
    assert r["teacher_acc"] == info["test_acc"] and r["dense_finetune_seconds"] > 0
    assert r["validation"]["source"].startswith("held out of") and r["validation"]["images"] == 10
    assert r["acc_after"] is not None and r["command"].startswith("sttp-compress ")
    assert (results.read_text() if results.exists() else None) == stored  # --no-save wrote nothing


def test_weight_only_anchor_bytes_count_packed_values_float16_scales_and_a_float16_rest():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from weight_quant import packed_bytes

    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))  # BatchNorm: 4 floats x 4, an int64
    # int4: 32 weights in 16 bytes, 4 float16 scales, then the bias, BatchNorm's 16 floats in float16, 8 bytes
    assert packed_bytes(net, 4) == 16 + 2 * 4 + 2 * 4 + 2 * 16 + 8
    assert packed_bytes(net, 3) == 12 + 8 + 8 + 32 + 8  # 96 bits: 12 bytes
    sc.fold_batchnorm_(net)  # the affine's 2 vectors are stored; its constant zeros and ones are not
    assert packed_bytes(net, 4) == 16 + 2 * 4 + 2 * 4 + 2 * 8


def test_trials_table_reads_each_trials_flags_and_report_and_names_a_cut_off_one(tmp_path: Path) -> None:
    """The MobileNetV2 trials table takes each trial's flags from frontier_trials.sh, its validation and test
    accuracies from the CLI's --json report, and for a trial without a report its stderr's last line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trials_table", ROOT / "benchmarks" / "experiments" / "trials_table.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    flags = tt.flags_of(ROOT / "benchmarks" / "device" / "frontier_trials.sh")
    assert flags["r10sens"] == "--ratio 10 --epochs 10 --allocation sensitivity"
    assert flags["r10dw"].endswith("(depthwise kept dense)")
    report = {"totals": {"ratio": 10.0001, "size_ratio": 7.0898},
              "finetune": {"original_val_accuracy": 88.54, "val_accuracy_before": 10.0, "val_accuracy_after": 86.64,
                           "original_test_accuracy": 88.26, "test_accuracy_after": 86.85, "seconds": 200.2}}
    (tmp_path / "mb_r10.json").write_text(json.dumps(report))
    (tmp_path / "mb_r10.err").write_text("")
    (tmp_path / "mb_r10bn.json").write_text("")
    (tmp_path / "mb_r10bn.err").write_text("converting\nsttp-compress: interrupted; nothing written\n")
    done = tt.row(tmp_path, "r10", flags["r10"], "GPU", "abc")
    assert (done["val_after"], done["test_after"], done["ratio"], done["size_ratio"], done["status"]) == \
        (86.64, 86.85, 10.0, 7.09, "ok")
    cut = tt.row(tmp_path, "r10bn", flags["r10bn"], "GPU", "abc")
    assert cut["status"] == "sttp-compress: interrupted; nothing written" and "val_after" not in cut


def test_a_rewritten_table_keeps_the_stored_notes_and_names_its_rows_commits(tmp_path: Path, monkeypatch) -> None:
    """bench_frontier and bench_deploy rewrite their whole Markdown table: the notes about earlier rows stay."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = [{"commit": "aaa"}, {"commit": "bbb"}, {"commit": "aaa"}, {}]
    assert common.table_header("x", "Title", rows) == f"# Title ({common.today()}; rows from commits aaa / bbb)\n\n"
    (tmp_path / "x.md").write_text("# Title (old)\n\n- old note\n- kept note\n\nA paragraph.\n\n| a |\n|---|\n| 1 |\n\n"
                                   "- not a note: after the table\n")
    header = common.table_header("x", "Title", rows, notes=["new note", "old note"])
    assert header == (f"# Title ({common.today()}; rows from commits aaa / bbb)\n\n- new note\n- old note\n\n"
                      "- kept note\n\nA paragraph.\n\n")
