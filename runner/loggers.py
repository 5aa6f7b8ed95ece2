"""Where metrics go: metrics.jsonl always (the source of truth), W&B, CSV and TensorBoard when chosen.

W&B never prompts and never stops a run: offline unless the user is logged in; any failure to start or
log becomes one warning and the local records carry on. The W&B run id is fixed at creation and kept in
the checkpoint, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

from mlrun.records import METRICS, MetricsLog

log = logging.getLogger("mlrun")

SECRET_KEYS = ("api_key", "apikey", "token", "password", "secret")


def redact(obj: Any) -> Any:
    """Drop values whose key names a secret, so no key ever reaches a config dump or results.json."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if any(s in str(k).lower() for s in SECRET_KEYS) else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


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
            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=mode, id=self.wandb_id, resume="allow",
                dir=str(self.run_dir), config=redact(config_dict), tags=list(cfg.tags),
                name=self.run_dir.name,
                settings=wandb.Settings(silent=True, console="off", init_timeout=float(cfg.init_timeout)),
            )
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
