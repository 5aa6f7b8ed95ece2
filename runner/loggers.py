"""Where metrics go: metrics.jsonl always (the source of truth), W&B, CSV and TensorBoard when chosen.

W&B never prompts and never stops a run: offline unless the user is logged in; any failure to start or
log becomes one warning and the local records carry on. The W&B run id is fixed at creation and kept in
the checkpoint, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any

from mlrun.records import METRICS, MetricsLog

log = logging.getLogger("mlrun")

REDACTED = "<redacted>"
SECRET_WORDS = ("apikey", "token", "secret", "password", "passwd", "pwd", "credential", "credentials", "auth")
SECRET_ENDINGS = ("apikey", "token", "secret", "password", "passwd", "credential", "credentials")
KEY_QUALIFIERS = ("api", "access", "private", "secret", "auth", "signing", "encryption", "ssh")
ENV_SECRET_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
_PAIR = re.compile(r"(?P<name>[+~]*[A-Za-z_][\w.\-]*)=(?P<value>[^\s,'\"\]}]*)")
_known: set[str] | None = None  # secret values this process has seen (from the environment and the config)


def known_secrets() -> set[str]:
    global _known
    if _known is None:
        _known = env_secrets()
    return _known


def secret_name(name: str) -> bool:
    """Whether a config key or override names a secret: one of its words (split at `_`, `.`, `-` and camelCase) is
    token/secret/password/credential/auth or ends in one (`dbpassword`), or it is an api/access/private... `key`.
    `max_tokens`, `sort_key` and `stage_key` are not."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()) if w]
    if any(w in SECRET_WORDS or w.endswith(SECRET_ENDINGS) for w in words):
        return True
    return any(w == "key" and i > 0 and words[i - 1] in KEY_QUALIFIERS for i, w in enumerate(words))


def env_secrets(environ: dict[str, str] | None = None) -> set[str]:
    """Values of environment variables named like *KEY*, *TOKEN*, *SECRET*, *PASSWORD*, *CREDENTIAL*: long enough
    to be a secret (8+ characters) and not a path or a number, so redacting them cannot mangle other text."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if any(p in k.upper() for p in ENV_SECRET_PARTS)
            and len(v) >= 8 and not v.isdigit() and not os.path.exists(v)}


def register_secrets(config: Any) -> None:
    """Remember the environment's secrets and the values of the config's secret-named keys (resolved), so that
    every later `redact` also removes them from free text (override lists, log lines, error messages)."""
    known = known_secrets()
    known.update(env_secrets())

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if secret_name(k) and isinstance(v, str) and _worth_hiding(v):
                    known.add(v)
                walk(v)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v)
            for item in node:
                if isinstance(item, str):
                    walk_override(item)

    def walk_override(text: str) -> None:
        for m in _PAIR.finditer(text):
            if secret_name(m["name"].rsplit(".", 1)[-1]) and _worth_hiding(m["value"]):
                known.add(m["value"])

    walk(config)


def _worth_hiding(value: str) -> bool:
    """Long and distinctive enough that replacing it wherever it appears cannot mangle ordinary text."""
    return len(value) >= 6 and not value.replace(".", "").replace("-", "").isdigit() and value not in ("null", "None")


def redact_text(text: str) -> str:
    def pair(m: re.Match) -> str:
        return f"{m['name']}={REDACTED}" if m["value"] and secret_name(m["name"].rsplit(".", 1)[-1]) else m[0]

    text = _PAIR.sub(pair, text) if "=" in text else text
    for value in sorted(known_secrets(), key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, by_name: bool = True) -> Any:
    """A copy with secrets removed: the value of every key that names a secret (`by_name`, for configs),
    `name=value` pairs whose name does in any string (overrides), and every known secret value wherever it appears
    (an env var resolved into the config through `${oc.env:...}`, say). Applied to every file mlrun writes into a
    run dir and to what W&B gets; records that are not configs (results.json: metric names) use by_name=False."""
    if isinstance(obj, dict):
        return {k: (REDACTED if by_name and secret_name(k) and v is not None else redact(v, by_name))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, by_name) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactFilter(logging.Filter):
    """Log lines (console and mlrun.log) pass through `redact_text`: Hydra logs each job's overrides."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem, not ours
            return True
        clean = redact_text(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


class RunLog(logging.FileHandler):
    """`<run dir>/mlrun.log`, opened at its first line. When it cannot be opened (a read-only run dir, or the folder
    of a failed start, removed) its lines are dropped: a log call never raises, and mlrun names the run dir."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError:
                return
        super().emit(record)


class Without(logging.Filter):
    """Drops the records of one logger (the console skips `mlrun.traceback`, which mlrun.log keeps)."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.without = name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != self.without


def wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    try:
        if netrc.exists() and "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class Loggers:
    """Fan out one record to every sink. Only rank 0 constructs one with sinks; other ranks get `Loggers.null()`."""

    def __init__(self, run_dir: Path, cfg: Any, config_dict: dict, wandb_id: str | None = None,
                 resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir / METRICS, truncate_after_step=resume_step)
        self.wandb_run: Any = None
        self.wandb_id = wandb_id
        self._csv: Any = None
        self._csv_fields: list[str] = []
        self._tb: Any = None
        if cfg.wandb:
            self._start_wandb(cfg, config_dict, wandb_id)
        if cfg.csv:
            self._csv_path = self.run_dir / "metrics.csv"
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError as e:
                warnings.warn(f"tensorboard logger unavailable ({e}); install `tensorboard`", stacklevel=2)

    @classmethod
    def null(cls) -> Loggers:
        obj = cls.__new__(cls)
        obj.metrics, obj.wandb_run, obj.wandb_id, obj._csv, obj._tb = None, None, None, None, None
        obj._csv_fields = []
        return obj

    def _start_wandb(self, cfg: Any, config_dict: dict, wandb_id: str | None) -> None:
        try:
            import wandb

            mode = wandb_mode(cfg.mode)
            self.wandb_id = wandb_id or secrets.token_hex(4)  # fixed now, kept in checkpoints, reused on resume
            argv, sys.argv = sys.argv, redact(list(sys.argv))  # W&B records the command line in its metadata
            try:
                self.wandb_run = wandb.init(
                    project=cfg.project, entity=cfg.entity, mode=mode, id=self.wandb_id, resume="allow",
                    dir=str(self.run_dir), config=redact(config_dict), tags=list(cfg.tags),
                    name=self.run_dir.name,
                    settings=wandb.Settings(silent=True, console="off", init_timeout=float(cfg.init_timeout)),
                )
            finally:
                sys.argv = argv
        except Exception as e:  # noqa: BLE001 - a tracker must never take a run down
            log.warning("W&B could not start (%s: %s); continuing with local records only", type(e).__name__, e)
            self.wandb_run = None

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)
        step = record.get("global_step", record.get("step"))
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("step", "global_step")}
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(numbers, step=step)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B log failed (%s); continuing with local records only", e)
                self.wandb_run = None
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if hasattr(self, "_csv_path"):
            self._write_csv(record)

    def _write_csv(self, record: dict[str, Any]) -> None:
        new_fields = [k for k in record if k not in self._csv_fields]
        if new_fields:
            self._csv_fields += new_fields
            rows = []
            if self._csv_path.exists():
                with open(self._csv_path) as f:
                    rows = list(csv.DictReader(f))
            with open(self._csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self._csv_fields)
                w.writeheader()
                w.writerows(rows)
        with open(self._csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._csv_fields).writerow(record)

    def log_figures(self, paths: list[Path]) -> None:
        if self.wandb_run is None or not paths:
            return
        try:
            import wandb

            self.wandb_run.log({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in paths})
        except Exception as e:  # noqa: BLE001
            log.warning("W&B could not take the figures (%s)", e)

    def flush(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()

    def finish(self, summary: dict[str, Any] | None = None, failed: bool = False) -> None:
        self.flush()
        if self.wandb_run is not None:
            try:
                if summary:
                    for k, v in summary.items():
                        if isinstance(v, int | float | str):
                            self.wandb_run.summary[k] = v
                self.wandb_run.finish(exit_code=1 if failed else 0)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B could not finish cleanly (%s)", e)
            self.wandb_run = None
        if self._tb is not None:
            self._tb.close()
