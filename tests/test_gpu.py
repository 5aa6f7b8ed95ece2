"""GPU checks: run where CUDA is present (a lent GPU machine), skipped cleanly everywhere else (CI)."""

from __future__ import annotations

import pytest
import torch

from mlrun import run
from mlrun.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FAST = ["logger=none", "trainer.progress=none", "trainer.max_steps=50"]


def test_gpu_bf16_run_trains_and_records_the_device(tmp_path):
    res = run("digits_classifier", [*FAST, "hardware=gpu"], run_dir=tmp_path / "r")
    assert res["status"] == "completed" and res["device"].startswith("cuda")
    assert res["metrics"]["val/acc"] > 0.5


def test_gpu_checkpoint_resumes_on_cpu(tmp_path):
    run("digits_classifier", [*FAST, "hardware=gpu", "trainer.precision=32"], run_dir=tmp_path / "g")
    res = run("digits_classifier", [*FAST, "trainer.max_steps=60", f"resume={tmp_path / 'g'}"], run_dir=tmp_path / "c")
    assert res["status"] == "completed"
    state = Trainer.load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")
    assert state["position"]["global_step"] == 60


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_with_nccl(tmp_path):
    res = run("digits_classifier", [*FAST, "hardware=ddp"], run_dir=tmp_path / "r")
    assert res["world_size"] == 2 and res["ddp_replicas_identical"] and res["device"].startswith("cuda")
