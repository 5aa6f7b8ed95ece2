"""What users of experiment runners expect, on the shared trainer: eval-only, best checkpoints, early stopping,
retention, debug presets, loggers, the Python API, `validate`, `report` and `ls`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from mlrun import compose, run
from mlrun.records import read_metrics, write_json
from mlrun.report import find_records, report_main, rows
from mlrun.trainer import Trainer
from mlrun.validate import check_target, validate

FAST = ["logger=none", "trainer.progress=none", "hardware.threads=1"]


def test_eval_only_scores_a_checkpoint_without_training(tmp_path):
    trained = run("digits_classifier", [*FAST, "trainer.max_steps=60"], run_dir=tmp_path / "train")
    ev = run("digits_classifier", [*FAST, "eval_only=true", f"resume={tmp_path / 'train'}"], run_dir=tmp_path / "ev")
    assert ev["metrics"]["test/acc"] == trained["metrics"]["test/acc"]
    assert ev["steps"] == 0 and ev["evaluated_step"] == 60  # trained nothing, scored the step-60 checkpoint
    assert not (tmp_path / "ev" / "checkpoints").exists()  # nothing trained, nothing saved


def test_monitor_keeps_best_and_tests_it_and_retention_keeps_k(tmp_path):
    over = ["trainer.max_steps=60", "trainer.eval_every=10", "trainer.checkpoint_every=10", "trainer.monitor=val/acc",
            "trainer.mode=max", "trainer.keep_last=2"]
    res = run("digits_classifier", [*FAST, *over], run_dir=tmp_path / "r")
    ck = tmp_path / "r" / "checkpoints"
    assert (ck / "best.pt").exists() and (ck / "last.pt").exists()
    assert sorted(p.name for p in ck.glob("step-*.pt")) == ["step-00000050.pt", "step-00000060.pt"]
    vals = [r["val/acc"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "val/acc" in r]
    assert res["best"]["value"] == max(vals)
    best = Trainer.load_checkpoint(ck / "best.pt")
    assert best["position"]["global_step"] == res["best"]["step"]


def test_early_stopping_with_patience(tmp_path):
    # lr=0: nothing improves after the first evaluation, so patience 2 stops at the third
    res = run("digits_classifier", [*FAST, "trainer.max_steps=100", "trainer.eval_every=5", "model.optimizer.lr=0",
                                    "trainer.monitor=val/loss", "trainer.mode=min", "trainer.patience=2"],
              run_dir=tmp_path / "r")
    assert res["steps"] == 15


def test_debug_fast_goes_to_its_own_folder_and_caps_steps():
    cfg = compose("digits_classifier", ["debug=fast"])
    assert cfg.trainer.step_limit == 5 and cfg.logger.wandb is False
    raw = (Path(__file__).parents[1] / "conf" / "debug" / "fast.yaml").read_text()
    assert "outputs/debug/" in raw


def test_debug_overfit_drives_the_loss_down(tmp_path):
    res = run("digits_classifier", [*FAST, "debug=overfit", "trainer.max_steps=150", "trainer.log_every=10"],
              run_dir=tmp_path / "r")
    losses = [r["train/model_loss"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "train/model_loss" in r]
    assert losses[-1] < 0.05 and res["status"] == "completed"


def test_profile_writes_a_trace_and_top_ops(tmp_path):
    run("digits_classifier", [*FAST, "debug=profile", "trainer.profile_steps=2"], run_dir=tmp_path / "r")
    assert (tmp_path / "r" / "profile" / "trace.json").stat().st_size > 0
    assert "Self CPU" in (tmp_path / "r" / "profile" / "top_ops.txt").read_text()


def test_csv_and_tensorboard_loggers_at_once(tmp_path):
    run("digits_classifier", ["trainer.progress=none", "hardware.threads=1", "logger=[csv,tensorboard]",
                              "trainer.max_steps=4", "trainer.log_every=2"], run_dir=tmp_path / "r")
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows_ = list(csv.DictReader(f))
    assert [r["step"] for r in rows_ if r["train/model_loss"]] == ["2", "4"]
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_offline_run_is_created_and_its_id_kept_in_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run("digits_classifier", ["trainer.progress=none", "hardware.threads=1", "trainer.max_steps=2"],
        run_dir=tmp_path / "r")
    state = Trainer.load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert state["wandb_id"]
    assert list((tmp_path / "r" / "wandb").glob(f"offline-run-*-{state['wandb_id']}"))


# ------------------------------------------------------------------------------------------ validate


def test_validate_names_the_key_and_the_signature():
    msg = check_target("model.net", {"_target_": "mlrun.models.classifier.SmallCNN", "chanels": 8})
    assert "model.net" in msg and "'chanels'" in msg and "channels" in msg
    assert "cannot import" in check_target("dataset", {"_target_": "mlrun.datasets.nope.Nope"})
    assert check_target("model.net", {"_target_": "mlrun.models.classifier.SmallCNN", "channels": 8}) is None


def test_validate_passes_on_the_first_experiment():
    assert validate(["digits_classifier"], ["cpu", "gpu", "ddp"]) == []


def test_reproduce_runs_every_cpu_study_once_and_no_paper_scale_experiment():
    from mlrun.reproduce import default_experiments

    names = default_experiments()
    assert "meta_digits" in names and "maml_digits" not in names and "imaml_digits" not in names
    assert "butd_caption_digits" in names and not any(n.endswith(("_cifar", "_imagenet", "_voc2007")) for n in names)


# ------------------------------------------------------------------------------------------ report and ls


def _fake_run(d: Path, exp: str, label: str, seed: int, acc: float, status: str = "completed") -> None:
    write_json(d / "results.json", {
        "experiment": exp, "label": label, "seed": seed, "status": status, "metrics": {"test/acc": acc},
        "paper": {"table": "Table 1", "metrics": {"test/acc": 0.9}},
        "claims": [{"name": "acc >= 0.5", "lhs": "test/acc", "op": ">=", "rhs": "0.5", "lhs_value": acc,
                    "rhs_value": 0.5, "status": "held" if acc >= 0.5 else "failed"}],
        "wall_time_s": 1.0, **({"error": "boom"} if status != "completed" else {}),
    })


def test_report_groups_seeds_sets_paper_values_and_lists_failures(tmp_path, capsys):
    for s, acc in enumerate([0.8, 0.9, 1.0]):
        _fake_run(tmp_path / f"r{s}", "exp_a", "run", s, acc)
    _fake_run(tmp_path / "bad", "exp_a", "run", 3, 0.0, status="failed")
    runs, studies, _ = find_records([tmp_path])
    results, claims, excluded = rows(runs, studies)
    (ok,) = results
    assert ok["ours"] == "0.9 ± 0.1 (n=3)" and ok["paper"] == "0.9" and ok["diff"] == "+0" and ok["source"] == "Table 1"
    assert [(e["reason"], e["error"], e["listed"]) for e in excluded] == [("failed", "boom", True)]
    assert [(c["claim"], c["status"], c["measured"]) for c in claims] == [
        ("acc >= 0.5", "held 3/3", "median 0.9 >= 0.5 (seeds: 0.8, 0.9, 1)")]
    assert report_main([str(tmp_path), "--format", "markdown", "--out", str(tmp_path / "REPORT.md")]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "| exp_a | run | test/acc | 0.9 ± 0.1 (n=3) | 0.9 |" in text


def test_report_is_fast_and_torch_free_for_a_hundred_runs(tmp_path):
    for i in range(100):
        _fake_run(tmp_path / f"r{i}", f"exp_{i % 10}", "run", i, 0.5 + i / 1000)
    code = ("import sys, time; t=time.perf_counter(); from mlrun.report import report_main; "
            f"report_main([{str(tmp_path)!r}, '--format', 'json']); "
            "assert 'torch' not in sys.modules; print('SECONDS', time.perf_counter()-t, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["results"]) == 10


def test_ls_lists_every_experiment(tmp_path):
    from mlrun.cli import experiments

    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), "ls", "--plain"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.split() == experiments()
