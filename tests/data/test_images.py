"""Tests for sttp_compress.data.images: image-folder splits, transforms, tensor files and seeded loaders."""

from __future__ import annotations

from pathlib import Path

from dataclasses import replace

import pytest
import torch
from PIL import Image

from sttp_compress.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataConfig,
    build_image_datasets,
    build_image_splits,
    holdout_indices,
    image_folder_splits,
    load_tensor_data,
    make_loaders,
    resolve_image_config,
)
from sttp_compress.errors import UserError


def _write_images(folder: Path, classes: dict[str, int], size: int = 16, fmt: str = "png") -> None:
    """Write `count` small solid-colour images per class into folder/<class>/."""
    for ci, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            colour = (40 * ci % 256, 10 * i % 256, 200)
            Image.new("RGB", (size, size), colour).save(folder / name / f"img{i}.{fmt}")


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    """root/train/{cat,dog} (PNG) and root/val/{cat,dog} (JPEG) with 16x16 images."""
    _write_images(tmp_path / "train", {"cat": 3, "dog": 2})
    _write_images(tmp_path / "val", {"cat": 1, "dog": 1}, fmt="jpg")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# image_folder_splits


def test_splits_data_dir_with_val(dataset_root: Path) -> None:
    train, val, test = image_folder_splits(str(dataset_root), None, None)
    assert train == dataset_root / "train" and val == dataset_root / "val" and test is None


def test_splits_test_folder_is_never_validation(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 1})
    _write_images(tmp_path / "test", {"a": 1})
    assert image_folder_splits(str(tmp_path), None, None) == (tmp_path / "train", None, tmp_path / "test")
    _write_images(tmp_path / "val", {"a": 1})
    assert image_folder_splits(str(tmp_path), None, None) == (tmp_path / "train", tmp_path / "val", tmp_path / "test")


def test_splits_without_val(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 1})
    assert image_folder_splits(str(tmp_path), None, None) == (tmp_path / "train", None, None)


def test_splits_explicit_folders(dataset_root: Path) -> None:
    train, val, test = image_folder_splits(None, str(dataset_root / "train"), str(dataset_root / "val"))
    assert (train, val, test) == (dataset_root / "train", dataset_root / "val", None)
    assert image_folder_splits(None, str(dataset_root / "train"), None).val is None


@pytest.mark.parametrize(
    "setup, args, fragment",
    [
        (lambda r: None, lambda r: (str(r / "nope"), None, None), "not found"),
        (lambda r: (r / "x").mkdir(), lambda r: (str(r / "x"), None, None), "no train/"),
        (lambda r: (r / "train" / "a").mkdir(parents=True), lambda r: (str(r), None, None), "no images"),
        (lambda r: _write_images(r / "flat", {}), lambda r: (None, str(r / "missing"), None), "not found"),
        (lambda r: _write_images(r / "t", {"a": 1}), lambda r: (None, str(r / "t"), str(r / "v")), "not found"),
        (lambda r: None, lambda r: (None, None, None), "no data given"),
        (lambda r: _write_images(r / "t", {"a": 1}), lambda r: (str(r), str(r / "t"), None), "not both"),
    ],
    ids=["missing-data", "no-train", "no-images", "missing-train", "missing-val", "nothing", "both"],
)
def test_splits_user_errors(tmp_path: Path, setup, args, fragment: str) -> None:
    setup(tmp_path)
    with pytest.raises(UserError, match=fragment) as info:
        image_folder_splits(*args(tmp_path))
    assert "\n" not in str(info.value)


def test_images_directly_in_train_folder_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.png")  # no class subfolder
    with pytest.raises(UserError, match=str(tmp_path / "train")):
        image_folder_splits(str(tmp_path), None, None)


def test_empty_val_folder_is_rejected(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 1})
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        image_folder_splits(str(tmp_path), None, None)


# ---------------------------------------------------------------------------------------------
# build_image_datasets


def test_config_defaults_small_images(dataset_root: Path) -> None:
    cfg = resolve_image_config(ImageDataConfig(), dataset_root / "train")
    assert cfg.image_size == 16 and cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD


def test_config_large_images_use_224(tmp_path: Path) -> None:
    _write_images(tmp_path, {"a": 1}, size=100)
    assert resolve_image_config(ImageDataConfig(), tmp_path).image_size == 224


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        (ImageDataConfig(augment="fancy"), "augmentation"),
        (ImageDataConfig(mean=(0.5, 0.5), std=(0.2, 0.2)), "mean and std"),
        (ImageDataConfig(mean=(0.5,), std=(0.0,)), "positive"),
    ],
)
def test_config_user_errors(dataset_root: Path, cfg: ImageDataConfig, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        resolve_image_config(cfg, dataset_root / "train")


@pytest.mark.parametrize("augment", ["auto", "small", "none"])
def test_build_small_image_datasets(dataset_root: Path, augment: str) -> None:
    train_ds, val_ds = build_image_datasets(
        dataset_root / "train", dataset_root / "val", ImageDataConfig(augment=augment)
    )
    assert len(train_ds) == 5 and len(val_ds) == 2
    x, y = train_ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    xv, yv = val_ds[1]
    assert xv.shape == (3, 16, 16) and yv == 1
    # validation is deterministic and normalised with the ImageNet statistics
    assert torch.equal(val_ds[0][0], val_ds[0][0])
    raw = torch.tensor([40 * 0, 0, 200], dtype=torch.float32) / 255  # class "cat", image 0 is (0, 0, 200)
    expected = (raw - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(val_ds[0][0][:, 8, 8], expected, atol=0.05)  # JPEG is lossy


def test_build_imagenet_sized(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 1, "b": 1}, size=40)
    _write_images(tmp_path / "val", {"a": 1}, size=40)
    train_ds, val_ds = build_image_datasets(
        tmp_path / "train", tmp_path / "val", ImageDataConfig(image_size=72, augment="auto")
    )
    assert train_ds[0][0].shape == (3, 72, 72) and val_ds[0][0].shape == (3, 72, 72)


def test_val_with_subset_of_classes_keeps_train_indices(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    _write_images(tmp_path / "val", {"c": 1})  # alone, ImageFolder would call "c" class 0
    _, val_ds = build_image_datasets(tmp_path / "train", tmp_path / "val", ImageDataConfig())
    assert val_ds[0][1] == 2 and val_ds.classes == ["a", "b", "c"]


def test_val_with_unknown_class_is_rejected(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 1})
    _write_images(tmp_path / "val", {"zebra": 1})
    with pytest.raises(UserError, match="zebra"):
        build_image_datasets(tmp_path / "train", tmp_path / "val", ImageDataConfig())


def test_grayscale_images_become_rgb(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.new("L", (12, 12), 128).save(tmp_path / "a" / "g.png")
    train_ds, val_ds = build_image_datasets(tmp_path, None, ImageDataConfig())
    assert train_ds[0][0].shape == (3, 12, 12) and val_ds is None


# ---------------------------------------------------------------------------------------------
# load_tensor_data


def test_tensor_data_split(tmp_path: Path) -> None:
    inputs, targets = torch.arange(50.0).reshape(50, 1), torch.arange(50)
    torch.save({"inputs": inputs, "targets": targets}, tmp_path / "d.pt")
    train_ds, val_ds = load_tensor_data(tmp_path / 'd.pt')
    assert len(train_ds) == 45 and len(val_ds) == 5
    xs = torch.cat([train_ds.tensors[0], val_ds.tensors[0]]).flatten()
    ys = torch.cat([train_ds.tensors[1], val_ds.tensors[1]])
    assert torch.equal(xs.sort().values, inputs.flatten()) and torch.equal(xs.long(), ys)  # pairs stay together
    again, _ = load_tensor_data(tmp_path / 'd.pt')
    assert torch.equal(again.tensors[0], train_ds.tensors[0])  # deterministic split


def test_tensor_data_without_targets_yields_inputs_only(tmp_path: Path) -> None:
    torch.save({"inputs": torch.randn(20, 3)}, tmp_path / "d.pt")
    train_ds, val_ds = load_tensor_data(tmp_path / 'd.pt')
    assert len(train_ds) == 18 and len(val_ds) == 2
    assert len(train_ds[0]) == 1 and train_ds[0][0].shape == (3,)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "not found"),
        ([torch.zeros(3)], "must hold a dict"),
        ({"targets": torch.zeros(3)}, "no 'inputs'"),
        ({"inputs": torch.zeros(4, 2), "targets": torch.zeros(3)}, "4 inputs but 3 targets"),
        ({"inputs": torch.zeros(1, 2)}, "at least 2"),
    ],
    ids=["missing", "not-dict", "no-inputs", "length-mismatch", "too-small"],
)
def test_tensor_data_user_errors(tmp_path: Path, content, fragment: str) -> None:
    path = tmp_path / "d.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=fragment):
        load_tensor_data(path)


def test_tensor_data_rejects_unsafe_pickles(tmp_path: Path) -> None:
    torch.save({"inputs": torch.zeros(4, 2), "extra": Path("x")}, tmp_path / "d.pt")
    with pytest.raises(UserError, match="cannot load"):
        load_tensor_data(tmp_path / 'd.pt')


# ---------------------------------------------------------------------------------------------
# make_loaders


def _order(loader) -> list[int]:
    return torch.cat([batch[0].flatten() for batch in loader]).long().tolist()


def test_loaders_are_seeded_and_drop_last() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
    train_a, val_a = make_loaders(ds, ds, batch_size=4, workers=0, seed=3, device="cpu")
    train_b, _ = make_loaders(ds, ds, batch_size=4, workers=0, seed=3, device="cpu")
    train_c, _ = make_loaders(ds, ds, batch_size=4, workers=0, seed=4, device="cpu")
    assert len(train_a) == 2 and len(val_a) == 3  # train drops the ragged batch, val keeps it
    assert _order(train_a) == _order(train_b) != _order(train_c)
    assert _order(val_a) == list(range(10))
    assert not train_a.pin_memory and not train_a.persistent_workers


def test_loaders_with_workers_are_deterministic() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(8.0))
    orders = [_order(make_loaders(ds, None, 4, workers=1, seed=0, device="cpu")[0]) for _ in range(2)]
    assert orders[0] == orders[1]
    train, val = make_loaders(ds, None, 4, workers=1, seed=0, device="cpu")
    assert train.persistent_workers and val is None


def test_loaders_keep_a_single_short_batch() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(3.0))
    train, _ = make_loaders(ds, None, batch_size=8, workers=0, seed=0, device="cpu")
    assert len(train) == 1


@pytest.mark.parametrize("batch_size, workers", [(0, 0), (4, -1)])
def test_loader_user_errors(batch_size: int, workers: int) -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(3.0))
    with pytest.raises(UserError):
        make_loaders(ds, None, batch_size, workers, seed=0, device="cpu")


class _Lengths(torch.utils.data.Dataset):
    """Samples that are their own index, with a length each (as text.TokenizedTexts has)."""

    def __init__(self, lengths: list[int]):
        self._lengths = lengths

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int) -> int:
        return i

    def lengths(self) -> list[int]:
        return list(self._lengths)


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [b.tolist() for b in loader]


def test_length_grouped_batches_cover_the_data_once_with_little_padding() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    ds = _Lengths(lengths)
    loader, _ = make_loaders(ds, None, 32, 0, 7, "cpu")
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 1000 // 32 and all(len(b) == 32 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == len(seen) == 31 * 32  # each sample at most once; only the ragged tail dropped
    padded = sum(32 * max(lengths[i] for i in b) for b in batches)
    assert sum(lengths[i] for i in seen) / padded > 0.9  # random batches of U(1, 200) fill about half
    plain = [b.tolist() for b in make_loaders(ds, None, 32, 0, 7, "cpu", group_by_length=False)[0]]
    assert [len(b) for b in plain] == [32] * 31
    assert sum(lengths[i] for b in plain for i in b) / sum(32 * max(lengths[i] for i in b) for b in plain) < 0.6
    # a window of one batch sorts nothing across batches: random-batch padding, same samples
    one = _epoch(make_loaders(ds, None, 32, 0, 7, "cpu", length_group=1)[0], 0)
    assert sum(lengths[i] for b in one for i in b) / sum(32 * max(lengths[i] for i in b) for b in one) < 0.6
    # the order is a function of (seed, epoch): reproducible, and new each epoch
    assert _epoch(make_loaders(ds, None, 32, 0, 7, "cpu")[0], 0) == batches
    assert _epoch(loader, 1) != batches
    assert _epoch(make_loaders(ds, None, 32, 0, 8, "cpu")[0], 0) != batches


def test_length_grouped_shards_split_each_global_batch() -> None:
    lengths = torch.randint(1, 50, (203,), generator=torch.Generator().manual_seed(1)).tolist()
    ds = _Lengths(lengths)
    ranks = [make_loaders(ds, None, 20, 0, 3, "cpu", rank=r, world=4)[0] for r in range(4)]
    whole = _epoch(make_loaders(ds, None, 20, 0, 3, "cpu")[0], 2)
    shards = [_epoch(loader, 2) for loader in ranks]
    assert all(len(s) == len(whole) == 10 for s in shards) and all(len(b) == 5 for s in shards for b in s)
    for step, batch in enumerate(whole):  # every step, the ranks hold the quarters of one global batch
        assert [i for s in shards for i in s[step]] == batch
    with pytest.raises(UserError, match="divisible by the 3 processes"):
        make_loaders(ds, None, 20, 0, 3, "cpu", rank=0, world=3)


def test_length_grouped_keeps_a_single_short_batch() -> None:
    ds = _Lengths([3, 1, 2, 5, 4])
    assert _epoch(make_loaders(ds, None, 8, 0, 0, "cpu")[0], 0) == [[1, 2, 0, 4, 3]]  # sorted by length
    shards = [_epoch(make_loaders(ds, None, 8, 0, 0, "cpu", rank=r, world=2)[0], 0) for r in range(2)]
    assert shards == [[[1, 2]], [[0, 4]]]  # shared evenly; the odd one out is left out


# ---------------------------------------------------------------------------------------------
# validation held out of train/ (no val/ folder)


def test_holdout_takes_the_same_share_of_every_class_and_is_seeded() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    kept, held = holdout_indices(labels, fraction=0.1, max_count=1000, seed=0)
    assert torch.bincount(labels[held]).tolist() == [5, 3, 2]
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(100))  # a partition
    again_kept, again_held = holdout_indices(labels, fraction=0.1, max_count=1000, seed=0)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    assert not torch.equal(holdout_indices(labels, 0.1, 1000, seed=1)[1], held)


def test_holdout_is_capped() -> None:
    labels = torch.arange(10).repeat_interleave(1000)  # 10,000 images
    _, held = holdout_indices(labels, fraction=0.5, max_count=2000)
    assert len(held) == 2000 and torch.bincount(labels[held]).tolist() == [200] * 10


def test_splits_without_val_hold_out_train_images_and_keep_test_for_the_report(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 20, "b": 10})
    _write_images(tmp_path / "test", {"a": 2, "b": 2})
    ds = build_image_splits(image_folder_splits(str(tmp_path), None, None), ImageDataConfig())
    assert (len(ds.train), len(ds.val), len(ds.test)) == (27, 3, 4)
    assert ds.validation == {"source": f"held out of {tmp_path / 'train'}", "images": 3, "of": 30, "seed": 0,
                             "per_class": True}
    held = {ds.val.dataset.samples[i][0] for i in ds.val.indices}
    trained = {ds.train.dataset.samples[i][0] for i in ds.train.indices}
    assert not held & trained  # the held-out images are not trained on
    assert torch.equal(ds.val[0][0], ds.val[0][0])  # validation is not augmented
    assert [ds.test[i][1] for i in range(4)] == [0, 0, 1, 1]


def test_splits_with_val_folder_validate_there(dataset_root: Path) -> None:
    ds = build_image_splits(image_folder_splits(str(dataset_root), None, None), ImageDataConfig())
    assert len(ds.train) == 5 and len(ds.val) == 2 and ds.test is None
    assert ds.validation == {"source": str(dataset_root / "val"), "images": 2}


def test_too_few_images_to_hold_out_leave_no_validation(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 3, "b": 3})
    ds = build_image_splits(image_folder_splits(str(tmp_path), None, None), ImageDataConfig())
    assert len(ds.train) == 6 and ds.val is None and ds.validation["source"] is None


# ---------------------------------------------------------------------------------------------
# device_loaders: small images decoded once and augmented on the GPU


def test_device_loaders_match_the_folder_datasets(tmp_path: Path, monkeypatch) -> None:
    import sttp_compress.data.images as images

    _write_images(tmp_path / "train", {"a": 20, "b": 10})
    _write_images(tmp_path / "test", {"a": 2, "b": 3})
    cfg = resolve_image_config(ImageDataConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)), tmp_path / "train")
    ds = build_image_splits(image_folder_splits(str(tmp_path), None, None), cfg)
    assert images.device_loaders([ds.train, ds.val, ds.test], cfg, 4, 0, "cpu") is None  # not CUDA
    monkeypatch.setattr(images, "_is_cuda", lambda device: True)  # the same code, on the CPU
    train, val, test = images.device_loaders([ds.train, ds.val, ds.test], cfg, 4, 0, "cpu")
    assert len(train) == len(ds.train) // 4 and train.pad == 2  # size // 8, as the 'small' transform
    for loader, dataset in ((val, ds.val), (test, ds.test)):  # un-augmented: exactly the folder's tensors
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        assert torch.allclose(x, torch.stack([dataset[i][0] for i in range(len(dataset))]), atol=1e-5)
        assert y.tolist() == [dataset[i][1] for i in range(len(dataset))]
    seen = torch.cat([b[1] for b in train])
    assert sorted(seen.tolist()) != [] and set(seen.tolist()) <= {0, 1}
    none_cfg = replace(cfg, augment="none")
    assert images.device_loaders([ds.train, ds.val], none_cfg, 4, 0, "cpu") is None  # only 'small' crops


def test_a_process_ends_with_its_loader_workers_still_running():
    """Loader workers leave Ctrl-C to the main process (`init_worker`) but not SIGTERM: multiprocessing stops the
    workers still alive at exit with it, and with SIGTERM ignored the interpreter waited for them forever."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from sttp_compress.data.images import init_worker
        loader = DataLoader(TensorDataset(torch.arange(1000.0)), batch_size=10, num_workers=2, persistent_workers=True,
                            worker_init_fn=init_worker)
        batches = iter(loader)
        next(batches)  # the workers run, and are still running when the interpreter exits
        print("done", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "done\n", "")
