"""Episode sampler, class splits, the real-format loaders (on fixtures) and the 95% confidence interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlrun.datasets import fewshot as fs
from mlrun.errors import DataError


def _id_dataset(n_classes: int = 8, per_class: int = 10, **kw) -> fs.EpisodeDataset:
    """Images whose single pixel is their own index, so an episode says exactly which images it drew."""
    n = n_classes * per_class
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    labels = torch.arange(n) // per_class * 10  # class ids 0, 10, 20, ... (not 0..k-1)
    args = dict(n_way=5, k_shot=2, q_queries=3, episodes=50, seed=7)
    args.update(kw)
    return fs.EpisodeDataset(images, labels, [c * 10 for c in range(n_classes)], **args)


def test_episode_shapes_labels_and_distinct_images():
    ds = _id_dataset()
    assert len(ds) == 50
    for i in range(len(ds)):
        e = ds[i]
        assert e["support"].shape == (10, 1, 1, 1) and e["query"].shape == (15, 1, 1, 1)
        assert e["support_y"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert e["query_y"].tolist() == [j for j in range(5) for _ in range(3)]
        ids = torch.cat([e["support"].flatten(), e["query"].flatten()]).long()
        assert len(set(ids.tolist())) == 25  # no image is both support and query, or drawn twice
        # every image carries its episode label: the same original class for support and query
        cls_s = (e["support"].flatten().long() // 10).view(5, 2)
        cls_q = (e["query"].flatten().long() // 10).view(5, 3)
        assert (cls_s == cls_s[:, :1]).all() and (cls_q == cls_s[:, :1]).all()
        assert len(set(cls_s[:, 0].tolist())) == 5


def test_episodes_deterministic_from_seed_and_index():
    a, b, c = _id_dataset(), _id_dataset(), _id_dataset(seed=8)
    assert all(torch.equal(a[3][k], b[3][k]) for k in a[3])
    assert not torch.equal(a[3]["support"], a[4]["support"])
    assert not torch.equal(a[3]["support"], c[3]["support"])


def test_episode_class_order_is_random_and_covers_classes():
    ds = _id_dataset(episodes=200)
    first = [int(ds[i]["support"][0].item()) // 10 for i in range(200)]
    assert set(first) == set(range(8))  # any class can be label 0


def test_tasks_per_item_adds_leading_dim():
    ds = _id_dataset(tasks_per_item=4)
    e = ds[0]
    assert e["support"].shape == (4, 10, 1, 1, 1) and e["query_y"].shape == (4, 15)
    assert not torch.equal(e["support"][0], e["support"][1])


def test_too_few_images_or_classes_is_an_error():
    with pytest.raises(ValueError, match="images per class"):
        _id_dataset(per_class=4)
    with pytest.raises(ValueError, match="5-way"):
        _id_dataset(n_classes=4)


def test_uint8_images_become_unit_floats():
    images = torch.full((10, 1, 2, 2), 255, dtype=torch.uint8)
    ds = fs.EpisodeDataset(images, torch.arange(10) // 5, [0, 1], 2, 1, 1, 3, 0)
    assert ds[0]["support"].dtype == torch.float32 and ds[0]["support"].max() == 1.0


def test_mean_ci95_hand_computed():
    m, h = fs.mean_ci95([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75
    assert h == pytest.approx(1.96 * 0.5 / 2)  # sample std of (1,0,1,1) is 0.5
    m, h = fs.mean_ci95(torch.tensor([90.0, 92.0, 94.0]))
    assert (m, h) == pytest.approx((92.0, 1.96 * 2.0 / math.sqrt(3)))
    assert fs.mean_ci95([0.5]) == (0.5, 0.0)


@pytest.fixture(scope="module")
def digits():
    return fs.FewShotDigits(n_way=5, k_shot=5, q_queries=15, train_way=10, test_episodes=20, val_episodes=5)


def test_digits_splits_never_share_a_class_or_image(digits):
    train_x, train_y, train_c = digits.pools["train"]
    assert train_c == [4 * d + r for d in range(5) for r in (0, 1, 2)]  # digits 0-4 at 0/90/180 degrees
    assert set(train_y.tolist()) == set(train_c)
    _, val_y, val_c = digits.pools["val"]
    assert val_c == [4 * d + 3 for d in range(5)]  # the held-out 270-degree rotations: never trained on
    assert not set(val_c) & set(train_c)
    test_x, test_y, test_c = digits.pools["test"]
    assert test_c == [5, 6, 7, 8, 9] and set(test_y.tolist()) == set(test_c)
    from mlrun.datasets.digits import load_digits_arrays

    x, y = load_digits_arrays()
    seen = np.isin(y, [0, 1, 2, 3, 4])
    assert len(train_x) == 3 * seen.sum() and len(val_y) == seen.sum() and len(test_y) == (~seen).sum()
    # val images are rotations of training images, never test images: no pixel array of val or test is in train
    rows = {tuple(r) for r in train_x.flatten(1).tolist()}
    assert not any(tuple(r) in rows for r in test_x.flatten(1).tolist())
    assert not fs.FewShotDigits(val_rotations=[]).pools.keys() & {"val"}
    with pytest.raises(ValueError, match="val_rotations"):
        fs.FewShotDigits(val_rotations=[45])


def test_trainval_stage_trains_on_train_and_val_classes_and_hides_val(digits):
    d = fs.FewShotDigits(n_way=5, k_shot=1, q_queries=1, train_way=20, test_episodes=2, val_episodes=2,
                         trainval_stages=["retrain"])
    with pytest.raises(ValueError, match="20-way"):
        d.dataset("train", "select")  # 15 training classes only
    retrain = d.dataset("train", "retrain")
    assert sorted(retrain.classes) == list(range(20))  # train's 15 classes + val's 5
    e = retrain[0]
    assert fs.episode_setting(e) == (20, 1)
    with pytest.raises(KeyError):
        d.dataset("val", "retrain")
    assert len(d.dataset("val", "select")) == 2 and len(d.dataset("test", "retrain")) == 2


def test_digits_rotation_classes_are_rotated_originals(digits):
    x, y, _ = digits.pools["train"]
    orig = x[y == 1 * 4 + 0]  # digit 1, rotation 0
    rot90 = x[y == 1 * 4 + 1]
    assert torch.equal(torch.rot90(orig, 1, dims=(-2, -1)), rot90)
    assert x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_digits_episodes_train_way_and_fixed_eval_episodes(digits):
    e = digits.dataset("train")[0]
    assert e["support"].shape == (50, 1, 8, 8) and e["query"].shape == (150, 1, 8, 8)
    assert fs.episode_setting(e) == (10, 5)
    t = digits.dataset("test")
    assert len(t) == 20 and fs.episode_setting(t[0]) == (5, 5)
    other = fs.FewShotDigits(n_way=5, k_shot=5, seed=3, test_episodes=20)  # another run seed: same test episodes
    assert torch.equal(other.dataset("test")[7]["query"], t[7]["query"])
    assert not torch.equal(other.dataset("train")[0]["support"][:25], digits.dataset("train")[0]["support"][:25])


def test_omniglot_fixture_vinyals_split(tmp_path):
    fs.write_omniglot_fixture(tmp_path, alphabets=2, characters=3)
    pngs = sorted((tmp_path / "omniglot-py" / "images_background").glob("*/character01/*.png"))
    assert len(pngs) == 2 * 20 and pngs[0].name == "0001_01.png"
    d = fs.Omniglot(root=str(tmp_path), n_way=3, k_shot=1, train_way=5, q_queries=5, test_ways=[3, 5],
                    test_episodes=4, train_split="train")
    assert set(d.pools) == {"train", "val", "test"}
    assert len(d.pools["train"][2]) == 2 * 2 * 4 and len(d.pools["val"][2]) == 2 * 4
    assert len(d.pools["test"][2]) == 2 * 3 * 4
    x, y, _ = d.pools["train"]
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(torch.rot90(x[y == 0], 1, dims=(-2, -1)), x[y == 1])  # rot000 -> rot090 of a character
    e = d.dataset("train")[0]
    assert fs.episode_setting(e) == (5, 1) and e["query"].shape == (25, 1, 28, 28)
    assert e["support"].max() <= 1.0 and e["support"].mean() < 0.5  # inverted: strokes bright on dark
    test = d.dataset("test")
    assert len(test) == 8 and [fs.episode_setting(test[i])[0] for i in (0, 4)] == [3, 5]
    with pytest.raises(KeyError):
        fs.Omniglot(root=str(tmp_path), test_episodes=2, train_way=5).dataset("val")  # trainval: no val split


def test_omniglot_as_released_uses_the_shipped_vinyals_split(tmp_path):
    """torchvision's release has no split files: the loader falls back on the lists shipped with mlrun (1,200
    training characters, 423 test characters, x 4 rotations) and finds every character they name."""
    lists = {f: (fs.SPLITS_DIR / "omniglot_vinyals" / f"{f}.txt").read_text().split()
             for f in ("train", "val", "trainval", "test")}
    assert {f: len(v) for f, v in lists.items()} == {"train": 4112, "val": 688, "trainval": 4800, "test": 1692}
    assert set(lists["train"]) | set(lists["val"]) == set(lists["trainval"])
    assert not set(lists["trainval"]) & set(lists["test"])
    assert not {c.rpartition("/")[0] for c in lists["trainval"]} & {c.rpartition("/")[0] for c in lists["test"]}
    fs.write_omniglot_fixture(tmp_path, drawers=2, released=True, image_size=8)
    base = tmp_path / "omniglot-py"
    assert not (base / "splits").exists() and fs.omniglot_split_dir(base) == fs.SPLITS_DIR / "omniglot_vinyals"
    d = fs.Omniglot(root=str(tmp_path), n_way=5, k_shot=1, q_queries=1, train_way=60, test_queries=1,
                    test_ways=[5], test_episodes=2, train_split="train", trainval_stages=["retrain"])
    assert {k: len(v[2]) for k, v in d.pools.items()} == {"train": 4112, "val": 688, "test": 1692}
    assert len(d.dataset("train", "retrain").classes) == 4800
    assert fs.episode_setting(d.dataset("train")[0]) == (60, 1)


def test_omniglot_missing_data_names_path(tmp_path):
    with pytest.raises(DataError, match="images_background"):
        fs.Omniglot(root=str(tmp_path))
    fs.write_omniglot_fixture(tmp_path, alphabets=1, characters=2)
    (tmp_path / "omniglot-py" / "splits" / "vinyals" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt"):
        fs.Omniglot(root=str(tmp_path))


def test_miniimagenet_fixture(tmp_path):
    fs.write_miniimagenet_fixture(tmp_path, classes=5, per_class=6, size=20)
    header = (tmp_path / "miniimagenet" / "train.csv").read_text().splitlines()[:2]
    assert header[0] == "filename,label" and header[1].split(",")[0].endswith(".jpg")
    d = fs.MiniImageNet(root=str(tmp_path), n_way=5, k_shot=1, q_queries=2, train_way=5, test_queries=5,
                        test_episodes=3)
    assert {k: len(v[2]) for k, v in d.pools.items()} == {"train": 5, "val": 5, "test": 5}
    by_shot = {1: 4, 5: 3}  # the training way picked by shot, as the paper's 30-way 1-shot / 20-way 5-shot
    assert fs.MiniImageNet(root=str(tmp_path), k_shot=1, q_queries=1, train_way=by_shot).train_way == 4
    assert fs.MiniImageNet(root=str(tmp_path), k_shot=5, q_queries=1, train_way=by_shot).train_way == 3
    e = d.dataset("train")[0]
    assert e["support"].shape == (5, 3, 84, 84) and e["query"].shape == (10, 3, 84, 84)
    assert 0 <= e["support"].min() and e["support"].max() <= 1
    # the fixture's classes are colours: images of one class are close to each other
    q = d.dataset("test")[0]
    s_mean = q["support"].mean(dim=(2, 3))
    q_mean = q["query"].mean(dim=(2, 3))
    assert (torch.cdist(q_mean, s_mean).argmin(1) == q["query_y"]).float().mean() > 0.8
    (tmp_path / "miniimagenet" / "val.csv").unlink()
    with pytest.raises(DataError, match="val.csv"):
        fs.MiniImageNet(root=str(tmp_path))


@pytest.mark.parametrize("folder", ["miniImageNet", "miniimagenet", "miniImagenet"])
def test_miniimagenet_folder_found_under_any_usual_spelling(tmp_path, folder):
    fs.write_miniimagenet_fixture(tmp_path, subdir=folder, classes=5, per_class=2, size=8)
    d = fs.MiniImageNet(root=str(tmp_path), k_shot=1, q_queries=1, train_way=5, test_episodes=1)
    assert len(d.pools["train"][2]) == 5
    with pytest.raises(DataError, match="mini-imagenet"):  # an explicit subdir is taken as given
        fs.MiniImageNet(root=str(tmp_path), subdir="mini-imagenet")
    with pytest.raises(DataError, match="miniimagenet,miniImageNet,miniImagenet"):
        fs.MiniImageNet(root=str(tmp_path / "empty"))


def test_episode_setting_reads_way_and_shot():
    e = {"support_y": torch.tensor([0, 0, 0, 1, 1, 1])}
    assert fs.episode_setting(e) == (2, 3)
    assert np.isclose(fs.mean_ci95(np.ones(600))[1], 0.0)
