"""sttp_compress.io.export and `sttp-eval --export`: files that run without this package, as small as the cores."""

from __future__ import annotations

import copy
import io
import json
import math
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sttp_compress as sc
from sttp_compress.cli import _main, eval_app
from sttp_compress.errors import UserError
from sttp_compress.example import DigitsCNN
from sttp_compress.io import export as export_module
from sttp_compress.io.export import exportable

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

DIGITS = "sttp_compress.example:DigitsCNN"
# runs a file with sttp_compress impossible to import: what a serving machine without the package sees
RUN_WITHOUT_PACKAGE = """
import sys, numpy as np
sys.modules["sttp_compress"] = None
kind, path, *pairs = sys.argv[1:]
if kind == "onnx":
    import onnxruntime
    s = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    run = lambda x: s.run(None, {s.get_inputs()[0].name: x})[0]
else:
    import torch
    program = torch.export.load(path).module()
    if kind == "pt2-folded":  # the docs' recipe: rebuild the weights once instead of on every call
        import warnings
        from torch.fx.experimental.const_fold import split_const_subgraphs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = split_const_subgraphs(program)
        nodes = sum(n.op == "call_function" for n in program.graph.nodes)
        folded = sum(n.op == "call_function" for n in program.const_subgraph_module.graph.nodes)
        assert folded > nodes, (folded, nodes)  # most of the graph was the rebuild, now run once

    def run(x):
        with torch.no_grad():
            y = program(torch.from_numpy(x))
        return (y[0] if isinstance(y, (tuple, list)) else y).numpy()
for inputs, out in zip(pairs[::2], pairs[1::2]):  # every batch in one process: one import of torch
    np.save(out, run(np.load(inputs)))
"""


class Net(nn.Module):
    """Convolutions (plain, grouped, transposed), a wide Linear whose factors form has fewer FLOPs, an
    embedding and attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(32, 32, 3, padding=1)
        self.wide = nn.Linear(32 * 8 * 8, 256)
        self.emb = nn.Embedding(64, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(256 + 16, 10)

    def forward(self, x):
        h = self.wide(self.up(self.grouped(torch.relu(self.bn(self.conv(x))))).flatten(1))
        tokens = self.emb((x[:, 0, 0, :4].abs() * 10).long().clamp(max=63))
        a = self.attn(tokens, tokens, tokens, need_weights=False)[0].mean(1)
        return self.head(torch.cat([h, a], 1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    sc.compress_(model, sc.CompressConfig(rank=8), filter_fn=lambda m, name: name != "head")
    return model.eval()


def _run_without_package(kind: str, path: Path, x: torch.Tensor | list[torch.Tensor],
                         tmp_path: Path) -> torch.Tensor | list[torch.Tensor]:
    """The file's outputs for x (or each tensor of a list of them) from one process that cannot import us."""
    xs = x if isinstance(x, list) else [x]
    pairs = []
    for i, xi in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", xi.numpy())
        pairs += [str(tmp_path / f"x{i}.npy"), str(tmp_path / f"y{i}.npy")]
    script = tmp_path / "serve.py"
    script.write_text(RUN_WITHOUT_PACKAGE)
    subprocess.run([sys.executable, str(script), kind, str(path), *pairs],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    ys = [torch.from_numpy(np.load(tmp_path / f"y{i}.npy")) for i in range(len(xs))]
    return ys if isinstance(x, list) else ys[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_exportable_copy_keeps_cores_not_dense_weights(net):
    plain, forms = exportable(net)
    assert forms["wide"] == "factors" and forms["conv"] == forms["grouped"] == forms["up"] == "dense"
    assert set(forms) == set(sc.compressed_layers(net))
    stored = sum(b.numel() for n, b in plain.named_buffers() if ".stored_weight." in n)
    dense = sum(math.prod(p.weight_shape) for p in sc.compressed_layers(net).values())
    assert stored < dense / 3  # the cores, not the weights
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert _rel(plain(x), net(x)) < 1e-5
    assert sc.compressed_layers(net)  # the model itself is untouched


def test_a_padded_linear_exports_its_cropped_factors():
    torch.manual_seed(0)
    # both sizes prime: the tensorization pads them (the last Linear, the classifier, stays dense)
    layer = nn.Sequential(nn.Linear(1021, 509), nn.Linear(509, 10)).eval()
    sc.compress_(layer, sc.CompressConfig(rank=8))
    plain, forms = exportable(layer)
    assert forms == {"0": "factors"}
    x = torch.randn(5, 1021)
    with torch.no_grad():
        assert _rel(plain(x), layer(x)) < 1e-5


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory):
    """net written once per format: {suffix: (path, what export returned)}."""
    folder = tmp_path_factory.mktemp("exported")
    return {suffix: (folder / f"net{suffix}", sc.export(net, folder / f"net{suffix}", torch.randn(4, 3, 8, 8)))
            for suffix in (".onnx", ".pt2")}


@pytest.mark.parametrize("suffix, runner", [(".onnx", "onnx"), (".pt2", "pt2"), (".pt2", "pt2-folded")])
def test_export_runs_without_the_package_with_any_batch_size(net, exported, tmp_path, suffix, runner):
    path, written = exported[suffix]
    assert written["format"] == suffix[1:] and written["size_bytes"] == path.stat().st_size
    assert written["rel_output_error"] < 1e-5
    xs = [torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch)) for batch in (1, 7)]
    for x, got in zip(xs, _run_without_package(runner, path, xs, tmp_path)):
        with torch.no_grad():
            expected = net(x)
        assert got.shape == expected.shape and _rel(got, expected) < 1e-4


def test_pt2_program_moves_to_another_device(exported, tmp_path):
    """`.to(device)` moves every tensor the rebuild uses: no factory in the graph pins the CPU it was traced on
    (torch.eye did, and the program failed on CUDA). The meta device stands in for a GPU here."""
    program = torch.export.load(str(exported[".pt2"][0]))
    pinned = [n for n in program.graph.nodes if n.op == "call_function" and n.kwargs.get("device") is not None
              and "assert" not in str(n.target)]  # the model's own .long() leaves a metadata assertion
    assert not pinned, pinned
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    sc.compress_(plain, sc.CompressConfig(rank=4), filter_fn=lambda m, name: True)
    sc.export(plain, tmp_path / "plain.pt2", torch.randn(2, 3, 8, 8))
    moved = torch.export.load(str(tmp_path / "plain.pt2")).module().to("meta")
    assert moved(torch.randn(5, 3, 8, 8, device="meta")).shape == (5, 4)


class _BoundedBatch(nn.Module):
    """A forward that bounds its batch the way a kernel's size check does (CUDA traces add such guards)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8 * 36, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.numel() < 2 ** 31:  # a guard batch < 2^31 / 288 on the symbolic batch
            y = y.relu()
        return self.head(y.flatten(1))


@pytest.mark.parametrize("suffix, runner", [(".onnx", "onnx"), (".pt2", "pt2")])
def test_a_guard_that_bounds_the_batch_still_exports_a_dynamic_batch(tmp_path, suffix, runner):
    torch.manual_seed(0)
    model = _BoundedBatch().eval()
    sc.compress_(model, sc.CompressConfig(rank=4), filter_fn=lambda m, name: name == "conv")
    path = tmp_path / f"bounded{suffix}"
    assert sc.export(model, path, torch.randn(3, 3, 8, 8))["rel_output_error"] < 1e-5
    xs = [torch.randn(batch, 3, 8, 8) for batch in (1, 6)]
    for x, got in zip(xs, _run_without_package(runner, path, xs, tmp_path)):
        with torch.no_grad():
            assert got.shape == (x.shape[0], 4) and _rel(got, model(x)) < 1e-4


@pytest.mark.gpu
def test_pt2_of_a_model_on_a_gpu_is_traced_and_runs_there(net, tmp_path):
    """A model on CUDA writes a CUDA program: every stored tensor of the rebuild, the skeleton's row orders
    included, lives on the GPU (a CPU row order failed the trace: index_select on cuda:0 and cpu)."""
    model = copy.deepcopy(net).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    written = sc.export(model, tmp_path / "gpu.pt2", x)
    assert written["rel_output_error"] < 1e-4
    program = torch.export.load(str(tmp_path / "gpu.pt2")).module()
    assert {t.device.type for t in program.state_dict().values()} == {"cuda"}
    with torch.no_grad():
        assert _rel(program(x), model(x)) < 1e-4


def test_the_output_check_runs_without_tf32_and_restores_the_settings(net, tmp_path, monkeypatch):
    """cuDNN's default TF32 convolutions put a GPU program 2.4e-4 from the model it checks against (H100):
    the check compares full float32 runs, and the caller's settings come back."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    torch.set_float32_matmul_precision("high")
    seen = []
    check = export_module._output_error

    def spy(*a, **k):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                     torch.get_float32_matmul_precision()))
        return check(*a, **k)
    monkeypatch.setattr(export_module, "_output_error", spy)
    try:
        sc.export(net, tmp_path / "net.pt2", torch.randn(2, 3, 8, 8))
        assert seen == [(False, False, "highest")]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_onnx_file_is_near_the_checkpoint_size_not_the_dense_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    sc.compress_(model, sc.CompressConfig(ratio=10), filter_fn=lambda m, n: True)
    ckpt = sc.save(model, tmp_path / "m.safetensors")
    for suffix in (".onnx", ".pt2"):
        size = sc.export(model, tmp_path / f"m{suffix}", torch.randn(2, 512))["size_bytes"]
        assert size <= 1.2 * ckpt < dense_bytes / 4, suffix


def test_bad_suffix_and_untraceable_outputs_write_nothing(net, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"\.onnx .*or \.pt2"):
        sc.export(net, tmp_path / "net.bin", torch.randn(2, 3, 8, 8))
    with pytest.raises(UserError, match="cannot be exported"):
        sc.export(net, tmp_path / "net.pt2", torch.randn(2, 5))  # inputs the model cannot take
    monkeypatch.setattr(export_module, "MAX_REL_ERROR", 0.0)
    with pytest.raises(UserError, match="differ from the compressed model's .* nothing written"):
        sc.export(net, tmp_path / "net.pt2", torch.randn(2, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


class _DataDependent(nn.Module):
    """Control flow on a tensor's value: torch.export cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_a_layer_that_cannot_export_is_named(net, tmp_path):
    model = nn.Sequential(copy.deepcopy(net), _DataDependent())
    with pytest.raises(UserError, match=r"cannot be exported: layer 1 \(_DataDependent\): "):
        sc.export(model, tmp_path / "net.pt2", torch.randn(2, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def _eval_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = _main(eval_app, "sttp-eval", [str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    sc.compress_(model, sc.CompressConfig(rank=4))
    with_shape = root / "digits.sttp.safetensors"
    sc.save(model, with_shape, arch=DIGITS, meta={"input_shape": [1, 8, 8]})
    bare = root / "bare.sttp.safetensors"
    sc.save(model, bare, arch=DIGITS)
    return root, with_shape, bare, model


def test_cli_export_uses_the_recorded_input_shape(digits_ckpt, tmp_path):
    _, ckpt, _, model = digits_ckpt
    rc, out, err = _eval_cli(ckpt, "--arch", DIGITS, "--export", tmp_path / "d.onnx", "--json", tmp_path / "r.json")
    assert rc == 0, err
    assert "wrote " in out and "d.onnx" in out and "x the checkpoint" in out
    exported = json.loads((tmp_path / "r.json").read_text())["exported"]
    assert exported["format"] == "onnx" and exported["input"] == [1, 8, 8] and exported["rel_output_error"] < 1e-5
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert _rel(_run_without_package("onnx", tmp_path / "d.onnx", x, tmp_path), model(x)) < 1e-4


def test_cli_export_refusals_are_one_line_and_exit_2(digits_ckpt, tmp_path):
    _, ckpt, bare, _ = digits_ckpt
    cases = [((bare, "--arch", DIGITS, "--export", tmp_path / "b.onnx"), "--input-shape"),
             ((ckpt, "--arch", DIGITS, "--export", tmp_path / "b.txt"), ".onnx"),
             ((ckpt, "--arch", DIGITS, "--export", ckpt), "would overwrite the checkpoint"),
             ((ckpt, "--arch", DIGITS, "--export", tmp_path / "same.pt2", "--json", tmp_path / "same.pt2"),
              "name the same file")]
    for args, says in cases:
        rc, _, err = _eval_cli(*args)
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    rc, _, err = _eval_cli(bare, "--arch", DIGITS, "--input-shape", "1,8,8", "--export", tmp_path / "b.pt2", "-q")
    assert rc == 0, err and (tmp_path / "b.pt2").is_file()


@pytest.mark.parametrize("d,r", [(12, 3), (192, 96), (288, 96), (7, 6)])
def test_skeleton_rows_rebuild_the_core_with_bounded_entries(d, r):
    """X[order] = [T; B T] exactly, with maxvol's |B| <= 1.05 and a well-conditioned T, for frames of the
    shapes a chain has (2 and 3 modes, nearly square)."""
    from sttp_compress.core.skeleton import MAXVOL_TOL, skeleton

    X = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=torch.Generator().manual_seed(d)))[0]
    order, B, T = skeleton(X)
    assert sorted(order.tolist()) == list(range(d)) and B.shape == (d - r, r)
    torch.testing.assert_close(X[order], torch.cat([T, B @ T]), rtol=0, atol=1e-12)
    assert float(B.abs().max()) <= MAXVOL_TOL
    assert float(torch.linalg.cond(T)) < 4 * math.sqrt(r * d)


def test_skeleton_chain_stores_less_and_applies_as_the_chain():
    """Square cores store nothing, the others R_k² values fewer than their frames; applied right to left to
    what the last core leaves (T, or T times anything) the chain is the frame matrix of the orthonormal cores."""
    from sttp_compress.core.skeleton import apply_chain, skeleton_chain
    from sttp_compress.core.spectral_tt import chain

    ranks = [1, 2, 4, 3, 3, 2]  # cores 2x2 and 4x4 square, 12x3 and 6x3 tall, 6x2 last
    shapes = [(2, 2), (4, 4), (12, 3), (6, 3), (6, 2)]
    g = torch.Generator().manual_seed(0)
    frames = [torch.linalg.qr(torch.randn(*s, dtype=torch.float64, generator=g))[0] for s in shapes]
    cores, T = skeleton_chain(frames, ranks)
    assert cores[0] is None and cores[1] is None
    assert [tuple(c[1].shape) for c in cores[2:]] == [(9, 3), (3, 3), (4, 2)] and tuple(T.shape) == (2, 2)
    torch.testing.assert_close(apply_chain(cores, T, ranks), chain(frames, ranks), rtol=0, atol=1e-12)
    Z = torch.randn(2, 5, dtype=torch.float64, generator=g)
    torch.testing.assert_close(apply_chain(cores, T @ Z, ranks), chain(frames, ranks) @ Z, rtol=0, atol=1e-12)
