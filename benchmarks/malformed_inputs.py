"""Malformed inputs, run through the real `mlrun` command: exit code and first line of output for each.

    python benchmarks/malformed_inputs.py --out before.json            # measure (about 10 min on one core)
    python benchmarks/malformed_inputs.py --table before.json after.json   # the markdown table, before vs after

Each case runs in its own empty folder (so the folders a failed start leaves behind are visible). Run cases add
`logger=none trainer.progress=none hardware.threads=1` and, unless they set a length themselves,
`trainer.max_steps=3`. The issue-27 closing table is this script's output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["logger=none", "trainer.progress=none", "hardware.threads=1"]
EXP = "experiment=digits_classifier"
NODATA = ["dataset._target_=mlrun.datasets.vision.CIFAR10", "+dataset.root={base}/nodata", "~dataset.flatten",
          "~dataset.normalize"]

# (id, category, arguments after `mlrun`; {base} is the shared set-up folder)
CASES: list[tuple[str, str, list[str]]] = [
    # choices: exit 0 while doing something wrong
    ("precision-8", "choice", [EXP, "trainer.precision=8"]),
    ("precision-bf17", "choice", [EXP, "trainer.precision=bf17"]),
    ("mode-maximize", "choice", [EXP, "trainer.mode=maximize", "trainer.monitor=val/acc", "trainer.eval_every=1"]),
    ("on_nan-ignore", "choice", [EXP, "trainer.on_nan=ignore"]),
    ("progress-fancy", "choice", [EXP, "trainer.progress=fancy"]),
    ("device-tpu", "choice", [EXP, "hardware.device=tpu"]),
    ("device-cuda-x", "choice", [EXP, "hardware.device=cuda:x"]),
    ("start_method-thread", "choice", [EXP, "hardware.start_method=thread"]),
    ("logger-mode-onlin", "choice", [EXP, "logger.mode=onlin"]),
    ("scale-gpu", "choice", [EXP, "scale=gpu"]),
    ("precision-null", "choice", [EXP, "trainer.precision=null"]),
    # ranges: exit 0 while doing something wrong
    ("clip-neg", "range", [EXP, "trainer.clip_grad_norm=-1"]),
    ("clip-nan", "range", [EXP, "trainer.clip_grad_norm=nan"]),
    ("max_steps-neg", "range", [EXP, "trainer.max_steps=-5"]),
    ("max_epochs-neg", "range", [EXP, "trainer.max_epochs=-1"]),
    ("max_epochs-0", "range", [EXP, "trainer.max_epochs=0"]),
    ("step_limit-neg", "range", [EXP, "trainer.step_limit=-1"]),
    ("log_every-neg", "range", [EXP, "trainer.log_every=-1"]),
    ("eval_every-neg", "range", [EXP, "trainer.eval_every=-5"]),
    ("checkpoint_every-neg", "range", [EXP, "trainer.checkpoint_every=-1"]),
    ("keep_last-neg", "range", [EXP, "trainer.keep_last=-1"]),
    ("accumulate-0", "range", [EXP, "trainer.accumulate=0"]),
    ("accumulate-neg", "range", [EXP, "trainer.accumulate=-2"]),
    ("patience-neg", "range", [EXP, "trainer.patience=-1", "trainer.monitor=val/acc", "trainer.eval_every=1"]),
    ("profile_steps-neg", "range", [EXP, "trainer.profile_steps=-1"]),
    ("overfit-0", "range", [EXP, "trainer.overfit_batches=0"]),
    ("overfit-neg", "range", [EXP, "trainer.overfit_batches=-3"]),
    ("limit_eval-0", "range", [EXP, "trainer.limit_eval_batches=0"]),
    ("limit_eval-neg", "range", [EXP, "trainer.limit_eval_batches=-1"]),
    ("num_workers-neg", "range", [EXP, "trainer.num_workers=-1"]),
    ("nproc-0", "range", [EXP, "hardware=ddp", "hardware.nproc_per_node=0"]),
    ("nproc-neg", "range", [EXP, "hardware=ddp", "hardware.nproc_per_node=-2"]),
    ("nnodes-0", "range", [EXP, "hardware.nnodes=0"]),
    ("node_rank-neg", "range", [EXP, "hardware.node_rank=-1"]),
    ("threads-neg", "range", [EXP, "hardware.threads=-1"]),
    ("threads-0", "range", [EXP, "hardware.threads=0"]),
    ("init_timeout-neg", "range", [EXP, "logger.init_timeout=-1"]),
    ("seed-neg", "range", [EXP, "seed=-1"]),
    ("seed-huge", "range", [EXP, "seed=99999999999999999999"]),
    ("batch-0", "range", [EXP, "dataset.batch_size=0"]),
    ("batch-neg", "range", [EXP, "dataset.batch_size=-1"]),
    ("stage-steps-neg", "range", [EXP, "stages=[{name:a,max_steps:-3}]"]),
    ("monitor-absent", "metric", [EXP, "trainer.monitor=val/accuracy", "trainer.eval_every=1"]),
    ("monitor-test", "metric", [EXP, "trainer.monitor=test/acc", "trainer.eval_every=1"]),
    # keys: typos, unknown keys, wrong types
    ("typo-trainer", "key", [EXP, "trainer.max_step=3"]),
    ("plus-trainer", "key", [EXP, "+trainer.foo=1"]),
    ("plus-hardware", "key", [EXP, "+hardware.foo=1"]),
    ("plus-logger", "key", [EXP, "+logger.foo=1"]),
    ("plus-top", "key", [EXP, "+foo=1"]),
    ("typo-top", "key", [EXP, "sed=3"]),
    ("typo-model", "key", [EXP, "model.net.chanels=3"]),
    ("typo-dataset", "key", [EXP, "dataset.batch_sise=3"]),
    ("plus-model", "key", [EXP, "+model.net.chanels=3"]),
    ("key-dataset-root", "key", [EXP, "dataset.root=/x"]),
    ("plus-dataset-root", "key", [EXP, "+dataset.root=/x"]),
    ("stage-typo", "key", [EXP, "stages=[{name:a,max_step:3}]"]),
    ("stages-str", "type", [EXP, "stages=abc"]),
    ("max_steps-abc", "type", [EXP, "trainer.max_steps=abc"]),
    ("max_steps-1e3", "type", [EXP, "trainer.max_steps=1e3"]),
    ("max_steps-empty", "type", [EXP, "trainer.max_steps="]),
    ("seed-abc", "type", [EXP, "seed=abc"]),
    ("seed-float", "type", [EXP, "seed=1.5"]),
    ("deterministic-maybe", "type", [EXP, "trainer.deterministic=maybe"]),
    ("nproc-abc", "type", [EXP, "hardware.nproc_per_node=abc"]),
    ("scheduler-str", "type", [EXP, "trainer.scheduler=abc"]),
    # interpolations
    ("interp-env-home", "interp", [EXP, "trainer.max_steps=${oc.env:HOME}"]),
    ("interp-env-missing", "interp", [EXP, "trainer.max_steps=${oc.env:NOPE_NOT_SET}"]),
    ("interp-self", "interp", [EXP, "label=${label}"]),
    ("interp-missing-key", "interp", [EXP, "label=${nope.key}"]),
    # groups and experiments
    ("experiment-typo", "group", ["experiment=digits_clasifier"]),
    ("hardware-typo", "group", [EXP, "hardware=gpus"]),
    ("logger-nope", "group", [EXP, "logger=nope"]),
    ("debug-nope", "group", [EXP, "debug=nope"]),
    ("no-experiment", "group", []),
    ("gpu-no-cuda", "group", [EXP, "hardware=gpu"]),
    # targets and model values
    ("lr-neg", "model", [EXP, "model.optimizer.lr=-1"]),
    ("lr-nan", "model", [EXP, "model.optimizer.lr=nan"]),
    ("channels-0", "model", [EXP, "model.net.channels=0"]),
    ("target-typo", "model", [EXP, "model.optimizer._target_=torch.optim.Adamm"]),
    ("target-os-system", "model", [EXP, "model._target_=os.system"]),
    ("missing-dataset", "data", [EXP, *NODATA]),
    # run dirs
    ("run-dir-proc", "dir", [EXP, "hydra.run.dir=/proc/mlrun_x"]),
    ("run-dir-devnull", "dir", [EXP, "hydra.run.dir=/dev/null/x"]),
    ("run-dir-readonly", "dir", [EXP, "hydra.run.dir={base}/readonly/run"]),
    ("name-300", "dir", [EXP, "experiment_name=" + "a" * 300]),
    ("run-dir-occupied", "dir", [EXP, "hydra.run.dir={base}/occupied"]),
    ("sweep-dir-proc", "dir", ["-m", EXP, "seed=0,1", "hydra.sweep.dir=/proc/mlrun_x"]),
    # resume
    ("resume-nonexistent", "resume", [EXP, "resume=/nonexistent"]),
    ("resume-a-file", "resume", [EXP, "resume={base}/fin20/results.json"]),
    ("resume-no-position", "resume", [EXP, "resume={base}/noposition"]),
    ("eval-only-no-resume", "resume", [EXP, "eval_only=true"]),
    ("resume-longer", "resume", [EXP, "resume={base}/fin20", "trainer.max_steps=40"]),
    ("resume-shorter", "resume", [EXP, "resume={base}/fin20", "trainer.max_steps=10"]),
    ("resume-auto-stranger", "resume", [EXP, "resume=auto", "hydra.run.dir={base}/foreign/outputs/mine/run"]),
    ("sweep-resume-nonexistent", "sweep", ["-m", EXP, "seed=0,1", "resume=/nonexistent"]),
    ("sweep-max_steps-neg", "sweep", ["-m", EXP, "seed=0,1", "trainer.max_steps=-5"]),
    ("sweep-launcher-nope", "sweep", ["-m", EXP, "seed=0,1", "hydra/launcher=nope"]),
    ("objective-absent", "sweep", [EXP, "objective=val/nope"]),
    # verbs
    ("sync-nonexistent", "verb", ["sync", "/nonexistent"]),
    ("report-nonexistent", "verb", ["report", "/nonexistent"]),
    ("report-format-xml", "verb", ["report", "--format", "xml"]),
    ("validate-nope", "verb", ["validate", "no_such_experiment"]),
    ("reproduce-nope", "verb", ["reproduce", "no_such_experiment"]),
    ("reproduce-into-nope", "verb", ["reproduce", "digits_classifier", "--into", "/nonexistent"]),
    ("ls-extra", "verb", ["ls", "--bogus"]),
]

VERBS = ("sync", "report", "validate", "reproduce", "ls")


def mlrun_exe() -> str:
    return str(Path(sys.executable).with_name("mlrun"))


def env() -> dict[str, str]:
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
    e.pop("HYDRA_FULL_ERROR", None)
    return e


def setup(base: Path) -> None:
    """The runs and files some cases point at."""
    exe = mlrun_exe()
    run = [exe, EXP, *FAST]
    subprocess.run([*run, "trainer.max_steps=20", f"hydra.run.dir={base}/fin20"], env=env(), check=True,
                   capture_output=True)
    shutil.copytree(base / "fin20", base / "occupied")
    code = (f"import torch; s = torch.load('{base}/fin20/checkpoints/last.pt', weights_only=True); "
            f"del s['position']; import os; os.makedirs('{base}/noposition/checkpoints'); "
            f"torch.save(s, '{base}/noposition/checkpoints/last.pt')")
    subprocess.run([sys.executable, "-c", code], env=env(), check=True, cwd=base)
    # another checkout's finished run of the same config as case resume-auto-stranger
    subprocess.run([*run, "trainer.max_steps=3", f"hydra.run.dir={base}/foreign/outputs/theirs/run"], env=env(),
                   check=True, capture_output=True)
    (base / "readonly").mkdir()
    os.chmod(base / "readonly", 0o555)
    if os.geteuid() == 0:  # root writes through mode bits: make it a read-only mount instead
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(base / "readonly")], check=False)


def teardown(base: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", str(base / "readonly")], check=False, capture_output=True)


def measure(case: tuple[str, str, list[str]], base: Path) -> dict:
    cid, cat, args = case
    args = [a.replace("{base}", str(base)) for a in args]
    if args and args[0] not in VERBS:
        if not any(a.startswith(("trainer.max_steps=", "trainer.max_epochs=", "stages=")) for a in args):
            args = [*args, "trainer.max_steps=3"]
        given = {a.split("=")[0].lstrip("+~") for a in args}
        args = [*args, *(f for f in FAST if f.split("=")[0] not in given)]  # the case's own value wins
    cwd = base / "cases" / cid
    cwd.mkdir(parents=True)
    t = time.perf_counter()
    try:
        p = subprocess.run([mlrun_exe(), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
        rc, out = p.returncode, (p.stderr + p.stdout)
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", str(e.stderr or "")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    made = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_dir() and not any(p.iterdir()) or
                  (p.is_dir() and p.name != ".hydra" and (p / ".hydra").exists()))
    results = [json.loads(f.read_text()) for f in cwd.rglob("results.json")]
    return {"id": cid, "category": cat, "args": args, "rc": rc, "first": lines[0][:240] if lines else "",
            "lines": len(lines), "traceback": "Traceback" in out, "dirs": made,
            "statuses": [(r.get("status"), r.get("steps")) for r in results],
            "seconds": round(time.perf_counter() - t, 1)}


def table(before: list[dict], after: list[dict] | None) -> str:
    after_by = {r["id"]: r for r in after or []}

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        first = r["first"].replace("|", "\\|").replace("`", "'")
        extra = []
        if r["traceback"]:
            extra.append(f"traceback, {r['lines']} lines")
        elif r["lines"] > 1 and r["rc"] != 0:
            extra.append(f"{r['lines']} lines")
        if r["statuses"]:
            extra.append("results: " + ", ".join(f"{s} {n} steps" for s, n in r["statuses"]))
        if r["dirs"]:
            extra.append("left " + ", ".join(r["dirs"])[:60])
        return f"{r['rc']}: `{first[:150]}`" + (f" ({'; '.join(extra)})" if extra else "")

    out = ["| # | input | before | after |", "|---|---|---|---|"]
    for i, r in enumerate(before, 1):
        shown = " ".join(a for a in r["args"] if a not in FAST and a != "trainer.max_steps=3" and a != EXP)
        shown = shown.replace("|", "\\|")
        out.append(f"| {i} | `{shown or '(none)'}` | {cell(r)} | {cell(after_by.get(r['id']))} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="measure every case and write the records here (JSON)")
    ap.add_argument("--only", nargs="*", help="case ids to run")
    ap.add_argument("--table", nargs="+", help="BEFORE.json [AFTER.json]: print the markdown table")
    args = ap.parse_args()
    if args.table:
        before = json.loads(Path(args.table[0]).read_text())
        after = json.loads(Path(args.table[1]).read_text()) if len(args.table) > 1 else None
        print(table(before, after), end="")
        return
    base = Path(tempfile.mkdtemp(prefix="mlrun_malformed_"))
    try:
        setup(base)
        records = []
        for case in CASES:
            if args.only and case[0] not in args.only:
                continue
            r = measure(case, base)
            records.append(r)
            print(f"{r['id']:28s} rc={r['rc']} {r['seconds']:5.1f}s  {r['first'][:110]}", flush=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    finally:
        teardown(base)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
