"""Studies: an experiment's declared sweep gathered into one study.json, its claims and its figure.

An experiment declares the sweep in `hydra.sweeper.params` and, optionally::

    study:
      summarize: {_target_: mlrun.models.x.summarize, _partial_: true}   # study dict -> derived metrics
      figure:    {_target_: mlrun.models.x.study_figure, _partial_: true} # (study dict, out dir) -> [paths]
      claims: [...]   # terms name a run label: {run: bn_b2, metric: test/acc}; or a derived metric by name

`mlrun -m experiment=NAME` runs the sweep; when it ends, `StudyCallback` gathers every run dir under the
sweep dir (runs sharing a `label` are seeds of one condition), evaluates the claims on the per-label
median, draws the figure and writes study.json. `gather` can be re-run on any sweep dir.
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
        except (OSError, ValueError):
            res = {"status": "unreadable"}
        overrides_path = res_path.parent / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_path.exists():
            overrides = [line[2:].strip() for line in overrides_path.read_text().splitlines() if line.startswith("- ")]
        runs.append({
            "dir": str(res_path.parent), "label": res.get("label", res_path.parent.name), "seed": res.get("seed"),
            "status": res.get("status", "unknown"), "overrides": overrides, "metrics": res.get("metrics", {}),
            "wall_time_s": res.get("wall_time_s"), "error": res.get("error"),
        })
    return runs


def group(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """label -> metric -> values over the completed seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        if r["status"] != "completed":
            continue
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
    study: dict[str, Any] = {
        "experiment": experiment, "sweep_dir": str(sweep_dir), "paper": paper or {},
        "runs": runs,
        "groups": {label: {k: stats(v) for k, v in ms.items()} for label, ms in groups.items()},
        "status": "completed" if runs and all(r["status"] == "completed" for r in runs) else "incomplete",
        "wall_time_s": round(sum(r["wall_time_s"] or 0 for r in runs), 1),  # summed over runs
    }
    if elapsed_s is not None:  # the sweep's own wall-clock time (runs in parallel jobs overlap)
        study["elapsed_s"] = round(elapsed_s, 1)
    derived: dict[str, float] = {}
    if study_cfg.get("summarize"):
        try:
            derived = dict(instantiate(study_cfg["summarize"])(study))
        except Exception as e:  # noqa: BLE001 - a broken summary must not lose the gathered runs
            log.warning("study summary failed: %s: %s", type(e).__name__, e)
            study["summary_error"] = f"{type(e).__name__}: {e}"
    study["derived"] = derived
    study["claims"] = claims_mod.evaluate(list(study_cfg.get("claims") or []), derived, groups)
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
        log.info("study %s: %d/%d runs completed; %s; %s", study["experiment"], ok, n,
                 claims_mod.summary_line(study["claims"]), sweep_dir / STUDY)
        for c in study["claims"]:
            extra = f" ({c['lhs_value']:.4g} {c['op']} {c['rhs_value']:.4g})" if "lhs_value" in c else ""
            log.info("  [%s] %s%s", c["status"], c["name"], extra)
