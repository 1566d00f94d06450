"""Progress in a log: with stderr not a terminal (a job scheduler, CI, `2> log`), a plain line each time another
tenth of a run is done. rich draws its transient bars only on a terminal, so a redirected run showed nothing
until its summary."""

from __future__ import annotations

import sys
import time

__all__ = ["TaskLines", "TenthLines"]


class TenthLines:
    """`label: done/total unit (p%)[, s elapsed][, detail]` on stderr each time `advance` passes another tenth."""

    def __init__(self, label: str, total: float, unit: str, elapsed: bool = False):
        self.label, self.total, self.unit, self.elapsed = label, total, unit, elapsed
        self.done, self.shown, self.start = 0.0, 0, time.perf_counter()

    def advance(self, amount: float = 1, detail: str = "") -> None:
        """Count `amount` more done; print a line when that passes another tenth of the total."""
        self.done += amount
        tenth = min(10, int(10 * self.done / max(self.total, 1e-9)))
        if tenth <= self.shown:
            return
        self.shown = tenth
        line = f"{self.label}: {self.done:,.0f}/{self.total:,.0f} {self.unit} ({10 * tenth}%)"
        if self.elapsed:
            line += f", {time.perf_counter() - self.start:.0f} s elapsed"
        print(line + (f", {detail}" if detail else ""), file=sys.stderr, flush=True)


class TaskLines:
    """The part of rich's `Progress` that sttp-eval uses (`add_task`, `update`), for a log: a task of known total
    prints `TenthLines`; one of unknown total (timing, embedding texts) prints its name once as it starts."""

    def __init__(self, unit: str = "batches"):
        self.unit, self.tasks = unit, []

    def add_task(self, description: str, total: float | None = None, **_: object) -> int:
        """A new task's id; one without a total is announced at once, since no tenth of it will be."""
        if total is None:
            print(f"{description} ...", file=sys.stderr, flush=True)
        self.tasks.append(None if total is None else TenthLines(description, total, self.unit, elapsed=True))
        return len(self.tasks) - 1

    def update(self, task: int, advance: float = 0, **_: object) -> None:
        """Count `advance` more of the task done (rich's other fields, such as `completed`, change nothing here)."""
        if self.tasks[task] is not None and advance:
            self.tasks[task].advance(advance)
