"""`mlrun`: the Hydra app, plus the verbs `ls`, `report`, `validate` and `sync`.

Nothing heavy is imported at module level, so `--help`, tab completion, listing and reporting start
in well under a second; torch is imported only when a run starts.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("mlrun")

VERBS = ("ls", "report", "validate", "sync", "reproduce")


def _stamp() -> str:
    """`<date>/<time>_<random id>`, fixed once per launch and shared with every job process.

    Kept in the environment so that jobs run by other processes (joblib, submitit, SLURM) resolve the same
    sweep dir as the launching process, and two launches in the same second still get distinct dirs.
    """
    if "MLRUN_STAMP" not in os.environ:
        now = datetime.now()
        os.environ["MLRUN_STAMP"] = f"{now:%Y-%m-%d}/{now:%H-%M-%S}_{secrets.token_hex(3)}"
    return os.environ["MLRUN_STAMP"]


def setup() -> None:
    """Register the schemas and resolvers; idempotent (the API and tests call it too)."""
    from omegaconf import OmegaConf

    from mlrun import schema

    schema.register()
    if not OmegaConf.has_resolver("mlrun_stamp"):
        OmegaConf.register_new_resolver("mlrun_stamp", _stamp)
    if not OmegaConf.has_resolver("mlrun_pad"):  # sweep subfolders sort in job order: 000_, 001_, ..., 010_
        OmegaConf.register_new_resolver("mlrun_pad", lambda n, width=3: str(n).zfill(int(width)))
    # Integer arithmetic between config keys, e.g. a simulated data-parallel batch `${mlrun_mul:8,${n}}` or
    # steps per epoch `${mlrun_floordiv:1077,${dataset.batch_size}}`.
    if not OmegaConf.has_resolver("mlrun_mul"):
        OmegaConf.register_new_resolver("mlrun_mul", lambda a, b: int(a) * int(b))
    if not OmegaConf.has_resolver("mlrun_floordiv"):
        OmegaConf.register_new_resolver("mlrun_floordiv", lambda a, b: int(a) // int(b))
    # A value chosen by another key, e.g. a stage's monitor by the study's arm:
    # `${mlrun_pick:${stages.1.args.arm},{seq2seq:val/ppl}}` (null for a key the mapping lacks).
    if not OmegaConf.has_resolver("mlrun_pick"):
        OmegaConf.register_new_resolver("mlrun_pick", lambda key, mapping, default=None: mapping.get(key, default))


def experiments() -> list[str]:
    return groups()["experiment"]


_ROOTS_BEFORE: set[Path] = set()
"""The default output roots that existed before this launch (a failed start removes the ones it made)."""
STOP = ".stop"
"""A file in a sweep dir that stops the sweep: running jobs checkpoint and end, queued ones do not start."""
_OUTCOME: dict[str, Any] = {}
"""How the last multirun of this process ended (set by SweepGuard in the launching process)."""


def _job(cfg: Any) -> float | None:
    """Hydra's task: one run, every failure of which is one line (a traceback only with HYDRA_FULL_ERROR=1)."""
    try:
        return _run_job(cfg)
    except Exception as e:  # noqa: BLE001 - e.g. a hydra.run.dir that does not resolve
        if os.environ.get("MLRUN_TRACEBACK"):
            raise
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from mlrun.errors import describe

        _fail(describe(e), HydraConfig.get().mode == RunMode.MULTIRUN)
        return None


def _run_job(cfg: Any) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mlrun.loggers import redact, register_secrets

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    logging.raiseExceptions = False  # a log file that cannot be written must not print a traceback per line
    if os.environ.get("MLRUN_LAUNCHER_PID", str(os.getpid())) != str(os.getpid()):
        # a job process of a parallel launcher (joblib, submitit): Ctrl-C reaches it too, and an idle worker that
        # died of it would break the pool. Its run still stops: the trainer catches SIGINT while it trains, and the
        # launching process, which got the Ctrl-C as well, stops the sweep (STOP).
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)  # `label=${label}` is text here
    register_secrets(overrides)
    roots = output_roots(hc)
    sweep_dir = Path(hc.sweep.dir) if multirun else None
    if sweep_dir is not None:
        _redact_file(sweep_dir / "multirun.yaml")
        if (sweep_dir / STOP).exists():
            _remove_debris(run_dir, roots)
            print(f"mlrun: the sweep was stopped; not starting {run_dir.name}", file=sys.stderr, flush=True)
            return None
    if OmegaConf.is_missing(cfg, "model") or OmegaConf.is_missing(cfg, "dataset"):
        _remove_debris(run_dir, roots)
        _fail("choose an experiment: mlrun experiment=NAME, one of: " + ", ".join(experiments()), multirun)
        return None
    from mlrun.app import RunFailed, run_experiment

    if "Joblib" in str(hc.launcher.get("_target_", "")) and cfg.hardware.nproc_per_node * cfg.hardware.nnodes > 1:
        cfg.hardware.start_method = "fork"  # spawned workers cannot start from inside a loky worker process
    files = {
        ".hydra/config.yaml": OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=False))),
        ".hydra/hydra.yaml": OmegaConf.to_yaml({"hydra": redact(OmegaConf.to_container(hc, resolve=False))}),
        ".hydra/overrides.yaml": OmegaConf.to_yaml(redact(overrides)),
    }
    watcher = _StopWatcher(sweep_dir / STOP) if sweep_dir is not None else None
    try:
        results = run_experiment(cfg, run_dir, roots=roots, files=files)
    except RunFailed as e:
        if multirun and e.code == 130:
            _mark_stop(sweep_dir)
        cause = e.__cause__
        where = f"Records in {run_dir}"
        if cause is not None and not _expected(cause):
            logging.getLogger("mlrun.traceback").error("traceback", exc_info=cause)
            where += f" (traceback in {run_dir / 'mlrun.log'})"
        _fail(f"{cfg.experiment_name}: {e.results.get('status', 'failed')}: {e}. {where}", multirun, e.code)
        return None
    except Exception as e:  # noqa: BLE001 - a start that failed before anything was recorded: one line
        if os.environ.get("MLRUN_TRACEBACK"):
            raise
        from mlrun.errors import RunDirError, describe

        if multirun and not isinstance(e, RunDirError):
            _record_failed_start(cfg, run_dir, describe(e))
        elif not multirun:
            _remove_debris(run_dir, roots)
        _fail(f"{cfg.experiment_name}: {describe(e)}", multirun)
        return None
    finally:
        if watcher is not None:
            watcher.stop()
    if hc.sweeper.get("_target_", "").endswith("OptunaSweeper") and not cfg.objective:
        _fail("a search needs the metric to optimise: set objective=<metric> (e.g. objective=val/acc)", multirun)
        return float("nan")
    if cfg.objective:
        value = results["metrics"].get(cfg.objective)
        if value is None:
            _fail(f"objective {cfg.objective!r} is not among the metrics: {sorted(results['metrics'])}", multirun)
        return float(value) if value is not None else float("nan")
    return None


def _fail(message: str, multirun: bool, code: int = 1) -> None:
    """One line, no traceback. In a multirun the sweep goes on (the run's results.json says it failed)."""
    from mlrun.loggers import redact_text

    print(f"mlrun: error: {redact_text(message)}", file=sys.stderr, flush=True)
    if not multirun:
        sys.exit(code)


def _expected(e: BaseException) -> bool:
    """Errors whose message is the whole story (no traceback worth keeping)."""
    from mlrun.errors import MlrunError

    if type(e).__name__ == "InstantiationException":
        return True  # building what the config names failed: the config is the story
    return isinstance(e, MlrunError | KeyboardInterrupt | OSError)


# ---------------------------------------------------------------------------------------------- run dirs


def output_roots(hc: Any) -> list[Path]:
    """The configured run and sweep base folders: each of hydra.run.dir and hydra.sweep.dir up to its first
    `${...}` (outputs/ and multirun/ by default); a dir with no `${...}` is its own root. `resume=auto` looks
    there and nowhere above; a failed start removes the empty folders it made below them."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(hc, resolve=False)
    out = []
    for template, resolved in ((raw["run"]["dir"], hc.run.dir), (raw["sweep"]["dir"], hc.sweep.dir)):
        parts = Path(str(template)).parts
        literal = list(itertools.takewhile(lambda p: "${" not in p, parts))
        out.append(Path(str(resolved)) if len(literal) == len(parts) else Path(*literal) if literal else Path("."))
    return out


def _remove_debris(run_dir: Path, roots: list[Path]) -> None:
    """A start that failed leaves no folder behind: remove the run dir when it holds nothing but the log of this
    failed start, then its parents while empty, up to (not including) the output root it sits in."""
    try:
        if not run_dir.is_dir() or any(p.name not in ("mlrun.log", ".hydra") for p in run_dir.iterdir()):
            return
        shutil.rmtree(run_dir)
        here = run_dir.resolve()
        base = next((r.resolve() for r in roots if r.resolve() in here.parents), None)
        parent = run_dir.resolve().parent
        while base is not None and parent != base and base in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        if base is not None and base not in _ROOTS_BEFORE and base.is_dir() and not any(base.iterdir()):
            base.rmdir()  # this launch made the output root itself
    except OSError:
        pass


def _remove_empty_parents(path: Path) -> None:
    """Hydra makes the run dir's parents before it fails on the run dir itself (a name too long): remove the empty
    ones it made, inside the working directory only."""
    cwd = Path.cwd().resolve()
    parent = path.absolute().parent
    try:
        while cwd in parent.parents and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    except OSError:
        pass


def _record_failed_start(cfg: Any, run_dir: Path, error: str) -> None:
    """In a sweep a job that could not start is a failed run on record (the study lists it, the exit code
    counts it), not a missing one."""
    from mlrun.records import RESULTS, utc_now, write_json

    if (run_dir / RESULTS).exists():
        return
    try:
        label, seed = cfg.get("label"), cfg.get("seed")
    except Exception:  # noqa: BLE001 - the very keys may be what does not resolve
        label, seed = None, None
    try:
        write_json(run_dir / RESULTS, {"experiment": cfg.get("experiment_name"), "label": label, "seed": seed,
                                       "status": "failed", "failed_start": True, "error": error,
                                       "started_at": utc_now(),
                                       "finished_at": utc_now(), "run_dir": str(run_dir), "metrics": {},
                                       "claims": []})
    except Exception:  # noqa: BLE001
        pass


def _redact_file(path: Path) -> None:
    """Rewrite a YAML file Hydra wrote (multirun.yaml) without the secrets it holds."""
    from mlrun.loggers import redact, redact_text

    try:
        text = path.read_text()
    except OSError:
        return
    import yaml

    try:
        clean = yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)
    except yaml.YAMLError:
        clean = redact_text(text)
    if clean != text:
        from mlrun.records import write_atomic

        write_atomic(path, clean)


# ---------------------------------------------------------------------------------------------- stopping a sweep


def _mark_stop(sweep_dir: Path | None) -> None:
    if sweep_dir is not None:
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / STOP).touch()
        except OSError:
            pass


class _StopWatcher:
    """In a sweep's job process: when the sweep is stopped (the launching process got Ctrl-C, or another job was
    interrupted), ask this job's run to checkpoint and stop, as its own Ctrl-C would."""

    def __init__(self, marker: Path, every: float = 0.5) -> None:
        import threading

        self.marker, self.every = marker, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mlrun-stop-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from mlrun.app import stop_current_run

        while not self._done.wait(self.every):
            if self.marker.exists() and stop_current_run("the sweep was stopped"):
                return

    def stop(self) -> None:
        self._done.set()


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object  # type: ignore[assignment,misc]


class SweepGuard(_Callback):
    """The launching process of a multirun. Ctrl-C (or SIGTERM) stops the sweep: no new job starts, running jobs
    checkpoint and end, a second Ctrl-C aborts at once. At the end it counts the runs, so `mlrun -m` exits 1 when
    any failed and 130 when the sweep was stopped; runs resumed from an earlier sweep mark its study.json as
    superseded."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        import signal

        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        (self.sweep_dir / STOP).unlink(missing_ok=True)  # relaunched into the same dir: start afresh
        self._old: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
            if (self.sweep_dir / STOP).exists():
                raise KeyboardInterrupt
            _mark_stop(self.sweep_dir)
            print("mlrun: stopping the sweep: running jobs write a checkpoint, no new job starts "
                  "(Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass
        _OUTCOME.clear()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        import signal

        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)
        from mlrun.records import RESULTS, read_json

        statuses = []
        resumed = []
        for p in sorted(self.sweep_dir.glob(f"*/{RESULTS}")):
            try:
                res = read_json(p)
            except (OSError, ValueError):
                res = {"status": "unreadable"}
            statuses.append(res.get("status", "unknown") if isinstance(res, dict) else "unreadable")
            for k in ("resumed_from", "reused_from"):
                if isinstance(res, dict) and res.get(k):
                    resumed.append((Path(res[k]), p.parent))
        _OUTCOME.update(sweep_dir=str(self.sweep_dir), runs=len(statuses), stopped=(self.sweep_dir / STOP).exists(),
                        failed=sum(s not in ("completed", "interrupted") for s in statuses),
                        interrupted=sum(s == "interrupted" for s in statuses))
        _supersede(resumed, self.sweep_dir)


def _supersede(resumed: list[tuple[Path, Path]], sweep_dir: Path) -> None:
    """An earlier sweep whose runs this one continued or reused is no longer the result: its study.json says so
    (`superseded_by`), and each such run points at the run that carried it on."""
    from mlrun.records import STUDY, read_json, write_json

    by_study: dict[Path, dict[str, str]] = {}
    for old, new in resumed:
        study = old.parent / STUDY
        if study.exists() and old.parent.resolve() != sweep_dir.resolve():
            by_study.setdefault(study, {})[str(old.resolve())] = str(new)
    for study, moved in by_study.items():
        try:
            s = read_json(study)
            s["superseded_by"] = str(sweep_dir)
            for r in s.get("runs", []):
                new = moved.get(str(Path(r.get("dir", "")).resolve()))
                if new:
                    r["continued_by"] = new
            write_json(study, s)
        except (OSError, ValueError, AttributeError):
            pass
HIDDEN = ("claims.", "paper.", "smoke=", "part_of=", "study=", "study.", "scale=")
"""Keys the experiment files own: tab completion does not offer them."""


def _complete(argv: list[str]) -> None:
    """Tab completion: Hydra's candidates without the experiment files' own keys, plus the verbs as first word."""
    import contextlib
    import io

    buf = io.StringIO()
    sys.argv = [sys.argv[0], *argv]
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        _hydra_main()
    words = os.environ.get("COMP_LINE", "").split()
    typing = "" if os.environ.get("COMP_LINE", "").endswith(" ") else (words[-1] if len(words) > 1 else "")
    first = len(words) == 1 or (len(words) == 2 and typing)
    verbs = [v for v in VERBS if v.startswith(typing)] if first else []
    out = verbs + [w for w in buf.getvalue().split() if not w.startswith(HIDDEN)]
    print("\n".join(out))


def _quote_sweep_param(arg: str) -> str:
    """`hydra.sweeper.params.seed=5,6,7` replaces the study's own sweep of that key (fresh seeds without editing a
    file). Hydra refuses a sweep over its own config, so the list goes in as the string its sweeper parses."""
    key, eq, value = arg.partition("=")
    if eq and key.startswith("hydra.sweeper.params.") and "," in value and value[:1] not in "'\"":
        return f"{key}='{value}'"
    return arg


def _hydra_main() -> None:
    import hydra

    setup()
    app = hydra.main(version_base=None, config_path="pkg://mlrun.conf", config_name="config")(_job)
    app()


HELP = """mlrun: reproduce landmark ML papers, each from one command.

Usage:
  mlrun experiment=NAME [group=option] [key=value ...]   run one experiment
  mlrun -m experiment=NAME [key=a,b ...]                 run its study (the sweep it declares), or any sweep
  mlrun ls                                               list the experiments
  mlrun report [DIRS] [--format markdown|csv|json] [--out FILE]   gather results beside the papers' numbers
  mlrun validate                                         compose and check every experiment and preset
  mlrun reproduce [NAMES] [--readme README.md]           every CPU-scale experiment and study, then the report
  mlrun sync [DIRS]                                      upload finished offline W&B runs

Config groups (choose one with group=option):
{groups}
Common keys: seed=N  resume=<run dir>|auto  eval_only=true  trainer.max_steps=N  trainer.precision=bf16
             --no-cache (or cache.stages=false): recompute stages a study's arms would share
             hardware.nproc_per_node=N  logger.project=NAME  dataset.root=PATH

Examples:
  mlrun experiment=digits_classifier
  mlrun -m experiment=groupnorm_digits hydra/launcher=local
  mlrun experiment=realnvp_cifar hardware=gpu dataset.root=/data

More: docs/usage.md. Hydra's own flags: mlrun --hydra-help. Full tracebacks: HYDRA_FULL_ERROR=1.
"""


def groups() -> dict[str, list[str]]:
    """Config groups and options read off the shipped files (Hydra's own listing costs seconds)."""
    from importlib.resources import files

    root = files("mlrun.conf")
    out = {}
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        if d.is_dir() and d.name not in ("hydra", "__pycache__"):
            out[d.name] = sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))
    return out


def print_help() -> None:
    text = "".join(f"  {g}: {', '.join(opts)}\n" for g, opts in groups().items())
    print(HELP.format(groups=text))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # A W&B service address inherited from a parent process (a notebook, a script that ran wandb.init) would make
    # this command's runs attach to that process's service, whose lifetime mlrun does not control: start our own.
    os.environ.pop("WANDB_SERVICE", None)
    if argv in (["--help"], ["-h"]):
        print_help()
        return
    if argv and argv[0] in VERBS:
        verb, rest = argv[0], argv[1:]
        if verb == "ls":
            from mlrun.report import ls_main

            sys.exit(ls_main(rest))
        if verb == "report":
            from mlrun.report import report_main

            sys.exit(report_main(rest))
        if verb == "validate":
            from mlrun.validate import validate_main

            sys.exit(validate_main(rest))
        if verb == "reproduce":
            from mlrun.reproduce import reproduce_main

            sys.exit(reproduce_main(rest))
        if verb == "sync":
            from mlrun.report import sync_main

            sys.exit(sync_main(rest))
    if any(a.startswith("query=") for a in argv) and ("-sc" in argv or "--shell-completion" in argv):
        _complete(argv)
        return
    argv = [_quote_sweep_param(a) for a in argv]
    if "--no-cache" in argv:  # the stage cache's off switch, as a flag
        argv = [a for a in argv if a != "--no-cache"] + ["cache.stages=false"]
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("MLRUN_STAMP", None)  # a new launch, a new stamp (job processes inherit it, never call main)
    _stamp()
    os.environ["MLRUN_LAUNCHER_PID"] = str(os.getpid())
    _ROOTS_BEFORE.clear()
    _ROOTS_BEFORE.update(Path(d).resolve() for d in ("outputs", "multirun") if Path(d).is_dir())
    sys.argv = [sys.argv[0], *argv]
    # Hydra prints its own errors as a block with hints (some of which lead into a crash); with HYDRA_FULL_ERROR
    # it raises them instead, and we print one line. The user's own HYDRA_FULL_ERROR=1 still shows tracebacks.
    full = os.environ.get("HYDRA_FULL_ERROR") == "1" or bool(os.environ.get("MLRUN_TRACEBACK"))
    if full:
        os.environ["MLRUN_TRACEBACK"] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _OUTCOME.clear()
    try:
        _hydra_main()
    except KeyboardInterrupt:
        print("mlrun: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if full:
            raise
        from mlrun.loggers import redact_text

        if isinstance(e, OSError) and e.filename:
            _remove_empty_parents(Path(str(e.filename)))
        print(f"mlrun: error: {redact_text(startup_error(e, argv))}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if not full:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if _OUTCOME:
        sys.exit(_sweep_exit(_OUTCOME))


def _sweep_exit(o: dict[str, Any]) -> int:
    """A sweep with failed runs exits 1 and a stopped one 130, each saying so in one line."""
    if o["stopped"] or o["interrupted"]:
        print(f"mlrun: the sweep was stopped: {o['runs'] - o['interrupted'] - o['failed']} run(s) finished, "
              f"{o['interrupted']} interrupted, {o['failed']} failed; the same command with resume=auto finishes it",
              file=sys.stderr, flush=True)
        return 130
    if o["failed"]:
        print(f"mlrun: error: {o['failed']} of {o['runs']} runs failed; see {o['sweep_dir']}", file=sys.stderr,
              flush=True)
        return 1
    return 0


def startup_error(e: BaseException, argv: list[str]) -> str:
    """One line for what Hydra raises before a job runs: a bad override or option (with "did you mean"), an
    override that does not parse, a run dir that cannot be made."""
    from difflib import get_close_matches

    from mlrun.errors import describe

    name = type(e).__name__
    first = str(e).strip().splitlines()[0] if str(e).strip() else name
    if name == "MissingConfigException" and getattr(e, "missing_cfg_file", None) and getattr(e, "options", None):
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        close = get_close_matches(option, e.options, n=1, cutoff=0.6)
        if close:
            return f"{group}={option}: no such {group}; did you mean {group}={close[0]}?"
        listing = "`mlrun ls` lists them" if group == "experiment" else "one of: " + ", ".join(e.options)
        return f"{group}={option}: no such {group}; {listing}"
    cause = e.__cause__
    if name == "ConfigCompositionException" and cause is not None and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        given = next((a for a in argv if a.lstrip("+~").split("=")[0] == key), key)
        msg = str(cause).strip().splitlines()[0]
        if type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
            parent = getattr(cause, "parent_node", None)
            keys = [str(k) for k in parent.keys()] if hasattr(parent, "keys") else []
            close = get_close_matches(str(cause.key), keys, n=1, cutoff=0.6)
            where = key.rpartition(".")[0]
            if "is not in struct" in msg:
                msg = f"Key '{cause.key}' is not in {where or 'the config'}" + ("" if close else
                                                                               f" (its keys: {', '.join(keys)})")
            return given + ": " + msg + (f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else "")
        return f"{given}: {msg}"
    if name == "ConfigCompositionException":
        return first
    if name == "OverrideParseException":
        return f"an override does not parse: {first}"
    if isinstance(e, OSError) and e.filename:
        path = str(e.filename)
        path = path if len(path) <= 120 else path[:50] + "..." + path[-50:]
        return f"cannot create or write {path}: {e.strerror or describe(e)}"
    if isinstance(e, ValueError) and isinstance(e.__cause__, OSError):  # logging could not open the log file
        return startup_error(e.__cause__, argv)
    return describe(e)


if __name__ == "__main__":
    main()
