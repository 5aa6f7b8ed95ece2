"""Torch intra-op threads for a CPU miniature: 1 (mlrun's default at CPU scale) against torch's default.

Runs `mlrun experiment=digits_classifier` (the README's first command) in subprocesses, alternating
the two settings round by round, on an idle machine and again with the cores busy (one spinning process per core,
as when other work shares the machine). Prints the median wall time of each and the ratio.

    python benchmarks/threads.py --rounds 5 --steps 600
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(threads: int | None, steps: int, where: Path) -> float:
    exe = str(Path(sys.executable).with_name("mlrun"))
    args = [exe, "experiment=digits_classifier", "logger=none", "trainer.progress=none", f"trainer.max_steps={steps}",
            f"hydra.run.dir={where}"]
    if threads is not None:
        args.append(f"hardware.threads={threads}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t = time.perf_counter()
    subprocess.run(args, env={**env, "WANDB_MODE": "disabled"}, check=True, capture_output=True)
    return time.perf_counter() - t


def spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    import torch

    default = torch.get_num_threads()
    print(f"torch's default here: {default} threads; {os.cpu_count()} cores")
    for load in ("idle", "loaded"):
        busy = spinners(os.cpu_count() or 2) if load == "loaded" else []
        try:
            times: dict[str, list[float]] = {"1 thread": [], f"{default} threads (torch default)": []}
            with tempfile.TemporaryDirectory() as d:
                for r in range(args.rounds):
                    for name, threads in (("1 thread", 1), (f"{default} threads (torch default)", default)):
                        times[name].append(one_run(threads, args.steps, Path(d) / f"{r}_{threads}"))
        finally:
            for p in busy:
                p.kill()
        one, many = (statistics.median(v) for v in times.values())
        for name, v in times.items():
            print(f"{load:6s} {name:28s} median {statistics.median(v):6.2f} s  rounds "
                  + " ".join(f"{x:.1f}" for x in v))
        print(f"{load:6s} torch default / 1 thread = {many / one:.2f}x")


if __name__ == "__main__":
    main()
