"""Sequence-to-sequence pairs (vocabularies, padding) and IWSLT'14 German-English at paper scale.

The pieces shared by every seq2seq data set live here (`Vocab`, `PairDataset`, `Seq2SeqData`); word
ordering (datasets/prose.py) reuses them. A vocabulary has a fixed size chosen in the config
(`vocab_size`, specials included), so the model can be built before the data is read and a checkpoint
always fits: the most frequent words fill it, and unused ids are padded with `<unused*>` tokens.

IWSLT'14 de-en is read as fairseq's `examples/translation/prepare-iwslt14.sh` leaves it (the MIXER
split of Ranzato et al., which Wiseman & Rush use): `<root>/iwslt14.tokenized.de-en/{train,valid,test}.{de,en}`,
tokenized and lowercased, BPE-split with `@@ ` joints. By default the BPE joints are undone so the model
reads and writes words, as in the paper.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mlrun.datasets.vision import data_root
from mlrun.errors import DataError
from mlrun.task import DataModule

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


class Vocab:
    """Token <-> id with the four specials first; exactly `size` ids (top words by count, ties by spelling)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], size: int, min_count: int = 1) -> Vocab:
        counts = Counter(w for s in sentences for w in s)
        for s in SPECIALS:
            counts.pop(s, None)
        ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        words = ranked[: size - len(SPECIALS)]
        words += [f"<unused{i}>" for i in range(size - len(SPECIALS) - len(words))]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(w, UNK) for w in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to the first end-of-sentence, without padding or start symbols."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.itos[i])
        return out


class PairDataset(Dataset):
    """(source ids, target ids + EOS, reference text) triples; the reference is the untouched target text."""

    def __init__(self, sources: list[list[str]], targets: list[list[str]], src_vocab: Vocab, tgt_vocab: Vocab) -> None:
        self.src = [torch.tensor(src_vocab.encode(s), dtype=torch.long) for s in sources]
        self.tgt = [torch.tensor(tgt_vocab.encode(t) + [EOS], dtype=torch.long) for t in targets]
        self.refs = [" ".join(t) for t in targets]

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.src[i], self.tgt[i], self.refs[i]


def collate_pairs(items: list[tuple[torch.Tensor, torch.Tensor, str]]) -> dict[str, Any]:
    """Right-padded batch: src (B, S), src_len (B,), tgt (B, T) ending in EOS, tgt_len (B,), refs [str]."""
    src, tgt, refs = zip(*items)
    pad = torch.nn.utils.rnn.pad_sequence
    return {
        "src": pad(list(src), batch_first=True, padding_value=PAD),
        "src_len": torch.tensor([len(s) for s in src]),
        "tgt": pad(list(tgt), batch_first=True, padding_value=PAD),
        "tgt_len": torch.tensor([len(t) for t in tgt]),
        "refs": list(refs),
    }


class LengthBatches(Dataset):
    """Whole training batches, each of pairs with one source length (seq2seq-attn's batching, which the BSO
    authors train with): no padding in the source, and for word ordering none in the target either, so no
    step computes on padding. Batches are fixed; the trainer shuffles their order every epoch."""

    def __init__(self, pairs: PairDataset, size: int) -> None:
        by_len: dict[int, list[int]] = {}
        for i in range(len(pairs)):
            by_len.setdefault(len(pairs.src[i]), []).append(i)
        self.batches = [collate_pairs([pairs[i] for i in idx[j:j + size]])
                        for n in sorted(by_len) for idx in [by_len[n]] for j in range(0, len(idx), size)]
        self.pairs = len(pairs)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i]


class Seq2SeqData(DataModule):
    """Splits of (source tokens, target tokens) with one vocabulary per side (the same one if `shared`).

    bucket: train on `LengthBatches` of `batch_size` pairs (items are whole batches, so the trainer sees
    `batch_size=None`; `bucket_size` keeps the number); val and test stay padded batches of pairs.
    """

    src_vocab: Vocab
    tgt_vocab: Vocab
    pairs: dict[str, tuple[list[list[str]], list[list[str]]]]

    def __init__(self, batch_size: int, eval_batch_size: int, bucket: bool = False) -> None:
        self.bucket_size = batch_size if bucket else None
        self.batch_size, self.eval_batch_size = (None if bucket else batch_size), eval_batch_size
        self._cache: dict[str, Dataset] = {}

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if split not in self.pairs:
            raise KeyError(split)
        if split not in self._cache:
            src, tgt = self.pairs[split]
            self._cache[split] = PairDataset(src, tgt, self.src_vocab, self.tgt_vocab)
            if split == "train" and self.bucket_size:
                self._cache[split] = LengthBatches(self._cache[split], self.bucket_size)
        return self._cache[split]

    def steps_per_epoch(self) -> int:
        """Training batches in one pass over the train split."""
        train = self.dataset("train")
        return len(train) if self.batch_size is None else max(len(train) // self.batch_size, 1)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return collate_pairs(items)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"{k}_pairs": len(v[0]) for k, v in self.pairs.items()}
        out.update(src_vocab=len(self.src_vocab), tgt_vocab=len(self.tgt_vocab))
        return out


# ---------------------------------------------------------------------------------------------- IWSLT'14


IWSLT_DIR = "iwslt14.tokenized.de-en"
IWSLT_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def merge_bpe(line: str) -> str:
    """Undo subword-nmt's joints: 'wir@@ tschaft' -> 'wirtschaft'."""
    return (line + " ").replace("@@ ", "").rstrip()


class IWSLT14(Seq2SeqData):
    """IWSLT'14 de-en in fairseq's prepared layout.

    Args:
        root: data root; the files are read from `<root>/iwslt14.tokenized.de-en/`.
        src_vocab_size, tgt_vocab_size: ids per side, specials included (rarer words become <unk>).
        merge_bpe: undo the BPE joints so the model works on words (the paper's setting).
        max_len: drop training pairs longer than this on either side (MIXER keeps up to 50 words).
        bucket: train on batches of one source length (seq2seq-attn's batching; see `Seq2SeqData`).
    """

    def __init__(self, root: str | None = None, src: str = "de", tgt: str = "en", src_vocab_size: int = 24000,
                 tgt_vocab_size: int = 24000, merge_bpe: bool = True, max_len: int = 50, batch_size: int = 64,
                 eval_batch_size: int = 128, bucket: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, bucket)
        self.root = data_root(root) / IWSLT_DIR
        expected = [f"{s}.{lang}" for s in IWSLT_SPLITS.values() for lang in (src, tgt)]
        missing = [f for f in expected if not (self.root / f).is_file()]
        if missing:
            raise DataError(self.root, f"fairseq's prepared IWSLT'14 files {', '.join(expected)} (missing: "
                            f"{', '.join(missing)})",
                            "Run fairseq's examples/translation/prepare-iwslt14.sh and pass its output folder's "
                            "parent as dataset.root")
        self.pairs = {}
        for split, name in IWSLT_SPLITS.items():
            s_lines = self._read(self.root / f"{name}.{src}", merge_bpe)
            t_lines = self._read(self.root / f"{name}.{tgt}", merge_bpe)
            if len(s_lines) != len(t_lines):
                raise DataError(self.root / f"{name}.{src}", f"as many lines as {name}.{tgt} "
                                f"({len(s_lines)} vs {len(t_lines)})")
            keep = [i for i in range(len(s_lines)) if s_lines[i] and t_lines[i]]
            if split == "train":
                keep = [i for i in keep if len(s_lines[i]) <= max_len and len(t_lines[i]) <= max_len]
            self.pairs[split] = ([s_lines[i] for i in keep], [t_lines[i] for i in keep])
        self.src_vocab = Vocab.build(self.pairs["train"][0], src_vocab_size)
        self.tgt_vocab = Vocab.build(self.pairs["train"][1], tgt_vocab_size)

    @staticmethod
    def _read(path: Path, merge: bool) -> list[list[str]]:
        with open(path, encoding="utf-8") as f:
            return [(merge_bpe(line.strip()) if merge else line.strip()).split() for line in f]


_FIXTURE_PAIRS = [
    ("wir sind hier .", "we are here ."),
    ("das ist gut .", "that is good ."),
    ("ich habe eine fr@@ age .", "i have a question ."),
    ("sie sagen &quot; ja &quot; .", "they say &quot; yes &quot; ."),
    ("es ist nicht so ein@@ fach .", "it &apos;s not that simple ."),
    ("danke schön .", "thank you ."),
]


def write_iwslt14_fixture(root: str | os.PathLike, repeat: int = 4) -> Path:
    """A tiny IWSLT'14 de-en in fairseq's prepared layout (tokenized, lowercased, BPE joints, Moses escapes)."""
    folder = Path(root) / IWSLT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": repeat * len(_FIXTURE_PAIRS), "valid": len(_FIXTURE_PAIRS), "test": len(_FIXTURE_PAIRS)}
    for name, n in sizes.items():
        rows = [_FIXTURE_PAIRS[i % len(_FIXTURE_PAIRS)] for i in range(n)]
        (folder / f"{name}.de").write_text("".join(de + "\n" for de, _ in rows), encoding="utf-8")
        (folder / f"{name}.en").write_text("".join(en + "\n" for _, en in rows), encoding="utf-8")
    (folder / "code").write_text("#version: 0.2\nf r\nfr a\n", encoding="utf-8")
    return folder
