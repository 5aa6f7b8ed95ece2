"""The stage cache: a stage whose inputs match an earlier run's is reused, bit for bit, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlrun import run
from mlrun.cache import stage_keys
from mlrun.records import read_metrics
from mlrun.trainer import Trainer

FAST = ["logger=none", "trainer.progress=none", "hardware.threads=1", "trainer.log_every=2",
        "model.net.dropout=0.3"]  # dropout: the RNG state at the stage boundary matters


def stages(first: int = 6, second: int = 4, lr: float = 0.5) -> str:
    return f"stages=[{{name:pre,max_steps:{first}}},{{name:post,max_steps:{second},args:{{lr_scale:{lr}}}}}]"


def go(tmp_path: Path, name: str, *extra: str, cache: str = "true") -> dict:
    return run("digits_classifier", [*FAST, f"cache.stages={cache}", f"cache.dir={tmp_path / 'cache'}", *extra],
               run_dir=tmp_path / name)


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return Trainer.load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_a_shared_first_stage_is_reused_bit_for_bit(tmp_path):
    first = go(tmp_path, "a", stages())
    assert "reused_stage_from" not in first
    second = go(tmp_path, "b", stages())
    assert second["reused_stage_from"]["stage"] == "pre"
    assert Path(second["reused_stage_from"]["run_dir"]) == (tmp_path / "a").resolve()
    alone = go(tmp_path, "alone", stages(), cache="false")  # the same config, nothing reused
    for k, v in params(tmp_path / "alone").items():
        assert torch.equal(v, params(tmp_path / "a")[k]) and torch.equal(v, params(tmp_path / "b")[k]), k
    assert second["metrics"] == first["metrics"] == alone["metrics"]
    assert rows(tmp_path / "b") == rows(tmp_path / "a") == rows(tmp_path / "alone")  # the history is whole


def test_an_arm_that_differs_only_later_reuses_the_shared_stage(tmp_path):
    go(tmp_path, "a", stages(second=4, lr=0.5))
    other = go(tmp_path, "b", stages(second=6, lr=0.1))  # another arm: same pretraining, its own second stage
    assert other["reused_stage_from"]["stage"] == "pre"
    fresh = go(tmp_path, "c", stages(second=6, lr=0.1), cache="false")
    assert other["metrics"] == fresh["metrics"]


@pytest.mark.parametrize("change", [
    [stages(first=7)],  # the shared stage itself changed
    [stages(), "seed=1"],
    [stages(), "model.optimizer.lr=0.003"],
    [stages(), "dataset.batch_size=16"],
])
def test_a_changed_input_is_not_reused(tmp_path, change):
    go(tmp_path, "a", stages())
    assert "reused_stage_from" not in go(tmp_path, "b", *change)


def test_keys_ignore_what_only_names_a_run_and_follow_the_source():
    cfg = {"model": {"x": 1}, "trainer": {"max_steps": 3, "progress": "bar"}, "seed": 0, "label": "a",
           "logger": {"wandb": True}, "paper": {"t": 1}}
    specs = [{"name": "pre"}, {"name": "post", "args": {"loss": "bso"}}]
    keys = stage_keys(cfg, specs)
    renamed = dict(cfg, label="b", logger={"wandb": False}, paper={}, trainer={"max_steps": 3, "progress": "none"})
    other_arm = [specs[0], {"name": "post", "args": {"loss": "xent"}}]
    assert stage_keys(renamed, specs) == keys
    assert stage_keys(cfg, other_arm)[0] == keys[0] and stage_keys(cfg, other_arm)[1] != keys[1]
    assert stage_keys(dict(cfg, seed=1), specs)[0] != keys[0]


def test_single_runs_do_not_use_the_cache_unless_asked(tmp_path):
    go(tmp_path, "a", stages(), cache="auto")  # outside a multirun: auto means off
    assert not (tmp_path / "cache").exists()


def test_a_study_shares_stages_by_default_and_no_cache_turns_it_off(tmp_path):
    import json
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("mlrun")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def sweep(name: str, *extra: str) -> list[dict]:
        args = ["-m", "experiment=digits_classifier", *FAST, stages(first=4, second=2),
                "label=a${stages.1.args.lr_scale}", "stages.1.args.lr_scale=0.5,0.1",
                f"hydra.sweep.dir={tmp_path / name}", *extra]
        p = subprocess.run([str(exe), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return [json.loads(f.read_text()) for f in sorted((tmp_path / name).glob("*/results.json"))]

    first, second = sweep("on")
    assert "reused_stage_from" not in first and second["reused_stage_from"]["stage"] == "pre"
    assert (tmp_path / ".stage_cache").is_dir()  # beside the sweep dir
    off = sweep("off", "--no-cache")
    assert not any("reused_stage_from" in r for r in off)
    assert [r["metrics"] for r in off] == [first["metrics"], second["metrics"]]
