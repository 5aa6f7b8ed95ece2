"""Time per step: mlrun's shared trainer vs a hand-written PyTorch loop (and PyTorch Lightning if installed),
same model, data, batch and seed, in one process, alternating rounds so machine noise hits all alike.

    python benchmarks/trainer_overhead.py [--steps 400] [--rounds 5] [--threads 1]

Prints the median step time of each and the ratios (goal: trainer/hand <= 1.03, faster than Lightning).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mlrun.datasets.digits import Digits
from mlrun.loggers import Loggers
from mlrun.models.classifier import Classifier, SmallCNN
from mlrun.schema import LoggerConf, TrainerConf
from mlrun.trainer import ResumableBatchSampler, Trainer


def make_task(seed: int) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(SmallCNN(), lambda p: torch.optim.Adam(p, lr=2e-3))


def hand_loop(data: Digits, steps: int) -> float:
    task = make_task(0)
    opt = task.configure_optimizers()["model"]
    ds = data.dataset("train")
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), 64, True, 0))
    t, done = time.perf_counter(), 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(task.net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - t) / steps


def mlrun_trainer(data: Digits, steps: int) -> float:
    task = make_task(0)
    with tempfile.TemporaryDirectory() as d:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainerConf),
                              {"max_steps": steps, "log_every": 50, "progress": "none", "deterministic": False})
        tr = Trainer(cfg, torch.device("cpu"), Path(d), Loggers(Path(d), OmegaConf.structured(LoggerConf), {}), 0)
        t = time.perf_counter()
        tr.fit(task, _NoEval(data), [{"name": "train"}])
        elapsed = time.perf_counter() - t
    return elapsed / steps


class _NoEval:
    """The same data without val/test splits, so only training steps are timed (checkpoint at the end excepted)."""

    def __init__(self, data: Digits) -> None:
        self.data = data
        self.batch_size, self.eval_batch_size, self.shuffle, self.drop_last = 64, 512, True, True
        self.collate = torch.utils.data.default_collate

    def dataset(self, split, stage=None):
        if split != "train":
            raise KeyError(split)
        return self.data.dataset("train")


def lightning_loop(data: Digits, steps: int) -> float | None:
    try:
        import lightning as L
    except ImportError:
        return None

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.task = make_task(0)

        def training_step(self, batch, i):
            x, y = batch
            loss = F.cross_entropy(self.task.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=2e-3)

    ds = data.dataset("train")
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, drop_last=True)
    with tempfile.TemporaryDirectory() as d:
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=d)
        t = time.perf_counter()
        trainer.fit(Module(), loader)
        return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Digits(batch_size=64)
    times: dict[str, list[float]] = {"hand": [], "mlrun": [], "lightning": []}
    loops = {"hand": hand_loop, "mlrun": mlrun_trainer, "lightning": lightning_loop}
    hand_loop(data, 50)  # warm-up
    for r in range(args.rounds):
        for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):  # alternate the order: drift hits all alike
            t = loops[name](data, args.steps)
            if t is not None:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    for k, v in med.items():
        print(f"{k:10s} {v * 1e3:.3f} ms/step  (rounds: {', '.join(f'{t * 1e3:.3f}' for t in times[k])})")
    print(f"mlrun / hand      = {med['mlrun'] / med['hand']:.3f}  (goal <= 1.03)")
    paired = [m / h for m, h in zip(times["mlrun"], times["hand"])]
    print(f"  per round: median {statistics.median(paired):.3f}, range {min(paired):.3f}-{max(paired):.3f}")
    if "lightning" in med:
        print(f"lightning / hand  = {med['lightning'] / med['hand']:.3f}")
        print(f"mlrun / lightning = {med['mlrun'] / med['lightning']:.3f}  (goal < 1)")


if __name__ == "__main__":
    main()
