"""W&B the way its users use it, read back from offline runs' own `.wandb` files through wandb's protobuf records
(no mock, no network): groups, job types, tags, config, history, summary, the study run's tables and artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlrun import run
from mlrun.loggers import Loggers, claim_rows, log_study, offline_records, paper_values, run_group, run_tags
from mlrun.records import write_json
from mlrun.trainer import Trainer

FAST = ["trainer.progress=none", "hardware.threads=1", "logger=wandb"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging, never ~/.local
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # an earlier test's in-process run left its wandb-core service in os.environ: an `mlrun` subprocess would attach
    # to it (and its study run's .wandb file would not be written)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    return tmp_path


def _value(item) -> object:
    return json.loads(item.value_json)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(offline_dir: Path, wait_s: float = 30.0) -> dict:
    """One offline run as W&B would receive it: the run record, history rows, the merged summary, artifacts.

    W&B's service writes the file on its own schedule (a run of a few KiB lands whole when its stream closes,
    which can be just after `run.finish()` returns in-process), so wait for the exit record first."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        found = list(offline_dir.glob("*.wandb"))
        try:
            if len(found) == 1 and any(r.WhichOneof("record_type") == "exit" for r in offline_records(found[0])):
                break
        except Exception:  # noqa: BLE001 - a file still being written; read it again
            pass
        time.sleep(0.2)
    out = {"dir": offline_dir, "history": [], "summary": {}, "artifacts": [], "exit": None}
    found = list(offline_dir.glob("*.wandb"))
    if len(found) != 1:  # say what W&B left there, so a failure explains itself
        logs = "".join(f"\n--- {q.name}:\n" + q.read_text(errors="replace")[-3000:]
                       for q in sorted(offline_dir.rglob("debug*.log")))
        listing = sorted(str(q.relative_to(offline_dir)) for q in offline_dir.rglob("*"))
        raise AssertionError(f"{offline_dir}: {len(found)} .wandb files; contents {listing}{logs}")
    (f,) = found
    for rec in offline_records(f):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, group=r.run_group, job_type=r.job_type, tags=list(r.tags), name=r.display_name,
                       config={u.key: _value(u) for u in r.config.update if u.key != "_wandb"})
        elif kind == "history":
            out["history"].append({_key(i): _value(i) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({_key(u): _value(u) for u in rec.summary.update})
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                     "metadata": json.loads(a.metadata or "{}"),
                                     "files": {c.path: Path(c.local_path) for c in a.manifest.contents}})
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def table(run_: dict, key: str) -> list[dict]:
    """A logged wandb.Table, as rows of {column: value}, from the file its history record points to."""
    path = run_["summary"][f"{key}/path"]
    assert run_["summary"][f"{key}/_type"] == "table-file"
    t = json.loads((run_["dir"] / "files" / path).read_text())
    return [dict(zip(t["columns"], row, strict=True)) for row in t["data"]]


def alias(artifact: dict) -> str:
    """The alias mlrun gave a version (W&B adds `latest` to the newest)."""
    (name,) = [a for a in artifact["aliases"] if a != "latest"]
    return name


def offline_runs(root: Path) -> list[dict]:
    return [read_run(d) for d in sorted(root.rglob("offline-run-*"))]


def mlrun(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    said = p.stdout + p.stderr
    assert "W&B could not" not in said, said[-4000:]  # mlrun keeps going without W&B; these tests need it
    return p


# ------------------------------------------------------------------------------------------ a study


def test_a_two_seed_study_is_two_runs_and_one_study_run_in_one_group(offline):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    claims = ('study={claims:[{name:above zero,lhs:{run:arm,metric:test/acc},op:">",rhs:0},'
              '{name:perfect,lhs:{run:arm,metric:test/acc},op:">=",rhs:1.01}]}')
    study = ["-m", "experiment=digits_classifier", "seed=0,1", "trainer.max_steps=3", *FAST, "label=arm",
             "+paper.arxiv=1234.56789", "++paper.metrics={test/acc:0.99}", claims]
    p = mlrun(*study, cwd=offline, env=env)
    said = p.stdout + p.stderr
    assert said.count("W&B offline: ") == 2 and said.count("upload later with `mlrun sync`") == 2  # once per run
    (sweep,) = (offline / "multirun").glob("*/*")
    runs = offline_runs(sweep)
    arms = [r for r in runs if r["job_type"] == "arm"]
    (study_run,) = [r for r in runs if r["job_type"] == "study"]
    group = json.loads((sweep / "wandb_group.json").read_text())["group"]
    stamp = sweep.parent.name + "_" + sweep.name.removesuffix("_digits_classifier")
    assert group == f"digits_classifier_{stamp}"
    assert len(arms) == 2 and {r["group"] for r in runs} == {group}
    for r in runs:
        assert r["tags"][:3] == ["digits_classifier", "arxiv:1234.56789", "scale:cpu"]
        assert r["exit"] == 0
    for r in arms:
        assert r["config"]["experiment_name"] == "digits_classifier" and r["config"]["label"] == "arm"
        res = json.loads((Path(r["dir"]).parents[1] / "results.json").read_text())
        assert r["config"]["seed"] == res["seed"] and r["summary"]["test/acc"] == res["metrics"]["test/acc"]
        assert r["summary"]["paper/test/acc"] == 0.99 and r["summary"]["status"] == "completed"
        assert any("train/model_loss" in h for h in r["history"])

    # the study run: its claims as W&B receives them, the arms, the paper's value beside ours, study.json
    gathered = json.loads((sweep / "study.json").read_text())
    rows = [c for c in table(study_run, "claims") if c["scope"] == "study"]
    own = [(c["claim"], c["status"]) for c in table(study_run, "claims") if c["scope"] == "arm"]
    assert own == [(c["name"], c["status"]) for c in gathered["run_claims"]["arm"]]  # each run's own claims
    assert [(c["claim"], c["status"]) for c in rows] == [(c["name"], c["status"]) for c in gathered["claims"]]
    assert [c["status"] for c in rows] == ["held", "failed"]
    assert rows[0]["held_seeds"] == "2/2" and rows[0]["lhs_value"] == gathered["claims"][0]["lhs_value"]
    per_seed = [(c["seed"], c["lhs"]) for c in gathered["claims"][0]["per_seed"]]
    assert [(row["seed"], row["lhs"]) for row in table(study_run, "claims_per_seed")
            if row["scope"] == "study" and row["claim"] == "above zero"] == per_seed
    acc = [a for a in table(study_run, "arms") if a["metric"] == "test/acc"]
    assert acc == [{"label": "arm", "metric": "test/acc", "n": 2, "paper": 0.99,
                    **{k: gathered["groups"]["arm"]["test/acc"][k] for k in ("median", "mean", "std")}}]
    s = study_run["summary"]
    assert (s["claims/held"], s["claims/total"], s["runs/completed"], s["paper/test/acc"]) == (1, 2, 2, 0.99)
    (art,) = [a for a in study_run["artifacts"] if a["type"] == "study"]
    assert art["name"] == f"study-{group}"
    digest = hashlib.md5((sweep / "study.json").read_bytes()).digest()
    assert hashlib.md5(art["files"]["study.json"].read_bytes()).digest() == digest

    p = mlrun("sync", "--dry-run", cwd=offline, env=env)
    listed = [line for line in p.stdout.splitlines() if line.startswith("would sync")]
    assert len(listed) == 3 and all(f"group={group}" in line for line in listed)
    assert sum("job_type=study" in line for line in listed) == 1
    no_login = {**env, "HOME": str(offline), "NETRC": str(offline / "no-netrc")}
    no_login.pop("WANDB_API_KEY", None)
    p = subprocess.run([str(Path(sys.executable).with_name("mlrun")), "sync"], cwd=offline, env=no_login,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "3 finished offline W&B run(s) wait" in p.stderr and "wandb login" in p.stderr

    # a relaunch with resume=auto reuses the finished runs and logs its study run into the same group;
    # another design (more steps) is another study, another group
    mlrun(*study, "resume=auto", cwd=offline, env=env)
    mlrun(*[a.replace("max_steps=3", "max_steps=4") for a in study], "resume=auto", cwd=offline, env=env)
    sweeps = sorted((offline / "multirun").glob("*/*"))
    assert len(sweeps) == 3
    groups = [json.loads((d / "wandb_group.json").read_text()) for d in sweeps]
    assert groups[1]["group"] == group and groups[1]["adopted_from"] == str(sweep.resolve())
    assert groups[2]["group"] not in (group, None) and groups[2]["adopted_from"] is None
    (relaunch_study,) = offline_runs(sweeps[1])  # reused runs add no W&B run: theirs is in the group already
    assert relaunch_study["job_type"] == "study" and relaunch_study["group"] == group


def test_the_study_run_carries_its_figures_and_paired_claims(offline):
    from omegaconf import OmegaConf
    from PIL import Image

    sweep = offline / "sw"
    write_json(sweep / "wandb_group.json", {"group": "exp_2026-01-01_00-00-00_abcdef"})
    (sweep / "figures").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(sweep / "figures" / "curve.png")
    claim = {"name": "bn beats none", "status": "fragile", "op": ">=", "lhs": "bn", "rhs": "none", "median": 0.05,
             "threshold": 0.0, "held_count": 1, "n_seeds": 2, "per_seed": [
                 {"seed": 0, "lhs": 0.9, "rhs": 0.8, "value": 0.1, "held": True},
                 {"seed": 1, "lhs": 0.7, "rhs": 0.8, "value": -0.1, "held": False}]}
    own = {"name": "acc", "status": "held", "op": ">=", "lhs": "test/acc", "rhs": 0.5, "median": 0.8,
           "held_count": 2, "n_seeds": 2, "per_seed": [{"seed": 0, "lhs": 0.9, "rhs": 0.5, "value": 0.9, "held": True},
                                                       {"seed": 1, "lhs": 0.7, "rhs": 0.5, "value": 0.7, "held": True}]}
    study = {"experiment": "exp", "status": "completed", "paper": {"arxiv": "1502.03167", "metrics": {"gap": 0.2}},
             "derived": {"gap": 0.05}, "derived_per_seed": {"0": {"gap": 0.1}, "1": {"gap": -0.1}},
             "claims": [claim], "run_claims": {"bn": [own]}, "figures": ["figures/curve.png"],
             "groups": {"bn": {"test/acc": {"median": 0.8, "mean": 0.8, "std": 0.1, "n": 2}}},
             "runs": [{"label": "bn", "seed": s, "status": "completed"} for s in (0, 1)]}
    write_json(sweep / "study.json", study)
    cfg = OmegaConf.create({"experiment_name": "exp", "scale": "cpu", "logger": {
        "wandb": True, "project": "mlrun", "entity": None, "mode": None, "tags": [], "init_timeout": 60}})
    run_id = log_study(study, sweep, cfg)
    (r,) = offline_runs(sweep)
    assert r["id"] == run_id and (r["group"], r["job_type"]) == ("exp_2026-01-01_00-00-00_abcdef", "study")
    assert r["tags"] == ["exp", "arxiv:1502.03167", "scale:cpu"] and r["config"]["paper"] == study["paper"]
    s = r["summary"]
    assert (s["gap"], s["paper/gap"], s["claims/fragile"], s["claims/held"], s["runs/completed"]) == (
        0.05, 0.2, 1, 0, 2)
    assert s["figures/curve/_type"] == "image-file"
    assert [(c["scope"], c["held_seeds"], c["median"], c["status"]) for c in table(r, "claims")] == [
        ("study", "1/2", 0.05, "fragile"), ("bn", "2/2", 0.8, "held")]
    assert [(row["scope"], row["seed"], row["value"], row["held"]) for row in table(r, "claims_per_seed")] == [
        ("study", 0, 0.1, True), ("study", 1, -0.1, False), ("bn", 0, 0.9, True), ("bn", 1, 0.7, True)]
    assert table(r, "derived") == [{"metric": "gap", "all_seeds": 0.05, "s0": 0.1, "s1": -0.1}]
    (art,) = [a for a in r["artifacts"] if a["type"] == "study"]
    assert sorted(art["files"]) == ["figures/curve.png", "study.json"]
    assert art["files"]["study.json"].read_text() == (sweep / "study.json").read_text()


# ------------------------------------------------------------------------------------------ one run


def test_log_model_all_uploads_every_kept_checkpoint_with_the_final_results(offline):
    over = [*FAST, "trainer.max_steps=6", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.keep_last=2",
            "trainer.monitor=val/acc", "logger.log_model=all", "label=solo"]
    res = run("digits_classifier", over, run_dir=offline / "r")
    (r,) = offline_runs(offline / "r")
    assert r["group"] == "digits_classifier" and r["job_type"] == "solo"  # a single run: its experiment
    models = [a for a in r["artifacts"] if a["type"] == "model"]
    assert [alias(a) for a in models] == ["step-00000004", "step-00000006", "best", "last"]
    assert {a["name"] for a in models} == {f"model-{r['id']}"}
    on_disk = (offline / "r" / "results.json").read_text()
    for a in models:
        (ckpt,) = [k for k in a["files"] if k.startswith("checkpoints/")]
        assert a["files"][ckpt] == offline / "r" / ckpt  # referenced in place, uploaded by `mlrun sync`
        assert a["files"]["results.json"].read_text() == on_disk  # the final record, status completed
        assert "model:" in a["files"]["config.yaml"].read_text()
    best = next(a for a in models if alias(a) == "best")
    assert best["metadata"]["step"] == res["best"]["step"] and best["metadata"]["metrics"]["test/acc"] == pytest.approx(
        res["metrics"]["test/acc"])
    assert Trainer.load_checkpoint(offline / "r" / "checkpoints" / "last.pt")["wandb_id"] == r["id"]


def test_a_resumed_run_continues_the_same_wandb_run_in_its_group(offline, monkeypatch):
    sweep = offline / "sweep"
    write_json(sweep / "wandb_group.json", {"group": "exp_2026-01-01_00-00-00_abcdef"})
    original = Trainer._step

    def step(self, *args):
        out = original(self, *args)
        if self.global_step == 2:
            self._stop_signal = "SIGTERM"
        return out

    monkeypatch.setattr(Trainer, "_step", step)
    over = [*FAST, "trainer.max_steps=6", "label=arm", "logger.log_model=last"]
    with pytest.raises(Exception, match="SIGTERM"):
        run("digits_classifier", over, run_dir=sweep / "0_arm_s0")
    monkeypatch.setattr(Trainer, "_step", original)
    run("digits_classifier", [*over, f"resume={sweep / '0_arm_s0'}"], run_dir=offline / "elsewhere")
    (first,) = offline_runs(sweep / "0_arm_s0")
    (second,) = offline_runs(offline / "elsewhere")
    assert first["id"] == second["id"] and first["group"] == second["group"] == "exp_2026-01-01_00-00-00_abcdef"
    assert second["job_type"] == "arm" and first["exit"] != 0 and second["exit"] == 0
    assert not [a for a in first["artifacts"] if a["type"] == "model"]  # an interrupted run uploads no model
    assert [alias(a) for a in second["artifacts"] if a["type"] == "model"] == ["last"]


# ------------------------------------------------------------------------------------------ pieces


def test_a_resumed_runs_group_is_its_first_runs_wherever_it_is(tmp_path):
    write_json(tmp_path / "sw" / "wandb_group.json", {"group": "G"})
    first, second, single = tmp_path / "sw" / "0_a_s0", tmp_path / "b", tmp_path / "single"
    write_json(first / "results.json", {"run_dir": str(first)})
    write_json(second / "results.json", {"run_dir": str(second), "resumed_from": str(first)})
    write_json(single / "results.json", {"run_dir": str(single)})
    write_json(tmp_path / "download" / "results.json", {"run_dir": str(first)})  # an artifact's copy
    here = tmp_path / "new"
    assert run_group(first, "exp") == "G" and run_group(here, "exp") == "exp"
    assert run_group(here, "exp", second) == run_group(here, "exp", second / "checkpoints" / "last.pt") == "G"
    assert run_group(first, "exp", first) == "G"  # a requeued job continuing in its own dir
    assert run_group(here, "exp", single) == "exp"
    assert run_group(here, "exp", tmp_path / "download" / "checkpoints" / "best.pt") is None  # W&B keeps its own


def test_claims_table_reads_paired_records_and_falls_back_to_medians():
    paired = {"name": "bn beats none", "status": "fragile", "op": ">=", "lhs": "bn", "rhs": "none", "median": 0.02,
              "threshold": 0.0, "held_count": 1, "n_seeds": 2, "per_seed": [
                  {"seed": 0, "lhs": 0.9, "rhs": 0.8, "value": 0.1, "held": True},
                  {"seed": 1, "lhs": 0.7, "rhs": 0.8, "value": -0.1, "held": False}]}
    old = {"name": "acc", "status": "held", "op": ">=", "lhs": "test/acc", "rhs": "0.9", "lhs_value": 0.95,
           "rhs_value": 0.9}
    unknown = {"name": "missing", "status": "unknown", "op": ">", "lhs": "x", "rhs": "0", "reason": "no x"}
    cols, rows, seed_cols, seed_rows = claim_rows([paired, old, unknown])
    r = [dict(zip(cols, row, strict=True)) for row in rows]
    assert (r[0]["held_seeds"], r[0]["median"], r[0]["threshold"], r[0]["status"]) == ("1/2", 0.02, 0.0, "fragile")
    assert r[0]["per_seed"] == "s0: 0.9 >= 0.8 (held); s1: 0.7 >= 0.8 (failed)"
    assert (r[1]["lhs_value"], r[1]["rhs_value"], r[1]["held_seeds"], r[1]["per_seed"]) == (0.95, 0.9, "", "")
    assert r[2]["reason"] == "no x" and r[2]["median"] is None
    assert [dict(zip(seed_cols, s, strict=True))["value"] for s in seed_rows] == [0.1, -0.1]


def test_paper_values_and_tags():
    paper = {"arxiv": "1703.03400", "metrics": {"test/bpd": 3.49, "maml_acc": {"value": 0.987, "run": "maml",
                                                                              "metric": "test/acc"},
                                                "note": "qualitative"}}
    assert paper_values(paper, "maml") == {"paper/test/bpd": 3.49, "paper/test/acc": 0.987}
    assert paper_values(paper, "imaml") == {"paper/test/bpd": 3.49}
    assert paper_values(paper) == {"paper/test/bpd": 3.49, "paper/maml_acc": 0.987}  # the study: every value
    assert run_tags("maml_digits", paper, "cpu", ["mine", "maml_digits"]) == [
        "maml_digits", "arxiv:1703.03400", "scale:cpu", "mine"]


def test_a_log_model_typo_warns_and_uploads_nothing(tmp_path, caplog):
    from omegaconf import OmegaConf

    from mlrun.schema import LoggerConf

    cfg = OmegaConf.merge(OmegaConf.structured(LoggerConf), {"log_model": "bets"})
    assert Loggers(tmp_path, cfg, {}).log_model == "false"
    assert "logger.log_model=bets" in caplog.text
    off = OmegaConf.merge(OmegaConf.structured(LoggerConf), OmegaConf.from_dotlist(["log_model=false"]))
    assert Loggers(tmp_path, off, {}).log_model == "false"


def test_a_w_and_b_service_inherited_from_a_parent_process_is_not_used(offline):
    """A parent that ran wandb.init (a notebook, a test) leaves WANDB_SERVICE set; mlrun starts its own service."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SERVICE": "3-1-tcp-localhost-1"}  # nothing listens there
    mlrun("experiment=digits_classifier", "trainer.max_steps=2", *FAST, "logger.init_timeout=20",
          "hydra.run.dir=r", cwd=offline, env=env)
    (run_,) = offline_runs(offline / "r")
    assert run_["exit"] == 0 and run_["job_type"] == "run"
