"""The package's shape (docs/development.md): packages by role, imports only downward, no private names
imported from another module, no function longer than the limit."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # the project
PACKAGE = ROOT / "sttp_compress"
# Bottom to top (docs/development.md): a module may import from its own layer and the layers below it.
LEVEL = {"errors": 0, "progress": 0, "core": 1, "compress": 2, "io": 3, "data": 4, "train": 5, "evaluate": 6, "pipeline": 7,
         "example": 7, "api": 7, "cli": 8}
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _layer(dotted: str) -> str | None:
    """The layer of `sttp_compress.<layer>...` (None for the package root, the public API)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sttp_compress" else None


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of sttp_compress in the file, however deeply nested."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sttp_compress"):
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("sttp_compress")]
    return found


def _own(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
    own = _layer(_own(path))
    if own is None:
        return  # sttp_compress/__init__.py: the public API gathers from every layer
    for line, module, _ in _imports(path):
        target = _layer(module)
        if target is not None:
            assert LEVEL[target] <= LEVEL[own], f"{path.name}:{line} ({own}) imports {module} ({target}), a layer above"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    for line, module, names in _imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.name}:{line} imports {private} from {module}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_body_is_longer_than_the_limit(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.body[0].lineno + 1  # the body: a typer command's options are its signature
            assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} has {length} lines"


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMANDS = ("sttp-eval", "sttp-compress", "torchrun")  # a flag after a command's name is a command line


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the file's string constants that are not docstrings (messages, reasons, notes)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


@pytest.mark.parametrize("path", [p for p in _modules() if _layer(_own(p)) not in ("cli", "example")],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_messages_name_options_not_flags(path):
    """Only the CLI knows flag names: library strings mark an option as ‹name› (errors.terms)."""
    for line, text in _message_strings(path):
        flags = [m.group(0) for m in FLAG.finditer(text)
                 if not text[:m.start()].rstrip().endswith(COMMANDS) and " ... " not in text[:m.start()][-6:]]
        assert not flags, f"{path.name}:{line} names CLI flags {flags} in {text!r}"
