"""`mlrun report`, `mlrun ls`, `mlrun sync`: read records, never torch.

`report` gathers every results.json and study.json under the given dirs (default: outputs/, multirun/ and
reproduce/) and sets ours beside the paper's value, counting each (experiment, condition, config, seed) once:

- a condition is an experiment's label (a study's arm; `run` for a single run). Its runs are grouped by their
  config digest without the seed; the newest config wins and runs of older configs of the condition (another
  `max_steps`, say) are *superseded*: not counted, listed by `--all`.
- Within the winning config each seed counts once (an original over a `resume=auto` copy, then the newest).
- Not counted, listed by `--all`: runs of a `debug=` preset, eval-only runs, `resume=auto` copies whose original
  is among the records, runs superseded by the run that resumed them. Failed, interrupted and unfinished runs are
  always listed.
- A study's claims come from its study.json (paired by seed, see `mlrun.claims`); a study whose seeds are a subset
  of a newer study's of the same experiment (a relaunch) is superseded. A confirmation on fresh seeds is its own
  row. Each run's own claims are aggregated over the counted seeds with the same rules.

The spread shown is `mean ± std over n seeds` (n = counted seeds). A malformed record is skipped with one warning
naming its file; every string taken from a record is escaped for the output format.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlrun import claims as claims_mod
from mlrun.records import RESULTS, STUDY, read_json

DEFAULT_DIRS = ("outputs", "multirun", "reproduce")  # single runs, multiruns, `mlrun reproduce`
SPREAD = "mean ± std over n seeds"
FAILURES = ("failed", "interrupted", "running", "unknown status")


# ---------------------------------------------------------------------------------------------- reading


def find_records(dirs: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(runs, studies, warnings) under dirs. Runs inside a study's sweep dir are runs too (`study_dir` set)."""
    runs, studies, warnings = [], [], []
    seen: set[Path] = set()
    for d in dirs:
        for p in sorted(Path(d).rglob(STUDY)):
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            s = _load(p, warnings)
            if s is None:
                continue
            s["dir"], s["_mtime"] = str(p.parent), p.stat().st_mtime
            studies.append(s)
    study_dirs = {Path(s["dir"]).resolve() for s in studies}
    for d in dirs:
        for p in sorted(Path(d).rglob(RESULTS)):
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            r = _load(p, warnings)
            if r is None:
                continue
            r["dir"], r["_mtime"] = str(p.parent), p.stat().st_mtime
            if p.parent.parent.resolve() in study_dirs:
                r["study_dir"] = str(p.parent.parent)
            runs.append(r)
    return runs, studies, warnings


def _load(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    """A record as a dict with the types the report reads, or None (and a warning) if it is malformed."""
    try:
        rec = read_json(path)
    except (OSError, ValueError, RecursionError) as e:
        warnings.append(f"skipped {path}: unreadable ({type(e).__name__})")
        return None
    if not isinstance(rec, dict):
        warnings.append(f"skipped {path}: not a JSON object")
        return None
    expected = {"metrics": dict, "paper": dict, "claims": list, "derived": dict, "derived_per_seed": dict,
                "runs": list, "figures": list, "groups": dict}
    for key, kind in expected.items():
        if key in rec and not isinstance(rec[key], kind):
            warnings.append(f"skipped {path}: '{key}' is not a {kind.__name__}")
            return None
    for key in ("experiment", "label", "status"):
        if key in rec and not isinstance(rec[key], str):
            rec[key] = str(rec[key])
    if not isinstance(rec.get("seed"), int) or isinstance(rec.get("seed"), bool):
        rec["seed"] = None
    return rec


# ---------------------------------------------------------------------------------------------- counting


def _when(r: dict[str, Any]) -> str:
    return f"{r.get('finished_at') or ''}|{r.get('_mtime', 0):020.6f}"


def select(runs: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], list[dict]], list[dict[str, Any]]]:
    """(counted runs per (experiment, label), runs not counted with `reason`), as the module docstring says."""
    dirs = {str(Path(r["dir"]).resolve()) for r in runs}
    by_dir = {str(Path(r["dir"]).resolve()): r for r in runs}

    def continued(r: dict[str, Any]) -> bool:
        """Resumed by a run that trains on (an eval-only or debug run that read its checkpoint replaces nothing)."""
        nxt = by_dir.get(str(Path(str(r["resumed_by"])).resolve()))
        return nxt is None or not (nxt.get("eval_only") or nxt.get("debug"))

    excluded: list[dict[str, Any]] = []
    candidates: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        reason = None
        if r.get("debug"):
            reason = "debug preset"
        elif r.get("eval_only"):
            reason = "eval-only"
        elif r.get("resumed_by") and continued(r):
            reason = "superseded by the run that resumed it"
        elif r.get("reused_from") and str(Path(str(r["reused_from"])).resolve()) in dirs:
            reason = "resume=auto copy of a run counted on its own"
        elif r.get("status") != "completed":
            reason = str(r.get("status") or "unknown status")
        if reason:
            excluded.append(dict(r, reason=reason))
        else:
            candidates[(r.get("experiment") or "?", r.get("label") or "run")].append(r)
    counted: dict[tuple[str, str], list[dict]] = {}
    for key, rs in candidates.items():
        by_config: dict[Any, list[dict]] = defaultdict(list)
        for r in rs:
            by_config[r.get("config_digest_noseed")].append(r)
        newest = max(by_config, key=lambda k: max(_when(r) for r in by_config[k]))
        for digest, group in by_config.items():
            if digest != newest:
                excluded += [dict(r, reason=f"superseded config ({digest or 'no digest'})") for r in group]
        by_seed: dict[Any, list[dict]] = defaultdict(list)
        for r in by_config[newest]:
            by_seed[r.get("seed") if r.get("seed") is not None else r["dir"]].append(r)
        keep = []
        for seed, group in by_seed.items():
            group.sort(key=lambda r: (not r.get("reused_from"), _when(r)), reverse=True)
            keep.append(group[0])
            excluded += [dict(r, reason=f"another run of seed {seed}") for r in group[1:]]
        counted[key] = sorted(keep, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
    # a failure is news unless a counted run of the same condition and seed replaced it
    done = {(k[0], k[1], r.get("seed")) for k, rs in counted.items() for r in rs}
    for e in excluded:
        again = (e.get("experiment") or "?", e.get("label") or "run", e.get("seed")) in done
        e["listed"] = e["reason"] in FAILURES and not again
    return counted, excluded


def select_studies(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The studies to show: per experiment, drop any whose seeds are a subset of a newer study's."""
    shown = []
    by_exp: dict[str, list[dict]] = defaultdict(list)
    for s in studies:
        by_exp[str(s.get("experiment") or Path(s["dir"]).name)].append(s)
    for exp, ss in by_exp.items():
        ss.sort(key=lambda s: s["_mtime"], reverse=True)
        kept: list[dict] = []
        for s in ss:
            seeds = set(_seeds_of(s))
            if any(seeds <= set(_seeds_of(k)) for k in kept):
                continue
            kept.append(s)
        shown += [dict(s, experiment=exp) for s in kept]
    return sorted(shown, key=lambda s: (s["experiment"], min(_seeds_of(s), default=0)))


def _seeds_of(study: dict[str, Any]) -> list[int]:
    seeds = study.get("seeds")
    if not isinstance(seeds, list):
        seeds = [r.get("seed") for r in study.get("runs", []) if isinstance(r, dict) and r.get("status") == "completed"]
    return sorted({s for s in seeds if isinstance(s, int) and not isinstance(s, bool)})


def seed_text(seeds: list[int]) -> str:
    """0-4, or 0, 2, 5."""
    if not seeds:
        return "-"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


# ---------------------------------------------------------------------------------------------- rows


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
    metrics = paper.get("metrics") if isinstance(paper, dict) else None
    for name, spec in (metrics if isinstance(metrics, dict) else {}).items():
        out[str(name)] = dict(spec) if isinstance(spec, dict) else {"value": spec}
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _values(runs: list[dict], metric: str) -> list[float]:
    return [v for r in runs if (v := _number((r.get("metrics") or {}).get(metric))) is not None]


def rows(runs: list[dict[str, Any]], studies: list[dict[str, Any]], detail: bool = False
         ) -> tuple[list[dict], list[dict], list[dict]]:
    """(result rows, claim rows, runs not counted) for every experiment found."""
    counted, excluded = select(runs)
    shown = select_studies(studies)
    results: list[dict] = []
    claims: list[dict] = []
    experiments = sorted({e for e, _ in counted} | {s["experiment"] for s in shown})
    for exp in experiments:
        labels = sorted(label for e, label in counted if e == exp)
        mine = [s for s in shown if s["experiment"] == exp]
        newest = max([r for label in labels for r in counted[(exp, label)]] + mine, key=lambda r: r["_mtime"])
        paper = newest.get("paper") if isinstance(newest.get("paper"), dict) else {}
        specs = _paper_metrics(paper)
        derived: dict[str, list[float]] = defaultdict(list)  # per seed, over the shown studies (disjoint seeds)
        for s in mine:
            for per_seed in (s.get("derived_per_seed") or {}).values():
                for k, v in (per_seed if isinstance(per_seed, dict) else {}).items():
                    if (f := _number(v)) is not None:
                        derived[str(k)].append(f)
        used: set[str] = set()
        for name, spec in specs.items():
            label, metric = spec.get("run"), str(spec.get("metric", name))
            if label is not None:
                vals = _values(counted.get((exp, str(label)), []), metric)
                results.append(_row(exp, str(label), name, vals, spec, paper))
            elif metric in derived:
                used.add(metric)
                results.append(_row(exp, "study", name, derived[metric], spec, paper))
            else:
                having = [lb for lb in labels if _values(counted[(exp, lb)], metric)]
                for lb in having or ["-"]:
                    results.append(_row(exp, lb, name, _values(counted.get((exp, lb), []), metric), spec, paper))
        for name in sorted(derived):
            if name not in used:
                results.append(_row(exp, "study", name, derived[name], {}, paper))
        if detail or not (specs or derived):
            for lb in labels:
                names = sorted({k for r in counted[(exp, lb)] for k in (r.get("metrics") or {})
                                if str(k).startswith("test/")})
                for name in names:
                    if not any(r["run"] == lb and r["metric"] == name for r in results if r["experiment"] == exp):
                        results.append(_row(exp, lb, name, _values(counted[(exp, lb)], name), {}, paper))
        for s in mine:
            seeds = seed_text(_seeds_of(s))
            for c in s.get("claims") or []:
                if isinstance(c, dict) and "name" in c:
                    claims.append(_claim_row(exp, seeds, str(c["name"]), c))
        for lb in labels:
            per_seed = {r.get("seed") if r.get("seed") is not None else i: r.get("claims") or []
                        for i, r in enumerate(counted[(exp, lb)]) if isinstance(r.get("claims"), list)}
            seeds = seed_text(sorted(s for s in per_seed if isinstance(s, int)))
            for c in claims_mod.aggregate_run_claims(per_seed):
                name = c["name"] if lb == "run" else f"{c['name']} ({lb})"
                claims.append(_claim_row(exp, seeds, name, c))
    return results, claims, excluded


def _row(exp: str, label: str, name: str, vals: list[float], spec: dict, paper: dict) -> dict[str, Any]:
    pub = _number(spec.get("value"))
    diff = f"{statistics.fmean(vals) - pub:+.4g}" if vals and pub is not None else "-"
    source = spec.get("table") or paper.get("table") or ""
    return {"experiment": exp, "run": label, "metric": name, "ours": _fmt(vals) if vals else "no value",
            "paper": "-" if spec.get("value") is None else str(spec.get("value")), "diff": diff,
            "source": str(source), "n": len(vals), "values": vals}


def _claim_row(exp: str, seeds: str, name: str, c: dict[str, Any]) -> dict[str, Any]:
    return {"experiment": exp, "seeds": seeds, "claim": name, "measured": claims_mod.measured_text(c),
            "status": claims_mod.count_text(c), "outcome": str(c.get("status", "unknown")),
            "per_seed": c.get("per_seed") or []}


# ---------------------------------------------------------------------------------------------- escaping

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def plain(value: Any, limit: int = 400) -> str:
    """One line of text with no control characters (ANSI escapes, newlines, bidi overrides), at most `limit`."""
    text = _CONTROL.sub(" ", str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


_MD = re.compile(r"([\\`*\[\]<!|~])")


def md(value: Any) -> str:
    """A record's string made inert in markdown/HTML: no markup, no links, no images, no table breaks."""
    return _MD.sub(r"\\\1", plain(value).replace("&", "&amp;"))


def safe_name(value: Any) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", plain(value, 100)).lstrip("._-")
    return name or "figure"


# ---------------------------------------------------------------------------------------------- output


RESULT_COLS = ("experiment", "run", "metric", "ours", "paper", "diff", "source")
CLAIM_COLS = ("experiment", "seeds", "claim", "measured", "status")


def figures_of(runs: list[dict[str, Any]], studies: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    """(experiment, figure path) for the shown studies and for single runs not in a study (the newest run of
    each condition), each a regular file inside its record's folder."""
    counted, _ = select(runs)
    out = []
    for s in select_studies(studies):
        out += [(s["experiment"], p) for p in _inside(Path(s["dir"]), s.get("figures") or [])]
    for (exp, _), rs in sorted(counted.items()):
        lone = [r for r in rs if not r.get("study_dir")]
        if lone:
            r = max(lone, key=lambda r: r["_mtime"])
            out += [(exp, p) for p in _inside(Path(r["dir"]), r.get("figures") or [])]
    return out


def _inside(folder: Path, names: list[Any]) -> list[Path]:
    root = folder.resolve()
    out = []
    for name in names:
        if not isinstance(name, str):
            continue
        path = (folder / name).resolve()
        if path.is_relative_to(root) and path.is_file() and path != root:
            out.append(path)
    return out


def to_markdown(results: list[dict], claims: list[dict], figures: list[tuple[str, Path]],
                out_dir: Path | None, figures_dir: Path | None = None) -> str:
    def table(rs: list[dict], cols: tuple[str, ...]) -> str:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(md(r.get(c, "")) for c in cols) + " |" for r in rs]
        return "\n".join(lines)

    parts = ["## Results beside the papers' numbers", "",
             f"ours: {SPREAD}; each run counted once per condition, config and seed.", "",
             table(results, RESULT_COLS), "",
             "## Claims", "",
             "Paired by seed: `held` when the median paired value meets the threshold and at least 80% of seeds "
             "hold (4/5), `fragile` when the median holds with fewer seeds, `failed` when it does not.", "",
             table(claims, CLAIM_COLS), ""]
    if figures:
        parts += ["## Figures", ""]
        for exp, path in figures:
            if figures_dir is not None:  # copy, so the report stands without the run dirs
                import shutil

                figures_dir.mkdir(parents=True, exist_ok=True)
                copy = figures_dir / f"{safe_name(exp)}_{safe_name(path.name)}"
                shutil.copyfile(path, copy)
                path = copy
            shown = Path(_relpath(path, out_dir)) if out_dir else path
            link = "/".join(safe_name(p) if p not in ("..", ".") else p for p in shown.parts)
            parts += [f"**{md(exp)}**: `{safe_name(path.name)}`", "", f"![{md(exp)} {safe_name(path.stem)}]({link})",
                      ""]
    return "\n".join(parts)


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


COLORS = {"held": "green", "fragile": "yellow", "failed": "red", "unknown": "magenta"}


def print_rich(results: list[dict], claims: list[dict], excluded: list[dict], detail: bool = False,
               show_all: bool = False, console: Any = None) -> None:
    """Per experiment: its source, a results table (run, metric, ours, paper, diff), then its claims, each
    status with the count of seeds that held and the median paired value; readable at 80 columns."""
    from rich import box
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    console.print(Text(f"Results beside the papers' numbers (ours: {SPREAD})", style="bold"))
    for exp in sorted({r["experiment"] for r in results} | {c["experiment"] for c in claims}):
        console.print()
        console.print(Text(plain(exp), style="bold cyan"))
        sources = sorted({r["source"] for r in results if r["experiment"] == exp and r["source"] not in ("", "-")})
        for src in sources:
            console.print(Padding(Text(plain(src), style="dim"), (0, 0, 0, 2)))
        mine = [r for r in results if r["experiment"] == exp]
        if mine:
            t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
            for col in ("run", "metric", "ours", "paper", "diff"):
                t.add_column(col, overflow="fold")
            for r in mine:
                t.add_row(*(Text(plain(r[c], 120)) for c in ("run", "metric", "ours", "paper", "diff")))
            console.print(t)
        grid = Table.grid(padding=(0, 1), pad_edge=True)
        grid.add_column(no_wrap=True, min_width=12)
        grid.add_column(overflow="fold")
        for c in (c for c in claims if c["experiment"] == exp):
            seeds = f"  [seeds {c['seeds']}]" if c["seeds"] != "-" else ""
            grid.add_row(Text(c["status"], style=COLORS.get(c["outcome"], "yellow")), Text(plain(c["claim"]) + seeds))
            grid.add_row("", Text(plain(c["measured"], 300), style="dim"))
            if detail:
                for p in c["per_seed"]:
                    held = "held" if p.get("held") else "not held"
                    grid.add_row("", Text(f"seed {p.get('seed')}: lhs {claims_mod.number_text(p.get('lhs'))}  "
                                          f"rhs {claims_mod.number_text(p.get('rhs'))}  {held}", style="dim"))
        if grid.row_count:
            console.print(Padding(grid, (0, 0, 0, 1)))
    listed = [e for e in excluded if show_all or e.get("listed")]
    if listed:
        console.print()
        console.print(Text("Runs not counted" + ("" if show_all else " (failed, interrupted or unfinished)"),
                           style="bold"))
        for e in listed:
            console.print(Text(f"  {plain(e.get('experiment', '?'))} {plain(e.get('label', 'run'))} "
                               f"seed {e.get('seed')}: {plain(e['reason'])}"
                               + (f": {plain(e.get('error'), 120)}" if e.get("error") else "")))
            console.print(Text(f"    {plain(e['dir'])}", style="dim"))
    hidden = len(excluded) - len(listed)
    console.print()
    console.print(Text(_totals(claims) + (f"; {hidden} runs not counted (--all lists them)" if hidden else "")))


def _totals(claims: list[dict]) -> str:
    n = {k: sum(c["outcome"] == k for c in claims) for k in ("held", "fragile", "failed", "unknown")}
    return (f"{n['held']}/{len(claims)} claims held, {n['fragile']} fragile, {n['failed']} failed, "
            f"{n['unknown']} unknown")


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
    ap.add_argument("--detail", action="store_true",
                    help="every claim's per-seed values and every condition's test metrics")
    ap.add_argument("--all", action="store_true", help="also list the runs not counted, with the reason")
    args = ap.parse_args(argv)
    dirs = [Path(d) for d in (args.dirs or [d for d in DEFAULT_DIRS if Path(d).exists()])]
    missing = [d for d in dirs if not d.exists()]
    if missing:
        print(f"mlrun report: no such dir: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    runs, studies, warnings = find_records(dirs)
    for w in warnings:
        print(f"mlrun report: warning: {plain(w)}", file=sys.stderr)
    results, claims, excluded = rows(runs, studies, detail=args.detail)
    out_path = Path(args.out) if args.out else None
    if args.format == "table" and out_path is None:
        if not results and not claims and not excluded:
            print("mlrun report: no results.json or study.json under " + ", ".join(map(str, dirs)))
            return 0
        print_rich(results, claims, excluded, detail=args.detail, show_all=args.all)
        return 0
    fmt = args.format if args.format != "table" else "markdown"
    figures_dir = Path(args.figures_dir) if args.figures_dir else None
    if fmt == "markdown":
        text = to_markdown(results, claims, figures_of(runs, studies), out_path.parent if out_path else None,
                           figures_dir)
    elif fmt == "json":
        text = json.dumps({"spread": SPREAD, "results": results, "claims": claims,
                           "not_counted": [{k: e.get(k) for k in ("experiment", "label", "seed", "dir", "reason",
                                                                    "error")} for e in excluded]}, indent=2)
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[*RESULT_COLS, "n"], extrasaction="ignore")
        w.writeheader()
        w.writerows({k: plain(v) for k, v in r.items()} for r in results)
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

        stamp = (f"Generated by `mlrun report {' '.join(map(plain, argv))}` on "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
                 f"{os.cpu_count()} cores.\n\n")
        if fmt == "markdown":  # figure links relative to the README, not to --out
            text = to_markdown(results, claims, figures_of(runs, studies), Path(args.readme).parent, figures_dir)
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
    from rich.text import Text

    infos = [experiment_info(n) for n in names]
    console = Console()
    console.print(Text(f"{len(names)} experiments, by paper", style="bold"))
    width = max(len(n) for n in names) + 2
    cols = (("experiment", width), ("scale", 6), ("data", 23), ("study", 14), ("wall", 7))

    def grid() -> Table:  # the same column widths in every paper's block, one line per experiment
        g = Table.grid(padding=(0, 1))
        for name, w in cols:
            g.add_column(no_wrap=name == "experiment", width=w, overflow="fold")
        return g

    head = grid()
    head.add_row(*(Text(name, style="bold") for name, _ in cols))
    console.print(head)
    for paper in sorted({i["paper"] for i in infos}, key=lambda p: (p == "-", str(p))):
        console.print(Text(str(paper), style="bold cyan"))
        g = grid()
        for i in (i for i in infos if i["paper"] == paper):
            wall = walls.get(i["experiment"])
            g.add_row("  " + i["experiment"], str(i["scale"]), str(i["data"]), str(i["study"]),
                      f"{wall:.0f} s" if wall else "-")
        console.print(g)
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
    if not wandb_logged_in():
        print(f"mlrun sync: {len(todo)} finished offline W&B run(s) wait, but this machine has no W&B login: "
              "run `wandb login` (or set WANDB_API_KEY), then `mlrun sync` again", file=sys.stderr)
        return 1
    # One call: wandb sync uploads the parts of one run (a resumed run's) in order of their start time.
    return subprocess.run([sys.executable, "-m", "wandb", "sync", *map(str, todo)]).returncode


def wandb_logged_in() -> bool:
    """Whether `wandb sync` has credentials: WANDB_API_KEY, or the netrc entry `wandb login` writes for the host."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


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
