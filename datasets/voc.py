"""PASCAL VOC detection (2007, 2012) through torchvision's VOCDetection: images, boxes, labels, 'difficult' flags.

The on-disk layout is the release's: `<root>/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}`. VOC
boxes are 1-based and inclusive; items carry them 0-based with x2/y2 exclusive (x1 = xmin - 1, x2 = xmax), so
a box's area is w * h and IoU needs no +1. `write_voc_fixture` writes a two-image tree in that format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mlrun.datasets.scenes import collate_lists
from mlrun.datasets.vision import data_root
from mlrun.errors import DataError
from mlrun.task import DataModule

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def parse_target(annotation: dict[str, Any], image_id: str, keep_difficult: bool = True) -> dict[str, Any]:
    """torchvision's parsed XML -> {boxes [k, 4] 0-based exclusive, labels [k], difficult [k], image_id}."""
    objects = annotation["annotation"].get("object", [])
    if isinstance(objects, dict):
        objects = [objects]
    boxes, labels, difficult = [], [], []
    for obj in objects:
        hard = bool(int(obj.get("difficult", "0") or 0))
        if hard and not keep_difficult:
            continue
        b = obj["bndbox"]
        boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
        labels.append(VOC_CLASSES.index(obj["name"].strip()))
        difficult.append(hard)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
        "image_id": image_id,
    }


class _VOCItems(Dataset):
    """(image [3, H, W] float in [0, 1], target dict) from a torchvision VOCDetection."""

    def __init__(self, voc: Any, keep_difficult: bool) -> None:
        self.voc, self.keep_difficult = voc, keep_difficult

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, annotation = self.voc[i]
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        image_id = Path(self.voc.images[i]).stem
        return x.contiguous(), parse_target(annotation, image_id, self.keep_difficult)


class VOC(DataModule):
    """PASCAL VOC detection. Splits map to the release's image sets (R-CNN on VOC 2007: train on trainval,
    test on test); a split mapped to None does not exist (the trainer skips its evaluation).

    Args:
        root: the folder holding VOCdevkit/ (default `$MLRUN_DATA` or ~/.cache/mlrun/data).
        year: "2007" or "2012".
        train_set, val_set, test_set: image sets (ImageSets/Main/<name>.txt) for train, val and test.
        keep_difficult: keep objects marked difficult (flagged, so VOC AP ignores them).
        batch_size: images per training batch.
    """

    class_names = VOC_CLASSES
    drop_last = False

    def __init__(self, root: str | None = None, year: str = "2007", train_set: str = "trainval",
                 val_set: str | None = None, test_set: str | None = "test", keep_difficult: bool = True,
                 batch_size: int | None = 2, eval_batch_size: int | None = 1, download: bool = False) -> None:
        self.root, self.year, self.download = data_root(root), str(year), download
        self.sets = {"train": train_set, "val": val_set, "test": test_set}
        self.keep_difficult = keep_difficult
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._cache: dict[str, Dataset] = {}

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        image_set = self.sets.get(split)
        if image_set is None:
            raise KeyError(split)
        if split not in self._cache:
            from torchvision.datasets import VOCDetection

            folder = self.root / "VOCdevkit" / f"VOC{self.year}"
            try:
                voc = VOCDetection(str(self.root), year=self.year, image_set=image_set, download=self.download)
            except (RuntimeError, OSError, ValueError) as e:
                raise DataError(
                    folder, f"the VOC{self.year} release: JPEGImages/, Annotations/ and ImageSets/Main/{image_set}.txt "
                    f"({type(e).__name__}: {e})",
                    f"Unpack VOCtrainval (and VOCtest for 2007) under {self.root} so that VOCdevkit/VOC{self.year} "
                    "exists, or set dataset.root to the folder holding VOCdevkit/",
                ) from None
            self._cache[split] = _VOCItems(voc, self.keep_difficult)
        return self._cache[split]

    def collate(self, items: list[Any]) -> Any:
        return collate_lists(items)

    def describe(self) -> dict[str, Any]:
        return {"year": self.year, **{f"{k}_set": v for k, v in self.sets.items()}}


_XML = """<annotation>
  <folder>VOC{year}</folder>
  <filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <segmented>0</segmented>
{objects}</annotation>
"""
_OBJ = """  <object>
    <name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{difficult}</difficult>
    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>
  </object>
"""

FIXTURE_OBJECTS = {  # name -> [(class, xmin, ymin, xmax, ymax, difficult)], 1-based inclusive as in VOC
    "000001": [("dog", 5, 8, 40, 44, 0), ("person", 45, 4, 76, 56, 0)],
    "000002": [("car", 10, 20, 60, 50, 0), ("bottle", 65, 5, 75, 30, 1)],
}


def write_voc_fixture(root: str | os.PathLike, year: str = "2007", width: int = 80, height: int = 60,
                      seed: int = 0) -> Path:
    """A two-image VOCdevkit/VOC<year> tree in the release's format (JPEGs, XML, image-set lists); returns root.

    Each object is a filled rectangle of its own colour on noise, so selective search finds it."""
    from PIL import Image

    root = Path(root)
    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, objects in FIXTURE_OBJECTS.items():
        img = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
        for k, (_, x1, y1, x2, y2, _) in enumerate(objects):
            img[y1 - 1 : y2, x1 - 1 : x2] = np.array([200, 80 + 60 * k, 40 + 100 * k], dtype=np.uint8)
        Image.fromarray(img).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
        xml_objects = "".join(_OBJ.format(cls=c, x1=a, y1=b, x2=cc, y2=d, difficult=h) for c, a, b, cc, d, h in objects)
        (base / "Annotations" / f"{name}.xml").write_text(
            _XML.format(year=year, name=name, w=width, h=height, objects=xml_objects))
    names = list(FIXTURE_OBJECTS)
    lists = {"train": names[:1], "val": names[1:], "trainval": names, "test": names}
    for image_set, ids in lists.items():
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root
