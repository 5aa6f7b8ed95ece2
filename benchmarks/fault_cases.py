"""Issue 26's faults (items 4-10), each run for real: what a user sees and what the records say afterwards.

    python benchmarks/fault_cases.py --out after26.json        # every case (a few minutes on one core)
    python benchmarks/fault_cases.py --table before26.json after26.json

Needs root (or a user allowed to mount tmpfs) for the full-disk and read-only cases; elsewhere they are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["logger=none", "trainer.progress=none", "hardware.threads=1"]
EXP = "experiment=digits_classifier"
SECRETS = {"my_token": "tok-4f9a1c2e7b", "db_password": "pw-8d3e5a1f0c", "AWS_SECRET_ACCESS_KEY": "aws-77c1e0b9d2f4"}


def exe() -> str:
    return str(Path(sys.executable).with_name("mlrun"))


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", **extra}
    e.pop("HYDRA_FULL_ERROR", None)
    return e


def mlrun(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([exe(), *args], cwd=cwd, env=kw.pop("env", env()), capture_output=True, text=True,
                          timeout=600, **kw)


def first(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


def status(d: Path) -> str | None:
    try:
        return json.loads((d / "results.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def mount_tmpfs(where: Path, opts: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


# ------------------------------------------------------------------------------------------ item 4


def setup_failures(base: Path) -> list[dict]:
    out = []
    bad_hist = base / "badhist"
    mlrun([EXP, *FAST, "trainer.max_steps=4", f"hydra.run.dir={bad_hist}"], base)
    with open(bad_hist / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n"text"\n')
    cases = {
        "huge seed": ["seed=99999999999999999999"],
        "missing data": ["dataset._target_=mlrun.datasets.vision.CIFAR10", f"+dataset.root={base}/nodata",
                         "~dataset.flatten", "~dataset.normalize"],
        "bad dataset key": ["+dataset.nope=1"],
        "malformed metrics.jsonl in the resumed dir": [f"resume={bad_hist}"],
    }
    for name, extra in cases.items():
        d = base / f"item4_{len(out)}"
        steps = "trainer.max_steps=6" if name.startswith("malformed") else "trainer.max_steps=3"
        p = mlrun([EXP, *FAST, steps, *extra, f"hydra.run.dir={d}"], base)
        out.append({"item": 4, "case": name, "command": f"mlrun {EXP} {' '.join(extra)}", "rc": p.returncode,
                    "first": first(p), "lines": len((p.stderr + p.stdout).splitlines()),
                    "results.json status": status(d)})
    return out


# ------------------------------------------------------------------------------------------ item 5

KILL_AT = r"""
import os, signal, sys
from mlrun.trainer import Trainer
real = Trainer._step
def step(self, *a):
    out = real(self, *a)
    if self.global_step == {at} - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Trainer._step = step
from mlrun.cli import main
main(sys.argv[1:])
"""


def strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def kill_and_resume(base: Path) -> list[dict]:
    over = [EXP, *FAST, "trainer.max_steps=150", "trainer.log_every=5", "trainer.eval_every=50",
            "trainer.checkpoint_every=30", "model.net.dropout=0.2"]
    mlrun([*over, f"hydra.run.dir={base}/full"], base)
    full = strip_time(read_rows(base / "full/metrics.jsonl"))
    equal, trials = 0, [126, 95, 61]
    detail = []
    for at in trials:
        killed, resumed = base / f"killed{at}", base / f"resumed{at}"
        p = subprocess.run([sys.executable, "-c", KILL_AT.format(at=at), *over, f"hydra.run.dir={killed}"],
                           cwd=base, env=env(), capture_output=True, text=True, timeout=600)
        # a kill in the middle of a checkpoint write leaves its temp file: plant one as a kill would
        (killed / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half")
        q = mlrun([*over, f"resume={killed}", f"hydra.run.dir={resumed}"], base)
        rows = strip_time(read_rows(resumed / "metrics.jsonl"))
        same = rows == full
        equal += same
        left = sorted(p.name for d in (killed, resumed) for p in (d / "checkpoints").glob("*.tmp"))
        detail.append(f"kill at {at} (rc {p.returncode}), resume rc {q.returncode}: {len(rows)}/{len(full)} rows, "
                      f"{'equal' if same else 'differs'}; tmp left: {left}")
    return [{"item": 5, "case": "SIGKILL mid-run, then resume=<killed dir>",
             "command": f"mlrun {' '.join(over[:1] + over[4:])} (killed at step N by SIGKILL), then resume=<dir>",
             "metrics.jsonl equal to the uninterrupted run's (except time)": f"{equal} of {len(trials)}",
             "detail": detail}]


# ------------------------------------------------------------------------------------------ item 6


def secrets_on_disk(base: Path) -> list[dict]:
    out = []
    e = env(AWS_SECRET_ACCESS_KEY=SECRETS["AWS_SECRET_ACCESS_KEY"], WANDB_MODE="offline")
    extra = [f"+my_token={SECRETS['my_token']}", f"+db.password={SECRETS['db_password']}",
             "+cred=${oc.env:AWS_SECRET_ACCESS_KEY}"]
    runs = {
        "single run, logger=wandb (offline)": ([EXP, *FAST, "logger=wandb", "trainer.max_steps=3", *extra,
                                                f"hydra.run.dir={base}/sec1"], base / "sec1"),
        "DDP run": ([EXP, *FAST, "hardware=ddp", "trainer.max_steps=3", *extra, f"hydra.run.dir={base}/sec2"],
                    base / "sec2"),
        "sweep of 2": (["-m", EXP, *FAST, "trainer.max_steps=2", "seed=0,1", *extra, f"hydra.sweep.dir={base}/sec3"],
                       base / "sec3"),
    }
    for name, (args, where) in runs.items():
        p = mlrun(args, base, env=e)
        hits = {}
        for f in sorted(where.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                found = [k for k, v in SECRETS.items() if v.encode() in data]
                if found:
                    hits[str(f.relative_to(where))] = found
        shown = " ".join(a for a in args if a not in FAST)
        out.append({"item": 6, "case": name, "command": f"AWS_SECRET_ACCESS_KEY=... mlrun {shown}", "rc": p.returncode,
                    "files holding a secret": hits or "none",
                    "terminal holds a secret": any(v in p.stdout + p.stderr for v in SECRETS.values())})
    return out


# ------------------------------------------------------------------------------------------ item 7


def two_runs_one_dir(base: Path) -> list[dict]:
    d = base / "shared"
    args = [EXP, *FAST, "trainer.max_steps=300", "trainer.log_every=10", f"hydra.run.dir={d}"]
    procs = [subprocess.Popen([exe(), *args], cwd=base, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    rows = read_rows(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []
    steps = [r.get("global_step") for r in rows if "train/model_loss" in r]
    res = [{"item": 7, "case": "two runs started at once into one run dir",
            "command": f"mlrun {EXP} hydra.run.dir=shared trainer.max_steps=300 (twice, at once)",
            "exit codes": [p.returncode for p in procs],
            "first lines": [first(subprocess.CompletedProcess([], p.returncode, o, e)) for p, (o, e) in
                            zip(procs, outs)],
            "duplicate logged steps": len(steps) - len(set(steps))}]
    before = len(read_rows(d / "metrics.jsonl"))
    p = mlrun([EXP, *FAST, "trainer.max_steps=20", "trainer.log_every=10", f"hydra.run.dir={d}"], base)
    res.append({"item": 7, "case": "a rerun into a finished run's dir",
                "command": f"mlrun {EXP} hydra.run.dir=shared trainer.max_steps=20", "rc": p.returncode,
                "first": first(p), "metrics.jsonl rows before/after": [before, len(read_rows(d / "metrics.jsonl"))]})
    return res


# ------------------------------------------------------------------------------------------ item 8

FILL = r"""
import json, sys
from mlrun.records import MetricsLog, RecordError
log = MetricsLog(sys.argv[1], flush_every=7)
try:
    for i in range(100000):
        log.log({"step": i, "train/loss": 0.123456789 * i, "pad": "x" * (i % 97)})
except RecordError as e:
    print("RecordError:", e)
"""


def disk_full(base: Path) -> list[dict]:
    out = []
    tmpfs = base / "full"
    if mount_tmpfs(tmpfs, "size=48k"):
        try:
            p = subprocess.run([sys.executable, "-c", FILL, str(tmpfs / "metrics.jsonl")], env=env(),
                               capture_output=True, text=True, timeout=120)
            text = (tmpfs / "metrics.jsonl").read_bytes()
            out.append({"item": 8, "case": "metrics.jsonl on a 48 KiB tmpfs until ENOSPC",
                        "command": "MetricsLog(...).log(...) in a loop on a full tmpfs", "said": p.stdout.strip()[:160],
                        "file ends with a whole line": text.endswith(b"\n")})
            for f in tmpfs.iterdir():
                f.unlink()
            p = mlrun([EXP, *FAST, "trainer.max_steps=3000", "trainer.log_every=1", "trainer.checkpoint_every=0",
                       f"hydra.run.dir={tmpfs}/run"], base)
            m = tmpfs / "run" / "metrics.jsonl"
            out.append({"item": 8, "case": "a run on a 48 KiB tmpfs (real ENOSPC)",
                        "command": f"mlrun {EXP} trainer.log_every=1 hydra.run.dir=<48k tmpfs>/run", "rc": p.returncode,
                        "first": first(p), "lines": len((p.stderr + p.stdout).splitlines()),
                        "metrics.jsonl ends with a whole line": m.exists() and m.read_bytes().endswith(b"\n"),
                        "results.json status": status(tmpfs / "run")})
        finally:
            umount(tmpfs)
    (base / "fill.py").write_text("import resource, signal\n"
                                  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death\n"
                                  "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n" + FILL)
    p = subprocess.run([sys.executable, str(base / "fill.py"), str(base / "m.jsonl")], env=env(),
                       capture_output=True, text=True, timeout=120)
    text = (base / "m.jsonl").read_bytes()
    out.append({"item": 8, "case": "metrics.jsonl under RLIMIT_FSIZE=20000 (EFBIG)",
                "command": "ulimit -f; MetricsLog(...).log(...) in a loop", "said": p.stdout.strip()[:160] or
                p.stderr.strip()[-160:], "file ends with a whole line": text.endswith(b"\n"), "bytes": len(text)})
    return out


# ------------------------------------------------------------------------------------------ item 9


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_cifar(base: Path) -> list[dict]:
    root = base / "evil"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = base / "PWNED"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _Evil(str(marker)), b"labels": [0]}, f)
    p = mlrun([EXP, *FAST, "dataset._target_=mlrun.datasets.vision.CIFAR10", f"+dataset.root={root}",
               "~dataset.flatten", "~dataset.normalize", f"hydra.run.dir={base}/cifar_run"], base)
    return [{"item": 9, "case": "a crafted CIFAR data_batch_1 whose pickle calls os.system",
             "command": f"mlrun {EXP} dataset._target_=mlrun.datasets.vision.CIFAR10 +dataset.root=<crafted>",
             "rc": p.returncode, "first": first(p), "code ran": marker.exists()}]


# ------------------------------------------------------------------------------------------ item 10


def read_only(base: Path) -> list[dict]:
    ro = base / "ro"
    out = []
    if mount_tmpfs(ro, "ro,size=16k"):
        try:
            for target in (ro, ro / "run"):
                p = mlrun([EXP, *FAST, "trainer.max_steps=3", f"hydra.run.dir={target}"], base)
                out.append({"item": 10, "case": f"run dir {'is' if target == ro else 'inside'} a read-only mount",
                            "command": f"mlrun {EXP} hydra.run.dir={target.relative_to(base)}", "rc": p.returncode,
                            "first": first(p), "lines": len((p.stderr + p.stdout).splitlines())})
        finally:
            umount(ro)
    return out


# ------------------------------------------------------------------------------------------ items 1-3 (report)


def _record(name: str, **extra) -> dict:
    rec = {"experiment": name, "label": "run", "seed": 0, "status": "completed", "config_digest": "d",
           "config_digest_noseed": "d", "metrics": {"test/acc": 0.9},
           "paper": {"title": "t", "table": "T1", "metrics": {"test/acc": 0.95}},
           "claims": [{"name": "acc", "lhs": "test/acc", "op": ">=", "rhs": 0.5, "status": "held", "lhs_value": 0.9,
                       "rhs_value": 0.5}], "finished_at": "2026-11-29T00:00:00+00:00"}
    rec.update(extra)
    return rec


def _put(d: Path, rec: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(rec if isinstance(rec, str) else json.dumps(rec))
    return d


def report_figures(base: Path) -> list[dict]:
    victim = base / "victim_home/.ssh"
    victim.mkdir(parents=True)
    (victim / "authorized_keys").write_text("owner's key\n")
    d = _put(base / "outputs/a", _record("../../victim_home/.ssh/authorized", figures=["keys"]))
    (d / "keys").write_text("attacker's key\n")
    _put(base / "outputs/b", _record("passwd", figures=["/etc/passwd"]))
    d = _put(base / "outputs/c", _record("linked", figures=["fig.png"]))
    (d / "fig.png").symlink_to("/etc/passwd")
    p = subprocess.run([exe(), "report", "outputs", "--format", "markdown", "--out", "rep/REPORT.md",
                        "--figures-dir", "rep/figs"], cwd=base, env=env(), capture_output=True, text=True,
                       timeout=300)
    copied = [f for f in (base / "rep").rglob("*") if f.is_file()]
    return [{"item": 1, "case": "--figures-dir with crafted experiment names and figure paths",
             "command": "mlrun report outputs --format markdown --out rep/REPORT.md --figures-dir rep/figs",
             "rc": p.returncode, "victim's authorized_keys overwritten":
                 (victim / "authorized_keys").read_text() != "owner's key\n",
             "/etc/passwd copied into the report": any("root:" in f.read_text(errors="ignore") for f in copied),
             "files written outside rep/": sorted(str(f.relative_to(base)) for f in base.rglob("*") if f.is_file()
                                                  and "rep" not in f.parts and "outputs" not in f.parts
                                                  and "victim_home" not in f.parts)}]


HOSTILE = ["[bold red]PWNED[/]", "[link=http://evil.example]click[/link]", "\x1b[2J\x1b[HALL CLAIMS HELD",
           "line1\nline2 | injected |", "<script>alert(1)</script>", "![](http://evil.example/pixel.png)"]


def report_escaping(base: Path) -> list[dict]:
    for i, s in enumerate(HOSTILE):
        _put(base / "outputs" / f"r{i}", _record(f"exp{i}{s}", claims=[{"name": s, "lhs": "test/acc", "op": ">=",
                                                                         "rhs": 0.5, "status": "held",
                                                                         "lhs_value": 0.9, "rhs_value": 0.5}]))
    (base / "README.md").write_text("<!-- results:start -->\n<!-- results:end -->\n")
    e = env(FORCE_COLOR="1", COLUMNS="100")
    term = subprocess.run([exe(), "report", "outputs"], cwd=base, env=e, capture_output=True, text=True,
                          timeout=300)
    md = subprocess.run([exe(), "report", "outputs", "--format", "markdown", "--out", "R.md", "--readme",
                         "README.md"], cwd=base, env=e, capture_output=True, text=True, timeout=300)
    text = (base / "R.md").read_text() if (base / "R.md").exists() else ""
    readme = (base / "README.md").read_text()
    return [{"item": 2, "case": "record strings with rich markup, ANSI escapes, newlines, HTML, images",
             "command": "mlrun report outputs; mlrun report outputs --format markdown --out R.md --readme README.md",
             "rc": [term.returncode, md.returncode],
             "terminal: markup interpreted": "[bold red]PWNED[/]" not in term.stdout and term.returncode == 0,
             "terminal: raw ESC[2J / OSC-8 link": "\x1b[2J" in term.stdout or "\x1b]8;" in term.stdout,
             "markdown/README: live <script>": "<script>" in text + readme and "\\<script>" not in text + readme,
             "markdown/README: image": "![](" in text + readme,
             "markdown/README: newline breaks a row": "line1\nline2" in text + readme}]


def report_malformed(base: Path) -> list[dict]:
    cases = {"a JSON list": [1, 2], "claims: 'abc'": _record("a", claims="abc"),
             "paper: 'abc'": _record("b", paper="abc"),
             "metrics: a list": _record("c", metrics=[1]), "a claim that is a number": _record("d", claims=[5]),
             "a claim with junk fields": _record("e", claims=[{"name": "x", "status": 5, "lhs_value": "abc"}]),
             "[/nope] in a name": _record("[/nope]"), "seed: a string": _record("f", seed="zero"),
             "status: a dict": _record("g", status={"a": 1}),
             "paper metrics: a list": _record("h", paper={"metrics": [1]}),
             "a metric that is a dict": _record("i", metrics={"test/acc": {"a": 1}}),
             "figures: a string": _record("j", figures="x.png"), "truncated": '{"experiment": "x", "metr',
             "deeply nested": "[" * 100000 + "]" * 100000}
    studies = {"study claims: 'abc'": {"experiment": "s", "claims": "abc", "runs": []},
               "a study claim with junk": {"experiment": "s", "claims": [{"name": "c", "per_seed": [1, "x"]}],
                                           "runs": []},
               "study runs: junk": {"experiment": "s", "runs": [1, "x", None], "claims": []}}
    crashed = []
    for name, rec in [*cases.items(), *studies.items()]:
        d = base / name.replace(" ", "_").replace("'", "").replace("/", "_").replace("[", "").replace("]", "")
        if name in studies:
            d.mkdir(parents=True)
            (d / "study.json").write_text(json.dumps(rec))
        else:
            _put(d / "run", rec)
        _put(d / "ok", _record("fine"))
        for fmt in ("table", "markdown", "json"):
            p = subprocess.run([exe(), "report", str(d), "--format", fmt], cwd=base, env=env(), capture_output=True,
                               text=True, timeout=300)
            if p.returncode != 0 or "Traceback" in p.stderr or "fine" not in p.stdout:
                crashed.append(f"{name} ({fmt})")
    return [{"item": 3, "case": f"{len(cases) + len(studies)} malformed records, each beside a good one, "
                                "3 output formats",
             "command": "mlrun report <dir> --format table|markdown|json",
             "cases that crashed or lost the good record": f"{len(crashed)} of {3 * (len(cases) + len(studies))}",
             "detail": crashed}]


def report_huge(base: Path) -> list[dict]:
    rec = _record("big", metrics={f"test/m{i}": i * 0.5 for i in range(300_000)}, paper={})
    _put(base / "outputs/big", rec)
    out = {}
    for fmt in ("json", "table"):
        t = time.perf_counter()
        try:
            p = subprocess.run(["/usr/bin/time", "-f", "%M", exe(), "report", "outputs", "--format", fmt], cwd=base,
                               env=env(), capture_output=True, text=True, timeout=300)
            kb = int(p.stderr.strip().splitlines()[-1])
            out[fmt] = f"{time.perf_counter() - t:.1f} s, {kb / 1024:.0f} MB"
        except subprocess.TimeoutExpired:
            out[fmt] = "over 300 s"
    size = (base / "outputs/big/results.json").stat().st_size / 1e6
    return [{"item": 3, "case": f"one results.json of {size:.1f} MB with 300k metrics",
             "command": "mlrun report outputs --format json; mlrun report outputs", "json": out["json"],
             "table": out["table"]}]


ITEMS = {"1": report_figures, "2": report_escaping, "3": report_malformed, "3b": report_huge, "4": setup_failures,
         "5": kill_and_resume, "6": secrets_on_disk, "7": two_runs_one_dir, "8": disk_full,
         "9": crafted_cifar, "10": read_only}


def table(before: list[dict], after: list[dict]) -> str:
    """Markdown: each case, its command, what was seen before and after."""
    def seen(r: dict | None) -> str:
        if r is None:
            return "-"
        parts = [f"{k}: {v}" for k, v in r.items() if k not in ("item", "case", "command", "detail")]
        return "; ".join(parts).replace("|", "\\|").replace("\n", " ")

    after_by = {(r["item"], r["case"]): r for r in after}
    out = ["| item | case | command | before | after |", "|---|---|---|---|---|"]
    for r in before:
        a = after_by.get((r["item"], r["case"]))
        out.append(f"| {r['item']} | {r['case']} | `{r['command'][:160]}` | {seen(r)} | {seen(a)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the observations here (JSON)")
    ap.add_argument("--items", nargs="*", default=list(ITEMS))
    ap.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), help="print the before/after markdown table")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table[0]).read_text()), json.loads(Path(args.table[1]).read_text())), end="")
        return
    base = Path(tempfile.mkdtemp(prefix="mlrun_faults_"))
    records = []
    try:
        for item in args.items:
            t = time.perf_counter()
            where = base / f"item{item}"
            where.mkdir()
            got = ITEMS[item](where)
            for r in got:
                print(json.dumps(r), flush=True)
            print(f"# item {item}: {time.perf_counter() - t:.0f} s", flush=True)
            records += got
    finally:
        for m in ("full", "ro"):
            for d in base.glob(f"item*/{m}"):
                umount(d)
        shutil.rmtree(base, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
