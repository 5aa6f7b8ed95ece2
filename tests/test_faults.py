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
from mlrun.errors import CheckpointError, ConfigError, DataError
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


# ------------------------------------------------------------------------------------------ every way out is recorded


def _broken_history(d: Path) -> list[str]:
    run("digits_classifier", [*FAST, "trainer.max_steps=4", "trainer.log_every=1"], run_dir=d)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n"text"\n{"step": 3, "global_step": 3, "train/model_loss": 1.0}\n')
    return [f"resume={d}", "trainer.max_steps=6"]


@pytest.mark.parametrize("case", ["missing data", "bad dataset key", "malformed metrics.jsonl in the resumed dir",
                                  "Ctrl-C while the data loads"])
def test_every_way_out_of_a_run_leaves_failed_or_interrupted_on_record(case, tmp_path, monkeypatch):
    over = {"missing data": ["dataset._target_=mlrun.datasets.vision.CIFAR10", f"+dataset.root={tmp_path}/no",
                             "~dataset.flatten", "~dataset.normalize"],
            "bad dataset key": ["+dataset.nope=1"],
            "Ctrl-C while the data loads": []}.get(case) or _broken_history(tmp_path / "old")
    if case == "Ctrl-C while the data loads":
        import mlrun.datasets.digits as digits

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(digits.Digits, "__init__", interrupted)
    if case.startswith("malformed"):
        res = run("digits_classifier", [*FAST, *over], run_dir=tmp_path / "r")  # the junk lines are skipped
        assert res["status"] == "completed" and res["steps"] == 6
        return
    with pytest.raises(RunFailed) as e:
        run("digits_classifier", [*FAST, "trainer.max_steps=3", *over], run_dir=tmp_path / "r")
    res = json.loads((tmp_path / "r/results.json").read_text())
    want = "interrupted" if case.startswith("Ctrl-C") else "failed"
    assert res["status"] == want == e.value.results["status"] and e.value.code == (130 if want == "interrupted" else 1)
    assert res["error"] and "finished_at" in res and "wall_time_s" in res
    if case == "missing data":
        assert res["error"].startswith("dataset: dataset not usable at")


def test_start_errors_write_nothing_and_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="seed=99999999999999999999: expected an integer from 0 to 4294967295"):
        run("digits_classifier", [*FAST, "seed=99999999999999999999"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ history kept


KILL_AT = """
import os, signal, sys
from mlrun.trainer import Trainer
real = Trainer._step
def step(self, *a):
    out = real(self, *a)
    if self.global_step == {at} - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Trainer._step = step
from mlrun import run
run("digits_classifier", {over!r}, run_dir="killed")
"""


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(path)]


@pytest.mark.parametrize("at", [37, 23])
def test_sigkill_then_resume_keeps_metrics_line_for_line(at, tmp_path):
    """Killed between checkpoints (with 19 lines buffered), the resumed run's metrics.jsonl equals the uninterrupted
    run's line for line but the times; the temp file of a checkpoint cut short by the kill is removed."""
    over = [*FAST, "trainer.max_steps=50", "trainer.log_every=3", "trainer.eval_every=10",
            "trainer.checkpoint_every=10", "model.net.dropout=0.2", "seed=1"]
    run("digits_classifier", over, run_dir=tmp_path / "full")
    killed = _python(KILL_AT.format(at=at, over=over), tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (tmp_path / "killed/checkpoints/.last.pt.x1y2z3.tmp").write_bytes(b"cut short")  # what a kill mid-save leaves
    res = run("digits_classifier", [*over, f"resume={tmp_path / 'killed'}"], run_dir=tmp_path / "resumed")
    assert res["status"] == "completed"
    assert _rows(tmp_path / "resumed/metrics.jsonl") == _rows(tmp_path / "full/metrics.jsonl")
    assert not list((tmp_path / "resumed").rglob("*.tmp")) and not list((tmp_path / "killed").rglob("*.tmp"))


def test_resume_in_place_after_sigkill_cleans_the_temp_files_and_the_log(tmp_path):
    over = [*FAST, "trainer.max_steps=30", "trainer.log_every=2", "trainer.checkpoint_every=10", "seed=4"]
    run("digits_classifier", over, run_dir=tmp_path / "full")
    assert _python(KILL_AT.format(at=25, over=over), tmp_path).returncode == -9
    (tmp_path / "killed/checkpoints/.last.pt.abcdef.tmp").write_bytes(b"cut short")
    run("digits_classifier", [*over, f"resume={tmp_path / 'killed'}"], run_dir=tmp_path / "killed")
    assert _rows(tmp_path / "killed/metrics.jsonl") == _rows(tmp_path / "full/metrics.jsonl")
    assert not list((tmp_path / "killed").rglob("*.tmp"))


def test_resume_auto_restarts_in_place_a_run_killed_before_its_first_checkpoint(tmp_path, monkeypatch):
    """A sweep job SIGKILLed before any checkpoint (OOM, a lost node) leaves a `running` run with nothing to
    continue; the relaunch with resume=auto starts it again in its own dir (before: "already holds a run" for
    good), keeps the dead run's records renamed, and ends as an uninterrupted run. Another config is still refused."""
    monkeypatch.chdir(tmp_path)
    over = [*FAST, "trainer.max_steps=30", "trainer.log_every=2", "seed=6"]
    run("digits_classifier", over, run_dir=tmp_path / "full")
    assert _python(KILL_AT.format(at=20, over=over), tmp_path).returncode == -9
    dead = json.loads((tmp_path / "killed/results.json").read_text())
    assert dead["status"] == "running" and not (tmp_path / "killed/checkpoints/last.pt").exists()
    with pytest.raises(records.RunDirError, match="already holds a run"):  # not this config: refused
        run("digits_classifier", [*over, "trainer.max_steps=31", "resume=auto"], run_dir=tmp_path / "killed")
    res = run("digits_classifier", [*over, "resume=auto"], run_dir=tmp_path / "killed")
    assert res["status"] == "completed"
    assert _rows(tmp_path / "killed/metrics.jsonl") == _rows(tmp_path / "full/metrics.jsonl")
    kept = {p.name.split(".", 1)[1] for p in (tmp_path / "killed").glob("died-*")}
    assert "results.json" in kept and kept <= {"results.json", "metrics.jsonl"}  # metrics wait for a checkpoint
    assert run("digits_classifier", [*over, "resume=auto"], run_dir=tmp_path / "killed")["status"] == "completed"


# ------------------------------------------------------------------------------------------ secrets

SECRET = {"my_token": "tok-4f9a1c2e7b", "db_password": "pw-8d3e5a1f0c", "AWS_SECRET_ACCESS_KEY": "aws-77c1e0b9d2f4"}
PLANTED = [f"+my_token={SECRET['my_token']}", f"+db.password={SECRET['db_password']}",
           "+cred=${oc.env:AWS_SECRET_ACCESS_KEY}"]


def _holding_secrets(where: Path) -> dict[str, list[str]]:
    hits = {}
    for f in where.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            found = [k for k, v in SECRET.items() if v.encode() in data]
            if found:
                hits[str(f.relative_to(where))] = found
    return hits


@pytest.mark.parametrize("how", ["wandb", "ddp", "sweep"])
def test_planted_secrets_reach_no_file_and_no_terminal(how, tmp_path):
    env = {**ENV, "AWS_SECRET_ACCESS_KEY": SECRET["AWS_SECRET_ACCESS_KEY"], "WANDB_MODE": "offline"}
    exe = str(Path(sys.executable).with_name("mlrun"))
    args = {"wandb": ["experiment=digits_classifier", "logger=wandb", f"hydra.run.dir={tmp_path / 'r'}"],
            "ddp": ["experiment=digits_classifier", "hardware=ddp", f"hydra.run.dir={tmp_path / 'r'}"],
            "sweep": ["-m", "experiment=digits_classifier", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'r'}"]}[how]
    fast = [a for a in FAST if not (how == "wandb" and a.startswith("logger="))]
    p = subprocess.run([exe, *args, *fast, "trainer.max_steps=2", *PLANTED], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _holding_secrets(tmp_path / "r") == {}
    assert not any(v in p.stdout + p.stderr for v in SECRET.values())
    config = (next((tmp_path / "r").rglob("config.yaml"))).read_text()
    assert "my_token: <redacted>" in config and "password: <redacted>" in config  # still says the keys were set
    if how == "wandb":
        assert list((tmp_path / "r/wandb").glob("offline-run-*/run-*.wandb"))
    if how == "ddp":
        assert "cred: <redacted>" in (tmp_path / "r/.hydra/resolved.yaml").read_text()


def test_redaction_by_key_name_and_by_value():
    from mlrun.loggers import redact, register_secrets, secret_name

    assert [secret_name(k) for k in ("my_token", "db.password", "api_key", "apiKey", "AWS_SECRET_ACCESS_KEY",
                                     "max_tokens", "sort_key", "stage_key", "tokenizer", "keep_last")] == \
        [True] * 5 + [False] * 5
    register_secrets({"x": {"hf_token": "hf_abcdefghijkl"}})
    assert redact({"cred": "hf_abcdefghijkl", "o": ["+a.password=zzz", "a=b"], "token": 5}) == \
        {"cred": "<redacted>", "o": ["+a.password=<redacted>", "a=b"], "token": "<redacted>"}
    assert redact({"test/token_acc": 0.5}, by_name=False) == {"test/token_acc": 0.5}  # metric names stay


# ------------------------------------------------------------------------------------------ one run per dir


def test_a_second_run_into_a_busy_or_used_run_dir_refuses_in_one_line(tmp_path):
    exe = str(Path(sys.executable).with_name("mlrun"))
    cmd = [exe, "experiment=digits_classifier", *FAST, "trainer.max_steps=300", "trainer.log_every=10",
           f"hydra.run.dir={tmp_path / 'shared'}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    refused = next(err for (out, err), p in zip(outs, procs) if p.returncode == 1).strip().splitlines()
    assert len(refused) == 1 and ("is in use by another mlrun process" in refused[0] or
                                  "already holds a run (status" in refused[0]), refused
    steps = [r["global_step"] for r in read_metrics(tmp_path / "shared/metrics.jsonl") if "train/model_loss" in r]
    assert steps == list(range(10, 301, 10))  # one run's history, no duplicates
    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"mlrun: error: digits_classifier: the run dir {tmp_path / 'shared'} already holds a run (status completed); "
        f"choose another hydra.run.dir, or continue that run with resume={tmp_path / 'shared'}")
    assert [r["global_step"] for r in read_metrics(tmp_path / "shared/metrics.jsonl") if "train/model_loss" in r] \
        == steps


# ------------------------------------------------------------------------------------------ full disk, read-only


FILL = """
import resource, signal, sys
from mlrun.records import MetricsLog, RecordError
if sys.argv[2] == "rlimit":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
log = MetricsLog(sys.argv[1], flush_every=7)
try:
    for i in range(100000):
        log.log({"step": i, "train/loss": 0.123456789 * i, "pad": "x" * (i % 97)})
except RecordError as e:
    print(e)
"""


def _mount_tmpfs(where: Path, opts: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("how", ["rlimit", "tmpfs"])
def test_a_real_short_write_leaves_only_whole_metrics_lines(how, tmp_path):
    where = tmp_path / "disk"
    if how == "tmpfs" and not _mount_tmpfs(where, "size=48k"):
        pytest.skip("needs a tmpfs mount (root)")
    where.mkdir(exist_ok=True)
    try:
        p = subprocess.run([sys.executable, "-c", FILL, str(where / "m.jsonl"), how], env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert ("File too large" if how == "rlimit" else "No space left on device") in p.stdout, p.stderr[-1000:]
        data = (where / "m.jsonl").read_bytes()
        assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines())
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(where)], capture_output=True)


def test_a_run_that_fills_the_disk_ends_failed_with_whole_records(tmp_path):
    where = tmp_path / "disk"
    if not _mount_tmpfs(where, "size=48k"):
        pytest.skip("needs a tmpfs mount (root)")
    try:
        p = subprocess.run([str(Path(sys.executable).with_name("mlrun")), "experiment=digits_classifier", *FAST,
                            "trainer.max_steps=3000", "trainer.log_every=1", f"hydra.run.dir={where / 'r'}"],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and "No space left on device" in p.stderr, p.stderr[-2000:]
        res = json.loads((where / "r/results.json").read_text())  # the final status fitted where a copy did not
        assert res["status"] == "failed" and "No space left on device" in res["error"]
        assert (where / "r/metrics.jsonl").read_bytes().endswith(b"\n")
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_read_only_run_location_is_one_line_naming_the_path(tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=16k"):
        if os.geteuid() == 0:
            pytest.skip("root writes through mode bits and no read-only mount could be made")
        ro.chmod(0o555)
    try:
        for target in (ro, ro / "run"):
            p = subprocess.run([str(Path(sys.executable).with_name("mlrun")), "experiment=digits_classifier", *FAST,
                                f"hydra.run.dir={target}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                               timeout=120)
            lines = (p.stdout + p.stderr).strip().splitlines()
            assert p.returncode == 1 and len(lines) == 1 and str(target) in lines[0], lines
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


# ------------------------------------------------------------------------------------------ untrusted inputs


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_cannot_run_code(tmp_path):
    from mlrun.datasets.vision import CIFAR10, write_cifar10_fixture

    write_cifar10_fixture(tmp_path)
    with open(tmp_path / "cifar-10-batches-py/data_batch_1", "wb") as f:
        pickle.dump({b"data": _RunsCode(tmp_path / "PWNED"), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_1: expected a CIFAR-10 python batch .*refused posix.system"):
        CIFAR10(root=str(tmp_path))
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------ command lines


KEYS = ["trainer.max_steps", "trainer.max_step", "trainer.precision", "trainer.log_every", "hardware.threads",
        "seed", "model.net.channels", "dataset.batch_size", "logger.wandb", "nope.key", "trainer",
        "trainer.clip_grad_norm", "trainer.mode", "trainer.on_nan", "hardware.nproc_per_node", "trainer.accumulate",
        "+trainer.foo", "label"]
VALUES = st.one_of(st.sampled_from(["", "abc", "-1", "3", "1.5", "null", "[1,2", "{a:", "true", "'x'", "${nope}",
                                    "0", "nan", "${oc.env:HOME}", "99999999999999999999"]),
                   st.text(alphabet="ab1=.,[]{}:$' ", max_size=6))
OVERRIDES = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES),
    st.builds(lambda g, v: f"{g}={v}", st.sampled_from(["hardware", "logger", "experiment", "debug", "model", "tpu"]),
              st.sampled_from(["cpu", "none", "nope", "", "[a,b]", "digits_classifier", "fast"])),
    st.text(alphabet="abc=.+~/-", min_size=1, max_size=8),
)
ISSUE_27 = ["trainer.clip_grad_norm=-1", "trainer.mode=maximize", "trainer.precision=8", "trainer.precision=bf17",
            "trainer.max_steps=-5", "trainer.max_epochs=-1", "trainer.on_nan=ignore", "seed=99999999999999999999",
            "+trainer.foo=1", "dataset.batch_size=0", "trainer.max_steps=${oc.env:HOME}", "label=${label}",
            "hardware.threads=-1", "model.optimizer.lr=nan", "trainer.num_workers=-1", "trainer.limit_eval_batches=0"]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from hydra.core.global_hydra import GlobalHydra

    from mlrun.cli import main

    GlobalHydra.instance().clear()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{argv!r} raised {type(e).__name__}: {e}")
    out = capsys.readouterr()
    return code, out.out + out.err


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.generate], derandomize=True)
@example(override="trainer.max_steps=abc")
@example(override="trainer.max_step=3")
@example(override="hardware.nproc_per_node=0")
@given(override=st.one_of(OVERRIDES, st.sampled_from(ISSUE_27)))
def test_generated_overrides_never_traceback_and_either_train_or_stop_in_one_line(override, capsys, tmp_path_factory):
    """`--cfg job` composes and prints without running: a bad override must exit non-zero with a message and no
    traceback. Whatever composes then runs for 2 steps: it completes with a record saying so, or stops at start in
    one line, leaving nothing behind; never a traceback, never a run that completes while doing something else."""
    argv = ["experiment=digits_classifier", override]
    code, out = _main([*argv, "--cfg", "job"], capsys)
    assert "Traceback" not in out, (override, out[-500:])
    if code != 0:
        assert out.strip(), override
        return
    where = tmp_path_factory.mktemp("gen")
    code, out = _main([*argv, "trainer.max_steps=2", *FAST, f"hydra.run.dir={where / 'r'}"], capsys)
    assert "Traceback" not in out, (override, out[-500:])
    if code == 0:
        res = json.loads((where / "r" / "results.json").read_text())
        assert res["status"] == "completed" and res["steps"] >= 1, override
    else:
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlrun: error: "), (override, lines)
        assert not (where / "r").exists() or not (where / "r" / "checkpoints").exists(), override
