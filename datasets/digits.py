"""scikit-learn's 8x8 digits (1,797 images, 17 grey levels), shipped with the package: offline, seconds.

One fixed stratified split (train / val / test) that does not depend on the run's seed, so every run,
seed and paper sees the same held-out digits.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from mlrun.task import DataModule


@cache
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 in [0, 16] with shape (N, 8, 8), labels as int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@cache
def split_indices(val_fraction: float = 0.15, test_fraction: float = 0.25, split_seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Stratified, fixed by split_seed: {'train', 'val', 'test'} -> indices into the 1,797 digits."""
    from sklearn.model_selection import train_test_split

    _, y = load_digits_arrays()
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=split_seed)
    val_share = val_fraction / (1 - test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=split_seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class Digits(DataModule):
    """Digits as image tensors (1x8x8) or flat vectors (64), scaled to [0, 1] or standardised.

    Args:
        batch_size: training batch size per process.
        flatten: yield 64-vectors (MLPs) instead of 1x8x8 images (CNNs).
        normalize: "unit" divides by 16; "standard" subtracts the train mean and divides by the train std.
        classes: keep only these labels (remapped to 0..k-1), e.g. [3, 7] for a digit pair.
    """

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 512, flatten: bool = False,
                 normalize: str = "unit", val_fraction: float = 0.15, test_fraction: float = 0.25,
                 split_seed: int = 0, classes: list[int] | None = None, drop_last: bool = True) -> None:
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.drop_last = drop_last
        x, y = load_digits_arrays()
        x = x / 16.0
        splits = split_indices(val_fraction, test_fraction, split_seed)
        if classes is not None:
            keep = np.isin(y, classes)
            remap = {c: i for i, c in enumerate(classes)}
            splits = {k: v[keep[v]] for k, v in splits.items()}
            y = np.array([remap.get(int(t), -1) for t in y], dtype=np.int64)
        if normalize == "standard":
            mean, std = x[splits["train"]].mean(), x[splits["train"]].std()
            x = (x - mean) / std
        elif normalize != "unit":
            raise ValueError(f"normalize={normalize!r}: expected 'unit' or 'standard'")
        x = x.reshape(len(x), 64) if flatten else x.reshape(len(x), 1, 8, 8)
        self.x, self.y, self.splits = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), splits

    def dataset(self, split: str, stage: str | None = None) -> TensorDataset:
        if split not in self.splits:
            raise KeyError(split)
        i = torch.from_numpy(self.splits[split])
        return TensorDataset(self.x[i], self.y[i])

    def describe(self) -> dict[str, Any]:
        return {k: len(v) for k, v in self.splits.items()}
