"""Studies: an experiment's declared sweep gathered into one study.json, its claims and its figure.

An experiment declares the sweep in `hydra.sweeper.params` and, optionally::

    study:
      summarize: {_target_: mlrun.models.x.summarize, _partial_: true}   # study dict -> derived metrics
      figure:    {_target_: mlrun.models.x.study_figure, _partial_: true} # (study dict, out dir) -> [paths]
      claims: [...]   # terms name a run label: {run: bn_b2, metric: test/acc}; or a derived metric by name

`mlrun -m experiment=NAME` runs the sweep; when it ends, `StudyCallback` gathers every run dir under the
sweep dir (runs sharing a `label` are seeds of one condition; one run counts per label, config and seed),
computes the derived metrics once over all seeds and once per seed, evaluates the claims seed by seed
(`mlrun.claims.evaluate_paired`), aggregates each run's own claims over its seeds, draws the figure and
writes study.json. `gather` can be re-run on any sweep dir.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mlrun import claims as claims_mod
from mlrun import loggers
from mlrun.records import RESULTS, STUDY, read_json, write_json

log = logging.getLogger("mlrun")


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for res_path in sorted(Path(sweep_dir).glob(f"*/{RESULTS}")):
        try:
            res = read_json(res_path)
            if not isinstance(res, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):
            res = {"status": "unreadable"}
        overrides_path = res_path.parent / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_path.exists():
            overrides = [line[2:].strip() for line in overrides_path.read_text().splitlines() if line.startswith("- ")]
        metrics = res.get("metrics")
        runs.append({
            "dir": str(res_path.parent), "label": str(res.get("label", res_path.parent.name)), "seed": res.get("seed"),
            "status": res.get("status", "unknown"), "overrides": overrides,
            "metrics": metrics if isinstance(metrics, dict) else {},
            "claims": res.get("claims") if isinstance(res.get("claims"), list) else [],
            "wall_time_s": res.get("wall_time_s"), "error": res.get("error"),
            "config_digest_noseed": res.get("config_digest_noseed"), "finished_at": res.get("finished_at"),
            **{k: res[k] for k in ("reused_from", "resumed_by", "reused_stage_from") if res.get(k)},
        })
    mark_superseded(runs)
    return runs


def mark_superseded(runs: list[dict[str, Any]]) -> None:
    """Keep one run per (label, config, seed): a completed one over others, an original over a reused copy,
    the newest over older; the rest get `superseded: true` (kept in the record, left out of every number)."""
    best: dict[tuple, dict[str, Any]] = {}

    def rank(r: dict[str, Any]) -> tuple:
        return (r["status"] == "completed", not r.get("resumed_by"), not r.get("reused_from"),
                str(r.get("finished_at") or ""), r["dir"])

    for r in runs:
        key = (r["label"], r.get("config_digest_noseed") or r["dir"], r["seed"])
        if key not in best or rank(r) > rank(best[key]):
            best[key] = r
    keep = {id(r) for r in best.values()}
    for r in runs:
        if id(r) not in keep:
            r["superseded"] = True


def counted(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that count: completed and not superseded."""
    return [r for r in runs if r["status"] == "completed" and not r.get("superseded")]


def group(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """label -> metric -> values over the completed seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in counted(runs):
        g = out.setdefault(r["label"], {})
        for k, v in r["metrics"].items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):  # a diverged run's inf/nan is in its results.json, not in the medians
                g.setdefault(k, []).append(value)
    return out


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values), "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
        "min": min(values), "max": max(values),
    }


def _summarize(fn: Any, study: dict[str, Any], where: str) -> dict[str, float]:
    if fn is None:
        return {}
    try:
        return dict(fn(study))
    except Exception as e:  # noqa: BLE001 - a broken summary must not lose the gathered runs
        log.warning("study summary failed (%s): %s: %s", where, type(e).__name__, e)
        study.setdefault("summary_errors", []).append(f"{where}: {type(e).__name__}: {e}")
        return {}


def seed_views(runs: list[dict[str, Any]], summarize: Any, base: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """seed -> what the claims read for that seed: each label's metrics and the derived metrics computed by
    `summarize` over that seed's runs only (so every derived number has one value per seed)."""
    views: dict[int, dict[str, Any]] = {}
    seeds = sorted({r["seed"] for r in counted(runs) if isinstance(r["seed"], int)})
    for seed in seeds:
        mine = [r for r in counted(runs) if r["seed"] == seed]
        sub = dict(base, runs=mine, groups={label: {k: stats(v) for k, v in ms.items()}
                                            for label, ms in group(mine).items()})
        views[seed] = {
            "runs": {r["label"]: r["metrics"] for r in mine},
            "derived": _summarize(summarize, sub, f"seed {seed}"),
        }
    return views


def gather(sweep_dir: Path, study_cfg: Any, experiment: str = "", paper: Any = None,
           elapsed_s: float | None = None) -> dict[str, Any]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    sweep_dir = Path(sweep_dir)
    study_cfg = study_cfg or {}
    if not isinstance(study_cfg, dict):
        study_cfg = OmegaConf.to_container(study_cfg, resolve=True)
    runs = collect_runs(sweep_dir)
    groups = group(runs)
    live = [r for r in runs if not r.get("superseded")]
    study: dict[str, Any] = {
        "experiment": experiment, "sweep_dir": str(sweep_dir), "paper": paper or {},
        "runs": runs,
        "groups": {label: {k: stats(v) for k, v in ms.items()} for label, ms in groups.items()},
        "seeds": sorted({r["seed"] for r in counted(runs) if isinstance(r["seed"], int)}),
        "status": "completed" if live and all(r["status"] == "completed" for r in live) else "incomplete",
        "wall_time_s": round(sum(r["wall_time_s"] or 0 for r in live), 1),  # summed over runs
    }
    if elapsed_s is not None:  # the sweep's own wall-clock time (runs in parallel jobs overlap)
        study["elapsed_s"] = round(elapsed_s, 1)
    summarize = None
    if study_cfg.get("summarize"):
        try:
            summarize = instantiate(study_cfg["summarize"])
        except Exception as e:  # noqa: BLE001
            log.warning("study summary failed: %s: %s", type(e).__name__, e)
            study["summary_error"] = f"{type(e).__name__}: {e}"
    study["derived"] = _summarize(summarize, study, "all seeds")
    base = {k: v for k, v in study.items() if k not in ("runs", "groups")}
    views = seed_views(runs, summarize, base)
    study["derived_per_seed"] = {str(s): v["derived"] for s, v in views.items()}
    study["claims"] = claims_mod.evaluate_paired(list(study_cfg.get("claims") or []), views)
    run_claims: dict[str, list[dict[str, Any]]] = {}
    for label in sorted({r["label"] for r in counted(runs)}):
        per_seed = {r["seed"]: r["claims"] for r in counted(runs) if r["label"] == label and r["claims"]}
        if per_seed:
            run_claims[label] = claims_mod.aggregate_run_claims(per_seed)
    study["run_claims"] = run_claims
    figures: list[str] = []
    if study_cfg.get("figure"):
        try:
            paths = instantiate(study_cfg["figure"])(study, sweep_dir / "figures") or []
            figures = [str(Path(p).relative_to(sweep_dir)) for p in paths]
        except Exception as e:  # noqa: BLE001
            log.warning("study figure failed: %s: %s", type(e).__name__, e)
            study["figure_error"] = f"{type(e).__name__}: {e}"
    study["figures"] = figures
    write_json(sweep_dir / STUDY, study)
    return study


class StudyCallback(Callback):
    """Gathers a multirun into study.json when it ends (for any experiment, with or without a study block)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._start = time.time()
        loggers.start_study_group(config)  # the W&B group every job of this multirun (and a relaunch) shares

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        from omegaconf import OmegaConf

        paper = OmegaConf.to_container(config.paper, resolve=True) if config.get("paper") else {}
        start = getattr(self, "_start", None)
        study = gather(sweep_dir, config.get("study"), config.get("experiment_name", ""), paper,
                       elapsed_s=time.time() - start if start is not None else None)
        loggers.log_study(study, sweep_dir, config)  # one W&B run (job_type study) in the runs' group
        n = len(study["runs"])
        ok = sum(r["status"] == "completed" for r in study["runs"])
        log.info("study %s: %d/%d runs completed over seeds %s; %s; %s", study["experiment"], ok, n,
                 study["seeds"], claims_mod.summary_line(study["claims"]), sweep_dir / STUDY)
        for c in study["claims"]:
            log.info("  [%s] %s: %s", claims_mod.count_text(c), c["name"], claims_mod.measured_text(c))
        for label, cs in study["run_claims"].items():
            for c in cs:
                log.info("  [%s] %s%s: %s", claims_mod.count_text(c), c["name"],
                         "" if label == "run" else f" ({label})", claims_mod.measured_text(c))
