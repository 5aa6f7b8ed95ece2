"""Plain supervised classification: any network, cross-entropy, accuracy. Shared by several papers
(the first experiment, BN and GN studies) because their contribution is the network, not the loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.task import Task


class Classifier(Task):
    """Args:
        net: the network (a `_target_` in the config).
        optimizer: a partial optimizer (`_partial_: true`), called with the network's parameters.
        label_smoothing: passed to cross-entropy.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self._optimizer = optimizer
        self.label_smoothing = label_smoothing

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self._optimizer(self.net.parameters())}

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor]]:
        x, y = batch
        yield "model", F.cross_entropy(self.net(x), y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        correct, total, loss = 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(self.device_), y.to(self.device_)
            logits = self.net(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        return {"acc": correct / total, "loss": loss / total}

    @property
    def device_(self) -> torch.device:
        return next(self.parameters()).device


class SmallCNN(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 conv blocks, a pooled 2x2 map, one hidden layer."""

    def __init__(self, channels: int = 32, hidden: int = 64, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 4, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
