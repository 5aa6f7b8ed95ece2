"""Start-up time: `mlrun --help`, `mlrun report`, `mlrun ls` against a Hydra app that imports torch at the top
(the usual template layout) and against `import lightning`. Median of N runs of each, in one script.

    python benchmarks/startup.py [--runs 5] [--records reproduce/<stamp>]

`--records` also times `mlrun report` over real records (say, a `mlrun reproduce` folder: about 150 runs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE_APP = '''
import torch  # noqa: F401  (the usual layout: heavy imports at module level)
import hydra

@hydra.main(version_base=None, config_path=None)
def main(cfg):
    pass

if __name__ == "__main__":
    main()
'''


def timed(cmd: list[str], runs: int, cwd: str) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--records", help="a folder of run records to time `mlrun report` on")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("mlrun"))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "template_app.py").write_text(TEMPLATE_APP)
        rows = {
            "mlrun --help": timed([exe, "--help"], args.runs, d),
            "mlrun ls --plain": timed([exe, "ls", "--plain"], args.runs, d),
            "mlrun report (empty)": timed([exe, "report", d], args.runs, d),
        }
        if args.records:
            records = Path(args.records).resolve()
            n = sum(1 for _ in records.rglob("results.json"))
            rows[f"mlrun report ({n} runs)"] = timed([exe, "report", str(records)], args.runs, d)
        rows |= {
            "hydra app importing torch, --help": timed([sys.executable, "template_app.py", "--help"], args.runs, d),
        }
        lt = subprocess.run([sys.executable, "-c", "import lightning"], capture_output=True)
        if lt.returncode == 0:
            rows["python -c 'import lightning'"] = timed([sys.executable, "-c", "import lightning"], args.runs, d)
    base = rows["mlrun --help"]
    for k, v in rows.items():
        print(f"{k:38s} {v:6.3f} s   ({v / base:4.1f}x mlrun --help)")


if __name__ == "__main__":
    main()
