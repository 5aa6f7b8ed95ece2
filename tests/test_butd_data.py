"""Bottom-Up Top-Down data: questions and captions follow the layout; the released features' TSV read as
released; VQA v2 and COCO captions loaders on fixtures in the public layouts."""

import json

import numpy as np
import pytest
import torch

from mlrun.datasets.butd import (
    FEATURES_TSV,
    VQA2,
    DigitVQA,
    FeatureStore,
    build_vocab,
    encode,
    filter_answers,
    index_feature_tsv,
    normalize_answer,
    scene_captions,
    scene_questions,
    soft_scores,
    write_feature_tsv,
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


def test_text_helpers():
    vocab = build_vocab(["how many 7s are there?", "is there a 7?"])
    assert vocab[:3] == ["<pad>", "<unk>", "there"]
    ids = encode("is there a 9?", {w: i for i, w in enumerate(vocab)}, max_len=6)
    assert ids.tolist() == [vocab.index("is"), 2, vocab.index("a"), 1, 0, 0]
    target = soft_scores(["2"] * 2 + ["3"] * 8, {"2": 0, "3": 1, "4": 2})
    assert torch.allclose(target, torch.tensor([2 / 3, 1.0, 0.0]))
    # the reference's normalisation: number words, articles, full stops (not in numbers), punctuation
    assert normalize_answer("Two.") == "2" and normalize_answer("a red bus") == "red bus"
    assert normalize_answer("None") == "0" and normalize_answer("2.5") == "2.5" and normalize_answer("ten") == "10"
    assert normalize_answer("t-shirt") == "t shirt" and normalize_answer("yes, sir") == "yes sir"
    assert normalize_answer("1,000") == "1000"


def test_filter_answers_counts_questions_whose_consensus_it_is():
    """hengyuan-hu's rule: an answer is a candidate when it is the consensus (multiple_choice_answer) of at least
    n questions; how many annotators gave it elsewhere does not count."""
    anns = [{"question_id": i, "multiple_choice_answer": a}
            for i, a in enumerate(["yes"] * 3 + ["Two"] * 2 + ["2"] + ["red"] * 2 + ["blue"])]
    anns.append({"question_id": 0, "multiple_choice_answer": "yes"})  # the same question twice counts once
    assert filter_answers(anns, 3) == ["2", "yes"]
    assert filter_answers(anns, 2) == ["2", "red", "yes"]


def test_digit_vqa_deterministic_and_complete():
    a = DigitVQA(n_train=20, n_val=4, n_test=4, seed=3)
    b = DigitVQA(n_train=20, n_val=4, n_test=4, seed=3)
    assert a.questions("train") == b.questions("train")
    ds = a.dataset("train")
    item = ds[0]
    assert item["question"].shape == (14,) and item["target"].shape == (12,) and item["answers"].shape == (10,)
    assert item["target"].sum() == 1.0
    image, target = a.dataset("train", "detector")[0]  # the detector trains on the scenes' own boxes and labels
    scene = a.scenes("train")[0]
    assert image.shape == (1, 64, 64) and torch.equal(target["boxes"], torch.from_numpy(scene.boxes))
    assert a.scene_key("train") == DigitVQA(n_train=20, n_val=9, n_test=1, seed=3).scene_key("train")
    assert a.scene_key("train") != DigitVQA(n_train=20, seed=4).scene_key("train")
    with pytest.raises(KeyError):
        DigitVQA(n_val=0).dataset("val")


def _rows(ids, k=3, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image_id": i, "image_w": 100 + i, "image_h": 50, "boxes": rng.uniform(0, 50, (k, 4)).astype(np.float32),
             "features": rng.random((k, dim)).astype(np.float32)} for i in ids]


def test_feature_tsv_is_read_as_released_row_by_row(tmp_path):
    """The TSV has the authors' columns (base64 float32); the index (one streaming pass) finds each image's row,
    is kept beside the file, and is rebuilt when the file changes."""
    import base64
    import csv
    import sys

    rows = _rows([7, 3, 42])
    path = write_feature_tsv(tmp_path / "feats.tsv", rows)
    csv.field_size_limit(sys.maxsize)
    with open(path) as f:  # as the authors' reader (generate_tsv.py / read_tsv.py) parses it
        first = next(csv.DictReader(f, delimiter="\t", fieldnames=["image_id", "image_w", "image_h", "num_boxes",
                                                                   "boxes", "features"]))
    assert first["image_id"] == "7" and first["num_boxes"] == "3"
    assert np.array_equal(np.frombuffer(base64.b64decode(first["features"]), np.float32).reshape(3, 5),
                          rows[0]["features"])
    store = FeatureStore(path)
    assert (tmp_path / "feats.tsv.index.npy").exists() and sorted(store.index) == [3, 7, 42]
    feats, boxes = store(42)
    assert torch.equal(feats, torch.from_numpy(rows[2]["features"]))
    assert torch.allclose(boxes, torch.from_numpy(rows[2]["boxes"]) / torch.tensor([142.0, 50, 142, 50]))
    write_feature_tsv(path, _rows([5, 42], seed=1))  # a new file: the kept index must not be trusted
    assert sorted(index_feature_tsv(path)) == [5, 42]
    assert torch.equal(FeatureStore(path)(42)[0], torch.from_numpy(_rows([5, 42], seed=1)[1]["features"]))


def test_vqa2_fixture_loads(tmp_path):
    root = write_vqa2_fixture(tmp_path, n_images=2, k=36, dim=16)
    assert (root / "vqa2" / "v2_OpenEnded_mscoco_val2014_questions.json").exists()
    assert (root / FEATURES_TSV).exists() and not list((root / "vqa2").glob("*.tsv"))  # one TSV: train + val
    data = VQA2(root=str(root), min_answer_count=1)
    # candidates: the consensus answers ("two" normalised to "2"), not every annotator's ("one" is nobody's)
    assert data.answers == sorted({"2", "yes", "red", "no"})
    ds = data.dataset("test")
    item = ds[0]
    assert item["features"].shape == (36, 16) and item["boxes"].max() <= 1.0
    assert item["target"][data.answers.index("2")] == 1.0 and item["target"].sum() == 1.0
    assert item["qtype"] == VQA2.qtypes.index("number")
    assert len(data.dataset("train")) == 2 * 4
    assert VQA2(root=str(root), min_answer_count=5).answers == []  # 4 questions per answer in the fixture


def test_vqa2_folder_and_features_keys(tmp_path):
    root = write_vqa2_fixture(tmp_path / "a", n_images=1)
    (tmp_path / "b").mkdir()
    (root / "vqa2").rename(tmp_path / "b" / "questions")
    data = VQA2(root=str(tmp_path / "b"), folder="questions", features=str(root / FEATURES_TSV),
                min_answer_count=1)
    assert len(data.dataset("test")) == 4


def test_vqa2_image_without_features_is_one_clear_error_when_the_split_is_built(tmp_path):
    root = write_vqa2_fixture(tmp_path, n_images=2)
    write_feature_tsv(root / FEATURES_TSV, _rows([100, 101, 1100], dim=16))  # val image 1101 has no row
    data = VQA2(root=str(root), min_answer_count=1)
    assert len(data.dataset("train")) == 8
    with pytest.raises(DataError) as err:
        data.dataset("test")
    msg = str(err.value)
    assert "1101" in msg and str(root / FEATURES_TSV) in msg and "\n" not in msg


def test_vqa2_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="visualqa.org"):
        VQA2(root=str(tmp_path)).dataset("train")


def test_coco_captions_fixture_loads_karpathy_splits(tmp_path):
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
    # the features come from the image's own row of the one train2014 + val2014 file
    image = data._split("test")[1]
    assert image["filepath"] == "val2014"
    expected = FeatureStore(root / FEATURES_TSV)(image["cocoid"])[0]
    assert json.loads((root / "coco" / "dataset_coco.json").read_text())["images"][0]["sentences"][0]["tokens"]
    test = data.dataset("test")
    assert len(test) == 2 and torch.equal(test[1]["features"], expected) and "tokens" not in test[1]
    assert data.references("test")[1] == [" ".join(s["tokens"]) for s in image["sentences"]]
    assert len(data.dataset("train", "scst")) == 4  # self-critical training goes by image


def test_coco_captions_missing_data_is_one_clear_error(tmp_path):
    from mlrun.datasets.butd import COCOCaptions

    with pytest.raises(DataError, match="dataset_coco.json"):
        COCOCaptions(root=str(tmp_path)).dataset("train")
