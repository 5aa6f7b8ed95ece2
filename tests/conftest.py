"""Shared test set-up: one torch thread, W&B off, runs in temp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh folder so outputs/ never lands in the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
