"""Every bad input is one clear line before any work; resume and sweeps do what the user meant (issue 27).

Bad command lines run in-process through `mlrun.cli.main` (the real Hydra app, a few steps where the input gets
that far); sweeps, DDP and interrupts run the real `mlrun` command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlrun import run
from mlrun.app import RunFailed
from mlrun.trainer import Trainer

FAST = ["logger=none", "trainer.progress=none", "hardware.threads=1"]
EXP = "experiment=digits_classifier"
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run `mlrun ARGV` in this process; (exit code, non-empty output lines)."""
    from hydra.core.global_hydra import GlobalHydra

    from mlrun.cli import main

    GlobalHydra.instance().clear()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, [ln for ln in (out.err + out.out).splitlines() if ln.strip()]


def mlrun(*args: str, cwd: Path, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mlrun")
    return subprocess.run([str(exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------------ one line, before any work

BAD = [
    # exit 0 while training wrongly, before: each is now refused at start, naming key, value and what is allowed
    ("trainer.clip_grad_norm=-1", "trainer.clip_grad_norm=-1.0: expected a number > 0 or null"),
    ("trainer.mode=maximize", "trainer.mode=maximize: expected one of max, min"),
    ("trainer.precision=8", "trainer.precision=8: expected one of 32, bf16, 16, auto, bf16-mixed, 16-mixed, fp16"),
    ("trainer.precision=bf17", "trainer.precision=bf17: expected one of 32, bf16, 16, auto, bf16-mixed, 16-mixed, fp16 "
                               "(did you mean bf16?)"),
    ("hardware.nproc_per_node=0", "hardware.nproc_per_node=0: expected an integer >= 1"),
    ("hardware.nproc_per_node=-2", "hardware.nproc_per_node=-2: expected an integer >= 1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5: expected an integer >= 1"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: expected an integer >= 1 or null"),
    ("trainer.on_nan=ignore", "trainer.on_nan=ignore: expected one of stop, skip"),
    ("trainer.accumulate=0", "trainer.accumulate=0: expected an integer >= 1"),
    ("trainer.log_every=-1", "trainer.log_every=-1: expected an integer >= 0"),
    ("trainer.progress=fancy", "trainer.progress=fancy: expected one of auto, bar, plain, none"),
    ("scale=gpu", "scale=gpu: expected one of cpu, paper"),
    ("logger.mode=onlin", "logger.mode=onlin: expected one of online, offline, disabled or null (did you mean "
                          "online?)"),
    ("hardware.node_rank=-1", "hardware.node_rank=-1: expected an integer >= 0"),
    # tracebacks, before
    ("seed=99999999999999999999", "seed=99999999999999999999: expected an integer from 0 to 4294967295"),
    ("+trainer.foo=1", "trainer.foo=1: trainer has no key 'foo'"),
    ("+hardware.thread=1", "hardware.thread=1: hardware has no key 'thread' (did you mean threads?)"),
    ("dataset.batch_size=0", "dataset.batch_size=0: expected a positive integer or null"),
    ("dataset.batch_size=-1", "dataset.batch_size=-1: expected a positive integer or null"),
    ("trainer.max_steps=${oc.env:HOME}", "trainer.max_steps=${oc.env:HOME}: Value "),
    ("trainer.max_steps=${oc.env:NOPE_NOT_SET}", "trainer.max_steps=${oc.env:NOPE_NOT_SET}: Environment variable "
                                                 "'NOPE_NOT_SET' not found"),
    ("label=${label}", "label=${label}: Recursive interpolation detected"),
    ("hydra.run.dir=/proc/mlrun_x", "cannot create or write /proc/mlrun_x: "),
    ("hydra.run.dir=/dev/null/x", "cannot create or write /dev/null/x: Not a directory"),
    ("hardware.threads=-1", "hardware.threads=-1: expected an integer >= 1 or null"),
    ("model.optimizer.lr=-1", "model.optimizer.lr=-1: expected a finite learning rate >= 0"),
    ("model.optimizer.lr=nan", "model.optimizer.lr=nan: expected a finite learning rate >= 0"),
    ("trainer.num_workers=-1", "trainer.num_workers=-1: expected an integer >= 0"),
    ("trainer.limit_eval_batches=0", "trainer.limit_eval_batches=0: expected an integer >= 1 or null"),
    ("experiment_name=" + "a" * 300, "File name too long"),
    ("stages=[{name:a,max_step:3}]", "stages.0.max_step=3: a stage takes trainer keys and name, batch_size, split, "
                                     "args, max_steps_from_best (did you mean max_steps?)"),
    ("trainer.scheduler=abc", "trainer.scheduler=abc: expected a partial `_target_` mapping"),
    ("trainer.max_step=3", "trainer.max_step=3: Key 'max_step' not in 'TrainerConf'; did you mean trainer.max_steps?"),
    ("sed=3", "sed=3: Key 'sed' not in 'MlrunConf'; did you mean seed?"),
    ("dataset.batch_sise=3", "dataset.batch_sise=3: Key 'batch_sise' is not in dataset; did you mean "
                             "dataset.batch_size?"),
]
BUILD = [  # the run starts, and what the config names cannot be built: one line, and a `failed` record saying so
    ("model.optimizer._target_=torch.optim.Adamm", "model.optimizer: Error locating target 'torch.optim.Adamm'"),
    ("+dataset.nope=1", "dataset: TypeError: Digits.__init__() got an unexpected keyword argument 'nope'"),
    ("model._target_=os.system", "model: "),
]


@pytest.mark.parametrize("override, says", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_input_is_one_line_naming_key_value_and_what_is_allowed(override, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    key = override.split("=")[0].lstrip("+")
    rest = [a for a in ["trainer.max_steps=3", *FAST] if a.split("=")[0] != key]  # the case's own value wins
    code, lines = cli([EXP, override, *rest], capsys)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("mlrun: error: ") and says in lines[0], lines
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("*.pt"))
    assert not (tmp_path / "outputs").exists()  # no debris, not even the output root this launch made


@pytest.mark.parametrize("override, says", BUILD, ids=[b[0][:40] for b in BUILD])
def test_what_cannot_be_built_is_one_line_and_a_failed_record(override, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, lines = cli([EXP, override, "trainer.max_steps=3", *FAST], capsys)
    assert code == 1 and len(lines) == 1 and says in lines[0], lines
    assert "Traceback" not in lines[0] and "mlrun.log" not in lines[0]
    (res,) = tmp_path.rglob("results.json")
    res = json.loads(res.read_text())
    assert res["status"] == "failed" and says in res["error"]


def test_the_monitor_fails_at_the_first_evaluation_naming_the_metrics_that_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, lines = cli([EXP, "trainer.monitor=val/accuracy", "trainer.eval_every=2", "trainer.max_steps=6", *FAST],
                      capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "trainer.monitor=val/accuracy is not among the metrics of the first evaluation of stage 'train': " \
           "val/acc, val/loss" in lines[0]
    (res,) = tmp_path.rglob("results.json")
    assert json.loads(res.read_text())["status"] == "failed"


def test_an_unexpected_error_is_one_line_with_its_traceback_in_the_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def bug(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(Trainer, "fit", bug)
    code, lines = cli([EXP, "hydra.run.dir=r", *FAST], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("mlrun: error: digits_classifier: failed: ZeroDivisionError: division by zero.")
    assert lines[0].endswith(f"(traceback in {tmp_path / 'r' / 'mlrun.log'})")
    log = (tmp_path / "r/mlrun.log").read_text()
    assert "Traceback (most recent call last)" in log and "return 1 / 0" in log
    assert json.loads((tmp_path / "r/results.json").read_text())["error"] == "ZeroDivisionError: division by zero"


def test_a_model_that_cannot_run_fails_in_one_line_with_a_failed_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # model.net.channels=0: built (torch warns once), then the first forward fails
    code, lines = cli([EXP, "model.net.channels=0", "trainer.max_steps=3", "hydra.run.dir=r", *FAST], capsys)
    errors = [ln for ln in lines if ln.startswith("mlrun: error: ")]
    assert code == 1 and len(errors) == 1 and len(lines) <= 2 and "Traceback" not in "".join(lines), lines
    assert "expected weight to be at least 1" in errors[0]
    assert json.loads((tmp_path / "r/results.json").read_text())["status"] == "failed"


def test_failed_starts_leave_no_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, lines = cli(["logger=none"], capsys)
    assert code == 1 and lines[0].startswith("mlrun: error: choose an experiment")
    args = [EXP, "hardware=gpu", *FAST] if not torch.cuda.is_available() else [EXP, "hardware.device=cuda:x"]
    code, lines = cli(args, capsys)
    assert code == 1 and len(lines) == 1
    assert not (tmp_path / "outputs").exists()


def test_a_checkpoint_without_position_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run("digits_classifier", [*FAST, "trainer.max_steps=2"], run_dir=tmp_path / "a")
    state = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)
    del state["position"]
    torch.save(state, tmp_path / "a/checkpoints/last.pt")
    code, lines = cli([EXP, f"resume={tmp_path / 'a'}", *FAST], capsys)
    assert code == 1 and len(lines) == 1
    assert "last.pt is an incomplete mlrun checkpoint: no position" in lines[0]


def test_verbs_fail_on_what_does_not_exist(tmp_path, capsys):
    code, lines = cli(["reproduce", "digits_clasifier"], capsys)
    assert code == 1 and lines == ["mlrun reproduce: no experiment 'digits_clasifier'; did you mean "
                                   "digits_classifier?"]
    code, lines = cli(["validate", "digits_clasifier"], capsys)
    assert code == 1 and lines == ["mlrun validate: no experiment 'digits_clasifier'; did you mean digits_classifier?"]


# ------------------------------------------------------------------------------------------ runs a few steps


def test_generated_runs_either_train_or_stop_at_start_with_one_line(tmp_path, monkeypatch, capsys):
    """Values at and around each range's edge: those allowed train a few steps and complete; the others stop before
    anything is written, in one line."""
    monkeypatch.chdir(tmp_path)
    cases = {"trainer.accumulate=1": 0, "trainer.accumulate=2": 0, "trainer.log_every=0": 0, "trainer.eval_every=1": 0,
             "trainer.clip_grad_norm=0.5": 0, "trainer.clip_grad_norm=0": 1, "trainer.keep_last=1": 0,
             "trainer.checkpoint_every=1": 0, "trainer.overfit_batches=1": 0, "trainer.overfit_batches=0": 1,
             "trainer.limit_eval_batches=1": 0, "trainer.on_nan=skip": 0, "trainer.mode=min": 0,
             "trainer.precision=bf16": 0, "hardware.threads=2": 0, "seed=4294967295": 0, "seed=4294967296": 1,
             "trainer.max_epochs=1": 0, "trainer.step_limit=0": 1, "dataset.batch_size=1": 0}
    for i, (override, want) in enumerate(cases.items()):
        code, lines = cli([EXP, override, "trainer.max_steps=3", f"hydra.run.dir=r{i}", *FAST], capsys)
        assert code == want, (override, lines)
        if want == 0:
            res = json.loads((tmp_path / f"r{i}" / "results.json").read_text())
            assert res["status"] == "completed" and res["steps"] >= 1, override
        else:
            assert len(lines) == 1 and not (tmp_path / f"r{i}").exists(), (override, lines)


# ------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    d = tmp_path_factory.mktemp("twenty")
    over = [*FAST, "trainer.log_every=5", "trainer.eval_every=10", "model.net.dropout=0.3", "seed=2"]
    run("digits_classifier", [*over, "trainer.max_steps=20"], run_dir=d / "r20")
    run("digits_classifier", [*over, "trainer.max_steps=40"], run_dir=d / "r40")
    return d, over


def test_resuming_a_finished_run_with_more_steps_continues_bit_exact(twenty, tmp_path):
    d, over = twenty
    res = run("digits_classifier", [*over, "trainer.max_steps=40", f"resume={d / 'r20'}"], run_dir=tmp_path / "c")
    assert res["status"] == "completed" and res["steps"] == 40
    a = Trainer.load_checkpoint(d / "r40/checkpoints/last.pt")["model"]
    b = Trainer.load_checkpoint(tmp_path / "c/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["metrics"]["test/acc"] == json.loads((d / "r40/results.json").read_text())["metrics"]["test/acc"]


def test_resuming_with_fewer_steps_than_done_is_refused_in_one_line(twenty, tmp_path):
    d, over = twenty
    with pytest.raises(RunFailed, match="stage 'train' already ran 20 steps in the checkpoint; this config gives it "
                                        "10, and a resumed run cannot take steps back") as e:
        run("digits_classifier", [*over, "trainer.max_steps=10", f"resume={d / 'r20'}"], run_dir=tmp_path / "c")
    assert e.value.results["status"] == "failed" and not (tmp_path / "c/checkpoints").exists()


def test_resuming_with_the_same_length_trains_nothing_more(twenty, tmp_path):
    d, over = twenty
    res = run("digits_classifier", [*over, "trainer.max_steps=20", f"resume={d / 'r20'}"], run_dir=tmp_path / "c")
    assert res["steps"] == 20 and res["status"] == "completed"
    assert res["metrics"] == json.loads((d / "r20/results.json").read_text())["metrics"]
    assert not (tmp_path / "c/checkpoints").exists()  # nothing trained, nothing saved


def test_resume_auto_never_looks_above_the_output_roots(tmp_path, monkeypatch):
    """Another checkout's finished run of the same config, above this run dir, is not reused."""
    over = [*FAST, "trainer.max_steps=3"]
    run("digits_classifier", over, run_dir=tmp_path / "other_checkout/outputs/x")
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path / "mine")
    res = run("digits_classifier", [*over, "resume=auto"], run_dir=tmp_path / "other_checkout/outputs/mine/run")
    assert "reused_from" not in res and "resumed_from" not in res and res["steps"] == 3


def test_resume_auto_continues_the_newest_unfinished_run_not_an_older_finished_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    over = [*FAST, "trainer.max_steps=10"]
    run("digits_classifier", over, run_dir=tmp_path / "outputs/old")
    time.sleep(1.1)  # started_at has one-second resolution
    original = Trainer._step

    def step(self, *args):
        out = original(self, *args)
        if self.global_step == 4:
            self._stop_signal = "SIGINT"
        return out

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises(RunFailed):
        run("digits_classifier", over, run_dir=tmp_path / "outputs/stopped")
    monkeypatch.setattr(Trainer, "_step", original)
    res = run("digits_classifier", [*over, "resume=auto"], run_dir=tmp_path / "outputs/again")
    assert res["resumed_from"] == str(tmp_path / "outputs/stopped") and res["steps"] == 10


# ------------------------------------------------------------------------------------------ sweeps


def test_a_sweep_with_failed_jobs_exits_nonzero_saying_how_many(tmp_path):
    p = mlrun("-m", EXP, "seed=0,1", "resume=/nonexistent", *FAST, f"hydra.sweep.dir={tmp_path / 'sw'}",
              cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == f"mlrun: error: 2 of 2 runs failed; see {tmp_path / 'sw'}"
    runs = [json.loads(f.read_text()) for f in sorted((tmp_path / "sw").glob("*/results.json"))]
    assert [r["status"] for r in runs] == ["failed", "failed"] and "no checkpoints/last.pt" in runs[0]["error"]


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for k in map(int, (task / "children").read_text().split()):
                out += [k, *_children(k)]
    except OSError:  # it ended while we looked
        pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_for(pred, timeout: float = 120, poll: float = 0.2) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(poll)
    raise AssertionError("timed out")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize("target", ["rank 1", "launcher"])
def test_sigterm_to_one_ddp_worker_stops_every_rank_at_one_step_with_one_checkpoint(target, tmp_path):
    exe = Path(sys.executable).with_name("mlrun")
    args = [str(exe), EXP, "hardware=ddp", *FAST, "trainer.max_steps=100000", "trainer.log_every=1000",
            "trainer.eval_every=0", f"hydra.run.dir={tmp_path / 'r'}"]
    p = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def rank1() -> int | None:  # the workers are spawned in rank order
            workers = [k for k in _children(p.pid) if b"spawn_main" in _cmdline(k)]
            return max(workers) if len(workers) == 2 else None

        _wait_for(lambda: rank1() is not None and (tmp_path / "r/results.json").exists())
        time.sleep(3)  # training
        os.kill(rank1() if target == "rank 1" else p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    res = json.loads((tmp_path / "r/results.json").read_text())
    assert p.returncode == 130, err[-2000:]
    why = "SIGTERM to another worker" if target == "rank 1" else "SIGTERM"  # the launcher forwards it to every rank
    assert res["status"] == "interrupted" and res["error"].startswith(f"{why} at step "), res["error"]
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    step = Trainer.load_checkpoint(tmp_path / "r/checkpoints/last.pt")["position"]["step"]
    assert f"at step {step}:" in res["error"] and step > 0
    if target != "rank 1":
        return  # continuing is the same either way
    r = mlrun(EXP, "hardware=ddp", *FAST, "trainer.max_steps=" + str(step + 3), f"resume={tmp_path / 'r'}",
              f"hydra.run.dir={tmp_path / 'c'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "c/results.json").read_text())["steps"] == step + 3


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the jobs through /proc")
def test_ctrl_c_on_a_joblib_sweep_stops_it_and_resume_auto_finishes_it(tmp_path):
    tiny = ["model.net.channels=4", "model.net.hidden=8", "dataset.batch_size=8", "trainer.max_steps=1500",
            "trainer.log_every=500", "trainer.eval_every=0", "trainer.limit_eval_batches=1"]
    sweep = ["-m", EXP, "seed=0,1,2", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *FAST, *tiny, "resume=auto"]
    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.Popen([str(exe), *sweep], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        def running() -> int:
            return sum(json.loads(f.read_text() or "{}").get("status") == "running"
                       for f in tmp_path.glob("multirun/*/*/*/results.json"))

        _wait_for(lambda: running() == 2, poll=0.05)  # most likely still being set up: they stop at their first step
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    (first,) = tmp_path.glob("multirun/*/*")
    runs = {f.parent.name: json.loads(f.read_text()) for f in first.glob("*/results.json")}
    assert sorted(runs) == ["000_run_s0", "001_run_s1"], runs  # the third seed never started
    assert all(r["status"] == "interrupted" for r in runs.values()), runs
    assert all((first / d / "checkpoints/last.pt").exists() for d in runs)
    assert "the sweep was stopped: 0 run(s) finished, 2 interrupted, 0 failed" in err
    # the same command again continues the two stopped runs and runs the third
    r = mlrun(*sweep, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (second,) = set(tmp_path.glob("multirun/*/*")) - {first}
    again = {f.parent.name: json.loads(f.read_text()) for f in second.glob("*/results.json")}
    assert all(r["status"] == "completed" and r["steps"] == 1500 for r in again.values()) and len(again) == 3
    assert {Path(r.get("resumed_from", "-")).name for r in again.values()} == {"000_run_s0", "001_run_s1", "-"}
    old = json.loads((first / "study.json").read_text())
    assert old["superseded_by"] == str(second)
    assert all(r.get("continued_by") for r in old["runs"])
