"""Digit scenes: deterministic, boxes tight around the ink, overlap bounded, splits keep their own digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlrun.datasets import scenes as sc
from mlrun.datasets.digits import load_digits_arrays, split_indices


def _clean_scene(seed: int, **kw):
    x, y = load_digits_arrays()
    return sc.compose_scene(np.random.default_rng(seed), x[:200] / 16.0, y[:200], clutter=0.0, **kw)


def test_box_iou_matches_hand_values_and_torchvision():
    from torchvision.ops import box_iou

    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], dtype=np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=np.float32)
    iou = sc.box_iou_np(a, b)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == pytest.approx(50 / 150)  # half overlap: 50 / (100 + 100 - 50)
    assert iou[1, 0] == pytest.approx(25 / 175)  # a 5x5 corner in common
    assert iou[1, 1] == pytest.approx(50 / 150)
    assert iou[0, 2] == 0.0
    np.testing.assert_allclose(iou, box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_compose_scene_boxes_are_tight_inside_and_apart(seed):
    s = _clean_scene(seed, max_overlap=0.1)
    assert s.image.dtype == np.float32 and s.image.shape == (64, 64)
    assert 0.0 <= s.image.min() and s.image.max() <= 1.0
    assert s.boxes.dtype == np.float32 and s.labels.dtype == np.int64
    assert 1 <= len(s.labels) <= 5 and s.boxes.shape == (len(s.labels), 4)
    assert (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2:] <= 64).all() and (s.boxes[:, 2:] > s.boxes[:, :2]).all()
    if len(s.boxes) > 1:
        iou = sc.box_iou_np(s.boxes, s.boxes)
        assert iou[~np.eye(len(iou), dtype=bool)].max() <= 0.1 + 1e-6
    # Without clutter every inked pixel lies in some box, and each box touches ink on all four sides.
    inside = np.zeros_like(s.image, dtype=bool)
    for x1, y1, x2, y2 in s.boxes.astype(int):
        inside[y1:y2, x1:x2] = True
        box = s.image[y1:y2, x1:x2] > 0.2
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
    assert not (s.image[~inside] > 0.2).any()


def test_digit_sizes_follow_scale_range():
    s = _clean_scene(3, min_digits=5, max_digits=5, scale_range=(3.0, 3.0))
    sides = np.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1])
    assert (sides <= 24).all() and (sides >= 12).all()  # a 24-pixel digit whose ink fills at least half


def test_clutter_adds_noise_but_no_boxes():
    rng = np.random.default_rng(0)
    x, y = load_digits_arrays()
    clean = sc.compose_scene(np.random.default_rng(0), x[:50] / 16.0, y[:50], clutter=0.0)
    noisy = sc.compose_scene(rng, x[:50] / 16.0, y[:50], clutter=0.1)
    np.testing.assert_array_equal(clean.boxes, noisy.boxes)
    assert (noisy.image > 0).mean() > 0.3 > (clean.image > 0).mean()


def test_make_scenes_is_deterministic_and_seeded():
    a = sc.make_scenes("val", 5, seed=1)
    b = sc.make_scenes("val", 5, seed=1)
    c = sc.make_scenes("val", 5, seed=2)
    for s, t in zip(a, b):
        np.testing.assert_array_equal(s.image, t.image)
        np.testing.assert_array_equal(s.boxes, t.boxes)
    assert any(not np.array_equal(s.image, t.image) for s, t in zip(a, c))
    train = sc.make_scenes("train", 5, seed=1)
    assert not np.array_equal(train[0].image, a[0].image)


@pytest.mark.parametrize("split", ["train", "test"])
def test_scenes_of_a_split_use_only_its_digits(split, monkeypatch):
    seen = []

    def record(rng, digits, digit_labels, **kw):
        seen.append(digits)
        return sc.Scene(np.zeros((kw["canvas"], kw["canvas"]), np.float32), np.zeros((0, 4), np.float32),
                        np.zeros(0, np.int64))

    monkeypatch.setattr(sc, "compose_scene", record)
    sc._make_scenes.cache_clear()
    try:
        sc.make_scenes(split, 2, seed=123)
    finally:
        sc._make_scenes.cache_clear()
    x, _ = load_digits_arrays()
    np.testing.assert_array_equal(seen[0], x[split_indices()[split]] / 16.0)
    with pytest.raises(KeyError):
        sc.make_scenes("holdout", 2, seed=0)


def test_datamodule_items_collate_and_digit_stage():
    data = sc.DigitScenes(n_train=6, n_val=0, n_test=3, seed=0)
    ds = data.dataset("train")
    image, target = ds[2]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert target["boxes"].shape == (len(target["labels"]), 4) and target["image_id"] == 2
    images, targets = data.collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and len(targets) == 2
    with pytest.raises(KeyError):
        data.dataset("val")
    digits = data.dataset("train", stage="pretrain")
    x, y = digits[0]
    assert x.shape == (1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(digits) == len(split_indices()["train"])
    xb, yb = data.collate([digits[0], digits[1]])
    assert xb.shape == (2, 1, 8, 8) and yb.shape == (2,)
