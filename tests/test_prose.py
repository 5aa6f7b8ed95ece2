"""Word ordering data: sentence extraction from the stdlib's prose, the pairs, and the Penn Treebank loader."""

from __future__ import annotations

from collections import Counter

import pytest

from mlrun.datasets import prose
from mlrun.datasets.prose import ProseWordOrder, PTBWordOrder, split_sentences, tokenize, write_ptb_fixture
from mlrun.datasets.translation import EOS, UNK
from mlrun.errors import DataError

TEXT = """Return the sum of two numbers.  This is a second sentence, with a comma!

    >>> add(1, 2)
    3

Call f(x) first.  Use the "quoted" form. Isn't it fine?
"""


def test_split_sentences_keeps_plain_prose_only():
    assert split_sentences(TEXT) == ["Return the sum of two numbers.", "This is a second sentence, with a comma!",
                                     "Isn't it fine?"]
    assert tokenize("This is a second sentence, with a comma!") == [
        "this", "is", "a", "second", "sentence", ",", "with", "a", "comma"]
    assert tokenize("Isn't it fine?") == ["isn't", "it", "fine"]


def test_stdlib_files_leave_out_parts_builds_ship_separately():
    files = prose.stdlib_files()
    assert len(files) > 300
    parts = {part for f in files for part in f.parts}
    assert not parts & {"test", "idlelib", "tkinter", "lib2to3", "distutils", "site-packages"}
    assert files == sorted(files)


def test_sentence_cache_round_trip(tmp_path, monkeypatch):
    few = [f for f in prose.stdlib_files() if f.name in ("bisect.py", "heapq.py", "textwrap.py")]
    monkeypatch.setattr(prose, "stdlib_files", lambda: few)
    first = prose.stdlib_sentences.__wrapped__(str(tmp_path))
    assert len(list((tmp_path / "prose").glob("stdlib-*.txt"))) == 1
    again = prose.stdlib_sentences.__wrapped__(str(tmp_path))  # read back from the cache file
    assert first == again and len(first) > 20
    assert len(set(first)) == len(first)
    assert all(all(w == "," or w.replace("'", "").isalpha() for w in s) for s in first)


@pytest.fixture(scope="module")
def words():
    return ProseWordOrder(vocab_size=504, val_size=100, test_size=150, max_unk=1)


def test_prose_pairs_are_shuffles_of_their_sentences(words):
    assert len(words.vocab) == 504
    sizes = {k: len(v[1]) for k, v in words.pairs.items()}
    assert sizes["val"] == 100 and sizes["test"] == 150 and sizes["train"] > 1000
    seen = {split: {tuple(t) for t in words.pairs[split][1]} for split in sizes}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["val"])
    shuffled = 0
    for sources, targets in words.pairs.values():
        for s, t in zip(sources, targets):
            assert Counter(s) == Counter(t)
            assert 4 <= len(t) <= 12
            assert sum(w == "<unk>" for w in t) <= 1
            assert all(w in words.vocab for w in t)
            shuffled += s != t
    assert shuffled > 0.8 * sum(sizes.values())
    src, tgt, ref = words.dataset("train")[0]
    assert tgt[-1] == EOS and len(tgt) == len(src) + 1
    assert words.vocab.decode(tgt.tolist()) == ref.split()


def test_prose_is_deterministic_and_closed(words):
    again = ProseWordOrder(vocab_size=504, val_size=100, test_size=150, max_unk=1)
    assert again.pairs == words.pairs
    strict = ProseWordOrder(vocab_size=504, val_size=100, test_size=150, max_unk=0)
    assert all(UNK not in strict.dataset("train")[i][1] for i in range(len(strict.dataset("train"))))
    with pytest.raises(DataError, match="sentences"):
        ProseWordOrder(vocab_size=504, val_size=100_000)


def test_ptb_reads_mikolovs_layout(tmp_path):
    write_ptb_fixture(tmp_path)
    data = PTBWordOrder(root=str(tmp_path), vocab_size=60, batch_size=4)
    src, tgt = data.pairs["train"]
    assert len(tgt) == 24 and len(data.pairs["val"][1]) == 3 and len(data.pairs["test"][1]) == 3
    assert tgt[0] == "the company said it expects N sales to rise".split()
    assert all(Counter(s) == Counter(t) for s, t in zip(src, tgt))
    assert "<unk>" in data.vocab.itos[:4] and data.vocab.encode(["<unk>"]) == [UNK]
    short = PTBWordOrder(root=str(tmp_path), vocab_size=60, max_len=7)
    assert all(len(t) <= 7 for t in short.pairs["train"][1])


def test_ptb_missing_files_raise_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"ptb\.train\.txt"):
        PTBWordOrder(root=str(tmp_path))
