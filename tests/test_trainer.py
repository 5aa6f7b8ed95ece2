"""The shared trainer, proven with tiny tasks for each loop shape the papers need."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mlrun.loggers import Loggers
from mlrun.schema import LoggerConf, TrainerConf
from mlrun.task import DataModule, Task
from mlrun.trainer import NonFiniteLoss, ResumableBatchSampler, Trainer


class Tensors(DataModule):
    def __init__(self, n: int = 32, dim: int = 3, batch_size: int | None = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.arange(1.0, dim + 1) + 0.5
        self.batch_size = batch_size

    def dataset(self, split, stage=None):
        if split not in ("train", "val"):
            raise KeyError(split)
        return torch.utils.data.TensorDataset(self.x, self.y)


def make_trainer(tmp_path, **over) -> Trainer:
    cfg = OmegaConf.merge(OmegaConf.structured(TrainerConf), {"progress": "none", "log_every": 1, **over})
    loggers = Loggers(tmp_path, OmegaConf.structured(LoggerConf), {})
    return Trainer(cfg, torch.device("cpu"), tmp_path, loggers, seed=0)


class Regression(Task):
    def __init__(self, lr: float = 0.1, dim: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 1)
        self.lr = lr

    def configure_optimizers(self):
        return {"model": torch.optim.SGD(self.parameters(), lr=self.lr)}

    def training_step(self, batch):
        x, y = batch
        yield "model", ((self.lin(x).squeeze(1) - y) ** 2).mean()

    def evaluate(self, loader, split):
        return {"mse": sum(float(((self.lin(x).squeeze(1) - y) ** 2).sum()) for x, y in loader) / 32}


# ------------------------------------------------------------------------------------------ sampler


def test_sampler_resumes_mid_epoch_and_shards_without_overlap():
    full = list(ResumableBatchSampler(10, 2, True, seed=3))
    s = ResumableBatchSampler(10, 2, True, seed=3)
    s.set_position(0, 2)
    assert list(s) == full[2:]
    r0 = [i for b in ResumableBatchSampler(10, 5, True, 3, rank=0, world=2) for i in b]
    r1 = [i for b in ResumableBatchSampler(10, 5, True, 3, rank=1, world=2) for i in b]
    assert sorted(r0 + r1) == list(range(10))
    s.set_position(1, 0)
    assert list(s) != full  # a new epoch is a new permutation


# ------------------------------------------------------------------------------------------ one optimizer


def test_single_optimizer_learns_and_logs(tmp_path):
    torch.manual_seed(0)
    task, data = Regression(), Tensors()
    tr = make_trainer(tmp_path, max_steps=200)
    metrics = tr.fit(task, data, [{"name": "train"}])
    assert metrics["val/mse"] < 1e-3
    tr.loggers.flush()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and "train/model_loss" in rows[0] and rows[-1]["val/mse"] == metrics["val/mse"]


def test_accumulation_equals_the_large_batch(tmp_path):
    """Two micro-batches of 8 with accumulate=2 make the same update as one batch of 16 (mean losses)."""
    torch.manual_seed(0)
    a = Regression()
    b = Regression()
    b.load_state_dict(a.state_dict())
    data = Tensors(batch_size=8, n=48)
    make_trainer(tmp_path, max_steps=3, accumulate=2).fit(a, data, [{}])
    x, y = data.x, data.y
    order = [i for batch in ResumableBatchSampler(48, 8, True, seed=0) for i in batch]
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for s in range(3):
        idx = order[16 * s : 16 * (s + 1)]
        opt.zero_grad()
        ((b.lin(x[idx]).squeeze(1) - y[idx]) ** 2).mean().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_clipping_bounds_the_update(tmp_path):
    task = Regression(lr=1.0)
    before = [p.detach().clone() for p in task.parameters()]
    make_trainer(tmp_path, max_steps=1, clip_grad_norm=0.01).fit(task, Tensors(), [{}])
    delta = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(task.parameters(), before)))
    assert float(delta.detach()) == pytest.approx(0.01, rel=1e-4)


def test_scheduler_from_config(tmp_path):
    task = Regression()
    sched = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2, "gamma": 0.5}
    tr = make_trainer(tmp_path, max_steps=4, scheduler=sched)
    tr.fit(task, Tensors(), [{}])
    tr.loggers.flush()
    lrs = [json.loads(line)["lr/model"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "lr/model" in line]
    assert lrs == [0.1, 0.05, 0.05, 0.025]


# ------------------------------------------------------------------------------------------ two optimizers (GAN)


class TwoPlayers(Task):
    """d_loss = a, g_loss = a*b: the generator's loss reaches `a`, which must not leak into D's next step."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(2.0))

    def configure_optimizers(self):
        return {"discriminator": torch.optim.SGD([self.a], lr=0.1), "generator": torch.optim.SGD([self.b], lr=0.1)}

    def training_step(self, batch):
        yield "discriminator", self.a * 1.0
        yield "generator", self.a * self.b


def test_gan_losses_change_only_their_own_optimizer(tmp_path):
    task = TwoPlayers()
    make_trainer(tmp_path, max_steps=2).fit(task, Tensors(), [{}])
    a, b = 1.0, 2.0
    for _ in range(2):
        a = a - 0.1 * 1.0  # D steps first, on d_loss only
        b = b - 0.1 * a  # G sees the updated D
    assert float(task.a) == pytest.approx(a, abs=1e-7)
    assert float(task.b) == pytest.approx(b, abs=1e-7)


# ------------------------------------------------------------------------------------------ bi-level


class BiLevel(Task):
    """One inner SGD step by torch.func inside the step; the outer loss differentiates through it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -0.5]))

    def configure_optimizers(self):
        return {"meta": torch.optim.SGD([self.w], lr=0.1)}

    @staticmethod
    def inner_loss(w, x, y):
        return ((x @ w - y) ** 2).mean()

    def training_step(self, batch):
        x, y = batch
        x, y = x[:, :2], y
        g = torch.func.grad(self.inner_loss)(self.w, x, y)
        adapted = self.w - 0.05 * g
        yield "meta", self.inner_loss(adapted, x, y)


def test_bilevel_meta_gradient_matches_unrolled_autograd(tmp_path):
    task = BiLevel()
    data = Tensors(batch_size=32)
    w0 = task.w.detach().clone()
    make_trainer(tmp_path, max_steps=1).fit(task, data, [{}])
    x, y = data.x[:, :2], data.y  # batch 32 of 32: the permutation does not change a mean
    w = w0.clone().requires_grad_(True)
    inner = ((x @ w - y) ** 2).mean()
    (g,) = torch.autograd.grad(inner, w, create_graph=True)
    outer = ((x @ (w - 0.05 * g) - y) ** 2).mean()
    (mg,) = torch.autograd.grad(outer, w)
    torch.testing.assert_close(task.w.detach(), w0 - 0.1 * mg, rtol=1e-6, atol=1e-6)


class ManualGrad(Task):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def configure_optimizers(self):
        return {"meta": torch.optim.SGD([self.w], lr=1.0)}

    def training_step(self, batch):
        self.w.grad = torch.tensor([1.0, -2.0])
        yield "meta", None


def test_task_may_set_grad_itself_and_yield_none(tmp_path):
    task = ManualGrad()
    make_trainer(tmp_path, max_steps=2).fit(task, Tensors(), [{}])
    assert task.w.tolist() == [-2.0, 4.0]


# ------------------------------------------------------------------------------------------ stages


class TwoStages(Task):
    """Stage 'fit': closed-form least squares, a step that yields nothing. Stage 'tune': SGD from there."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.calls: list[str] = []

    def on_stage_start(self, stage, data):
        super().on_stage_start(stage, data)
        self.calls.append(stage)

    def configure_optimizers(self):
        return {"model": torch.optim.SGD(self.parameters(), lr=0.01)} if self.stage == "tune" else {}

    def training_step(self, batch):
        x, y = batch
        if self.stage == "fit":
            design = torch.cat([x, torch.ones(len(x), 1)], 1)
            sol = torch.linalg.lstsq(design, y[:, None]).solution.squeeze(1)
            with torch.no_grad():
                self.lin.weight.copy_(sol[:3][None])
                self.lin.bias.copy_(sol[3:])
            return
        yield "model", ((self.lin(x).squeeze(1) - y) ** 2).mean()

    def evaluate(self, loader, split):
        return {"mse": sum(float(((self.lin(x).squeeze(1) - y) ** 2).sum()) for x, y in loader) / 32}


def test_closed_form_stage_then_gradient_stage_in_order(tmp_path):
    task = TwoStages()
    data = Tensors(batch_size=None)
    data.batch_size = 32
    tr = make_trainer(tmp_path, max_steps=3)
    metrics = tr.fit(task, data, [{"name": "fit", "max_steps": 1}, {"name": "tune", "max_steps": 3}])
    assert task.calls == ["fit", "tune"]
    assert metrics["val/mse"] < 1e-8  # exact fit, and SGD at the optimum stays there
    assert tr.global_step == 4
    tr.loggers.flush()
    stages = [json.loads(line)["stage"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert stages[0] == "fit" and stages[-1] == "tune"


# ------------------------------------------------------------------------------------------ NaN guard


class Explodes(Regression):
    def training_step(self, batch):
        self._n = getattr(self, "_n", 0) + 1
        x, y = batch
        loss = ((self.lin(x).squeeze(1) - y) ** 2).mean()
        yield "model", loss * float("nan") if self._n == 5 else loss


def test_nan_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    task = Explodes()
    tr = make_trainer(tmp_path, max_steps=10, checkpoint_every=2)
    with pytest.raises(NonFiniteLoss, match=r"step 5 \(loss=nan\)"):
        tr.fit(task, Tensors(), [{}])
    state = Trainer.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["position"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_skip_option_drops_the_step(tmp_path):
    task = Explodes()
    tr = make_trainer(tmp_path, max_steps=10, on_nan="skip")
    tr.fit(task, Tensors(), [{}])
    assert tr.nonfinite_skipped == 1
    assert all(torch.isfinite(p).all() for p in task.parameters())


def test_same_seed_same_numbers(tmp_path):
    out = []
    for i in range(2):
        torch.manual_seed(0)
        task = Regression()
        out.append(make_trainer(tmp_path / str(i), max_steps=7).fit(task, Tensors(), [{}]))
    assert out[0] == out[1]
