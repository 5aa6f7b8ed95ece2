"""Bottom-Up Top-Down data: questions and captions follow the layout, regions, VQA v2 loader on its fixture."""

import numpy as np
import pytest
import torch

from mlrun.datasets.butd import (
    VQA2,
    DigitVQA,
    build_vocab,
    encode,
    normalize_answer,
    read_feature_tsv,
    region_boxes,
    scene_captions,
    scene_questions,
    soft_scores,
    write_vqa2_fixture,
)
from mlrun.datasets.scenes import Scene
from mlrun.errors import DataError


def _scene() -> Scene:
    # a 3 on the left (big), a 7 in the middle, a 7 on the right (small)
    boxes = np.array([[2, 10, 22, 40], [28, 10, 40, 30], [50, 20, 58, 30]], np.float32)
    return Scene(np.zeros((64, 64), np.float32), boxes, np.array([3, 7, 7]))


def test_questions_answer_from_the_layout():
    scene = _scene()
    seen: dict[str, set] = {}
    for seed in range(60):
        for q in scene_questions(scene, np.random.default_rng(seed)):
            seen.setdefault(q["type"], set()).add((q["question"], q["answer"]))
            assert q["answers"] == [q["answer"]] * 10
    count = dict(seen["count"])
    assert count["how many digits are there?"] == "3"
    assert count.get("how many 7s are there?", "2") == "2" and count.get("how many 3s are there?", "1") == "1"
    presence = dict(seen["presence"])
    assert all(a == ("yes" if q in ("is there a 3?", "is there a 7?") else "no") for q, a in presence.items())
    # only the 3 is unique: right of it, the nearest digit is the middle 7; nothing is left of it
    assert seen["spatial"] == {("what digit is right of the 3?", "7")}
    assert seen["superlative"] <= {("what is the largest digit?", "3"), ("what is the smallest digit?", "7")}


def test_single_digit_scene_has_no_spatial_or_superlative_question():
    scene = Scene(np.zeros((64, 64), np.float32), np.array([[0, 0, 10, 10]], np.float32), np.array([4]))
    types = {q["type"] for s in range(20) for q in scene_questions(scene, np.random.default_rng(s))}
    assert types == {"count", "presence"}


def test_answer_noise_replaces_answers():
    qs = scene_questions(_scene(), np.random.default_rng(0), answer_noise=1.0)
    assert any(a != q["answer"] for q in qs for a in q["answers"])


def test_captions_two_to_three_phrasings():
    caps = scene_captions(_scene(), np.random.default_rng(0))
    assert sorted(caps) == sorted(["a 3 , a 7 and a 7 from left to right", "three digits : a 3 , a 7 and a 7",
                                   "a large 3 among two other digits"])
    one = Scene(np.zeros((8, 8), np.float32), np.array([[0, 0, 4, 4]], np.float32), np.array([5]))
    assert len(scene_captions(one, np.random.default_rng(0))) == 2


def test_caption_references_are_spelled_with_the_training_vocabulary():
    """Scored references are tokenised as the training captions: every word is one the decoder can say."""
    from mlrun.datasets.butd import DigitCaptions

    data = DigitCaptions(n_train=40, n_val=4, n_test=10)
    refs = data.references("test")
    assert len(refs) == 10 and all(2 <= len(r) <= 3 for r in refs)
    words = {w for r in refs for c in r for w in c.split()}
    assert words and not words & {",", ":"} and words <= set(data.vocab)
    assert [r.replace(" ,", "").replace(" :", "") for r in data.captions("test")[0]] == refs[0]


def test_region_boxes_jittered_ground_truth_then_background():
    scene = _scene()
    boxes, labels = region_boxes(scene, np.random.default_rng(0), k=8, jitter=0.0)
    assert boxes.shape == (8, 4) and labels.tolist() == [3, 7, 7, 10, 10, 10, 10, 10]
    assert np.allclose(boxes[:3], scene.boxes)
    from mlrun.datasets.scenes import box_iou_np

    assert box_iou_np(boxes[3:], scene.boxes).max() < 0.3
    jittered, _ = region_boxes(scene, np.random.default_rng(0), k=8, jitter=0.1)
    assert not np.allclose(jittered[:3], scene.boxes) and np.abs(jittered[:3] - scene.boxes).max() < 10


def test_text_helpers():
    vocab = build_vocab(["how many 7s are there?", "is there a 7?"])
    assert vocab[:3] == ["<pad>", "<unk>", "there"]
    ids = encode("is there a 9?", {w: i for i, w in enumerate(vocab)}, max_len=6)
    assert ids.tolist() == [vocab.index("is"), 2, vocab.index("a"), 1, 0, 0]
    target = soft_scores(["2"] * 2 + ["3"] * 8, {"2": 0, "3": 1, "4": 2})
    assert torch.allclose(target, torch.tensor([2 / 3, 1.0, 0.0]))
    assert normalize_answer("Two.") == "2" and normalize_answer("a red bus") == "red bus"


def test_digit_vqa_deterministic_and_complete():
    a = DigitVQA(n_train=20, n_val=4, n_test=4, seed=3)
    b = DigitVQA(n_train=20, n_val=4, n_test=4, seed=3)
    assert a.questions("train") == b.questions("train")
    ds = a.dataset("train")
    item = ds[0]
    assert item["question"].shape == (14,) and item["target"].shape == (12,) and item["answers"].shape == (10,)
    assert item["target"].sum() == 1.0
    images, boxes, labels = a.dataset("train", "pretrain")[0]
    assert images.shape == (1, 64, 64) and boxes.shape == (8, 4) and labels.shape == (8,)
    with pytest.raises(KeyError):
        DigitVQA(n_val=0).dataset("val")


def test_vqa2_fixture_loads(tmp_path):
    root = write_vqa2_fixture(tmp_path, n_images=2, k=36, dim=16)
    raw = read_feature_tsv(root / "vqa2" / "features" / "train_36.tsv")
    assert raw["features"].shape == (2, 36, 16) and raw["boxes"].shape == (2, 36, 4)
    data = VQA2(root=str(root), min_answer_count=1)
    assert data.answers == sorted({"2", "yes", "red", "no", "1"})
    ds = data.dataset("test")
    item = ds[0]
    assert item["features"].shape == (36, 16) and item["boxes"].max() <= 1.0
    # nine annotators said "two" -> "2" scores 1; one said "one" -> 1/3
    assert item["target"][data.answers.index("2")] == 1.0
    assert torch.isclose(item["target"][data.answers.index("1")], torch.tensor(1 / 3))
    assert item["qtype"] == VQA2.qtypes.index("number")


def test_vqa2_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="visualqa.org"):
        VQA2(root=str(tmp_path)).dataset("train")


def test_coco_captions_fixture_loads_karpathy_splits(tmp_path):
    import h5py

    from mlrun.datasets.butd import COCOCaptions, write_coco_caption_fixture

    root = write_coco_caption_fixture(tmp_path, n_images=8, k=36, dim=16)
    data = COCOCaptions(root=str(root), min_word_count=1, max_len=5)
    # images alternate train/restval/val/test: train = train + restval (4 of 8), five sentences each
    assert data.describe()["images"] == {"train": 4, "val": 2, "test": 2}
    vocab = data.vocab
    assert vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"] and "bench" in vocab
    train = data.dataset("train")
    assert len(train) == 4 * 5
    item = train[0]
    # <bos> a man riding a bike -> cut to 5 words, then <eos>: [bos, a, man, riding, a, bike, eos]
    words = [vocab[i] for i in item["tokens"].tolist()]
    assert words[0] == "<bos>" and words[-1] == "<eos>" and len(words) == 5 + 2
    assert words[1:-1] == "a man riding a bike".split()
    assert item["features"].shape == (36, 16) and 0.0 <= item["boxes"].min() and item["boxes"].max() <= 1.0
    # the features come from the image's own file and row (train2014 and val2014 are separate files)
    image = data._split("test")[1]
    with h5py.File(root / "coco" / "features" / f"{image['filepath']}.h5") as f:
        row = list(f["image_ids"][:]).index(image["cocoid"])
        expected = torch.from_numpy(f["features"][row])
    test = data.dataset("test")
    assert len(test) == 2 and torch.equal(test[1]["features"], expected) and "tokens" not in test[1]
    assert data.references("test")[1] == [" ".join(s["tokens"]) for s in image["sentences"]]
    assert len(data.dataset("train", "scst")) == 4  # self-critical training goes by image


def test_coco_captions_missing_data_is_one_clear_error(tmp_path):
    from mlrun.datasets.butd import COCOCaptions

    with pytest.raises(DataError, match="dataset_coco.json"):
        COCOCaptions(root=str(tmp_path)).dataset("train")
