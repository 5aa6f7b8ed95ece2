"""Test accuracy of meta-trained θ's under several test-time adaptations (the θ table of docs/papers/imaml.md).

Reads each finished run of a meta-learning sweep (its resolved config and last checkpoint), rebuilds its learner
and test episodes, and scores the same θ under each adaptation: the shared one the study uses, the proximal one
iMAML trained with, and the authors' (iMAML: λ = 0, 16 steps at 0.1; MAML: 10 steps at its inner lr). Evaluation
only: nothing is trained, nothing chosen.

    python benchmarks/meta_adaptation.py multirun/meta_digits            # one row per run, then medians per label
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

ADAPTATIONS = {  # name -> (steps, lr, lam)
    "prox_lam2_10x0.1": (10, 0.1, 2.0),
    "sgd_10x0.1": (10, 0.1, 0.0),
    "sgd_16x0.1": (16, 0.1, 0.0),
    "sgd_5x0.4": (5, 0.4, 0.0),
    "sgd_10x0.4": (10, 0.4, 0.0),
}


def score_run(run_dir: Path, adaptations: dict[str, tuple[int, float, float]]) -> dict[str, float]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mlrun.trainer import Trainer

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    torch.manual_seed(int(cfg.seed))
    data = instantiate(cfg.dataset, _convert_="object")
    task = instantiate(cfg.model, _convert_="object")
    path = run_dir / "checkpoints" / "last.pt"
    Trainer.restore_model(task, Trainer.load_checkpoint(path), path)
    task.eval()
    task.test_adaptations = dict(adaptations)
    task._probe = None  # no memory sweep
    with torch.no_grad():
        out = task.evaluate(data.dataset("test"), "test")
    return {name: out[f"acc_{name}"] for name in adaptations} | {"shared": out["acc"], "pixels": out["pixel_acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for sweep in args.sweep_dirs:
        for res in sorted(sweep.glob("*/results.json")):
            r = json.loads(res.read_text())
            if r.get("status") != "completed":
                continue
            scores = score_run(res.parent, ADAPTATIONS)
            rows.append({"label": r["label"], "seed": r["seed"], **scores})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    cols = ["shared", *ADAPTATIONS, "pixels"]
    print("\n| θ (median of seeds) | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label in sorted({r["label"] for r in rows}):
        mine = [r for r in rows if r["label"] == label]
        cells = [f"{100 * statistics.median(r[c] for r in mine):.2f}" for c in cols]
        print(f"| {label} (n={len(mine)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
