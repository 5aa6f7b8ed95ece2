"""Digit scenes: scikit-learn's 8x8 digits placed on a canvas, with ground-truth boxes and labels.

The CPU stand-in for detection data (R-CNN) and region features (Bottom-Up Top-Down): a canvas holds 1 to 5
digits at random scales and places with limited overlap, plus light clutter (faint noise and fragments of other
digits, so that not every blob is an object). Scenes are deterministic from (split, seed), and a split's scenes
use only that split's digit images (`mlrun.datasets.digits.split_indices`), so test scenes hold unseen digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mlrun.datasets.proposals import box_iou_np  # noqa: F401 - re-exported: scenes.box_iou_np
from mlrun.task import DataModule

SPLITS = ("train", "val", "test")


@dataclass
class Scene:
    """image: float32 [H, W] in [0, 1]; boxes: float32 [k, 4] as (x1, y1, x2, y2) pixels, x2/y2 exclusive;
    labels: int64 [k], the digit (0-9) in each box."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def _resize(digit: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return np.clip(cv2.resize(digit, (size, size), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _tight_box(patch: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the ink in a patch, x2/y2 exclusive."""
    ys, xs = np.nonzero(patch > threshold)
    if len(xs) == 0:
        return 0, 0, patch.shape[1], patch.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def compose_scene(rng: np.random.Generator, digits: np.ndarray, digit_labels: np.ndarray, canvas: int = 64,
                  min_digits: int = 1, max_digits: int = 5, scale_range: tuple[float, float] = (1.5, 3.0),
                  max_overlap: float = 0.1, clutter: float = 0.1, fragments: int = 2,
                  contrast_range: tuple[float, float] = (1.0, 1.0), ink_threshold: float = 0.2,
                  tries: int = 50) -> Scene:
    """One scene. digits: [N, 8, 8] in [0, 1] (or [0, 16], rescaled); boxes are tight around each digit's ink.

    A digit is placed where its box overlaps every earlier box by IoU <= max_overlap (a digit that finds no
    place in `tries` attempts is dropped, so crowded canvases may hold fewer than drawn). Clutter: Gaussian
    noise of std `clutter / 2` and `fragments` random quarter-crops of other digits at `clutter * 4` intensity.
    contrast_range: each digit's ink is scaled by a factor drawn from it (faint and bold digits).
    """
    digits = np.asarray(digits, dtype=np.float32)
    if digits.max() > 1.0:
        digits = digits / 16.0
    image = np.zeros((canvas, canvas), dtype=np.float32)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(min_digits, max_digits + 1))):
        i = int(rng.integers(len(digits)))
        size = int(round(8 * rng.uniform(*scale_range)))
        patch = _resize(digits[i], size)
        bx1, by1, bx2, by2 = _tight_box(patch, ink_threshold)
        if tuple(contrast_range) != (1.0, 1.0):
            patch = patch * rng.uniform(*contrast_range)
        for _ in range(tries):
            x = int(rng.integers(-bx1, canvas - bx2 + 1))
            y = int(rng.integers(-by1, canvas - by2 + 1))
            box = np.array([[x + bx1, y + by1, x + bx2, y + by2]], dtype=np.float32)
            if boxes and box_iou_np(box, np.array(boxes, dtype=np.float32)).max() > max_overlap:
                continue
            ys, xs = slice(max(y, 0), min(y + size, canvas)), slice(max(x, 0), min(x + size, canvas))
            crop = patch[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x]
            image[ys, xs] = np.maximum(image[ys, xs], crop)
            boxes.append(tuple(int(v) for v in box[0]))
            labels.append(int(digit_labels[i]))
            break
    for _ in range(fragments if clutter > 0 else 0):
        piece = digits[int(rng.integers(len(digits)))]
        r, c = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        frag = _resize(piece[r : r + 4, c : c + 4], int(rng.integers(4, 9))) * min(clutter * 4, 1.0)
        s = frag.shape[0]
        y, x = int(rng.integers(0, canvas - s + 1)), int(rng.integers(0, canvas - s + 1))
        image[y : y + s, x : x + s] = np.maximum(image[y : y + s, x : x + s], frag)
    if clutter > 0:
        image = np.clip(image + rng.normal(0, clutter / 2, image.shape).astype(np.float32), 0.0, 1.0)
    return Scene(image=image, boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                 labels=np.array(labels, dtype=np.int64))


def _split_seed(split: str, seed: int) -> list[int]:
    return [int(seed), SPLITS.index(split) if split in SPLITS else abs(hash(split)) % 1000, 7919]


def make_scenes(split: str, n: int, seed: int, canvas: int = 64, **kw: Any) -> list[Scene]:
    """n scenes of `split`, deterministic in (split, n, seed, canvas, kw), from that split's digit images only."""
    kw = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in kw.items()}  # hashable for the cache
    return list(_make_scenes(split, n, seed, canvas, tuple(sorted(kw.items()))))


@cache
def _make_scenes(split: str, n: int, seed: int, canvas: int, kw: tuple) -> tuple[Scene, ...]:
    from mlrun.datasets.digits import load_digits_arrays, split_indices

    if split not in SPLITS:
        raise KeyError(split)
    images, labels = load_digits_arrays()
    idx = split_indices()[split]
    rng = np.random.default_rng(_split_seed(split, seed))
    return tuple(compose_scene(rng, images[idx] / 16.0, labels[idx], canvas=canvas, **dict(kw)) for _ in range(n))


class SceneDataset(Dataset):
    """Items: (image [1, H, W] float tensor, {"boxes": [k, 4] float, "labels": [k] int64, "image_id": int})."""

    def __init__(self, scenes: list[Scene]) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        s = self.scenes[i]
        target = {"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels), "image_id": i}
        return torch.from_numpy(s.image)[None], target


def collate_lists(items: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Detection batches keep lists: images and targets differ in size from item to item."""
    images, targets = zip(*items)
    return list(images), list(targets)


class DigitScenes(DataModule):
    """Detection data on digit scenes, plus isolated digits for stages that pretrain a classifier.

    Args:
        n_train, n_val, n_test: scenes per split.
        canvas: scene side in pixels.
        seed: the scene seed (scenes are the same for every run with this seed).
        batch_size: scenes per training batch (a stage may override it).
        digit_stages: stages whose data are isolated digits ((image [1, 8, 8] in [0, 1], label) pairs) of
            the same split instead of scenes, e.g. R-CNN's supervised pretraining.
        scene_kw: passed to `compose_scene` (min_digits, max_digits, scale_range, max_overlap, clutter, ...).
    """

    def __init__(self, n_train: int = 300, n_val: int = 60, n_test: int = 200, canvas: int = 64, seed: int = 0,
                 batch_size: int | None = 4, eval_batch_size: int | None = 16,
                 digit_stages: list[str] | tuple[str, ...] = ("pretrain",), scene_kw: dict | None = None) -> None:
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.canvas, self.seed = canvas, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.digit_stages = tuple(digit_stages)
        self.scene_kw = dict(scene_kw or {})

    def scenes(self, split: str) -> list[Scene]:
        if split not in self.sizes or self.sizes[split] <= 0:
            raise KeyError(split)
        return make_scenes(split, self.sizes[split], self.seed, self.canvas, **self.scene_kw)

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if stage in self.digit_stages:
            from torch.utils.data import TensorDataset

            from mlrun.datasets.digits import load_digits_arrays, split_indices

            x, y = load_digits_arrays()
            i = split_indices()[split]
            return TensorDataset(torch.from_numpy(x[i] / 16.0)[:, None], torch.from_numpy(y[i]))
        return SceneDataset(self.scenes(split))

    def collate(self, items: list[Any]) -> Any:
        if items and isinstance(items[0][1], dict):
            return collate_lists(items)
        return torch.utils.data.default_collate(items)

    def describe(self) -> dict[str, Any]:
        return {f"{k}_scenes": v for k, v in self.sizes.items()}


def target_scene(rng: np.random.Generator, target: np.ndarray, digits: np.ndarray, canvas: int = 16,
                 target_size: int = 12, distractors: tuple[int, int] = (1, 2),
                 distractor_sizes: tuple[int, int] = (6, 8), clutter: float = 0.1) -> np.ndarray:
    """A canvas with one large `target` digit at a random place and 1-2 smaller distractor digits drawn from
    `digits` at random places (overlaps allowed, max of the inks), plus Gaussian noise of std clutter / 2: a
    classification image whose label is the target's, harder than a centred digit. Digits in [0, 1]."""
    image = np.zeros((canvas, canvas), dtype=np.float32)
    for _ in range(int(rng.integers(distractors[0], distractors[1] + 1))):
        size = int(rng.integers(distractor_sizes[0], distractor_sizes[1] + 1))
        patch = _resize(digits[int(rng.integers(len(digits)))], size)
        y, x = int(rng.integers(0, canvas - size + 1)), int(rng.integers(0, canvas - size + 1))
        image[y : y + size, x : x + size] = np.maximum(image[y : y + size, x : x + size], patch)
    patch = _resize(target, target_size)
    y, x = int(rng.integers(0, canvas - target_size + 1)), int(rng.integers(0, canvas - target_size + 1))
    image[y : y + target_size, x : x + target_size] = np.maximum(image[y : y + target_size, x : x + target_size],
                                                                 patch)
    if clutter > 0:
        image = np.clip(image + rng.normal(0, clutter / 2, image.shape).astype(np.float32), 0.0, 1.0)
    return image


@cache
def _target_scenes(split: str, seed: int, copies: int, kw: tuple) -> tuple[np.ndarray, np.ndarray]:
    from mlrun.datasets.digits import load_digits_arrays, split_indices

    images, labels = load_digits_arrays()
    idx = split_indices()[split]
    digits = images[idx] / 16.0
    rng = np.random.default_rng(_split_seed(split, seed))
    x = np.stack([target_scene(rng, d, digits, **dict(kw)) for _ in range(copies) for d in digits])[:, None]
    return x, np.tile(labels[idx], copies)


class TargetScenes(DataModule):
    """Classification on digit scenes: each digit of a split becomes the large target of `copies` scenes (training
    split; one scene per digit in val and test, so their sizes and labels are the digits'), with smaller
    distractor digits of the same split around it. Deterministic given `seed`; test scenes hold only test digits.

    Args:
        copies: scenes per training digit (fresh places and distractors each), so that a harder task gets the
            data it needs while an epoch over the digits stays the unit: `copies` scene epochs = 1 digit epoch.
        canvas, target_size, distractors, distractor_sizes, clutter: passed to `target_scene`.
        batch_size, eval_batch_size: loader batch sizes.
    """

    def __init__(self, copies: int = 1, canvas: int = 16, target_size: int = 12, distractors: tuple[int, int] = (1, 2),
                 distractor_sizes: tuple[int, int] = (6, 8), clutter: float = 0.1, seed: int = 0,
                 batch_size: int = 64, eval_batch_size: int = 512) -> None:
        self.kw = (("canvas", canvas), ("clutter", clutter), ("distractor_sizes", tuple(distractor_sizes)),
                   ("distractors", tuple(distractors)), ("target_size", target_size))
        self.copies, self.seed, self.batch_size, self.eval_batch_size = copies, seed, batch_size, eval_batch_size

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        from torch.utils.data import TensorDataset

        if split not in SPLITS:
            raise KeyError(split)
        x, y = _target_scenes(split, self.seed, self.copies if split == "train" else 1, self.kw)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def describe(self) -> dict[str, Any]:
        return {split: len(self.dataset(split)) for split in SPLITS}
