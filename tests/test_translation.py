"""Seq2seq data pieces and IWSLT'14 de-en read from a fixture in fairseq's prepared layout."""

from __future__ import annotations

import pytest
import torch

from mlrun.datasets.translation import (
    BOS,
    EOS,
    IWSLT14,
    PAD,
    UNK,
    LengthBatches,
    PairDataset,
    Vocab,
    collate_pairs,
    merge_bpe,
    write_iwslt14_fixture,
)
from mlrun.errors import DataError


def test_vocab_ranks_by_count_then_spelling_and_has_a_fixed_size():
    v = Vocab.build([["b", "a", "c"], ["a", "c"], ["a", "d"]], size=8)
    assert v.itos == ["<pad>", "<s>", "</s>", "<unk>", "a", "c", "b", "d"]
    small = Vocab.build([["b", "a", "c"], ["a", "c"], ["a"]], size=6)
    assert small.itos[4:] == ["a", "c"]  # b is cut
    padded = Vocab.build([["x"]], size=7)
    assert len(padded) == 7 and padded.itos[5:] == ["<unused0>", "<unused1>"]
    assert small.encode(["a", "b", "c"]) == [4, UNK, 5]
    assert small.decode([BOS, 4, UNK, 5, EOS, 4, PAD]) == ["a", "<unk>", "c"]


def test_collate_pads_and_keeps_references():
    v = Vocab.build([["a", "b", "c"]], size=7)
    ds = PairDataset([["a", "b"], ["c"]], [["b", "a", "c"], ["c"]], v, v)
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["src"].tolist() == [[4, 5], [6, PAD]]
    assert batch["tgt"].tolist() == [[5, 4, 6, EOS], [6, EOS, PAD, PAD]]
    assert batch["src_len"].tolist() == [2, 1] and batch["tgt_len"].tolist() == [4, 2]
    assert batch["refs"] == ["b a c", "c"]


def test_length_batches_hold_one_source_length_each_and_every_pair_once(tmp_path):
    write_iwslt14_fixture(tmp_path, repeat=5)
    data = IWSLT14(root=str(tmp_path), src_vocab_size=40, tgt_vocab_size=40, batch_size=4, bucket=True)
    assert data.batch_size is None and data.bucket_size == 4  # the trainer gets whole batches as items
    train = data.dataset("train")
    assert isinstance(train, LengthBatches) and data.steps_per_epoch() == len(train)
    seen = []
    for batch in train.batches:
        assert len(batch["refs"]) <= 4
        assert len(set(batch["src_len"].tolist())) == 1 and (batch["src"] != PAD).all()
        seen.extend(zip(batch["src"].tolist(), batch["refs"]))
    flat = PairDataset(*data.pairs["train"], data.src_vocab, data.tgt_vocab)
    assert sorted(seen) == sorted((flat[i][0].tolist(), flat[i][2]) for i in range(len(flat)))
    assert not isinstance(data.dataset("val"), LengthBatches)  # evaluation keeps padded batches of pairs
    plain = IWSLT14(root=str(tmp_path), src_vocab_size=40, tgt_vocab_size=40, batch_size=4)
    assert plain.batch_size == 4 and plain.steps_per_epoch() == len(flat) // 4


def test_merge_bpe_undoes_subword_joints():
    assert merge_bpe("ich habe eine fr@@ age .") == "ich habe eine frage ."
    assert merge_bpe("ein@@ fach@@ er") == "einfacher"


def test_iwslt14_reads_fairseqs_layout(tmp_path):
    write_iwslt14_fixture(tmp_path)
    data = IWSLT14(root=str(tmp_path), src_vocab_size=40, tgt_vocab_size=40, batch_size=4)
    src, tgt = data.pairs["train"]
    assert len(src) == 24 and len(data.pairs["val"][0]) == 6 and len(data.pairs["test"][0]) == 6
    assert ["ich", "habe", "eine", "frage", "."] in src  # BPE joints merged
    assert ["it", "&apos;s", "not", "that", "simple", "."] in tgt  # Moses escapes kept as tokens
    assert len(data.src_vocab) == 40 and len(data.tgt_vocab) == 40
    s, t, ref = data.dataset("test")[0]
    assert data.tgt_vocab.decode(t.tolist()) == ref.split()
    assert t[-1] == EOS and isinstance(s, torch.Tensor)
    with pytest.raises(KeyError):
        data.dataset("extra")
    kept_bpe = IWSLT14(root=str(tmp_path), merge_bpe=False, src_vocab_size=40, tgt_vocab_size=40)
    assert ["ich", "habe", "eine", "fr@@", "age", "."] in kept_bpe.pairs["train"][0]


def test_iwslt14_missing_or_broken_files_raise_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="prepare-iwslt14.sh"):
        IWSLT14(root=str(tmp_path))
    folder = write_iwslt14_fixture(tmp_path)
    (folder / "test.en").write_text("one line\n")
    with pytest.raises(DataError, match="as many lines"):
        IWSLT14(root=str(tmp_path), src_vocab_size=40, tgt_vocab_size=40)
