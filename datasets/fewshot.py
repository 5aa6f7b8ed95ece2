"""Few-shot episodes (N-way, K-shot, Q queries) over class splits that never share a class, shared by
ProtoNets, MAML and iMAML.

- `EpisodeDataset`: item i is one episode (or a meta-batch of T tasks), drawn deterministically from
  (seed, i), so a resumed run, a rerun and every run of a study see the same episodes.
- `FewShotDigits` (CPU miniature): meta-train on digits 0-4 with their 90/180 rotations as extra classes;
  validate on the held-out 270-degree rotations of digits 0-4 (classes disjoint from training and test, as the
  papers treat Omniglot rotations as classes); test on the unseen digits 5-9.
- `Omniglot` (torchvision's `omniglot-py/images_{background,evaluation}` folders, read directly because
  torchvision's class checks the md5 of the release zips) with rotations as new classes and the Vinyals
  split (shipped with mlrun in `splits/omniglot_vinyals/`, see its SOURCE.md); `MiniImageNet` (Ravi &
  Larochelle CSVs + images/, resized to 84x84; the folder found under any of its usual spellings).
- `write_omniglot_fixture`, `write_miniimagenet_fixture`: tiny sets in exactly those layouts.
- Two-phase training (select the length on val, retrain on train+val, ProtoNets' protocol): in the stages named
  by `trainval_stages` the train split is train+val and there is no val split.

Evaluation episodes are drawn with a fixed `eval_seed`, independent of the run's seed, so every run of a
study is scored on the same 600 test episodes (a paired comparison). Training episodes follow the run's
seed. `tasks_per_item` batches training tasks only; val/test items are single episodes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from mlrun.datasets.vision import data_root
from mlrun.errors import DataError
from mlrun.task import DataModule

ROTATIONS = (0, 90, 180, 270)


def mean_ci95(accs: Sequence[float] | np.ndarray | Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval over episodes: 1.96 * std / sqrt(n), with the
    sample standard deviation (ddof=1), as few-shot papers report "accuracy +- CI" over 600 test episodes."""
    a = np.asarray(accs, dtype=np.float64).ravel()
    if a.size == 0:
        return float("nan"), float("nan")
    if a.size == 1:
        return float(a[0]), 0.0
    return float(a.mean()), float(1.96 * a.std(ddof=1) / math.sqrt(a.size))


class EpisodeDataset(Dataset):
    """Item i -> one N-way K-shot episode with Q queries per class, deterministic from (seed, i).

    Each episode picks `n_way` of `classes` in a random order (episode label j = j-th picked class), then
    `k_shot + q_queries` distinct images of each. Support and query are class-major: support_y is
    [0]*K + [1]*K + ... . uint8 images become floats in [0, 1].

    Args:
        images: a Tensor [N, C, H, W], or any sequence whose items are [C, H, W] tensors (lazy files).
        labels: [N] class ids; `classes` lists the ids this split may draw from.
        tasks_per_item: T > 1 adds a leading T dimension to every tensor (a meta-batch of tasks).
    """

    def __init__(self, images: Tensor | Sequence[Tensor], labels: Tensor, classes: list[int], n_way: int,
                 k_shot: int, q_queries: int, episodes: int, seed: int, tasks_per_item: int = 1) -> None:
        if n_way > len(classes):
            raise ValueError(f"{n_way}-way episodes need at least {n_way} classes, the split has {len(classes)}")
        self.images, self.labels = images, torch.as_tensor(labels)
        self.classes = [int(c) for c in classes]
        self.n_way, self.k_shot, self.q_queries = int(n_way), int(k_shot), int(q_queries)
        self.episodes, self.seed, self.tasks_per_item = int(episodes), int(seed), int(tasks_per_item)
        lab = self.labels.numpy()
        self.members = [np.flatnonzero(lab == c) for c in self.classes]
        need = self.k_shot + self.q_queries
        short = [(c, len(m)) for c, m in zip(self.classes, self.members) if len(m) < need]
        if short:
            raise ValueError(f"{need} images per class needed (k_shot + q_queries), but class {short[0][0]} has "
                             f"{short[0][1]} ({len(short)} classes too small)")

    def __len__(self) -> int:
        return self.episodes

    def _gather(self, idx: np.ndarray) -> Tensor:
        if isinstance(self.images, Tensor):
            x = self.images[torch.from_numpy(idx)]
        else:
            x = torch.stack([self.images[int(j)] for j in idx])
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def _task(self, rng: np.random.Generator) -> dict[str, Tensor]:
        picked = rng.choice(len(self.classes), self.n_way, replace=False)
        k, q = self.k_shot, self.q_queries
        chosen = np.stack([rng.choice(self.members[c], k + q, replace=False) for c in picked])  # [n, k+q]
        y = torch.arange(self.n_way)
        return {
            "support": self._gather(chosen[:, :k].reshape(-1)), "support_y": y.repeat_interleave(k),
            "query": self._gather(chosen[:, k:].reshape(-1)), "query_y": y.repeat_interleave(q),
        }

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not 0 <= i < self.episodes:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, int(i)])
        if self.tasks_per_item == 1:
            return self._task(rng)
        tasks = [self._task(rng) for _ in range(self.tasks_per_item)]
        return {key: torch.stack([t[key] for t in tasks]) for key in tasks[0]}


def episode_setting(episode: dict[str, Tensor]) -> tuple[int, int]:
    """(n_way, k_shot) of a single (un-batched) episode, read from its support labels."""
    y = episode["support_y"]
    n_way = int(y.max()) + 1
    return n_way, len(y) // n_way


class _Chain(Sequence):
    """Several image sequences read as one (train+val of lazily loaded images)."""

    def __init__(self, parts: list[Sequence]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[j][i - int(self.offsets[j])]


class _EpisodicData(DataModule):
    """Shared episode plumbing: train episodes (run seed), val/test episodes (fixed eval seed), one
    EpisodeDataset per test way (20-way and 5-way from one trained model, as the papers report).

    Training episodes are `train_way`-way (default n_way; a {shot: way} mapping picks it by shot),
    `train_shot`-shot (default k_shot) with `q_queries` queries; val/test are `test_ways` x `test_shot`
    (default k_shot) with `test_queries` (default q_queries). In the stages named in `trainval_stages` the train
    split is the union of the train and val classes and the val split is absent (its classes are trained on)."""

    batch_size = None
    eval_batch_size = None
    drop_last = False

    def __init__(self, n_way: int, k_shot: int, q_queries: int, train_episodes: int, test_episodes: int,
                 tasks_per_item: int, seed: int, train_way: int | Mapping[int, int] | None, train_shot: int | None,
                 test_ways: list[int] | None, test_shot: int | None, test_queries: int | None, val_episodes: int,
                 eval_seed: int, trainval_stages: Sequence[str] = ()) -> None:
        self.n_way, self.k_shot, self.q_queries = n_way, k_shot, q_queries
        self.trainval_stages = tuple(trainval_stages)
        if isinstance(train_way, Mapping):  # the paper's training way per shot, e.g. {1: 30, 5: 20} on miniImageNet
            train_way = {int(k): v for k, v in train_way.items()}[int(train_shot or k_shot)]
        self.train_way, self.train_shot = train_way or n_way, train_shot or k_shot
        self.test_ways = list(test_ways) if test_ways else [n_way]
        self.test_shot, self.test_queries = test_shot or k_shot, test_queries or q_queries
        self.train_episodes, self.test_episodes, self.val_episodes = train_episodes, test_episodes, val_episodes
        self.tasks_per_item, self.seed, self.eval_seed = tasks_per_item, seed, eval_seed
        self.pools: dict[str, tuple[Any, Tensor, list[int]]] = {}  # split -> (images, labels, classes)
        self._cache: dict[str, Dataset] = {}

    def _trainval_pool(self) -> tuple[Any, Tensor, list[int]]:
        """The train and val classes together (val's labels shifted past train's where their ids overlap)."""
        if "trainval" not in self.pools:
            (xt, yt, ct), (xv, yv, cv) = self.pools["train"], self.pools["val"]
            shift = max(ct) + 1 if set(ct) & set(cv) else 0
            images = torch.cat([xt, xv]) if isinstance(xt, Tensor) else _Chain([xt, xv])
            self.pools["trainval"] = (images, torch.cat([yt, yv + shift]), list(ct) + [c + shift for c in cv])
        return self.pools["trainval"]

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if stage in self.trainval_stages:
            if split == "val":
                raise KeyError("val: its classes are part of the training split in this stage")
            if split == "train":
                if "val" not in self.pools:
                    raise KeyError(f"stage {stage!r} trains on train+val, but this data has no val split")
                self._trainval_pool()
                split = "trainval"
        if split not in self.pools:
            raise KeyError(split)
        if split not in self._cache:
            images, labels, classes = self.pools[split]
            if split in ("train", "trainval"):
                ds: Dataset = EpisodeDataset(images, labels, classes, self.train_way, self.train_shot,
                                             self.q_queries, self.train_episodes, self.seed, self.tasks_per_item)
            else:
                n = self.val_episodes if split == "val" else self.test_episodes
                base = self.eval_seed + (0 if split == "test" else 1_000)
                parts = [EpisodeDataset(images, labels, classes, w, self.test_shot, self.test_queries, n, base + w)
                         for w in self.test_ways]
                ds = parts[0] if len(parts) == 1 else ConcatDataset(parts)
            self._cache[split] = ds
        return self._cache[split]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"{k}_classes": len(v[2]) for k, v in self.pools.items() if k != "trainval"}
        out.update({f"{k}_images": len(v[1]) for k, v in self.pools.items() if k != "trainval"})
        out.update(train_way=self.train_way, train_shot=self.train_shot, test_ways=self.test_ways,
                   test_shot=self.test_shot, test_queries=self.test_queries, test_episodes=self.test_episodes)
        return out


def _rotation_classes(images: Tensor, labels: Tensor, rotations: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Images rotated by each r in `rotations` (degrees, counter-clockwise), each (label, r) a class of its own:
    label * 4 + the index of r in 0/90/180/270, so a class keeps its id whichever rotations a split takes."""
    xs, ys = [], []
    for r in rotations:
        if r not in ROTATIONS:
            raise ValueError(f"rotation {r}: expected one of {list(ROTATIONS)}")
        xs.append(torch.rot90(images, r // 90, dims=(-2, -1)))
        ys.append(labels * len(ROTATIONS) + ROTATIONS.index(r))
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------------------- digits


class FewShotDigits(_EpisodicData):
    """Few-shot learning on scikit-learn's 8x8 digits (1x8x8 in [0, 1]), offline and in seconds.

    Each (digit, rotation) pair is a class, as the papers treat Omniglot rotations (label = digit * 4 + the
    rotation's index in 0/90/180/270). Meta-train classes: `train_digits` (0-4) at every rotation except
    `val_rotations` (with `rotations`; else unrotated only). Val: the same digits at `val_rotations` (270 degrees),
    classes never trained on and disjoint from the test digits, so choosing anything on val never looks at a test
    class. Test: the unseen `test_digits` (5-9), unrotated, all their images (about 180 per digit).
    `val_rotations=[]` leaves no val split.
    """

    def __init__(self, n_way: int = 5, k_shot: int = 1, q_queries: int = 15, train_episodes: int = 100_000,
                 test_episodes: int = 600, tasks_per_item: int = 1, seed: int = 0,
                 train_way: int | Mapping[int, int] | None = None,
                 train_shot: int | None = None, test_ways: list[int] | None = None, test_shot: int | None = None,
                 test_queries: int | None = None, val_episodes: int = 100, eval_seed: int = 1234,
                 train_digits: Sequence[int] = (0, 1, 2, 3, 4), test_digits: Sequence[int] = (5, 6, 7, 8, 9),
                 rotations: bool = True, val_rotations: Sequence[int] = (270,),
                 trainval_stages: Sequence[str] = ()) -> None:
        from mlrun.datasets.digits import load_digits_arrays

        super().__init__(n_way, k_shot, q_queries, train_episodes, test_episodes, tasks_per_item, seed, train_way,
                         train_shot, test_ways, test_shot, test_queries, val_episodes, eval_seed, trainval_stages)
        if set(train_digits) & set(test_digits):
            raise ValueError(f"train_digits {list(train_digits)} and test_digits {list(test_digits)} share classes")
        val_rotations = [int(r) for r in val_rotations]
        if bad := [r for r in val_rotations if r not in ROTATIONS]:
            raise ValueError(f"val_rotations {bad}: expected some of {list(ROTATIONS)}")
        train_rotations = [r for r in (ROTATIONS if rotations else (0,)) if r not in val_rotations]
        if not train_rotations:
            raise ValueError(f"val_rotations {val_rotations} leave no rotation to train on")
        x, y = load_digits_arrays()
        x = torch.from_numpy(x / 16.0).float().unsqueeze(1)
        y = torch.from_numpy(y)
        seen = torch.isin(y, torch.tensor(list(train_digits)))
        for split, rots in (("train", train_rotations), ("val", val_rotations)):
            if rots:
                xs, ys = _rotation_classes(x[seen], y[seen], rots)
                self.pools[split] = (xs, ys, sorted(set(ys.tolist())))
        unseen = torch.isin(y, torch.tensor(list(test_digits)))
        self.pools["test"] = (x[unseen], y[unseen], sorted(test_digits))


# ---------------------------------------------------------------------------------------------- Omniglot


SPLITS_DIR = Path(__file__).parent / "splits"
"""Class lists shipped with mlrun (package data); each subfolder's SOURCE.md says where they come from."""


def _omniglot_how(base: Path) -> str:
    return (f"Unzip images_background.zip and images_evaluation.zip (torchvision's Omniglot release) into {base}; "
            "the Vinyals split files ship with mlrun (put your own train.txt, val.txt, trainval.txt, test.txt, lines "
            f"'Alphabet/characterNN/rot090', in {base / 'splits' / 'vinyals'} to replace them); or set "
            "dataset.split=background (torchvision's 964 / 659 characters)")


def omniglot_split_dir(base: Path) -> Path:
    """Where the Vinyals split files are read from: `<base>/splits/vinyals/` when it exists (a user's own or a
    test fixture's lists), else the copy shipped with mlrun (jakesnell/prototypical-networks' lists)."""
    own = base / "splits" / "vinyals"
    return own if own.is_dir() else SPLITS_DIR / "omniglot_vinyals"


def _read_omniglot_chars(base: Path, size: int) -> dict[str, Tensor]:
    """'Alphabet/characterNN' -> uint8 [20, 1, size, size], strokes bright (1 - pixel, as ProtoNets does)."""
    from PIL import Image

    chars: dict[str, Tensor] = {}
    for folder in ("images_background", "images_evaluation"):
        for char_dir in sorted((base / folder).glob("*/*")):
            files = sorted(char_dir.glob("*.png"))
            if not files:
                continue
            imgs = []
            for f in files:
                try:
                    with Image.open(f) as im:
                        a = np.asarray(im.convert("L").resize((size, size)), dtype=np.uint8)
                except OSError as e:
                    raise DataError(f, f"a readable Omniglot PNG ({e})") from None
                imgs.append(255 - a)
            chars[f"{char_dir.parent.name}/{char_dir.name}"] = torch.from_numpy(np.stack(imgs)).unsqueeze(1)
    return chars


class Omniglot(_EpisodicData):
    """Omniglot, 1,623 characters x 20 drawers, resized to 28x28, rotations by 90/180/270 as new classes.

    `split=vinyals` (default) reads the Vinyals split files (1,200 training characters x 4 rotations =
    4,800 classes in trainval.txt; 1,028 / 172 in train.txt / val.txt; 423 x 4 test classes in test.txt),
    shipped with mlrun (`omniglot_split_dir`). `train_split=trainval` trains on all 1,200 characters and has
    no val split (train and val would share classes); `train_split=train` keeps val.txt for validation (and
    `trainval_stages` retrain on train+val, the paper's second phase).
    `split=background` uses torchvision's own split instead (964 background / 659 evaluation characters).
    """

    def __init__(self, root: str | None = None, n_way: int = 5, k_shot: int = 1, q_queries: int = 5,
                 train_episodes: int = 100_000, test_episodes: int = 600, tasks_per_item: int = 1, seed: int = 0,
                 train_way: int | Mapping[int, int] | None = 60, train_shot: int | None = None,
                 test_ways: list[int] | None = None, test_shot: int | None = None, test_queries: int | None = 15,
                 val_episodes: int = 100, eval_seed: int = 1234, split: str = "vinyals", train_split: str = "trainval",
                 image_size: int = 28, trainval_stages: Sequence[str] = ()) -> None:
        super().__init__(n_way, k_shot, q_queries, train_episodes, test_episodes, tasks_per_item, seed, train_way,
                         train_shot, test_ways or [5, 20], test_shot, test_queries, val_episodes, eval_seed,
                         trainval_stages)
        base = data_root(root) / "omniglot-py"
        how = _omniglot_how(base)
        if not (base / "images_background").is_dir() or not (base / "images_evaluation").is_dir():
            raise DataError(base, "images_background/<alphabet>/<character>/*.png and images_evaluation/...", how)
        chars = _read_omniglot_chars(base, image_size)
        if split == "vinyals":
            names = {"train": train_split, "test": "test"}
            if train_split == "train":
                names["val"] = "val"
            split_dir = omniglot_split_dir(base)
            classes = {k: self._read_split(split_dir / f"{v}.txt", chars, how) for k, v in names.items()}
        elif split == "background":
            rot = [f"rot{r:03d}" for r in ROTATIONS]
            classes = {"train": [f"{c}/{r}" for c in chars if c in self._folder(base, "images_background")
                                 for r in rot],
                       "test": [f"{c}/{r}" for c in chars if c in self._folder(base, "images_evaluation")
                                for r in rot]}
        else:
            raise ValueError(f"split={split!r}: expected 'vinyals' or 'background'")
        for k, names_k in classes.items():
            self.pools[k] = self._materialise(names_k, chars)

    @staticmethod
    def _folder(base: Path, folder: str) -> set[str]:
        return {f"{p.parent.name}/{p.name}" for p in (base / folder).glob("*/*") if p.is_dir()}

    @staticmethod
    def _read_split(path: Path, chars: dict[str, Tensor], how: str) -> list[str]:
        if not path.exists():
            raise DataError(path, "a Vinyals split file (lines 'Alphabet/characterNN/rot000')", how)
        lines = [s.strip() for s in path.read_text().splitlines() if s.strip()]
        for s in lines:
            char, _, rot = s.rpartition("/")
            if not rot.startswith("rot") or not rot[3:].isdigit() or int(rot[3:]) % 90:
                raise DataError(path, f"lines 'Alphabet/characterNN/rotDDD'; {s!r} is not", how)
            if char not in chars:
                raise DataError(path, f"every class's character in the image folders; {char!r} is not there", how)
        return lines

    @staticmethod
    def _materialise(names: list[str], chars: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        xs, ys = [], []
        for label, name in enumerate(names):
            char, _, rot = name.rpartition("/")
            x = chars[char]
            xs.append(torch.rot90(x, int(rot[3:]) // 90, dims=(-2, -1)))
            ys.append(torch.full((len(x),), label, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys), list(range(len(names)))


def _write_omniglot_character(d: Path, index: int, drawers: int, size: int, rng: np.random.Generator) -> None:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    strokes = rng.random((size, size)) < 0.15
    for k in range(1, drawers + 1):
        noisy = strokes ^ (rng.random((size, size)) < 0.02)
        Image.fromarray(~noisy).convert("1").save(d / f"{index:04d}_{k:02d}.png")


def write_omniglot_fixture(root: str | os.PathLike, alphabets: int = 2, characters: int = 5, drawers: int = 20,
                           seed: int = 0, released: bool = False, image_size: int = 105) -> Path:
    """A tiny Omniglot in torchvision's extracted layout (binary PNGs named <id>_<drawer>.png under
    images_{background,evaluation}/<alphabet>/characterNN/).

    By default made-up alphabets with their own Vinyals-style split files in `omniglot-py/splits/vinyals/`
    (background alphabets go to trainval (train / val), evaluation ones to test). `released=True` writes instead
    every character the shipped Vinyals lists name (1,623, each with `drawers` images) and no split files, as
    torchvision's release unpacks: the loader must then fall back on the lists shipped with mlrun."""
    base = Path(root) / "omniglot-py"
    rng = np.random.default_rng(seed)
    if released:
        chars = sorted({line.rpartition("/")[0] for f in ("trainval", "test")
                        for line in (SPLITS_DIR / "omniglot_vinyals" / f"{f}.txt").read_text().split()})
        for i, char in enumerate(chars):
            folder = "images_background" if i % 2 else "images_evaluation"  # the loader reads both folders alike
            _write_omniglot_character(base / folder / char, i + 1, drawers, image_size, rng)
        return Path(root)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for folder in ("images_background", "images_evaluation"):
        for a in range(alphabets):
            alphabet = f"{'Bg' if folder == 'images_background' else 'Ev'}_Alphabet_{a}"
            for c in range(1, characters + 1):
                _write_omniglot_character(base / folder / alphabet / f"character{c:02d}", c, drawers, image_size, rng)
                which = "test" if folder == "images_evaluation" else ("val" if c == characters else "train")
                splits[which] += [f"{alphabet}/character{c:02d}/rot{r:03d}" for r in ROTATIONS]
    split_dir = base / "splits" / "vinyals"
    split_dir.mkdir(parents=True, exist_ok=True)
    splits["trainval"] = splits["train"] + splits["val"]
    for name, lines in splits.items():
        (split_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return Path(root)


# ---------------------------------------------------------------------------------------------- miniImageNet


class _ImageFiles(Sequence):
    """Lazily loaded RGB images resized to size x size, as uint8 [3, size, size] (60,000 images stay on disk)."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                a = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR), dtype=np.uint8)
        except OSError as e:
            raise DataError(self.paths[i], f"a readable image ({e})") from None
        return torch.from_numpy(a.copy()).permute(2, 0, 1)


MINIIMAGENET_DIRS = ("miniimagenet", "miniImageNet", "miniImagenet")
"""The folder names miniImageNet is released and used under; `MiniImageNet(subdir=None)` takes the first present."""


def miniimagenet_dir(root: Path, subdir: str | None) -> Path:
    """`<root>/<subdir>`, or with subdir None the first of MINIIMAGENET_DIRS under root that exists (the first
    spelling when none does, so the error names it)."""
    if subdir:
        return root / subdir
    return next((root / d for d in MINIIMAGENET_DIRS if (root / d).is_dir()), root / MINIIMAGENET_DIRS[0])


class MiniImageNet(_EpisodicData):
    """miniImageNet in the Ravi & Larochelle split: `<root>/<subdir>/{train,val,test}.csv` (header
    `filename,label`, 64 / 16 / 20 classes x 600 images) and the images in `<root>/<subdir>/images/`,
    resized to 84x84 RGB in [0, 1]. `subdir=None` finds the folder as `miniimagenet`, `miniImageNet` or
    `miniImagenet`."""

    def __init__(self, root: str | None = None, subdir: str | None = None, n_way: int = 5, k_shot: int = 1,
                 q_queries: int = 15, train_episodes: int = 100_000, test_episodes: int = 600,
                 tasks_per_item: int = 1, seed: int = 0,
                 train_way: int | Mapping[int, int] | None = 30, train_shot: int | None = None,
                 test_ways: list[int] | None = None, test_shot: int | None = None, test_queries: int | None = 15,
                 val_episodes: int = 100, eval_seed: int = 1234, image_size: int = 84,
                 trainval_stages: Sequence[str] = ()) -> None:
        import csv

        super().__init__(n_way, k_shot, q_queries, train_episodes, test_episodes, tasks_per_item, seed, train_way,
                         train_shot, test_ways, test_shot, test_queries, val_episodes, eval_seed, trainval_stages)
        base = miniimagenet_dir(data_root(root), subdir)
        where = base if subdir else f"{base.parent}/{{{','.join(MINIIMAGENET_DIRS)}}}"
        how = (f"Put the Ravi & Larochelle split files train.csv, val.csv, test.csv and the images/ folder in {where} "
               "(or set dataset.root / dataset.subdir)")
        for split in ("train", "val", "test"):
            path = base / f"{split}.csv"
            if not path.exists():
                raise DataError(path, "a CSV with header 'filename,label' (e.g. n0153282900000005.jpg,n01532829)", how)
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows or [s.strip() for s in rows[0]] != ["filename", "label"]:
                raise DataError(path, "a CSV whose header is 'filename,label'", how)
            files, names = [], []
            for row in rows[1:]:
                if len(row) != 2:
                    continue
                files.append(base / "images" / row[0].strip())
                names.append(row[1].strip())
            if files and not files[0].exists():
                raise DataError(files[0], f"the images listed in {path.name} under images/", how)
            index = {n: i for i, n in enumerate(sorted(set(names)))}
            labels = torch.tensor([index[n] for n in names], dtype=torch.long)
            self.pools[split] = (_ImageFiles(files, image_size), labels, list(range(len(index))))


def write_miniimagenet_fixture(root: str | os.PathLike, subdir: str = "miniimagenet", classes: int = 6,
                               per_class: int = 20, size: int = 32, seed: int = 0) -> Path:
    """A tiny miniImageNet: {train,val,test}.csv ('filename,label', names as in the release) + images/*.jpg."""
    from PIL import Image

    base = Path(root) / subdir
    (base / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnid = 1000000
    for split in ("train", "val", "test"):
        lines = ["filename,label"]
        for _ in range(classes):
            wnid += 17
            label = f"n{wnid:08d}"
            colour = rng.integers(0, 256, 3)
            for i in range(1, per_class + 1):
                img = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                name = f"{label}{i:08d}.jpg"
                Image.fromarray(img).save(base / "images" / name)
                lines.append(f"{name},{label}")
        (base / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return Path(root)
