"""Shared bits of the benchmarks: timing, machine description, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared beside the checkout (models/, data/); STTP_SHARED points elsewhere (a GPU machine gets a carried copy)
SHARED = Path(os.environ.get("STTP_SHARED") or Path(__file__).resolve().parents[2] / "shared")
SHARED_MODELS = SHARED / "models"
EXPERIMENT_RESULTS = RESULTS / "experiments"  # what the scripts in benchmarks/experiments/ write


def machine(device: str = "cpu") -> str:
    """One line naming the machine a number came from (the GPU's name on CUDA)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def today() -> str:
    return _dt.date.today().isoformat()


def time_ms(fn: Callable[[], object], device: str = "cpu", warmup: int = 2, repeat: int = 5,
            min_seconds: float = 0.0) -> float:
    """Median wall time of fn() in ms, after warm-up, synchronizing CUDA around each run."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def paired_ms(fn_a: Callable[[], object], fn_b: Callable[[], object], device: str = "cpu", warmup: int = 2,
              repeat: int = 5, min_seconds: float = 0.0, block: int = 3) -> tuple[float, float]:
    """Median wall times in ms of fn_a() and fn_b(), measured in turns of `block` runs each (a a a, b b b, a a a,
    ...; the first run of a turn warms the caches up again and is not counted), synchronizing CUDA around each
    run, until each has `repeat` times and `min_seconds` have passed. Turns make a host whose load drifts during
    the measurement weigh on both alike (timed one after the other, two runs of the same convolutions on a
    2-core machine read up to 14% apart), while each timed run still finds its own weights in cache, as a server
    running one model would (alternating single runs made a small model read its weights from memory after a
    large one: the 13 MB factors of a Linear stack 2.4 ms instead of 1.1 ms)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn_a()
        fn_b()
    sync()
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < repeat or time.perf_counter() - start < min_seconds:
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            for i in range(max(2, block)):
                t0 = time.perf_counter()
                fn()
                sync()
                if i:
                    out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def commit() -> str:
    """The checked-out commit (with '+dirty' when the tree has changes outside benchmarks/results); outside git,
    STTP_COMMIT or 'unknown'
    (a GPU machine gets a copy of the tree without .git: the caller names the commit)."""
    if os.environ.get("STTP_COMMIT"):
        return os.environ["STTP_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        # results tables are what a benchmark writes while it runs: changes there do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _results_dir() -> Path:
    """results/ for the benchmarks, results/experiments/ for a script run from benchmarks/experiments/."""
    return EXPERIMENT_RESULTS if Path(sys.argv[0]).resolve().parent.name == "experiments" else RESULTS


def write_results(name: str, rows: list[dict], meta: dict, markdown: str | None = None) -> Path:
    """Rewrite the current table <name>.json (and .md, and .meta.json with the commit added) in
    benchmarks/results/ (experiments: results/experiments/); return the JSON path. History is git's."""
    folder = _results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    _write_atomic(path, json.dumps(rows, indent=2) + "\n")
    meta = {"commit": commit(), **meta}
    _write_atomic(folder / f"{name}.meta.json", json.dumps(meta, indent=2) + "\n")
    if markdown is not None:
        _write_atomic(folder / f"{name}.md", markdown)
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write beside, then rename: a benchmark running alongside never reads half a table."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table_header(name: str, title: str, rows: list[dict], notes: list[str] = ()) -> str:
    """The Markdown above a merged table: the title with today's date and the commits of its rows, this run's
    notes (a bullet each), then the stored <name>.md's notes, kept because they say where its other rows came
    from (what lies between its title and its first table or section; a line equal to a new bullet is dropped).
    Notes that a replaced row made stale are for the reader of the diff to remove."""
    commits = list(dict.fromkeys(str(r["commit"]) for r in rows if r.get("commit")))
    head = f"# {title} ({today()}" + (f"; rows from commits {' / '.join(commits)}" if commits else "") + ")\n\n"
    bullets = [f"- {n}" for n in notes]
    earlier = []
    path = _results_dir() / f"{name}.md"
    if path.exists():
        for line in path.read_text().splitlines()[1:]:
            if line.startswith(("|", "#")):
                break
            earlier.append(line)
    kept = "\n".join(line for line in earlier if line not in bullets).strip()
    body = "\n".join(bullets) + ("\n\n" if bullets and kept else "") + kept
    return head + (body + "\n\n" if body else "")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def merge_rows(name: str, rows: list[dict], key: Callable[[dict], object] = lambda r: r["device"]) -> list[dict]:
    """Rows already in <name>.json (where `write_results` writes it) whose `key` (default: the device) none of
    these rows has, followed by these rows."""
    path = _results_dir() / f"{name}.json"
    if not path.exists():
        return rows
    mine = {key(r) for r in rows}
    return [r for r in json.loads(path.read_text()) if key(r) not in mine] + rows


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """Print rows as a rich table (missing cells as None)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} ({today()})")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r.get(c)) for c in columns))
    Console().print(table)
