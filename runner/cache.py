"""The stage cache: a stage whose inputs match an earlier run's reuses that run's end-of-stage checkpoint.

Arms of a study often share a prefix of stages (BSO's cross-entropy pretraining, a detector, a trunk). A stage's
key is a digest of everything that can change the state at its end: the resolved config without the later stages
and without what only names or reports a run (label, logger, paper, claims, study, ...), the stages up to it
(their trainer settings and `args`), the seed, and a digest of mlrun's own source. A run that finds the key of
one of its stages (the deepest one) loads that checkpoint exactly as a resume would, which the trainer makes
bit-identical to training it, and records where it came from in results.json (`reused_stage_from`).

The cache lives in `<cache.dir>/<key>/` (default: `.stage_cache/` beside the sweep dir, so a relaunched or
related sweep finds it, and a `mlrun reproduce` folder has its own). It is on by default inside a multirun
(`cache.stages=auto`), off with `cache.stages=false` or `mlrun --no-cache ...`. One process computes a key at a
time: the others wait for it (a file lock per key) instead of computing it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from mlrun.records import METRICS, read_json, read_metrics, write_atomic, write_json

log = logging.getLogger("mlrun")

NOT_IN_KEY = ("label", "experiment_name", "logger", "hydra", "paper", "claims", "study", "smoke", "part_of",
              "resume", "eval_only", "objective", "scale", "debug", "cache", "stages")
"""Top-level keys that name, report or place a run but never change what a stage computes."""


@lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of mlrun's Python source (runner, models, datasets): any code change makes new keys."""
    import mlrun
    import mlrun.datasets
    import mlrun.models

    h = hashlib.sha256()
    for pkg in (mlrun, mlrun.models, mlrun.datasets):
        for folder in pkg.__path__:
            for path in sorted(Path(folder).rglob("*.py")):
                h.update(path.relative_to(folder).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_keys(config: dict[str, Any], stages: list[dict[str, Any]]) -> list[str]:
    """The key of each stage of a run (config: the resolved run config as a plain dict)."""
    base = {k: v for k, v in config.items() if k not in NOT_IN_KEY}
    trainer = dict(base.get("trainer") or {})
    trainer.pop("progress", None)
    base["trainer"] = trainer
    keys = []
    for i in range(len(stages)):
        text = json.dumps({**base, "stages": stages[: i + 1], "source": source_digest()}, sort_keys=True, default=str)
        keys.append(hashlib.sha256(text.encode()).hexdigest()[:24])
    return keys


class StageCache:
    """The cache as one run sees it: its stages' keys, and the lock on the key it is computing."""

    def __init__(self, root: Path, keys: list[str], stage_names: list[str]) -> None:
        self.root = Path(root)
        self.keys = keys
        self.names = stage_names
        self._lock: Any = None
        self._locked: int | None = None

    def _dir(self, index: int) -> Path:
        return self.root / self.keys[index]

    def ready(self, index: int) -> bool:
        return (self._dir(index) / "meta.json").exists()

    def _acquire(self, index: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / f"{self.keys[index]}.lock", "w")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("stage cache: waiting for another run computing stage '%s' (%s)", self.names[index],
                     self.keys[index][:8])
            fcntl.flock(f, fcntl.LOCK_EX)
        self._lock, self._locked = f, index

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
        self._lock, self._locked = None, None

    def lookup(self) -> int:
        """The index of the deepest stage (never the last) whose end state is cached, or -1.

        Walks the stages in order; if another run is computing one, waits for it. The first stage not cached
        stays locked by this run until `store` (or the process ends), so no one else computes it meanwhile.
        """
        found = -1
        for index in range(len(self.keys) - 1):
            self._acquire(index)
            if not self.ready(index):
                return found
            self.release()
            found = index
        return found

    def load(self, index: int) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
        """(checkpoint path, metrics rows up to that stage's end, meta) of a cached stage."""
        d = self._dir(index)
        return d / "state.pt", read_metrics(d / METRICS), read_json(d / "meta.json")

    def store(self, index: int, checkpoint: Path, metrics: Path, run_dir: Path) -> None:
        """Keep the end state of stage `index` (not the last: a whole finished run is `resume=auto`'s to reuse)."""
        if index >= len(self.keys) - 1 or self.ready(index):
            self._release_if(index)
            return
        if self._locked != index:
            try:  # a stage reached after reuse or another's: take its lock without waiting, or leave it be
                self._acquire_nowait(index)
            except BlockingIOError:
                return
        d = self._dir(index)
        tmp = self.root / f".{self.keys[index]}.{os.getpid()}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copyfile(checkpoint, tmp / "state.pt")
            rows = read_metrics(metrics)
            write_atomic(tmp / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
            write_json(tmp / "meta.json", {"key": self.keys[index], "stage": self.names[index], "index": index,
                                           "run_dir": str(Path(run_dir).resolve()), "source": source_digest(),
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            os.replace(tmp, d)
            log.info("stage cache: stored stage '%s' (%s)", self.names[index], self.keys[index][:8])
        except OSError as e:  # a cache that cannot be written costs time, never the run
            log.warning("stage cache: could not store stage '%s': %s", self.names[index], e)
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            self._release_if(index)

    def _acquire_nowait(self, index: int) -> None:
        self.release()
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / f"{self.keys[index]}.lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise
        self._lock, self._locked = f, index

    def _release_if(self, index: int) -> None:
        if self._locked == index:
            self.release()
