"""Tests for sttp_compress.train.loop (distillation, loop, best-state restore, BN recalibration) and the example."""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sttp_compress.core.precision import cuda_matmul_tf32, float32_precision
from sttp_compress.data.images import make_loaders
from sttp_compress.errors import UserError
from sttp_compress.example import DigitsCNN, digits_data, digits_factory, train_digits_model
from sttp_compress.train.loop import (
    FinetuneConfig,
    build_optimizer,
    build_scheduler,
    distillation_loss,
    evaluate,
    finetune,
    recalibrate_batchnorm,
    spectral_regularizer,
)

REPORT_KEYS = {
    "epochs", "steps", "time_budget", "seconds", "device", "processes", "images_per_s", "cuda_graph", "tf32", "free_cores", "original_val_accuracy",
    "val_accuracy_before", "val_accuracy_after", "original_test_accuracy", "test_accuracy_before",
    "test_accuracy_after", "chosen_epoch", "curve",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster and steadier than two on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    return digits_data(seed=0)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """The example DigitsCNN, trained briefly; also checks it gets >= 90% val accuracy quickly."""
    start = time.process_time()
    model, accuracy = train_digits_model(epochs=3, seed=0)
    cpu_seconds = time.process_time() - start
    assert accuracy >= 0.90, accuracy
    assert cpu_seconds < 20, cpu_seconds
    return model.eval()


def _student(seed: int = 1) -> nn.Module:
    """A much smaller fresh student (flatten → 32 units with BatchNorm → 10)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def _loaders(digits, batch_size: int = 64, seed: int = 0):
    train_ds, val_ds = digits
    return make_loaders(train_ds, val_ds, batch_size=batch_size, workers=0, seed=seed, device="cpu")


def _run(student, teacher, digits, progress: bool = False, **overrides) -> dict:
    cfg = FinetuneConfig(**{"device": "cpu", "workers": 0, **overrides})
    train_loader, val_loader = _loaders(digits)
    return finetune(student, teacher, train_loader, val_loader, cfg, progress=progress)


# ---------------------------------------------------------------------------------------------
# distillation_loss


def test_distillation_loss_matches_hand_computation() -> None:
    T, alpha = 2.0, 0.9
    teacher_out = torch.tensor([[2 * math.log(3.0), 0.0]])  # softmax(t/T) = (3/4, 1/4)
    student_out = torch.tensor([[0.0, 0.0]])  # softmax(s/T) = (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    ce = math.log(2.0)
    got = distillation_loss(student_out, teacher_out, torch.tensor([0]), temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(alpha * T**2 * kl + (1 - alpha) * ce, rel=1e-6)
    no_labels = distillation_loss(student_out, teacher_out, None, temperature=T, alpha=alpha)
    assert no_labels.item() == pytest.approx(T**2 * kl, rel=1e-6)


def test_distillation_loss_batch_mean_and_defaults() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    p_t = torch.softmax(t / 4, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 4, dim=1))).sum(dim=1).mean()
    expected = 0.9 * 16 * kl + 0.1 * F.cross_entropy(s, y)
    assert distillation_loss(s, t, y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_mse_branch() -> None:
    s, t = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert distillation_loss(s, t, torch.tensor([0, 1])).item() == pytest.approx(1.0)  # targets ignored
    s2, t2 = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])
    assert distillation_loss(s2, t2, kind="mse").item() == pytest.approx(5.0)
    assert distillation_loss(torch.ones(2, 5, 3), torch.zeros(2, 5, 3)).item() == pytest.approx(1.0)


def test_distillation_loss_gradient_only_to_student() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    distillation_loss(s, t, torch.tensor([0, 1, 2])).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"kind": "cosine"}, "unknown distillation loss"),
    ],
)
def test_distillation_loss_bad_settings(kwargs, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), **kwargs)


def test_distillation_loss_shape_mismatch() -> None:
    with pytest.raises(UserError, match="shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# spectral_regularizer, optimizer, config


class _Penalized(nn.Module):
    """A layer exposing spectral_penalty() = sum of its spectrum squared (the compressed-layer protocol)."""

    def __init__(self, values):
        super().__init__()
        self.spectrum = nn.Parameter(torch.tensor(values))

    def spectral_penalty(self) -> torch.Tensor:
        return (self.spectrum**2).sum()

    def forward(self, x):
        return x


def test_spectral_regularizer_is_the_d_optimal_penalty_of_compressed_layers() -> None:
    from sttp_compress import compress_module

    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8), nn.Linear(8, 2))
    compress_module(model[0], rank=4)
    compress_module(model[1], rank=3, spectrum="lipschitz")
    s0 = model[0].parametrizations.weight.original0
    spectra = []
    for m in model[:2]:
        pl = m.parametrizations.weight
        spectra.append(getattr(pl, f"original{len(pl[0].groups)}"))
    expected = -torch.log(spectra[0].abs()).sum() - torch.log(spectra[1].abs() / spectra[1].abs().max()).sum()
    reg = spectral_regularizer(model)
    assert reg.item() == pytest.approx(expected.item(), rel=1e-5)
    reg.backward()
    assert spectra[0].grad is not None and s0 is not None
    zero = spectral_regularizer(nn.Linear(2, 2))
    assert zero.item() == 0.0 and zero.dim() == 0


def test_weight_decay_skips_vectors_and_spectra() -> None:
    from sttp_compress import compress_module

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), _Penalized([[1.0, 2.0]]), nn.Linear(8, 8))
    compress_module(model[3], rank=2)
    opt = build_optimizer(model, FinetuneConfig(optimizer="sgd"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    # not the biases, the BN affine, the 2-D "spectrum", nor the compressed layer's reflectors
    assert decayed == {id(model[0].weight)}
    assert opt.param_groups[0]["weight_decay"] == 5e-4 and opt.defaults["nesterov"]
    adamw = build_optimizer(model, FinetuneConfig(optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 1e-3
    assert adamw.param_groups[0]["weight_decay"] == 0.01
    assert not adamw.defaults["fused"]  # fused only when every parameter is on a GPU
    assert adamw.defaults["betas"] == (0.9, 0.999)
    assert build_optimizer(model, FinetuneConfig(adam_beta2=0.98)).defaults["betas"] == (0.9, 0.98)


def test_spectrum_lr_mult_puts_spectra_and_scales_in_their_own_group() -> None:
    from sttp_compress import compress_module

    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(16, 8))
    compress_module(model[1], rank=2, col_weight=torch.rand(16) + 0.5)
    one_d = {n for n, p in model[1].named_parameters() if "parametrizations." in n and p.dim() == 1}
    assert len(one_d) == 2  # the spectrum and the column scales
    default = build_optimizer(model, FinetuneConfig())
    assert len(default.param_groups) == 2 and {g["lr"] for g in default.param_groups} == {1e-3}
    opt = build_optimizer(model, FinetuneConfig(spectrum_lr_mult=3.0))
    fast = [g for g in opt.param_groups if g["lr"] != 1e-3]
    assert len(opt.param_groups) == 3 and len(fast) == 1 and fast[0]["lr"] == pytest.approx(3e-3)
    names = {id(p): n for n, p in model[1].named_parameters()}
    assert {names[id(p)] for p in fast[0]["params"]} == one_d and fast[0]["weight_decay"] == 0.0
    # the one-cycle schedule peaks each group at its own rate
    sched = build_scheduler(opt, FinetuneConfig(), total_steps=100)
    for _ in range(15):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 3e-3], rel=1e-3)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"epochs": 1, "steps": 5}, "not several"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"amp": "fp8"}, "amp"),
        ({"lr": -1.0}, "learning rate"),
        ({"steps": -2}, "negative"),
        ({"device": "tpu"}, "device"),
        ({"adam_beta2": 1.0}, "beta2"),
        ({"spectrum_lr_mult": 0.0}, "multiple"),
    ],
)
def test_config_user_errors(digits, teacher, overrides, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        _run(_student(), teacher, digits, **overrides)


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_hand_example() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 2.0]])
    targets = torch.tensor([0, 0, 2])
    loader = torch.utils.data.DataLoader(TensorDataset(logits, targets), batch_size=2)
    model = nn.Identity().train()
    result = evaluate(model, loader, "cpu", "off")
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["top5"] == 1.0  # fewer than 5 classes: top-k over all of them
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert model.training  # mode restored


def test_evaluate_unlabelled() -> None:
    loader = torch.utils.data.DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2)
    assert evaluate(nn.Identity(), loader, "cpu", "off") == {"accuracy": None, "top5": None, "loss": None}


# ---------------------------------------------------------------------------------------------
# finetune


def test_test_split_is_measured_but_never_chosen_on(digits, teacher) -> None:
    train_loader, val_loader = _loaders(digits)
    test_ds = TensorDataset(*[t[: len(t) // 2] for t in digits[1].tensors])  # any labelled split
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=64)
    cfg = FinetuneConfig(device="cpu", workers=0, epochs=3, optimizer="sgd")
    with_test, without = _student(), _student()
    teacher_acc = evaluate(teacher, test_loader, "cpu", "off")["accuracy"]
    before_acc = evaluate(with_test, test_loader, "cpu", "off")["accuracy"]
    report = finetune(with_test, teacher, train_loader, val_loader, cfg, progress=False, test_loader=test_loader)
    plain = finetune(without, teacher, *_loaders(digits), cfg, progress=False)
    assert report["original_test_accuracy"] == round(100 * teacher_acc, 2)
    assert report["test_accuracy_before"] == round(100 * before_acc, 2)
    assert report["test_accuracy_after"] == round(100 * evaluate(with_test, test_loader, "cpu", "off")["accuracy"], 2)
    # the same state is chosen with or without the test split: it only reports
    assert report["val_accuracy_after"] == plain["val_accuracy_after"]
    for a, b in zip(with_test.state_dict().values(), without.state_dict().values()):
        assert torch.equal(a, b)
    assert plain["test_accuracy_after"] is None


def test_finetune_improves_student_and_reports(digits, teacher, capsys) -> None:
    student = _student()
    report = _run(student, teacher, digits, epochs=3, optimizer="sgd")  # a fresh student learns faster with SGD
    assert set(report) == REPORT_KEYS
    assert report["epochs"] == 3 and report["steps"] == 3 * len(_loaders(digits)[0])
    assert isinstance(report["seconds"], float) and report["device"] == "cpu"
    assert report["processes"] == 1 and report["images_per_s"] > 0
    assert report["original_val_accuracy"] >= 90.0
    curve = report["curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    assert all(set(p) == {"epoch", "train_loss", "val_loss", "val_accuracy"} for p in curve)
    assert all(isinstance(p["val_loss"], float) and p["val_loss"] > 0 for p in curve)  # CE with labels
    assert all(isinstance(p["train_loss"], float) and isinstance(p["val_accuracy"], float) for p in curve)
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
    assert report["val_accuracy_before"] < 30.0 < 70.0 < report["val_accuracy_after"]
    # the returned student is the best checkpoint of the curve
    assert report["val_accuracy_after"] == max(p["val_accuracy"] for p in curve)
    best = max(curve, key=lambda p: (p["val_accuracy"], -p["val_loss"]))
    assert report["chosen_epoch"] == best["epoch"]
    fresh = evaluate(student, _loaders(digits)[1], "cpu", "off")["accuracy"]
    assert round(100 * fresh, 2) == report["val_accuracy_after"]
    assert student.training and not teacher.training
    assert capsys.readouterr().out == ""


def test_finetune_restores_best_state_when_training_hurts(digits, teacher) -> None:
    """Fine-tune a teacher copy on shuffled labels (alpha=0): accuracy falls below where it started, so the
    student before fine-tuning is given back (chosen_epoch 0), weights and all; without select_best, the last."""
    train_ds, val_ds = digits
    inputs, labels = train_ds.tensors
    wrong = TensorDataset(inputs, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))])
    train_loader, val_loader = make_loaders(wrong, val_ds, 64, 0, 0, "cpu")
    student = copy.deepcopy(teacher)
    start = copy.deepcopy(student.state_dict())
    cfg = FinetuneConfig(epochs=3, alpha=0.0, optimizer="adamw", lr=3e-3, schedule="constant", device="cpu")
    report = finetune(student, teacher, train_loader, val_loader, cfg, progress=False)
    accs = [p["val_accuracy"] for p in report["curve"]]
    assert max(accs) < report["val_accuracy_before"]  # every epoch validated worse than the start
    assert report["chosen_epoch"] == 0 and report["val_accuracy_after"] == report["val_accuracy_before"]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in start.items())
    assert round(100 * evaluate(student, val_loader, "cpu", "off")["accuracy"], 2) == report["val_accuracy_before"]

    last = copy.deepcopy(teacher)
    report = finetune(last, teacher, train_loader, val_loader, dataclasses.replace(cfg, select_best=False),
                      progress=False)
    assert report["chosen_epoch"] == 3 and report["val_accuracy_after"] == report["curve"][-1]["val_accuracy"]


def test_free_cores_train_and_the_student_ends_in_sttp_form_at_its_best_state(digits, teacher) -> None:
    from sttp_compress import compress, count_parameters
    from sttp_compress.train.freecores import gauge_released

    student = copy.deepcopy(teacher)
    compress(student, rank=8)
    n = count_parameters(student)
    report = _run(student, teacher, digits, epochs=2, free_cores=True)
    assert report["free_cores"] is True
    assert not gauge_released(student) and count_parameters(student) == n
    best = max(p["val_accuracy"] for p in report["curve"])
    assert report["val_accuracy_after"] == best > report["val_accuracy_before"]
    assert round(100 * evaluate(student, _loaders(digits)[1], "cpu", "off")["accuracy"], 2) == best
    assert _run(copy.deepcopy(student), teacher, digits, steps=2)["free_cores"] is False  # images: off by default


def test_free_cores_refuse_a_bounded_spectrum(digits, teacher) -> None:
    from sttp_compress import compress

    student = copy.deepcopy(teacher)
    compress(student, rank=4, spectrum="lipschitz")
    with pytest.raises(UserError, match="free spectrum"):
        _run(student, teacher, digits, steps=2, free_cores=True)


def test_finetune_is_reproducible(digits, teacher) -> None:
    runs = []
    for _ in range(2):
        student = _student(seed=5)
        report = _run(student, teacher, digits, steps=30, seed=7)
        runs.append((report["curve"], student.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_finetune_steps_shorter_than_an_epoch(digits, teacher) -> None:
    steps_per_epoch = len(_loaders(digits)[0])
    report = _run(_student(), teacher, digits, steps=5, schedule="cosine")
    assert report["steps"] == 5 and report["epochs"] == round(5 / steps_per_epoch, 3)
    assert len(report["curve"]) == 1 and report["curve"][0]["epoch"] == report["epochs"]


def test_finetune_steps_across_epochs(digits, teacher) -> None:
    steps_per_epoch = len(_loaders(digits)[0])
    report = _run(_student(), teacher, digits, steps=steps_per_epoch + 3, optimizer="adamw", schedule="constant")
    assert [p["epoch"] for p in report["curve"]] == [1, round(1 + 3 / steps_per_epoch, 3)]


@pytest.mark.parametrize("asked, device, amp, expected", [
    (None, "cuda", True, True), (None, "cuda", False, False), (None, "cpu", True, False),
    (False, "cuda", True, False), (True, "cpu", False, True),
])
def test_tf32_defaults_to_cuda_under_autocast(asked, device, amp, expected) -> None:
    from sttp_compress.train.loop import _tf32_enabled

    assert _tf32_enabled(asked, torch.device(device), amp) is expected


def test_attention_backends_name_real_backends_without_cudnn() -> None:
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend

    from sttp_compress.train.loop import ATTENTION_BACKENDS, _attention_backends

    assert all(isinstance(getattr(SDPBackend, n), SDPBackend) for n in ATTENTION_BACKENDS)
    assert "CUDNN_ATTENTION" not in ATTENTION_BACKENDS
    assert isinstance(_attention_backends(torch.device("cpu")), nullcontext)


class _SeesTf32(nn.Module):
    """A student that records whether CUDA float32 matmuls run as TF32 at each training forward."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net, self.seen, self.fail_at = _student(), [], fail_at

    def forward(self, x):
        if self.training:
            self.seen.append(cuda_matmul_tf32())
            if len(self.seen) == self.fail_at:
                raise RuntimeError("boom")
        return self.net(x)


def test_tf32_is_a_cuda_setting_that_a_cpu_run_leaves_alone(digits, teacher) -> None:
    """TF32 is cuBLAS's: a CPU run sets nothing (through torch's legacy API it would also switch the CPU's oneDNN
    matmuls), and reports what it was asked."""
    with float32_precision(matmul="ieee"):
        mkldnn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
        student = _SeesTf32()
        report = _run(student, teacher, digits, steps=3, tf32=True)
        assert report["tf32"] is True and student.seen == [False] * 3
        assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == mkldnn
        assert _run(_SeesTf32(), teacher, digits, steps=1)["tf32"] is False  # the default on a CPU


@pytest.mark.gpu
def test_tf32_holds_during_the_cuda_steps_and_is_restored(digits, teacher) -> None:
    teacher = copy.deepcopy(teacher).cuda()
    with float32_precision(matmul="ieee"):
        student = _SeesTf32()
        report = _run(student, teacher, digits, steps=3, tf32=True, device="cuda", cuda_graph=False)
        assert report["tf32"] is True and student.seen == [True] * 3
        assert cuda_matmul_tf32() is False
        failing = _SeesTf32(fail_at=2)
        with pytest.raises(RuntimeError, match="boom"):
            _run(failing, teacher, digits, steps=3, tf32=True, device="cuda", cuda_graph=False)
        assert failing.seen == [True, True] and cuda_matmul_tf32() is False


def test_finetune_zero_steps_keeps_student(digits, teacher) -> None:
    student = _student()
    before = copy.deepcopy(student.state_dict())
    report = _run(student, teacher, digits, steps=0)
    assert report["curve"] == [] and report["val_accuracy_after"] == report["val_accuracy_before"]
    assert all(torch.equal(before[k], student.state_dict()[k]) for k in before)


def test_finetune_unlabelled_and_without_val(digits, teacher) -> None:
    train_ds, val_ds = digits
    unlabelled_train, unlabelled_val = TensorDataset(train_ds.tensors[0]), TensorDataset(val_ds.tensors[0])
    cfg = FinetuneConfig(steps=25, device="cpu")
    train_loader, val_loader = make_loaders(unlabelled_train, unlabelled_val, 64, 0, 0, "cpu")
    report = finetune(_student(), teacher, train_loader, val_loader, cfg, progress=False)
    assert report["original_val_accuracy"] is None and report["val_accuracy_after"] is None
    assert report["curve"][-1]["val_accuracy"] is None and report["curve"][-1]["train_loss"] > 0
    train_loader, _ = make_loaders(train_ds, None, 64, 0, 0, "cpu")
    report = finetune(_student(), teacher, train_loader, None, cfg, progress=False)
    assert report["val_accuracy_before"] is None and report["steps"] == 25


def test_finetune_rejects_labels_beyond_the_outputs(digits, teacher) -> None:
    train_ds, val_ds = digits
    shifted = TensorDataset(val_ds.tensors[0], val_ds.tensors[1] + 5)  # labels up to 14, 10 outputs
    train_loader, val_loader = make_loaders(train_ds, shifted, 64, 0, 0, "cpu")
    with pytest.raises(UserError, match="10 outputs"):
        cfg = FinetuneConfig(steps=1, device="cpu")
        finetune(_student(), teacher, train_loader, val_loader, cfg, progress=False)


def test_finetune_spectral_reg_shrinks_penalty(digits, teacher) -> None:
    from sttp_compress import compress_module

    student = _student()
    compress_module(student[1], rank=4)  # Linear(64 → 32) as STTP
    start = spectral_regularizer(student).item()
    _run(student, teacher, digits, steps=20, spectral_reg=0.1, optimizer="adamw", schedule="constant")
    assert spectral_regularizer(student).item() < start


@pytest.mark.parametrize("spectral_reg", [0.0, 0.1])
def test_distill_step_is_the_separate_step(digits, teacher, spectral_reg) -> None:
    """Teacher, student and loss in one DistillStep call (what StepGraph captures for a custom loss) take
    the same step as the teacher, student and loss run one after the other."""
    from sttp_compress import compress_module
    from sttp_compress.train.loop import DistillStep, _train_step, build_optimizer

    cfg = FinetuneConfig(device="cpu", lr=1e-2, spectral_reg=spectral_reg,
                         loss_fn=lambda s, t: F.mse_loss(s, t) + (s.softmax(1) - t.softmax(1)).abs().mean())
    a = _student()
    compress_module(a[1], rank=4)
    b = copy.deepcopy(a)
    x, y = next(iter(_loaders(digits)[0]))
    teacher.zero_grad(set_to_none=True)  # (its training left gradients)
    results = []
    for student, pair in ((a, None), (b, DistillStep(b, teacher, cfg))):
        opt = build_optimizer(student, cfg)
        trainable = [p for g in opt.param_groups for p in g["params"]]
        results.append(_train_step(student, teacher, (x, y), opt, trainable, cfg, torch.device("cpu"), False,
                                   pair=pair))
    (loss_a, out_a, labels_a), (loss_b, out_b, labels_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(out_b, out_a)
    assert torch.equal(labels_a, y) and torch.equal(labels_b, y)  # class labels still found (accuracy counts)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, msg=k)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert list(DistillStep(b, teacher, cfg).parameters()) == list(b.parameters())  # the teacher is no input


def test_finetune_progress_goes_to_stderr_only(digits, teacher, capsys) -> None:
    _run(_student(), teacher, digits, steps=3, progress=True, log_every=1)
    assert capsys.readouterr().out == ""


def test_a_logged_finetune_prints_a_line_per_tenth(digits, teacher, capsys) -> None:
    """With stderr in a log (no terminal), progress is a plain line each time another tenth of the steps is done,
    with the loss: a long run under a scheduler shows that it moves; none without progress."""
    _run(_student(), teacher, digits, steps=20, progress=True, log_every=1)
    lines = capsys.readouterr().err.splitlines()
    done = [line for line in lines if line.startswith("fine-tuning: ")]
    assert [line.split(" (")[0] for line in done] == [f"fine-tuning: {2 * k}/20 steps" for k in range(1, 11)]
    assert all(f"({10 * k}%), " in line and ", loss " in line for k, line in zip(range(1, 11), done))
    _run(_student(), teacher, digits, steps=20, progress=False, log_every=1)
    assert "fine-tuning" not in capsys.readouterr().err


def test_finetune_bf16_autocast_on_cpu(digits, teacher) -> None:
    report = _run(_student(), teacher, digits, steps=3, amp="bf16")
    assert report["steps"] == 3 and isinstance(report["curve"][0]["train_loss"], float)


def test_finetune_with_bn_recalibration(digits, teacher) -> None:
    student = _student()
    cfg = FinetuneConfig(steps=3, device="cpu")
    train_loader, val_loader = _loaders(digits)
    report = finetune(student, teacher, train_loader, val_loader, cfg, progress=False, bn_recalibrate=5)
    assert report["steps"] == 3 and student[2].momentum == 0.1


# ---------------------------------------------------------------------------------------------
# recalibrate_batchnorm


def test_recalibrate_batchnorm_matches_data_statistics() -> None:
    torch.manual_seed(0)
    data = torch.randn(400, 3) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([5.0, -1.0, 0.0])
    loader = torch.utils.data.DataLoader(TensorDataset(data), batch_size=50)
    model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(3)).eval()
    bn = model[1]
    used = recalibrate_batchnorm(model, loader, batches=4)
    assert used == 4 and bn.momentum == 0.1 and not model.training
    first = data[:200].reshape(4, 50, 3)  # cumulative average of the first 4 batches' statistics
    assert torch.allclose(bn.running_mean, first.mean(dim=1).mean(dim=0), atol=1e-5)
    assert torch.allclose(bn.running_var, first.var(dim=1, unbiased=True).mean(dim=0), atol=1e-4)
    assert torch.allclose(bn.running_mean, torch.tensor([5.0, -1.0, 0.0]), atol=0.4)
    assert int(bn.num_batches_tracked) == 4


def test_recalibrate_without_batchnorm_is_a_no_op() -> None:
    loader = torch.utils.data.DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    assert recalibrate_batchnorm(nn.Linear(2, 2), loader) == 0


# ---------------------------------------------------------------------------------------------
# example


def test_digits_example_shapes() -> None:
    train_ds, val_ds = digits_data(seed=0)
    assert len(train_ds) + len(val_ds) == 1797 and len(val_ds) == 359
    x, y = train_ds.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4
    model = digits_factory()
    assert isinstance(model, DigitsCNN) and model(x[:2]).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) > 500_000


class _ProgressRecording:
    """An MSE loss with `set_progress` that records each fraction it hears."""

    def __init__(self):
        self.fractions = []

    def set_progress(self, fraction):
        self.fractions.append(fraction)

    def __call__(self, s, t):
        return F.mse_loss(s, t)


def test_a_loss_with_set_progress_hears_each_steps_fraction(digits, teacher) -> None:
    """finetune tells a loss that has `set_progress` the fraction of steps done before each step: 0 first,
    1 at the last (text distillation's layer-wise weight ramps with it)."""

    loss = _ProgressRecording()
    _run(_student(), teacher, digits, steps=5, loss_fn=loss)
    assert loss.fractions == [0.0, 0.25, 0.5, 0.75, 1.0]


class _FakeClock:
    """Steps that take `per_step` seconds each on a clock the budget reads (no real time involved)."""

    def __init__(self, monkeypatch, per_step: float):
        import sttp_compress.train.loop as ft

        self.now, real_step = 0.0, ft._train_step

        def step(*args, **kwargs):
            self.now += per_step
            return real_step(*args, **kwargs)

        real_init = ft._BudgetClock.__init__

        def init(clock, budget):
            real_init(clock, budget)
            clock.t0 = self.now  # the loop's clock starts at the first step

        monkeypatch.setattr(ft, "_train_step", step)
        monkeypatch.setattr(ft._BudgetClock, "__init__", init)
        monkeypatch.setattr(ft._BudgetClock, "elapsed", lambda clock: self.now - clock.t0)


def test_time_budget_ends_the_loop_when_spent_and_the_schedule_follows_the_clock(digits, teacher,
                                                                                   monkeypatch) -> None:
    import sttp_compress.train.loop as ft

    _FakeClock(monkeypatch, per_step=0.1)
    schedulers, real_build = [], ft.build_scheduler
    monkeypatch.setattr(ft, "build_scheduler", lambda *a: schedulers.append(real_build(*a)) or schedulers[-1])

    loss = _ProgressRecording()
    report = _run(_student(), teacher, digits, time_budget=3.0, log_every=5, lr=1e-2, loss_fn=loss)
    # synced every 5 steps at 0.1 s a step: the step that reaches 3.0 s is the last
    assert report["steps"] == 30 and report["time_budget"] == 3.0
    assert report["curve"][-1]["epoch"] == report["epochs"]  # the final validation ran
    f = loss.fractions
    assert len(f) == 30 and f[0] == 0.0 and all(a <= b for a, b in zip(f, f[1:])) and f[-1] == pytest.approx(29 / 30)
    sched = schedulers[0]  # one-cycle over the budget's ticks: at its end when the budget is spent
    assert sched.total_steps == ft.SCHEDULE_TICKS and sched.last_epoch == ft.SCHEDULE_TICKS - 1
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 / 25 / 1e4, rel=1e-3)
    # the clock is read at steps 1, 2, 4, 8, ... too, so a long logging interval does not overrun the budget
    assert _run(_student(), teacher, digits, time_budget=1.0, log_every=1000)["steps"] == 10


def test_time_budget_counts_validation_and_excludes_epochs_and_steps(digits, teacher, monkeypatch) -> None:
    import sttp_compress.train.loop as ft

    clock = _FakeClock(monkeypatch, per_step=0.0)  # only the validations take time: 1 s each
    real_evaluate = ft.evaluate

    def slow_evaluate(*args, **kwargs):
        clock.now += 1.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ft, "evaluate", slow_evaluate)
    steps_per_epoch = len(_loaders(digits)[0])
    report = _run(_student(), teacher, digits, time_budget=2.5, log_every=1000)
    # two epochs' validations leave 0.5 s; the third spends it, so the loop ends in the fourth epoch
    assert 3 * steps_per_epoch < report["steps"] <= 4 * steps_per_epoch
    assert len(report["curve"]) == 4 and report["curve"][-1]["epoch"] == report["epochs"]
    for kwargs, message in (({"steps": 5, "time_budget": 1.0}, "one of epochs, steps and time_budget"),
                            ({"epochs": 1, "time_budget": 1.0}, "one of"),
                            ({"time_budget": 0.0}, "time budget must be positive")):
        with pytest.raises(UserError, match=message):
            FinetuneConfig(**kwargs).validate()
