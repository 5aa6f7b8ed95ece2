"""The one small interface between a paper's code and the shared trainer.

A paper's model is a `torch.nn.Module` that subclasses `Task`. The trainer owns backward, optimizer
steps, AMP, accumulation, clipping, gradient sync across ranks, checkpoints and records; the task says
what a step computes:

- supervised / likelihood:  ``yield "model", loss``
- GAN:                      ``yield "discriminator", d_loss; yield "generator", g_loss``
- bi-level meta-learning:   the inner loop runs inside the step; ``yield "meta", outer_loss``, or set
                            ``.grad`` yourself and ``yield "meta", None`` to just step
- closed-form or scikit-learn fits: a step that yields nothing

A loss yielded for optimizer X changes only X's gradients, so a GAN's generator loss never leaks into
the discriminator's next step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class Task(nn.Module):
    """Base class with the optional hooks' defaults. Subclasses implement `training_step`."""

    stage: str = "train"
    stage_args: dict[str, Any] = {}  # noqa: RUF012 - replaced (never mutated) by the trainer
    """The current stage's `args:` from the experiment's `stages:` list, set by the trainer before
    `on_stage_start`. Arms of a study that share earlier stages differ here, so the stage cache can reuse them."""
    cache_dir: Path | None = None
    """Where a task may write what it computes once and others may reuse (frozen features, say): the run's
    `cache/` on the main process, None on other DDP ranks and outside a run. Set by the runner."""

    def setup(self, data: Any) -> None:
        """Called once with the data module, after construction and before a checkpoint is restored: build what
        follows from the data (a classifier over the data's candidate answers), so that a resumed run fits."""

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def on_stage_start(self, stage: str, data: Any) -> None:
        """Called before each stage (and at the start of a single-stage run); set up what the stage needs."""
        self.stage = stage

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor | None]]:
        raise NotImplementedError

    def log(self, name: str, value: Tensor | float) -> None:
        """Record a scalar during a step (e.g. a mutual-information bound); the trainer averages it over the
        log interval as `train/<name>` without syncing to Python every step."""
        if isinstance(value, Tensor):
            value = value.detach()
        else:
            value = torch.tensor(float(value))
        self.__dict__.setdefault("_step_logs", {})[name] = value

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        return {}

    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        return []

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (tensors, numbers, lists: weights_only-loadable)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class DataModule:
    """Splits as torch Datasets; the trainer builds the loaders (sampling, sharding across ranks, resume).

    `batch_size=None` means each item is already a batch (an episode, a meta-batch of tasks).
    """

    batch_size: int | None = 32
    eval_batch_size: int | None = 256
    shuffle: bool = True
    drop_last: bool = True

    def dataset(self, split: str, stage: str | None = None) -> torch.utils.data.Dataset:
        """The split ('train', 'val', 'test') for a stage; raise KeyError for a split this data lacks."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def describe(self) -> dict[str, Any]:
        """Sizes and facts recorded in results.json."""
        return {}
