"""CI smoke runs of every experiment in conf/experiment/: each composes and trains a few steps on CPU.

CPU-scale experiments use their packaged data; paper-scale ones get a tiny fixture written in their
dataset's real format by the writer their `smoke.fixture` names. This proves wiring, not correctness:
each paper's own test file checks its numbers.
"""

from __future__ import annotations

import pytest
from hydra.utils import get_method

from mlrun import compose, run
from mlrun.cli import experiments

SMOKE_DEFAULTS = [
    "logger=none", "trainer.step_limit=2", "trainer.log_every=1", "trainer.eval_every=0",
    "trainer.checkpoint_every=0", "trainer.progress=none", "trainer.limit_eval_batches=2", "hardware.threads=1",
]


@pytest.mark.parametrize("name", experiments())
def test_experiment_composes_and_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(name)
    assert cfg.experiment_name == name, f"conf/experiment/{name}.yaml must set experiment_name: {name}"
    assert cfg.scale in ("cpu", "paper")
    assert cfg.paper, f"{name}: every experiment names its paper block"
    overrides = list(SMOKE_DEFAULTS)
    smoke = cfg.get("smoke") or {}
    if cfg.scale == "paper":
        assert smoke.get("fixture"), f"{name}: a paper-scale experiment needs smoke.fixture"
    if smoke.get("fixture"):
        root = tmp_path / "data"
        get_method(smoke.fixture)(root)
        overrides.append(f"dataset.root={root}")
    overrides += list(smoke.get("overrides") or [])
    results = run(name, overrides, run_dir=tmp_path / "run")
    assert results["status"] == "completed"
    assert (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "metrics.jsonl").exists()
