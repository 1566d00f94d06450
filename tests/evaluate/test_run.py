"""Tests for sttp_compress.evaluate.run: run_eval numbers, reference comparison, gates, summary table, export."""

from __future__ import annotations

import io
import json
from pathlib import Path
import math

import pytest
import torch
from PIL import Image
from rich.console import Console
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from sttp_compress.io.checkpoint import load_compressed, read_compressed, save_compressed
from sttp_compress.compress.convert import compress, compressed_layers, count_parameters
from sttp_compress.data.images import ImageDataConfig, image_transforms, resolve_image_config
from sttp_compress.errors import UserError
from sttp_compress.evaluate.run import RESULT_KEYS, EvalOptions, check_gates, export_dense, run_eval, summary_table
from sttp_compress.example import DigitsCNN, digits_data
from sttp_compress.train.loop import evaluate
from sttp_compress.io.sources import resolve_arch

DIGITS = "sttp_compress.example:DigitsCNN"
NET_PY = """
import torch.nn as nn

def make(num_classes=3):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, num_classes))

def embed():
    return nn.Sequential(nn.Embedding(100, 32), nn.Flatten(), nn.Linear(8 * 32, 64), nn.ReLU(), nn.Linear(64, 5))
"""


pytestmark = pytest.mark.usefixtures("fast_eval_timing")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A compressed DigitsCNN (with and without meta), digits tensors, a tiny image net and image folder."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = DigitsCNN()
    n0 = count_parameters(model)
    assert compress(model, rank=4)
    ckpt = root / "digits.sttp.safetensors"
    meta = {"params_original": n0, "size_bytes_original": 2_500_000, "input_shape": [1, 8, 8]}
    save_compressed(model, ckpt, DIGITS, meta=meta)
    bare = root / "bare.sttp.safetensors"
    save_compressed(model, bare, DIGITS)

    _, val = digits_data()
    tensors = root / "digits.pt"
    torch.save({"inputs": val.tensors[0][:150], "targets": val.tensors[1][:150]}, tensors)
    unlabelled = root / "inputs.pt"
    torch.save({"inputs": val.tensors[0][:40]}, unlabelled)

    (root / "net.py").write_text(NET_PY)
    net_spec = f"{root / 'net.py'}:make"
    torch.manual_seed(1)
    net = resolve_arch(net_spec)
    assert compress(net, rank=4)
    net_ckpt = root / "net.sttp.safetensors"
    save_compressed(net, net_ckpt, net_spec, meta={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    images = root / "images"
    gen = torch.Generator().manual_seed(0)
    for c in ("cat", "dog", "owl"):
        (images / c).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (12, 12, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(images / c / f"{i}.png")
    return {"root": root, "ckpt": str(ckpt), "bare": str(bare), "n0": n0, "tensors": f"tensors:{tensors}",
            "unlabelled": f"tensors:{unlabelled}", "val": val, "net_spec": net_spec, "net": str(net_ckpt),
            "images": str(images)}


def _opts(**kw) -> EvalOptions:
    return EvalOptions(latency=kw.pop("latency", False), **kw)


# --------------------------------------------------------------------------- numbers


def test_numbers_on_tensor_data(files):
    result = run_eval(files["ckpt"], _opts(data=files["tensors"], latency=True))
    assert tuple(result) == RESULT_KEYS  # every documented key, in the documented order
    model, _ = load_compressed(files["ckpt"])
    assert result["params"] == count_parameters(model)
    assert result["size_bytes"] == (files["root"] / "digits.sttp.safetensors").stat().st_size
    assert result["params_original"] == files["n0"]
    assert result["ratio"] == pytest.approx(files["n0"] / result["params"])
    assert result["size_bytes_original"] == 2_500_000
    assert result["size_ratio"] == pytest.approx(2_500_000 / result["size_bytes"])
    assert result["arch"] == DIGITS and result["dtype"] == "float32"
    layers = compressed_layers(model)
    assert [entry["name"] for entry in result["layers"]] == list(layers)
    for entry in result["layers"]:
        p = layers[entry["name"]]
        assert entry["rank"] == p.rank == 4
        assert entry["params_compressed"] == p.dof()
        assert entry["params_original"] == math.prod(p.weight_shape)
        assert entry["modes"] == list(p.tt.modes) and entry["tt_ranks"] == list(p.tt.tt_ranks)
    # accuracy equals a direct evaluate() on the whole file (not a 90/10 split)
    val = files["val"]
    direct = evaluate(model, DataLoader(torch.utils.data.TensorDataset(val.tensors[0][:150], val.tensors[1][:150]),
                                        batch_size=64), "cpu")
    assert result["samples"] == 150
    assert 0 <= result["accuracy"] <= 100
    assert result["accuracy"] == pytest.approx(100 * direct["accuracy"])
    assert result["top5"] == pytest.approx(100 * direct["top5"])
    assert result["loss"] == pytest.approx(direct["loss"])
    assert result["accuracy"] <= result["top5"]
    # latency from the first data batch
    assert result["input_shape"] == [1, 8, 8]
    assert result["latency_ms"] > 0 and result["latency_runs"] >= 1
    assert result["throughput"] == pytest.approx(64 / (result["latency_ms"] / 1000))
    assert result["device"] == "cpu" and result["batch_size"] == 64
    assert result["reference"] is None and result["agreement"] is None and result["rel_output_error"] is None
    json.dumps(result, allow_nan=False)  # JSON-ready


def test_a_logged_eval_prints_a_line_per_tenth_of_its_batches(files, capsys):
    """stderr in a log (no terminal): the batches a line each tenth, the timing named as it starts; none when off."""
    run_eval(files["ckpt"], _opts(data=files["tensors"], batch_size=8, max_batches=10, latency=True), progress=True)
    lines = capsys.readouterr().err.splitlines()
    done = [line.split(" (")[0] for line in lines if line.startswith("evaluating: ")]
    assert done == [f"evaluating: {k}/10 batches" for k in range(1, 11)]
    assert "timing ..." in lines
    run_eval(files["ckpt"], _opts(data=files["tensors"], batch_size=8, max_batches=10, latency=True), progress=False)
    assert capsys.readouterr().err == ""


def test_max_batches_and_unlabelled_data(files):
    result = run_eval(files["ckpt"], _opts(data=files["tensors"], batch_size=32, max_batches=2))
    assert result["samples"] == 64 and result["accuracy"] is not None
    result = run_eval(files["ckpt"], _opts(data=files["unlabelled"], latency=True))
    assert result["samples"] == 40
    assert result["accuracy"] is None and result["top5"] is None and result["loss"] is None
    assert result["latency_ms"] > 0  # a short first batch is tiled to the batch size
    assert any("accuracy not measured" in n for n in result["notes"])


def test_no_data_no_shape_skips_latency(files):
    result = run_eval(files["bare"], _opts(latency=True))
    assert result["latency_ms"] is None and result["throughput"] is None and result["input_shape"] is None
    assert result["params_original"] is None and result["ratio"] is None and result["size_bytes_original"] is None
    assert result["accuracy"] is None and result["samples"] is None
    assert any("latency skipped" in n for n in result["notes"])
    # the input shape from the options, else from the checkpoint's meta
    assert run_eval(files["bare"], _opts(latency=True, input_shape=(1, 8, 8)))["latency_ms"] > 0
    result = run_eval(files["ckpt"], _opts(latency=True))
    assert result["input_shape"] == [1, 8, 8] and result["latency_ms"] > 0


def test_image_folder(files):
    result = run_eval(files["net"], _opts(data=files["images"], latency=True, batch_size=4, workers=0, arch=files["net_spec"]))
    assert result["samples"] == 9 and result["input_shape"] == [3, 12, 12]
    model, _ = load_compressed(files["net"], arch=files["net_spec"])
    cfg = resolve_image_config(ImageDataConfig(mean=(0.5,) * 3, std=(0.25,) * 3), files["images"])
    ds = ImageFolder(files["images"], transform=image_transforms(cfg)[1])
    direct = evaluate(model, DataLoader(ds, batch_size=4), "cpu")
    assert result["accuracy"] == pytest.approx(100 * direct["accuracy"])
    assert result["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    # --image-size overrides the image's own size
    assert run_eval(files["net"], _opts(data=files["images"], image_size=8, workers=0, arch=files["net_spec"]))["input_shape"] == [3, 8, 8]


def test_image_folder_train_val_layout(files, tmp_path):
    import shutil
    shutil.copytree(files["images"], tmp_path / "train")
    shutil.copytree(files["images"], tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "owl")
    (tmp_path / "val" / "owl").mkdir()
    result = run_eval(files["net"], _opts(data=str(tmp_path), workers=0, arch=files["net_spec"]))
    assert result["samples"] == 6


# --------------------------------------------------------------------------- reference and export


def test_export_dense_round_trip(files, tmp_path):
    out = tmp_path / "dense.pt"
    size = export_dense(files["ckpt"], str(out))
    assert size == out.stat().st_size
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    fresh = DigitsCNN()
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    compressed, _ = load_compressed(files["ckpt"])
    x = files["val"].tensors[0][:32]
    with torch.no_grad():
        y, y_ref = fresh(x), compressed(x)
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-5
    with pytest.raises(UserError, match="exists"):
        export_dense(files["ckpt"], str(out))
    assert export_dense(files["ckpt"], str(out), force=True) == size


def test_reference_agreement(files, tmp_path):
    dense = tmp_path / "dense.pt"
    export_dense(files["ckpt"], str(dense))
    result = run_eval(files["ckpt"], _opts(data=files["tensors"], reference=str(dense)))
    assert result["agreement"] == pytest.approx(100.0)
    assert result["rel_output_error"] < 1e-5
    assert result["reference_inputs"] == "data"
    assert result["reference_accuracy"] == pytest.approx(result["accuracy"])
    # without data: random inputs of the meta's input shape; params_original from the reference when meta lacks it
    result = run_eval(files["bare"], _opts(reference=str(dense), input_shape=(1, 8, 8)))
    assert result["reference_inputs"] == "random" and result["agreement"] == pytest.approx(100.0)
    assert result["rel_output_error"] < 1e-5 and result["reference_accuracy"] is None
    assert result["params_original"] == files["n0"] and result["size_bytes_original"] == dense.stat().st_size
    # no inputs at all: the comparison is skipped with a note
    result = run_eval(files["bare"], _opts(reference=str(dense)))
    assert result["agreement"] is None and result["reference_inputs"] is None
    assert any("reference comparison skipped" in n for n in result["notes"])


def test_reference_differs(files, tmp_path):
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    torch.save(DigitsCNN().state_dict(), other)
    result = run_eval(files["ckpt"], _opts(data=files["tensors"], reference=str(other)))
    assert 0 <= result["agreement"] < 100 and result["rel_output_error"] > 0.01


def test_embedding_first_model_gets_token_ids(files, tmp_path):
    spec = f"{files['root'] / 'net.py'}:embed"
    model = resolve_arch(spec)
    path = tmp_path / "emb.sttp.safetensors"
    save_compressed(model, path, spec, meta={"input_shape": [8]})
    result = run_eval(str(path), _opts(arch=spec, latency=True))
    assert result["latency_ms"] > 0 and result["input_shape"] == [8]


# --------------------------------------------------------------------------- gates


@pytest.fixture(scope="module")
def result(files):
    return run_eval(files["ckpt"], _opts(data=files["tensors"]))


def test_gates_pass(result):
    opts = _opts(max_size="10MB", max_params=10**6, min_ratio=2, min_accuracy=0)
    assert check_gates(result, opts) == []
    assert check_gates(result, _opts()) == []


def test_each_gate_fails_alone(result):
    size, params = result["size_bytes"], result["params"]
    [line] = check_gates(result, _opts(max_size="1kB"))
    assert line.startswith("size ") and "max_size 1kB (1,000 bytes)" in line and f"{size:,} bytes" in line
    [line] = check_gates(result, _opts(max_params=params - 1))
    assert line == f"params {params:,} > max_params {params - 1:,}"
    assert check_gates(result, _opts(max_params=params)) == []
    [line] = check_gates(result, _opts(min_ratio=1e6))
    assert "min_ratio 1e+06x" in line and f"ratio {result['ratio']:.2f}x" in line
    [line] = check_gates(result, _opts(min_accuracy=100))
    assert f"accuracy {result['accuracy']:.2f} %" in line and "min_accuracy 100 %" in line
    assert len(check_gates(result, _opts(max_size="1kB", max_params=1, min_ratio=1e6, min_accuracy=100))) == 4


def test_gates_with_unknown_values(files):
    result = run_eval(files["bare"], _opts())
    [line] = check_gates(result, _opts(min_ratio=2))
    assert "ratio unknown" in line and "min_ratio 2" in line
    [line] = check_gates(result, _opts(min_accuracy=50))
    assert "accuracy unknown" in line and "labelled data" in line
    [line] = check_gates(result, _opts(min_cosine=0.9))  # image or tensor data: no embeddings to compare
    assert "cosine unknown" in line and "data text:FILE (or pairs:FILE) and reference hf:DIR" in line


def test_min_cosine_gate(result):
    text = {**result, "cosine": 0.93125}
    assert check_gates(text, _opts(min_cosine=0.93)) == [] and check_gates(text, _opts(min_cosine=-1)) == []
    [line] = check_gates(text, _opts(min_cosine=0.95))
    assert line == "mean cosine similarity to the reference 0.9313 < min_cosine 0.95"


def test_baseline_drop_gate(result, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**result, "accuracy": result["accuracy"] + 3.0}))
    assert check_gates(result, _opts(baseline=str(base), max_drop=3.5)) == []
    [line] = check_gates(result, _opts(baseline=str(base), max_drop=2))
    assert "accuracy drop 3.00 points" in line and "max_drop 2" in line and str(base) in line
    # an improvement never fails
    base.write_text(json.dumps({"accuracy": result["accuracy"] - 10}))
    assert check_gates(result, _opts(baseline=str(base), max_drop=0)) == []
    # no accuracy measured now
    [line] = check_gates({**result, "accuracy": None}, _opts(baseline=str(base), max_drop=1))
    assert "accuracy unknown" in line


@pytest.mark.parametrize("kw, match", [
    ({"max_size": "five"}, "invalid size"),
    ({"max_params": 0}, "max_params"),
    ({"min_ratio": -1.0}, "min_ratio"),
    ({"min_accuracy": 120.0}, "min_accuracy"),
    ({"min_cosine": 1.5}, "min_cosine is a cosine similarity between -1 and 1"),
    ({"min_cosine": float("nan")}, "min_cosine"),
    ({"max_drop": 1.0}, "max_drop needs baseline"),
    ({"baseline": "x.json"}, "baseline needs max_drop"),
    ({"baseline": "missing.json", "max_drop": 1.0}, "baseline file not found"),
])
def test_bad_gate_values(result, kw, match):
    with pytest.raises(UserError, match=match):
        check_gates(result, _opts(**kw))


def test_bad_baseline_files(result, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read baseline"):
        check_gates(result, _opts(baseline=str(bad), max_drop=1))
    bad.write_text(json.dumps({**result, "accuracy": None}))
    with pytest.raises(UserError, match="no accuracy"):
        check_gates(result, _opts(baseline=str(bad), max_drop=1))
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not an sttp-eval"):
        check_gates(result, _opts(baseline=str(bad), max_drop=1))


# --------------------------------------------------------------------------- errors


def _one_line_error(fn, *args, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_bad_inputs(files, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    bad_tensors = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad_tensors)
    ckpt = files["ckpt"]
    cases = [
        (str(tmp_path / "missing.pt"), _opts(), "no such file"),
        (str(tmp_path), _opts(), "is a directory"),
        (str(corrupt), _opts(), "not a readable"),
        (ckpt, _opts(arch="sttp_compress.example:Nope"), "has no attribute"),
        (ckpt, _opts(arch=f"{files['root'] / 'net.py'}:make"), "does not match"),
        (ckpt, _opts(data=str(tmp_path / "nowhere")), "data folder not found"),
        (ckpt, _opts(data=str(empty)), "no images found"),
        (ckpt, _opts(data=f"tensors:{tmp_path / 'none.pt'}"), "tensor data file not found"),
        (ckpt, _opts(data=f"tensors:{bad_tensors}"), "'inputs' tensor"),
        (ckpt, _opts(data=files["tensors"], image_size=8), "only apply to an image folder"),
        (ckpt, _opts(max_size="lots"), "invalid size"),
        (ckpt, _opts(baseline="b.json"), "baseline needs max_drop"),
        (ckpt, _opts(batch_size=0), "batch_size"),
        (ckpt, _opts(input_shape=(0, 8)), "input_shape"),
        (ckpt, _opts(input_shape=(3, 8, 8), latency=True), "check that the data or input_shape"),
        (ckpt, _opts(reference=str(tmp_path / "ref.pt")), "no such file"),
        (ckpt, _opts(device="tpu"), "device"),
        (files["net"], _opts(data=files["tensors"], arch=files["net_spec"]), "check that the data"),
    ]
    for path, opts, match in cases:
        _one_line_error(run_eval, path, opts, match=match)
    _one_line_error(export_dense, str(tmp_path / "missing.pt"), str(tmp_path / "o.pt"), match="no such file")
    _one_line_error(export_dense, ckpt, str(tmp_path / "no" / "o.pt"), match="does not exist")


def test_wrong_labels(files, tmp_path):
    val = files["val"]
    bad = tmp_path / "labels.pt"
    torch.save({"inputs": val.tensors[0][:10], "targets": torch.full((10,), 12)}, bad)
    _one_line_error(run_eval, files["ckpt"], _opts(data=f"tensors:{bad}"), match="class labels 12..12")


# --------------------------------------------------------------------------- summary table


def test_summary_table(files, tmp_path):
    dense = tmp_path / "dense.pt"
    export_dense(files["ckpt"], str(dense))
    result = run_eval(files["ckpt"], _opts(data=files["tensors"], reference=str(dense), latency=True))
    console = Console(file=io.StringIO(), width=140, record=True)
    console.print(summary_table(result))
    text = console.export_text()
    for needle in ("Parameters", f"{result['ratio']:.2f}x", "Size", "2.50 MB", f"{result['accuracy']:.2f} %",
                   "100.00 %", "Latency", "samples/s", "features.2", "rank 4", "classifier.1"):
        assert needle in text, needle
    # a bare result renders too, and many layers collapse into a '… more' row
    many = {**run_eval(files["bare"], _opts()),
            "layers": [dict(name=f"l{i}", rank=2, params_original=100 + i, params_compressed=10) for i in range(30)]}
    console = Console(file=io.StringIO(), width=140, record=True)
    console.print(summary_table(many, max_layers=5))
    text = console.export_text()
    assert "25 more layers" in text and "not measured" in text and "original unknown" in text


# ---------------------------------------------------------------------------------------------
# the sttp-eval command itself: exit codes and one-line errors


def _eval_cli(args, capsys):
    from sttp_compress.cli import _main, eval_app

    code = _main(eval_app, "sttp-eval", [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("extra, fragment", [
    (["--data", "/nonexistent-folder"], "not found"),
    (["--max-size", "5XB"], "invalid size"),
    (["--baseline", "x.json"], "--max-drop"),
    (["--arch", "torchvision:nope"], "nope"),
    (["--input-shape", "a,b"], "--input-shape"),
])
def test_cli_bad_input_is_one_line_and_exit_2(files, capsys, extra, fragment):
    code, _, err = _eval_cli([files["ckpt"], "--quiet", *extra], capsys)
    assert code == 2 and len(err) == 1 and fragment in err[0] and "Traceback" not in err[0]


def test_cli_missing_and_foreign_files(files, capsys, tmp_path):
    code, _, err = _eval_cli([tmp_path / "nope.sttp.safetensors"], capsys)
    assert code == 2 and len(err) == 1 and "no such file" in err[0]
    plain = tmp_path / "plain.pt"
    torch.save(DigitsCNN().state_dict(), plain)
    code, _, err = _eval_cli([plain], capsys)
    assert code == 2 and len(err) == 1 and "not an sttp-compress checkpoint" in err[0]


def test_cli_gates_exit_1_with_one_line_each_and_json(files, capsys, tmp_path):
    out_json = tmp_path / "r.json"
    code, _, err = _eval_cli([files["ckpt"], "--quiet", "--data", files["tensors"], "--max-size", "1kB",
                              "--min-accuracy", "99.9", "--json", out_json], capsys)
    assert code == 1 and len(err) == 2 and all(line.startswith("gate failed:") for line in err)
    result = json.loads(out_json.read_text())
    assert result["size_bytes"] == Path(files["ckpt"]).stat().st_size
    code, _, err = _eval_cli([files["ckpt"], "--quiet", "--max-size", "100MB", "--min-ratio", "1.5"], capsys)
    assert code == 0 and err == []
    code, _, err = _eval_cli([files["ckpt"], "--max-size", "100MB", "--min-ratio", "1.5"], capsys)
    assert code == 0 and err[-1] == "gates passed: --max-size, --min-ratio"
    assert all(line == "timing ..." or line.startswith("evaluating: ") for line in err[:-1])  # progress in a log


def test_latency_keeps_the_digits_that_mean_something():
    from sttp_compress.evaluate.run import milliseconds

    assert [milliseconds(x) for x in (0.41234, 3.9123, 27.43, 1204.4)] == ["0.412 ms", "3.91 ms", "27.4 ms",
                                                                          "1,204 ms"]
