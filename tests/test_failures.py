"""The failure contract (docs/usage.md: Failure contract): a checkpoint is data, never code; every bad input ends
in one line on stderr and exit code 2 (no traceback without --debug); outputs are whole or absent.

Each case runs through both commands where it applies and through the Python API. The property-based
tests at the end corrupt a real compressed checkpoint at random and draw option combinations.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from sttp_compress.io.checkpoint import load_compressed, save_compressed
from sttp_compress.cli import _main, compress_app, eval_app
from sttp_compress.compress.convert import compress
from sttp_compress.errors import UserError
from sttp_compress.example import DigitsCNN, digits_data
from sttp_compress.io.outputs import TEMP_PREFIX
from sttp_compress.io.checkpoint import read_compressed  # noqa: E402

DIGITS = "sttp_compress.example:DigitsCNN"
# Specs a tampered file might record; each would run code or download if it were built.
HOSTILE = ["subprocess:call?args=['touch','{pwned}']", "os:system?command='touch {pwned}'",
           "runpy:run_path?path_name='{script}'", "{script}:build", "torchvision:resnet18?weights='DEFAULT'"]
ARCH_PY = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def exits():
        sys.exit(3)

    def ctrl_c():
        raise KeyboardInterrupt

    class Slow(nn.Sequential):
        def forward(self, x):
            if self.training:
                Path(os.environ["STTP_TEST_READY"]).touch()
                time.sleep(0.05)
            return super().forward(x)

    def conv():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    def slow():
        return Slow(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
""")


class Run:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run(app, *args) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = _main(app, "sttp-eval" if app is eval_app else "sttp-compress", [str(a) for a in args])
    return Run(rc, out.getvalue(), err.getvalue())


def refused(res: Run, *fragments: str) -> str:
    """Assert exit 2 with exactly one stderr line, no traceback, holding every fragment; return the line."""
    assert res.rc == 2, f"exit {res.rc}: {res.err!r}"
    assert "Traceback" not in res.err and len(res.lines) == 1, res.err
    for fragment in fragments:
        assert fragment in res.lines[0], (fragment, res.lines[0])
    return res.lines[0]


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


pytestmark = pytest.mark.usefixtures("fast_eval_timing")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A compressed DigitsCNN (its recorded arch is built in, so it opens on its own), digits tensors, a
    small image folder, an MLP state dict with its architecture file."""
    root = tmp_path_factory.mktemp("failures")
    torch.manual_seed(0)
    model = DigitsCNN()
    assert compress(model, rank=4)
    ckpt = root / "digits.sttp.safetensors"
    save_compressed(model, ckpt, DIGITS, meta={"params_original": 620_000})
    _, val = digits_data()
    tensors = root / "digits.pt"
    torch.save({"inputs": val.tensors[0][:64], "targets": val.tensors[1][:64]}, tensors)
    (root / "arch.py").write_text(ARCH_PY)
    torch.manual_seed(0)
    mlp = root / "mlp.pt"
    torch.save(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 4)).state_dict(), mlp)
    mlp_data = root / "mlp-data.pt"
    torch.save({"inputs": torch.randn(256, 64), "targets": torch.randint(0, 4, (256,))}, mlp_data)
    return {"root": root, "ckpt": ckpt, "payload": read_compressed(ckpt), "tensors": tensors,
            "arch": f"{root / 'arch.py'}:build", "arch_py": root / "arch.py", "mlp": mlp, "mlp_data": mlp_data}


def tampered(env, tmp_path: Path, edit, safetensors: bool = False) -> Path:
    """A copy of the compressed checkpoint with `edit(payload)` applied, as a format-1 file or as safetensors."""
    payload = {k: (dict(v) if isinstance(v, dict) else v) for k, v in env["payload"].items()}
    payload["state_dict"] = {k: v.clone() for k, v in env["payload"]["state_dict"].items()}
    payload["layers"] = {k: dict(v) for k, v in env["payload"]["layers"].items()}
    edit(payload)
    if safetensors:
        from safetensors.torch import save_file

        header = {k: (json.dumps(v) if k in ("layers", "meta", "summary") else str(v))
                  for k, v in payload.items() if k != "state_dict" and v is not None}
        path = tmp_path / "tampered.sttp.safetensors"
        save_file(payload["state_dict"], str(path), metadata=header)
        return path
    path = tmp_path / "tampered.sttp.pt"  # format 1: a torch.save dict, still read
    torch.save(payload, path)
    return path


# --------------------------------------------------------------------------- 1. a checkpoint is data


@pytest.mark.parametrize("hostile", HOSTILE)
def test_opening_never_runs_what_the_file_names(env, tmp_path, hostile):
    pwned, script = tmp_path / "PWNED", tmp_path / "evil.py"
    script.write_text(f"open({str(pwned)!r}, 'w').close()\ndef build():\n    open({str(pwned)!r}, 'w').close()\n")
    spec = hostile.format(pwned=pwned, script=script)
    path = tampered(env, tmp_path, lambda p: p.update(arch=spec), safetensors=True)
    export = tmp_path / "dense.pt"
    for args in ([path], [path, "--export-dense", export]):
        refused(run(eval_app, *args), spec, "--arch", "--trust-arch")
    with pytest.raises(UserError, match="trust_arch"):
        load_compressed(path)
    assert not pwned.exists() and not export.exists()


def test_the_users_arch_or_trust_opens_it(env, tmp_path):
    path = tampered(env, tmp_path, lambda p: p.update(arch="sttp_compress.example:digits_data"), safetensors=True)
    refused(run(eval_app, path), "--trust-arch")
    assert run(eval_app, path, "--arch", DIGITS, "-q").rc == 0
    # trusted, the recorded spec is built: here it names a function that is not a model, so exit 2
    refused(run(eval_app, path, "--trust-arch", "-q"), "not a torch.nn.Module")
    model, _ = load_compressed(path, arch=DIGITS)
    assert isinstance(model, DigitsCNN)


def test_data_specs_open_on_their_own(env, tmp_path):
    model, info = load_compressed(env["ckpt"])
    assert info["arch"] == DIGITS and isinstance(model, DigitsCNN)
    torch.manual_seed(0)
    net = __import__("torchvision").models.squeezenet1_1(num_classes=4)
    assert compress(net, rank=2, include=["features.12.expand3x3"])
    path = tmp_path / "sq.sttp.safetensors"
    save_compressed(net, path, "torchvision:squeezenet1_1?num_classes=4")
    rebuilt, _ = load_compressed(path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), net.eval()(x))


# --------------------------------------------------------------------------- 2. tampered checkpoints


def _first_layer(p):
    return next(iter(p["layers"].values()))


def _first_float(p):
    return next(k for k, v in p["state_dict"].items() if v.is_floating_point() and v.numel() > 1)


TAMPERINGS = {
    "no state_dict": (lambda p: p.pop("state_dict"), "'state_dict' is missing"),
    "state_dict a list": (lambda p: p.update(state_dict=[1, 2]), "'state_dict' is a list"),
    "no layers": (lambda p: p.pop("layers"), "'layers' is missing"),
    "layers a string": (lambda p: p.update(layers="x"), "'layers' is a str"),
    "format_version a string": (lambda p: p.update(format_version="1"), "'format_version' must be"),
    "unknown method": (lambda p: _first_layer(p).update(method="magic"), "method 'magic'"),
    "rank 0": (lambda p: _first_layer(p).update(rank=0), "rank 0"),
    "shape of a layer": (lambda p: _first_layer(p).update(weight_shape=[7, 3]), "the checkpoint has [7, 3]"),
    "shape of a tensor": (lambda p: p["state_dict"].update({_first_float(p): torch.zeros(3, 3)}), "has shape [3, 3]"),
    "tensor replaced by a number": (lambda p: p["state_dict"].update({_first_float(p): 1.5}), "not a tensor"),
    "NaN": (lambda p: p["state_dict"][_first_float(p)].view(-1).__setitem__(0, float("nan")), "NaN"),
    "Inf": (lambda p: p["state_dict"][_first_float(p)].view(-1).__setitem__(0, float("inf")), "Inf"),
    "meta mean a string": (lambda p: p["meta"].update(mean="abc"), "meta entry 'mean'"),
}


# what a safetensors file can carry at all (its tensors are a mapping of names to tensors, its metadata strings)
SAFETENSORS_TAMPERINGS = ("no layers", "layers a string", "unknown method", "rank 0", "shape of a layer",
                          "shape of a tensor", "NaN", "Inf", "meta mean a string")


@pytest.mark.parametrize("case,safetensors", [(c, False) for c in sorted(TAMPERINGS)]
                         + [(c, True) for c in SAFETENSORS_TAMPERINGS])
def test_tampered_checkpoints_are_refused(env, tmp_path, case, safetensors):
    edit, fragment = TAMPERINGS[case]
    path = tampered(env, tmp_path, edit, safetensors)
    out = tmp_path / "r.json"
    refused(run(eval_app, path, "--json", out), fragment)
    refused(run(eval_app, path, "--export-dense", tmp_path / "d.pt"), fragment)
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_compressed(path)
    assert listing(tmp_path) == {path.name}


# --------------------------------------------------------------------------- 2. bad data and options


def test_an_unreadable_image_is_named(env, tmp_path):
    folder = tmp_path / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=40 * i).save(folder / c / f"{i}.png")
    (folder / "b" / "9.png").write_bytes(b"not an image")
    refused(run(eval_app, env["ckpt"], "--data", folder, "-q"), "cannot read image", "9.png")
    refused(run(compress_app, env["ckpt"].parent / "nothing.pt", "--arch", DIGITS, "--rank", "4"), "no such file")
    spec = f"{env['arch_py']}:conv"
    from sttp_compress.io.sources import resolve_arch
    torch.save(resolve_arch(spec).state_dict(), tmp_path / "d.pt")
    for subset in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "split" / subset / c).mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), color=40 * i).save(tmp_path / "split" / subset / c / f"{i}.png")
    (tmp_path / "split" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    res = run(compress_app, tmp_path / "d.pt", "--arch", spec, "--rank", "4", "--data", tmp_path / "split",
              "--image-size", "8", "--mean", "0.5", "--std", "0.5", "--workers", "0", "--epochs", "1", "-q")
    refused(res, "cannot read image", "broken.jpg")
    assert not (tmp_path / "d.sttp.safetensors").exists() and not (tmp_path / "d.sttp.report").exists()


def test_tensor_data_that_does_not_fit_the_model(env, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"inputs": torch.randn(8, 3, 5, 5), "targets": torch.zeros(8, dtype=torch.long)}, bad)
    refused(run(eval_app, env["ckpt"], "--data", f"tensors:{bad}", "-q"), "failed")
    res = run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--data", f"tensors:{bad}",
              "--output", tmp_path / "o.sttp.safetensors")
    refused(res, "do not fit the model")
    assert not (tmp_path / "o.sttp.safetensors").exists()


@pytest.mark.parametrize("gate", [["--min-accuracy", "50"], ["--baseline", "b.json", "--max-drop", "1"],
                                  ["--min-cosine", "0.9"], ["--min-sts-spearman", "0.5"]])
def test_a_gate_that_cannot_be_checked_is_a_usage_error_before_any_work(tmp_path, gate):
    # the checkpoint does not even exist: the gate is refused first
    refused(run(eval_app, tmp_path / "missing.sttp.safetensors", *gate), gate[0] if gate[0] != "--baseline" else "--max-drop",
            "cannot be checked")


def test_a_gate_needing_targets_the_tensor_file_lacks(env, tmp_path):
    unlabelled = tmp_path / "x.pt"
    torch.save({"inputs": torch.randn(4, 1, 8, 8)}, unlabelled)
    refused(run(eval_app, env["ckpt"], "--data", f"tensors:{unlabelled}", "--min-accuracy", "50"), "no 'targets'")


@pytest.mark.parametrize("device", ["gpu", "mps", "meta", "cuda:7"])
def test_an_unknown_device(env, tmp_path, device):
    refused(run(eval_app, tmp_path / "missing.sttp.safetensors", "--device", device), "device")
    refused(run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--data",
                f"tensors:{env['mlp_data']}", "--device", device, "--output", tmp_path / "o.pt"), "device")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("factory,fragment", [("exits", "SystemExit: 3"), ("ctrl_c", "KeyboardInterrupt")])
def test_a_factory_that_exits_or_raises_keyboard_interrupt(env, tmp_path, factory, fragment):
    spec = f"{env['arch_py']}:{factory}"
    refused(run(compress_app, env["mlp"], "--arch", spec, "--rank", "4", "--output", tmp_path / "o.pt"), fragment)
    refused(run(eval_app, env["ckpt"], "--arch", spec), fragment)
    with pytest.raises(UserError, match=fragment):
        load_compressed(env["ckpt"], arch=spec)


def test_every_option_is_checked_before_loading(tmp_path):
    missing = tmp_path / "missing.pt"  # loading it would fail; each option must fail first
    for args, fragment in ((["--dtype", "int3"], "--dtype"), (["--augment", "wild"], "--augment"),
                           (["--std", "0,1,1"], "--std"), (["--mean", "1,2"], "--mean"),
                           (["--method", "tucker"], "--method")):
        refused(run(compress_app, missing, "--arch", DIGITS, "--rank", "4", *args), fragment)
    refused(run(eval_app, missing, "--batch-size", "0"), "--batch-size")


# --------------------------------------------------------------------------- 3. outputs


def test_output_names_that_cannot_be_written(env, tmp_path):
    bad_utf8 = os.fsdecode(b"out-\xff.sttp.safetensors")
    long_name = "x" * 300 + ".sttp.safetensors"
    for name, fragment in ((bad_utf8, "not valid UTF-8"), (long_name, "bytes long")):
        res = run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--output", tmp_path / name)
        refused(res, fragment)
        refused(run(eval_app, env["ckpt"], "--json", tmp_path / name), fragment)
    assert listing(tmp_path) == set()


def test_safetensors_output_is_real_safetensors_and_a_pt_name_the_format_1_file(env, tmp_path):
    from safetensors import safe_open

    for name in ("a.safetensors", "b.pt"):
        res = run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--output", tmp_path / name, "-q")
        assert res.rc == 0, res.err
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "sttp-compress" and len(list(f.keys())) > 0
    assert read_compressed(tmp_path / "b.pt")["format_version"] == 1
    assert torch.load(tmp_path / "b.pt", weights_only=True)["format"] == "sttp-compress"
    for name in ("a.safetensors", "b.pt"):
        assert run(eval_app, tmp_path / name, "--arch", env["arch"], "-q").rc == 0


def test_json_output_honours_force_symlinks_and_stdout(env, tmp_path):
    target = tmp_path / "r.json"
    target.write_text("keep")
    refused(run(eval_app, env["ckpt"], "--json", target, "-q"), "exists", "--force")
    assert target.read_text() == "keep"
    assert run(eval_app, env["ckpt"], "--json", target, "--force", "-q").rc == 0
    assert json.loads(target.read_text())["arch"] == DIGITS
    link = tmp_path / "link.json"
    link.symlink_to(target)
    refused(run(eval_app, env["ckpt"], "--json", link, "--force"), "symbolic link")
    assert link.is_symlink()
    refused(run(eval_app, env["ckpt"], "--json", "/dev/null", "--force"), "not a regular file")
    res = run(eval_app, env["ckpt"], "--json", "-")
    assert res.rc == 0 and json.loads(res.out)["params"] > 0


def test_checkpoint_and_report_land_together(env, tmp_path, monkeypatch):
    from sttp_compress.evaluate import report as report_mod
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_mod, "render_markdown", lambda *a, **k: disk_full())
    out = tmp_path / "m.sttp.safetensors"
    res = run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--output", out, "-q")
    assert res.rc != 0 and "Traceback" not in res.err
    assert listing(tmp_path) == set()
    monkeypatch.undo()
    assert run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--output", out, "-q").rc == 0
    assert {"m.sttp.safetensors", "m.sttp.report"} <= listing(tmp_path)


def test_stale_temporaries_of_a_killed_run_are_removed(env, tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no process has it
    (tmp_path / f"{TEMP_PREFIX}{dead}-abc.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f"{TEMP_PREFIX}{dead}-report").mkdir()
    res = run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--output", tmp_path / "m.sttp.safetensors")
    assert res.rc == 0, res.err
    assert not any(n.startswith(TEMP_PREFIX) for n in listing(tmp_path))


def _script(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from sttp_compress.cli import compress_main; compress_main()",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_concurrent_forced_runs_leave_one_runs_pair(env, tmp_path):
    out = tmp_path / "m.sttp.safetensors"
    procs = [_script(env["mlp"], "--arch", env["arch"], "--rank", r, "--output", out, "--force", "-q")
             for r in (3, 5)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    ckpt = read_compressed(out)
    report = json.loads((tmp_path / "m.sttp.report" / "report.json").read_text())
    assert {c["rank"] for c in ckpt["layers"].values()} == {report["target"]["rank"]}
    assert report["totals"]["size_bytes_compressed"] == out.stat().st_size
    assert not any(n.startswith(TEMP_PREFIX) for n in listing(tmp_path))


@pytest.mark.parametrize("sig,code,workers", [(signal.SIGINT, 130, 0), (signal.SIGTERM, 143, 0), (signal.SIGKILL, -9, 0),
                                              (signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 2)])
def test_interrupted_runs_write_nothing(env, tmp_path, sig, code, workers):
    """With data-loading workers, the signal goes to the whole process group, as Ctrl-C in a terminal, `timeout` or a
    job scheduler send it: the workers die of it too, and the run still ends in the one line."""
    ready = tmp_path / "ready"
    out = tmp_path / "out" / "m.sttp.safetensors"
    out.parent.mkdir()
    proc = _script(env["mlp"], "--arch", f"{env['arch_py']}:slow", "--rank", "4", "--data",
                   f"tensors:{env['mlp_data']}", "--epochs", "50", "--workers", workers, "--output", out, "-q",
                   env={**os.environ, "STTP_TEST_READY": str(ready)}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "no training step in 120 s"
    if workers:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    err = [line for line in proc.stderr.read().splitlines() if line.strip()]
    if sig != signal.SIGKILL:
        assert err == ["sttp-compress: interrupted; nothing written"], err
    assert listing(out.parent) == set()
    # the next run is not tripped by anything the interrupted one left
    res = run(compress_app, env["mlp"], "--arch", env["arch"], "--rank", "4", "--output", out, "-q")
    assert res.rc == 0, res.err


# --------------------------------------------------------------------------- property-based


def _corrupt(payload: dict, data) -> None:
    """One random corruption of a checkpoint dict, drawn with hypothesis."""
    kind = data.draw(st.sampled_from(["drop", "retype", "layer", "shape", "dtype", "nonfinite"]))
    junk = st.one_of(st.none(), st.integers(-3, 10**6), st.text(max_size=8), st.lists(st.integers(-2, 9), max_size=3),
                     st.floats(allow_nan=True), st.booleans())
    if kind in ("drop", "retype"):
        key = data.draw(st.sampled_from(sorted(payload)))
        if kind == "drop":
            payload.pop(key)
        else:
            payload[key] = data.draw(junk)
    elif kind == "layer":
        cfg = payload["layers"][data.draw(st.sampled_from(sorted(payload["layers"])))]
        cfg[data.draw(st.sampled_from(["rank", "method", "spectrum", "weight_shape", "kind", "row_scaled"]))] = \
            data.draw(junk)
    else:
        key = data.draw(st.sampled_from(sorted(payload["state_dict"])))
        t = payload["state_dict"][key]
        if kind == "shape":
            payload["state_dict"][key] = torch.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3)))
        elif kind == "dtype":
            payload["state_dict"][key] = t.to(data.draw(st.sampled_from([torch.int8, torch.float64, torch.bool,
                                                                          torch.float16])))
        elif t.is_floating_point() and t.numel():
            t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(st.sampled_from(
                [float("nan"), float("inf"), -float("inf")]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_is_exit_0_or_one_line_exit_2(env, tmp_path, data):
    folder = tmp_path / f"case{time.monotonic_ns()}"
    folder.mkdir()
    path = tampered(env, folder, lambda p: _corrupt(p, data))
    out = folder / "r.json"
    res = run(eval_app, path, "--json", out, "-q")
    assert res.rc in (0, 2), res.err
    if res.rc == 2:
        refused(res)
        assert not out.exists()
    else:
        assert json.loads(out.read_text())["params"] > 0
    try:
        load_compressed(path)
    except UserError as exc:
        assert "\n" not in str(exc)


_OPTIONS = {
    "--batch-size": st.sampled_from(["0", "1", "7", "-2"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda", "tpu"]),
    "--input-shape": st.sampled_from(["1,8,8", "0,8", "a", "1,8,8,8"]),
    "--max-size": st.sampled_from(["1B", "5MB", "5 parsecs", "-3"]),
    "--min-ratio": st.sampled_from(["0.5", "2", "-1", "1e9"]),
    "--max-params": st.sampled_from(["1", "10000000", "0"]),
    "--min-accuracy": st.sampled_from(["0", "50", "101"]),
    "--mean": st.sampled_from(["0.5", "1,2", "x"]),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.dictionaries(st.sampled_from(sorted(_OPTIONS)), st.just(None), max_size=4), data=st.data(),
       with_data=st.booleans())
def test_random_options_are_exit_0_1_or_one_line_exit_2(env, tmp_path, chosen, data, with_data):
    args = [x for key in chosen for x in (key, data.draw(_OPTIONS[key]))]
    out = tmp_path / f"r{time.monotonic_ns()}.json"
    extra = ["--data", f"tensors:{env['tensors']}"] if with_data else []
    res = run(eval_app, env["ckpt"], *extra, *args, "--json", out, "-q")
    assert res.rc in (0, 1, 2), res.err
    assert "Traceback" not in res.err
    if res.rc == 2:
        refused(res)
        assert not out.exists()
    else:  # 0, or 1 with one line per failed gate; the numbers are written either way
        assert all(line.startswith("gate failed:") for line in res.lines), res.err
        assert json.loads(out.read_text())["file"] == str(env["ckpt"])
_COMPRESS_OPTIONS = {
    "--ratio": st.sampled_from(["3", "0", "-1", "1e9", "abc"]),
    "--rank": st.sampled_from(["4", "0", "-2"]),
    "--method": st.sampled_from(["sttp", "svdp", "tucker"]),
    "--spectrum": st.sampled_from(["free", "lipschitz", "identity", "x"]),
    "--allocation": st.sampled_from(["greedy", "uniform", "sensitivity", "x"]),
    "--dtype": st.sampled_from(["float32", "float16", "int8"]),
    "--include": st.sampled_from(["*", "2", "nomatch"]),
    "--layer-rank": st.sampled_from(["2=3", "bad", "0=0"]),
    "--epochs": st.sampled_from(["1", "-1"]),
    "--batch-size": st.sampled_from(["0", "32"]),
    "--device": st.sampled_from(["cpu", "gpu"]),
    "--lr": st.sampled_from(["0", "1e-3"]),
    "--time-budget": st.sampled_from(["0", "2s", "x"]),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.dictionaries(st.sampled_from(sorted(_COMPRESS_OPTIONS)), st.just(None), max_size=4),
       data=st.data(), with_data=st.booleans())
def test_random_compress_options_are_exit_0_or_one_line_exit_2(env, tmp_path, chosen, data, with_data):
    folder = tmp_path / f"run{time.monotonic_ns()}"
    folder.mkdir()
    args = [x for key in chosen for x in (key, data.draw(_COMPRESS_OPTIONS[key]))]
    if "--ratio" not in chosen and "--rank" not in chosen:
        args += ["--rank", "4"]
    extra = ["--data", f"tensors:{env['mlp_data']}", "--workers", "0"] if with_data else []
    out = folder / "m.sttp.safetensors"
    res = run(compress_app, env["mlp"], "--arch", env["arch"], *args, *extra, "--output", out, "-q")
    assert res.rc in (0, 2), res.err
    if res.rc == 2:
        refused(res)
        assert listing(folder) == set()
    else:
        assert out.is_file() and (folder / "m.sttp.report" / "report.json").is_file()
