"""`mlrun report` counts each (experiment, condition, config, seed) once, shows a study's per-seed values, and stays
legible at 80 columns."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from mlrun.records import write_json
from mlrun.report import find_records, print_rich, report_main, rows

PAPER = {"table": "Table 1 (a very long description of the paper's table that would not fit one narrow line at all)",
         "metrics": {"test/acc": 0.9}}


def fake_run(d: Path, seed: int, acc: float, *, exp: str = "exp", label: str = "run", digest: str = "cfgA",
             when: str = "2026-11-29T10:00:00", **extra) -> Path:
    write_json(d / "results.json", {
        "experiment": exp, "label": label, "seed": seed, "status": "completed", "metrics": {"test/acc": acc},
        "paper": PAPER, "config_digest_noseed": digest, "finished_at": when, "wall_time_s": 1.0,
        "claims": [{"name": "acc >= 0.5", "lhs": "test/acc", "op": ">=", "rhs": "0.5", "lhs_value": acc,
                    "rhs_value": 0.5, "status": "held" if acc >= 0.5 else "failed"}], **extra})
    return d


def row_of(results: list[dict], exp: str = "exp", run: str = "run", metric: str = "test/acc") -> dict:
    (row,) = [r for r in results if (r["experiment"], r["run"], r["metric"]) == (exp, run, metric)]
    return row


def test_each_config_and_seed_counts_once(tmp_path):
    for s in range(3):  # three seeds of the current config
        fake_run(tmp_path / f"a{s}", s, 0.8 + s / 10, when=f"2026-11-29T10:0{s}:00")
    originals = {s: tmp_path / f"a{s}" for s in range(3)}
    fake_run(tmp_path / "copy0", 0, 0.8, when="2026-11-29T11:00:00", reused_from=str(originals[0]))  # resume=auto copy
    fake_run(tmp_path / "eval", 1, 0.2, when="2026-11-29T11:00:00", eval_only=True)
    fake_run(tmp_path / "dbg", 2, 0.1, when="2026-11-29T11:00:00", debug={"preset": "fast"})
    fake_run(tmp_path / "old0", 0, 0.3, digest="cfgOLD", when="2026-11-28T10:00:00")  # an older max_steps
    fake_run(tmp_path / "old1", 1, 0.3, digest="cfgOLD", when="2026-11-28T10:00:00")
    fake_run(tmp_path / "resumed", 1, 0.1, when="2026-11-29T09:00:00", resumed_by=str(tmp_path / "x"))
    runs, studies, warnings = find_records([tmp_path])
    assert not warnings
    results, claims, excluded = rows(runs, studies)
    row = row_of(results)
    assert row["n"] == 3 and row["values"] == [0.8, 0.9, 1.0] and row["ours"] == "0.9 ± 0.1 (n=3)"
    assert row["paper"] == "0.9" and row["diff"] == "+0"
    reasons = sorted(e["reason"] for e in excluded)
    assert reasons == ["debug preset", "eval-only", "resume=auto copy of a run counted on its own",
                       "superseded by the run that resumed it", "superseded config (cfgOLD)",
                       "superseded config (cfgOLD)"]
    (claim,) = claims
    assert claim["status"] == "held 3/3" and claim["seeds"] == "0-2"


def test_a_copy_counts_when_its_original_is_not_among_the_records(tmp_path):
    fake_run(tmp_path / "copy0", 0, 0.8, reused_from="/elsewhere/run0")
    fake_run(tmp_path / "new1", 1, 0.9)
    results, _, excluded = rows(*find_records([tmp_path])[:2])
    assert row_of(results)["n"] == 2 and not excluded


def test_same_seed_twice_counts_the_newest(tmp_path):
    fake_run(tmp_path / "first", 0, 0.5, when="2026-11-29T10:00:00")
    fake_run(tmp_path / "again", 0, 0.7, when="2026-11-29T12:00:00")
    results, _, excluded = rows(*find_records([tmp_path])[:2])
    assert row_of(results)["values"] == [0.7] and [e["reason"] for e in excluded] == ["another run of seed 0"]


def test_failures_are_listed_unless_a_later_run_replaced_them(tmp_path):
    fake_run(tmp_path / "ok", 0, 0.9)
    fake_run(tmp_path / "bad1", 1, 0.0, status="failed", error="boom")
    fake_run(tmp_path / "bad0", 0, 0.0, status="interrupted")
    _, _, excluded = rows(*find_records([tmp_path])[:2])
    listed = {(e["seed"], e["reason"]) for e in excluded if e["listed"]}
    assert listed == {(1, "failed")}


def study(d: Path, seeds: list[int], claims: list[dict], derived_per_seed: dict | None = None) -> None:
    write_json(d / "study.json", {"experiment": "exp", "paper": PAPER, "seeds": seeds, "runs": [], "claims": claims,
                                  "derived": {}, "derived_per_seed": derived_per_seed or {}, "figures": []})


def test_study_values_and_claims_per_seed_and_a_relaunch_counted_once(tmp_path):
    # a sweep killed after seed 1, then relaunched with resume=auto into a new dir: copies of 0 and 1, a new 2
    first, second = tmp_path / "sweep1", tmp_path / "sweep2"
    for s in (0, 1):
        fake_run(first / f"{s}_run_s{s}", s, 0.8 + s / 10, label="arm")
    study(first, [0, 1], [])
    for s in (0, 1):
        fake_run(second / f"{s}_arm_s{s}", s, 0.8 + s / 10, label="arm", reused_from=str(first / f"{s}_run_s{s}"))
    fake_run(second / "2_arm_s2", 2, 1.0, label="arm")
    claim = {"name": "gain at least 1", "op": ">=", "lhs": "gain", "rhs": "1.0", "status": "held", "held_count": 3,
             "n_seeds": 3, "median": 2.0, "threshold": 1.0, "kind": "value",
             "per_seed": [{"seed": s, "lhs": g, "rhs": 1.0, "value": g, "held": True} for s, g in enumerate([2, 2, 3])]}
    study(second, [0, 1, 2], [claim], {"0": {"gain": 2.0}, "1": {"gain": 2.0}, "2": {"gain": 3.0}})
    # a confirmation on fresh seeds is its own claim row, and its runs add to the same condition
    fake_run(tmp_path / "fresh" / "0_arm_s5", 5, 0.95, label="arm")
    study(tmp_path / "fresh", [5], [dict(claim, per_seed=claim["per_seed"][:1], held_count=1, n_seeds=1)],
          {"5": {"gain": 1.5}})
    results, claims, _ = rows(*find_records([tmp_path])[:2])
    assert row_of(results, run="arm")["n"] == 4  # seeds 0, 1, 2, 5: each once
    gain = row_of(results, run="study", metric="gain")
    assert gain["n"] == 4 and gain["values"] == [2.0, 2.0, 3.0, 1.5]
    study_claims = [c for c in claims if c["claim"] == "gain at least 1"]
    assert [(c["seeds"], c["status"]) for c in study_claims] == [("0-2", "held 3/3"), ("5", "held 1/1")]
    run_claim = [c for c in claims if c["claim"].startswith("acc >= 0.5")]
    assert [c["status"] for c in run_claim] == ["held 4/4"]


def test_a_paper_metric_without_a_run_is_found_in_the_labels(tmp_path):
    for label, acc in (("affine", 0.8), ("additive", 0.7)):
        fake_run(tmp_path / label, 0, acc, label=label)
    study(tmp_path, [0], [])
    results, _, _ = rows(*find_records([tmp_path])[:2])
    assert row_of(results, run="affine")["values"] == [0.8] and row_of(results, run="additive")["values"] == [0.7]


def test_terminal_report_is_legible_at_80_columns(tmp_path):
    from rich.console import Console

    for s in range(5):
        fake_run(tmp_path / f"r{s}", s, 0.81234 + s / 100, exp="groupnorm_digits_groups_long_name",
                 label="gn_b2_groups32_extra")
    results, claims, excluded = rows(*find_records([tmp_path])[:2])
    console = Console(width=80, file=io.StringIO(), record=True, color_system=None)
    print_rich(results, claims, excluded, console=console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for word in ("run", "metric", "ours", "paper", "diff", "gn_b2_groups32_extra", "test/acc", "0.8323 ± 0.016",
                 "(n=5)", "held 5/5", "acc >= 0.5"):
        assert word in text, word
    assert "…" not in text.replace("Table 1 (a very long", "")  # nothing cut to an ellipsis


def test_report_cli_json_detail_and_all(tmp_path, capsys):
    fake_run(tmp_path / "r0", 0, 0.8)
    fake_run(tmp_path / "d", 0, 0.1, debug={"preset": "fast"})
    assert report_main([str(tmp_path), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spread"] == "mean ± std over n seeds" and out["claims"][0]["per_seed"][0]["seed"] == 0
    assert out["not_counted"][0]["reason"] == "debug preset"
    assert report_main([str(tmp_path), "--detail", "--all"]) == 0
    text = capsys.readouterr().out
    assert "seed 0: lhs 0.8" in text and "debug preset" in text


def test_report_cli_piped_at_80_columns_has_every_column(tmp_path):
    for s in range(3):
        fake_run(tmp_path / f"r{s}", s, 0.9)
    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), "report", str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert "0.9 ± 0 (n=3)" in p.stdout and "held 3/3" in p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) <= 80


def test_ls_is_legible_at_80_columns(tmp_path):
    from mlrun.cli import experiments

    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), "ls"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in p.stdout
    for name in experiments():  # every name whole, on a line of its own with its scale
        assert any(line.split()[:2] in ([name, "cpu"], [name, "paper"]) for line in lines if line.strip()), name


def test_an_eval_only_run_of_a_checkpoint_does_not_supersede_the_run_it_read(tmp_path):
    eval_dir = tmp_path / "eval0"
    fake_run(tmp_path / "a0", 0, 0.8, resumed_by=str(eval_dir))  # `eval_only=true resume=a0` marks a0 as resumed
    fake_run(tmp_path / "a1", 1, 0.9)
    fake_run(eval_dir, 0, 0.8, when="2026-11-29T11:00:00", eval_only=True, resumed_from=str(tmp_path / "a0"))
    results, _, excluded = rows(*find_records([tmp_path])[:2])
    assert row_of(results)["n"] == 2 and [e["reason"] for e in excluded] == ["eval-only"]
    fake_run(tmp_path / "b0", 0, 0.85, when="2026-11-29T12:00:00", resumed_from=str(tmp_path / "a0"))
    fake_run(tmp_path / "a0", 0, 0.8, resumed_by=str(tmp_path / "b0"))  # a run that trained on does replace it
    results, _, excluded = rows(*find_records([tmp_path])[:2])
    assert row_of(results)["values"] == [0.85, 0.9]
    assert sorted(e["reason"] for e in excluded) == ["eval-only", "superseded by the run that resumed it"]
