"""One run, from a composed config to its records. Used by the CLI, the Python API and DDP workers.

A run has two phases. Its start checks everything a user can get wrong (the schema's choices and ranges, the
device, the checkpoint to resume, the run dir) and writes nothing but its claim on the run dir, so a bad input is
one line and no record. From then on a `RunRecord` owns results.json: whatever ends the run (an error while the
data or the model is built, Ctrl-C, a full disk), results.json says `failed` or `interrupted`, with the error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mlrun import claims as claims_mod
from mlrun.errors import ConfigError, Interrupted, MlrunError, describe
from mlrun.records import (
    METRICS,
    RESULTS,
    RunDir,
    RunRecord,
    config_digest,
    git_commit,
    machine,
    read_json,
    remove_temp_files,
    utc_now,
    versions,
    write_atomic,
    write_json,
)

log = logging.getLogger("mlrun")

FINAL = ("completed",)
DEFAULT_ROOTS = ("outputs", "multirun")
"""Where `resume=auto` looks when no Hydra config names the output roots (the Python API): conf/config.yaml's
run and sweep base folders, relative to the working directory."""


class RunFailed(RuntimeError):
    """The run started and its results.json says how it ended (`failed` or `interrupted`, exit code 1 or 130)."""

    def __init__(self, message: str, code: int, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.results = results


_DDP_WORKERS = False  # this process is running a DDP launch (its agent forwards SIGTERM to the workers)


def stop_current_run(reason: str) -> bool:
    """Stop the run going on in this process as Ctrl-C would (a checkpoint, then `interrupted`); False if none is."""
    import signal
    import sys

    trainer = sys.modules.get("mlrun.trainer")
    if trainer is not None and trainer.request_stop(reason):
        return True
    if _DDP_WORKERS:
        os.kill(os.getpid(), signal.SIGTERM)
        return True
    return False


def select_device(hw: Any) -> Any:
    import torch

    want = hw.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware asks for CUDA but this machine has none (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); use hardware=cpu"
        )
    if want not in ("cpu",) and not want.startswith("cuda") and want != "mps":
        raise ConfigError(f"hardware.device={hw.device!r}: expected cpu, cuda, cuda:N, mps or auto")
    return torch.device(want)


# ---------------------------------------------------------------------------------------------- resume


@dataclass
class Start:
    """Where a run starts from: nothing, a checkpoint to continue, or a finished run's results to reuse."""

    resume_dir: Path | None = None
    """The run dir (or .pt file) continued."""
    state: dict | None = None
    """Its checkpoint, once loaded."""
    reuse: dict | None = None

    @property
    def checkpoint(self) -> Path | None:
        if self.resume_dir is None:
            return None
        return self.resume_dir if self.resume_dir.suffix == ".pt" else self.resume_dir / "checkpoints" / "last.pt"


def find_resume(cfg: DictConfig, run_dir: Path, roots: list[Path] | None = None) -> tuple[Path | None, dict | None]:
    """(run dir to continue from, finished results to reuse).

    `resume=<dir>` continues that run. `resume=auto` takes the newest run of the same config (same digest, seed
    included) under the output roots (the configured run and sweep base folders, `outputs/` and `multirun/` by
    default; never above them) or in this run's own dir: a finished one is reused as is (so a re-launched sweep
    skips what it already did); an unfinished one with a checkpoint is continued (after Ctrl-C, the run that
    was stopped).
    """
    if not cfg.resume:
        return None, None
    if cfg.resume != "auto":
        src = Path(cfg.resume).expanduser()
        if src.suffix == ".pt" and src.is_file():
            return src, None
        if not (src / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"resume={cfg.resume}: no checkpoints/last.pt there")
        return src, None
    digest = _digest(cfg)
    here = run_dir.resolve()
    candidates = []
    searched = [Path(r).resolve() for r in (roots if roots is not None else DEFAULT_ROOTS)]
    for res_path in _results_under([*searched, run_dir]):
        d = res_path.parent
        try:
            res = read_json(res_path)
            if res.get("config_digest") != digest or res.get("resumed_by"):
                continue
        except (OSError, ValueError, AttributeError):
            continue
        finished = res.get("status") in FINAL
        if finished and res.get("reused_from") and d.resolve() != here:
            continue  # a pointer to another run; that run is a candidate itself
        if not finished and not (d / "checkpoints" / "last.pt").exists():
            continue
        candidates.append(((str(res.get("started_at") or ""), res_path.stat().st_mtime), d, res, finished))
    if not candidates:
        log.info("resume=auto: no earlier run of this config under %s; starting fresh",
                 ", ".join(str(r) for r in searched))
        return None, None
    _, d, res, finished = max(candidates, key=lambda c: c[0])
    if finished:
        return None, res if d.resolve() == here else dict(res, reused_from=str(d.resolve()))
    return d, None


def _results_under(roots: list[Path]) -> list[Path]:
    """Every results.json under these folders (links not followed; checkpoint and figure folders skipped)."""
    seen, out = set(), []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [n for n in dirnames if n not in ("checkpoints", "figures", "wandb", "cache", ".hydra")]
            if RESULTS in filenames:
                p = Path(dirpath) / RESULTS
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    out.append(p)
    return out


def _digest(cfg: DictConfig, seed: bool = True) -> str:
    """The config's digest without run-local keys; `seed=False` also drops the seed (the seeds of one
    condition share it: `mlrun report` groups by it), including where the config interpolates it (a dataset's
    `seed: ${seed}`): it is resolved with the seed set to 0, so only the condition's settings count."""
    if not seed:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.seed = 0
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("resume", "eval_only", "logger", "debug", *(() if seed else ("seed",))):
        c.pop(k, None)
    c.get("trainer", {}).pop("progress", None)
    return config_digest(c)


def plan_start(cfg: DictConfig, run_dir: Path, roots: list[Path] | None, load: bool = True) -> Start:
    """Find (and, with `load`, read) what this run continues; a bad resume target is a ConfigError or a
    CheckpointError here, before the run writes anything."""
    resume_dir, reuse = find_resume(cfg, run_dir, roots)
    if reuse is not None:
        return Start(reuse=reuse)
    if cfg.eval_only and resume_dir is None:
        raise ConfigError("eval_only=true needs resume=<run dir or checkpoint>")
    start = Start(resume_dir=resume_dir)
    if resume_dir is not None and load:
        from mlrun.trainer import Trainer

        path = start.checkpoint
        best = resume_dir / "checkpoints" / "best.pt"
        if cfg.eval_only and cfg.trainer.monitor and resume_dir.suffix != ".pt" and best.exists():
            path = best
        start.state = Trainer.load_checkpoint(path)
    return start


def stages_of(cfg: DictConfig) -> list[dict[str, Any]]:
    if cfg.stages:
        return [dict(OmegaConf.to_container(s, resolve=True)) for s in cfg.stages]
    return [{"name": "train"}]


# ---------------------------------------------------------------------------------------------- the run


def run_experiment(cfg: DictConfig, run_dir: Path, worker: bool = False, *, roots: list[Path] | None = None,
                   files: dict[str, str] | None = None) -> dict[str, Any]:
    """Train (or evaluate) one experiment into run_dir and return its results.json content.

    `roots`: where `resume=auto` may look (default: outputs/ and multirun/ here). `files`: texts to write into the
    run dir once it is claimed (Hydra's config, already redacted). Before anything is written a bad input raises
    an MlrunError; afterwards every failure is RunFailed, with results.json saying so.
    """
    from mlrun import schema

    run_dir = Path(run_dir)
    schema.check(cfg)
    ddp_parent = cfg.hardware.nproc_per_node * cfg.hardware.nnodes > 1 and not worker
    select_device(cfg.hardware)
    start = plan_start(cfg, run_dir, roots, load=not ddp_parent)
    claim = None
    if not worker:
        here = start.resume_dir is not None and start.resume_dir.resolve() == run_dir.resolve()
        dead = _died_without_checkpoint(cfg, run_dir, start)
        claim = RunDir(run_dir).claim(continuing_here=here or dead or (start.reuse is not None and not
                                                                       start.reuse.get("reused_from")))
        if dead:
            _set_aside(run_dir)
    try:
        if not worker:
            from mlrun.loggers import redact

            for name, text in (files or {}).items():
                write_atomic(run_dir / name, redact(text))
            remove_temp_files(run_dir)
            source = start.resume_dir
            if source is not None and source.is_dir() and source.resolve() != run_dir.resolve() \
                    and not RunDir(source).busy():
                remove_temp_files(source)  # what a kill left in the run this one continues
        if start.reuse is not None:
            return _reuse(cfg, run_dir, start.reuse)
        if ddp_parent:
            return _launch_ddp(cfg, run_dir, start)
        return _run(cfg, run_dir, start, worker)
    finally:
        if claim is not None:
            claim.release()


def _died_without_checkpoint(cfg: DictConfig, run_dir: Path, start: Start) -> bool:
    """Whether `resume=auto` found, in this very run dir, a run of the same config that died (SIGKILL, OOM, a lost
    node) before its first checkpoint: there is nothing to continue, so the relaunch starts it again in place
    instead of refusing the dir for good. (A live run keeps its dir: the claim's lock refuses it.)"""
    if cfg.resume != "auto" or start.resume_dir is not None or start.reuse is not None:
        return False
    try:
        res = read_json(run_dir / RESULTS)
    except (OSError, ValueError):
        return False
    return (isinstance(res, dict) and res.get("config_digest") == _digest(cfg) and res.get("status") not in FINAL
            and not (run_dir / "checkpoints" / "last.pt").exists())


def _set_aside(run_dir: Path) -> None:
    """Keep a dead run's records beside the new ones (renamed, so no tool counts them twice)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (RESULTS, METRICS):
        if (run_dir / name).exists():
            (run_dir / name).rename(run_dir / f"died-{stamp}.{name}")
    log.info("resume=auto: the run in %s died before its first checkpoint; starting it again there (its records "
             "kept as died-%s.*)", run_dir, stamp)


def _reuse(cfg: DictConfig, run_dir: Path, res: dict[str, Any]) -> dict[str, Any]:
    if res.get("reused_from"):
        log.info("resume=auto: %s already finished this config; reusing its results", res["reused_from"])
        res = dict(res, run_dir=str(run_dir), label=cfg.label)
        write_json(run_dir / RESULTS, res)
    else:
        log.info("resume=auto: this run dir already finished this config; nothing to do")
    return res


def _run(cfg: DictConfig, run_dir: Path, start: Start, worker: bool) -> dict[str, Any]:
    import torch

    from mlrun import distributed
    from mlrun.loggers import redact, register_secrets

    device = select_device(cfg.hardware)
    dist = distributed.init_process_group(str(device), cfg.hardware.backend) if worker else distributed.current()
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if cfg.hardware.threads:
        torch.set_num_threads(int(cfg.hardware.threads))
    elif cfg.scale == "cpu" and device.type == "cpu":
        # a miniature's small model gains nothing from intra-op threads and loses much when cores are shared
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    container = OmegaConf.to_container(cfg, resolve=True)
    register_secrets(container)
    resume_dir = start.resume_dir
    results: dict[str, Any] = {
        "experiment": cfg.experiment_name, "label": cfg.label, "seed": cfg.seed, "scale": cfg.scale,
        "status": "running", "started_at": utc_now(), "run_dir": str(run_dir),
        "config_digest": _digest(cfg), "config_digest_noseed": _digest(cfg, seed=False),
        "git_commit": git_commit(), "versions": versions(),
        "device": _device_name(device), "world_size": dist.world, "machine": machine(),
        "paper": container.get("paper") or {}, "metrics": {}, "claims": [],
    }
    if cfg.eval_only:
        results["eval_only"] = True
    if cfg.debug:  # a debug preset (debug=fast, ...): never counted by `mlrun report`
        results["debug"] = OmegaConf.to_container(cfg.debug, resolve=True)
    if resume_dir is not None:
        results["resumed_from"] = str(resume_dir)
    main = dist.is_main
    record = RunRecord(run_dir, results, write=main, clean=lambda r: redact(r, by_name=False))
    try:
        with _signals_outside_training(defer=dist.enabled) as closing, record:
            try:
                _open_train_close(cfg, run_dir, record, start, results, container, device, dist)
            finally:
                closing.set()  # the record is being written: a late signal must not cut it short
    except BaseException as e:
        if not record.entered:
            raise  # not even `running` could be written: nothing is on record
        code = 130 if isinstance(e, Interrupted | KeyboardInterrupt) else 1
        raise RunFailed(results.get("error") or describe(e), code, results) from e
    finally:
        if main:
            remove_temp_files(run_dir)
    log.info(closing_line(results, run_dir))
    return results


def _open_train_close(cfg: DictConfig, run_dir: Path, record: RunRecord, start: Start, results: dict,
                      container: dict, device: Any, dist: Any) -> None:
    """Inside the run's record: the loggers, the data and the model, training and testing, the figures, claims."""
    import torch

    from mlrun.loggers import Loggers, redact
    from mlrun.progress import Progress
    from mlrun.trainer import ANNOUNCE_AFTER, Trainer, seed_everything

    state, resume_dir = start.state, start.resume_dir
    main = dist.is_main
    loggers = Loggers.null()
    stage_cache = None
    history: list[dict] = []
    if state is None and not cfg.eval_only and dist.world == 1 and _cache_on(cfg):
        stage_cache, state, history = _reuse_stage(cfg, container, run_dir, results)
        if stage_cache is not None:
            record.on_close(lambda r: stage_cache.release())
    if main:
        _copy_history(resume_dir, run_dir, state)
        loggers = Loggers(run_dir, cfg.logger, redact(container), wandb_id=(state or {}).get("wandb_id"),
                          resume_step=state["position"]["global_step"] if state and not history else None,
                          resumed_from=resume_dir)
        for row in history:  # a reused stage's history, as if this run had logged it
            loggers.log(row)
        record.on_close(lambda r: loggers.finish(_summary(r), failed=r["status"] != "completed", results=r))
        record.on_close(lambda r: _mark_resumed(resume_dir, run_dir))
    seed_everything(int(cfg.seed), cfg.trainer.deterministic)
    data = _build("dataset", cfg.dataset)
    task = _build("model", cfg.model)
    task.setup(data)
    task.cache_dir = run_dir / "cache" if main else None
    trainer = Trainer(cfg.trainer, device, run_dir, loggers, int(cfg.seed), dist, wandb_id=loggers.wandb_id)
    trainer.channels_last = bool(cfg.hardware.channels_last) and device.type == "cuda"
    trainer.stage_cache = stage_cache
    if cfg.scale == "paper" and device.type == "cpu" and main:
        why = "as hardware.device says" if torch.cuda.is_available() else "this machine has no CUDA device"
        log.warning("%s is a paper-scale experiment and %s: running on the CPU (expected duration after the "
                    "first %d steps)", cfg.experiment_name, why, ANNOUNCE_AFTER)
        trainer.announce_duration = True
    prefix = job_prefix(cfg)
    _label_lines(prefix)
    progress = Progress(cfg.trainer.progress, enabled=main, prefix=prefix)
    with trainer.signals():
        _train_and_test(cfg, task, data, trainer, state, resume_dir, results, progress, dist)
    if main:
        figs = task.figures(run_dir / "figures", data) or []
        results["figures"] = [str(Path(f).relative_to(run_dir)) for f in figs]
        loggers.log_figures(figs)
    results["claims"] = claims_mod.evaluate(list(container.get("claims") or []), results["metrics"])


def _build(group: str, node: Any) -> Any:
    """Instantiate a config group; an error names the group (a Hydra error at the top of a group names no key), and
    each warning raised while it is built is one line (not Python's two, with a source line)."""
    import warnings

    from hydra.utils import instantiate

    try:
        with warnings.catch_warnings(record=True) as caught:
            return instantiate(node, _convert_="object")
    except Exception as e:
        e.config_key = group  # type: ignore[attr-defined]
        raise
    finally:
        for text in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
            log.warning("%s: %s", group, text)


@contextlib.contextmanager
def _signals_outside_training(defer: bool = False) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM outside the training loop (whose trainer checkpoints and stops): while the run is being set
    up they stop it at once (`interrupted`: nothing trained yet), or, with `defer` (DDP, where a rank alone must not
    leave), at the first step, when every rank agrees; once it is closing (`closing.set()`) they are ignored, so
    that its records are written whole (the DDP launcher signals every worker as soon as one has stopped)."""
    import signal

    closing = threading.Event()

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        name = signal.Signals(signum).name
        if closing.is_set():
            return
        if defer:
            from mlrun.trainer import request_stop

            request_stop(name, remember=True)
            return
        raise Interrupted(f"{name} while the run was being set up (nothing trained yet)")

    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is signal.SIG_IGN:
            continue  # a sweep's job process: its launcher stops the sweep, and the job's trainer then checkpoints
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield closing
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _train_and_test(cfg: DictConfig, task: Any, data: Any, trainer: Any, state: dict | None,
                    resume_dir: Path | None, results: dict, progress: Any, dist: Any) -> None:
    from mlrun import distributed
    from mlrun.trainer import Trainer, start_stage

    stages = stages_of(cfg)
    if state is not None:
        Trainer.restore_model(task, state, resume_dir or Path(results["reused_stage_from"]["checkpoint"]))
        trainer.resume_plan(data, stages, state)  # a resume that cannot be done fails here, before any step
        if resume_dir is not None:
            log.info("resuming from %s (global step %d)", resume_dir, state["position"]["global_step"])
    if cfg.eval_only:
        task.to(trainer.device)
        start_stage(task, stages[-1], data)
        task.to(trainer.device)
        results["evaluated_step"] = state["position"]["global_step"]
        metrics = trainer.evaluate(task, data, "val", None, cfg.trainer)
    else:
        metrics = trainer.fit(task, data, stages, resume=state, progress=progress)
        if dist.enabled:
            results["ddp_replicas_identical"] = distributed.replicas_identical(task)
        best_path = trainer.run_dir / "checkpoints" / "best.pt"
        if cfg.trainer.monitor and best_path.exists():
            best = Trainer.load_checkpoint(best_path)
            task.load_state_dict(best["model"])
            task.load_extra_state(best.get("extra", {}))
            results["best"] = trainer.best
    metrics = dict(metrics)
    metrics.update(trainer.evaluate(task, data, "test", None, cfg.trainer))
    results["metrics"] = metrics
    results["steps"] = trainer.global_step
    if trainer.nonfinite_skipped:
        results["nonfinite_skipped"] = trainer.nonfinite_skipped


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    return {**results.get("metrics", {}), "status": results["status"]}


def _mark_resumed(resume_dir: Path | None, run_dir: Path) -> None:
    """The continued run points at its successor, which `resume=auto` takes instead, once that one has a checkpoint
    of its own to carry the history on."""
    if resume_dir is None or resume_dir.suffix == ".pt" or resume_dir.resolve() == run_dir.resolve():
        return
    if not (run_dir / "checkpoints" / "last.pt").exists() or not (resume_dir / RESULTS).exists():
        return
    try:
        old = read_json(resume_dir / RESULTS)
        old["resumed_by"] = str(run_dir)
        write_json(resume_dir / RESULTS, old)
    except (OSError, ValueError, MlrunError):
        pass


def _copy_history(resume_dir: Path | None, run_dir: Path, state: dict | None) -> None:
    """A resumed run starts its metrics.jsonl with the old run's lines up to the checkpoint."""
    if resume_dir is None or state is None or not resume_dir.is_dir() or resume_dir.resolve() == run_dir.resolve():
        return
    import json

    from mlrun.records import read_metrics, row_step

    step = state["position"]["global_step"]
    rows = [r for r in read_metrics(resume_dir / METRICS) if row_step(r) <= step]
    write_atomic(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------- DDP


def _launch_ddp(cfg: DictConfig, run_dir: Path, start: Start) -> dict[str, Any]:
    """Compose once: hand the resolved config to the workers (in memory; the copy saved beside the run is redacted),
    start them, read back rank 0's results. A worker that dies before it can say so leaves `failed` here."""
    from mlrun import distributed
    from mlrun.loggers import redact, register_secrets

    resolved = OmegaConf.to_container(cfg, resolve=True)
    register_secrets(resolved)
    if start.resume_dir is not None:
        resolved["resume"] = str(start.resume_dir)  # every rank continues what this process chose
    write_atomic(run_dir / ".hydra" / "resolved.yaml", OmegaConf.to_yaml(redact(resolved)))
    nproc = int(cfg.hardware.nproc_per_node)
    log.info("starting %d data-parallel workers (%d node(s)); records in %s", nproc, cfg.hardware.nnodes, run_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.hardware.threads or 1))
    import torch.distributed.launcher.api  # noqa: F401 - its loggers exist from here on

    prefixes = ("torch.distributed.elastic", "torch.multiprocessing")
    quiet = [logging.getLogger(n) for n in [*prefixes, *logging.root.manager.loggerDict] if n.startswith(prefixes)]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)  # their failure report is a page (and a signal's, a line of its own); ours is one
    error = None
    global _DDP_WORKERS
    _DDP_WORKERS = True
    try:
        distributed.launch(run_dir, nproc, cfg.hardware, OmegaConf.to_yaml(resolved))
    except Exception as e:  # noqa: BLE001 - ChildFailedError, or SignalException when this process is signalled
        error = e
    finally:
        _DDP_WORKERS = False
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    res = _read_results(run_dir)
    if res.get("status") == "running" or (error is not None and res.get("status") == "completed"):
        res.update(status="interrupted" if type(error).__name__ == "SignalException" else "failed",
                   error=f"a worker died: {describe(error) if error else 'no result'}", finished_at=utc_now())
        write_json(run_dir / RESULTS, res)
    if res.get("status") != "completed":
        code = 130 if res.get("status") == "interrupted" else 1
        raise RunFailed(res.get("error") or f"the workers ended without results ({describe(error)})", code, res)
    log.info(closing_line(res, run_dir))  # the workers' own lines go nowhere: the launching process says it
    return res


def _read_results(run_dir: Path) -> dict[str, Any]:
    try:
        res = read_json(run_dir / RESULTS)
        return res if isinstance(res, dict) else {"status": "failed"}
    except (OSError, ValueError):
        return {"status": "failed"}


def closing_line(results: dict[str, Any], run_dir: Path) -> str:
    """`digits_classifier: completed in 6.4s; test/acc 0.991; 1/1 claims held; records in ...`"""
    held = claims_mod.summary_line(results.get("claims", []))
    shown = headline(results)
    return (f"{results.get('experiment')}: {results.get('status')} in {float(results.get('wall_time_s') or 0):.1f}s; "
            f"{shown + '; ' if shown else ''}{held}; records in {run_dir}")


def headline(results: dict[str, Any], most: int = 3) -> str:
    """The run's headline numbers for its closing line: the paper's metrics if it names them, else test metrics."""
    metrics = results.get("metrics") or {}
    paper = (results.get("paper") or {}).get("metrics") or {}
    names = [spec.get("metric", k) if isinstance(spec, dict) else k for k, spec in paper.items()]
    names = [n for n in names if n in metrics] or [k for k in metrics if str(k).startswith("test/")]
    names = list(dict.fromkeys(names))  # several paper rows (one per arm) may name the same metric
    parts = []
    for name in names[:most]:
        try:
            parts.append(f"{name} {float(metrics[name]):.4g}")
        except (TypeError, ValueError):
            continue
    return ", ".join(parts)


def job_prefix(cfg: DictConfig) -> str:
    """`[label s<seed>] ` for the lines of one job of a multirun (parallel jobs interleave), else nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"[{cfg.label} s{cfg.seed}] "
    return ""


class _Prefix(logging.Filter):
    """Prefixes mlrun's console lines with the job's label (one instance per process; jobs reuse processes)."""

    prefix = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mlrun" and self.prefix and not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


_PREFIX = _Prefix()


def _label_lines(prefix: str) -> None:
    _PREFIX.prefix = prefix
    if prefix:
        for h in logging.getLogger().handlers:
            if _PREFIX not in h.filters:
                h.addFilter(_PREFIX)


def _cache_on(cfg: DictConfig) -> bool:
    """`cache.stages`: true, false, or auto (on inside a multirun: a study's arms share stages)."""
    want = str(cfg.cache.stages).lower()
    if want in ("true", "false"):
        return want == "true"
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _cache_root(cfg: DictConfig, run_dir: Path) -> Path:
    """`cache.dir`, else `.stage_cache` beside the sweep dir (a relaunched or related sweep finds it)."""
    if cfg.cache.dir:
        return Path(cfg.cache.dir).expanduser()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().sweep.dir:
        return Path(HydraConfig.get().sweep.dir).parent / ".stage_cache"
    return run_dir.parent / ".stage_cache"


def _reuse_stage(cfg: DictConfig, container: dict, run_dir: Path, results: dict) -> tuple[Any, dict | None, list]:
    """(the run's StageCache, the state to start from or None, the history rows up to it)."""
    from mlrun.cache import StageCache, stage_keys
    from mlrun.trainer import Trainer

    stages = stages_of(cfg)
    if len(stages) < 2:
        return None, None, []
    cache = StageCache(_cache_root(cfg, run_dir), stage_keys(container, stages),
                       [str(s.get("name", "train")) for s in stages])
    index = cache.lookup()
    if index < 0:
        return cache, None, []
    path, history, meta = cache.load(index)
    state = Trainer.load_checkpoint(path)
    state.pop("wandb_id", None)  # the W&B run of the run that computed it: this run gets its own
    results["reused_stage_from"] = {"stage": meta["stage"], "key": meta["key"], "run_dir": meta["run_dir"],
                                    "checkpoint": str(path)}
    log.info("stage cache: reusing stage '%s' from %s", meta["stage"], meta["run_dir"])
    return cache, state, history
