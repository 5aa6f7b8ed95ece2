"""Data for Bottom-Up and Top-Down attention (Anderson et al. 2018): VQA and captions over region features.

CPU miniature: digit scenes (`mlrun.datasets.scenes`) with questions generated from each scene's layout (count,
presence, spatial, superlative; ten VQA-style answers each) and 2-3 captions per scene. The bottom-up regions are
not data: the model's detector, trained on the training scenes' boxes, proposes them (`mlrun.models.butd`).

Paper scale: VQA v2 questions/annotations JSON and COCO captions in Karpathy's split (`dataset_coco.json`), both
with the released bottom-up features read as released: the authors' one TSV for train2014 + val2014 (image_id,
image_w, image_h, num_boxes, boxes, features; base64 float32), indexed once and read a row at a time
(`FeatureStore`). The miniature's frozen features are written in the same layout (`write_feature_tsv`).
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

from mlrun.datasets.scenes import Scene, SceneDataset, make_scenes
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
    """VQA on digit scenes. The model reads `scenes(split)`/`images(split)` to train its detector (on the training
    scenes' boxes and labels) and to compute, once per split, its frozen features; items point at their scene by
    index.

    Args:
        n_train, n_val, n_test: scenes per split (each gives up to one question of every type).
        canvas, seed, scene_kw: the scenes (`mlrun.datasets.scenes.compose_scene`).
        answer_noise: share of the ten answers replaced by random ones.
    """

    qtypes = QTYPES

    def __init__(self, n_train: int = 1000, n_val: int = 100, n_test: int = 400, canvas: int = 64, seed: int = 0,
                 answer_noise: float = 0.0, max_len: int = 14, batch_size: int | None = 64,
                 eval_batch_size: int | None = 256, scene_kw: dict | None = None) -> None:
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.canvas, self.seed = canvas, seed
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

    def scene_key(self, split: str) -> dict[str, Any]:
        """What a split's scenes depend on (a key for what is computed from them, e.g. a trained detector)."""
        return {"split": split, "n": self.sizes[split], "seed": self.seed, "canvas": self.canvas,
                "scene_kw": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.scene_kw.items())}}

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self._cache:
            scenes = self.scenes(split)
            rng = np.random.default_rng([self.seed, ("train", "val", "test").index(split), 12])
            qs = [scene_questions(s, rng, self.answer_noise) for s in scenes]
            caps = [scene_captions(s, rng) for s in scenes]
            self._cache[split] = {"questions": qs, "captions": caps}
        return self._cache[split]

    @property
    def vocab(self) -> list[str]:
        """Built from the training questions only."""
        return build_vocab([q["question"] for qs in self._split("train")["questions"] for q in qs])

    def images(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([s.image for s in self.scenes(split)]))[:, None]

    def questions(self, split: str) -> list[list[dict[str, Any]]]:
        return self._split(split)["questions"]

    def captions(self, split: str) -> list[list[str]]:
        return self._split(split)["captions"]

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if stage == "detector":  # the scenes with their boxes: the detector stage's one step reads them all
            return SceneDataset(self.scenes(split))
        vocab = {w: i for i, w in enumerate(self.vocab)}
        items = [_qa_item(i, q, vocab, self.answer_index, self.max_len, self.qtypes)
                 for i, qs in enumerate(self.questions(split)) for q in qs]
        return SceneQA(items)

    def describe(self) -> dict[str, Any]:
        return {**{f"{k}_scenes": v for k, v in self.sizes.items()}, "answers": len(self.answers)}


# ------------------------------------------------------------------------------------ paper scale: features

FEATURES_TSV = "trainval_36/trainval_resnet101_faster_rcnn_genome_36.tsv"
"""The authors' released 36-box features of COCO train2014 + val2014 (github.com/peteanderson80/bottom-up-attention,
trainval_36.zip), relative to the data root: one file read by both the VQA v2 and the COCO captions loaders."""
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
FEATURES_HOW = ("Get trainval_36.zip (the 36-box bottom-up features of COCO train2014 + val2014) from "
                "github.com/peteanderson80/bottom-up-attention and unzip it under the data root, or point "
                "dataset.features at the .tsv")


def write_feature_tsv(path: str | Path, rows: Any) -> Path:
    """Rows {image_id, image_w, image_h, boxes [k, 4] pixels, features [k, D]} as the authors' TSV (one line per
    image, boxes and features as base64 float32), written one row at a time."""
    import base64

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in rows:
            boxes = np.ascontiguousarray(r["boxes"], dtype=np.float32)
            feats = np.ascontiguousarray(r["features"], dtype=np.float32)
            f.write("\t".join([str(int(r["image_id"])), str(int(r["image_w"])), str(int(r["image_h"])),
                               str(len(boxes)), base64.b64encode(boxes.tobytes()).decode(),
                               base64.b64encode(feats.tobytes()).decode()]) + "\n")
    tmp.replace(path)
    return path


def index_feature_tsv(path: str | Path) -> dict[int, int]:
    """{image id: byte offset of its row}, found by one streaming pass over the TSV (memory: one row at a time) and
    kept beside it as `<file>.index.npy` (rebuilt when the TSV's size or time changes; kept in memory only where
    the folder is read-only)."""
    path = Path(path)
    st = path.stat()
    cache = path.with_name(path.name + ".index.npy")
    if cache.exists():
        arr = np.load(cache)
        if arr.shape[0] >= 1 and tuple(arr[0]) == (st.st_size, st.st_mtime_ns):
            return dict(zip(arr[1:, 0].tolist(), arr[1:, 1].tolist()))
    ids, offsets = [], []
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            ids.append(int(line[: line.index(b"\t")]))
            offsets.append(offset)
            offset += len(line)
    arr = np.array([[st.st_size, st.st_mtime_ns], *zip(ids, offsets)], dtype=np.int64).reshape(-1, 2)
    try:
        np.save(cache, arr)
    except OSError:
        pass
    return dict(zip(ids, offsets))


class FeatureStore:
    """The released bottom-up features read as released: the authors' TSV (image_id, image_w, image_h, num_boxes,
    boxes, features), indexed once (`index_feature_tsv`) and read a row at a time; the file is opened in each
    DataLoader worker on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(self.path, "the authors' bottom-up features TSV (image_id, image_w, image_h, num_boxes, "
                                       "boxes, features)", FEATURES_HOW)
        self.index = index_feature_tsv(self.path)
        self._file: Any = None

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self.index

    def check(self, image_ids: Any, what: str) -> None:
        """One clear error for images of `what` without a feature row (found when the split is built, not in a
        DataLoader worker)."""
        missing = sorted({int(i) for i in image_ids} - self.index.keys())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(self.path, f"a feature row for image id {missing[0]}{more} of {what}",
                            "these features do not cover the split's images")

    def row(self, image_id: int) -> dict[str, Any]:
        """One image's row: image_w, image_h, boxes [k, 4] (pixels), features [k, D], float32."""
        import base64

        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the worker's life
        self._file.seek(self.index[int(image_id)])
        fields = self._file.readline().rstrip(b"\r\n").split(b"\t")
        n = int(fields[3])
        return {"image_w": int(fields[1]), "image_h": int(fields[2]),
                "boxes": np.frombuffer(base64.b64decode(fields[4]), dtype=np.float32).reshape(n, 4),
                "features": np.frombuffer(base64.b64decode(fields[5]), dtype=np.float32).reshape(n, -1)}

    def __call__(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [k, D] and boxes [k, 4] normalised to [0, 1] by the image's size."""
        r = self.row(image_id)
        wh = torch.tensor([r["image_w"], r["image_h"]] * 2, dtype=torch.float32)
        return torch.from_numpy(r["features"].copy()), torch.from_numpy(r["boxes"].copy()) / wh

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}


class FeatureQA(Dataset):
    def __init__(self, items: list[dict[str, Any]], store: FeatureStore) -> None:
        self.items, self.store = items, store

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.items[i])
        item["features"], item["boxes"] = self.store(item.pop("image_id"))
        return item


def _features_path(root: Path, features: str) -> Path:
    path = Path(features).expanduser()
    return path if path.is_absolute() else root / path


# ------------------------------------------------------------------------------------ paper scale: VQA v2

VQA_FILES = {"train": "train2014", "val": "val2014"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


def normalize_answer(a: str) -> str:
    """The VQA answer normalisation of the authors' re-implementation (hengyuan-hu/bottom-up-attention-vqa,
    `preprocess_answer`), without its contractions table: punctuation dropped (joined when next to a space, else a
    space), full stops dropped except in numbers, lower case, number words to digits, articles dropped, commas
    dropped."""
    text = a
    for p in _PUNCT:
        if f"{p} " in a or f" {p}" in a or re.search(r"\d,\d", a):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = re.sub(r"\.(?!\d)", "", text)  # the reference's pattern, in effect
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(w for w in words if w not in ("a", "an", "the")).replace(",", "")


def filter_answers(annotations: list[dict[str, Any]], min_occurrence: int = 9) -> list[str]:
    """The candidate answers as hengyuan-hu's `filter_answers`: each question's consensus answer
    (`multiple_choice_answer`, normalised); those that are the consensus of at least `min_occurrence` questions
    (3,129 over VQA v2 train + val with 9), sorted."""
    questions: dict[str, set] = {}
    for a in annotations:
        questions.setdefault(normalize_answer(a["multiple_choice_answer"]), set()).add(a["question_id"])
    return sorted(ans for ans, qs in questions.items() if len(qs) >= min_occurrence)


class VQA2(DataModule):
    """VQA v2 with the released bottom-up features. Layout (the public releases' names):

        <root>/<folder>/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json
        <root>/<folder>/v2_mscoco_{train2014,val2014}_annotations.json
        <root>/<features>   (default trainval_36/trainval_resnet101_faster_rcnn_genome_36.tsv: train2014 and
                             val2014 in one file, as released; `FeatureStore`)

    Candidate answers: `filter_answers` over the annotations of `answer_splits` (the authors' re-implementation
    counts train + val: 3,129 answers); the model's classifier is sized from them. 'test' is val2014 (the paper's
    single-model number is on val); there is no separate 'val'.
    """

    qtypes = ("yes/no", "number", "other")

    def __init__(self, root: str | None = None, folder: str = "vqa2", features: str = FEATURES_TSV,
                 min_answer_count: int = 9, answer_splits: tuple[str, ...] = ("train", "val"), max_len: int = 14,
                 batch_size: int | None = 512, eval_batch_size: int | None = 512) -> None:
        from mlrun.datasets.vision import data_root

        base = data_root(root)
        self.root = base / folder
        self.features = _features_path(base, features)
        self.min_answer_count, self.answer_splits, self.max_len = min_answer_count, tuple(answer_splits), max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._qa: dict[str, list[dict[str, Any]]] = {}
        self._annotations: dict[str, list[dict[str, Any]]] = {}
        self._store: FeatureStore | None = None

    def _paths(self, split: str) -> tuple[Path, Path]:
        name = VQA_FILES[split]
        return (self.root / f"v2_OpenEnded_mscoco_{name}_questions.json",
                self.root / f"v2_mscoco_{name}_annotations.json")

    def _annotations_of(self, split: str) -> list[dict[str, Any]]:
        if split not in self._annotations:
            for p in self._paths(split):
                if not p.exists():
                    raise DataError(p, "the VQA v2 questions and annotations JSON (v2_OpenEnded_mscoco_<split>"
                                       "_questions.json, v2_mscoco_<split>_annotations.json)",
                                    "Get them from visualqa.org/download.html (or set dataset.folder)")
            self._annotations[split] = json.loads(self._paths(split)[1].read_text())["annotations"]
        return self._annotations[split]

    def _load(self, split: str) -> list[dict[str, Any]]:
        if split not in self._qa:
            annotations = self._annotations_of(split)
            questions = {q["question_id"]: q for q in json.loads(self._paths(split)[0].read_text())["questions"]}
            self._qa[split] = [
                {"image_id": a["image_id"], "question": questions[a["question_id"]]["question"],
                 "answers": [normalize_answer(x["answer"]) for x in a["answers"]], "type": a["answer_type"]}
                for a in annotations]
        return self._qa[split]

    @cached_property
    def answers(self) -> list[str]:
        return filter_answers([a for s in self.answer_splits for a in self._annotations_of(s)],
                              self.min_answer_count)

    @cached_property
    def vocab(self) -> list[str]:
        return build_vocab([q["question"] for q in self._load("train")])

    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore(self.features)
        return self._store

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if split not in ("train", "test"):  # the paper reports val2014 as its held-out split: our 'test'
            raise KeyError(split)
        split = {"test": "val", "train": "train"}[split]
        qa = self._load(split)
        store = self.store()
        store.check((q["image_id"] for q in qa), f"VQA v2 {VQA_FILES[split]}")
        vocab = {w: i for i, w in enumerate(self.vocab)}
        answer_index = {a: i for i, a in enumerate(self.answers)}
        items = []
        for q in qa:
            item = _qa_item(-1, q, vocab, answer_index, self.max_len, self.qtypes)
            item["image_id"] = q["image_id"]
            items.append(item)
        return FeatureQA(items, store)

    def describe(self) -> dict[str, Any]:
        return {"answers": len(self.answers)}


def _fixture_rows(ids: list[int], rng: np.random.Generator, k: int, dim: int) -> list[dict[str, Any]]:
    rows = []
    for image_id in ids:
        xy = rng.uniform(0, 300, (k, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(10, 100, (k, 2)).astype(np.float32)], 1)
        rows.append({"image_id": image_id, "image_w": 640, "image_h": 480, "boxes": boxes,
                     "features": rng.random((k, dim)).astype(np.float32)})
    return rows


def write_vqa2_fixture(root: str | Path, n_images: int = 3, k: int = 36, dim: int = 16) -> Path:
    """A tiny VQA v2 in the public layouts: the four JSON files under vqa2/ with their released names, and one
    feature TSV for train2014 + val2014 at trainval_36/trainval_resnet101_faster_rcnn_genome_36.tsv."""
    root = Path(root)
    folder = root / "vqa2"
    folder.mkdir(parents=True, exist_ok=True)
    templates = [("how many dogs are there?", "two", "number"), ("is it raining?", "yes", "yes/no"),
                 ("what color is the bus?", "red", "other"), ("is there a cat?", "no", "yes/no")]
    qid, all_ids = 0, []
    for split, name in VQA_FILES.items():
        ids = [100 + i + (1000 if split == "val" else 0) for i in range(n_images)]
        all_ids += ids
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
        (folder / f"v2_OpenEnded_mscoco_{name}_questions.json").write_text(
            json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                        "data_subtype": name, "questions": questions}))
        (folder / f"v2_mscoco_{name}_annotations.json").write_text(
            json.dumps({"info": {}, "license": {}, "data_subtype": name, "annotations": annotations}))
    write_feature_tsv(root / FEATURES_TSV, _fixture_rows(all_ids, np.random.default_rng(0), k, dim))
    return root


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
        if stage == "detector":
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
    """COCO captions on Karpathy's split (113,287 train incl. restval / 5,000 val / 5,000 test images) with the
    released bottom-up features. Layout (the public releases' names):

        <root>/<folder>/dataset_coco.json   Karpathy's split file (caption_datasets.zip): images[{cocoid, filepath,
                                            split, sentences[{tokens, raw}]}]
        <root>/<features>                   the same file as VQA v2's (default
                                            trainval_36/trainval_resnet101_faster_rcnn_genome_36.tsv: train2014 and
                                            val2014 in one TSV, as released; `FeatureStore`)

    Words seen fewer than `min_word_count` times in training captions become <unk> (Karpathy's 5); captions are
    cut to `max_len` words. Training items are (image, caption) pairs, all of an image's captions; evaluation
    items, and training items of the `scst` stage, are images scored against all their references. The ResNet
    grid baseline is the same layout with the grid's cells as boxes (`features=<its tsv>`).
    """

    def __init__(self, root: str | None = None, folder: str = "coco", features: str = FEATURES_TSV,
                 min_word_count: int = 5, max_len: int = 16, batch_size: int | None = 50,
                 eval_batch_size: int | None = 100) -> None:
        from mlrun.datasets.vision import data_root

        base = data_root(root)
        self.root = base / folder
        self.features = _features_path(base, features)
        self.min_word_count, self.caption_len = min_word_count, max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._images: list[dict[str, Any]] | None = None
        self._store: FeatureStore | None = None

    def _split(self, split: str) -> list[dict[str, Any]]:
        if self._images is None:
            path = self.root / "dataset_coco.json"
            if not path.exists():
                raise DataError(path, "Karpathy's dataset_coco.json",
                                "Get it from cs.stanford.edu/people/karpathy/deepimagesent (caption_datasets.zip), "
                                "or set dataset.folder")
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
        if self._store is None:
            self._store = FeatureStore(self.features)
        self._store.check((im["cocoid"] for im in images), f"Karpathy's {split} split")
        if split == "train" and stage != "scst":
            vocab = {w: i for i, w in enumerate(self.vocab)}
            items = [{"scene": i, "image_id": im["cocoid"],
                      "tokens": caption_tokens(" ".join(s["tokens"]), vocab, self.caption_len)}
                     for i, im in enumerate(images) for s in im["sentences"]]
        else:
            items = [{"scene": i, "image_id": im["cocoid"]} for i, im in enumerate(images)]
        return FeatureQA(items, self._store)

    def describe(self) -> dict[str, Any]:
        return {"images": {s: len(self._split(s)) for s in KARPATHY_SPLITS}, "words": len(self.vocab)}


def write_coco_caption_fixture(root: str | Path, n_images: int = 8, k: int = 36, dim: int = 16) -> Path:
    """A tiny COCO-captions in the public layouts: Karpathy's coco/dataset_coco.json (all four splits, five
    sentences an image, images from train2014 and val2014) and one feature TSV for both folders at
    trainval_36/trainval_resnet101_faster_rcnn_genome_36.tsv."""
    root = Path(root)
    rng = np.random.default_rng(0)
    subjects = ["a man", "a dog", "two cats", "a red bus", "a woman"]
    verbs = ["riding a bike", "sitting on a bench", "standing in the grass", "parked on a street"]
    splits = ["train", "restval", "val", "test"]
    images = []
    for i in range(n_images):
        folder = "train2014" if i % 2 == 0 else "val2014"
        cocoid = 500 + i
        sentences = [f"{subjects[(i + j) % len(subjects)]} {verbs[(i * j) % len(verbs)]}" for j in range(5)]
        images.append({"cocoid": cocoid, "filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
                       "split": splits[i % len(splits)], "imgid": i,
                       "sentences": [{"raw": s.capitalize() + ".", "tokens": s.split(), "imgid": i,
                                      "sentid": 5 * i + j} for j, s in enumerate(sentences)]})
    (root / "coco").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    write_feature_tsv(root / FEATURES_TSV, _fixture_rows([im["cocoid"] for im in images], rng, k, dim))
    return root
