"""Word ordering: recover a sentence from its words in random order (Wiseman & Rush 2016, section 5.1).

Two sources of sentences:

- `ProseWordOrder` (CPU scale): English prose shipped with Python's standard library: docstrings and comment
  blocks of the stdlib's own modules (parsed with `ast`, never imported) and the language reference in
  `pydoc_data.topics`. Extraction is deterministic for one Python build; builds package different parts of
  the stdlib (Debian splits off tkinter, lib2to3, distutils, idlelib and test/), so those parts are always left
  out. Only plain sentences are kept (a capital letter, then letters, spaces, commas and apostrophes, then
  `.`, `?` or `!`), lowercased and split into words and commas, 4 to 12 tokens, duplicates dropped. The closed
  vocabulary is the most frequent words; a sentence may hold at most `max_unk` other words, read as `<unk>`.
- `PTBWordOrder` (paper scale): the Penn Treebank text as Mikolov distributes it,
  `<root>/ptb/ptb.{train,valid,test}.txt`, one sentence a line, `<unk>` for rare words, `N` for numbers.

A pair is (the words shuffled once with a fixed seed, the sentence); source and target share one vocabulary,
so a constrained decoder can count the source's words.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
import sysconfig
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mlrun.datasets.translation import Seq2SeqData, Vocab
from mlrun.datasets.vision import data_root
from mlrun.errors import DataError

# Parts of the stdlib that some builds ship separately or not at all.
STDLIB_EXCLUDE = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "turtledemo",
                            "__pycache__", "lib2to3", "ensurepip", "tkinter", "distutils", "venv"})
_SENTENCE = re.compile(r"[A-Z][A-Za-z ,']*[a-z][.?!]")
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|,")


def split_sentences(text: str) -> list[str]:
    """Plain sentences of a text: paragraphs joined into lines, split after `.?!`; anything code-like is dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        line = " ".join(part.strip() for part in para.splitlines())
        out.extend(s for s in re.split(r"(?<=[.?!])\s+", line) if _SENTENCE.fullmatch(s) and "  " not in s)
    return out


def tokenize(sentence: str) -> list[str]:
    """Lowercased words (with inner apostrophes) and commas; the final stop is dropped."""
    return _TOKEN.findall(sentence.lower())


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if STDLIB_EXCLUDE.intersection(parts) or parts[0].startswith("config-") or p.name == "turtle.py":
            continue
        files.append(p)
    return sorted(files)


def stdlib_texts(files: list[Path]) -> list[str]:
    """Docstrings (module, class, function) and comment blocks of each file, then pydoc's topics, in fixed order."""
    import pydoc_data.topics

    texts = []
    for path in files:
        source = path.read_bytes()
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
        block: list[str] = []
        for line in source.decode("utf-8", errors="replace").splitlines() + [""]:
            stripped = line.strip()
            if stripped.startswith("# "):
                block.append(stripped[2:])
            elif block:
                texts.append(" ".join(block))
                block = []
    topics = pydoc_data.topics.topics
    texts.extend(topics[k] for k in sorted(topics))
    return texts


def _cache_key(files: list[Path]) -> str:
    h = hashlib.sha256(sys.version.encode())
    for p in files:
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:16]


@cache
def stdlib_sentences(cache_dir: str | None = None) -> tuple[tuple[str, ...], ...]:
    """Every unique tokenized sentence of the stdlib's prose, in order of first appearance.

    Parsing the stdlib takes seconds, so the result is cached on disk (keyed by the Python version and the
    files' names and sizes) under `<data root>/prose/`.
    """
    files = stdlib_files()
    folder = data_root(cache_dir) / "prose"
    path = folder / f"stdlib-{_cache_key(files)}.txt"
    if path.is_file():
        return tuple(tuple(line.split(" ")) for line in path.read_text(encoding="utf-8").splitlines())
    seen: dict[tuple[str, ...], None] = {}
    for text in stdlib_texts(files):
        for s in split_sentences(text):
            toks = tuple(tokenize(s))
            if toks:
                seen.setdefault(toks, None)
    sentences = tuple(seen)
    try:
        from mlrun.records import write_atomic

        write_atomic(path, "".join(" ".join(s) + "\n" for s in sentences))
    except OSError:
        pass  # a read-only cache only costs time
    return sentences


class WordOrderData(Seq2SeqData):
    """Sentences split into train/val/test, each paired with its words in a fixed random order."""

    def __init__(self, sentences: dict[str, list[list[str]]], vocab: Vocab, batch_size: int, eval_batch_size: int,
                 shuffle_seed: int = 0, bucket: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, bucket)
        self.src_vocab = self.tgt_vocab = self.vocab = vocab
        rng = np.random.default_rng(shuffle_seed)
        self.pairs = {}
        for split in ("train", "val", "test"):
            targets = sentences[split]
            sources = [[t[i] for i in rng.permutation(len(t))] for t in targets]
            self.pairs[split] = (sources, targets)


class ProseWordOrder(WordOrderData):
    """Word ordering on the standard library's prose (CPU scale).

    Args:
        vocab_size: ids including the four specials; the closed vocabulary is the most frequent words.
        min_len, max_len: sentence length in tokens.
        val_size, test_size: sentences held out (a fixed permutation by split_seed, not the run's seed).
        max_unk: keep sentences with at most this many words outside the vocabulary (read as `<unk>`, as in
            the Penn Treebank text); 0 keeps only sentences made entirely of vocabulary words.
        max_train: keep at most this many training sentences (None: all).
        bucket: train on batches of sentences of one length (seq2seq-attn's batching, as the authors).
    """

    def __init__(self, vocab_size: int = 1004, min_len: int = 4, max_len: int = 12, max_unk: int = 1,
                 val_size: int = 300, test_size: int = 500, max_train: int | None = None, split_seed: int = 0,
                 batch_size: int = 32, eval_batch_size: int = 250, cache_dir: str | None = None,
                 bucket: bool = False) -> None:
        all_sents = [list(s) for s in stdlib_sentences(cache_dir) if min_len <= len(s) <= max_len]
        vocab = Vocab.build(all_sents, vocab_size)
        unked = (tuple(w if w in vocab else "<unk>" for w in s) for s in all_sents
                 if sum(w not in vocab for w in s) <= max_unk)
        kept = [list(s) for s in dict.fromkeys(unked)]  # unique again once rare words read as <unk>
        if len(kept) < val_size + test_size + 10:
            raise DataError("the Python standard library", f"at least {val_size + test_size + 10} sentences of "
                            f"{min_len}-{max_len} tokens; this build has {len(kept)}",
                            "Lower dataset.val_size / dataset.test_size or raise dataset.vocab_size")
        order = np.random.default_rng(split_seed).permutation(len(kept))
        test, val, train = (order[:test_size], order[test_size:test_size + val_size],
                            order[test_size + val_size:])
        train = train[:max_train] if max_train is not None else train
        splits = {name: [kept[i] for i in sorted(idx)] for name, idx in
                  (("train", train), ("val", val), ("test", test))}
        super().__init__(splits, vocab, batch_size, eval_batch_size, shuffle_seed=split_seed, bucket=bucket)
        self.words_in_vocab = sum(not w.startswith("<") for w in vocab.itos)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "words": self.words_in_vocab}


PTB_FILES = {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"}


class PTBWordOrder(WordOrderData):
    """Word ordering on the Penn Treebank text (paper scale), read from `<root>/<subdir>/ptb.*.txt`.

    Args:
        vocab_size: ids including the specials (PTB has 10,000 types with `<unk>`: 9,999 words + 4 specials).
        max_len: drop training sentences longer than this (None keeps all).
        bucket: train on batches of sentences of one length (seq2seq-attn's batching, as the authors).
    """

    def __init__(self, root: str | None = None, subdir: str = "ptb", vocab_size: int = 10003,
                 max_len: int | None = None, batch_size: int = 64, eval_batch_size: int = 128,
                 shuffle_seed: int = 0, bucket: bool = False) -> None:
        folder = data_root(root) / subdir
        missing = [f for f in PTB_FILES.values() if not (folder / f).is_file()]
        if missing:
            raise DataError(folder, f"the Penn Treebank text files {', '.join(PTB_FILES.values())} "
                            f"(missing: {', '.join(missing)})",
                            "Copy simple-examples/data/ptb.*.txt from Mikolov's simple-examples.tgz there")
        splits = {}
        for split, name in PTB_FILES.items():
            with open(folder / name, encoding="utf-8") as f:
                lines = [line.split() for line in f]
            lines = [s for s in lines if s]
            if split == "train" and max_len is not None:
                lines = [s for s in lines if len(s) <= max_len]
            splits[split] = lines
        vocab = Vocab.build(splits["train"], vocab_size)
        super().__init__(splits, vocab, batch_size, eval_batch_size, shuffle_seed, bucket)


_PTB_FIXTURE = [
    "the company said it expects N sales to rise",
    "mr. <unk> is chairman of this unit",
    "the market closed lower in heavy trading",
    "investors are worried about the <unk> of interest rates",
    "the bank will pay N cents a share",
    "sales rose N % in the third quarter",
]


def write_ptb_fixture(root: str | os.PathLike, subdir: str = "ptb") -> Path:
    """A tiny Penn Treebank text in Mikolov's layout (a leading space on each line, as the release has)."""
    folder = Path(root) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("ptb.train.txt", _PTB_FIXTURE * 4), ("ptb.valid.txt", _PTB_FIXTURE[:3]),
                       ("ptb.test.txt", _PTB_FIXTURE[3:])):
        (folder / name).write_text("".join(f" {r} \n" for r in rows), encoding="utf-8")
    return folder

