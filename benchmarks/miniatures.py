"""The CPU miniatures' wall times, one line each, against the last recorded ones, so a regression shows.

    python benchmarks/miniatures.py reproduce/<stamp>            # after `mlrun reproduce`
    python benchmarks/miniatures.py reproduce/<stamp> --update   # make these the recorded baseline

Reads each experiment's elapsed time (`wall_times.json`, written by `mlrun reproduce`) and compares it with
`benchmarks/miniatures.json`; a time over 1.25x the baseline is flagged. Times depend on the
machine: compare only numbers from the same one (the JSON names it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

BASELINE = Path(__file__).with_name("miniatures.json")


def wall_times(root: Path) -> dict[str, float]:
    """Experiment -> elapsed seconds, from the `wall_times.json` that `mlrun reproduce` writes; for older folders,
    a study's summed run times (CPU-bound runs in parallel jobs: more than the elapsed time) or a run's own."""
    if (root / "wall_times.json").exists():
        return json.loads((root / "wall_times.json").read_text())["seconds"]
    out: dict[str, float] = {}
    for exp in sorted(p for p in root.iterdir() if p.is_dir()):
        study, result = exp / "study.json", exp / "results.json"
        if study.exists():
            data = json.loads(study.read_text())
            wall = data.get("wall_time_s") or sum(r.get("wall_time_s") or 0 for r in data.get("runs", []))
        elif result.exists():
            wall = json.loads(result.read_text()).get("wall_time_s")
        else:
            continue
        if wall:
            out[exp.name] = float(wall)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="a `mlrun reproduce` folder: one subfolder per experiment")
    ap.add_argument("--update", action="store_true", help="record these times as the baseline")
    args = ap.parse_args()
    walls = wall_times(args.root)
    base = json.loads(BASELINE.read_text()) if BASELINE.exists() else {"times": {}}
    print(f"{'experiment':28s} {'now':>8s} {'recorded':>9s}  ratio")
    for name, wall in walls.items():
        ref = base["times"].get(name)
        ratio = f"{wall / ref:5.2f}{'  SLOWER' if wall > 1.25 * ref else ''}" if ref else "    -"
        print(f"{name:28s} {wall:7.0f}s {f'{ref:.0f}s' if ref else '-':>9s}  {ratio}")
    print(f"{'total':28s} {sum(walls.values()) / 60:6.1f}m")
    if args.update:
        BASELINE.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "source": str(args.root),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "times": walls}, indent=1) + "\n")
        print(f"recorded in {BASELINE}")


if __name__ == "__main__":
    main()
