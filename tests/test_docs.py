"""The code in docs/python-api.md runs as written, on small stand-ins for the files it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402  (torchvision brings Pillow)

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _image_folders(root: Path, per_class: int) -> None:
    """train/ and test/ with 10 classes of tiny random 32x32 JPEGs, the layout the example reads."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.jpg")


def test_the_notebook_example_runs_and_saves_a_checkpoint_that_loads(tmp_path, monkeypatch):
    example = _python_blocks(DOC.read_text())[0]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), "resnet18_cifar10.pt")
    _image_folders(tmp_path / "cifar10", per_class=2)
    code = example.replace("num_workers=4", "num_workers=0").replace("epochs=10", "epochs=1")
    assert code != example  # the substitutions found their text: the doc still reads as a user runs it
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102  (our own documentation)
    assert (tmp_path / "resnet18.sttp.safetensors").is_file()
    assert abs(scope["report"]["totals"]["ratio"] - 10) / 10 < 0.03
    assert "val_accuracy_after" in scope["block"]
    loaded = scope["model"]
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert loaded(x).shape == (2, 10)


def test_the_lower_level_example_runs():
    code = _python_blocks(DOC.read_text())[1]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    scope: dict = {"model": model, "torch": torch}
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102
    assert scope["layers"] and not any("parametrizations" in n for n, _ in model.named_modules())  # decompressed
