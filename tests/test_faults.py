"""Nothing lost, nothing opaque: every failure a user can cause or suffer ends in a clear message and an intact
run dir. One test per failure case (the README's troubleshooting table lists them)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from mlrun import records, run
from mlrun.app import RunFailed
from mlrun.errors import CheckpointError, DataError
from mlrun.records import MetricsLog, RecordError, read_metrics, write_json
from mlrun.trainer import Trainer

FAST = ["logger=none", "trainer.progress=none", "hardware.threads=1"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}


def _python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------ SIGKILL


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_is_exact(tmp_path, monkeypatch):
    over = [*FAST, "trainer.max_steps=30", "trainer.checkpoint_every=10", "seed=5"]
    killed = _python(f"""
        import os, signal
        import mlrun.records as rec
        real_fsync, n = os.fsync, [0]
        def dying_fsync(fd):
            name = os.readlink(f"/proc/self/fd/{{fd}}")
            if ".last.pt." in name:
                n[0] += 1
                if n[0] == 2:  # the step-20 checkpoint: half-written, then the process dies
                    os.ftruncate(fd, os.fstat(fd).st_size // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(fd)
        rec.os.fsync = dying_fsync
        from mlrun import run
        run("digits_classifier", {over!r}, run_dir="outputs/a")
    """, tmp_path)
    assert killed.returncode == -9, killed.stderr
    state = Trainer.load_checkpoint(tmp_path / "outputs/a/checkpoints/last.pt")  # intact, readable
    assert state["position"]["global_step"] == 10
    assert json.loads((tmp_path / "outputs/a/results.json").read_text())["status"] == "running"

    run("digits_classifier", over, run_dir=tmp_path / "full")
    monkeypatch.chdir(tmp_path)
    res = run("digits_classifier", [*over, "resume=auto"], run_dir=tmp_path / "outputs" / "b")
    assert res["resumed_from"] == str(Path("outputs/a").resolve()) or res["resumed_from"].endswith("outputs/a")
    a = Trainer.load_checkpoint(tmp_path / "full/checkpoints/last.pt")["model"]
    b = Trainer.load_checkpoint(tmp_path / "outputs/b/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ bad checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    run("digits_classifier", [*FAST, "trainer.max_steps=2"], run_dir=d)
    return d


def test_truncated_checkpoint_names_the_file(trained, tmp_path):
    bad = tmp_path / "bad"
    (bad / "checkpoints").mkdir(parents=True)
    data = (trained / "checkpoints/last.pt").read_bytes()
    (bad / "checkpoints/last.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*bad/checkpoints/last.pt"):
        run("digits_classifier", [*FAST, f"resume={bad}"], run_dir=tmp_path / "r")


def test_checkpoint_cannot_run_code(tmp_path):
    """weights_only loading: a pickle that would call os.system is refused, and nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil/checkpoints").mkdir(parents=True)
    with open(tmp_path / "evil/checkpoints/last.pt", "wb") as f:
        pickle.dump({"format": 1, "model": Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        Trainer.load_checkpoint(tmp_path / "evil/checkpoints/last.pt")
    assert not marker.exists()


def test_checkpoint_of_another_task_is_refused(trained, tmp_path):
    state = Trainer.load_checkpoint(trained / "checkpoints/last.pt")
    state["task"] = "SomethingElse"
    (tmp_path / "other/checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "other/checkpoints/last.pt")
    with pytest.raises(RunFailed, match="holds a SomethingElse, not a Classifier"):
        run("digits_classifier", [*FAST, f"resume={tmp_path / 'other'}"], run_dir=tmp_path / "r")


# ------------------------------------------------------------------------------------------ disk full


def test_disk_full_leaves_the_old_results_json_whole(tmp_path, monkeypatch):
    write_json(tmp_path / "results.json", {"status": "running"})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", full)
    with pytest.raises(RecordError, match="could not write .*results.json: No space left on device"):
        write_json(tmp_path / "results.json", {"status": "completed", "metrics": {"a": 1}})
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_disk_full_never_leaves_a_broken_metrics_line(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl", flush_every=1)
    log.log({"step": 1, "loss": 0.5})
    monkeypatch.setattr(records.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(RecordError, match="could not append"):
        log.log({"step": 2, "loss": 0.4})
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_unwritable_run_dir_is_one_clear_error(tmp_path, monkeypatch):
    real = records.tempfile.mkstemp

    def refuse(*a, **k):
        if "results.json" in k.get("prefix", ""):
            raise OSError(errno.EACCES, "Permission denied")
        return real(*a, **k)

    monkeypatch.setattr(records.tempfile, "mkstemp", refuse)
    with pytest.raises(RecordError, match="results.json: Permission denied"):
        run("digits_classifier", [*FAST, "trainer.max_steps=1"], run_dir=tmp_path / "r")


def test_torn_last_metrics_line_is_skipped_when_reading(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1}]


# ------------------------------------------------------------------------------------------ W&B


def test_wandb_unreachable_warns_and_the_run_goes_on_without_leaking_the_key(tmp_path):
    key = "0123456789abcdef0123456789abcdef01234567"
    env = {**ENV, "WANDB_MODE": "online", "WANDB_API_KEY": key, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    p = _python("""
        from mlrun import run
        r = run("digits_classifier", ["trainer.progress=none", "hardware.threads=1", "trainer.max_steps=3",
                "logger=wandb", "logger.init_timeout=3"], run_dir="r")
        print("STATUS", r["status"])
    """, tmp_path, env)
    assert "STATUS completed" in p.stdout, p.stderr[-2000:]
    assert "W&B could not start" in p.stderr + p.stdout
    assert len(read_metrics(tmp_path / "r/metrics.jsonl")) > 0
    for f in (tmp_path / "r").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".log", ".txt"):
            assert key not in f.read_text(errors="ignore"), f
    assert key not in p.stdout + p.stderr


def test_secret_keys_are_redacted_from_dumps():
    from mlrun.loggers import redact

    assert redact({"logger": {"api_key": "s3cret", "project": "p"}, "x": [{"token": "t"}]}) == {
        "logger": {"api_key": "<redacted>", "project": "p"}, "x": [{"token": "<redacted>"}]}


# ------------------------------------------------------------------------------------------ data


def test_missing_dataset_says_where_and_what(tmp_path):
    from mlrun.datasets.vision import CIFAR10, MNIST

    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1: expected the CIFAR-10 python batches"):
        CIFAR10(root=str(tmp_path))
    with pytest.raises(DataError, match=r"MNIST/raw: expected the four idx files"):
        MNIST(root=str(tmp_path))


def test_truncated_dataset_file_says_which_file(tmp_path):
    from mlrun.datasets.vision import CIFAR10, write_cifar10_fixture

    write_cifar10_fixture(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3: expected a CIFAR-10 python batch"):
        CIFAR10(root=str(tmp_path))


def test_paper_scale_experiment_without_data_is_one_line_from_the_cli(tmp_path):
    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), "experiment=digits_classifier", "logger=none", "hardware.threads=1",
                        "dataset._target_=mlrun.datasets.vision.CIFAR10", f"+dataset.root={tmp_path}/nodata",
                        "~dataset.flatten", "~dataset.normalize"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "dataset not usable at" in p.stderr and "cifar-10-batches-py" in p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------ run dirs


def test_two_runs_in_the_same_second_get_distinct_dirs(tmp_path):
    exe = Path(sys.executable).with_name("mlrun")
    cmd = [str(exe), "experiment=digits_classifier", "logger=none", "trainer.max_steps=1", "hardware.threads=1",
           "trainer.progress=none"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    assert all(p.wait(timeout=180) == 0 for p in procs)
    dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(dirs) == 2 and all((d / "results.json").exists() for d in dirs)


def test_sweep_launched_twice_gets_two_dirs_and_resume_auto_reuses_finished_runs(tmp_path):
    exe = Path(sys.executable).with_name("mlrun")
    cmd = [str(exe), "-m", "experiment=digits_classifier", "seed=0,1", "logger=none", "trainer.max_steps=2",
           "hardware.threads=1", "trainer.progress=none", "resume=auto"]
    for _ in range(2):
        p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    sweeps = sorted((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 2
    second = [json.loads(f.read_text()) for f in sorted(sweeps[1].glob("*/results.json"))]
    first_dirs = {str(d.resolve()) for d in sweeps[0].glob("*_run_*")}
    assert all(r["status"] == "completed" and r.get("reused_from") in first_dirs for r in second)


# ------------------------------------------------------------------------------------------ command lines


KEYS = ["trainer.max_steps", "trainer.max_step", "trainer.precision", "trainer.log_every", "hardware.threads",
        "seed", "model.net.channels", "dataset.batch_size", "logger.wandb", "nope.key", "trainer"]
VALUES = st.one_of(st.sampled_from(["", "abc", "-1", "3", "1.5", "null", "[1,2", "{a:", "true", "'x'", "${nope}"]),
                   st.text(alphabet="ab1=.,[]{}:$' ", max_size=6))
OVERRIDES = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES),
    st.builds(lambda g, v: f"{g}={v}", st.sampled_from(["hardware", "logger", "experiment", "debug", "model", "tpu"]),
              st.sampled_from(["cpu", "none", "nope", "", "[a,b]", "digits_classifier", "fast"])),
    st.text(alphabet="abc=.+~/-", min_size=1, max_size=8),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.generate], derandomize=True)
@example(override="trainer.max_steps=abc")
@example(override="trainer.max_step=3")
@given(override=OVERRIDES)
def test_generated_overrides_never_traceback_and_never_pass_a_broken_config(override, capsys):
    """`--cfg job` composes and prints without running: a bad override must exit non-zero with a message and
    no traceback; one that exits 0 must yield a config that the typed schema accepts."""
    from hydra.core.global_hydra import GlobalHydra

    from mlrun.cli import main

    GlobalHydra.instance().clear()
    argv = ["experiment=digits_classifier", override, "--cfg", "job"]
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{override!r} raised {type(e).__name__}: {e}")
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err, (override, out.err[-500:])
    if code == 0:
        from omegaconf import OmegaConf

        from mlrun import compose

        try:
            cfg = compose(None, argv[:2])
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{override!r} exited 0 with a broken config: {type(e).__name__}: {e}")
    else:
        assert out.err.strip() or out.out.strip()
