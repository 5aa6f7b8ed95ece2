"""Progress: a rich bar on a terminal; a plain line now and then in log files (SLURM, nohup, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, mode: str = "auto", enabled: bool = True) -> None:
        if not enabled or mode == "none":
            self.kind = "none"
        elif mode == "auto":
            self.kind = "bar" if sys.stdout.isatty() else "plain"
        else:
            self.kind = mode
        self._bar: Any = None
        self._task: Any = None
        self._last_print = 0.0
        self._t0 = time.perf_counter()
        self.total = 0
        self.stage = ""
        self._start_step = 0

    def start(self, stage: str, total: int, done: int = 0) -> None:
        self.stage, self.total, self._start_step = stage, total, done
        self._t0 = time.perf_counter()
        if self.kind == "bar":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(stage, total=total, completed=done, info="")

    def update(self, step: int, info: dict[str, float] | None = None) -> None:
        """Called at log points (not every step), so drawing costs nothing in the hot loop."""
        text = "  ".join(f"{k}={v:.4g}" for k, v in (info or {}).items())
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        if self.kind == "bar" and self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"{text}  {rate:.1f} it/s")
        elif self.kind == "plain":
            now = time.perf_counter()
            if now - self._last_print >= 10 or step >= self.total or self._last_print == 0.0:
                eta = (self.total - step) / rate if rate > 0 else float("nan")
                print(f"[{self.stage}] step {step}/{self.total}  {text}  {rate:.1f} it/s  eta {eta:.0f}s", flush=True)
                self._last_print = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
