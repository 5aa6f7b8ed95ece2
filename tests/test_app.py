"""Whole runs through the Python API and the CLI: records, resume, claims, studies, DDP, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlrun import compose, run
from mlrun.app import RunFailed
from mlrun.records import read_metrics
from mlrun.study import gather
from mlrun.trainer import Trainer

FAST = ["logger=none", "trainer.progress=none", "hardware.threads=1"]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return Trainer.load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def stop_after(monkeypatch, steps: int, signal_name: str):
    """Make the trainer see `signal_name` after `steps` optimizer steps, as its SIGINT/SIGTERM handler would."""
    original = Trainer._step

    def step(self, *args):
        out = original(self, *args)
        if self.global_step == steps - 1:  # global_step is incremented right after _step returns
            self._stop_signal = signal_name
        return out

    monkeypatch.setattr(Trainer, "_step", step)
    return original


def test_results_and_metrics_records(tmp_path):
    res = run("digits_classifier", [*FAST, "trainer.max_steps=30", "trainer.log_every=10"], run_dir=tmp_path / "r")
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["status"] == "completed" == res["status"]
    for key in ("metrics", "claims", "paper", "seed", "config_digest", "versions", "device", "wall_time_s", "steps"):
        assert key in on_disk, key
    assert on_disk["steps"] == 30
    assert on_disk["claims"][0]["status"] in ("held", "failed")
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/model_loss" in r] == [10, 20, 30]


def test_interrupted_then_resumed_equals_uninterrupted_bit_for_bit(tmp_path, monkeypatch):
    """N steps, stop (as SIGINT does), resume N more: parameters equal a 2N-step run exactly."""
    over = [*FAST, "trainer.max_steps=40", "model.net.dropout=0.3", "seed=3"]  # dropout: the RNG state matters
    run("digits_classifier", over, run_dir=tmp_path / "full")

    original = stop_after(monkeypatch, 20, "SIGINT")
    with pytest.raises(RunFailed) as e:
        run("digits_classifier", over, run_dir=tmp_path / "part")
    assert e.value.code == 130
    assert json.loads((tmp_path / "part" / "results.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(Trainer, "_step", original)

    res = run("digits_classifier", [*over, f"resume={tmp_path / 'part'}"], run_dir=tmp_path / "resumed")
    assert res["resumed_from"] == str(tmp_path / "part")
    a, b = params(tmp_path / "full"), params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_log = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "full/metrics.jsonl")]
    resumed_log = [{k: v for k, v in r.items() if k != "time"}
                   for r in read_metrics(tmp_path / "resumed/metrics.jsonl")]
    assert resumed_log == full_log  # line for line: the losses summed before the interrupt were in the checkpoint
    assert json.loads((tmp_path / "part" / "results.json").read_text())["resumed_by"] == str(tmp_path / "resumed")


def test_resume_auto_finds_the_unfinished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    over = [*FAST, "trainer.max_steps=10"]
    original = stop_after(monkeypatch, 5, "SIGTERM")
    with pytest.raises(RunFailed):
        run("digits_classifier", over, run_dir=tmp_path / "outputs" / "a")
    monkeypatch.setattr(Trainer, "_step", original)
    res = run("digits_classifier", [*over, "resume=auto"], run_dir=tmp_path / "outputs" / "b")
    assert res["resumed_from"] == str(tmp_path / "outputs" / "a")
    res = run("digits_classifier", [*over, "resume=auto"], run_dir=tmp_path / "outputs" / "c")
    assert res["reused_from"] == str((tmp_path / "outputs" / "b").resolve())  # b finished this config: reused


def test_checkpoint_from_another_model_is_refused_with_the_mismatch(tmp_path):
    run("digits_classifier", [*FAST, "trainer.max_steps=2"], run_dir=tmp_path / "a")
    with pytest.raises(RunFailed, match="does not fit this model: shape of net"):
        run("digits_classifier", [*FAST, "trainer.max_steps=4", "model.net.hidden=16", f"resume={tmp_path / 'a'}"],
            run_dir=tmp_path / "b")


def test_claims_from_config_are_evaluated(tmp_path):
    res = run("digits_classifier", [*FAST, "trainer.max_steps=1"], run_dir=tmp_path / "r")
    claim = res["claims"][0]
    assert claim["status"] == "failed" and claim["lhs_value"] < 0.95  # one step cannot reach 95%


def test_study_gathers_runs_by_label_and_checks_claims(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (label, steps) in enumerate([("short", 1), ("long", 150)]):
        for seed in (0, 1):
            run("digits_classifier", [*FAST, f"trainer.max_steps={steps}", f"label={label}", f"seed={seed}"],
                run_dir=sweep / f"{i}{seed}_{label}")
    study_cfg = {"claims": [
        {"name": "training helps", "lhs": {"run": "long", "metric": "test/acc"}, "op": ">",
         "rhs": {"run": "short", "metric": "test/acc"}, "offset": 0.3},
        {"name": "impossible", "lhs": {"run": "long", "metric": "test/acc"}, "op": ">", "rhs": 1.0},
        {"name": "missing", "lhs": {"run": "nope", "metric": "test/acc"}, "op": ">", "rhs": 0},
    ]}
    study = gather(sweep, study_cfg, "digits_classifier")
    assert study["groups"]["long"]["test/acc"]["n"] == 2 and study["seeds"] == [0, 1]
    assert [c["status"] for c in study["claims"]] == ["held", "failed", "unknown"]
    held = study["claims"][0]
    assert held["held_count"] == 2 and [p["seed"] for p in held["per_seed"]] == [0, 1]
    for p in held["per_seed"]:  # each seed's long run against the same seed's short run
        long_ = [r for r in study["runs"] if r["label"] == "long" and r["seed"] == p["seed"]][0]
        short = [r for r in study["runs"] if r["label"] == "short" and r["seed"] == p["seed"]][0]
        assert p["lhs"] == long_["metrics"]["test/acc"] and p["rhs"] == short["metrics"]["test/acc"] + 0.3
    # each label's own run claim (test/acc >= 0.95), aggregated over its seeds
    assert study["run_claims"]["short"][0]["status"] == "failed" and study["run_claims"]["long"][0]["n_seeds"] == 2
    assert json.loads((sweep / "study.json").read_text())["status"] == "completed"


def test_compose_applies_overrides_and_types():
    cfg = compose("digits_classifier", ["trainer.max_steps=7", "hardware=ddp"])
    assert cfg.trainer.max_steps == 7 and cfg.hardware.nproc_per_node == 2
    with pytest.raises(Exception, match="max_step"):
        compose("digits_classifier", ["trainer.max_step=7"])


def test_integer_arithmetic_resolvers_between_config_keys():
    cfg = compose("digits_classifier", ["dataset.batch_size='${mlrun_mul:8,${trainer.log_every}}'",
                                        "trainer.eval_every='${mlrun_floordiv:1077,${dataset.batch_size}}'",
                                        "trainer.log_every=4"])
    assert cfg.dataset.batch_size == 32 and cfg.trainer.eval_every == 33


def test_pick_resolver_chooses_a_value_by_another_key():
    pick = "trainer.monitor='${mlrun_pick:${label},{a:val/acc,b:val/loss}}'"
    assert compose("digits_classifier", [pick, "label=b"]).trainer.monitor == "val/loss"
    assert compose("digits_classifier", [pick, "label=c"]).trainer.monitor is None


# ------------------------------------------------------------------------------------------ the CLI


def mlrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    exe = Path(sys.executable).with_name("mlrun")
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, says", [
    ("trainer.max_step=3", "trainer.max_step=3: Key 'max_step' not in 'TrainerConf'; did you mean trainer.max_steps?"),
    ("trainer.max_steps=abc", "trainer.max_steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("experiment=digits_clasifier", "experiment=digits_clasifier: no such experiment; did you mean "
                                    "experiment=digits_classifier?"),
    ("hardware=tpu", "hardware=tpu: no such hardware; did you mean hardware=gpu?"),
    ("hardware=quantum", "hardware=quantum: no such hardware; one of: auto, cpu, ddp, gpu"),
    ("model.net.chanels=3", "model.net.chanels=3: Key 'chanels' is not in model.net; did you mean model.net.channels?"),
])
def test_bad_overrides_exit_nonzero_with_one_clear_message(override, says, tmp_path):
    args = [override] if override.startswith("experiment=") else ["experiment=digits_classifier", override]
    p = mlrun(*args, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1
    assert out.strip() == f"mlrun: error: {says}"  # one line, without Hydra's "+key" hint that leads into a crash
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("results.json"))


def test_no_experiment_lists_them(tmp_path):
    p = mlrun("logger=none", cwd=tmp_path)
    assert p.returncode == 1 and "choose an experiment" in p.stderr and "digits_classifier" in p.stderr


def test_help_lists_groups_without_torch(tmp_path):
    p = mlrun("--help", cwd=tmp_path)
    assert p.returncode == 0 and "experiment: " in p.stdout and "hardware: auto, cpu, ddp, gpu" in p.stdout
    code = "import sys, mlrun.cli; mlrun.cli.print_help(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True).returncode == 0


def test_gpu_without_cuda_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = mlrun("experiment=digits_classifier", "hardware=gpu", "logger=none", cwd=tmp_path)
    assert p.returncode == 1
    assert "hardware asks for CUDA but this machine has none" in p.stderr and "Traceback" not in p.stderr


def test_multirun_writes_two_run_dirs_and_a_study(tmp_path):
    p = mlrun("-m", "experiment=digits_classifier", "seed=0,1", "trainer.max_steps=3", "logger=none",
              "trainer.progress=none", f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    study = json.loads((tmp_path / "sw" / "study.json").read_text())
    assert len(study["runs"]) == 2 and study["status"] == "completed"
    # the sweep's own elapsed time covers both runs (sequential launcher), each run's time is its own
    assert study["elapsed_s"] >= sum(r["wall_time_s"] for r in study["runs"]) - 0.2
    assert study["wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in study["runs"]), abs=0.2)


# ------------------------------------------------------------------------------------------ DDP


def test_ddp_two_gloo_workers_match_one_process_on_the_global_batch(tmp_path):
    """2 ranks x batch 32 == 1 process x batch 64 (same samples per step); replicas stay identical."""
    common = [*FAST, "trainer.max_steps=15", "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.1"]
    ddp = run("digits_classifier", [*common, "hardware=ddp", "dataset.batch_size=32"], run_dir=tmp_path / "ddp")
    run("digits_classifier", [*common, "dataset.batch_size=64"], run_dir=tmp_path / "one")
    assert ddp["world_size"] == 2 and ddp["ddp_replicas_identical"] is True
    a, b = params(tmp_path / "ddp"), params(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la = [r["train/model_loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "train/model_loss" in r]
    lb = [r["train/model_loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "train/model_loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)  # the logged loss is the global batch's mean


def test_study_statistics_skip_non_finite_values():
    from mlrun.study import group

    runs = [{"label": "a", "status": "completed", "metrics": {"m": v}} for v in (1.0, "inf", "nan", 3.0)]
    assert group(runs) == {"a": {"m": [1.0, 3.0]}}


@pytest.mark.parametrize("name, extra", [
    ("infogan_digits", ["model.eval_samples=32", "model.traversal_steps=3"]),  # two optimizers (GAN)
    ("protonet_digits", ["dataset.test_episodes=4", "dataset.val_episodes=2", "model.embedding.hidden=8",
                         "dataset.train_way=5", "dataset.q_queries=2"]),  # episodic: episodes split across ranks
])
def test_other_loop_shapes_run_under_ddp_with_identical_replicas(name, extra, tmp_path):
    res = run(name, [*FAST, "hardware=ddp", "trainer.step_limit=4", "trainer.eval_every=0", "trainer.log_every=2",
                     "trainer.limit_eval_batches=2", *extra], run_dir=tmp_path / "r")
    assert res["status"] == "completed" and res["world_size"] == 2 and res["ddp_replicas_identical"] is True


def test_reproduce_runs_each_experiment_then_rewrites_the_readme_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\n<!-- results:start -->\nstale table\n<!-- results:end -->\n\nafter\n")
    r = mlrun("reproduce", "digits_classifier", "--root", "runs", "--readme", "README.md",
              "--extra", "logger=none", "trainer.max_steps=5", "trainer.eval_every=0", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (root,) = (tmp_path / "runs").iterdir()
    walls = json.loads((root / "wall_times.json").read_text())
    assert list(walls["seconds"]) == ["digits_classifier"] and walls["failed"] == []
    assert json.loads((root / "digits_classifier" / "results.json").read_text())["steps"] == 5
    body = readme.read_text()
    assert "stale table" not in body and body.endswith("after\n")
    assert "Regenerated by `mlrun reproduce digits_classifier --root runs --readme README.md" in body
    assert "| digits_classifier |" in body
    # --into reruns only the named experiment in that folder, keeps the old one aside, rebuilds the report
    r = mlrun("reproduce", "digits_classifier", "--into", str(root), "--readme", "README.md",
              "--extra", "logger=none", "trainer.max_steps=7", "trainer.eval_every=0", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((root / "digits_classifier" / "results.json").read_text())["steps"] == 7
    (aside,) = (tmp_path / "runs" / f"{root.name}-replaced").iterdir()
    assert json.loads((aside / "results.json").read_text())["steps"] == 5
    assert "--into" in readme.read_text() and list(json.loads((root / "wall_times.json").read_text())["seconds"]) \
        == ["digits_classifier"]
    # a failing experiment is reported as failed (exit 1), never dropped
    r = mlrun("reproduce", "digits_classifier", "--root", "bad", "--extra", "logger=none", "trainer.max_steps=abc",
              cwd=tmp_path)
    root = next((tmp_path / "bad").iterdir())
    assert r.returncode == 1 and "(failed)" in (root / "REPORT.md").read_text()
    assert json.loads((root / "wall_times.json").read_text())["failed"] == ["digits_classifier"]


def test_study_derives_metrics_per_seed_for_paired_claims(tmp_path, monkeypatch):
    """`summarize` runs once over all seeds and once per seed; a claim on a derived metric is paired by seed."""
    import types

    from mlrun.records import write_json

    def gap(study):  # best label minus worst, from whatever runs it is given
        med = {label: m["test/acc"]["median"] for label, m in study["groups"].items()}
        return {"gap": med["a"] - med["b"]} if {"a", "b"} <= set(med) else {}

    monkeypatch.setitem(sys.modules, "_mlrun_test_summaries", types.SimpleNamespace(gap=gap))
    for seed, (a, b) in enumerate([(0.9, 0.5), (0.8, 0.75), (0.95, 0.6)]):
        for label, acc in (("a", a), ("b", b)):
            write_json(tmp_path / f"{label}{seed}" / "results.json", {
                "label": label, "seed": seed, "status": "completed", "metrics": {"test/acc": acc}})
    claim = {"name": "gap at least 0.1", "lhs": "gap", "op": ">=", "rhs": 0.1}
    study = gather(tmp_path, {"summarize": {"_target_": "_mlrun_test_summaries.gap", "_partial_": True},
                              "claims": [claim]}, "x")
    assert study["derived"]["gap"] == pytest.approx(0.9 - 0.6)  # medians over all seeds
    assert {s: round(d["gap"], 6) for s, d in study["derived_per_seed"].items()} == {"0": 0.4, "1": 0.05, "2": 0.35}
    (c,) = study["claims"]
    assert c["held_count"] == 2 and c["n_seeds"] == 3 and c["status"] == "fragile"  # 2/3 < 80%


def test_fresh_seeds_replace_a_studys_seeds_from_the_command_line(tmp_path):
    """`'hydra.sweeper.params.seed=5,6'` confirms a study on fresh seeds without editing its file."""
    p = mlrun("-m", "experiment=batchnorm_digits", "hydra.sweeper.params.seed=5,6", "debug=fast",
              "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    study = json.loads((tmp_path / "sw" / "study.json").read_text())
    assert study["seeds"] == [5, 6] and sorted({r["seed"] for r in study["runs"]}) == [5, 6]


def test_tab_completion_offers_verbs_and_hides_the_experiment_files_keys(tmp_path):
    def complete(line: str) -> list[str]:
        exe = Path(sys.executable).with_name("mlrun")
        env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
        p = subprocess.run([str(exe), "-sc", "query=bash"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    first = complete("mlrun ")
    assert {"ls", "report", "validate", "reproduce", "sync", "experiment=", "trainer."} <= set(first)
    assert not {w for w in first if w.startswith(("claims.", "paper.", "smoke=", "part_of="))}
    assert complete("mlrun re") == ["report", "reproduce", "resume="]
    assert "trainer.max_steps=" in complete("mlrun experiment=digits_classifier trainer.ma")


def test_paper_scale_on_a_cpu_warns_and_announces_its_duration(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from mlrun.datasets.vision import write_mnist_fixture

    write_mnist_fixture(tmp_path / "data")
    p = mlrun("experiment=batchnorm_mnist", "hardware=auto", f"dataset.root={tmp_path / 'data'}", "logger=none",
              "trainer.progress=none", "trainer.max_steps=25", "trainer.eval_every=0", "dataset.val_size=10",
              "dataset.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert "paper-scale experiment and this machine has no CUDA device: running on the CPU" in out
    # an empty validation split is absent, not empty (it divided by zero)
    from mlrun.datasets.vision import MNIST

    data = MNIST(str(tmp_path / "data"), val_size=0)
    with pytest.raises(KeyError):
        data.dataset("val")
    assert len(data.dataset("train")) == 60
    assert "stage 'train': about" in out and "(5 steps at" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["device"].startswith("cpu")


@pytest.mark.parametrize("experiment", ["meta_digits", "rcnn_digits", "butd_vqa_digits"])
def test_seeds_of_one_condition_share_the_digest_without_seed(experiment):
    """Datasets that interpolate `${seed}` must not make each seed its own condition: `mlrun report` groups the
    seeds of a condition by this digest (before the fix each seed had its own, and the report kept n=1)."""
    from mlrun.app import _digest

    s0, s1 = compose(experiment, ["seed=0"]), compose(experiment, ["seed=1"])
    assert s0.dataset.seed == 0 and s1.dataset.seed == 1  # the dataset does follow the seed
    assert _digest(s0, seed=False) == _digest(s1, seed=False)
    assert _digest(s0) != _digest(s1)
    changed = compose(experiment, ["seed=1", "trainer.log_every=7"])
    assert _digest(changed, seed=False) != _digest(s1, seed=False)
    assert s1.seed == 1 and s1.dataset.seed == 1  # the run's own config is left as it was, interpolations too
