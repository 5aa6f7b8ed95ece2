"""Where metrics go: metrics.jsonl always (the source of truth), W&B, CSV and TensorBoard when chosen.

W&B never prompts and never stops a run: offline unless the user is logged in; any failure to start or
log becomes one warning and the local records carry on. The W&B run id is fixed at creation and kept in
the checkpoint, so a resumed run continues the same W&B run.

How a W&B user finds things (docs/usage.md, "W&B"):
- group: every run of one multirun (a study) shares `<experiment>_<launch stamp>`, recorded in the sweep dir's
  `wandb_group.json` when the multirun starts; a `resume=auto` relaunch of the same study (same config and
  sweep) adopts the earlier launch's group, and a resumed run keeps the group of the run it continues. A
  single run's group is its experiment.
- job_type: the run's label (the arm); `study` for the one extra run that logs the gathered study.
- tags: the experiment, `arxiv:<id>` and `scale:<scale>`, then `logger.tags`.
- summary: the final metrics, and the paper's published values as `paper/<metric>`.
- artifacts: `logger.log_model` uploads checkpoints (`model-<run id>`) with results.json and the config;
  the study run uploads study.json and its figures (`study-<group>`). Offline they are recorded in the
  run's `.wandb` file and uploaded by `mlrun sync`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import secrets
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlrun.records import METRICS, RESULTS, MetricsLog, config_digest, read_json, write_atomic, write_json

log = logging.getLogger("mlrun")

REDACTED = "<redacted>"
SECRET_WORDS = ("apikey", "token", "secret", "password", "passwd", "pwd", "credential", "credentials", "auth")
SECRET_ENDINGS = ("apikey", "token", "secret", "password", "passwd", "credential", "credentials")
KEY_QUALIFIERS = ("api", "access", "private", "secret", "auth", "signing", "encryption", "ssh")
ENV_SECRET_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
_PAIR = re.compile(r"(?P<name>[+~]*[A-Za-z_][\w.\-]*)=(?P<value>[^\s,'\"\]}]*)")
_known: set[str] | None = None  # secret values this process has seen (from the environment and the config)
LOG_MODEL = ("false", "best", "last", "all")
GROUP_FILE = "wandb_group.json"
STUDY_JOB_TYPE = "study"


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
        if record.exc_info and not record.exc_text:  # a traceback shows values too
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
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


# ---------------------------------------------------------------------------------------------- names


def run_tags(experiment: str | None, paper: dict | None, scale: str | None, extra: Any = ()) -> list[str]:
    """The tags a W&B user filters on: the experiment, the paper's arXiv id, the scale, then logger.tags."""
    tags = [experiment] if experiment else []
    arxiv = (paper or {}).get("arxiv")
    if arxiv:
        tags.append(f"arxiv:{arxiv}")
    if scale:
        tags.append(f"scale:{scale}")
    tags += [str(t) for t in extra or () if str(t) not in tags]
    return tags


def paper_values(paper: dict | None, label: str | None = None) -> dict[str, float]:
    """`paper/<metric>` -> the published value, for the values that concern a run of this label.

    A `paper.metrics` entry is a number (`test/bpd: 3.49`) or `{value, run, metric, table}`. Entries without
    a `run` concern every run; entries with one only that label's runs (label None: the study, which gets
    every entry under its own name).
    """
    out: dict[str, float] = {}
    for name, spec in ((paper or {}).get("metrics") or {}).items():
        spec = spec if isinstance(spec, dict) else {"value": spec}
        value = spec.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if label is None:
            out[f"paper/{name}"] = float(value)
        elif spec.get("run") in (None, label):
            out[f"paper/{spec.get('metric', name)}"] = float(value)
    return out


def _stamp_name(sweep_dir: Path) -> str:
    stamp = os.environ.get("MLRUN_STAMP")  # `<date>/<time>_<id>`, one per launch (cli._stamp)
    return stamp.replace("/", "_") if stamp else sweep_dir.name


def _records_root(d: Path) -> Path:
    """The outputs/, multirun/ or reproduce/ folder above d (where `resume=auto` looks), else d's parent."""
    for p in [d, *d.parents]:
        if p.name in ("outputs", "multirun", "reproduce"):
            return p
    return d.parent


def study_digest(config: Any) -> str:
    """What makes two launches the same study: the resolved config (without the keys a relaunch may change,
    as `resume=auto` ignores them per run) and the sweep (the sweeper's params and the command line's)."""
    from omegaconf import OmegaConf

    keys = [k for k in config if k != "hydra"]
    try:
        c = OmegaConf.to_container(OmegaConf.masked_copy(config, keys), resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs a job's runtime: compare it unresolved
        c = OmegaConf.to_container(OmegaConf.masked_copy(config, keys), resolve=False)
    for k in ("resume", "eval_only", "logger", "debug"):
        c.pop(k, None)
    (c.get("trainer") or {}).pop("progress", None)
    skip = ("resume=", "logger", "+logger", "debug", "+debug", "trainer.progress=")
    hydra = config.get("hydra") or {}
    params = OmegaConf.to_container(hydra.sweeper.params, resolve=False) if hydra.get("sweeper", {}).get(
        "params") else {}
    task = sorted(o for o in (hydra.get("overrides", {}).get("task") or []) if not o.startswith(skip))
    return config_digest({"config": c, "sweep": params, "overrides": task})


def start_study_group(config: Any) -> str:
    """Fix the W&B group of a multirun before its jobs start (StudyCallback.on_multirun_start).

    Written to `<sweep dir>/wandb_group.json`, which every job reads. With `resume=auto`, the newest earlier
    launch of the same study (same `study_digest`) under the same records root lends its group, so resumed
    runs, fresh runs and the study run of the relaunch stay in one group.
    """
    try:
        return _start_study_group(config)
    except Exception as e:  # noqa: BLE001 - a tracker must never stop a multirun
        log.warning("could not fix the W&B group of this multirun (%s: %s)", type(e).__name__, e)
        return str(config.get("experiment_name") or "unnamed")


def _start_study_group(config: Any) -> str:
    sweep_dir = Path(config.hydra.sweep.dir)
    rec = sweep_dir / GROUP_FILE
    try:
        return str(read_json(rec)["group"])  # a relaunch into the same sweep dir keeps it
    except (OSError, ValueError, KeyError):
        pass
    experiment = str(config.get("experiment_name") or "unnamed")
    digest = study_digest(config)
    group, adopted = f"{experiment}_{_stamp_name(sweep_dir)}", None
    if config.get("resume") == "auto":
        earlier = []
        for p in _records_root(sweep_dir).rglob(GROUP_FILE):
            try:
                r = read_json(p)
            except (OSError, ValueError):
                continue
            if r.get("digest") == digest and p.parent.resolve() != sweep_dir.resolve() and r.get("group"):
                earlier.append((float(r.get("created", 0)), str(p.parent.resolve()), str(r["group"])))
        if earlier:
            _, adopted, group = max(earlier)
            log.info("resume=auto: W&B group %s of the earlier launch %s", group, adopted)
    write_json(rec, {"group": group, "experiment": experiment, "digest": digest, "created": time.time(),
                     "adopted_from": adopted})
    return group


def _origin(run_dir: Path) -> Path | None:
    """The first run of a resume chain (results.json's `resumed_from`, followed back); None when a link of the
    chain is not a run dir on this machine (a downloaded or moved checkpoint)."""
    seen = set()
    while run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        try:
            res = read_json(run_dir / RESULTS)
        except (OSError, ValueError):
            return None
        if Path(res.get("run_dir") or run_dir).resolve() != run_dir.resolve():
            return None  # moved, or an artifact's copy of results.json: its sweep is elsewhere
        prev = res.get("resumed_from")
        if not prev:
            return run_dir
        prev = Path(prev)
        prev = prev.parent.parent if prev.suffix == ".pt" else prev
        if prev.resolve() == run_dir.resolve():  # continued in its own dir (a requeued job)
            return run_dir
        run_dir = prev
    return None


def run_group(run_dir: Path, experiment: str, resumed_from: Path | str | None = None) -> str | None:
    """A run's W&B group: its sweep's (wandb_group.json beside its dir), else its experiment's name.

    A resumed run keeps the group of the chain's first run, wherever this run's own dir is; None (W&B keeps the
    run's group) when that first run's records are not here."""
    origin: Path | None = Path(run_dir)
    if resumed_from:
        prev = Path(resumed_from)
        origin = _origin(prev.parent.parent if prev.suffix == ".pt" else prev)
        if origin is None:
            return None
    try:
        return str(read_json(origin.parent / GROUP_FILE)["group"])
    except (OSError, ValueError, KeyError):
        return experiment or "unnamed"


def _artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:120]


# ---------------------------------------------------------------------------------------------- one run


class Loggers:
    """Fan out one record to every sink. Only rank 0 constructs one with sinks; other ranks get `Loggers.null()`."""

    def __init__(self, run_dir: Path, cfg: Any, config_dict: dict, wandb_id: str | None = None,
                 resume_step: int | None = None, resumed_from: Path | str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir / METRICS, truncate_after_step=resume_step)
        self.wandb_run: Any = None
        self.wandb_id = wandb_id
        self.config_dict = config_dict
        self.log_model = str(cfg.get("log_model") or "false").lower()
        if self.log_model not in LOG_MODEL:
            log.warning("logger.log_model=%s: expected one of %s; no checkpoint will be uploaded", self.log_model,
                        ", ".join(LOG_MODEL))
            self.log_model = "false"
        experiment = str(config_dict.get("experiment_name") or "unnamed")
        self.label = str(config_dict.get("label") or "run")
        self.group = run_group(self.run_dir, experiment, resumed_from)
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
        obj.log_model, obj.group, obj.label, obj.config_dict = "false", None, None, {}
        return obj

    def _start_wandb(self, cfg: Any, config_dict: dict, wandb_id: str | None) -> None:
        try:
            import wandb

            mode = wandb_mode(cfg.mode)
            self.wandb_id = wandb_id or secrets.token_hex(4)  # fixed now, kept in checkpoints, reused on resume
            tags = run_tags(config_dict.get("experiment_name"), config_dict.get("paper"), config_dict.get("scale"),
                            cfg.tags)
            argv, sys.argv = sys.argv, redact(list(sys.argv))  # W&B records the command line in its metadata
            try:
                self.wandb_run = wandb.init(
                    project=cfg.project, entity=cfg.entity, mode=mode, id=self.wandb_id, resume="allow",
                    dir=str(self.run_dir), config=redact(config_dict), tags=tags, group=self.group,
                    job_type=self.label, name=self.run_dir.name,
                    settings=wandb.Settings(silent=True, console="off", init_timeout=float(cfg.init_timeout)),
                )
            finally:
                sys.argv = argv
            self.wandb_run.summary.update(paper_values(config_dict.get("paper"), self.label))
            if mode == "offline":  # said once, at start: where the run is and how it reaches W&B
                where = Path(self.wandb_run.dir).parent
                if where.is_relative_to(Path.cwd()):
                    where = where.relative_to(Path.cwd())
                log.info("W&B offline: %s (upload later with `mlrun sync` once logged in)", where)
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

    def finish(self, summary: dict[str, Any] | None = None, failed: bool = False,
               results: dict[str, Any] | None = None) -> None:
        """End the W&B run: the summary, then (a completed run, `logger.log_model`) its checkpoints.

        `results` is results.json's final content (written right after), uploaded beside the checkpoints."""
        self.flush()
        if self.wandb_run is not None:
            try:
                if summary:
                    for k, v in summary.items():
                        if isinstance(v, int | float | str):
                            self.wandb_run.summary[k] = v
                if (results is not None and results.get("status") == "completed" and not results.get("eval_only")
                        and self.log_model != "false"):  # an eval-only run trained nothing: no checkpoint of its own
                    self._log_checkpoints(results)
                self.wandb_run.finish(exit_code=1 if failed else 0)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B could not finish cleanly (%s)", e)
            self.wandb_run = None
        if self._tb is not None:
            self._tb.close()

    def checkpoints_to_log(self) -> list[tuple[Path, list[str]]]:
        """(checkpoint, aliases) in upload order for `logger.log_model`: the last upload is the newest version."""
        ck = self.run_dir / "checkpoints"
        best, last = ck / "best.pt", ck / "last.pt"
        if self.log_model == "all":
            others = sorted(p for p in ck.glob("*.pt") if p not in (best, last))
            chosen = [(p, [p.stem]) for p in others] + [(p, [p.stem]) for p in (best, last) if p.exists()]
        elif self.log_model == "best" and best.exists():
            chosen = [(best, ["best"])]
        elif self.log_model in ("best", "last") and last.exists():
            if self.log_model == "best":
                log.info("logger.log_model=best: no best.pt (trainer.monitor is unset); uploading last.pt")
            chosen = [(last, ["last"])]
        else:
            chosen = []
        return chosen

    def _log_checkpoints(self, results: dict[str, Any]) -> None:
        import wandb
        from omegaconf import OmegaConf

        chosen = self.checkpoints_to_log()
        if not chosen:
            log.warning("logger.log_model=%s: no checkpoint in %s to upload", self.log_model,
                        self.run_dir / "checkpoints")
            return
        metrics = {k: v for k, v in (results.get("metrics") or {}).items() if isinstance(v, int | float)}
        with tempfile.TemporaryDirectory() as tmp:
            # results.json as the run leaves it (app writes the same dict right after); staged as a copy.
            write_json(Path(tmp) / RESULTS, results)
            write_atomic(Path(tmp) / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redact(self.config_dict))))
            for path, aliases in chosen:
                meta = {"experiment": results.get("experiment"), "label": results.get("label"),
                        "seed": results.get("seed"), "group": self.group, "file": path.name,
                        "step": results.get("steps"), "metrics": metrics}
                if path.name == "best.pt" and results.get("best"):
                    meta.update(step=results["best"].get("step"), best=results["best"])
                elif path.stem.startswith("step-") and path.stem[5:].isdigit():
                    meta["step"] = int(path.stem[5:])
                art = wandb.Artifact(f"model-{self.wandb_id}", type="model", metadata=meta)
                # In place, not copied: the run dir keeps its checkpoints until `mlrun sync` uploads them.
                art.add_file(str(path), name=f"checkpoints/{path.name}", policy="immutable")
                art.add_file(str(Path(tmp) / RESULTS), name=RESULTS)
                art.add_file(str(Path(tmp) / "config.yaml"), name="config.yaml")
                self.wandb_run.log_artifact(art, aliases=aliases)


# ---------------------------------------------------------------------------------------------- the study


def _num(v: Any) -> float | None:
    """A finite number for a W&B table cell, else None (the report's rule, so both show the same values)."""
    from mlrun.report import _number

    return _number(v)


def claim_rows(claims: list[dict[str, Any]], scope: str = "study",
               ) -> tuple[list[str], list[list[Any]], list[str], list[list[Any]]]:
    """Claims as two tables: one row per claim, and one row per claim and seed.

    Reads the paired records (`per_seed` [{seed, lhs, rhs, value, held}], `held_count`, `n_seeds`, and `median`,
    the median per-seed statistic compared with `threshold`) and falls back to a record's `lhs_value`/`rhs_value`
    when it has no seeds. `scope` is `study` for the study's claims, a label for one arm's own claims.
    """
    cols = ["scope", "claim", "status", "held_seeds", "median", "threshold", "lhs", "op", "rhs", "lhs_value",
            "rhs_value", "per_seed", "reason"]
    seed_cols = ["scope", "claim", "seed", "lhs", "rhs", "value", "held"]
    rows, seed_rows = [], []
    for c in claims:
        per_seed = c.get("per_seed") or []
        held = c.get("held_count")
        n = c.get("n_seeds")
        text = "; ".join(
            f"s{s.get('seed')}: {_fmt(s.get('lhs'))} {c.get('op', '?')} {_fmt(s.get('rhs'))}"
            f" ({'held' if s.get('held') else 'failed'})" for s in per_seed)
        rows.append([
            scope, str(c.get("name")), str(c.get("status")), f"{held or 0}/{n}" if n else "", _num(c.get("median")),
            _num(c.get("threshold")), str(c.get("lhs")), str(c.get("op")), str(c.get("rhs")),
            _num(c.get("lhs_value")), _num(c.get("rhs_value")), text, str(c.get("reason") or ""),
        ])
        for s in per_seed:
            seed_rows.append([scope, str(c.get("name")), s.get("seed"), _num(s.get("lhs")), _num(s.get("rhs")),
                              _num(s.get("value", s.get("margin"))), bool(s.get("held"))])
    return cols, rows, seed_cols, seed_rows


def derived_rows(study: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Each derived metric over all seeds, then per seed (`derived_per_seed`), one row per metric."""
    per_seed = study.get("derived_per_seed") or {}
    seeds = sorted(per_seed, key=lambda s: (len(str(s)), str(s)))
    derived = study.get("derived") or {}
    names = list(derived) + sorted({k for v in per_seed.values() for k in v} - set(derived))
    cols = ["metric", "all_seeds", *(f"s{s}" for s in seeds)]
    return cols, [[m, _num(derived.get(m)), *(_num(per_seed[s].get(m)) for s in seeds)] for m in names]


def _fmt(v: Any) -> str:
    f = _num(v)
    return f"{f:.4g}" if f is not None else str(v)


def arm_rows(study: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """label x metric: median, mean, std, n over seeds, and the paper's value where it names that label."""
    paper = study.get("paper") or {}
    cols = ["label", "metric", "median", "mean", "std", "n", "paper"]
    rows = []
    for label, metrics in sorted((study.get("groups") or {}).items()):
        published = paper_values(paper, label)
        for metric, st in sorted(metrics.items()):
            rows.append([label, metric, st.get("median"), st.get("mean"), st.get("std"), st.get("n"),
                         published.get(f"paper/{metric}")])
    return cols, rows


def study_summary(study: dict[str, Any]) -> dict[str, Any]:
    """The study run's summary: derived metrics, the paper's values beside ours, claim and run counts."""
    out: dict[str, Any] = {}
    for k, v in (study.get("derived") or {}).items():
        if _num(v) is not None:
            out[k] = _num(v)
    paper = study.get("paper") or {}
    out.update(paper_values(paper))
    for name, spec in (paper.get("metrics") or {}).items():  # ours beside a value that names a label
        if isinstance(spec, dict) and spec.get("run") and name not in out:
            st = ((study.get("groups") or {}).get(spec["run"]) or {}).get(spec.get("metric", name))
            if st:
                out[name] = st["median"]
    claims = study.get("claims") or []
    runs = [r for r in study.get("runs") or [] if not r.get("superseded")]  # a rerun replaced it
    out.update({f"claims/{st}": sum(c.get("status") == st for c in claims)
                for st in ("held", "fragile", "failed", "unknown")})
    out.update({
        "claims/total": len(claims), "runs/total": len(runs),
        "runs/completed": sum(r.get("status") == "completed" for r in runs),
        "status": study.get("status", "unknown"),
    })
    for k in ("elapsed_s", "wall_time_s"):
        if _num(study.get(k)) is not None:
            out[k] = _num(study[k])
    return out


def log_study(study: dict[str, Any], sweep_dir: Path, config: Any) -> str | None:
    """One extra W&B run in the study's group (job_type `study`): derived metrics, the claims and arms as
    tables, the figures, and study.json as an artifact. Returns the W&B run id (None: not logged)."""
    from omegaconf import OmegaConf

    lc = config.get("logger")
    if lc is None or not lc.get("wandb"):
        return None
    sweep_dir = Path(sweep_dir)
    try:
        import wandb

        experiment = str(study.get("experiment") or config.get("experiment_name") or "unnamed")
        try:
            group = str(read_json(sweep_dir / GROUP_FILE)["group"])
        except (OSError, ValueError, KeyError):
            group = f"{experiment}_{_stamp_name(sweep_dir)}"
        study_cfg = config.get("study")
        hydra = config.get("hydra") or {}
        sweep = hydra.get("sweeper", {}).get("params") if hydra else None
        run_config = redact({
            "experiment_name": experiment, "scale": config.get("scale"), "paper": study.get("paper") or {},
            "study": OmegaConf.to_container(study_cfg, resolve=False) if study_cfg is not None else None,
            "sweep": OmegaConf.to_container(sweep, resolve=False) if sweep else None,
            "overrides": list(hydra.get("overrides", {}).get("task") or []) if hydra else [],
            "sweep_dir": str(sweep_dir),
        })
        run = wandb.init(
            project=lc.project, entity=lc.entity, mode=wandb_mode(lc.mode), id=secrets.token_hex(4),
            dir=str(sweep_dir), config=run_config, group=group, job_type=STUDY_JOB_TYPE, name=f"study {group}",
            tags=run_tags(experiment, study.get("paper"), config.get("scale"), lc.get("tags")),
            settings=wandb.Settings(silent=True, console="off", init_timeout=float(lc.init_timeout)),
        )
        try:
            cols, rows, seed_cols, seed_rows = claim_rows(study.get("claims") or [])
            for label, run_claims in sorted((study.get("run_claims") or {}).items()):  # each arm's own claims
                _, more, _, more_seeds = claim_rows(run_claims, scope=label)
                rows, seed_rows = rows + more, seed_rows + more_seeds
            arm_cols, arms = arm_rows(study)
            derived_cols, derived = derived_rows(study)
            figures = [sweep_dir / f for f in study.get("figures") or [] if (sweep_dir / f).exists()]
            pieces: dict[str, Any] = {
                "claims": lambda: wandb.Table(columns=cols, data=rows),
                "arms": lambda: wandb.Table(columns=arm_cols, data=arms),
                **({"claims_per_seed": lambda: wandb.Table(columns=seed_cols, data=seed_rows)} if seed_rows else {}),
                **({"derived": lambda: wandb.Table(columns=derived_cols, data=derived)} if derived else {}),
                **{f"figures/{p.stem}": (lambda p=p: wandb.Image(str(p))) for p in figures},
            }
            record: dict[str, Any] = {}
            for key, make in pieces.items():  # one piece W&B refuses must not lose the others
                try:
                    record[key] = make()
                except Exception as e:  # noqa: BLE001
                    log.warning("W&B study run: %s left out (%s: %s)", key, type(e).__name__, str(e)[:200])
            run.log(record)
            run.summary.update(study_summary(study))
            art = wandb.Artifact(_artifact_name(f"study-{group}"), type="study", metadata={
                "experiment": experiment, "status": study.get("status"), "sweep_dir": str(sweep_dir),
                "claims": {c.get("name"): c.get("status") for c in study.get("claims") or []}})
            art.add_file(str(sweep_dir / "study.json"), name="study.json")
            for p in figures:
                art.add_file(str(p), name=f"figures/{p.name}")
            run.log_artifact(art)
        finally:
            run.finish()
        return run.id
    except Exception as e:  # noqa: BLE001 - the study's records on disk are what count
        log.warning("W&B could not log the study (%s: %s)", type(e).__name__, e)
        return None


# ---------------------------------------------------------------------------------------------- offline files


def offline_records(path: Path | str) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record`s of an offline run's `.wandb` file, in order.

    The format: a 7-byte header, then LevelDB-style log records in 32 KiB blocks (7-byte record header:
    crc32, uint16 length, type 1 full / 2 first / 3 middle / 4 last), each payload one protobuf Record.
    W&B 0.31 has no Python reader of its own (its core is in Go); this is for tests and `mlrun sync`.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            parts = payload
        else:
            parts += payload
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            yield rec


def offline_run_info(run_dir: Path | str) -> dict[str, Any]:
    """What an offline run dir (`wandb/offline-run-*`) would send: id, group, job type, tags, artifacts."""
    info: dict[str, Any] = {"id": None, "group": "", "job_type": "", "tags": [], "artifacts": [], "finished": False}
    for f in sorted(Path(run_dir).glob("*.wandb")):
        for rec in offline_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, group=rec.run.run_group, job_type=rec.run.job_type,
                            tags=list(rec.run.tags), name=rec.run.display_name)
            elif kind == "artifact":
                info["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                          "aliases": list(rec.artifact.aliases)})
            elif kind == "exit":
                info["finished"] = True
    return info

