"""`mlrun reproduce`: every CPU-scale experiment and study, then the report, into README's Results section.

    mlrun reproduce                      # all CPU-scale experiments (studies as multiruns), then the report
    mlrun reproduce realnvp_digits ...   # only these
    mlrun reproduce --readme README.md   # also replace README's Results section with the report
    mlrun reproduce --into reproduce/<stamp> bso_prose --readme README.md   # rerun one there, rebuild the report

Each experiment runs in its own process (`mlrun experiment=X` or, when it declares a sweep, `mlrun -m
experiment=X`), under `reproduce/<timestamp>/`; a failing one is reported as failed and the rest go on. Each
experiment's elapsed time goes to `wall_times.json` there (`benchmarks/miniatures.py` compares them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def has_sweep(name: str) -> bool:
    from importlib.resources import files

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(files("mlrun.conf").joinpath("experiment", f"{name}.yaml")))
    return bool(OmegaConf.select(cfg, "hydra.sweeper.params"))


def finished(out: Path) -> str:
    """When an experiment's records were last written (UTC), from its study.json or results.json."""
    for name in ("study.json", "results.json"):
        if (out / name).exists():
            return datetime.fromtimestamp((out / name).stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "-"


def default_experiments() -> list[str]:
    """Every CPU-scale experiment, except the single runs that are one arm of a study (`part_of:`): the study
    runs them."""
    from mlrun.cli import experiments
    from mlrun.report import experiment_info

    infos = [experiment_info(n) for n in experiments()]
    return [i["experiment"] for i in infos if i["scale"] == "cpu" and not i["study"].startswith("in ")]


def reproduce_main(argv: list[str]) -> int:
    from mlrun.report import figures_of, find_records, plain, rows, to_markdown

    ap = argparse.ArgumentParser(prog="mlrun reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="*",
                    help="default: every CPU-scale experiment but single arms of a study (`part_of:`)")
    ap.add_argument("--root", default="reproduce", help="where the runs go (default: reproduce/<timestamp>)")
    ap.add_argument("--readme", help="replace this file's Results section with the report")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run, e.g. logger=none")
    ap.add_argument("--into", help="an earlier reproduce folder: rerun only the named experiments there (their old "
                                   "folders move to <folder>-replaced/) and rebuild the report over all of it")
    args = ap.parse_args(argv)
    if args.into and not args.experiments:
        raise SystemExit("mlrun reproduce: --into needs the experiments to rerun")
    names = args.experiments or default_experiments()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = Path(args.into) if args.into else Path(args.root) / stamp
    if args.into and not (root / "wall_times.json").exists():
        raise SystemExit(f"mlrun reproduce: {root} is not a reproduce folder (no wall_times.json)")
    root.mkdir(parents=True, exist_ok=True)  # even if every run fails before writing anything
    exe = str(Path(sys.executable).with_name("mlrun"))
    walls: dict[str, float] = {}
    failed: list[str] = []
    if args.into:
        earlier = json.loads((root / "wall_times.json").read_text())
        walls = dict(earlier["seconds"])
        failed = [n for n in earlier.get("failed", []) if n not in names]
    for name in names:
        sweep = has_sweep(name)
        out = root / name
        if out.exists():  # --into: keep the replaced runs, out of the report's way
            aside = root.parent / f"{root.name}-replaced" / f"{name}-{stamp}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            out.rename(aside)
            print(f"[reproduce] moved the earlier {name} to {aside}", flush=True)
        cmd = [exe, *(["-m"] if sweep else []), f"experiment={name}", *args.extra,
               f"hydra.{'sweep' if sweep else 'run'}.dir={out}"]
        print(f"[reproduce] {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd, env={**os.environ, "WANDB_SILENT": "true"}).returncode
        walls[name] = time.perf_counter() - t
        if rc != 0:
            failed.append(name)
        print(f"[reproduce] {name}: exit {rc} in {walls[name]:.0f} s", flush=True)
    (root / "wall_times.json").write_text(json.dumps({"seconds": walls, "failed": failed}, indent=1) + "\n")
    runs, studies, warnings = find_records([root])
    for w in warnings:
        print(f"[reproduce] warning: {plain(w)}", file=sys.stderr)
    results, claims, _ = rows(runs, studies)
    total = sum(walls.values())
    header = (f"Regenerated by `mlrun reproduce {' '.join(argv)}` on "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {platform.machine()} "
              f"with {os.cpu_count()} cores, torch threads as each experiment sets; total {total / 60:.1f} min.\n\n"
              + "| experiment | wall time | finished |\n|---|---|---|\n"
              + "".join(f"| {n} | {w:.0f} s{' (failed)' if n in failed else ''} | {finished(root / n)} |\n"
                        for n, w in walls.items()))
    figures_from = Path(args.readme).parent if args.readme else root
    figures_dir = figures_from / "docs" / "results" if args.readme else None
    body = header + "\n" + to_markdown(results, claims, figures_of(runs, studies), figures_from, figures_dir)
    (root / "REPORT.md").write_text(body)
    print(f"[reproduce] report: {root / 'REPORT.md'}")
    if args.readme:
        from mlrun.report import replace_section

        if replace_section(Path(args.readme), body):
            print(f"[reproduce] updated {args.readme}")
        else:
            print(f"[reproduce] {args.readme} has no results markers; left as is", file=sys.stderr)
    return 1 if failed else 0
