"""`mlrun report`, `mlrun ls`, `mlrun sync`: read records, never torch.

`report` gathers every results.json and study.json under the given dirs (default: outputs/, multirun/ and
reproduce/), groups runs that differ only by seed, and sets ours (mean ± std over seeds, n) beside the paper's
value, with every claim held, failed or unknown. Runs that failed, were interrupted or are still running are
listed as such.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlrun.records import RESULTS, STUDY, read_json

DEFAULT_DIRS = ("outputs", "multirun", "reproduce")  # single runs, multiruns, `mlrun reproduce`


# ---------------------------------------------------------------------------------------------- gathering


def find_records(dirs: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, studies) under dirs; runs inside a study's sweep dir are left to the study."""
    studies, runs = [], []
    study_dirs: set[Path] = set()
    for d in dirs:
        for p in sorted(Path(d).rglob(STUDY)):
            try:
                s = read_json(p)
            except (OSError, ValueError) as e:
                studies.append({"experiment": str(p.parent), "status": f"unreadable ({e})", "claims": [], "groups": {},
                                "dir": str(p.parent)})
                continue
            s["dir"] = str(p.parent)
            studies.append(s)
            study_dirs.add(p.parent.resolve())
    for d in dirs:
        for p in sorted(Path(d).rglob(RESULTS)):
            if p.parent.parent.resolve() in study_dirs:
                continue
            try:
                r = read_json(p)
            except (OSError, ValueError) as e:
                r = {"experiment": str(p.parent), "status": f"unreadable ({e})"}
            if r.get("resumed_by"):
                continue  # superseded by the run that resumed it
            r["dir"] = str(p.parent)
            runs.append(r)
    return runs, studies


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.4g} (n=1)"
    return f"{m:.4g} ± {statistics.stdev(values):.2g} (n={len(values)})"


def _paper_metrics(paper: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """paper.metrics entries as {name: {value, run, metric, table}}; a bare number is {value}."""
    out = {}
    for name, spec in (paper.get("metrics") or {}).items():
        out[name] = dict(spec) if isinstance(spec, dict) else {"value": spec}
    return out


def rows(runs: list[dict[str, Any]], studies: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Result rows and claim rows for every experiment found."""
    results, claims = [], []
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        grouped[(r.get("experiment", "?"), r.get("label", "run"))].append(r)
    for (exp, label), rs in sorted(grouped.items()):
        done = [r for r in rs if r.get("status") == "completed"]
        bad = [r for r in rs if r.get("status") != "completed"]
        paper = (rs[0].get("paper") or {})
        pm = _paper_metrics(paper)
        names = list(pm) or sorted({k for r in done for k in r.get("metrics", {}) if k.startswith("test/")})
        for name in names:
            spec = pm.get(name, {})
            metric = spec.get("metric", name)
            vals = [float(r["metrics"][metric]) for r in done if _is_number(r.get("metrics", {}).get(metric))]
            results.append(_row(exp, label, name, vals, spec, paper, "completed" if vals else "no value"))
        for r in bad:
            results.append({"experiment": exp, "run": label, "metric": "-", "ours": "-", "paper": "-", "diff": "-",
                            "source": "", "status": f"{r.get('status')}: {r.get('error', '')}"[:80],
                            "dir": r["dir"]})
        by_name: dict[str, list[dict]] = defaultdict(list)
        for r in done:
            for c in r.get("claims", []):
                by_name[c["name"]].append(c)
        for name, cs in by_name.items():
            held = sum(c["status"] == "held" for c in cs)
            lhs = [c["lhs_value"] for c in cs if "lhs_value" in c]
            rhs = [c["rhs_value"] for c in cs if "rhs_value" in c]
            status = "held" if held == len(cs) else ("failed" if held == 0 else f"held {held}/{len(cs)}")
            right = f"{rhs[0]:.4g}" if rhs and len(set(rhs)) == 1 else _fmt(rhs)
            claims.append({"experiment": exp, "claim": name, "measured": f"{_fmt(lhs)} {cs[0]['op']} {right}",
                           "status": status})
    for s in studies:
        exp = s.get("experiment") or Path(s["dir"]).name
        paper = s.get("paper") or {}
        pm = list(_paper_metrics(paper).items())
        if not pm:  # no published values to set beside: show every label's test metrics
            pm = [(m, {"run": label, "metric": m}) for label, ms in sorted(s.get("groups", {}).items())
                  for m in sorted(ms) if m.startswith("test/")]
        for name, spec in pm:
            label, metric = spec.get("run"), spec.get("metric", name)
            if label is None:
                vals = [float(s["derived"][metric])] if _is_number((s.get("derived") or {}).get(metric)) else []
            else:
                st = (s.get("groups", {}).get(label) or {}).get(metric)
                vals = _values(s, label, metric) if st else []
            results.append(_row(exp, label or "study", name, vals, spec, paper, "completed" if vals else "no value",
                                s["dir"]))
        for r in s.get("runs", []):
            if r.get("status") != "completed":
                results.append({"experiment": exp, "run": r.get("label"), "metric": "-", "ours": "-", "paper": "-",
                                "diff": "-", "source": "", "status": f"{r.get('status')}: {r.get('error') or ''}"[:80],
                                "dir": r.get("dir")})
        for c in s.get("claims", []):
            measured = (f"{c['lhs_value']:.4g} {c['op']} {c['rhs_value']:.4g}" if "lhs_value" in c
                        else c.get("reason", "-"))
            claims.append({"experiment": exp, "claim": c["name"], "measured": measured, "status": c["status"]})
    return results, claims


def _values(study: dict, label: str, metric: str) -> list[float]:
    return [float(r["metrics"][metric]) for r in study.get("runs", [])
            if r.get("label") == label and r.get("status") == "completed" and _is_number(r["metrics"].get(metric))]


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    try:
        float(v)
        return isinstance(v, str)
    except (TypeError, ValueError):
        return False


def _row(exp: str, label: str, name: str, vals: list[float], spec: dict, paper: dict, status: str,
         where: str = "") -> dict[str, Any]:
    pub = spec.get("value")
    diff = "-"
    if vals and isinstance(pub, int | float):
        diff = f"{statistics.fmean(vals) - pub:+.4g}"
    source = spec.get("table") or paper.get("table") or ""
    return {"experiment": exp, "run": label, "metric": name, "ours": _fmt(vals),
            "paper": "-" if pub is None else str(pub), "diff": diff, "source": str(source), "status": status,
            "dir": where}


# ---------------------------------------------------------------------------------------------- output


RESULT_COLS = ("experiment", "run", "metric", "ours", "paper", "diff", "source", "status")
CLAIM_COLS = ("experiment", "claim", "measured", "status")


def to_markdown(results: list[dict], claims: list[dict], studies: list[dict], runs: list[dict],
                out_dir: Path | None, figures_dir: Path | None = None) -> str:
    def table(rs: list[dict], cols: tuple[str, ...]) -> str:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rs]
        return "\n".join(lines)

    parts = ["## Results beside the papers' numbers", "", table(results, RESULT_COLS), "",
             "## Claims", "", table(claims, CLAIM_COLS), ""]
    figs = []
    for s in studies:
        for f in s.get("figures", []):
            figs.append((s.get("experiment", ""), Path(s["dir"]) / f))
    for r in runs:
        for f in r.get("figures", []) or []:
            figs.append((r.get("experiment", ""), Path(r["dir"]) / f))
    if figs:
        parts += ["## Figures", ""]
        for exp, path in figs:
            if figures_dir is not None and path.exists():  # copy, so the report stands without the run dirs
                import shutil

                figures_dir.mkdir(parents=True, exist_ok=True)
                copy = figures_dir / f"{exp}_{path.name}"
                shutil.copyfile(path, copy)
                path = copy
            shown = Path(_relpath(path, out_dir)) if out_dir else path
            parts += [f"**{exp}**: `{path.name}`", "", f"![{exp} {path.stem}]({shown})", ""]
    return "\n".join(parts)


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def print_rich(results: list[dict], claims: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="Results beside the papers' numbers", show_lines=False)
    for c in RESULT_COLS:  # the long source line once per experiment, cut to one line (the markdown has it whole)
        t.add_column(c, **({"overflow": "ellipsis", "no_wrap": True, "max_width": 48} if c == "source" else {}))
    previous: dict[str, str] = {}
    for r in results:
        row = {c: str(r.get(c, "")) for c in RESULT_COLS}
        same = row.get("experiment") == previous.get("experiment")
        previous = row
        t.add_row(*("" if same and c in ("experiment", "source") else row[c] for c in RESULT_COLS))
    console.print(t)
    t = Table(title="Claims")
    for c in CLAIM_COLS:
        t.add_column(c, overflow="fold")
    colors = {"held": "green", "failed": "red", "unknown": "yellow"}
    for r in claims:
        st = r["status"]
        t.add_row(r["experiment"], r["claim"], r["measured"], f"[{colors.get(st, 'yellow')}]{st}[/]")
    console.print(t)
    held = sum(r["status"] == "held" for r in claims)
    console.print(f"{held}/{len(claims)} claims held")


START, END = "<!-- results:start -->", "<!-- results:end -->"


def replace_section(readme: Path, body: str) -> bool:
    """Replace what stands between README's results markers with `body`; False if the markers are missing."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    readme.write_text(pre + START + "\n" + body.replace("\n## ", "\n### ") + "\n" + END + post)
    return True


def report_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mlrun report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*",
                    help="run, multirun or parent dirs (default: outputs/, multirun/ and reproduce/)")
    ap.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    ap.add_argument("--out", help="write to this file (markdown embeds each study's figure)")
    ap.add_argument("--figures-dir", help="copy the embedded figures here (markdown), e.g. docs/results")
    ap.add_argument("--readme", help="also replace this README's Results section with the markdown report")
    args = ap.parse_args(argv)
    dirs = [Path(d) for d in (args.dirs or [d for d in DEFAULT_DIRS if Path(d).exists()])]
    missing = [d for d in dirs if not d.exists()]
    if missing:
        print(f"mlrun report: no such dir: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    runs, studies = find_records(dirs)
    results, claims = rows(runs, studies)
    out_path = Path(args.out) if args.out else None
    if args.format == "table" and out_path is None:
        if not results and not claims:
            print("mlrun report: no results.json or study.json under " + ", ".join(map(str, dirs)))
            return 0
        print_rich(results, claims)
        return 0
    fmt = args.format if args.format != "table" else "markdown"
    if fmt == "markdown":
        text = to_markdown(results, claims, studies, runs, out_path.parent if out_path else None,
                           Path(args.figures_dir) if args.figures_dir else None)
    elif fmt == "json":
        text = json.dumps({"results": results, "claims": claims}, indent=2)
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[*RESULT_COLS, "dir"], extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
        text = buf.getvalue()
    if out_path:
        from mlrun.records import write_atomic

        write_atomic(out_path, text)
        print(f"wrote {out_path}")
    else:
        print(text)
    if args.readme:
        import datetime
        import os
        import platform

        stamp = (f"Generated by `mlrun report {' '.join(argv)}` on "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
                 f"{os.cpu_count()} cores.\n\n")
        if fmt == "markdown":  # figure links relative to the README, not to --out
            text = to_markdown(results, claims, studies, runs, Path(args.readme).parent,
                               Path(args.figures_dir) if args.figures_dir else None)
        if not replace_section(Path(args.readme), stamp + text):
            print(f"mlrun report: {args.readme} has no {START} ... {END} section", file=sys.stderr)
            return 1
        print(f"updated {args.readme}")
    return 0


# ---------------------------------------------------------------------------------------------- ls


def experiment_info(name: str) -> dict[str, Any]:
    """What one experiment file says about itself, read as YAML (no composition, no torch)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(files("mlrun.conf").joinpath("experiment", f"{name}.yaml")))
    data = "-"
    for d in cfg.get("defaults") or []:
        if isinstance(d, str):
            continue
        for k, v in OmegaConf.to_container(d).items() if not isinstance(d, dict) else d.items():
            if "dataset" in k:
                data = v
    paper = cfg.get("paper") or {}
    return {"experiment": name, "paper": paper.get("title", "-"), "data": str(data),
            "scale": cfg.get("scale", "-"),
            "study": "yes" if cfg.get("study") is not None else (f"in {cfg.part_of}" if cfg.get("part_of") else "no")}


def last_wall_times(dirs: list[Path]) -> dict[str, float]:
    latest: dict[str, tuple[float, float]] = {}
    for d in dirs:
        for p in Path(d).rglob(STUDY):
            try:
                s = read_json(p)
                latest_key = s.get("experiment", "")
                mt = p.stat().st_mtime
                wall = s.get("elapsed_s") or s.get("wall_time_s")  # older studies: summed over runs
                if wall and (latest_key not in latest or latest[latest_key][0] < mt):
                    latest[latest_key] = (mt, float(wall))
            except (OSError, ValueError):
                continue
        for p in Path(d).rglob(RESULTS):
            if (p.parent.parent / STUDY).exists() or (p.parent.parent / "multirun.yaml").exists():
                continue  # one run of a study (finished or still running): the study's time counts
            try:
                r = read_json(p)
            except (OSError, ValueError):
                continue
            mt = p.stat().st_mtime
            k = r.get("experiment", "")
            if r.get("status") == "completed" and (k not in latest or latest[k][0] < mt):
                latest[k] = (mt, float(r.get("wall_time_s", 0)))
    return {k: v for k, (_, v) in latest.items()}


def ls_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mlrun ls", description="List the experiments.")
    ap.add_argument("--plain", action="store_true", help="names only, one a line")
    args = ap.parse_args(argv)
    from mlrun.cli import experiments

    names = experiments()
    if args.plain:
        print("\n".join(names))
        return 0
    walls = last_wall_times([Path(d) for d in DEFAULT_DIRS if Path(d).exists()])
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(names)} experiments")
    t.add_column("experiment", no_wrap=True)
    t.add_column("paper", overflow="ellipsis", no_wrap=True, max_width=30)  # titles are long; one line each
    t.add_column("data", overflow="ellipsis", no_wrap=True, max_width=18)
    for c in ("scale", "study", "last wall time"):
        t.add_column(c, no_wrap=True, min_width=len(c))
    for n in names:
        info = experiment_info(n)
        wall = walls.get(n)
        t.add_row(n, info["paper"], info["data"], info["scale"], info["study"], f"{wall:.0f} s" if wall else "-")
    Console().print(t)
    return 0


# ---------------------------------------------------------------------------------------------- sync


def sync_main(argv: list[str]) -> int:
    """Upload finished offline W&B runs with `wandb sync`: completed runs (with the earlier parts of a resumed
    one) and each study's own run; never a run that is still running or failed."""
    ap = argparse.ArgumentParser(prog="mlrun sync", description=sync_main.__doc__)
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--dry-run", action="store_true", help="list what would be uploaded (group, job type, artifacts)")
    args = ap.parse_args(argv)
    dirs = [Path(d) for d in (args.dirs or [d for d in DEFAULT_DIRS if Path(d).exists()])]
    todo: list[Path] = []
    for d in dirs:
        for p in sorted(Path(d).rglob(RESULTS)):
            if _finished_chain(p.parent):
                todo += sorted((p.parent / "wandb").glob("offline-run-*"))
        for p in sorted(Path(d).rglob(STUDY)):  # the study's own run (job_type study), logged once it is gathered
            todo += sorted((p.parent / "wandb").glob("offline-run-*"))
    todo = sorted(dict.fromkeys(todo), key=lambda p: (p.name, str(p)))  # offline-run-<start time>-<id>: in order
    if not todo:
        print("mlrun sync: no finished offline W&B runs found")
        return 0
    from mlrun.loggers import offline_run_info

    for run_dir in todo:
        line = f"{'would sync' if args.dry_run else 'syncing'} {run_dir}"
        try:
            info = offline_run_info(run_dir)
            arts = ", ".join(f"{a['name']}:{'/'.join(a['aliases'])}" for a in info["artifacts"]
                             if a["type"] != "run_table")
            line += f"  group={info['group'] or '-'} job_type={info['job_type'] or '-'}" + (
                f" artifacts={arts}" if arts else "")
        except Exception as e:  # noqa: BLE001 - the listing is a courtesy; wandb sync reads the file itself
            line += f"  (unreadable: {type(e).__name__})"
        print(line)
    if args.dry_run:
        return 0
    # One call: wandb sync uploads the parts of one run (a resumed run's) in order of their start time.
    return subprocess.run([sys.executable, "-m", "wandb", "sync", *map(str, todo)]).returncode


def _finished_chain(run_dir: Path) -> bool:
    """A completed run, or an earlier part of one (a run that `resume` continued into a completed run)."""
    seen: set[Path] = set()
    while run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        try:
            res = read_json(run_dir / RESULTS)
        except (OSError, ValueError):
            return False
        if res.get("status") == "completed":
            return not res.get("reused_from")  # a reused result has no W&B run of its own
        if not res.get("resumed_by"):
            return False
        run_dir = Path(res["resumed_by"])
    return False
