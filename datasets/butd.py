"""Data for Bottom-Up and Top-Down attention (Anderson et al. 2018): VQA and captions over region features.

CPU miniature: digit scenes (`mlrun.datasets.scenes`) with questions generated from each scene's layout (count,
presence, spatial, superlative; ten VQA-style answers each), 2-3 captions per scene, and "bottom-up" region
boxes: the scene's ground-truth boxes jittered (a stand-in for a detector's detections) padded to a fixed k with
selective-search proposals that cover background (the paper's fixed 36 boxes also hold non-object regions).

Paper scale: VQA v2 questions/annotations JSON with the released bottom-up features, either as the authors' TSV
(image_id, image_w, image_h, num_boxes, boxes, features; base64 float32) or as one HDF5 file per split
(`image_ids` [N], `boxes` [N, k, 4], `features` [N, k, D], `image_w`/`image_h` [N]); `tsv_to_hdf5` converts the
first into the second. COCO captions in Karpathy's split (`dataset_coco.json`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mlrun.datasets.scenes import Scene, box_iou_np, make_scenes
from mlrun.errors import DataError
from mlrun.task import DataModule

QTYPES = ("count", "presence", "spatial", "superlative")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD, UNK = "<pad>", "<unk>"

# ------------------------------------------------------------------------------------------- text


def tokenize(text: str) -> list[str]:
    """Lower-case words; punctuation other than apostrophes splits and is dropped (as the VQA preprocessing)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def build_vocab(texts: list[str], min_count: int = 1) -> list[str]:
    """Word list with <pad> at 0 and <unk> at 1, the rest by frequency then alphabetically (deterministic)."""
    counts = Counter(w for t in texts for w in tokenize(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK] + words


def encode(text: str, vocab: dict[str, int], max_len: int = 14) -> torch.Tensor:
    """Token ids padded/truncated to max_len (the paper keeps the first 14 words)."""
    ids = [vocab.get(w, 1) for w in tokenize(text)][:max_len]
    return torch.tensor(ids + [0] * (max_len - len(ids)), dtype=torch.long)


def soft_scores(answers: list[str], answer_index: dict[str, int]) -> torch.Tensor:
    """VQA soft target per candidate answer: min(#annotators who gave it / 3, 1)."""
    target = torch.zeros(len(answer_index))
    for a, c in Counter(answers).items():
        if a in answer_index:
            target[answer_index[a]] = min(c / 3.0, 1.0)
    return target


# ------------------------------------------------------------------------------- digit-scene questions

DIGIT_ANSWERS = tuple(str(d) for d in range(10)) + ("yes", "no")


def _centers(scene: Scene) -> np.ndarray:
    return (scene.boxes[:, :2] + scene.boxes[:, 2:]) / 2


def scene_questions(scene: Scene, rng: np.random.Generator, answer_noise: float = 0.0) -> list[dict[str, Any]]:
    """One question of each type the layout allows, with ten answers (each replaced by a random candidate
    answer with probability `answer_noise`, like disagreeing annotators).

    count: "how many digits are there?" half of the time, else "how many 7s are there?" (the digit is one in the
    scene half of the time); presence: "is there a 5?"
    (yes half of the time); spatial: "what digit is left of the 3?" (the anchor's label is unique; the answer is
    the nearest digit whose centre lies on that side); superlative: "what is the largest digit?" (by box area,
    asked only when the largest/smallest is at least 20% larger/smaller than the runner-up).
    """
    labels, boxes = scene.labels, scene.boxes
    present = sorted(set(labels.tolist()))
    out: list[tuple[str, str, str]] = []
    if rng.random() < 0.5:
        out.append(("count", "how many digits are there?", str(len(labels))))
    else:
        d = int(rng.choice(present)) if present and rng.random() < 0.5 else int(rng.integers(10))
        out.append(("count", f"how many {d}s are there?", str(int((labels == d).sum()))))
    if present and rng.random() < 0.5:
        out.append(("presence", f"is there a {int(rng.choice(present))}?", "yes"))
    else:
        absent = [x for x in range(10) if x not in present]
        out.append(("presence", f"is there a {int(rng.choice(absent))}?", "no"))
    centers = _centers(scene)
    unique = [i for i in range(len(labels)) if (labels == labels[i]).sum() == 1]
    options = []
    for i in unique:
        for side, sign in (("left", -1), ("right", 1)):
            dx = (centers[:, 0] - centers[i, 0]) * sign
            cand = np.nonzero(dx > 2)[0]
            if len(cand):
                j = cand[np.argmin(np.linalg.norm(centers[cand] - centers[i], axis=1))]
                options.append((f"what digit is {side} of the {labels[i]}?", str(labels[j])))
    if options:
        q, a = options[int(rng.integers(len(options)))]
        out.append(("spatial", q, a))
    if len(labels) >= 2:
        area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        order = np.argsort(area)
        which = ["largest", "smallest"]
        rng.shuffle(which)
        for w in which:
            first, second = (order[-1], order[-2]) if w == "largest" else (order[0], order[1])
            ratio = area[first] / area[second]
            if (w == "largest" and ratio >= 1.2) or (w == "smallest" and ratio <= 1 / 1.2):
                out.append(("superlative", f"what is the {w} digit?", str(labels[first])))
                break
    result = []
    for qtype, question, answer in out:
        answers = [answer if rng.random() >= answer_noise else str(rng.choice(DIGIT_ANSWERS)) for _ in range(10)]
        result.append({"type": qtype, "question": question, "answer": answer, "answers": answers})
    return result


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """2-3 phrasings of the layout: left to right, how many and which, and (with 2+ digits) the largest one."""
    labels = scene.labels
    n = len(labels)
    if n == 0:
        return ["an empty canvas", "there are no digits"]
    left_to_right = [str(x) for x in labels[np.argsort(_centers(scene)[:, 0], kind="stable")]]

    def listing(items: list[str]) -> str:
        items = [f"a {x}" for x in items]
        return items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]

    caps = [f"{listing(left_to_right)} from left to right" if n > 1 else f"a single {left_to_right[0]}",
            f"{NUMBER_WORDS[n]} {'digits' if n > 1 else 'digit'} : {listing(sorted(left_to_right))}"]
    if n >= 2:
        area = (scene.boxes[:, 2:] - scene.boxes[:, :2]).prod(1)
        big = int(labels[int(np.argmax(area))])
        caps.append(f"a large {big} among {NUMBER_WORDS[n - 1]} other {'digits' if n > 2 else 'digit'}")
    order = rng.permutation(len(caps))
    return [caps[i] for i in order]


def region_boxes(scene: Scene, rng: np.random.Generator, k: int = 8, jitter: float = 0.1,
                 background: str = "selective_search", bg_iou: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """k "detected" boxes for a scene and their labels (digit, or 10 for background).

    The ground-truth boxes jittered by N(0, jitter * side) per coordinate come first (a detector's localisation
    error), then background boxes overlapping every digit by IoU < bg_iou: selective-search proposals in random
    order, topped up with random boxes of digit-like size.
    """
    canvas = scene.image.shape[0]
    gt = scene.boxes[:k]
    side = np.concatenate([gt[:, 2:] - gt[:, :2]] * 2, axis=1) if len(gt) else gt
    det = np.clip(gt + rng.normal(0, jitter, gt.shape) * side, 0, canvas).astype(np.float32)
    det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 2)
    need = k - len(det)
    bg = np.zeros((0, 4), np.float32)
    if need > 0 and background == "selective_search":
        from mlrun.datasets.proposals import selective_search

        props = selective_search(scene.image, upscale=1.0, k=100, sigma=0.8)
        props = props[((props[:, 2:] - props[:, :2]) >= 6).all(1)]
        if len(gt) and len(props):
            props = props[box_iou_np(props, gt).max(1) < bg_iou]
        bg = props[rng.permutation(len(props))[:need]]
    while len(bg) < need:
        w, h = rng.integers(8, 29, size=2)
        x, y = rng.integers(0, canvas - w + 1), rng.integers(0, canvas - h + 1)
        box = np.array([[x, y, x + w, y + h]], np.float32)
        if not len(gt) or box_iou_np(box, gt).max() < bg_iou:
            bg = np.concatenate([bg, box])
    boxes = np.concatenate([det, bg[:need]]).astype(np.float32)
    labels = np.concatenate([scene.labels[:k], np.full(max(need, 0), 10)]).astype(np.int64)
    return boxes, labels


class SceneQA(Dataset):
    """Questions over scenes. Items: {"scene": index, "question": [L] ids, "target": [A] soft scores,
    "answers": [10] answer ids (-1 when not a candidate), "qtype": index into QTYPES}; plus "features"/"boxes"
    when the features are stored with the data (paper scale)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _qa_item(scene: int, q: dict[str, Any], vocab: dict[str, int], answer_index: dict[str, int],
             max_len: int, qtypes: tuple[str, ...]) -> dict[str, Any]:
    return {"scene": scene, "question": encode(q["question"], vocab, max_len),
            "target": soft_scores(q["answers"], answer_index),
            "answers": torch.tensor([answer_index.get(a, -1) for a in q["answers"]], dtype=torch.long),
            "qtype": qtypes.index(q["type"]) if q["type"] in qtypes else len(qtypes)}


class DigitVQA(DataModule):
    """VQA on digit scenes. The model reads `images(split)` and `regions(split)` once per split to compute
    (and keep) its frozen features; items point at their scene by index.

    Args:
        n_train, n_val, n_test: scenes per split (each gives up to one question of every type).
        k: regions per scene; jitter, background: see `region_boxes`.
        answer_noise: share of the ten answers replaced by random ones.
        stage_batch: batch sizes for named stages (e.g. the trunk's pretraining).
    """

    qtypes = QTYPES

    def __init__(self, n_train: int = 600, n_val: int = 100, n_test: int = 400, canvas: int = 64, seed: int = 0,
                 k: int = 8, jitter: float = 0.1, background: str = "random", answer_noise: float = 0.0,
                 max_len: int = 14, batch_size: int | None = 64, eval_batch_size: int | None = 256,
                 scene_kw: dict | None = None) -> None:
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.canvas, self.seed, self.k, self.jitter, self.background = canvas, seed, k, jitter, background
        self.answer_noise, self.max_len = answer_noise, max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.scene_kw = dict(scene_kw or {})
        self.answers = list(DIGIT_ANSWERS)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self._cache: dict[str, Any] = {}

    def scenes(self, split: str) -> list[Scene]:
        if self.sizes.get(split, 0) <= 0:
            raise KeyError(split)
        return make_scenes(split, self.sizes[split], self.seed, self.canvas, **self.scene_kw)

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self._cache:
            scenes = self.scenes(split)
            rng = np.random.default_rng([self.seed, ("train", "val", "test").index(split), 12])
            qs = [scene_questions(s, rng, self.answer_noise) for s in scenes]
            regions = [region_boxes(s, rng, self.k, self.jitter, self.background) for s in scenes]
            caps = [scene_captions(s, rng) for s in scenes]
            self._cache[split] = {"questions": qs, "regions": regions, "captions": caps}
        return self._cache[split]

    @property
    def vocab(self) -> list[str]:
        """Built from the training questions only."""
        return build_vocab([q["question"] for qs in self._split("train")["questions"] for q in qs])

    def images(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([s.image for s in self.scenes(split)]))[:, None]

    def regions(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes [N, k, 4] and region labels [N, k] (10 = background)."""
        boxes, labels = zip(*self._split(split)["regions"])
        return torch.from_numpy(np.stack(boxes)), torch.from_numpy(np.stack(labels))

    def questions(self, split: str) -> list[list[dict[str, Any]]]:
        return self._split(split)["questions"]

    def captions(self, split: str) -> list[list[str]]:
        return self._split(split)["captions"]

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if stage == "pretrain":  # scenes with their region labels, for the trunk's (detector's) training
            from torch.utils.data import TensorDataset

            boxes, labels = self.regions(split)
            return TensorDataset(self.images(split), boxes, labels)
        vocab = {w: i for i, w in enumerate(self.vocab)}
        items = [_qa_item(i, q, vocab, self.answer_index, self.max_len, self.qtypes)
                 for i, qs in enumerate(self.questions(split)) for q in qs]
        return SceneQA(items)

    def describe(self) -> dict[str, Any]:
        return {**{f"{k}_scenes": v for k, v in self.sizes.items()}, "answers": len(self.answers), "k": self.k}


# ------------------------------------------------------------------------------------ paper scale: VQA v2

VQA_FILES = {"train": "train2014", "val": "val2014"}
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


def read_feature_tsv(path: str | Path) -> dict[str, np.ndarray]:
    """The authors' released bottom-up features (one image a line, boxes/features as base64 float32)."""
    import base64
    import csv
    import sys

    csv.field_size_limit(sys.maxsize)
    ids, ws, hs, boxes, feats = [], [], [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", fieldnames=TSV_FIELDS):
            n = int(row["num_boxes"])
            ids.append(int(row["image_id"]))
            ws.append(int(row["image_w"]))
            hs.append(int(row["image_h"]))
            boxes.append(np.frombuffer(base64.b64decode(row["boxes"]), dtype=np.float32).reshape(n, 4))
            feats.append(np.frombuffer(base64.b64decode(row["features"]), dtype=np.float32).reshape(n, -1))
    return {"image_ids": np.array(ids, np.int64), "image_w": np.array(ws, np.int64),
            "image_h": np.array(hs, np.int64), "boxes": np.stack(boxes), "features": np.stack(feats)}


def write_features_hdf5(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Our one feature layout (per split): image_ids [N], image_w/image_h [N], boxes [N, k, 4], features [N, k, D]."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def tsv_to_hdf5(tsv: str | Path, out: str | Path) -> Path:
    return write_features_hdf5(out, read_feature_tsv(tsv))


class FeatureStore:
    """Reads precomputed features lazily from one or more HDF5 files in our layout (COCO's train2014 and val2014
    images live in separate files); each file is opened in each worker on first use."""

    def __init__(self, *paths: Path) -> None:
        import h5py

        self.paths = list(paths)
        self.index: dict[int, tuple[int, int]] = {}
        wh = []
        for p, path in enumerate(self.paths):
            with h5py.File(path, "r") as f:
                self.index.update({int(i): (p, n) for n, i in enumerate(f["image_ids"][:])})
                wh.append(np.stack([f["image_w"][:], f["image_h"][:]], 1).astype(np.float32))
        self.image_wh = wh
        self._files: list[Any] | None = None

    def __call__(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [k, D] and boxes [k, 4] normalised to [0, 1] by the image's size."""
        import h5py

        if self._files is None:
            self._files = [h5py.File(path, "r") for path in self.paths]
        p, n = self.index[image_id]
        boxes = torch.from_numpy(self._files[p]["boxes"][n].astype(np.float32))
        wh = torch.from_numpy(self.image_wh[p][n]).repeat(2)
        return torch.from_numpy(self._files[p]["features"][n].astype(np.float32)), boxes / wh

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}


class FeatureQA(Dataset):
    def __init__(self, items: list[dict[str, Any]], store: FeatureStore) -> None:
        self.items, self.store = items, store

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.items[i])
        item["features"], item["boxes"] = self.store(item.pop("image_id"))
        return item


def normalize_answer(a: str) -> str:
    """Lower-case, strip punctuation at the ends and articles, number words to digits (VQA's evaluation, short)."""
    words = [w for w in tokenize(a.replace(",", "")) if w not in ("a", "an", "the")]
    return " ".join(str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in words)


class VQA2(DataModule):
    """VQA v2 with precomputed bottom-up features. Layout under root:

        v2_OpenEnded_mscoco_{train2014,val2014}_questions.json, v2_mscoco_{train2014,val2014}_annotations.json,
        features/{train,val}.h5   (see `write_features_hdf5`; `tsv_to_hdf5` converts the authors' TSV)

    Candidate answers: training answers given at least `min_answer_count` times (the paper's 9, about 3k).
    'test' is val2014 (the paper's single-model number is on val); there is no separate 'val'.
    """

    qtypes = ("yes/no", "number", "other")

    def __init__(self, root: str | None = None, min_answer_count: int = 9, max_len: int = 14,
                 batch_size: int | None = 512, eval_batch_size: int | None = 512) -> None:
        from mlrun.datasets.vision import data_root

        self.root = data_root(root) / "vqa2"
        self.min_answer_count, self.max_len = min_answer_count, max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._qa: dict[str, list[dict[str, Any]]] = {}

    def _load(self, split: str) -> list[dict[str, Any]]:
        if split not in self._qa:
            name = VQA_FILES[split]
            qpath = self.root / f"v2_OpenEnded_mscoco_{name}_questions.json"
            apath = self.root / f"v2_mscoco_{name}_annotations.json"
            for p in (qpath, apath, self.root / "features" / f"{split}.h5"):
                if not p.exists():
                    raise DataError(p, "VQA v2 questions/annotations JSON and features/{train,val}.h5",
                                    "Get the JSON from visualqa.org/download.html and the 36-box bottom-up features "
                                    "(trainval_36 TSV) from github.com/peteanderson80/bottom-up-attention, then "
                                    "mlrun.datasets.butd.tsv_to_hdf5(tsv, root/'vqa2/features/<split>.h5')")
            questions = {q["question_id"]: q for q in json.loads(qpath.read_text())["questions"]}
            self._qa[split] = [
                {"image_id": a["image_id"], "question": questions[a["question_id"]]["question"],
                 "answers": [normalize_answer(x["answer"]) for x in a["answers"]], "type": a["answer_type"]}
                for a in json.loads(apath.read_text())["annotations"]]
        return self._qa[split]

    @property
    def answers(self) -> list[str]:
        counts = Counter(a for q in self._load("train") for a in q["answers"])
        return sorted(a for a, c in counts.items() if c >= self.min_answer_count)

    @property
    def vocab(self) -> list[str]:
        return build_vocab([q["question"] for q in self._load("train")])

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if split not in ("train", "test"):  # the paper reports val2014 as its held-out split: our 'test'
            raise KeyError(split)
        split = {"test": "val", "train": "train"}[split]
        vocab = {w: i for i, w in enumerate(self.vocab)}
        answer_index = {a: i for i, a in enumerate(self.answers)}
        items = []
        for q in self._load(split):
            item = _qa_item(-1, q, vocab, answer_index, self.max_len, self.qtypes)
            item["image_id"] = q["image_id"]
            items.append(item)
        return FeatureQA(items, FeatureStore(self.root / "features" / f"{split}.h5"))

    def describe(self) -> dict[str, Any]:
        return {"answers": len(self.answers)}


def write_vqa2_fixture(root: str | Path, n_images: int = 3, k: int = 36, dim: int = 16) -> Path:
    """A tiny VQA v2 in the real layout: both JSON files per split and the features as the authors' TSV
    converted to HDF5 (the TSV is kept beside it)."""
    root = Path(root) / "vqa2"
    (root / "features").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    templates = [("how many dogs are there?", "two", "number"), ("is it raining?", "yes", "yes/no"),
                 ("what color is the bus?", "red", "other"), ("is there a cat?", "no", "yes/no")]
    qid = 0
    for split, name in VQA_FILES.items():
        ids = [100 + i + (1000 if split == "val" else 0) for i in range(n_images)]
        questions, annotations = [], []
        for image_id in ids:
            for text, answer, atype in templates:
                qid += 1
                questions.append({"image_id": image_id, "question": text, "question_id": qid})
                answers = [answer] * 9 + ["one"]
                annotations.append({"question_id": qid, "image_id": image_id, "answer_type": atype,
                                    "question_type": " ".join(text.split()[:2]), "multiple_choice_answer": answer,
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                                for j, a in enumerate(answers)]})
        (root / f"v2_OpenEnded_mscoco_{name}_questions.json").write_text(json.dumps({"questions": questions}))
        (root / f"v2_mscoco_{name}_annotations.json").write_text(json.dumps({"annotations": annotations}))
        _write_feature_fixture(root / "features" / f"{split}.h5", ids, rng, k, dim)
    return root.parent


def _write_feature_fixture(out: Path, ids: list[int], rng: np.random.Generator, k: int, dim: int) -> Path:
    """Random boxes and features for `ids` as the authors' TSV (kept beside), converted to our HDF5 layout."""
    import base64

    tsv = out.with_name(out.stem + "_36.tsv")
    with open(tsv, "w") as f:
        for image_id in ids:
            xy = rng.uniform(0, 300, (k, 2)).astype(np.float32)
            boxes = np.concatenate([xy, xy + rng.uniform(10, 100, (k, 2)).astype(np.float32)], 1)
            feats = rng.random((k, dim)).astype(np.float32)
            f.write("\t".join([str(image_id), "640", "480", str(k), base64.b64encode(boxes.tobytes()).decode(),
                               base64.b64encode(feats.tobytes()).decode()]) + "\n")
    return tsv_to_hdf5(tsv, out)


# ------------------------------------------------------------------------------------ digit-scene captions

BOS, EOS = "<bos>", "<eos>"


class DigitCaptions(DigitVQA):
    """Captions of digit scenes (2-3 phrasings each) over the same scenes and regions as `DigitVQA`.

    Training items are (scene, caption) pairs: {"scene", "tokens" [max_len + 2] = <bos> words <eos> <pad>...};
    evaluation items, and training items of the `scst` stage, are scenes: {"scene"}, an index into
    `references(split)`.
    """

    def __init__(self, caption_len: int = 16, **kw: Any) -> None:
        super().__init__(**kw)
        self.caption_len = caption_len

    @cached_property
    def vocab(self) -> list[str]:
        return caption_vocab([c for caps in self.captions("train") for c in caps])

    def references(self, split: str) -> list[list[str]]:
        """The scenes' captions tokenised as for training (punctuation dropped), as COCO's evaluation tokenises
        both sides: a caption the vocabulary cannot spell must not cost n-gram matches. Kept: read every
        self-critical step."""
        refs = self.__dict__.setdefault("_refs", {})
        if split not in refs:
            refs[split] = [[" ".join(tokenize(c)) for c in caps] for caps in self.captions(split)]
        return refs[split]

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if stage == "pretrain":
            return super().dataset(split, stage)
        if split != "train" or stage == "scst":  # evaluation and self-critical training go by scene
            return SceneQA([{"scene": i} for i in range(len(self.captions(split)))])
        vocab = {w: i for i, w in enumerate(self.vocab)}
        return SceneQA([{"scene": i, "tokens": caption_tokens(c, vocab, self.caption_len)}
                        for i, caps in enumerate(self.captions(split)) for c in caps])


def caption_tokens(caption: str, vocab: dict[str, int], max_len: int) -> torch.Tensor:
    """<bos> words (at most max_len, unknown ones <unk>) <eos>, padded with <pad> to max_len + 2."""
    ids = [vocab[BOS]] + [vocab.get(w, 1) for w in tokenize(caption)][:max_len] + [vocab[EOS]]
    return torch.tensor(ids + [0] * (max_len + 2 - len(ids)), dtype=torch.long)


def caption_vocab(captions: list[str], min_count: int = 1) -> list[str]:
    """<pad>, <unk>, <bos>, <eos>, then the words by frequency."""
    words = build_vocab(captions, min_count)
    return words[:2] + [BOS, EOS] + words[2:]


# ------------------------------------------------------------------------------------ paper scale: COCO captions

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class COCOCaptions(DataModule):
    """COCO captions on Karpathy's split (113,287 train incl. restval / 5,000 val / 5,000 test images) with
    precomputed bottom-up features. Layout under root:

        coco/dataset_coco.json                  Karpathy's split file: images[{cocoid, filepath, split,
                                                sentences[{tokens, raw}]}]
        coco/features/{train2014,val2014}.h5    our feature layout (`write_features_hdf5`; `tsv_to_hdf5` converts
                                                the authors' trainval_36 TSV, split by the images' COCO folder)

    Words seen fewer than `min_word_count` times in training captions become <unk> (Karpathy's 5); captions are
    cut to `max_len` words. Training items are (image, caption) pairs, all of an image's captions; evaluation
    items, and training items of the `scst` stage, are images scored against all their references.
    `features` names the folder of feature files: the ResNet grid baseline is the same layout with the grid's
    cells as boxes (for example `features=features_resnet_grid`).
    """

    def __init__(self, root: str | None = None, min_word_count: int = 5, max_len: int = 16,
                 features: str = "features", batch_size: int | None = 50, eval_batch_size: int | None = 100) -> None:
        from mlrun.datasets.vision import data_root

        self.root = data_root(root) / "coco"
        self.features = features
        self.min_word_count, self.caption_len = min_word_count, max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._images: list[dict[str, Any]] | None = None

    def _split(self, split: str) -> list[dict[str, Any]]:
        if self._images is None:
            path = self.root / "dataset_coco.json"
            if not path.exists():
                raise DataError(path, "Karpathy's dataset_coco.json and features/{train2014,val2014}.h5",
                                "Get dataset_coco.json from cs.stanford.edu/people/karpathy/deepimagesent "
                                "(caption_datasets.zip) and the 36-box bottom-up features (trainval_36 TSV) from "
                                "github.com/peteanderson80/bottom-up-attention, then "
                                "mlrun.datasets.butd.tsv_to_hdf5(tsv, root/'coco/features/<train2014|val2014>.h5')")
            self._images = json.loads(path.read_text())["images"]
        return [im for im in self._images if im["split"] in KARPATHY_SPLITS[split]]

    @cached_property  # 566k training captions: counted once, not at every self-critical step
    def vocab(self) -> list[str]:
        return caption_vocab([" ".join(s["tokens"]) for im in self._split("train") for s in im["sentences"]],
                             self.min_word_count)

    def references(self, split: str) -> list[list[str]]:
        """All of each image's captions (Karpathy's tokens); kept, since every self-critical step reads them."""
        refs = self.__dict__.setdefault("_refs", {})
        if split not in refs:
            refs[split] = [[" ".join(s["tokens"]) for s in im["sentences"]] for im in self._split(split)]
        return refs[split]

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        images = self._split(split)
        folders = sorted({Path(im["filepath"]).name for im in images})
        paths = [self.root / self.features / f"{name}.h5" for name in folders]
        for p in paths:
            if not p.exists():
                raise DataError(p, "features/{train2014,val2014}.h5 in our layout",
                                "convert the authors' trainval_36 TSV with mlrun.datasets.butd.tsv_to_hdf5")
        store = FeatureStore(*paths)
        if split == "train" and stage != "scst":
            vocab = {w: i for i, w in enumerate(self.vocab)}
            items = [{"scene": i, "image_id": im["cocoid"],
                      "tokens": caption_tokens(" ".join(s["tokens"]), vocab, self.caption_len)}
                     for i, im in enumerate(images) for s in im["sentences"]]
        else:
            items = [{"scene": i, "image_id": im["cocoid"]} for i, im in enumerate(images)]
        return FeatureQA(items, store)

    def describe(self) -> dict[str, Any]:
        return {"images": {s: len(self._split(s)) for s in KARPATHY_SPLITS}, "words": len(self.vocab)}


def write_coco_caption_fixture(root: str | Path, n_images: int = 8, k: int = 36, dim: int = 16) -> Path:
    """A tiny COCO-captions in the real layout: Karpathy's dataset_coco.json (all four splits, five sentences an
    image) and train2014/val2014 features written as the authors' TSV and converted to HDF5."""
    root = Path(root) / "coco"
    rng = np.random.default_rng(0)
    subjects = ["a man", "a dog", "two cats", "a red bus", "a woman"]
    verbs = ["riding a bike", "sitting on a bench", "standing in the grass", "parked on a street"]
    splits = ["train", "restval", "val", "test"]
    images, folders = [], {"train2014": [], "val2014": []}
    for i in range(n_images):
        folder = "train2014" if i % 2 == 0 else "val2014"
        cocoid = 500 + i
        sentences = [f"{subjects[(i + j) % len(subjects)]} {verbs[(i * j) % len(verbs)]}" for j in range(5)]
        images.append({"cocoid": cocoid, "filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
                       "split": splits[i % len(splits)], "imgid": i,
                       "sentences": [{"raw": s.capitalize() + ".", "tokens": s.split()} for s in sentences]})
        folders[folder].append(cocoid)
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for folder, ids in folders.items():
        _write_feature_fixture(root / "features" / f"{folder}.h5", ids, rng, k, dim)
    return root.parent
