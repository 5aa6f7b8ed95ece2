"""`mlrun report` under hostile records (issue 26, items 1-3): crafted results.json and study.json files can make
it write nowhere but its own outputs, inject nothing into a terminal, REPORT.md or README, and crash nothing.
Each crafted record is skipped with one warning naming its file, or shown escaped; the cost is linear."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONSAFEPATH": "1", "FORCE_COLOR": "1", "COLUMNS": "100"}


def report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mlrun")
    return subprocess.run([str(exe), "report", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def good(name: str = "exp", **extra) -> dict:
    rec = {"experiment": name, "label": "run", "seed": 0, "status": "completed", "config_digest": "d",
           "config_digest_noseed": "d", "metrics": {"test/acc": 0.9}, "paper": {"title": "t", "table": "T1",
                                                                               "metrics": {"test/acc": 0.95}},
           "claims": [{"name": "acc", "lhs": "test/acc", "op": ">=", "rhs": 0.5, "status": "held",
                       "lhs_value": 0.9, "rhs_value": 0.5}], "finished_at": "2026-11-29T00:00:00+00:00"}
    rec.update(extra)
    return rec


def write(path: Path, obj) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_figures_dir_copies_only_regular_files_inside_the_run_dir_to_safe_names(tmp_path):
    victim = tmp_path / "victim_home/.ssh"
    victim.mkdir(parents=True)
    (victim / "authorized_keys").write_text("ssh-ed25519 AAAA the owner's key\n")
    runs = tmp_path / "outputs"
    d = write(runs / "a", good("../../victim_home/.ssh/authorized", figures=["keys"]))
    (d / "keys").write_text("ssh-ed25519 AAAA the attacker's key\n")
    write(runs / "b", good("passwd", figures=["/etc/passwd", "../a/keys", "link.png"]))
    (runs / "b/link.png").symlink_to("/etc/passwd")
    p = report("outputs", "--format", "markdown", "--out", "report/REPORT.md", "--figures-dir", "report/figs",
               cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (victim / "authorized_keys").read_text() == "ssh-ed25519 AAAA the owner's key\n"
    copies = sorted(f.name for f in (tmp_path / "report/figs").iterdir())
    assert all(".." not in c and "/" not in c for c in copies)
    assert all("root:" not in (tmp_path / "report/figs" / c).read_text(errors="ignore") for c in copies)
    assert all(f.resolve().is_relative_to(tmp_path / "report") for f in (tmp_path / "report").rglob("*"))


HOSTILE = ["[bold red]PWNED[/]", "[link=http://evil.example]click[/link]", "\x1b[2J\x1b[HALL CLAIMS HELD",
           "line1\nline2 | injected | row |", "<script>alert(1)</script>", "![](http://evil.example/pixel.png)",
           "[/nope]", "\u202eevil\u202c", "`code` *bold* ~~gone~~"]


def test_every_record_string_is_escaped_for_each_output_format(tmp_path):
    for i, s in enumerate(HOSTILE):
        write(tmp_path / "outputs" / f"r{i}", good(f"exp{i}{s}", label=f"lab{s}", error=s,
                                                  claims=[{"name": s, "lhs": "test/acc", "op": ">=", "rhs": 0.5,
                                                           "status": "held", "lhs_value": 0.9, "rhs_value": 0.5}],
                                                  paper={"title": s, "table": s, "metrics": {"test/acc": 0.95}}))
    term = report("outputs", cwd=tmp_path)
    assert term.returncode == 0, term.stderr
    out = term.stdout
    assert "\x1b[2J" not in out and "\x1b]8;" not in out and "\u202e" not in out  # no raw escape, no OSC-8 link
    assert "[bold red]PWNED[/]" in out  # shown as text, not interpreted
    readme = tmp_path / "README.md"
    readme.write_text("# r\n<!-- results:start -->\n<!-- results:end -->\n")
    md = report("outputs", "--format", "markdown", "--out", "R.md", "--readme", "README.md", cwd=tmp_path)
    assert md.returncode == 0, md.stderr
    for text in ((tmp_path / "R.md").read_text(), readme.read_text()):
        assert "<script>" not in text and "![](" not in text and "\x1b" not in text and "\u202e" not in text
        assert "line1\nline2" not in text
        rows = [line for line in text.splitlines() if line.startswith("| exp") and not line.startswith("| experi")]
        assert len(rows) >= len(HOSTILE)
        for line in rows:  # nothing a renderer would act on: every [ ] ! ` | < from a record is escaped
            assert not re.search(r"(?<!\\)[\[\]!`<>]", line), line
            assert len(re.findall(r"(?<!\\)\|", line)) in (8, 6), line  # a row keeps its columns
    for fmt in ("csv", "json"):
        p = report("outputs", "--format", fmt, cwd=tmp_path)
        assert p.returncode == 0 and "\x1b" not in p.stdout


MALFORMED = {
    "a JSON list": [1, 2, 3],
    "claims: 'abc'": good(claims="abc"),
    "paper: 'abc'": good(paper="abc"),
    "metrics: a list": good(metrics=[1, 2]),
    "a claim that is a number": good(claims=[5]),
    "a claim with junk fields": good(claims=[{"name": "x", "status": 5, "lhs_value": "abc", "per_seed": "x"}]),
    "a claim measured on one side": good(claims=[{"name": "x", "status": "held", "lhs_value": 0.5}]),
    "a claim with a per-seed list of junk": good(claims=[{"name": "x", "lhs_value": 1, "rhs_value": 0, "median": 1,
                                                          "per_seed": [1, "x"]}]),
    "[/nope] in a name": good("[/nope]"),
    "a seed that is a string": good(seed="zero"),
    "status: a dict": good(status={"a": 1}),
    "paper metrics: a list": good(paper={"metrics": [1, 2]}),
    "a metric value that is a dict": good(metrics={"test/acc": {"a": 1}}),
    "figures: a string": good(figures="fig.png"),
    "truncated": '{"experiment": "x", "metr',
    "not UTF-8": b"\xff\xfe\x00garbage".decode("latin-1"),
    "deeply nested": "[" * 100000 + "]" * 100000,
}
BAD_STUDIES = {
    "study claims: 'abc'": {"experiment": "s", "claims": "abc", "runs": []},
    "a study claim with junk": {"experiment": "s", "claims": [{"name": "c", "per_seed": [1, "x", None],
                                                               "status": [], "seeds": "x"}], "runs": []},
    "study runs: junk": {"experiment": "s", "runs": [1, "x", None], "claims": []},
    "derived_per_seed: junk": {"experiment": "s", "derived_per_seed": {"0": "x", "1": [1]}, "runs": []},
    "a study that is a string": "just text",
}


def test_a_malformed_record_is_skipped_with_one_warning_naming_its_file(tmp_path):
    write(tmp_path / "outputs/ok", good("fine"))
    for i, rec in enumerate(MALFORMED.values()):  # each its own experiment, so each is read and counted
        if isinstance(rec, dict) and rec.get("experiment") == "exp":
            rec = dict(rec, experiment=f"bad{i}")
        write(tmp_path / "outputs" / f"bad{i}", rec)
    for i, st in enumerate(BAD_STUDIES.values()):
        d = tmp_path / "multirun" / f"s{i}"
        d.mkdir(parents=True)
        (d / "study.json").write_text(json.dumps(st))
    for args in ([], ["--format", "markdown"], ["--format", "csv"], ["--format", "json"], ["--all", "--detail"]):
        p = report("outputs", "multirun", *args, cwd=tmp_path)
        assert p.returncode == 0, (args, p.stderr[-3000:])
        assert "Traceback" not in p.stderr
        assert "fine" in p.stdout
        warned = [ln for ln in p.stderr.splitlines() if ln.startswith("mlrun report: warning: skipped")]
        assert len(warned) == len(set(warned)), warned  # at most one warning a file
        assert all(re.match(r"mlrun report: warning: skipped \S+/(results|study)\.json: ", w) for w in warned)
        names = {w.split()[4].rsplit("/", 2)[-2] for w in warned}
        assert {"bad0", "bad1", "bad2", "bad3", "bad4", "bad5", "bad6", "bad7"} <= names, names


def test_a_huge_record_costs_time_linear_in_its_size(tmp_path):
    """A results.json of 300k metrics (7 MB) took 280 s and 2 GB: the report is linear in what it reads, and the
    terminal table shows the first rows of an experiment, not 300k of them."""
    seconds = {}
    for n in (3_000, 30_000):
        rec = good("big", metrics={f"test/m{i}": i * 0.5 for i in range(n)}, paper={})
        write(tmp_path / f"n{n}/outputs/big", rec)
        t = time.perf_counter()
        for args in (["--format", "json"], []):
            p = report("outputs", *args, cwd=tmp_path / f"n{n}")
            assert p.returncode == 0, p.stderr[-2000:]
        seconds[n] = time.perf_counter() - t
    assert "more rows (--format markdown, csv or json lists them all)" in p.stdout
    assert seconds[30_000] < 10 * seconds[3_000] + 5, seconds  # quadratic was 100x (0.7 s -> 52 s)


def test_sync_of_a_missing_dir_fails(tmp_path):
    exe = Path(sys.executable).with_name("mlrun")
    p = subprocess.run([str(exe), "sync", str(tmp_path / "nonexistent")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == f"mlrun sync: no such dir: {tmp_path / 'nonexistent'}"
