"""Run records: atomic files, the metrics log, and what a result must say about where it came from.

Torch-free, so `mlrun report` can read everything without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS = "results.json"
METRICS = "metrics.jsonl"
STUDY = "study.json"


class RecordError(RuntimeError):
    """A record could not be written (disk full, read-only run dir): nothing half-written is left."""


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf as strings, numpy and torch scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_atomic(path: Path | str, text: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old file or the new."""
    path = Path(path)
    mode = "wb" if isinstance(text, bytes) else "w"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, mode) as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise RecordError(f"could not write {path}: {e.strerror or e}") from e


def write_json(path: Path | str, obj: Any) -> None:
    write_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: Path | str) -> Any:
    with open(path) as f:
        return json.load(f)


class MetricsLog:
    """metrics.jsonl, one object per logged step, written in batches of whole lines.

    Each flush appends complete lines with one write() and fsyncs; a crash can lose the unflushed tail but
    never leaves a broken line behind a good one. `read_metrics` skips a torn last line all the same.
    """

    def __init__(self, path: Path | str, flush_every: int = 20, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.flush_every = flush_every
        self._buffer: list[str] = []
        if truncate_after_step is not None and self.path.exists():
            # A resumed run rewrites history after its checkpoint so the log matches an uninterrupted run.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        self._buffer.append(json.dumps(_clean(record)) + "\n")
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = "".join(self._buffer)
        try:
            with open(self.path, "a") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RecordError(f"could not append to {self.path}: {e.strerror or e}") from e
        self._buffer.clear()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed process
    return rows


def config_digest(cfg_container: dict[str, Any]) -> str:
    """A short hash of the resolved config without run-local keys, to tell identical settings apart."""
    skip = {"resume", "hydra"}
    text = json.dumps({k: v for k, v in cfg_container.items() if k not in skip}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the source tree mlrun was installed from, if it is a git checkout."""
    where = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions(names: Iterable[str] = ("torch", "torchvision", "hydra-core", "omegaconf", "wandb", "numpy")) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
