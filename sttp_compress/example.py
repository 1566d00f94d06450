"""The built-in example: a small CNN on scikit-learn's 8x8 digits, trained in seconds on a CPU."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sttp_compress.errors import UserError

DIGITS_VAL_FRACTION = 0.2


def digits_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """sklearn's bundled digits as (N,1,8,8) float32 normalised by train mean/std, split 80/20 with `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(labels) * DIGITS_VAL_FRACTION)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[val_idx], labels[val_idx])


class DigitsCNN(nn.Module):
    """Conv 1→32→64→(pool)→128, then a 2048→256→10 head: ~620k parameters, dimensions powers of 2."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N,1,8,8) images."""
        return self.classifier(self.features(x))


def digits_factory() -> DigitsCNN:
    """An untrained DigitsCNN, so `sttp_compress.example:digits_factory` can rebuild the architecture."""
    return DigitsCNN()


def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy in [0, 1] of `model` on a whole (small) TensorDataset, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs, labels = data.tensors
        correct = (model(inputs).argmax(dim=1) == labels).sum().item()
    model.train(was_training)
    return correct / len(labels)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads (tiny convolutions only lose time to thread spin-up)."""
    previous = torch.get_num_threads()
    if n is not None and n < previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_digits_model(
    seconds_budget: float = 15.0,
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    threads: int | None = 1,
) -> tuple[DigitsCNN, float]:
    """Train DigitsCNN with Adam (early stop past `seconds_budget`); returns (model, val accuracy in [0, 1]).

    One thread by default: the batches are tiny, and extra threads on a busy CPU make it several times slower.
    Runs under a forked RNG so the caller's random state is untouched.
    """
    if epochs < 1 or batch_size < 1:
        raise UserError(f"the digits example needs epochs >= 1 and batch size >= 1, got {epochs} and {batch_size}")
    train_ds, val_ds = digits_data(seed)
    with torch.random.fork_rng(devices=[]), _torch_threads(threads):
        torch.manual_seed(seed)
        model = DigitsCNN()
        loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
        start = time.perf_counter()
        model.train()
        for _ in range(epochs):
            for inputs, labels in loader:
                loss = F.cross_entropy(model(inputs), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            if time.perf_counter() - start > seconds_budget:
                break
        model.eval()
        return model, _accuracy(model, val_ds)


EXAMPLE_ARCH = "sttp_compress.example:DigitsCNN"


def run_example(job, console=None) -> tuple[dict, dict]:
    """The README's first command: train DigitsCNN, compress it (ratio 10 unless told otherwise),
    fine-tune it briefly with distillation, and write everything into ./sttp-example/.

    The example owns that folder and overwrites its own files on every run.
    """
    from pathlib import Path

    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.io.outputs import atomic_torch_save
    from sttp_compress.pipeline import run_compress

    say = (lambda text: console.print(text, soft_wrap=True)) if console is not None else (lambda text: None)
    folder = Path(job.output).parent if job.output else Path("sttp-example")
    folder.mkdir(parents=True, exist_ok=True)
    say("[bold]sttp-compress example[/]: a small CNN on scikit-learn's 8x8 digits (1,797 images)")
    model, acc = train_digits_model()
    original = folder / "digits.pt"
    atomic_torch_save(model.state_dict(), original, force=True)
    say(f"trained DigitsCNN ({sum(p.numel() for p in model.parameters()):,} parameters): "
        f"{100 * acc:.1f}% validation accuracy; saved {original}")
    job.model, job.module, job.arch = str(original), model, EXAMPLE_ARCH
    job.output = job.output or str(folder / "digits.sttp.safetensors")
    job.report_dir = job.report_dir or str(folder / "digits.sttp.report")
    job.force = True
    if job.ratio is None and job.rank is None:
        job.ratio = 10.0
    job.datasets = digits_data()
    job.input_shape = [1, 8, 8]
    cfg = job.finetune or FinetuneConfig()
    if cfg.epochs is None and cfg.steps is None and cfg.time_budget is None:
        cfg.epochs = 8
    cfg.workers, cfg.batch_size = 0, min(cfg.batch_size, 64)
    cfg.optimizer, cfg.lr = "adamw", cfg.lr or 2e-3
    job.finetune = cfg
    with _torch_threads(1):
        report, extras = run_compress(job)
    val = folder / "digits-val.pt"
    atomic_torch_save({"inputs": job.datasets[1].tensors[0], "targets": job.datasets[1].tensors[1]}, val, force=True)
    if extras is not None:  # the command to try next, shown after the results
        extras["next"] = f"sttp-eval {job.output} --data tensors:{val} --reference {original} --max-size 300kB"
    return report, extras
