"""Data loading for fine-tuning: image folders, saved tensors, and seeded DataLoaders."""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from sttp_compress.errors import UserError

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)
SMALL_IMAGE_MAX = 64  # images at most this many pixels a side keep their size and get CIFAR-style crops
DEFAULT_LARGE_SIZE = 224  # larger images are trained at the ImageNet resolution
AUGMENTS = ("auto", "small", "imagenet", "none")
TENSOR_VAL_FRACTION = 0.1
TENSOR_SPLIT_SEED = 0
# without a validation folder, the best state is chosen on this share of the training images (at most
# HOLDOUT_MAX), the same images of every class share on every run; test/ is then only reported
HOLDOUT_FRACTION, HOLDOUT_MAX, HOLDOUT_SEED = 0.1, 5000, 0


class ImageSplits(NamedTuple):
    """The image folders of a run: train/, the validation folder (val/ or ‹val_data›) if any, and test/
    (reported only, never used to choose a model) if any."""

    train: Path
    val: Path | None
    test: Path | None = None


class ImageDatasets(NamedTuple):
    """Datasets of a run and where validation came from (the report's finetune.validation)."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    validation: dict


@dataclass
class ImageDataConfig:
    """How images are sized, augmented and normalised; None fields are filled in by `resolve_image_config`."""

    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: str = "auto"


def _is_image(name: str) -> bool:
    """True for file names torchvision's ImageFolder would load."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _iter_images(folder: Path) -> Iterator[Path]:
    """Yield image files under `folder`'s class subfolders, lazily, in sorted order (ImageFolder's layout)."""
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
            for name in sorted(names):
                if _is_image(name):
                    yield Path(root) / name


def _first_image(folder: Path) -> Path | None:
    """The first image ImageFolder would see in `folder`, or None when it holds none."""
    return next(_iter_images(folder), None)


def _check_image_folder(folder: Path, role: str) -> Path:
    """Return `folder` if it is a directory with images in class subfolders, else raise a one-line UserError."""
    if not folder.exists():
        raise UserError(f"{role} folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{role} path is not a folder: {folder}")
    if _first_image(folder) is None:
        raise UserError(
            f"no images found in {role} folder {folder} "
            f"(expected {folder}/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return folder


def image_folder_splits(
    data: str | os.PathLike | None, train_data: str | os.PathLike | None, val_data: str | os.PathLike | None
) -> ImageSplits:
    """Resolve --data DIR (train/, optional val/ and test/) or --train-data/--val-data into checked folders.
    test/ is never the validation folder: choosing the best state on it would report a selected number."""
    if data is not None and (train_data is not None or val_data is not None):
        raise UserError("give either ‹data› or ‹train_data›/‹val_data›, not both")
    if data is not None:
        root = Path(data).expanduser()
        if not root.exists():
            raise UserError(f"data folder not found: {root}")
        if not root.is_dir():
            raise UserError(f"data path is not a folder: {root}")
        if not (root / "train").is_dir():
            raise UserError(f"data folder {root} has no train/ subfolder")
        train = _check_image_folder(root / "train", "training")
        val = _check_image_folder(root / "val", "validation") if (root / "val").is_dir() else None
        test = _check_image_folder(root / "test", "test") if (root / "test").is_dir() else None
        return ImageSplits(train, val, test)
    if train_data is None:
        if val_data is not None:
            raise UserError("‹val_data› needs ‹train_data› as well")
        raise UserError("no data given: pass ‹data› DIR or ‹train_data› DIR")
    train = _check_image_folder(Path(train_data).expanduser(), "training")
    val = None if val_data is None else _check_image_folder(Path(val_data).expanduser(), "validation")
    return ImageSplits(train, val)


def resolve_image_config(cfg: ImageDataConfig, train_dir: str | Path) -> ImageDataConfig:
    """Fill in defaults: ImageNet mean/std, image size from the first training image (<= 64 px kept, else 224)."""
    if cfg.augment not in AUGMENTS:
        raise UserError(f"unknown augmentation {cfg.augment!r}; choose one of {', '.join(AUGMENTS)}")
    mean = tuple(float(v) for v in (cfg.mean if cfg.mean is not None else IMAGENET_MEAN))
    std = tuple(float(v) for v in (cfg.std if cfg.std is not None else IMAGENET_STD))
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise UserError(f"mean and std need 1 or 3 values each, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise UserError(f"std values must be positive, got {std}")
    size = cfg.image_size
    if size is None:
        first = _first_image(Path(train_dir))
        if first is None:
            raise UserError(f"no images found in training folder {train_dir}")
        try:
            with Image.open(first) as img:
                width, height = img.size
        except OSError as exc:
            raise UserError(f"cannot read image {first}: {exc}") from None
        size = min(width, height) if max(width, height) <= SMALL_IMAGE_MAX else DEFAULT_LARGE_SIZE
    if size < 1:
        raise UserError(f"image size must be a positive number of pixels, got {size}")
    return replace(cfg, image_size=int(size), mean=mean, std=std)


def _effective_augment(cfg: ImageDataConfig) -> str:
    """Map "auto" to "small" for images <= 64 px and to "imagenet" otherwise."""
    if cfg.augment != "auto":
        return cfg.augment
    assert cfg.image_size is not None
    return "small" if cfg.image_size <= SMALL_IMAGE_MAX else "imagenet"


def image_transforms(cfg: ImageDataConfig) -> tuple[T.Compose, T.Compose]:
    """Build (train_transform, val_transform) for a resolved config; crops keep batches rectangular."""
    size = cfg.image_size
    assert size is not None and cfg.mean is not None and cfg.std is not None, "resolve the config first"
    tail = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    augment = _effective_augment(cfg)
    if augment == "small":
        train = [T.Resize(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    elif augment == "imagenet":
        train = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:  # "none": resize only
        train = [T.Resize(size), T.CenterCrop(size)]
    if size > SMALL_IMAGE_MAX:
        val = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    else:  # small images are evaluated as they are (Resize/CenterCrop are no-ops at the native size)
        val = [T.Resize(size), T.CenterCrop(size)]
    return T.Compose(train + tail), T.Compose(val + tail)


def rgb_loader(path: str) -> Image.Image:
    """Decode one image with PIL into RGB; a module-level function so worker processes can pickle it.
    A file that does not decode is a UserError naming it."""
    try:
        with open(path, "rb") as handle:
            img = Image.open(handle)
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None


class _ImageFolder(ImageFolder):
    """ImageFolder that can reuse the training set's class-to-index mapping (so val labels line up)."""

    def __init__(self, root: str, class_to_idx: dict[str, int] | None = None, **kwargs):
        self._given_classes = class_to_idx
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The folder's own classes, or the given mapping when every class folder appears in it."""
        classes, mapping = super().find_classes(directory)
        given = self._given_classes
        if given is None:
            return classes, mapping
        unknown = sorted(set(classes) - set(given))
        if unknown:
            raise UserError(
                f"folder {directory} has classes not in the training folder: {', '.join(unknown[:5])}"
            )
        return sorted(given, key=given.__getitem__), dict(given)


def _make_image_folder(root: Path, transform, class_to_idx: dict[str, int] | None = None) -> ImageFolder:
    """Create an ImageFolder (RGB, empty classes allowed) turning torchvision's errors into UserError."""
    try:
        return _ImageFolder(
            str(root), class_to_idx=class_to_idx, transform=transform, loader=rgb_loader, allow_empty=True
        )
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"cannot read image folder {root}: {str(exc).splitlines()[0]}") from None


def build_image_datasets(
    train_dir: str | Path, val_dir: str | Path | None, cfg: ImageDataConfig
) -> tuple[Dataset, Dataset | None]:
    """ImageFolder train/val datasets with augmentation for training; val shares the train class indices."""
    cfg = resolve_image_config(cfg, train_dir)
    train_tf, val_tf = image_transforms(cfg)
    train_ds = _make_image_folder(Path(train_dir), train_tf)
    if len(train_ds) == 0:
        raise UserError(f"no images found in training folder {train_dir}")
    val_ds = None
    if val_dir is not None:
        val_ds = _make_image_folder(Path(val_dir), val_tf, class_to_idx=train_ds.class_to_idx)
        if len(val_ds) == 0:
            raise UserError(f"no images found in validation folder {val_dir}")
    return train_ds, val_ds


def holdout_indices(labels: Tensor, fraction: float = HOLDOUT_FRACTION, max_count: int = HOLDOUT_MAX,
                    seed: int = HOLDOUT_SEED) -> tuple[Tensor, Tensor]:
    """(kept, held out) indices: floor(share * count) random images of every class, share = fraction capped
    so that at most max_count are held out; the same for a given labels tensor and seed."""
    n = len(labels)
    share = min(fraction, max_count / max(n, 1))
    key = labels.double() + torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = torch.argsort(key)  # grouped by class, random within a class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - starts[labels[order]]
    held = rank_in_class < torch.floor(counts.double() * share).long()[labels[order]]
    return order[~held].sort().values, order[held].sort().values


def build_image_splits(splits: ImageSplits, cfg: ImageDataConfig) -> ImageDatasets:
    """The datasets of a run: validation from the validation folder, else held out of train/
    (`holdout_indices`, un-augmented); test/ (if any) un-augmented, for the report only."""
    cfg = resolve_image_config(cfg, splits.train)
    if splits.val is not None:
        train_ds, val_ds = build_image_datasets(splits.train, splits.val, cfg)
        validation = {"source": str(splits.val), "images": len(val_ds)}
    else:
        train_ds, _ = build_image_datasets(splits.train, None, cfg)
        kept, held = holdout_indices(torch.tensor(train_ds.targets))
        if len(held) == 0:  # too few images of every class to hold any out
            val_ds, validation = None, {"source": None, "images": 0, "of": len(train_ds)}
        else:
            plain = _make_image_folder(splits.train, image_transforms(cfg)[1])
            train_ds, val_ds = Subset(train_ds, kept.tolist()), Subset(plain, held.tolist())
            validation = {"source": f"held out of {splits.train}", "images": len(held), "of": len(kept) + len(held),
                          "seed": HOLDOUT_SEED, "per_class": True}
    test_ds = None
    if splits.test is not None:
        test_ds = _make_image_folder(splits.test, image_transforms(cfg)[1],
                                     class_to_idx=_class_to_idx(train_ds))
    return ImageDatasets(train_ds, val_ds, test_ds, validation)


def _class_to_idx(ds: Dataset) -> dict[str, int]:
    return (ds.dataset if isinstance(ds, Subset) else ds).class_to_idx


def load_tensor_data(path: str | os.PathLike) -> tuple[TensorDataset, TensorDataset]:
    """Load a saved dict {"inputs", optional "targets"} (`tensors:FILE.pt`) and split it 90/10 with a fixed seed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tensor data file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, disallowed globals
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load tensor data {path}: {reason}") from None
    if not isinstance(blob, dict):
        raise UserError(
            f"tensor data {path} must hold a dict with 'inputs' (and optional 'targets'), "
            f"got {type(blob).__name__}"
        )
    inputs = blob.get("inputs")
    if not isinstance(inputs, torch.Tensor):
        raise UserError(f"tensor data {path} has no 'inputs' tensor")
    if inputs.dim() == 0:
        raise UserError(f"'inputs' in {path} must have a batch dimension, got a scalar")
    targets = blob.get("targets")
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
            raise UserError(f"'targets' in {path} must be a tensor with a batch dimension")
        if len(targets) != len(inputs):
            raise UserError(f"tensor data {path}: {len(inputs)} inputs but {len(targets)} targets")
    n = len(inputs)
    if n < 2:
        raise UserError(f"tensor data {path} needs at least 2 samples to split into train and val, got {n}")
    n_val = max(1, round(n * TENSOR_VAL_FRACTION))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TENSOR_SPLIT_SEED))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    tensors = (inputs,) if targets is None else (inputs, targets)
    return (
        TensorDataset(*(t[train_idx] for t in tensors)),
        TensorDataset(*(t[val_idx] for t in tensors)),
    )


def _is_cuda(device: str | torch.device) -> bool:
    """True when `device` ("auto", "cuda", "cuda:1", a torch.device) means a CUDA device."""
    if str(device) == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)  # an exit code the main process does not report as a failed worker


def init_worker(worker_id: int) -> None:
    """A loader worker's setup: Python's and NumPy's RNGs seeded from torch's per-worker seed (fixed by the generator),
    Ctrl-C left to the main process, and SIGTERM a quiet exit. A signal sent to the whole process group (a terminal's
    Ctrl-C, `timeout`, a job scheduler) killed the workers first, and the run ended in their tracebacks or in the loader's
    'worker is killed by signal' error instead of the CLI's one line. SIGTERM still ends a worker: it is also how
    multiprocessing stops workers left at exit (ignored, the interpreter waited for them forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for torch
        pass


LENGTH_GROUP = 64  # length-grouped batches: sort by length within windows of this many batches


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Shuffled sample order whose consecutive runs of `batch_size` have similar lengths (less padding).

    Each epoch: a seeded permutation, cut into windows of `group` global batches, each window sorted
    by length and cut into batches, the full batches shuffled (the ragged tail, if any and if there is
    at least one full batch, is dropped). With `world` > 1 every global batch is split into `world`
    contiguous shards and this rank yields its shard of each, so all ranks take the same number of
    steps on texts of similar length. The order depends only on (seed, epoch): call `set_epoch`.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 group: int = LENGTH_GROUP):
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.local = per_rank_batch(batch_size, world)
        self.group = max(1, group)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[Tensor]:
        """This epoch's global batches (index tensors), in training order."""
        n, b = len(self.lengths), self.batch_size
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g)
        window = b * self.group
        batches = []
        for start in range(0, n, window):
            chunk = order[start:start + window]
            # stable sort keeps the random order among equal lengths
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            batches += list(chunk.split(b))
        full = [x for x in batches if len(x) == b]
        if not full:  # fewer samples than one batch: one short batch rather than none
            return batches
        return [full[i] for i in torch.randperm(len(full), generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        for batch in self._batches():
            shard = len(batch) // self.world  # a short only batch is shared evenly too
            yield from batch[self.rank * shard:(self.rank + 1) * shard].tolist()

    def __len__(self) -> int:
        n, b = len(self.lengths), self.batch_size
        return self.local * (n // b) if n >= b else n // self.world


class ShardSampler(torch.utils.data.Sampler[int]):
    """Indices rank, rank+world, ... of a dataset: a split without the duplicates DistributedSampler pads with.

    For validation: the shards cover every sample exactly once, so sums reduced across ranks
    give the exact accuracy of the whole set.
    """

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def make_loaders(
    train_ds: Dataset,
    val_ds: Dataset | None,
    batch_size: int,
    workers: int,
    seed: int,
    device: str | torch.device,
    rank: int = 0,
    world: int = 1,
    group_by_length: bool = True,
    length_group: int = LENGTH_GROUP,
) -> tuple[DataLoader, DataLoader | None]:
    """Seeded, shuffled train loader (drop_last) and ordered val loader; pinned memory on CUDA.

    A training set with a `lengths()` method (text.TokenizedTexts) is batched by LengthGroupedSampler
    unless `group_by_length` is False: random batches of short texts pad to their longest member.
    `length_group` is its window in batches (fewer: batches more mixed in length, more padding).

    With world > 1 (one process of a torchrun job) `batch_size` is the global batch: this rank
    loads batch_size / world samples per step, the training set sharded by a DistributedSampler or
    LengthGroupedSampler (every rank draws the same number of batches; call `sampler.set_epoch` each
    epoch) and the validation set by `ShardSampler` (every sample exactly once over all ranks).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"number of workers cannot be negative, got {workers}")
    if len(train_ds) == 0:
        raise UserError("the training data is empty")
    local_batch = per_rank_batch(batch_size, world)
    common = dict(
        batch_size=local_batch,
        num_workers=workers,
        pin_memory=_is_cuda(device),
        persistent_workers=workers > 0,
        worker_init_fn=init_worker if workers > 0 else None,
        collate_fn=getattr(train_ds, "collate_fn", None),  # e.g. text.TokenizedTexts pads token batches
    )
    if world > 1 and len(train_ds) < world:
        raise UserError(f"the training data has {len(train_ds)} samples, fewer than the {world} processes")
    lengths = getattr(train_ds, "lengths", None) if group_by_length else None
    generator = torch.Generator().manual_seed(seed + rank)  # worker seeds: augmentations differ by rank
    if lengths is not None:
        sampler = LengthGroupedSampler(lengths(), batch_size, seed, rank, world, length_group)
        train_loader = DataLoader(train_ds, sampler=sampler, drop_last=False, generator=generator, **common)
    elif world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        train_loader = DataLoader(train_ds, sampler=sampler, drop_last=len(sampler) >= local_batch,
                                  generator=generator, **common)
    else:
        # Dropping the ragged last batch keeps BatchNorm statistics sane, but never drop the only batch.
        train_loader = DataLoader(train_ds, shuffle=True, drop_last=len(train_ds) >= batch_size,
                                  generator=generator, **common)
    return train_loader, None if val_ds is None else eval_loader(val_ds, batch_size, workers, device, rank, world)


def eval_loader(ds: Dataset, batch_size: int, workers: int, device: str | torch.device, rank: int = 0,
                world: int = 1) -> DataLoader:
    """An ordered loader for evaluation (validation or test); with world > 1 this rank's `ShardSampler` shard,
    every sample exactly once over all ranks."""
    common = dict(batch_size=per_rank_batch(batch_size, world), num_workers=workers, pin_memory=_is_cuda(device),
                  persistent_workers=workers > 0, worker_init_fn=init_worker if workers > 0 else None,
                  collate_fn=getattr(ds, "collate_fn", None))
    if world > 1:
        return DataLoader(ds, sampler=ShardSampler(len(ds), rank, world), drop_last=False, **common)
    return DataLoader(ds, shuffle=False, drop_last=False, **common)


def per_rank_batch(batch_size: int, world: int) -> int:
    """The batch each of `world` processes loads for a global `batch_size`; UserError unless it divides."""
    if batch_size % world:
        raise UserError(f"‹batch_size› {batch_size} is the global batch and must be divisible by the "
                        f"{world} processes")
    return batch_size // world


# ---------------------------------------------------------------------------------------------
# a fast path for small-image datasets that fit in (GPU) memory


def decode_image_folder(root: str | Path, workers: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Decode an ImageFolder (class subfolders) of equally sized images into uint8 (N, C, H, W) and labels."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir()) if _is_image(f.name)]
    if not files:
        raise UserError(f"no images under {root}")

    images = decode_files([f for f, _ in files], workers)
    labels = torch.tensor([ci for _, ci in files], dtype=torch.long)
    return images, labels, classes


def decode_files(paths: list, workers: int | None = None) -> Tensor:
    """Decode equally sized image files (threads) into one uint8 (N, 3, H, W) tensor; ValueError if sizes differ."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    def load(path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    with ThreadPoolExecutor(workers or os.cpu_count() or 4) as pool:
        arrays = list(pool.map(load, paths, chunksize=256))
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("images of different sizes")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


DEVICE_DATA_MAX_BYTES = 4 * 1024**3  # decoded images kept on the GPU at most (CIFAR-10: 184 MB)


def finetune_loaders(train_ds: Dataset, val_ds: Dataset | None, test_ds: Dataset | None, cfg: ImageDataConfig | None,
                     batch_size: int, workers: int, seed: int, device: str | torch.device, rank: int = 0,
                     world: int = 1, group_by_length: bool = False) -> tuple:
    """(train, val, test) loaders of a fine-tune: small-image folders on a GPU from device memory
    (`device_loaders`), everything else through DataLoaders (`make_loaders`, `eval_loader` for test);
    `cfg` is the resolved image config, None for tensors and texts."""
    on_device = None if cfg is None else device_loaders([train_ds, val_ds, test_ds], cfg, batch_size, seed, device,
                                                        rank, world)
    if on_device is not None:
        return tuple(on_device)
    train, val = make_loaders(train_ds, val_ds, batch_size, workers, seed, device, rank, world,
                              group_by_length=group_by_length)
    return train, val, None if test_ds is None else eval_loader(test_ds, batch_size, workers, device, rank, world)


def device_loaders(datasets: list[Dataset | None], cfg: ImageDataConfig, batch_size: int, seed: int,
                   device: str | torch.device, rank: int = 0, world: int = 1) -> list | None:
    """[train, *eval] loaders for small-image folders decoded once into GPU memory and augmented there
    (`DeviceTensorLoader`: the 'small' augmentation's crop with size/8 padding and flip, the same
    normalisation), so fine-tuning waits on no worker process; None where this does not apply: not CUDA,
    augmentation other than 'small', images not all of the configured size, or too large a set.
    `cfg` is resolved (`resolve_image_config`)."""
    if not _is_cuda(device) or _effective_augment(cfg) != "small" or datasets[0] is None:
        return None
    sources = [None if ds is None else _samples_of(ds) for ds in datasets]
    if any(src is None for src, ds in zip(sources, datasets) if ds is not None):
        return None
    total = sum(len(src) for src in sources if src) * 3 * cfg.image_size ** 2
    if total > DEVICE_DATA_MAX_BYTES:
        return None
    try:
        decoded = [None if src is None else decode_files([path for path, _ in src]) for src in sources]
    except (ValueError, OSError):
        return None  # unequal sizes or an unreadable file: the DataLoader path reports it per image
    if any(x is not None and tuple(x.shape[2:]) != (cfg.image_size, cfg.image_size) for x in decoded):
        return None
    loaders = []
    for i, (x, src) in enumerate(zip(decoded, sources)):
        if x is None:
            loaders.append(None)
            continue
        labels = torch.tensor([label for _, label in src], dtype=torch.long)
        loaders.append(DeviceTensorLoader(x, labels, batch_size, cfg.mean, cfg.std, train=i == 0, device=device,
                                          seed=seed, pad=cfg.image_size // 8, rank=rank, world=world))
    return loaders


def _samples_of(ds: Dataset) -> list[tuple[str, int]] | None:
    """(path, label) of every sample of an image folder or a Subset of one, in the dataset's order."""
    if isinstance(ds, Subset) and isinstance(ds.dataset, ImageFolder):
        return [ds.dataset.samples[i] for i in ds.indices]
    return list(ds.samples) if isinstance(ds, ImageFolder) else None


class DeviceTensorLoader:
    """Batches from uint8 images held on the device, augmented there (random crop with padding + flip).

    For small-image datasets (CIFAR-sized) the whole set fits in GPU memory, and augmenting on the
    GPU removes the data loader from the training step's critical path.

    With world > 1 (one rank of a torchrun job) `batch_size` is the global batch: every rank draws
    the same seeded permutation and takes its own slice of each global batch, so the ranks' batches
    of a step together are exactly the single-process batch and every rank yields the same number
    of batches. Validation shards are rank, rank+world, ... (every sample once over all ranks).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean, std, train: bool,
                 device: str | torch.device, seed: int = 0, pad: int = 4, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        if not train:  # validation: keep this rank's shard only
            images, labels = images[rank::world], labels[rank::world]
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.pad = batch_size, train, pad
        self.rank, self.world = rank, world
        self.local_batch = per_rank_batch(batch_size, world) if train else max(1, -(-batch_size // world))
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        dev = self.images.device
        self.gen = torch.Generator(device=dev).manual_seed(seed)  # the permutation: the same on every rank
        # augmentation: its own stream per rank, so the permutations do not depend on the world size
        self.aug_gen = torch.Generator(device=dev).manual_seed(seed + 7919 * (rank + 1))

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.local_batch)

    def __iter__(self):
        n = len(self.labels)
        dev = self.images.device
        order = torch.randperm(n, device=dev, generator=self.gen) if self.train else torch.arange(n, device=dev)
        start = self.rank * self.local_batch if self.train else 0
        step = self.batch_size if self.train else self.local_batch
        for b in range(len(self)):
            idx = order[b * step + start:b * step + start + self.local_batch]
            x = self.images[idx].float()
            if self.train:
                x = self._augment(x)
            yield (x - self.mean) / self.std, self.labels[idx]

    def _augment(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        p = self.pad
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (B, 1), device=x.device, generator=self.aug_gen)
        ox = torch.randint(0, 2 * p + 1, (B, 1), device=x.device, generator=self.aug_gen)
        rows = (oy + torch.arange(H, device=x.device)).view(B, 1, H, 1).expand(B, x.shape[1], H, W + 2 * p)
        x = xp.gather(2, rows)
        cols = (ox + torch.arange(W, device=x.device)).view(B, 1, 1, W).expand(B, x.shape[1], H, W)
        x = x.gather(3, cols)
        flip = torch.rand(B, device=x.device, generator=self.aug_gen) < 0.5
        return torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
