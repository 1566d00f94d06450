"""Multi-process fine-tuning: torchrun with two CPU processes (gloo) running the real CLI, and the sharding pieces.

The two launches (about 10 s each on 2 cores) check what a user relies on: the ranks hold
bit-identical models after the conversion and after DistributedDataParallel steps, the conversion
is the single-process one, validation is reduced exactly, only rank 0 writes, and a bad input seen
by one rank stops every rank with one line and exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sttp_compress.train import distributed
from sttp_compress.io.checkpoint import load_compressed
from sttp_compress.compress.convert import compress_to_target
from sttp_compress.data.images import DeviceTensorLoader, load_tensor_data, make_loaders
from sttp_compress.errors import UserError
from sttp_compress.train.loop import evaluate
from sttp_compress.cli.launch import launch_self, torchrun_args, without_option

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # the project

from test_cli import ARCH_SOURCE as ARCH  # noqa: E402  (the same tiny architecture file)

# Runs the CLI in <base>/rank<RANK>/ so that a file written by any rank shows up in its own folder.
IN_RANK_FOLDER = textwrap.dedent("""
    import os, runpy, sys
    os.chdir(os.path.join(sys.argv.pop(1), "rank" + os.environ["RANK"]))
    runpy.run_module("sttp_compress.cli", run_name="__main__", alter_sys=True)
""")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra)
    env.pop("WORLD_SIZE", None)
    return env


def _build():
    ns: dict = {}
    exec(compile(ARCH, "<arch>", "exec"), ns)
    return ns["build"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny model, 600 labelled samples as tensors:FILE, and the arch spec."""
    d = tmp_path_factory.mktemp("ddp")
    (d / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    model = _build()()
    torch.save(model.state_dict(), d / "m.pt")
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(600, 3, 8, 8, generator=g)
    inputs[:, 0, 0, 0] = torch.arange(600.0)  # each sample's index, to find it after the split
    torch.save({"inputs": inputs, "targets": torch.randint(0, 10, (600,), generator=g)}, d / "data.pt")
    return d


def _args(job: Path, data: Path, length: tuple[str, str] = ("--steps", "4")) -> list[str]:
    return [str(job / "m.pt"), "--arch", f"{job / 'arch.py'}:build", "--rank", "4",
            "--data", f"tensors:{data}", *length, "--batch-size", "32", "--workers", "0", "-q"]


@pytest.mark.parametrize("length", [("--steps", "4"), ("--time-budget", "2s")])
def test_torchrun_two_cpu_processes_stay_in_sync_and_only_rank_0_writes(job, tmp_path, length):
    """With --time-budget the ranks read one clock (their mean), so they stop at the same step."""
    base, states = tmp_path / "ranks", tmp_path / "states"
    for folder in (base / "rank0", base / "rank1", states):
        folder.mkdir(parents=True)
    script = tmp_path / "in_rank_folder.py"
    script.write_text(IN_RANK_FOLDER)
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(base), *_args(job, job / "data.pt", length), "--output", "m.sttp.safetensors"],
        capture_output=True, text=True, timeout=240, env=_env(STTP_DEBUG_STATE_DIR=str(states)))
    assert res.returncode == 0, res.stderr
    assert "error" not in res.stderr.lower(), res.stderr

    # only rank 0 wrote: its folder has the checkpoint and the report, rank 1's is empty
    assert sorted(p.name for p in (base / "rank0").iterdir()) == ["m.sttp.report", "m.sttp.safetensors"]
    assert (base / "rank0" / "m.sttp.report" / "report.json").is_file()
    assert list((base / "rank1").iterdir()) == []

    def state(rank: int, stage: str) -> dict:
        return torch.load(states / f"rank{rank}-{stage}.pt", weights_only=True)

    # bit-identical on both ranks after the conversion, the DDP steps and the best-state choice
    for stage in ("converted", "trained", "finetuned"):
        a, b = state(0, stage), state(1, stage)
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], stage
    # the broadcast conversion is the single-process one (rank 1 ran no TT-SVD of its own)
    reference = _build()()
    reference.load_state_dict(torch.load(job / "m.pt", weights_only=True))
    compress_to_target(reference, rank=4)
    converted = state(1, "converted")
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(converted[k], v, rtol=1e-6, atol=1e-7, msg=k)
    # training moved the reflectors, on both ranks alike; the checkpoint is the state the choice kept
    trained, tuned = state(0, "trained"), state(0, "finetuned")
    assert any(not torch.equal(trained[k], converted[k]) for k in converted if "original" in k)

    # the checkpoint is rank 0's final state; the reported accuracies are exact over the whole val split
    import json

    report = json.loads((base / "rank0" / "m.sttp.report" / "report.json").read_text())
    block = report["finetune"]
    assert block["processes"] == 2
    assert block["steps"] == 4 if length[0] == "--steps" else block["time_budget"] == 2.0 and block["steps"] >= 1
    # the kept state is the start, a validation point of the curve, or (the last point) the trained state
    points = [p["epoch"] for p in block["curve"]]
    assert block["chosen_epoch"] in [0, *points]
    kept = {0: converted, points[-1]: trained}.get(block["chosen_epoch"])
    assert kept is None or all(torch.equal(tuned[k], v) for k, v in kept.items())
    model, _ = load_compressed(base / "rank0" / "m.sttp.safetensors", f"{job / 'arch.py'}:build")
    for k, v in model.state_dict().items():
        assert torch.equal(v, tuned[k]), k
    _, val_ds = load_tensor_data(job / 'data.pt')
    _, val_loader = make_loaders(val_ds, val_ds, 32, 0, 0, "cpu")
    assert block["val_accuracy_after"] == round(100 * evaluate(model, val_loader, "cpu")["accuracy"], 2)
    teacher = _build()()
    teacher.load_state_dict(torch.load(job / "m.pt", weights_only=True))
    assert block["original_val_accuracy"] == round(100 * evaluate(teacher, val_loader, "cpu")["accuracy"], 2)


def test_gpus_wrapper_bad_label_on_rank_1_stops_both_with_one_line(job, tmp_path):
    # one out-of-range label, in the validation sample that rank 1's shard starts with
    blob = torch.load(job / "data.pt", weights_only=True)
    _, val_ds = load_tensor_data(job / 'data.pt')
    second = int(val_ds.tensors[0][1, 0, 0, 0])  # val sample 1 = rank 1's first (shards are rank::2)
    blob["targets"][second] = 99
    torch.save(blob, tmp_path / "bad.pt")
    res = subprocess.run(
        [sys.executable, "-m", "sttp_compress.cli", *_args(job, tmp_path / "bad.pt"),
         "--output", str(tmp_path / "out.pt"), "--gpus", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=_env())
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1, res.stderr
    assert "..99 but the model has 10 outputs" in lines[0] and lines[0].endswith("(on rank 1)"), lines[0]
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.report").exists()


# --------------------------------------------------------------------------- sharding, in one process


def test_device_loader_shards_make_up_the_single_process_batches():
    n, batch = 21, 8
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    labels = torch.arange(n)

    def batches(rank: int, world: int, train: bool) -> list[list[int]]:
        loader = DeviceTensorLoader(images, labels, batch, (0.0,) * 3, (1.0,) * 3, train, "cpu", seed=5,
                                    rank=rank, world=world)
        return [[int(v) for v in y] for _ in range(2) for _, y in loader]  # two epochs

    alone = batches(0, 1, True)
    r0, r1 = batches(0, 2, True), batches(1, 2, True)
    assert len(alone) == len(r0) == len(r1) == 2 * (n // batch)
    assert all(len(b) == batch // 2 for b in r0 + r1)
    assert [a + b for a, b in zip(r0, r1)] == alone  # rank slices of each global batch, every epoch
    v0, v1 = sum(batches(0, 2, False), []), sum(batches(1, 2, False), [])
    assert sorted(v0 + v1) == sorted(2 * list(range(n))) and not set(v0) & set(v1)  # each val sample once per pass
    with pytest.raises(UserError, match="divisible by the 2 processes"):
        DeviceTensorLoader(images, labels, 7, (0.0,) * 3, (1.0,) * 3, True, "cpu", rank=0, world=2)


def test_make_loaders_shard_train_and_val_without_duplicates():
    ds = torch.utils.data.TensorDataset(torch.arange(50.0), torch.arange(50))
    per_rank = [make_loaders(ds, ds, 8, 0, 3, "cpu", rank=r, world=2) for r in range(2)]
    trains = [t for t, _ in per_rank]
    assert len(trains[0]) == len(trains[1]) == 25 // 4
    assert trains[0].batch_size == 4
    first = [[int(v) for _, y in t for v in y] for t in trains]
    assert not set(first[0]) & set(first[1])  # disjoint shards within an epoch
    trains[0].sampler.set_epoch(1)
    assert [int(v) for _, y in trains[0] for v in y] != first[0]  # reshuffled per epoch
    vals = [sorted(int(v) for _, y in val for v in y) for _, val in per_rank]
    assert sorted(vals[0] + vals[1]) == list(range(50))  # no padding duplicates
    with pytest.raises(UserError, match="global batch"):
        make_loaders(ds, ds, 9, 0, 3, "cpu", rank=0, world=2)


def test_single_process_helpers_are_no_ops_and_errors_pass_through():
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
    t = torch.ones(3)
    assert distributed.all_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert distributed.run_on_main(lambda: 7) == 7
    with pytest.raises(UserError, match="plain"):
        with distributed.agreed():
            raise UserError("plain")
    m = nn.Linear(2, 2)
    before = m.weight.detach().clone()
    distributed.broadcast_state(m)
    assert torch.equal(m.weight, before)


def test_gpus_wrapper_is_torchrun_with_the_same_arguments():
    argv = ["m.pt", "--gpus", "2", "--ratio", "10", "--gpus=3", "--data", "d"]
    assert without_option(argv, "--gpus") == ["m.pt", "--ratio", "10", "--data", "d"]
    args = torchrun_args(2, ["m.pt", "--run-path", "-h"])  # never read as torchrun's own options
    assert args.standalone and args.nproc_per_node == "2"
    assert args.module and args.training_script == "sttp_compress.cli"
    assert args.training_script_args == ["m.pt", "--run-path", "-h"]


@pytest.mark.parametrize("nproc, device, fragment", [
    (0, "cpu", "at least 1"),
    (2, "cuda:1", "pass --device cuda or auto"),
])
def test_gpus_wrapper_user_errors(nproc, device, fragment):
    with pytest.raises(UserError, match=fragment):
        launch_self(nproc, [], device)


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="a machine with 64 GPUs")
def test_gpus_wrapper_needs_that_many_gpus():
    with pytest.raises(UserError, match="needs 64 CUDA devices"):
        launch_self(64, [], "cuda")
