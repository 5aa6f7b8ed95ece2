"""Beyond one process: Hydra launchers (joblib, submitit's local executor), the Optuna search preset, and
DDP jobs inside a multirun (each job composes once and starts its own workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlrun import compose
from mlrun.cli import experiments, groups

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
BASE = ["experiment=digits_classifier", "logger=none", "trainer.progress=none", "hardware.threads=1",
        "trainer.max_steps=3"]


def mlrun(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def completed_runs(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]


def test_joblib_local_launcher_runs_two_jobs_into_one_default_sweep_dir(tmp_path):
    """Job processes resolve the default timestamped sweep dir exactly as the launching process did."""
    mlrun("-m", *BASE, "seed=0,1", "hydra/launcher=local", cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    runs = completed_runs(sweep)
    assert [r["seed"] for r in runs] == [0, 1] and all(r["status"] == "completed" for r in runs)
    assert json.loads((sweep / "study.json").read_text())["status"] == "completed"


def test_submitit_local_executor_runs_a_two_job_multirun(tmp_path):
    mlrun("-m", *BASE, "seed=0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
          f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    runs = completed_runs(tmp_path / "sw")
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs)
    assert (tmp_path / "sw" / ".submitit").is_dir()


def test_optuna_search_finishes_three_trials_and_records_the_best(tmp_path):
    mlrun("-m", *BASE, "search=lr", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    best = yaml.safe_load((tmp_path / "sw" / "optimization_results.yaml").read_text())
    runs = completed_runs(tmp_path / "sw")
    assert len(runs) == 3
    assert best["best_value"] == max(r["metrics"]["val/acc"] for r in runs)
    assert "model.optimizer.lr" in best["best_params"]


@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_multirun_of_two_ddp_jobs_leaves_two_run_dirs(launcher, tmp_path):
    mlrun("-m", *BASE, "hardware=ddp", "seed=0,1", f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path / 'sw'}",
          cwd=tmp_path)
    runs = completed_runs(tmp_path / "sw")
    assert len(runs) == 2 and all(r["world_size"] == 2 and r["ddp_replicas_identical"] for r in runs)
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir()) == ["000_run_s0", "001_run_s1"]


@pytest.mark.parametrize("name", experiments())
def test_every_experiment_composes_with_every_hardware_preset(name):
    for hw in groups()["hardware"]:
        cfg = compose(name, [f"hardware={hw}"])
        assert cfg.hardware.device in ("cpu", "cuda", "auto")


def test_slurm_preset_composes_with_requeue_settings():
    cfg = compose("digits_classifier", ["hydra/launcher=slurm"])
    assert cfg is not None  # the launcher node lives in the hydra config; check the file's keys directly
    raw = yaml.safe_load((Path(__file__).parents[1] / "conf/hydra/launcher/slurm.yaml").read_text())
    assert raw["max_num_timeout"] > 0 and raw["defaults"][0] == "submitit_slurm"
