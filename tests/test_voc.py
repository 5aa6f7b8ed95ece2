"""VOC loader on a two-image fixture in the release's format: boxes converted, difficult kept, errors clear."""

from __future__ import annotations

import pytest
import torch

from mlrun.datasets.voc import VOC, VOC_CLASSES, parse_target, write_voc_fixture
from mlrun.errors import DataError


def test_fixture_loads_through_torchvision_with_converted_boxes(tmp_path):
    write_voc_fixture(tmp_path)
    data = VOC(root=str(tmp_path))
    train = data.dataset("train")
    assert len(train) == 2  # trainval
    image, target = train[0]
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    # dog at VOC (5, 8, 40, 44), 1-based inclusive -> (4, 7, 40, 44), 0-based with x2/y2 exclusive
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 7.0, 40.0, 44.0], [44.0, 3.0, 76.0, 56.0]]))
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert target["image_id"] == "000001"
    # the JPEG holds the dog's colour exactly inside its box (width 36 = xmax - xmin + 1)
    assert float(image[0, 7:44, 4:40].mean()) > 0.7 and float(image[0, 7:44, 40:44].mean()) < 0.4
    _, target2 = data.dataset("test")[1]
    assert target2["difficult"].tolist() == [False, True]
    images, targets = data.collate([train[0], train[1]])
    assert len(images) == 2 and targets[1]["image_id"] == "000002"
    with pytest.raises(KeyError):
        data.dataset("val")  # val_set=None: no such split


def test_drop_difficult_and_single_object_annotation():
    ann = {"annotation": {"object": {"name": "cat", "difficult": "1",
                                     "bndbox": {"xmin": "1", "ymin": "2", "xmax": "10", "ymax": "20"}}}}
    kept = parse_target(ann, "x")
    assert kept["boxes"].tolist() == [[0.0, 1.0, 10.0, 20.0]] and kept["difficult"].tolist() == [True]
    dropped = parse_target(ann, "x", keep_difficult=False)
    assert dropped["boxes"].shape == (0, 4) and dropped["labels"].shape == (0,)


def test_missing_data_names_the_path(tmp_path):
    with pytest.raises(DataError, match="VOCdevkit/VOC2007.*ImageSets/Main/trainval.txt"):
        VOC(root=str(tmp_path / "nowhere")).dataset("train")
