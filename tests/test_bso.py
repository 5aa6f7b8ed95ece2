"""Beam-search optimization: decoding against brute force, the margin loss against hand-computed values and
autograd, the recomputed scores against the search's own, and the beam curriculum."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from mlrun.datasets.translation import BOS, EOS, PAD, Seq2SeqData, Vocab
from mlrun.models.bso import BSO, Permutation, Seq2Seq, Successors, beam_search, bso_loss, summarize, xent_loss

V = 7  # PAD BOS EOS UNK + words 4, 5, 6


def tiny_net(seed: int, dropout: float = 0.0, layers: int = 2) -> Seq2Seq:
    torch.manual_seed(seed)
    net = Seq2Seq(V, V, emb=8, hidden=8, layers=layers, dropout=dropout, init=1.0)
    with torch.no_grad():
        net.out.bias[EOS] -= 1.5  # so that the best sequence is rarely the empty one
    return net.eval()


@torch.no_grad()
def logprob(net: Seq2Seq, src: Tensor, src_len: Tensor, seq: list[int]) -> float:
    memory, state = net.encode(src, src_len)
    total, tok = 0.0, torch.tensor([BOS])
    for w in seq:
        feats, state = net.step(tok, state, memory)
        total += float(net.scores(feats).log_softmax(-1)[0, w])
        tok = torch.tensor([w])
    return total


SRC = torch.tensor([[4, 5, 4], [6, 5, PAD], [5, 6, 4]])
SRC_LEN = torch.tensor([3, 2, 3])


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_equals_brute_force(seed):
    """With a beam that holds every prefix, beam search returns the most probable sequence of <= 3 words."""
    net = tiny_net(seed)
    max_len = 4  # tokens, EOS included
    out = beam_search(net, SRC, SRC_LEN, beam=64, max_len=torch.full((3,), max_len))
    words = [3, 4, 5, 6]  # <unk> and the three words
    for b in range(3):
        src, n = SRC[b:b + 1], SRC_LEN[b:b + 1]
        cands = [list(p) + [EOS] for k in range(max_len) for p in itertools.product(words, repeat=k)]
        best = max(cands, key=lambda s: logprob(net, src, n, s))
        got = out[b].tolist()
        got = got[: got.index(EOS) + 1]
        assert got == best
        assert logprob(net, src, n, got) == pytest.approx(logprob(net, src, n, best))


@pytest.mark.parametrize("seed", [0, 1])
def test_constrained_beam_search_equals_brute_force_over_permutations(seed):
    net = tiny_net(seed)
    out = beam_search(net, SRC, SRC_LEN, beam=16, max_len=SRC_LEN + 2, successors=Permutation())
    for b in range(3):
        src, n = SRC[b:b + 1], SRC_LEN[b:b + 1]
        words = SRC[b, : int(n)].tolist()
        best = max((list(p) + [EOS] for p in set(itertools.permutations(words))),
                   key=lambda s: logprob(net, src, n, s))
        got = out[b].tolist()
        assert got[: got.index(EOS) + 1] == best


def test_greedy_is_beam_one():
    net = tiny_net(3)
    out = beam_search(net, SRC, SRC_LEN, beam=1, max_len=torch.full((3,), 6))
    memory, state = net.encode(SRC, SRC_LEN)
    tok = torch.full((3,), BOS)
    greedy = []
    for _ in range(6):
        feats, state = net.step(tok, state, memory)
        s = net.scores(feats)
        s[:, [PAD, BOS]] = float("-inf")
        tok = s.argmax(-1)
        greedy.append(tok)
    greedy = torch.stack(greedy, 1)
    for b in range(3):
        row = greedy[b].tolist()
        want = row[: row.index(EOS) + 1] if EOS in row[:5] else row[:5] + [EOS]
        got = out[b].tolist()
        assert got[: got.index(EOS) + 1] == want


@pytest.mark.parametrize("scoring", ["logprob", "last"])
@pytest.mark.parametrize("beam", [1, 3, 8])
def test_constrained_decoding_outputs_a_permutation_of_the_input(scoring, beam):
    torch.manual_seed(0)
    vocab = 40
    net = Seq2Seq(vocab, vocab, emb=16, hidden=16, layers=1, init=0.5).eval()
    lens = torch.randint(1, 9, (12,))
    src = torch.randint(3, vocab, (12, 8)) * (torch.arange(8)[None] < lens[:, None])
    out = beam_search(net, src, lens, beam, lens + 3, Permutation(), scoring)
    for b in range(12):
        row = out[b].tolist()
        assert EOS in row
        assert sorted(row[: row.index(EOS)]) == sorted(src[b, : int(lens[b])].tolist())


# ---------------------------------------------------------------------------------------------- the margin loss


class TableNet(Seq2Seq):
    """A scorer whose score of word w at step t after a prefix ending in p is table[t, p, w]: losses can be
    worked out by hand. It speaks Seq2Seq's interface (the state carries the step number)."""

    def __init__(self, table: Tensor) -> None:
        nn.Module.__init__(self)
        self.table = nn.Parameter(table.clone())
        self.tgt_vocab = table.shape[-1]

    def encode(self, src: Tensor, src_len: Tensor):
        return (torch.zeros(len(src), 1, 1), torch.ones(len(src), 1, dtype=torch.bool)), (torch.zeros(len(src)),)

    def dropout_masks(self, batch: int, steps: int, device: torch.device) -> None:
        return None

    def step(self, tokens, state, memory, mask=None):
        t = state[0]
        where = t.long() * self.tgt_vocab + tokens
        return nn.functional.one_hot(where, self.table.shape[0] * self.tgt_vocab).float(), (t + 1,)

    def scores(self, features: Tensor, words: Tensor | None = None) -> Tensor:
        assert words is None
        return features @ self.table.flatten(0, 1)

    def score_of(self, features: Tensor, words: Tensor) -> Tensor:
        return self.scores(features).gather(-1, words.unsqueeze(-1)).squeeze(-1)


def table_batch(tgt: list[int]) -> dict[str, Tensor]:
    t = torch.tensor([tgt])
    return {"src": t.clone(), "src_len": torch.tensor([len(tgt)]), "tgt": t, "tgt_len": torch.tensor([len(tgt)])}


GOLD = [4, 5, EOS]


def scores_table(rows: list[dict[int, float]]) -> Tensor:
    """Scores after the gold prefix at each step (every other prefix scores -5 for every word)."""
    table = torch.full((len(rows), V, V), -5.0)
    for t, row in enumerate(rows):
        prev = BOS if t == 0 else GOLD[t - 1]
        for w, s in row.items():
            table[t, prev, w] = s
    return table


def test_no_loss_when_gold_leads_the_beam_by_the_margin():
    net = TableNet(scores_table([{4: 3.0, 5: 1.5, 6: 1.0}, {5: 3.0, 4: 1.0}, {EOS: 4.0, 6: 2.9}]))
    loss, info = bso_loss(net, table_batch(GOLD), beam=2)
    assert info["violations"] == 0
    assert float(loss) == 0.0


def test_loss_and_gradient_at_a_margin_violation():
    # step 0: gold 4 scores 2.0, the 2nd-best wrong word 5 scores 1.5: within the margin with beam 2 -> violation
    net = TableNet(scores_table([{4: 2.0, 5: 1.5, 6: 1.0}, {5: 3.0}, {EOS: 3.0}]))
    loss, info = bso_loss(net, table_batch(GOLD), beam=2)
    assert info["viol"][0].tolist() == [True, False, False]
    # the K-th (2nd) candidate is word 5 at score 1.5: loss = 1 - 2.0 + 1.5
    assert float(loss) == pytest.approx(0.5)
    loss.backward()
    grad = net.table.grad
    assert grad[0, BOS, 4] == pytest.approx(-1.0)  # descending the loss raises the gold word's score
    assert grad[0, BOS, 5] == pytest.approx(1.0)  # and lowers the violator's
    assert grad.abs().sum() == pytest.approx(2.0)


def test_gold_off_the_beam_restarts_from_the_gold_prefix():
    # step 0: gold is third with beam 2 (violation, restart); step 1 would be fine from the gold prefix
    net = TableNet(scores_table([{6: 3.0, 5: 2.5, 4: 2.0}, {5: 4.0}, {EOS: 4.0}]))
    loss, info = bso_loss(net, table_batch(GOLD), beam=2)
    assert info["viol"][0].tolist() == [True, False, False]
    assert float(loss) == pytest.approx(1 - 2.0 + 2.5)


def test_last_step_gold_must_beat_the_best_wrong_sequence():
    # at the end gold (EOS, 3.0) is second to word 6 (3.5); a K-th-based check with beam 2 would pass
    net = TableNet(scores_table([{4: 5.0}, {5: 5.0}, {6: 3.5, EOS: 3.0}]))
    loss, info = bso_loss(net, table_batch(GOLD), beam=2)
    assert info["viol"][0].tolist() == [False, False, True]
    assert float(loss) == pytest.approx(1 - 3.0 + 3.5)


def test_bleu_cost_scales_the_violation():
    net = TableNet(scores_table([{4: 2.0, 5: 1.5}, {5: 3.0}, {EOS: 3.0}]))
    loss01, _ = bso_loss(net, table_batch(GOLD), beam=2)
    lossb, _ = bso_loss(net, table_batch(GOLD), beam=2, cost="bleu")
    # the violating one-word segment [5] against gold [4] shares nothing: 1 - BLEU = 1
    assert float(lossb) == pytest.approx(float(loss01))
    lossh, _ = bso_loss(net, table_batch(GOLD), beam=2, cost="zero_one", cost_scale=0.5)
    assert float(lossh) == pytest.approx(0.5 * float(loss01))


@pytest.mark.parametrize("con", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recomputed_scores_equal_the_search_scores(con, dropout):
    """The spliced pass (with gradients) reproduces the score of every violating prefix the search found,
    including with dropout, whose masks are shared per sentence and step."""
    net = tiny_net(4, dropout=dropout).train()
    src = torch.tensor([[4, 5, 6, 4], [6, 5, 4, PAD], [5, 5, 6, 4]])
    src_len = torch.tensor([4, 3, 4])
    tgt = torch.tensor([[4, 4, 5, 6, EOS], [5, 6, 4, EOS, PAD], [6, 5, 4, 5, EOS]])
    batch = {"src": src, "src_len": src_len, "tgt": tgt, "tgt_len": torch.tensor([5, 4, 5])}
    torch.manual_seed(1)
    loss, info = bso_loss(net, batch, beam=3, successors=Permutation() if con else Successors())
    viol = info["viol"][:, : info["pred_scores"].shape[1]]
    assert info["violations"] > 0
    torch.testing.assert_close(info["pred_scores"][viol], info["search_scores"][:, : viol.shape[1]][viol])
    torch.testing.assert_close(info["gold_scores"], info["search_gold"][:, : viol.shape[1]])
    loss.backward()
    assert all(p.grad is not None for p in net.out.parameters())


def test_a_bso_step_reduces_the_margin_loss():
    """Gradient descent on the margin loss lowers it (the gradient points the right way)."""
    net = tiny_net(5, layers=1).train()
    src = torch.tensor([[4, 5, 6], [6, 5, 4]])
    batch = {"src": src, "src_len": torch.tensor([3, 3]), "tgt": torch.tensor([[6, 4, 5, EOS], [4, 6, 5, EOS]]),
             "tgt_len": torch.tensor([4, 4])}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first, _ = bso_loss(net, batch, beam=2)
    for _ in range(10):
        opt.zero_grad()
        loss, _ = bso_loss(net, batch, beam=2)
        loss.backward()
        opt.step()
    last, _ = bso_loss(net, batch, beam=2)
    assert float(last) < 0.5 * float(first)


# ---------------------------------------------------------------------------------------------- batching


def test_grouped_attention_equals_a_copy_of_the_memory_per_row():
    """A beam's K rows attend to their sentence's memory in one product; the result is that of replicating
    the memory per row (the unbatched form)."""
    net = tiny_net(6, layers=2)
    memory, state = net.encode(SRC, SRC_LEN)
    K = 4
    rows = torch.arange(3).repeat_interleave(K)
    torch.manual_seed(0)
    state = tuple(s.index_select(0, rows) + 0.1 * torch.randn_like(s.index_select(0, rows)) for s in state)
    tokens = torch.randint(3, V, (3 * K,))
    mask = torch.bernoulli(torch.full((3, 2, 8), 0.7)) / 0.7
    grouped, gstate = net.step(tokens, state, memory, mask)
    copied, cstate = net.step(tokens, state, tuple(m.index_select(0, rows) for m in memory), mask.index_select(0, rows))
    torch.testing.assert_close(grouped, copied)
    for a, b in zip(gstate, cstate):
        torch.testing.assert_close(a, b)


def test_permutation_columns_are_the_distinct_source_words_then_eos():
    src = torch.tensor([[4, 5, 4, 6], [6, 6, PAD, PAD]])
    words, counts = Permutation().init(src, V)
    assert words.tolist() == [[4, 5, PAD, 6, EOS], [6, PAD, PAD, PAD, EOS]]
    assert counts.tolist() == [[2, 1, 0, 1, 0], [2, 0, 0, 0, 0]]
    perm = Permutation()
    assert perm.allowed(counts, V).tolist() == [[True, True, False, True, False], [True, False, False, False, False]]
    used = perm.advance(perm.advance(counts[1:], torch.tensor([0])), torch.tensor([0]))
    assert perm.allowed(used, V).tolist() == [[False, False, False, False, True]]
    net = tiny_net(7)
    feats = torch.randn(2 * 3, 8)  # 3 rows per sentence
    torch.testing.assert_close(net.scores(feats, words),
                               net.scores(feats).view(2, 3, V).gather(2, words[:, None].expand(2, 3, 5)).view(6, 5))


# ---------------------------------------------------------------------------------------------- task and study


class TinyPairs(Seq2SeqData):
    """Word ordering over the three words of the tiny vocabulary (ids 4, 5, 6)."""

    def __init__(self, bucket: bool = True) -> None:
        super().__init__(batch_size=4, eval_batch_size=3, bucket=bucket)
        self.src_vocab = self.tgt_vocab = Vocab(["a", "b", "c"])
        sents = [s.split() for s in ("a b c", "c a", "b b a c", "c b", "a c b a", "b a")]
        rev = [list(reversed(s)) for s in sents]
        self.pairs = {"train": (rev * 2, sents * 2), "val": (rev[:3], sents[:3]), "test": (rev[3:], sents[3:])}


def test_stage_args_select_an_arm_over_the_models_defaults():
    task = BSO(tiny_net(0), torch.optim.Adagrad, loss="xent", arms={"conbso": {"loss": "bso",
               "successors": "permutation", "max_beam": 3}})
    data = TinyPairs()
    task.stage_args = {}
    task.on_stage_start("pretrain", data)
    assert not task.searching() and task.violations_start is None
    task.stage_args = {"arm": "conbso", "beam_start": 3}
    task.on_stage_start("train", data)
    assert task.searching() and task.settings["successors"] == "permutation" and task.beam_size() == 3
    assert task.violations_start is not None  # measured on val before any BSO step
    for bad in ({"arm": "nope"}, {"lr": 0.1}):
        task.stage_args = bad
        with pytest.raises(ValueError, match="arm|expected keys"):
            task.on_stage_start("train", data)


def test_beam_curriculum_grows_every_two_epochs_up_to_the_maximum():
    task = BSO(tiny_net(0), torch.optim.Adam, loss="bso", beam_start=2, max_beam=6, epochs_per_beam=2)
    task.on_stage_start("train", TinyPairs())
    assert task.steps_per_epoch == 4  # 12 pairs in batches of one length, <= 4 each: 6 + 2 + 4 -> 2 + 1 + 1
    sizes = [task.beam_size(epoch * 4) for epoch in range(14)]
    assert sizes == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6, 6, 6]


def test_adagrad_per_layer_rates_and_its_state_reset_when_the_beam_grows():
    """The authors' -layer_etas (encoder, decoder, generator) and the zeroed Adagrad sums at each beam increase."""
    net = tiny_net(0, layers=1).train()
    task = BSO(net, torch.optim.Adagrad, loss="bso", max_beam=3, epochs_per_beam=1, layer_lrs=[0.02, 0.01, 0.2])
    data = TinyPairs()
    task.on_stage_start("train", data)
    opt = task.configure_optimizers()["model"]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.01, 0.2]
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[0] == {id(p) for m in (net.src_emb, net.encoder) for p in m.parameters()}
    assert ids[2] == {id(net.out.weight), id(net.out.bias)}
    assert sum(map(len, ids)) == len(list(net.parameters()))
    train = data.dataset("train")
    sums = []
    for step in range(5):  # 4 steps an epoch: the beam grows 2 -> 3 before the 5th
        loss = next(task.training_step(train[step % len(train)]))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sums.append(sum(float(st["sum"].abs().sum()) for st in opt.state.values()))
    assert task.stage_steps["train"] == 5 and task.beam_size() == 3
    assert sums[0] < sums[1] < sums[2] < sums[3]
    assert sums[4] < sums[3]  # zeroed before the 5th update: only that step's squared gradient remains


def test_xent_loss_sums_words_and_averages_sentences():
    net = tiny_net(2)
    batch = TinyPairs(bucket=False).collate([TinyPairs(bucket=False).dataset("train")[i] for i in range(3)])
    memory, state = net.encode(batch["src"], batch["src_len"])
    feats, _ = net.teacher_force(memory, state, batch["tgt"])
    logp = net.scores(feats).log_softmax(-1).gather(2, batch["tgt"][..., None]).squeeze(2)
    want = -(logp * (batch["tgt"] != PAD)).sum() / 3
    assert float(xent_loss(net, batch)) == pytest.approx(float(want), rel=1e-5)


def test_evaluation_reports_constrained_and_free_bleu_and_violations():
    task = BSO(tiny_net(1), torch.optim.Adagrad, loss="xent", decode="permutation", report_free=True,
               val_beams=[2], test_beams=[1, 3], arms={"bso": {"loss": "bso", "max_beam": 2}})
    data = TinyPairs()
    task.on_stage_start("pretrain", data)
    val = task.evaluate(task._batches(data, "val"), "val")
    assert set(val) == {"bleu_k2", "bleu_free_k2", "ppl"}
    task.stage_args = {"arm": "bso"}
    task.on_stage_start("train", data)
    val = task.evaluate(task._batches(data, "val"), "val")
    assert set(val) == {"bleu_k2", "bleu_free_k2", "violations", "violations_start"}
    assert val["violations"] == val["violations_start"]  # no BSO step yet
    test = task.evaluate(task._batches(data, "test"), "test")
    assert set(test) == {"bleu_k1", "bleu_k3", "bleu_free_k1", "bleu_free_k3"}
    state = task.extra_state()
    again = BSO(tiny_net(1), torch.optim.Adagrad, loss="xent", decode="permutation")
    again.load_extra_state(state)
    assert again.searching()  # an evaluation-only run decodes the way the last stage trained


def test_summarize_reports_gains_over_seq2seq_and_violation_ratios():
    def group(*bleus, viol=None):
        g = {f"test/bleu_k{k}": {"median": b} for k, b in zip((1, 5, 10), bleus)}
        if viol:
            g["val/violations_start"], g["val/violations"] = {"median": viol[0]}, {"median": viol[1]}
        return g

    study = {"groups": {"seq2seq": group(20.0, 22.0, 23.0), "bso_k6": group(21.0, 24.5, 26.0, viol=(6.0, 2.0)),
                        "bso_k2": group(20.5, 21.0, 21.0)}}
    assert summarize(study) == pytest.approx({"gain_bso_k2_k1": 0.5, "gain_bso_k6_k5": 2.5, "gain_bso_k6_k10": 3.0,
                                              "viol_ratio_bso_k6": 1 / 3})
