"""torchvision-family image sets at paper scale: MNIST, CIFAR-10, ImageNet (ImageFolder layout), CelebA.

Each loader reads the dataset's standard on-disk format under `root` (default `$MLRUN_DATA` or
`~/.cache/mlrun/data`); a missing or broken set raises `DataError` naming the path, the files expected
and how to get them. Each format also has a `write_*_fixture` that writes a tiny set in that exact
format, so tests run the real loader (and the CI smoke runs of paper-scale experiments) offline.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from mlrun.errors import DataError
from mlrun.task import DataModule


def data_root(root: str | os.PathLike | None) -> Path:
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("MLRUN_DATA", "~/.cache/mlrun/data")).expanduser()


def _split_val(n: int, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/val split of a training set (seed 0, independent of the run's seed)."""
    order = np.random.default_rng(seed).permutation(n)
    val_size = min(val_size, n // 5) if n < 5 * val_size else val_size
    return np.sort(order[val_size:]), np.sort(order[:val_size])


class _FlipDataset(Dataset):
    """uint8 images (N, C, H, W) -> float in [0, 1], optional random horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool) -> None:
        self.images, self.labels, self.hflip = images, labels, hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255.0)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


# ---------------------------------------------------------------------------------------------- MNIST


class MNIST(DataModule):
    """torchvision's MNIST (raw idx files under `<root>/MNIST/raw/`), held in memory as tensors.

    Args:
        flatten: 784-vectors for MLPs, else 1x28x28 images.
        normalize: "unit" ([0, 1]) or "standard" (train mean/std).
        classes: keep only these digits (remapped to 0..k-1).
        per_class: keep at most this many training images per class (first ones, fixed).
        val_size: images of the training set held out for validation.
    """

    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self, root: str | None = None, batch_size: int = 64, eval_batch_size: int = 1000,
                 flatten: bool = False, normalize: str = "unit", classes: list[int] | None = None,
                 per_class: int | None = None, val_size: int = 10000, download: bool = False) -> None:
        from torchvision import datasets

        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.root = data_root(root)
        try:
            train = datasets.MNIST(str(self.root), train=True, download=download)
            test = datasets.MNIST(str(self.root), train=False, download=download)
        except (RuntimeError, OSError, ValueError, EOFError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                self.root / "MNIST" / "raw", "the four idx files " + ", ".join(self.files),
                f"the download failed, no network? ({why})" if download else
                f"Set dataset.root to the folder holding MNIST/, or dataset.download=true where there is a network "
                f"({type(e).__name__}: {why})",
            ) from None
        xs = {"train": train.data, "test": test.data}
        ys = {"train": train.targets, "test": test.targets}
        if classes is not None:
            remap = torch.full((10,), -1, dtype=torch.long)
            remap[torch.tensor(classes)] = torch.arange(len(classes))
            for k in xs:
                keep = torch.isin(ys[k], torch.tensor(classes))
                xs[k], ys[k] = xs[k][keep], remap[ys[k][keep]]
        if per_class is not None:
            keep = torch.cat([torch.nonzero(ys["train"] == c).flatten()[:per_class] for c in ys["train"].unique()])
            keep = keep.sort().values
            xs["train"], ys["train"] = xs["train"][keep], ys["train"][keep]
        tr, va = _split_val(len(xs["train"]), val_size)
        x = {"train": xs["train"][tr], "val": xs["train"][va], "test": xs["test"]}
        y = {"train": ys["train"][tr], "val": ys["train"][va], "test": ys["test"]}
        if not len(va):  # val_size=0: no val split at all (as CIFAR's), never an empty one
            del x["val"], y["val"]
        x = {k: v.float().div(255.0) for k, v in x.items()}
        if normalize == "standard":
            mean, std = x["train"].mean(), x["train"].std()
            x = {k: (v - mean) / std for k, v in x.items()}
        shape = (-1, 784) if flatten else (-1, 1, 28, 28)
        self.splits = {k: TensorDataset(x[k].reshape(shape), y[k]) for k in x}

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        return self.splits[split]

    def describe(self) -> dict[str, Any]:
        return {k: len(v) for k, v in self.splits.items()}


def _write_idx(path: Path, array: np.ndarray) -> None:
    dims = array.shape
    code = 0x08  # unsigned byte
    header = bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_fixture(root: str | os.PathLike, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """A tiny MNIST in the real idx format, with every digit present."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28))
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


# ---------------------------------------------------------------------------------------------- CIFAR-10


class CIFAR10(DataModule):
    """CIFAR-10 in its python-pickle release (`<root>/cifar-10-batches-py/data_batch_{1..5}`, `test_batch`).

    Read with our own reader of that format (torchvision's class insists on the release's md5 sums, so it
    cannot read test fixtures); `download=true` fetches the release through torchvision, which checks them.
    """

    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))

    def __init__(self, root: str | None = None, batch_size: int = 64, eval_batch_size: int = 500,
                 hflip: bool = True, val_size: int = 0, download: bool = False) -> None:
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.root = data_root(root)
        if download:
            from torchvision import datasets

            datasets.CIFAR10(str(self.root), train=True, download=True)
        base = self.root / self.folder
        train_x, train_y = zip(*(self._read(base / f) for f in self.train_files))
        test_x, test_y = self._read(base / "test_batch")
        x, y = torch.cat(train_x), torch.cat(train_y)
        splits = {"test": (test_x, test_y)}
        if val_size:
            tr, va = _split_val(len(x), val_size)
            splits["train"], splits["val"] = (x[tr], y[tr]), (x[va], y[va])
        else:
            splits["train"] = (x, y)
        self.splits = {k: _FlipDataset(a, b, hflip and k == "train") for k, (a, b) in splits.items()}

    def _read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        how = "Set dataset.root to the folder holding cifar-10-batches-py/, or dataset.download=true"
        if not path.exists():
            raise DataError(path, f"the CIFAR-10 python batches {', '.join(self.train_files)}, test_batch", how)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")  # noqa: S301 - the dataset's own format
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise DataError(path, "a CIFAR-10 python batch (a pickled dict with b'data' Nx3072 uint8, "
                                  f"b'labels') ({type(e).__name__}: {e})", how) from None
        return torch.from_numpy(data), torch.from_numpy(labels)

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        return self.splits[split]

    def describe(self) -> dict[str, Any]:
        return {k: len(v) for k, v in self.splits.items()}


def write_cifar10_fixture(root: str | os.PathLike, per_batch: int = 8, seed: int = 0) -> Path:
    """A tiny CIFAR-10 in the real python-pickle format (5 train batches, a test batch, batches.meta)."""
    base = Path(root) / CIFAR10.folder
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in (*CIFAR10.train_files, "test_batch"):
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in np.arange(per_batch) % 10],
             b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
             b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                                      b"horse", b"ship", b"truck"], b"num_cases_per_batch": per_batch}, f)
    return Path(root)


# ---------------------------------------------------------------------------------------------- ImageNet


class ImageFolderData(DataModule):
    """ImageNet (or any set) in the ImageFolder layout: `<root>/<train_dir>/<class>/*.JPEG`, same for val.

    Training: RandomResizedCrop + horizontal flip; evaluation: resize to 256/224 of the size, centre crop.
    The val folder doubles as the test split (ImageNet's test labels are not public).
    """

    def __init__(self, root: str | None = None, subdir: str = "imagenet", train_dir: str = "train",
                 val_dir: str = "val", image_size: int = 224, batch_size: int = 32, eval_batch_size: int = 64,
                 num_workers_hint: int = 0) -> None:
        from torchvision import datasets, transforms

        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.root = data_root(root) / subdir
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        train_tf = transforms.Compose([
            transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(mean, std)])
        eval_tf = transforms.Compose([
            transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size), transforms.ToTensor(),
            transforms.Normalize(mean, std)])
        self.splits = {}
        for split, folder, tf in (("train", train_dir, train_tf), ("val", val_dir, eval_tf)):
            path = self.root / folder
            try:
                self.splits[split] = datasets.ImageFolder(str(path), transform=tf)
            except (FileNotFoundError, OSError) as e:
                raise DataError(path, "one folder per class holding its images (ImageFolder layout: "
                                      f"{path}/<class>/<image>.JPEG)",
                                "Prepare ImageNet with train/ and val/ sorted into class folders and set "
                                f"dataset.root to the folder holding {subdir}/ ({e})") from None
        self.splits["test"] = self.splits["val"]

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        return self.splits[split]

    def describe(self) -> dict[str, Any]:
        return {k: len(v) for k, v in self.splits.items()}


def write_imagefolder_fixture(root: str | os.PathLike, subdir: str = "imagenet", classes: int = 2,
                              per_class: int = 2, size: int = 40, seed: int = 0) -> Path:
    """A tiny ImageFolder tree (train/ and val/, JPEG files) as ImageNet is usually prepared."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = Path(root) / subdir / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"img_{i}.JPEG")
    return Path(root)


# ---------------------------------------------------------------------------------------------- CelebA


class CelebA(DataModule):
    """CelebA aligned faces: `<root>/celeba/img_align_celeba/*.jpg` and `list_eval_partition.txt`
    (0 train, 1 val, 2 test), centre-cropped to 148x148 and resized as Real NVP does.

    Read directly (torchvision's class checks md5 sums of the release and the annotation files, which a
    test fixture cannot match); `download` is not offered: the release sits behind Google Drive quotas.
    """

    def __init__(self, root: str | None = None, image_size: int = 64, crop: int = 148, batch_size: int = 64,
                 eval_batch_size: int = 256, hflip: bool = True) -> None:
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        base = data_root(root) / "celeba"
        part = base / "list_eval_partition.txt"
        how = "Download CelebA (aligned and cropped) and set dataset.root to the folder holding celeba/"
        if not part.exists() or not (base / "img_align_celeba").is_dir():
            raise DataError(base, "img_align_celeba/*.jpg and list_eval_partition.txt", how)
        names: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for line in part.read_text().split("\n"):
            if not line.strip():
                continue
            try:
                name, which = line.split()
                names[("train", "val", "test")[int(which)]].append(name)
            except (ValueError, IndexError):
                raise DataError(part, f"lines '<file>.jpg <0|1|2>', got {line!r}", how) from None
        self.splits = {k: _CelebAFiles(base / "img_align_celeba", v, image_size, crop, hflip and k == "train")
                       for k, v in names.items()}

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        return self.splits[split]

    def describe(self) -> dict[str, Any]:
        return {k: len(v) for k, v in self.splits.items()}


class _CelebAFiles(Dataset):
    def __init__(self, folder: Path, names: list[str], size: int, crop: int, hflip: bool) -> None:
        from torchvision import transforms

        self.folder, self.names = folder, names
        tf = [transforms.CenterCrop(crop), transforms.Resize(size)]
        if hflip:
            tf.append(transforms.RandomHorizontalFlip())
        self.tf = transforms.Compose([*tf, transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path = self.folder / self.names[i]
        try:
            with Image.open(path) as im:
                x = self.tf(im.convert("RGB"))
        except OSError as e:
            raise DataError(path, f"a readable JPEG ({e})") from None
        return x.float().div_(255.0), torch.tensor(0)


def write_celeba_fixture(root: str | os.PathLike, n: int = 6, seed: int = 0) -> Path:
    from PIL import Image

    base = Path(root) / "celeba"
    (base / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(base / "img_align_celeba" / name)
        lines.append(f"{name} {i % 3}")
    (base / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return Path(root)
