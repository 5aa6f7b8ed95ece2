"""Progress: a rich bar on a terminal; a plain line now and then in log files (SLURM, nohup, CI).

The trainer calls `tick` every step; it costs one clock read unless a redraw is due (a few times a second for
the bar, every 10 s for plain lines), and then shows the mean loss since the last log point, so the bar moves
and shows a loss from the first step, not from the first `log_every`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

BAR_EVERY_S = 0.25
PLAIN_EVERY_S = 10.0


class Progress:
    def __init__(self, mode: str = "auto", enabled: bool = True, prefix: str = "") -> None:
        if not enabled or mode == "none":
            self.kind = "none"
        elif mode == "auto":
            self.kind = "bar" if sys.stdout.isatty() else "plain"
        else:
            self.kind = mode
        self.prefix = prefix
        self._bar: Any = None
        self._task: Any = None
        self._last_draw = -1e9
        self._t0 = time.perf_counter()
        self.total = 0
        self.stage = ""
        self._start_step = 0
        self._info: dict[str, float] = {}
        self._drawn_step = -1
        self._every = BAR_EVERY_S if self.kind == "bar" else PLAIN_EVERY_S

    def start(self, stage: str, total: int, done: int = 0) -> None:
        self.stage, self.total, self._start_step = stage, total, done
        self._t0 = time.perf_counter()
        self._last_draw, self._info, self._drawn_step = -1e9, {}, -1
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
            self._task = self._bar.add_task(self.prefix + stage, total=total, completed=done, info="")

    def tick(self, step: int, sums: dict[str, Any], counts: dict[str, int]) -> None:
        """Every step: redraw when one is due, with the mean of each loss since the last log point."""
        if self.kind == "none":
            return
        now = time.perf_counter()
        if now - self._last_draw < self._every and step < self.total:
            return
        if sums:  # one sync per redraw, a few times a second at most
            self._info = {k: float(v) / counts[k] for k, v in sums.items()}
        self._draw(step, now)

    def update(self, step: int, info: dict[str, float] | None = None) -> None:
        """At log points: the logged means (already synced) become the shown loss."""
        if info:
            self._info = dict(info)
        final = step >= self.total and step != self._drawn_step
        if self.kind != "none" and (time.perf_counter() - self._last_draw >= self._every or final):
            self._draw(step, time.perf_counter())

    def _draw(self, step: int, now: float) -> None:
        self._last_draw, self._drawn_step = now, step
        text = "  ".join(f"{k}={v:.4g}" for k, v in self._info.items())
        elapsed = now - self._t0
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        if self.kind == "bar" and self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"{text}  {rate:.1f} it/s")
        elif self.kind == "plain":
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"{self.prefix}[{self.stage}] step {step}/{self.total}  {text}  {rate:.1f} it/s  eta {eta:.0f}s",
                  flush=True)

    def close(self) -> None:
        """Stop drawing (idempotent): before any message that follows the bar, Ctrl-C's included."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
