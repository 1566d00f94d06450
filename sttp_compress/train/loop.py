"""Brief fine-tuning of a compressed student by distillation from the original (teacher) model."""

from __future__ import annotations

import gc
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from sttp_compress.train import distributed
from sttp_compress.train.bank import WeightBank
from sttp_compress.errors import UserError
from sttp_compress.progress import TenthLines
from sttp_compress.train.freecores import can_release, free_cores, free_frames
from sttp_compress.core.precision import float32_precision
from sttp_compress.core.spectral_tt import is_parametrized
from sttp_compress.train.stepgraph import StepGraph

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "off")
LOSS_KINDS = ("auto", "logits", "mse")
# Per-optimizer defaults: SGD+Nesterov is the usual recipe for CNN fine-tuning; AdamW for everything else.
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.01}
SGD_MOMENTUM = 0.9
ADAM_BETA2 = 0.999  # AdamW's second-moment decay by default (PyTorch's); lower reacts faster to gradient jumps
ONECYCLE_PCT_START = 0.15


# ---------------------------------------------------------------------------------------------
# losses


def distillation_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    targets: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    kind: str = "auto",
) -> Tensor:
    """Hinton distillation: alpha·T²·KL(p_t‖p_s) at temperature T + (1−alpha)·CE on labels; MSE otherwise.

    Defaults T=4 (soft enough to transfer the teacher's dark knowledge on 10–1000 classes) and
    alpha=0.9 (the teacher is the main signal; labels only anchor it). Without targets the KL term
    is used alone (weight alpha·T² dropped to T²). Outputs that are not 2-D float logits, or
    kind="mse", are matched to the teacher with mean squared error. Computed in float32.
    """
    if kind not in LOSS_KINDS:
        raise UserError(f"unknown distillation loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    if temperature <= 0:
        raise UserError(f"distillation temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"distillation alpha must be in [0, 1], got {alpha}")
    if student_out.shape != teacher_out.shape:
        raise UserError(
            f"student output shape {tuple(student_out.shape)} differs from teacher's {tuple(teacher_out.shape)}"
        )
    s, t = student_out.float(), teacher_out.detach().float()
    logits = kind == "logits" or (kind == "auto" and s.dim() == 2 and student_out.is_floating_point())
    if not logits:
        return F.mse_loss(s, t)
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(t / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * temperature**2
    if targets is None:
        return kl
    return alpha * kl + (1.0 - alpha) * F.cross_entropy(s, targets)


def spectral_regularizer(model: nn.Module) -> Tensor:
    """The D-optimal spectral penalty of every compressed layer (0 when there are none)."""
    from sttp_compress.compress.convert import spectral_penalty

    return spectral_penalty(model)


# ---------------------------------------------------------------------------------------------
# configuration and small helpers


@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters; None means the documented default (see `resolved_*` helpers)."""

    epochs: int | None = None
    steps: int | None = None
    time_budget: float | None = None  # seconds of training loop instead of epochs/steps; the schedule follows the clock
    lr: float | None = None
    optimizer: str = "adamw"  # measured: 91.01% vs SGD 90.43% at ratio 10 (benchmarks/results/finetune_cifar10.md)
    weight_decay: float | None = None
    schedule: str = "onecycle"
    temperature: float = 4.0
    alpha: float = 0.9
    spectral_reg: float = 0.0
    device: str = "auto"
    amp: str = "auto"
    batch_size: int = 128
    workers: int = 2
    seed: int = 0
    grad_clip: float | None = 5.0
    adam_beta2: float | None = None  # AdamW's second-moment decay; None: ADAM_BETA2, text.TEXT_ADAM_BETA2 for text
    # learning rate of the compressed layers' spectra and row/column scales, × lr;
    # None: 1, text.TEXT_SPECTRUM_LR_MULT for text
    spectrum_lr_mult: float | None = None
    select_best: bool = True  # keep the best-validation state (False: the final state)
    weight_bank: bool = True  # build all compressed weights together each step (bank.py)
    cuda_graph: bool = True  # on GPUs, replay the bank's build as a CUDA graph (False: no CUDA graphs at all)
    step_graph: bool = True  # ...and in one process the whole training forward+backward (stepgraph.py)
    fused: bool = True  # AdamW's fused kernel when every parameter is on a GPU
    free_cores: bool | None = None  # train the cores as free matrices, the gauge restored after (freecores.py);
    # None: off (images: not measured), text.TEXT_FREE_CORES for text
    tf32: bool | None = None  # float32 matmuls (the weight build's) as TF32 on CUDA; None: when amp is on
    log_every: int = 20
    val_every_epoch: bool = True
    # loss(student_raw_output, teacher_raw_output) replacing distillation_loss; it gets what the models
    # return (e.g. text.HiddenStates dicts), before _primary_output picks the tensor to score
    loss_fn: Callable[[Any, Any], Tensor] | None = None

    def validate(self) -> None:
        """Raise UserError for impossible settings (both epochs and steps, negative counts, unknown names)."""
        if sum(v is not None for v in (self.epochs, self.steps, self.time_budget)) > 1:
            raise UserError("give one of ‹epochs›, ‹steps› and ‹time_budget›, not several")
        if self.time_budget is not None and not self.time_budget > 0:
            raise UserError(f"the time budget must be positive, got {self.time_budget} s")
        if self.epochs is not None and self.epochs < 0:
            raise UserError(f"epochs cannot be negative, got {self.epochs}")
        if self.steps is not None and self.steps < 0:
            raise UserError(f"steps cannot be negative, got {self.steps}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.amp not in AMP_MODES:
            raise UserError(f"unknown amp mode {self.amp!r}; choose one of {', '.join(AMP_MODES)}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"weight decay cannot be negative, got {self.weight_decay}")
        if self.spectral_reg < 0:
            raise UserError(f"spectral regularization weight cannot be negative, got {self.spectral_reg}")
        if self.temperature <= 0:
            raise UserError(f"distillation temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.log_every < 1:
            raise UserError(f"log interval must be at least 1 step, got {self.log_every}")
        if self.adam_beta2 is not None and not 0.0 < self.adam_beta2 < 1.0:
            raise UserError(f"AdamW beta2 must be in (0, 1), got {self.adam_beta2}")
        if self.spectrum_lr_mult is not None and not self.spectrum_lr_mult > 0:
            raise UserError(f"the spectra's learning-rate multiple must be positive, got {self.spectrum_lr_mult}")
        resolve_device(self.device)

    @property
    def resolved_lr(self) -> float:
        """The learning rate in effect: the given one, else 0.01 for SGD and 1e-3 for AdamW."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        """The weight decay in effect: the given one, else 5e-4 for SGD and 0.01 for AdamW."""
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]


def resolve_device(device: str | torch.device) -> torch.device:
    """Map "auto" to CUDA when available, else CPU; raise UserError for an unusable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _amp_enabled(amp: str | bool, device: torch.device) -> bool:
    """Whether to autocast to bfloat16: "auto" means on CUDA only, "bf16" always, "off"/False never."""
    if isinstance(amp, bool):
        return amp
    if amp not in AMP_MODES:
        raise UserError(f"unknown amp mode {amp!r}; choose one of {', '.join(AMP_MODES)}")
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def _autocast(device: torch.device, enabled: bool):
    """A bfloat16 autocast context for `device`, or a no-op."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _primary_output(out: Any) -> Tensor:
    """The tensor to distil from a model output: itself, `.logits`/["logits"], or the first element."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return _primary_output(out[0])
    raise UserError(f"cannot use model output of type {type(out).__name__} (expected a tensor)")


def _split_batch(batch: Any, device: torch.device) -> tuple[Any, Tensor | None]:
    """(inputs, targets or None) moved to `device`; accepts a tensor, (x,), (x, y, ...), or a dict of
    keyword tensors (token batches of hf models; no targets)."""
    non_blocking = device.type == "cuda"
    if isinstance(batch, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}, None
    if isinstance(batch, (tuple, list)):
        inputs = batch[0]
        targets = batch[1] if len(batch) > 1 else None
    else:
        inputs, targets = batch, None
    inputs = inputs.to(device, non_blocking=non_blocking)
    if targets is not None:
        targets = targets.to(device, non_blocking=non_blocking)
    return inputs, targets


def _run(model: nn.Module, inputs: Any) -> Any:
    """model(inputs), or model(**inputs) for a dict of keyword tensors."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _loss(cfg: "FinetuneConfig", s_raw: Any, t_raw: Any, labels: Tensor | None) -> Tensor:
    """cfg.loss_fn on the raw outputs when given, else distillation_loss at cfg's temperature and alpha."""
    if cfg.loss_fn is not None:
        return cfg.loss_fn(s_raw, t_raw)
    return distillation_loss(_primary_output(s_raw), _primary_output(t_raw), labels, cfg.temperature, cfg.alpha)


def _cpu_targets(batch: Any) -> Tensor | None:
    """The batch's targets as the loader produced them (on CPU, so checking them costs no GPU sync)."""
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


def _is_class_labels(out: Tensor, targets: Tensor | None) -> bool:
    """True when `targets` are class indices for 2-D logits `out` (so accuracy and CE make sense)."""
    return (
        targets is not None
        and out.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
        and not targets.is_complex()
    )


def _check_label_range(targets: Tensor | None, num_classes: int) -> None:
    """Raise UserError when class labels fall outside the model's outputs (e.g. a dataset with more classes)."""
    if targets is None or targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise UserError(
            f"the data has class labels {low}..{high} but the model has {num_classes} outputs; "
            "check that the data matches the model"
        )


def _module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# evaluation and BatchNorm recalibration


def evaluate(
    model: nn.Module, loader: Iterable, device: str | torch.device, amp: str | bool = "off",
    reduce: bool = False,
) -> dict[str, float | None]:
    """Top-1 (in [0, 1]), top-5 and mean cross-entropy on labelled data; all None when unlabelled.

    Uses eval mode under torch.no_grad() (not inference_mode: parametrized layers cache weights,
    and inference tensors in that cache would break later training). The training mode is restored.
    With reduce=True (every rank of a torchrun job, each on its shard) the counts are summed over
    ranks, so every rank gets the exact metrics of the whole set.
    """
    device = resolve_device(device)
    use_amp = _amp_enabled(amp, device)
    was_training = model.training
    model.eval()
    seen = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.long, device=device)
    labelled = True
    error: UserError | None = None
    try:
        with torch.no_grad():
            for batch in loader:
                inputs, targets = _split_batch(batch, device)
                with _autocast(device, use_amp):
                    out = _primary_output(_run(model, inputs))
                if not _is_class_labels(out, targets):
                    labelled = False
                    break
                try:
                    _check_label_range(_cpu_targets(batch), out.shape[1])
                except UserError as e:
                    if not reduce:
                        raise
                    error = e
                    break
                out = out.float()
                k = min(5, out.shape[1])
                top = out.topk(k, dim=1).indices
                hits = top == targets[:, None]
                counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
                loss_sum += F.cross_entropy(out, targets, reduction="sum").double()
                seen += len(targets)
    finally:
        model.train(was_training)
    if reduce and distributed.active():
        totals = torch.cat([counts.double(), loss_sum.view(1),
                            torch.tensor([seen, not labelled, error is not None], dtype=torch.float64,
                                         device=device)])
        correct, correct5, loss, seen_all, unlabelled, failed = distributed.all_sum(totals).tolist()
        if failed:
            distributed.raise_agreed(error)
        if unlabelled or seen_all == 0:
            return {"accuracy": None, "top5": None, "loss": None}
        return {"accuracy": correct / seen_all, "top5": correct5 / seen_all, "loss": loss / seen_all}
    if error is not None:
        raise error
    if not labelled or seen == 0:
        return {"accuracy": None, "top5": None, "loss": None}
    correct, correct5 = counts.tolist()
    return {"accuracy": correct / seen, "top5": correct5 / seen, "loss": float(loss_sum) / seen}


def _val_distillation_loss(
    student: nn.Module, teacher: nn.Module, loader: Iterable, device: torch.device, use_amp: bool,
    cfg: FinetuneConfig,
) -> float:
    """Mean distillation loss (no labels) of the student against the teacher on `loader`, in eval mode."""
    was_training = student.training
    student.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                inputs, _ = _split_batch(batch, device)
                with _autocast(device, use_amp):
                    s_raw, t_raw = _run(student, inputs), _run(teacher, inputs)
                s = _primary_output(s_raw)
                batch_n = s.shape[0] if s.dim() else 1
                total += float(_loss(cfg, s_raw, t_raw, None)) * batch_n
                n += batch_n
    finally:
        student.train(was_training)
    if distributed.active():  # the mean over all ranks' shards
        total, n = distributed.all_sum(torch.tensor([total, n], dtype=torch.float64, device=device)).tolist()
    return total / max(n, 1)


def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable, batches: int = 50, device: str | torch.device | None = None
) -> int:
    """Re-estimate BatchNorm running mean/var as a cumulative average over `batches` batches; returns batches used.

    Compression shifts every layer's activations, so the stored statistics are stale; this resets
    them and averages fresh ones (momentum=None), then restores momentum and the training mode.
    """
    if batches <= 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    dev = _module_device(model) if device is None else resolve_device(device)
    used = 0

    def inputs() -> Iterator[Any]:
        nonlocal used
        for batch in itertools.islice(loader, batches):
            used += 1
            yield _split_batch(batch, dev)[0]

    update_bn(inputs(), model)  # resets the statistics, averages them (momentum None), restores mode and momentum
    return used


# ---------------------------------------------------------------------------------------------
# the training loop


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov, momentum 0.9) or AdamW; weight decay only on dense >= 2-D weights.

    Not on biases, norms, spectra, nor on the Householder parameters of compressed layers
    (`parametrizations.*`): their size says nothing about the weight's norm, so decay would only
    pull the frames toward an arbitrary fixed frame. With `cfg.spectrum_lr_mult` != 1 the compressed
    layers' 1-D parameters (spectra, row and column scales) form a third group at that multiple of the lr.
    """
    decay, no_decay, scales = [], [], []
    mult = 1.0 if cfg.spectrum_lr_mult is None else cfg.spectrum_lr_mult
    separate = mult != 1.0
    cores = {id(q) for m in model.modules() for q in (free_frames(m) or ())}  # free cores: frames, no decay either
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if separate and p.dim() == 1 and "parametrizations." in name:
            scales.append(p)
            continue
        skip = p.dim() <= 1 or "spectr" in name.lower() or "parametrizations." in name or id(p) in cores
        (no_decay if skip else decay).append(p)
    if not decay and not no_decay and not scales:
        raise UserError("the student model has no trainable parameters to fine-tune")
    wd = cfg.resolved_weight_decay
    lr = cfg.resolved_lr
    groups = [g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0},
                          {"params": scales, "weight_decay": 0.0, "lr": lr * mult}) if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, nesterov=True)
    # fused: one kernel launch per step instead of per-tensor Python work (a compressed model has
    # hundreds of small frame tensors). Fused updates do not bump version counters; SpectralTT.train()
    # drops its cached weight on every mode switch, so no stale weight survives a step.
    fused = cfg.fused and all(p.is_cuda for g in groups for p in g["params"])
    betas = (0.9, ADAM_BETA2 if cfg.adam_beta2 is None else cfg.adam_beta2)  # beta1: PyTorch's (OneCycleLR cycles it)
    return (torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True) if fused
            else torch.optim.AdamW(groups, lr=lr, betas=betas))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step schedule: OneCycle (15% warm-up, cosine), cosine annealing to 0, or None for constant."""
    if cfg.schedule == "constant" or total_steps < 1:
        return None
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=ONECYCLE_PCT_START,
        anneal_strategy="cos",
    )


def _percent(accuracy: float | None) -> float | None:
    """A [0, 1] accuracy as a percentage rounded to 2 decimals (None stays None)."""
    return None if accuracy is None else round(100.0 * accuracy, 2)


def _epoch_value(steps: int, steps_per_epoch: int) -> int | float:
    """Epochs done as an int when whole, else rounded to 3 decimals (for --steps runs)."""
    value = steps / steps_per_epoch
    return int(value) if value.is_integer() else round(value, 3)


class _Progress:
    """Fine-tuning progress on stderr: a transient rich bar on a terminal; in a log (stderr redirected or piped,
    as under a job scheduler or CI) `progress.TenthLines`, so a long run shows that it moves; nothing at all when
    disabled."""

    def __init__(self, enabled: bool, total: float, unit: str = ""):
        self.bar = None
        self.lines = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            self.lines = TenthLines("fine-tuning", total, unit or "steps", elapsed=True)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("fine-tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("fine-tuning", total=total, info="")

    def update(self, advance: float, info: str | None = None) -> None:
        """Advance the bar and optionally replace its info text (in a log: a line per tenth passed)."""
        if self.bar is not None:
            fields = {} if info is None else {"info": info}
            self.bar.update(self.task, advance=advance, **fields)
        elif self.lines is not None:
            self.lines.advance(advance, info.replace("  ", ", ") if info else "")

    def close(self) -> None:
        """Remove the bar from the terminal."""
        if self.bar is not None:
            self.bar.stop()


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the model's state_dict (to restore the best checkpoint later)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class DistillStep(nn.Module):
    """The teacher's forward, the student's and `cfg.loss_fn` in one call returning (loss, student output):
    what StepGraph captures for a custom loss (text distillation), so that the teacher's forward and the
    loss replay inside the step's CUDA graph instead of being launched op by op from the CPU.

    The teacher is held outside the module tree (its parameters are no inputs of the graph, and
    `train()` leaves it in eval mode). The loss runs without autocast, as in the eager step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: "FinetuneConfig"):
        super().__init__()
        self.student, self.teachers, self.cfg = student, (teacher,), cfg

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        inputs = kwargs if kwargs else args[0]
        with torch.no_grad():
            t_raw = _run(self.teachers[0], inputs)
        s_raw = _run(self.student, inputs)
        with torch.autocast(_primary_output(s_raw).device.type, enabled=False):
            loss = _loss(self.cfg, s_raw, t_raw, None)
            if self.cfg.spectral_reg > 0:
                loss = loss + self.cfg.spectral_reg * spectral_regularizer(self.student).to(loss.device)
        return loss, _primary_output(s_raw).detach()


def _train_step(
    student: nn.Module, teacher: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
    trainable: list[Tensor], cfg: FinetuneConfig, device: torch.device, use_amp: bool,
    check_labels: bool = True, net: nn.Module | None = None, pair: nn.Module | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One distillation step; returns the detached (loss, student output, class labels or None).

    `net` is what runs the student's forward pass (its DistributedDataParallel wrapper under
    torchrun, which all-reduces the gradients in backward); by default the student itself. `pair`,
    when given, runs teacher, student and loss together instead (a DistillStep, usually in a StepGraph;
    cfg.loss_fn must be set: the loss then takes no labels).
    """
    inputs, targets = _split_batch(batch, device)
    if pair is not None:
        with _autocast(device, use_amp):
            loss, s_out = _run(pair, inputs)
    else:
        with torch.no_grad(), _autocast(device, use_amp):
            t_raw = _run(teacher, inputs)
        with _autocast(device, use_amp):
            s_raw = _run(net or student, inputs)
        s_out = _primary_output(s_raw)
    labels = targets if _is_class_labels(s_out, targets) else None
    if labels is not None and check_labels:
        with distributed.agreed():  # a bad label on any rank stops every rank
            _check_label_range(_cpu_targets(batch), s_out.shape[1])
    if pair is None:
        loss = _loss(cfg, s_raw, t_raw, labels)
        if cfg.spectral_reg > 0:
            loss = loss + cfg.spectral_reg * spectral_regularizer(student).to(loss.device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    optimizer.step()
    return loss.detach(), s_out.detach(), labels


SCHEDULE_TICKS = 100_000  # with a time budget the lr schedule runs over this many ticks of the budget


class _BudgetClock:
    """A time-budgeted loop's clock: the budget's spent fraction at a step, from the last reading that
    every rank shares (`sync`: at steps 1, 2, 4, ..., at logging steps and epoch ends) extrapolated at the
    loop's mean time per step so far, so every rank follows the same schedule and stops at the same step
    without a sync per step."""

    def __init__(self, budget: float | None):
        self.budget, self.start = budget, time.perf_counter()
        self.synced_s, self.synced_step, self.per_step = 0.0, 0, 0.0
        self.reported = 0.0

    def elapsed(self) -> float:
        """This process's seconds since the loop began."""
        return time.perf_counter() - self.start

    def sync(self, seconds: float, step: int) -> bool:
        """Take a reading shared by all ranks; True when it says the budget is spent."""
        self.synced_s, self.synced_step = seconds, step
        self.per_step = seconds / max(step, 1)  # captures and validations included, on average
        return seconds >= (self.budget or math.inf)

    def fraction(self, step: int) -> float:
        """The spent fraction of the budget at `step` (at most 1)."""
        if not self.budget:
            return 0.0
        return min((self.synced_s + (step - self.synced_step) * self.per_step) / self.budget, 1.0)

    def advance(self) -> float:
        """Seconds of the budget spent since the last call (the progress bar's advance)."""
        now = min(self.synced_s, self.budget or 0.0)
        step, self.reported = now - self.reported, now
        return step


WARMUP_STEPS = 10  # steps left out of images_per_s (CUDA-graph capture, cuDNN autotuning, allocator growth)


# scaled_dot_product_attention backends of the training steps on CUDA (torch.nn.attention.SDPBackend names);
# math alone was 15% slower for MiniLM's short texts (benchmarks/results/experiments/minilm_recipe.md, third session)
ATTENTION_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _attention_backends(device: torch.device) -> Any:
    """On CUDA, scaled_dot_product_attention limited to ATTENTION_BACKENDS (no cuDNN) for the training steps.

    cuDNN's kernel spent ~1.8 ms of CPU per call (building its plan) when every batch of texts has
    another padded length: 31 ms of a 63 ms MiniLM distillation step on an H200, whose GPU work was
    ~18 ms. Flash and memory-efficient attention have no such per-shape cost. A no-op elsewhere.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return nullcontext()
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([getattr(SDPBackend, name) for name in ATTENTION_BACKENDS])


def _tf32_enabled(tf32: bool | None, device: torch.device, use_amp: bool) -> bool:
    """Whether the training steps' float32 matmuls run as TF32: as asked, else on CUDA under bf16 autocast.

    Under autocast the layers' matmuls already run in bfloat16 (8 mantissa bits); the float32 matmuls left
    are the weight build's (frames from reflectors, the train's contraction), whose weight is then cast to
    bfloat16 for the forward, and any a model runs with autocast turned off inside its forward (those get
    TF32 too; tf32=False keeps them float32). TF32 (10 mantissa bits) in the build costs less precision than
    that cast and made MiniLM's build 1.42x faster on an H200 (benchmarks/results/experiments/minilm_build.md).
    """
    return bool(tf32) if tf32 is not None else (device.type == "cuda" and use_amp)


def _set_epoch(loader: Iterable, epoch: int) -> None:
    """Tell a DistributedSampler (or a loader that reshuffles per epoch) which epoch starts."""
    for obj in (getattr(loader, "sampler", None), loader):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so wall-clock times cover it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wrap_ddp(student: nn.Module, device: torch.device) -> nn.Module:
    """The student under DistributedDataParallel (gradients all-reduced in backward), for training forwards.

    static_graph: every step uses the same parameters in the same order (the weight bank builds all
    compressed weights at the start of the forward), which also tolerates parameters a model never
    uses (e.g. an auxiliary head) without find_unused_parameters' per-step graph walk.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids, output_device=device if ids else None,
                                   static_graph=True)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    cfg: FinetuneConfig,
    progress: bool = True,
    bn_recalibrate: int = 0,
    test_loader: Iterable | None = None,
) -> dict[str, Any]:
    """Distil the teacher into the student, validating each epoch, and keep the best-validation student.

    Returns the report block {"epochs", "steps", "seconds", "device", "processes", "images_per_s", "cuda_graph",
    "original_val_accuracy", "val_accuracy_before", "val_accuracy_after", "chosen_epoch", "curve"} with
    accuracies in percent (None when the validation data is unlabelled or absent). The best state is chosen by val
    accuracy (ties: lower val loss), or by lowest val distillation loss on unlabelled data, among the
    curve's checkpoints and the student before fine-tuning (`chosen_epoch` 0: no checkpoint validated strictly
    better), and loaded back into `student`. Both models are moved to the device; the
    teacher is left in eval mode. "seconds" is wall time including validation; "images_per_s" counts
    training images (all processes) per second of training time after the first WARMUP_STEPS steps;
    `bn_recalibrate` > 0 first re-estimates the student's BatchNorm statistics on that many training
    batches (so "before" already includes it). "cuda_graph" says what ran as CUDA graphs: "step" (the
    whole forward+backward, stepgraph.StepGraph; with a cfg.loss_fn also the teacher's forward and the loss,
    DistillStep), "build" (the weight bank's build), or None.

    Inside a torchrun process group (distributed.setup) this is one rank of a DistributedDataParallel
    job: the loaders must yield this rank's shard (data.make_loaders / DeviceTensorLoader with
    rank/world), cfg.device this rank's device; metrics, losses and the best-state choice are
    reduced over ranks, so every rank returns the same block and ends with the same student.

    With `cfg.free_cores` the compressed layers train free cores (freecores.py) and get their gauge back before
    this returns, however it ends: the student leaves with its non-redundant parameters either way.

    `test_loader` (optional) is only measured, never used to choose: "original_test_accuracy",
    "test_accuracy_before" (after conversion) and "test_accuracy_after" (the chosen state); None without it.
    """
    cfg.validate()
    release = bool(cfg.free_cores) and any(is_parametrized(m) for m in student.modules())
    if release and not can_release(student):
        raise UserError("free cores need the free spectrum on every compressed layer (‹spectrum› free)")
    with free_cores(student, release):
        block = _finetune(student, teacher, train_loader, val_loader, cfg, progress, bn_recalibrate, test_loader)
    block["free_cores"] = release
    return block


def _finetune(student: nn.Module, teacher: nn.Module, train_loader: Iterable, val_loader: Iterable | None,
              cfg: FinetuneConfig, progress: bool, bn_recalibrate: int,
              test_loader: Iterable | None = None) -> dict[str, Any]:
    """`finetune`'s body (the same arguments), on a student whose cores are free or not."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    use_amp = _amp_enabled(cfg.amp, device)
    multi, world = distributed.active(), distributed.world() if distributed.active() else 1
    torch.manual_seed(cfg.seed + distributed.rank())  # dropout etc. differ by rank; the data decides the rest
    bank = _prepare(student, teacher, train_loader, cfg, device, bn_recalibrate)
    steps_per_epoch = _steps_per_epoch(train_loader)
    budget, total_steps = cfg.time_budget, _total_steps(cfg, steps_per_epoch)

    validate = _Validator(student, teacher, val_loader, cfg, device, use_amp, multi)
    original, (before, before_key) = validate.teacher_accuracy(), validate()
    test = _Validator(student, teacher, test_loader, cfg, device, use_amp, multi)  # reported, never chosen on
    test_original, (test_before, _) = test.teacher_accuracy(), test()
    optimizer = build_optimizer(student, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps if budget is None else SCHEDULE_TICKS)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    bar = _Progress(progress and distributed.is_main(), total_steps if budget is None else budget,
                    "" if budget is None else "s")
    tf32 = _tf32_enabled(cfg.tf32, device, use_amp)
    curve = _Curve(before, before_key, student if cfg.select_best else None)
    meter = _Meter(device, world, warmup=min(WARMUP_STEPS, total_steps // 4))
    set_progress = getattr(cfg.loss_fn, "set_progress", None)  # a loss whose weights follow the steps
    step = epoch = 0
    with _fast_path(student, teacher, cfg, device, bank, multi, total_steps, tf32) as (net, pair), \
            _closing(bar), _attached(bank):
        clock = _BudgetClock(budget)
        meter.begin()
        while step < total_steps:
            _set_epoch(train_loader, epoch)
            for batch in train_loader:
                if set_progress is not None:
                    set_progress(step / max(total_steps - 1, 1) if budget is None else clock.fraction(step))
                loss, s_out, labels = _train_step(student, teacher, batch, optimizer, trainable, cfg, device,
                                                  use_amp, check_labels=step == 0, net=net, pair=pair)
                step += 1
                total_steps = _advance_schedule(scheduler, clock, step, total_steps)
                meter.add(loss, s_out, labels, step)
                epoch_end = step % steps_per_epoch == 0
                early = budget is not None and step & (step - 1) == 0  # the clock's first readings: steps 1, 2, 4...
                if step % cfg.log_every == 0 or epoch_end or step == total_steps or early:
                    total_steps = meter.log(bar, clock, step, total_steps)
                if epoch_end:
                    meter.new_epoch()
                if (epoch_end and cfg.val_every_epoch) or step == total_steps:
                    meter.stop_clock()
                    curve.checkpoint(student, validate, meter, _epoch_value(step, steps_per_epoch))
                    net.train()
                    meter.resume(step, total_steps)
                if step >= total_steps:
                    break
            epoch += 1
        graphs = ("step" if isinstance(net, StepGraph) and net.graphs
                  else "build" if bank is not None and bank.cuda_graph and device.type == "cuda" else None)
    meter.stop_clock()
    del net, pair  # the DistributedDataParallel wrapper (its hooks and buckets) or the step graphs are done
    if device.type == "cuda":
        gc.collect()  # CUDA graphs sit in reference cycles: free their memory now, not at some later collection
    distributed.debug_dump_state(student, "trained")  # the last state, before the best-state choice (tests)
    after = curve.select(student) if cfg.select_best else curve.last_metrics
    test_after = test()[0]
    return {
        "epochs": _epoch_value(step, steps_per_epoch),
        "steps": step,
        "time_budget": budget,
        "seconds": round(time.perf_counter() - start, 2),
        "device": str(device),
        "processes": world,
        "images_per_s": meter.images_per_s(),
        "cuda_graph": graphs,
        "tf32": tf32,
        "original_val_accuracy": _percent(original),
        "val_accuracy_before": _percent(before["accuracy"]),
        "val_accuracy_after": _percent(after["accuracy"]),
        "original_test_accuracy": _percent(test_original),
        "test_accuracy_before": _percent(test_before["accuracy"]),
        "test_accuracy_after": _percent(test_after["accuracy"]),
        "chosen_epoch": curve.chosen_epoch(cfg.select_best, _epoch_value(step, steps_per_epoch)),
        "curve": curve.points,
    }


def _prepare(student: nn.Module, teacher: nn.Module, train_loader: Iterable, cfg: FinetuneConfig,
             device: torch.device, bn_recalibrate: int) -> WeightBank | None:
    """Both models on the device (every rank starting from rank 0's student), the weight bank that builds all
    compressed weights together (None without compressed layers), BatchNorm statistics re-estimated if asked."""
    student.to(device)
    teacher.to(device).eval()
    distributed.broadcast_state(student)
    bank = None
    if cfg.weight_bank and any(is_parametrized(m) for m in student.modules()):
        bank = WeightBank(student, cuda_graph=device.type == "cuda" and cfg.cuda_graph)
    if bn_recalibrate > 0:
        recalibrate_batchnorm(student, train_loader, bn_recalibrate, device)
        distributed.average_buffers(student)  # statistics of every rank's batches
    return bank


def _steps_per_epoch(train_loader: Iterable) -> int:
    """Batches per epoch, the same on every rank, and at least one."""
    steps = len(train_loader)  # type: ignore[arg-type]
    distributed.check_equal(steps, "the number of training batches per epoch")
    if steps == 0:
        raise UserError("the training data yields no batches (fewer samples than the batch size?)")
    return steps


def _total_steps(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    """Steps to run: cfg.steps, or cfg.epochs (default 1) of batches; unbounded with a time budget (the
    budget's clock sets the last step)."""
    if cfg.time_budget is not None:
        return sys.maxsize
    if cfg.steps is not None:
        return cfg.steps
    return round((1 if cfg.epochs is None else cfg.epochs) * steps_per_epoch)


def _advance_schedule(scheduler: Any, clock: _BudgetClock, step: int, total_steps: int) -> int:
    """Step the lr schedule after a training step; returns the total steps (the last one once a time budget
    is spent). With a budget the schedule's position is the fraction of the budget spent."""
    if clock.budget is None:
        if scheduler is not None:
            scheduler.step()
        return total_steps
    spent = clock.fraction(step)
    if spent >= 1.0:
        total_steps = step  # the budget is spent by the synced clock's extrapolation
    if scheduler is not None:
        target = min(int(spent * SCHEDULE_TICKS), SCHEDULE_TICKS - 1)
        while scheduler.last_epoch < target:
            scheduler.step()
    return total_steps


class _Validator:
    """The student's validation metrics and a sort key where larger is better (None without val data): val
    accuracy (ties: lower loss), or the distillation loss on unlabelled data; reduced over ranks."""

    def __init__(self, student: nn.Module, teacher: nn.Module, val_loader: Iterable | None, cfg: FinetuneConfig,
                 device: torch.device, use_amp: bool, multi: bool):
        self.student, self.teacher, self.val_loader, self.cfg = student, teacher, val_loader, cfg
        self.device, self.use_amp, self.multi = device, use_amp, multi

    def teacher_accuracy(self) -> float | None:
        if self.val_loader is None:
            return None
        return evaluate(self.teacher, self.val_loader, self.device, self.use_amp, reduce=self.multi)["accuracy"]

    def __call__(self) -> tuple[dict[str, float | None], tuple[float, ...] | None]:
        if self.val_loader is None:
            return {"accuracy": None, "top5": None, "loss": None}, None
        distributed.broadcast_state(self.student, buffers_only=True)  # every shard sees rank 0's BatchNorm stats
        metrics = evaluate(self.student, self.val_loader, self.device, self.use_amp, reduce=self.multi)
        if metrics["accuracy"] is not None:
            return metrics, (metrics["accuracy"], -metrics["loss"])
        return metrics, (-_val_distillation_loss(self.student, self.teacher, self.val_loader, self.device,
                                                 self.use_amp, self.cfg),)


class _Curve:
    """The validation curve and the best state among its points.

    Given the student before fine-tuning (and its validation key), that state is the first candidate (epoch 0):
    a fine-tune that validates no better than the converted model gives the converted model back, not a worse
    one (a short fine-tune at the default learning rate can end below where it started)."""

    def __init__(self, before: dict[str, float | None], before_key: tuple[float, ...] | None = None,
                 student: nn.Module | None = None):
        self.points: list[dict[str, Any]] = []
        self.best_key: tuple[float, ...] | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.best_metrics = self.last_metrics = before
        self.best_epoch: int | float | None = None
        if student is not None and before_key is not None:
            self.best_key, self.best_state, self.best_epoch = before_key, _cpu_state(student), 0

    def checkpoint(self, student: nn.Module, validate: _Validator, meter: _Meter, epoch: int | float) -> None:
        """Validate, append a point for the steps since the last one, and remember the best state."""
        metrics, key = validate()
        self.last_metrics = metrics
        self.points.append({
            "epoch": epoch,
            "train_loss": meter.take_segment(),
            "val_loss": None if key is None else -key[-1],  # CE with labels, else the distillation loss
            "val_accuracy": _percent(metrics["accuracy"]),
        })
        if key is not None and (self.best_key is None or key > self.best_key):
            self.best_key, self.best_state, self.best_metrics = key, _cpu_state(student), metrics
            self.best_epoch = epoch

    def chosen_epoch(self, select_best: bool, last: int | float) -> int | float:
        """The epoch whose state the student ends with: the best one's (0: before fine-tuning), else the last."""
        return self.best_epoch if select_best and self.best_state is not None else last

    def select(self, student: nn.Module) -> dict[str, float | None]:
        """Load the best state into the student (if any point had one); returns its metrics."""
        if self.best_state is None:
            return self.last_metrics
        student.load_state_dict(self.best_state)
        return self.best_metrics


class _Meter:
    """The loop's running numbers: the loss and accuracy since the last log line or validation, samples per
    second for the progress line, and training throughput timed after the warm-up steps (validation and the
    graph captures of the first steps left out)."""

    def __init__(self, device: torch.device, world: int, warmup: int):
        self.device, self.world, self.warmup = device, world, warmup
        self.seg_steps, self.seg_loss = 0, torch.zeros((), dtype=torch.float64, device=device)
        self.run_correct, self.labelled_seen = torch.zeros((), dtype=torch.long, device=device), 0
        self.samples = self.pending = 0
        self.timed_images, self.timed_s, self.clock = 0, 0.0, None
        self.tick = time.perf_counter()

    def begin(self) -> None:
        self.tick = time.perf_counter()
        if self.warmup == 0:
            self.start_clock()

    def start_clock(self) -> None:
        _synchronize(self.device)
        self.clock = time.perf_counter()

    def stop_clock(self) -> None:
        if self.clock is not None:
            _synchronize(self.device)
            self.timed_s += time.perf_counter() - self.clock
            self.clock = None

    def resume(self, step: int, total_steps: int) -> None:
        """After a validation: the progress line's rate and the throughput clock count training only."""
        self.tick = time.perf_counter()
        if self.warmup <= step < total_steps:
            self.start_clock()

    def add(self, loss: Tensor, s_out: Tensor, labels: Tensor | None, step: int) -> None:
        """Count one training step (the batch over all ranks)."""
        self.seg_steps += 1
        self.pending += 1
        self.seg_loss += loss.double()
        batch_n = (s_out.shape[0] if s_out.dim() else 1) * self.world
        self.samples += batch_n
        if step > self.warmup:
            self.timed_images += batch_n
        elif step == self.warmup:
            self.start_clock()
        if labels is not None:
            self.run_correct += (s_out.argmax(dim=1) == labels).sum()
            self.labelled_seen += batch_n

    def new_epoch(self) -> None:
        self.run_correct.zero_()
        self.labelled_seen = 0

    def reduced(self, *values: Tensor | float) -> list[float]:
        """Sums over ranks of a few numbers (this rank's alone in a single process)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        return distributed.all_sum(t).tolist()

    def log(self, bar: _Progress, clock: _BudgetClock, step: int, total_steps: int) -> int:
        """Update the progress line with numbers every rank shares (and, with a budget, read the shared clock:
        returns the total steps, the last one once it is spent); a non-finite loss stops every rank."""
        loss_sum, correct, elapsed = self.reduced(self.seg_loss, self.run_correct, clock.elapsed())
        if clock.budget is not None and clock.sync(elapsed / self.world, step):
            total_steps = step
        mean_loss = loss_sum / self.world / self.seg_steps
        if not math.isfinite(mean_loss):
            raise distributed.SharedUserError(f"fine-tuning diverged (loss {mean_loss}) at step {step}; try a lower ‹lr›")
        now = time.perf_counter()
        info = f"loss {mean_loss:.4f}  {self.samples / max(now - self.tick, 1e-9):,.0f} img/s"
        if self.labelled_seen:
            info += f"  acc {100.0 * correct / self.labelled_seen:.1f}%"
        bar.update(self.pending if clock.budget is None else clock.advance(), info)
        self.pending, self.samples, self.tick = 0, 0, now
        return total_steps

    def take_segment(self) -> float:
        """The mean training loss (over ranks) since the last validation, and a fresh segment."""
        loss_sum, = self.reduced(self.seg_loss)
        mean = loss_sum / self.world / max(self.seg_steps, 1)
        self.seg_steps, self.seg_loss = 0, torch.zeros_like(self.seg_loss)
        return mean

    def images_per_s(self) -> float | None:
        return round(self.timed_images / self.timed_s, 1) if self.timed_s > 0 and self.timed_images else None


@contextmanager
def _fast_path(student: nn.Module, teacher: nn.Module, cfg: FinetuneConfig, device: torch.device,
               bank: WeightBank | None, multi: bool, total_steps: int, tf32: bool
               ) -> Iterator[tuple[nn.Module, nn.Module | None]]:
    """(net, pair) for `_train_step` while the loop runs, in training mode: the student, its
    DistributedDataParallel wrapper under torchrun, or the whole step as CUDA graphs on one GPU (`pair`:
    teacher, student and a custom loss in one graph); with the attention backends and TF32 setting of the
    training steps (graphs bake them in)."""
    with ExitStack() as contexts:
        contexts.enter_context(_attention_backends(device))
        if device.type == "cuda":  # cuBLAS's setting (through the legacy API it would reach the CPU's oneDNN too)
            contexts.enter_context(float32_precision(matmul="tf32" if tf32 else "ieee"))
        net: nn.Module = student
        pair: nn.Module | None = None
        if multi and total_steps > 0:
            if bank is not None:
                bank.prepare()  # capture the build's CUDA graph now, outside DistributedDataParallel's first forward
            net = _wrap_ddp(student, device)
        elif device.type == "cuda" and cfg.cuda_graph and cfg.step_graph:
            if cfg.loss_fn is not None:
                net = pair = StepGraph(DistillStep(student, teacher, cfg), bank=bank)
            else:
                net = StepGraph(student, bank=bank)  # the whole forward+backward as a graph (the build inside it)
        net.train()
        yield net, pair


@contextmanager
def _closing(bar: _Progress) -> Iterator[None]:
    try:
        yield
    finally:
        bar.close()


@contextmanager
def _attached(bank: WeightBank | None) -> Iterator[None]:
    """The weight bank serves the compressed weights while the loop runs, however it ends."""
    if bank is not None:
        bank.attach()
    try:
        yield
    finally:
        if bank is not None:
            bank.detach()
