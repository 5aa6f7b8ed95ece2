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
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlrun.errors import Interrupted, MlrunError, RunDirError, describe

RESULTS = "results.json"
METRICS = "metrics.jsonl"
STUDY = "study.json"
LOCK = ".mlrun.lock"


class RecordError(MlrunError):
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


def overwrite(path: Path | str, text: str) -> None:
    """Rewrite a file in place: the last resort on a full disk, where `write_atomic`'s temp copy does not fit but the
    old file's own blocks do (results.json's final status after ENOSPC). Only ever used after write_atomic failed."""
    with open(path, "r+" if Path(path).exists() else "w") as f:
        f.truncate(0)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path | str, obj: Any) -> None:
    write_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: Path | str) -> Any:
    with open(path) as f:
        return json.load(f)


def remove_temp_files(run_dir: Path | str) -> list[Path]:
    """Delete the `.<name>.<random>.tmp` files a process killed inside `write_atomic` leaves behind."""
    gone = []
    for where in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for tmp in where.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def row_step(row: dict[str, Any]) -> int:
    """A metrics row's position in the whole run (stages restart `step`; `global_step` does not)."""
    return int(row.get("global_step", row.get("step", 0)))


class MetricsLog:
    """metrics.jsonl, one object per logged step, written in batches of whole lines.

    Each flush appends complete lines and fsyncs; when the write fails part-way (disk full, file-size limit) the
    file is cut back to where the flush began, so it only ever holds whole lines. The lines stay buffered.
    """

    def __init__(self, path: Path | str, flush_every: int = 20, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.flush_every = flush_every
        self._buffer: list[str] = []
        if truncate_after_step is not None and self.path.exists():
            # A resumed run rewrites history after its checkpoint so the log matches an uninterrupted run.
            kept = [r for r in read_metrics(self.path) if row_step(r) <= truncate_after_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        self._buffer.append(json.dumps(_clean(record)) + "\n")
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = memoryview("".join(self._buffer).encode())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise RecordError(f"could not append to {self.path}: {e.strerror or e}") from e
        start = None
        try:
            start = os.fstat(fd).st_size
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            if start is not None:
                try:
                    os.ftruncate(fd, start)  # whole lines or none
                except OSError:
                    pass
            raise RecordError(f"could not append to {self.path}: {e.strerror or e}") from e
        finally:
            os.close(fd)
        self._buffer.clear()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a killed process) and anything not an object are skipped."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """A run dir claimed by one run for its whole life.

    The claim is an exclusive `flock` on `<run dir>/.mlrun.lock` (the kernel drops it when the process dies, so a
    killed run never blocks its own resume), and a refusal when the dir already holds another run's records,
    unless this run is continuing that one in place. A dir that cannot be written is one clear error here.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def claim(self, continuing_here: bool = False) -> RunDir:
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot write in the run dir {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"the run dir {self.path} is in use by another mlrun process (pid {other}); "
                              "choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        held = None if continuing_here else self.holds()
        if held:
            self.release()
            raise RunDirError(f"the run dir {self.path} already holds a run ({held}); choose another hydra.run.dir, "
                              f"or continue that run with resume={self.path}")
        return self

    def busy(self) -> bool:
        """Whether a process holds this dir's claim now (a run going on there)."""
        import fcntl

        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def holds(self) -> str | None:
        """What earlier run's records the dir holds, if any."""
        history = (self.path / METRICS).exists() or (self.path / "checkpoints").is_dir()
        if (self.path / RESULTS).exists():
            try:
                res = read_json(self.path / RESULTS)
                if res.get("failed_start") and not history:
                    return None  # a sweep job that never started: a relaunch into the same dir takes its place
                return f"status {res.get('status', 'unknown')}"
            except (OSError, ValueError, AttributeError):
                return "an unreadable results.json"
        return "metrics.jsonl or checkpoints" if history else None

    def release(self) -> None:
        if self._fd is not None:
            (self.path / LOCK).unlink(missing_ok=True)
            os.close(self._fd)  # closing drops the lock
            self._fd = None


class RunRecord:
    """The one owner of a run's results.json: `running` on entry, then, on every way out, `completed`, `failed` or
    `interrupted` with the error, `finished_at` and the wall time.

    Callbacks given to `on_close` (the loggers' finish) run first, with the final status set; a failure of theirs
    is a warning. A record that cannot be written at the end never hides the error that ended the run.
    """

    def __init__(self, run_dir: Path | str, results: dict[str, Any], write: bool = True,
                 clean: Callable[[Any], Any] | None = None) -> None:
        self.path = Path(run_dir) / RESULTS
        self.results = results
        self.write = write
        self.clean = clean or (lambda x: x)
        self._closers: list[Callable[[dict[str, Any]], None]] = []
        self._t0 = time.perf_counter()
        self.entered = False

    def on_close(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self._closers.append(fn)

    def save(self) -> None:
        if self.write:
            write_json(self.path, self.clean(self.results))

    def __enter__(self) -> RunRecord:
        self._t0 = time.perf_counter()
        self.results.setdefault("started_at", utc_now())
        self.results["status"] = "running"
        self.save()
        self.entered = True
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        import logging

        if exc is None:
            self.results["status"] = "completed"
        else:
            interrupted = isinstance(exc, Interrupted | KeyboardInterrupt)
            self.results.update(status="interrupted" if interrupted else "failed", error=describe(exc))
        self.results["wall_time_s"] = round(time.perf_counter() - self._t0, 2)
        self.results["finished_at"] = utc_now()
        log = logging.getLogger("mlrun")
        for fn in self._closers:
            try:
                fn(self.results)
            except Exception as e:  # noqa: BLE001 - closing a sink must not lose the record
                log.warning("while closing the run: %s", describe(e))
        try:
            self.save()
        except RecordError as e:
            import errno

            full = getattr(e.__cause__, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            try:
                if not (full and self.write):
                    raise e
                overwrite(self.path, json.dumps(_clean(self.clean(self.results)), indent=2) + "\n")
            except (RecordError, OSError) as again:
                if exc is None:
                    raise RecordError(str(again)) from again
                log.warning("%s", again)
        return False


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
