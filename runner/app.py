"""One run, from a composed config to its records. Used by the CLI, the Python API and DDP workers."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlrun import claims as claims_mod
from mlrun.errors import ConfigError
from mlrun.records import RESULTS, config_digest, git_commit, machine, read_json, versions, write_json

log = logging.getLogger("mlrun")

FINAL = ("completed",)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def find_resume(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, dict | None]:
    """(run dir to continue from, finished results to reuse).

    `resume=<dir>` continues that run. `resume=auto` looks under this run's outputs/ or multirun/ root for
    runs of the same config (same digest, seed included): a finished one is reused as is (so a re-launched
    sweep skips what it already did), else the newest unfinished one with a checkpoint is continued.
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
    root = run_dir.parent
    while root.parent != root and root.name not in ("outputs", "multirun"):
        root = root.parent
    finished, unfinished = [], []
    for res_path in root.rglob(RESULTS):
        d = res_path.parent
        myself = d.resolve() == run_dir.resolve()  # a requeued SLURM job continues in its own dir
        try:
            res = read_json(res_path)
        except (OSError, ValueError):
            continue
        if res.get("config_digest") != digest or res.get("resumed_by"):
            continue
        if res.get("status") in FINAL and not res.get("reused_from") and not myself:
            finished.append((res_path.stat().st_mtime, d, res))
        elif res.get("status") not in FINAL and (d / "checkpoints" / "last.pt").exists():
            unfinished.append(((d / "checkpoints" / "last.pt").stat().st_mtime, d))
    if finished:
        _, d, res = max(finished, key=lambda t: t[0])
        return None, dict(res, reused_from=str(d.resolve()))
    if not unfinished:
        log.info("resume=auto: no earlier run of this config under %s; starting fresh", root)
        return None, None
    return max(unfinished)[1], None


def _digest(cfg: DictConfig, seed: bool = True) -> str:
    """The config's digest without run-local keys; `seed=False` also drops the seed (the seeds of one
    condition share it: `mlrun report` groups by it)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("resume", "eval_only", "logger", "debug", *(() if seed else ("seed",))):
        c.pop(k, None)
    c.get("trainer", {}).pop("progress", None)
    return config_digest(c)


def stages_of(cfg: DictConfig) -> list[dict[str, Any]]:
    if cfg.stages:
        return [dict(OmegaConf.to_container(s, resolve=True)) for s in cfg.stages]
    return [{"name": "train"}]


def run_experiment(cfg: DictConfig, run_dir: Path, worker: bool = False) -> dict[str, Any]:
    """Train (or evaluate) one experiment into run_dir and return its results.json content."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.hardware.nproc_per_node * cfg.hardware.nnodes > 1 and not worker:
        return _launch_ddp(cfg, run_dir)

    import torch
    from hydra.utils import instantiate

    from mlrun import distributed
    from mlrun.loggers import Loggers, redact
    from mlrun.progress import Progress
    from mlrun.trainer import (
        ANNOUNCE_AFTER,
        CheckpointError,
        Interrupted,
        NonFiniteLoss,
        Trainer,
        seed_everything,
        start_stage,
    )

    t0 = time.perf_counter()
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
    results: dict[str, Any] = {
        "experiment": cfg.experiment_name, "label": cfg.label, "seed": cfg.seed, "scale": cfg.scale,
        "status": "running", "started_at": _now(), "run_dir": str(run_dir),
        "config_digest": _digest(cfg), "config_digest_noseed": _digest(cfg, seed=False),
        "git_commit": git_commit(), "versions": versions(),
        "device": _device_name(device), "world_size": dist.world, "machine": machine(),
        "paper": container.get("paper") or {}, "metrics": {}, "claims": [],
    }
    if cfg.eval_only:
        results["eval_only"] = True
    if cfg.debug:  # a debug preset (debug=fast, ...): never counted by `mlrun report`
        results["debug"] = OmegaConf.to_container(cfg.debug, resolve=True)
    resume_dir, reuse = find_resume(cfg, run_dir)
    if reuse is not None:
        log.info("resume=auto: %s already finished this config; reusing its results", reuse["reused_from"])
        reuse.update(run_dir=str(run_dir), label=cfg.label)
        if dist.is_main:
            write_json(run_dir / RESULTS, reuse)
        return reuse
    ckpt_state = None
    if resume_dir is not None:
        ckpt_path = resume_dir if resume_dir.suffix == ".pt" else resume_dir / "checkpoints" / (
            "best.pt" if cfg.eval_only and cfg.trainer.monitor and (resume_dir / "checkpoints/best.pt").exists()
            else "last.pt")
        ckpt_state = Trainer.load_checkpoint(ckpt_path)
        results["resumed_from"] = str(resume_dir)
        log.info("resuming from %s (global step %d)", ckpt_path, ckpt_state["position"]["global_step"])

    stage_cache, history = None, []
    if ckpt_state is None and not cfg.eval_only and dist.world == 1 and _cache_on(cfg):
        stage_cache, ckpt_state, history = _reuse_stage(cfg, container, run_dir, results)

    if dist.is_main:
        write_json(run_dir / RESULTS, results)
        _copy_history(resume_dir, run_dir, ckpt_state)
        loggers = Loggers(run_dir, cfg.logger, redact(container),
                          wandb_id=(ckpt_state or {}).get("wandb_id"),
                          resume_step=ckpt_state["position"]["global_step"] if ckpt_state and not history else None,
                          resumed_from=resume_dir)
        for row in history:  # a reused stage's history, as if this run had logged it
            loggers.log(row)
    else:
        loggers = Loggers.null()

    seed_everything(int(cfg.seed) + 0, cfg.trainer.deterministic)
    data = instantiate(cfg.dataset, _convert_="object")
    task = instantiate(cfg.model, _convert_="object")
    task.setup(data)
    task.cache_dir = run_dir / "cache" if dist.is_main else None
    trainer = Trainer(cfg.trainer, device, run_dir, loggers, int(cfg.seed), dist, wandb_id=loggers.wandb_id)
    trainer.stage_cache = stage_cache
    if cfg.scale == "paper" and device.type == "cpu" and dist.is_main:
        why = "as hardware.device says" if torch.cuda.is_available() else "this machine has no CUDA device"
        log.warning("%s is a paper-scale experiment and %s: running on the CPU (expected duration after the first "
                    "%d steps)", cfg.experiment_name, why, ANNOUNCE_AFTER)
        trainer.announce_duration = True
    trainer.channels_last = bool(cfg.hardware.channels_last) and device.type == "cuda"
    trainer.install_signal_handlers()
    prefix = job_prefix(cfg)
    _label_lines(prefix)
    progress = Progress(cfg.trainer.progress, enabled=dist.is_main, prefix=prefix)
    failed = False
    code = 0
    try:
        if ckpt_state is not None:
            Trainer.restore_model(task, ckpt_state, resume_dir or Path(results["reused_stage_from"]["checkpoint"]))
        if cfg.eval_only:
            if ckpt_state is None:
                raise ConfigError("eval_only=true needs resume=<run dir or checkpoint>")
            task.to(device)
            start_stage(task, stages_of(cfg)[-1], data)
            task.to(device)
            results["evaluated_step"] = ckpt_state["position"]["global_step"]
            metrics = trainer.evaluate(task, data, "val", None, cfg.trainer)
        else:
            metrics = trainer.fit(task, data, stages_of(cfg), resume=ckpt_state, progress=progress)
            if dist.enabled:
                results["ddp_replicas_identical"] = distributed.replicas_identical(task)
            if cfg.trainer.monitor and (run_dir / "checkpoints" / "best.pt").exists():
                best = Trainer.load_checkpoint(run_dir / "checkpoints" / "best.pt")
                task.load_state_dict(best["model"])
                task.load_extra_state(best.get("extra", {}))
                results["best"] = trainer.best
        metrics = dict(metrics)
        metrics.update(trainer.evaluate(task, data, "test", None, cfg.trainer))
        results["metrics"] = metrics
        results["steps"] = trainer.global_step
        if trainer.nonfinite_skipped:
            results["nonfinite_skipped"] = trainer.nonfinite_skipped
        if dist.is_main:
            figs = task.figures(run_dir / "figures", data) or []
            results["figures"] = [str(Path(f).relative_to(run_dir)) for f in figs]
            loggers.log_figures(figs)
        results["claims"] = claims_mod.evaluate(list(container.get("claims") or []), metrics)
        results["status"] = "completed"
    except Interrupted as e:
        results.update(status="interrupted", error=str(e))
        failed, code = True, 130
    except (NonFiniteLoss, CheckpointError) as e:
        results.update(status="failed", error=str(e))
        failed, code = True, 1
    except BaseException as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}")
        failed = True
        _finish(results, run_dir, t0, loggers, dist, failed, resume_dir, stage_cache)
        raise
    _finish(results, run_dir, t0, loggers, dist, failed, resume_dir, stage_cache)
    if code:
        raise RunFailed(results["error"], code, results)
    return results


class RunFailed(RuntimeError):
    def __init__(self, message: str, code: int, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.results = results


def _finish(results: dict, run_dir: Path, t0: float, loggers: Any, dist: Any, failed: bool,
            resume_dir: Path | None, stage_cache: Any = None) -> None:
    if stage_cache is not None:
        stage_cache.release()
    results["wall_time_s"] = round(time.perf_counter() - t0, 2)
    results["finished_at"] = _now()
    if not dist.is_main:
        return
    summary = {k: v for k, v in results.get("metrics", {}).items()}
    summary["status"] = results["status"]
    try:
        loggers.finish(summary, failed=failed, results=results)
    finally:
        write_json(run_dir / RESULTS, results)
        same = resume_dir is not None and resume_dir.resolve() == run_dir.resolve()
        if resume_dir is not None and not same and resume_dir.is_dir() and (resume_dir / RESULTS).exists():
            try:
                old = read_json(resume_dir / RESULTS)
                old["resumed_by"] = str(run_dir)
                write_json(resume_dir / RESULTS, old)
            except (OSError, ValueError):
                pass
    log.info(closing_line(results, run_dir))


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


def _copy_history(resume_dir: Path | None, run_dir: Path, state: dict | None) -> None:
    """A resumed run starts its metrics.jsonl with the old run's lines up to the checkpoint."""
    if resume_dir is None or state is None or not resume_dir.is_dir() or resume_dir.resolve() == run_dir.resolve():
        return
    from mlrun.records import METRICS, read_metrics

    step = state["position"]["global_step"]
    rows = [r for r in read_metrics(resume_dir / METRICS) if r.get("global_step", r.get("step", 0)) <= step]
    import json

    from mlrun.records import write_atomic

    write_atomic(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def _launch_ddp(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Compose once: save the resolved config, start the workers, read back rank 0's results."""
    from mlrun import distributed
    from mlrun.records import write_atomic

    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / ".hydra" / "resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    nproc = int(cfg.hardware.nproc_per_node)
    log.info("starting %d data-parallel workers (%d node(s)); records in %s", nproc, cfg.hardware.nnodes, run_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.hardware.threads or 1))
    try:
        distributed.launch(run_dir, nproc, cfg.hardware)
    except Exception as e:  # noqa: BLE001 - ChildFailedError carries the worker's failure
        res = _read_results(run_dir)
        raise RunFailed(f"a worker failed: {res.get('error') or e}", 1, res) from None
    res = _read_results(run_dir)
    if res.get("status") != "completed":
        raise RunFailed(res.get("error", "workers ended without results"), 1, res)
    log.info(closing_line(res, run_dir))  # the workers' own lines go nowhere: the launching process says it
    return res


def _read_results(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(run_dir / RESULTS)
    except (OSError, ValueError):
        return {"status": "failed"}
