"""docs/usage.md's examples run: every line of a ```bash block (at small scale), and the Python API block."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parents[1] / "docs" / "usage.md"
SMALL = ["trainer.step_limit=3", "logger=none", "trainer.progress=none", "hardware.threads=1"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def commands() -> list[str]:
    return [line.strip() for b in blocks("bash") for line in b.splitlines() if line.strip().startswith("mlrun")]


@pytest.mark.parametrize("line", commands())
def test_usage_example_runs(line, tmp_path):
    args = shlex.split(line)[1:]
    if args and args[0] not in ("report", "ls", "validate", "sync", "--help"):
        args += SMALL
    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{line}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"


def test_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = blocks("python")
    exec(compile(code.replace("trainer.max_steps=100", "trainer.max_steps=5"), "usage.md", "exec"), {})
    assert (tmp_path / "outputs/notebook/first/results.json").exists()
