"""Sequence-to-sequence learning as beam-search optimization (Wiseman & Rush, EMNLP 2016, arXiv 1606.02960).

One attention LSTM encoder-decoder (`Seq2Seq`) trained two ways:

- cross-entropy with teacher forcing (the seq2seq baseline, and BSO's pre-training);
- beam-search optimization (`bso_loss`): run beam search with beam K during training, scoring a prefix by
  the decoder's unnormalised score of its last word, f(w_t, h_{t-1}). Whenever the gold prefix does not beat
  the K-th candidate by the margin, pay Δ·(margin - f(gold) + f(K-th)) and restart the beam from the gold
  prefix (LaSO); at the last step the gold sequence must beat the best wrong one. The search runs without
  gradients; the scores at the violations are then recomputed in one pass over the gold sequence and one
  over the violating sequences spliced together (reset to the gold state after each violation), so
  back-propagation costs about two teacher-forced passes whatever the beam size (the paper's section 4.2).

Every search (training and decoding) advances the whole batch's B·K prefixes with one decoder call per time
step; attention for the K rows of a sentence is one batched product against that sentence's memory (never a
copy per beam row). A successor function limits each step's words: `all` (any word; padding and start
symbols never) or `permutation` (word ordering's constraint: each source word exactly once, then end of
sentence). Its candidates are columns: the whole vocabulary, or, under the constraint, just the sentence's
own words and EOS, so a constrained search scores a dozen words per row instead of the vocabulary.
One `beam_search` decodes every model: cumulative log-probabilities for a cross-entropy model, last-word
scores for a BSO model. BLEU is sacrebleu's corpus BLEU on the tokenized text (tokenize='none'); the
translation cost is 1 - sentence BLEU (sacrebleu, exp smoothing).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.datasets.translation import BOS, EOS, PAD, Vocab
from mlrun.task import Task

State = tuple[Tensor, Tensor, Tensor]  # h (N, layers, H), c (N, layers, H), attentional output fed back (N, H)
Memory = tuple[Tensor, Tensor]  # encoder states (B, S, H), valid source positions (B, S)
NEG = float("-inf")


# ---------------------------------------------------------------------------------------------- network


class Seq2Seq(nn.Module):
    """LSTM encoder; LSTM decoder with Luong's general attention and input feeding (as seq2seq-attn, the
    paper's code base). The decoder starts from the encoder's last state. Scores are the output layer's
    logits: log-softmaxed for cross-entropy, used raw by BSO.

    `tie` shares one word-vector table between encoder input, decoder input and output layer (Press & Wolf,
    2017; not in the paper).

    Dropout is applied between decoder layers and before the output layer with masks given per step, so the
    search and the passes that recompute its scores use the same mask for a sentence at a time step (the
    paper's synchronised dropout). The encoder uses plain dropout (it runs once per batch).
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, emb: int = 256, hidden: int = 256, layers: int = 2,
                 dropout: float = 0.0, init: float = 0.1, tie: bool = False) -> None:
        super().__init__()
        self.hidden, self.layers, self.dropout, self.tgt_vocab = hidden, layers, dropout, tgt_vocab
        self.src_emb = nn.Embedding(src_vocab, emb, padding_idx=PAD)
        self.encoder = nn.LSTM(emb, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.tgt_emb = nn.Embedding(tgt_vocab, emb, padding_idx=PAD)
        self.cells = nn.ModuleList(nn.LSTMCell(emb + hidden if i == 0 else hidden, hidden) for i in range(layers))
        self.attn_in = nn.Linear(hidden, hidden, bias=False)
        self.attn_out = nn.Linear(2 * hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, tgt_vocab)
        if tie:  # one word-vector table for source, target and output (needs one vocabulary and emb == hidden)
            if src_vocab != tgt_vocab or emb != hidden:
                raise ValueError("tie=true needs src_vocab == tgt_vocab and emb == hidden")
            self.tgt_emb.weight = self.src_emb.weight
            self.out.weight = self.src_emb.weight
        if init:
            for p in self.parameters():
                nn.init.uniform_(p, -init, init)
        with torch.no_grad():
            self.src_emb.weight[PAD].zero_()
            self.tgt_emb.weight[PAD].zero_()

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The authors' three learning-rate groups (`-layer_etas`): encoder (source embeddings and LSTM),
        decoder (target embeddings, LSTM, attention), generator (output layer). A parameter shared between
        groups (a tied table) is placed in the first group that holds it."""
        groups = [[self.src_emb, self.encoder], [self.tgt_emb, self.cells, self.attn_in, self.attn_out],
                  [self.out]]
        seen: set[int] = set()
        out = []
        for mods in groups:
            params = [p for m in mods for p in m.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            out.append(params)
        return out

    def encode(self, src: Tensor, src_len: Tensor) -> tuple[Memory, State]:
        """Memory (encoder states (B, S, H), valid-position mask (B, S)) and the decoder's first state."""
        packed = nn.utils.rnn.pack_padded_sequence(self.src_emb(src), src_len.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, (h, c) = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        mask = torch.arange(src.shape[1], device=src.device)[None] < src_len.to(src.device)[:, None]
        feed = out.new_zeros(src.shape[0], self.hidden)
        return (out, mask), (h.transpose(0, 1), c.transpose(0, 1), feed)

    def dropout_masks(self, batch: int, steps: int, device: torch.device) -> Tensor | None:
        """(steps, batch, layers, H) inverted-dropout masks, or None when not training or no dropout."""
        if not self.training or self.dropout == 0:
            return None
        keep = 1 - self.dropout
        return torch.bernoulli(torch.full((steps, batch, self.layers, self.hidden), keep, device=device)) / keep

    def step(self, tokens: Tensor, state: State, memory: Memory, mask: Tensor | None = None) -> tuple[Tensor, State]:
        """Consume one token per row: the output features (N, H) that score the next word, and the new state.

        Rows come in B groups of G = N / B consecutive rows, one group per source sentence (a beam's K
        prefixes, or one gold prefix), all attending to that sentence's memory. `mask` is the sentences'
        dropout mask for this step, (B, layers, H), shared by a sentence's rows."""
        h, c, feed = state
        enc, valid = memory
        B, N = enc.shape[0], tokens.shape[0]
        G = N // B
        if mask is not None and G > 1:
            mask = mask.repeat_interleave(G, 0)
        x = torch.cat([self.tgt_emb(tokens), feed], dim=-1)
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if i > 0 and mask is not None:
                x = x * mask[:, i - 1]
            hi, ci = cell(x, (h[:, i], c[:, i]))
            hs.append(hi)
            cs.append(ci)
            x = hi
        att = torch.bmm(self.attn_in(x).view(B, G, -1), enc.transpose(1, 2)).masked_fill(~valid[:, None], NEG)
        context = torch.bmm(att.softmax(-1), enc).view(N, -1)
        feed = torch.tanh(self.attn_out(torch.cat([context, x], dim=-1)))
        out = feed * mask[:, -1] if mask is not None else feed
        return out, (torch.stack(hs, 1), torch.stack(cs, 1), feed)

    def scores(self, features: Tensor, words: Tensor | None = None) -> Tensor:
        """Every word's score (N, V); or, given words (B, C) per sentence, the scores of those columns (N, C)
        for the sentence's rows (N = B·G)."""
        if words is None:
            return self.out(features)
        B, C = words.shape
        w = self.out.weight[words]  # (B, C, H)
        s = torch.bmm(features.view(B, -1, features.shape[-1]), w.transpose(1, 2)) + self.out.bias[words][:, None]
        return s.view(-1, C)

    def score_of(self, features: Tensor, words: Tensor) -> Tensor:
        """The scores of one word per row, without computing the whole vocabulary's."""
        return (features * self.out.weight[words]).sum(-1) + self.out.bias[words]

    def teacher_force(self, memory: Memory, state: State, tgt: Tensor, masks: Tensor | None = None
                      ) -> tuple[Tensor, list[State]]:
        """Output features (B, T, H) of every gold step and the state after each step (the gold beam's)."""
        inputs = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
        feats, states = [], []
        for t in range(tgt.shape[1]):
            f, state = self.step(inputs[:, t], state, memory, None if masks is None else masks[t])
            feats.append(f)
            states.append(state)
        return torch.stack(feats, 1), states


def select(state: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
    return tuple(s.index_select(0, rows) for s in state)


def blend(keep: Tensor, a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Row-wise: a where keep, else b."""
    return tuple(torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, y) for x, y in zip(a, b))


def detach(state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(s.detach() for s in state)


# ---------------------------------------------------------------------------------------------- successors


class Successors:
    """Which words may extend a prefix: any word (never padding or the start symbol).

    Candidates are columns. `init` gives the column words, (B, C) per sentence or None for the whole
    vocabulary (column = word id), and the first constraint state; the state has one row per prefix, so
    beams reorder it with index_select. `allowed` is (rows or 1, C); `advance` takes each row's column."""

    def init(self, src: Tensor, vocab: int) -> tuple[Tensor | None, Tensor]:
        return None, src.new_zeros(src.shape[0], 1)

    def allowed(self, state: Tensor, vocab: int) -> Tensor:
        ok = torch.ones(1, vocab, dtype=torch.bool, device=state.device)
        ok[:, PAD] = False
        ok[:, BOS] = False
        return ok

    def advance(self, state: Tensor, cols: Tensor) -> Tensor:
        return state


class Permutation(Successors):
    """Word ordering's constraint: each source token exactly once (as a multiset), then end of sentence.

    The columns are the sentence's distinct words (a repeated word's later copies are PAD columns, never
    allowed) and EOS last; the state counts, per column, the copies not yet used."""

    def init(self, src: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
        B, S = src.shape
        earlier = torch.ones(S, S, dtype=torch.bool, device=src.device).tril(-1)
        repeat = ((src[:, :, None] == src[:, None, :]) & earlier).any(2)
        words = torch.cat([src.masked_fill(repeat, PAD), src.new_full((B, 1), EOS)], 1)
        counts = ((words[:, :, None] == src[:, None, :]) & (src != PAD)[:, None, :]).sum(2)
        return words, counts.to(torch.int16)

    def allowed(self, state: Tensor, vocab: int) -> Tensor:
        ok = state > 0
        ok[:, -1] = state.sum(1) == 0
        return ok

    def advance(self, state: Tensor, cols: Tensor) -> Tensor:
        return state.scatter_add(1, cols[:, None], torch.full_like(cols[:, None], -1, dtype=state.dtype))


SUCCESSORS: dict[str, type[Successors]] = {"all": Successors, "permutation": Permutation}


def column_of(words: Tensor | None, tokens: Tensor) -> Tensor:
    """Each token's column: the token itself over the whole vocabulary, else its first column in `words`
    (B, C); tokens (B, T) -> (B, T). A token without a column (padding) maps to column 0."""
    if words is None:
        return tokens
    return (words[:, None, :] == tokens[:, :, None]).to(torch.uint8).argmax(2)


# ---------------------------------------------------------------------------------------------- decoding


@torch.no_grad()
def beam_search(net: Seq2Seq, src: Tensor, src_len: Tensor, beam: int, max_len: Tensor,
                successors: Successors | None = None, scoring: str = "logprob") -> Tensor:
    """The best finished hypothesis of each source, (B, max(max_len)) token ids ending in EOS, then PAD.

    scoring: "logprob" ranks prefixes by their summed log-probabilities (a probabilistic seq2seq model,
    normalised over the whole vocabulary; an example stops once no live prefix can beat its best finished
    one, which makes the search exact when the beam holds every prefix); "last" ranks them by the score of
    their last word (a BSO model; an example stops when its K best candidates all end the sentence). A
    candidate ending in EOS that ranks among the K best of its step is finished; the beam continues with the
    K best that do not end. A hypothesis has at most max_len tokens, EOS included (the last step may only
    end it).
    """
    successors = successors or Successors()
    B, K, V, dev = src.shape[0], beam, net.tgt_vocab, src.device
    L = int(max_len.max())
    memory, state = net.encode(src, src_len)
    words, cons = successors.init(src, V)
    cons = cons.repeat_interleave(K, 0)
    cols = words if words is not None else torch.arange(V, device=dev)[None]
    C = cols.shape[1]
    is_eos = (cols == EOS).view(-1, 1, C)
    scores = torch.full((B, K), NEG, device=dev)
    scores[:, 0] = 0.0
    tokens = torch.full((B,), BOS, dtype=torch.long, device=dev)  # step 0: a sentence's K rows are alike
    hist = torch.full((B, K, L), PAD, dtype=torch.long, device=dev)
    best = torch.full((B,), NEG, device=dev)
    best_seq = torch.full((B, L), PAD, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rank = torch.arange(2 * K, device=dev)
    ar = torch.arange(B, device=dev)
    for t in range(L):
        feats, state = net.step(tokens, state, memory)
        if t == 0:
            feats, state = feats.repeat_interleave(K, 0), tuple(x.repeat_interleave(K, 0) for x in state)
        if scoring == "logprob":
            logp = net.scores(feats).log_softmax(-1)
            if words is not None:
                logp = logp.view(B, K, V).gather(2, words[:, None].expand(B, K, C)).view(B * K, C)
            s = logp + scores.view(-1, 1)
        else:
            s = net.scores(feats, words)
        ok = (successors.allowed(cons, V) & scores.view(-1, 1).isfinite()).view(B, K, C)
        ok &= ~(t == max_len - 1).view(B, 1, 1) | is_eos
        cand = s.view(B, K, C).masked_fill(~ok, NEG).view(B, K * C)
        top, idx = cand.topk(min(2 * K, K * C), dim=1)
        parent, col = idx // C, idx % C
        word = col if words is None else words.gather(1, col)
        finite = top.isfinite()
        ends = (word == EOS) & finite & (rank[: top.shape[1]] < K)
        end_score, end_at = top.masked_fill(~ends, NEG).max(1)
        better = (end_score > best) & ~done
        if better.any():
            b = better.nonzero().squeeze(1)
            seq = hist[b, parent[b, end_at[b]]]
            seq[:, t] = EOS
            best_seq[b] = seq
            best[b] = end_score[b]
        live = top.masked_fill((word == EOS) | ~finite, NEG)
        if scoring == "last":  # BSO's stopping rule: the K best candidates all end the sentence
            done |= ~(live.isfinite() & (rank[: top.shape[1]] < K)).any(1)
        scores, pick = live.topk(K, dim=1)
        parent, col, word = parent.gather(1, pick), col.gather(1, pick), word.gather(1, pick)
        hist = hist.gather(1, parent[..., None].expand(B, K, L))
        hist[:, :, t] = word
        flat = (ar[:, None] * K + parent).view(-1)
        state = select(state, flat)
        cons = successors.advance(cons.index_select(0, flat), col.view(-1))
        tokens = word.view(-1)
        if scoring == "logprob":  # summed log-probabilities only fall: no live prefix can catch up
            done |= best >= scores[:, 0]
        done |= t >= max_len - 1
        if bool(done.all()):
            break
    return best_seq


# ---------------------------------------------------------------------------------------------- BSO loss


def sentence_cost(pred: Sequence[int], gold: Sequence[int]) -> float:
    """1 - sentence BLEU / 100 of two id sequences (sacrebleu, exp smoothing, on the ids as tokens)."""
    import sacrebleu

    hyp, ref = " ".join(map(str, pred)), " ".join(map(str, gold))
    return 1.0 - sacrebleu.sentence_bleu(hyp, [ref], tokenize="none").score / 100.0


@torch.no_grad()
def margin_search(net: Seq2Seq, memory: Memory, state0: State, batch: dict[str, Tensor], beam: int,
                  successors: Successors, margin: float = 1.0, masks: Tensor | None = None) -> dict[str, Tensor]:
    """BSO's training search (LaSO), without gradients: per sentence K + 1 rows, its beam's K prefixes and the
    gold prefix, all advanced by one decoder call per time step.

    At each step the gold prefix must beat the K-th candidate by the margin (at its last step, the best wrong
    candidate); on a violation the sentence's beam restarts from the gold prefix. Returns per (sentence,
    step): the gold word's score `gold`, `viol`, the violating candidate's word and score, `zero_cost` (the
    K-th candidate was the gold prefix itself), and `spliced`: the tokens the violating prefixes consumed
    since the last restart (gold elsewhere).
    """
    src, tgt, tgt_len = batch["src"], batch["tgt"], batch["tgt_len"]
    B, T, K, V, dev = tgt.shape[0], tgt.shape[1], beam, net.tgt_vocab, tgt.device
    R = K + 1  # rows per sentence: K beam slots, then the gold prefix
    words, cons0 = successors.init(src, V)
    C = V if words is None else words.shape[1]
    gold_col = column_of(words, tgt)
    ar, pos = torch.arange(B, device=dev), torch.arange(T, device=dev)
    base = ar[:, None] * R
    out = {"gold": torch.zeros(B, T, device=dev), "viol": torch.zeros(B, T, dtype=torch.bool, device=dev),
           "viol_word": torch.zeros(B, T, dtype=torch.long, device=dev),
           "viol_score": torch.zeros(B, T, device=dev),
           "zero_cost": torch.zeros(B, T, dtype=torch.bool, device=dev), "spliced": tgt.clone()}
    state, cons = state0, cons0.repeat_interleave(R, 0)
    tokens = torch.full((B,), BOS, dtype=torch.long, device=dev)  # step 0: every row of a sentence is alike
    alive = torch.zeros(B, K, dtype=torch.bool, device=dev)
    alive[:, 0] = True
    slot0 = alive.clone()
    hist = torch.full((B, K, T), PAD, dtype=torch.long, device=dev)
    gold_slot = torch.zeros(B, dtype=torch.long, device=dev)
    last_reset = torch.zeros(B, dtype=torch.long, device=dev)
    for t in range(T):
        active = t < tgt_len
        feats, new_state = net.step(tokens, state, memory, None if masks is None else masks[t])
        if t == 0:
            feats, new_state = feats.repeat_interleave(R, 0), tuple(x.repeat_interleave(R, 0) for x in new_state)
        feats = feats.view(B, R, -1)
        out["gold"][:, t] = net.score_of(feats[:, K], tgt[:, t])
        ok = successors.allowed(cons.view(B, R, -1)[:, :K].reshape(B * K, -1), V)
        cand = net.scores(feats[:, :K].reshape(B * K, -1), words).masked_fill(~ok, NEG)
        cand = cand.masked_fill_(~alive.view(-1, 1), NEG).view(B, K * C)
        top, idx = cand.topk(max(K, 2), dim=1)  # the 2 best give the best wrong candidate
        gold_flat = gold_slot * C + gold_col[:, t]
        first_gold = idx[:, 0] == gold_flat
        best_wrong = torch.where(first_gold, top[:, 1], top[:, 0])
        best_idx = torch.where(first_gold, idx[:, 1], idx[:, 0])
        top, idx = top[:, :K], idx[:, :K]
        parent, col = idx // C, idx % C
        is_gold = (parent == gold_slot[:, None]) & (col == gold_col[:, t, None])
        final = t == tgt_len - 1
        off = torch.where(final, best_wrong, top[:, K - 1])
        off_idx = torch.where(final, best_idx, idx[:, K - 1])
        off_parent, off_col = off_idx // C, off_idx % C
        v = active & off.isfinite() & (out["gold"][:, t] < off + margin)
        out["viol"][:, t] = v
        out["viol_word"][:, t] = off_col if words is None else words.gather(1, off_col[:, None]).squeeze(1)
        out["viol_score"][:, t] = torch.where(v, off, torch.zeros_like(off))
        out["zero_cost"][:, t] = ~final & is_gold[:, K - 1]
        own = (pos[None] >= last_reset[:, None]) & (pos[None] < t) & v[:, None]  # the violator's own tokens
        out["spliced"] = torch.where(own, hist[ar, off_parent], out["spliced"])
        # the next rows: the K best prefixes and the gold prefix; on a violation slot 0 restarts from the gold
        word = col if words is None else words.gather(1, col)
        rows = torch.cat([base + parent, base + K], 1)
        rows[:, 0] = torch.where(v, base[:, 0] + K, rows[:, 0])
        cols = torch.cat([col, gold_col[:, t, None]], 1)
        cols[:, 0] = torch.where(v, gold_col[:, t], cols[:, 0])
        toks = torch.cat([word, tgt[:, t, None]], 1)
        toks[:, 0] = torch.where(v, tgt[:, t], toks[:, 0])
        state = select(new_state, rows.view(-1))
        cons = successors.advance(cons.index_select(0, rows.view(-1)), cols.view(-1))
        tokens = toks.view(-1)
        hist = hist.gather(1, parent[..., None].expand(B, K, T))
        hist[:, :, t] = word
        hist = torch.where(v[:, None, None], tgt[:, None, :] * (pos <= t), hist)
        alive = torch.where(v[:, None], slot0, top.isfinite())
        gold_slot = torch.where(v, 0, is_gold.to(torch.uint8).argmax(1))
        last_reset = torch.where(v, t + 1, last_reset)
    return out


def bso_loss(net: Seq2Seq, batch: dict[str, Tensor], beam: int, successors: Successors | None = None,
             margin: float = 1.0, cost: str = "zero_one", cost_scale: float = 1.0) -> tuple[Tensor, dict[str, Any]]:
    """The search-based margin loss of one batch, summed over violations and sentences (as the authors'
    `bso_train.lua`, which back-propagates every violation of the batch unscaled).

    The search (`margin_search`) runs without gradients; then one pass with gradients recomputes the scores
    at the violations: per sentence two rows, the gold prefix and the violating sequences spliced together
    (each restarting from the gold state after a violation), up to the batch's last violation.

    cost: "zero_one" (Δ = 1 for any wrong prefix) or "bleu" (Δ = 1 - sentence BLEU of the violating segment
    since the last restart against the gold segment), times cost_scale. Returns the loss and what the
    search found (violations, the search's own scores for checking the recomputation).
    """
    successors = successors or Successors()
    src, src_len, tgt = batch["src"], batch["src_len"], batch["tgt"]
    B, T, dev = tgt.shape[0], tgt.shape[1], tgt.device
    memory, state0 = net.encode(src, src_len)
    masks = net.dropout_masks(B, T, dev)
    found = margin_search(net, (memory[0].detach(), memory[1]), detach(state0), batch, beam, successors, margin,
                          masks)
    viol, viol_word, spliced = found["viol"], found["viol_word"], found["spliced"]
    n_viol = int(viol.sum())
    info = {"violations": n_viol, "search_scores": found["viol_score"], "search_gold": found["gold"], "viol": viol}
    if n_viol == 0:
        return memory[0].sum() * 0.0, info

    last_t = int(viol.any(0).nonzero().max()) + 1
    base = torch.arange(B, device=dev) * 2
    state = tuple(x.repeat_interleave(2, 0) for x in state0)
    tokens = torch.full((2 * B,), BOS, dtype=torch.long, device=dev)
    gold, pred = [], []
    for t in range(last_t):
        feats, new_state = net.step(tokens, state, memory, None if masks is None else masks[t])
        feats = feats.view(B, 2, -1)
        gold.append(net.score_of(feats[:, 0], tgt[:, t]))
        pred.append(net.score_of(feats[:, 1], viol_word[:, t]))
        v = viol[:, t]  # after a violation the spliced row restarts from the gold prefix
        state = select(new_state, torch.stack([base, torch.where(v, base, base + 1)], 1).view(-1))
        tokens = torch.stack([tgt[:, t], torch.where(v, tgt[:, t], spliced[:, t])], 1).view(-1)
    gold_scores, pred_scores = torch.stack(gold, 1), torch.stack(pred, 1)
    delta = (~found["zero_cost"][:, :last_t]).float()
    if cost == "bleu":
        delta = _bleu_costs(spliced, tgt, viol, viol_word, last_t) * delta
    elif cost != "zero_one":
        raise ValueError(f"cost={cost!r}: expected 'zero_one' or 'bleu'")
    terms = cost_scale * delta * (margin - gold_scores + pred_scores)
    info.update(pred_scores=pred_scores, gold_scores=gold_scores)
    return terms.masked_fill(~viol[:, :last_t], 0.0).sum(), info


def _bleu_costs(spliced: Tensor, tgt: Tensor, viol: Tensor, viol_word: Tensor, steps: int) -> Tensor:
    """1 - sentence BLEU of each violating segment (since the last restart) against the gold segment."""
    out = torch.zeros(viol.shape[0], steps)
    for b, row in enumerate(viol[:, :steps].tolist()):
        start = 0
        for t, v in enumerate(row):
            if v:
                pred = spliced[b, start:t].tolist() + [int(viol_word[b, t])]
                out[b, t] = sentence_cost(pred, tgt[b, start:t + 1].tolist())
                start = t + 1
    return out.to(viol.device)


def xent_loss(net: Seq2Seq, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy summed over a sentence's words, averaged over sentences (seq2seq-attn's normalisation)."""
    memory, state = net.encode(batch["src"], batch["src_len"])
    tgt = batch["tgt"]
    feats, _ = net.teacher_force(memory, state, tgt, net.dropout_masks(*tgt.shape, tgt.device))
    nll = F.cross_entropy(net.scores(feats).flatten(0, 1), tgt.flatten(), ignore_index=PAD, reduction="sum")
    return nll / tgt.shape[0]


# ---------------------------------------------------------------------------------------------- task

STAGE_KEYS = frozenset({"loss", "successors", "beam_start", "max_beam", "epochs_per_beam", "layer_lrs", "margin",
                        "cost", "cost_scale", "reset_on_beam"})


class BSO(Task):
    """Cross-entropy or beam-search-optimization training of a `Seq2Seq`, evaluated by BLEU at several beams.

    What a stage trains is set by the stage's `args:` (the model's own arguments are the defaults), so arms
    of a study share the model config and their first stages and differ only in a later stage's args:
    `{arm: NAME}` takes the settings of `arms[NAME]`; other keys (from STAGE_KEYS) set a setting directly.

    Args:
        net: the encoder-decoder (a `_target_`; vocabulary sizes come from the dataset config).
        optimizer: a partial optimizer, built afresh at each stage (as the authors start BSO with new state).
        loss: "xent" (seq2seq) or "bso".
        successors: "all" or "permutation": the successor function of BSO's training search (ConBSO).
        decode: the successor function of evaluation decoding (`bleu_k<K>`); word ordering predicts under
            the constraint, as the authors (`predict.lua -con wo`).
        report_free: also decode without a constraint (`bleu_free_k<K>`), reported, not claimed.
        beam_start, max_beam, epochs_per_beam: the beam curriculum (2, +1 every 2 epochs, up to K_train).
        reset_on_beam: zero the optimizer's accumulated state whenever the beam grows (the authors' Adagrad).
        layer_lrs: learning rates of the encoder, decoder and generator groups (the authors' `-layer_etas`),
            or None for the optimizer's one rate.
        margin, cost, cost_scale: the margin loss (cost "zero_one" or "bleu"; cost_scale is `-mt_delt_multiple`).
        arms: named settings a stage may select with `{arm: NAME}`.
        val_beams, test_beams: the beams BLEU is reported at.
        max_len_a, max_len_b: decoding stops at a * source length + b tokens.
    """

    def __init__(self, net: Seq2Seq, optimizer: Callable[..., torch.optim.Optimizer], loss: str = "xent",
                 successors: str = "all", decode: str = "all", report_free: bool = False, beam_start: int = 2,
                 max_beam: int = 6, epochs_per_beam: float = 2.0, reset_on_beam: bool = True,
                 layer_lrs: Sequence[float] | None = None, margin: float = 1.0, cost: str = "zero_one",
                 cost_scale: float = 1.0, arms: dict[str, dict[str, Any]] | None = None,
                 val_beams: Sequence[int] = (5,), test_beams: Sequence[int] = (1, 5, 10), max_len_a: float = 1.0,
                 max_len_b: int = 5) -> None:
        super().__init__()
        self.net, self._optimizer = net, optimizer
        self.defaults: dict[str, Any] = {
            "loss": loss, "successors": successors, "beam_start": beam_start, "max_beam": max_beam,
            "epochs_per_beam": epochs_per_beam, "reset_on_beam": reset_on_beam,
            "layer_lrs": list(layer_lrs) if layer_lrs is not None else None, "margin": margin, "cost": cost,
            "cost_scale": cost_scale}
        self.arms = {k: dict(v) for k, v in (arms or {}).items()}
        if decode not in SUCCESSORS:
            raise ValueError(f"decode={decode!r}: expected one of {sorted(SUCCESSORS)}")
        self.decode_with, self.report_free = decode, report_free
        self.val_beams, self.test_beams = list(val_beams), list(test_beams)
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.settings = self._check(dict(self.defaults))
        self.stage_steps: dict[str, int] = {}
        self.steps_per_epoch = 1
        self.violations_start: float | None = None
        self.vocab: Vocab | None = None
        self._opt: torch.optim.Optimizer | None = None

    @staticmethod
    def _check(settings: dict[str, Any]) -> dict[str, Any]:
        if settings["loss"] not in ("xent", "bso"):
            raise ValueError(f"loss={settings['loss']!r}: expected 'xent' or 'bso'")
        if settings["successors"] not in SUCCESSORS:
            raise ValueError(f"successors={settings['successors']!r}: expected one of {sorted(SUCCESSORS)}")
        if settings["cost"] not in ("zero_one", "bleu"):
            raise ValueError(f"cost={settings['cost']!r}: expected 'zero_one' or 'bleu'")
        if settings["layer_lrs"] is not None and len(settings["layer_lrs"]) != 3:
            raise ValueError(f"layer_lrs={settings['layer_lrs']}: expected 3 rates (encoder, decoder, generator)")
        return settings

    # ------------------------------------------------------------------ stages and curriculum
    def stage_settings(self, args: dict[str, Any]) -> dict[str, Any]:
        """The model's defaults, then the named arm's settings, then the stage's own keys."""
        args = dict(args)
        arm = args.pop("arm", None)
        if arm is not None:
            if arm not in self.arms:
                raise ValueError(f"stage args arm={arm!r}: expected one of {sorted(self.arms)}")
            args = {**self.arms[arm], **args}
        unknown = sorted(set(args) - STAGE_KEYS)
        if unknown:
            raise ValueError(f"stage args {unknown}: expected keys among {sorted(STAGE_KEYS)} or 'arm'")
        return self._check({**self.defaults, **args})

    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self.settings = self.stage_settings(self.stage_args)
        self.vocab = data.tgt_vocab
        self.steps_per_epoch = data.steps_per_epoch()
        if self.searching() and self.stage_steps.get(stage, 0) == 0:
            self.violations_start = self.val_violations(data)

    @property
    def successors(self) -> Successors:
        return SUCCESSORS[self.settings["successors"]]()

    def searching(self) -> bool:
        return self.settings["loss"] == "bso"

    def beam_size(self, steps: int | None = None) -> int:
        """The curriculum: beam_start, one more every epochs_per_beam epochs of this stage, up to max_beam."""
        s = self.settings
        steps = self.stage_steps.get(self.stage, 0) if steps is None else steps
        epoch = steps / self.steps_per_epoch
        return min(s["beam_start"] + int(epoch // s["epochs_per_beam"]), s["max_beam"])

    def extra_state(self) -> dict[str, Any]:
        return {"stage_steps": dict(self.stage_steps), "settings": dict(self.settings),
                "violations_start": self.violations_start}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.stage_steps = dict(state.get("stage_steps", {}))
        if "settings" in state:  # the last stage's, so an evaluation-only run decodes as it trained
            self.settings = self._check({**self.defaults, **state["settings"]})
        self.violations_start = state.get("violations_start")

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        lrs = self.settings["layer_lrs"]
        if lrs is None:
            self._opt = self._optimizer(self.net.parameters())
        else:
            groups = [{"params": ps, "lr": float(lr)} for ps, lr in zip(self.net.layer_groups(), lrs) if ps]
            self._opt = self._optimizer(groups)
        return {"model": self._opt}

    def reset_optimizer_state(self) -> None:
        """Zero the accumulated state (Adagrad's sum of squared gradients), as the authors at each beam increase."""
        for st in self._opt.state.values() if self._opt is not None else ():
            for k, v in st.items():
                if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                    v.zero_()

    def training_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        steps = self.stage_steps.get(self.stage, 0)
        if self.searching():
            s = self.settings
            k = self.beam_size(steps)
            if s["reset_on_beam"] and steps > 0 and k != self.beam_size(steps - 1):
                self.reset_optimizer_state()
            loss, info = bso_loss(self.net, batch, k, self.successors, s["margin"], s["cost"], s["cost_scale"])
            self.log("beam", float(k))
            self.log("violations", info["violations"] / batch["tgt"].shape[0])
        else:
            loss = xent_loss(self.net, batch)
        self.stage_steps[self.stage] = steps + 1
        yield "model", loss

    # ------------------------------------------------------------------ evaluation
    def decode(self, batch: dict[str, Tensor], beam: int, successors: str | None = None) -> list[str]:
        max_len = (batch["src_len"].float() * self.max_len_a).long() + self.max_len_b
        dev = next(self.parameters()).device
        scoring = "last" if self.searching() else "logprob"
        succ = SUCCESSORS[successors or self.decode_with]()
        out = beam_search(self.net, batch["src"].to(dev), batch["src_len"].to(dev), beam, max_len.to(dev), succ,
                          scoring)
        return [" ".join(self.vocab.decode(row)) for row in out.tolist()]

    def _batches(self, data: Any, split: str) -> Iterator[dict[str, Any]]:
        ds = data.dataset(split, self.stage)
        size = data.eval_batch_size or len(ds)
        for i in range(0, len(ds), size):
            yield data.collate([ds[j] for j in range(i, min(i + size, len(ds)))])

    @torch.no_grad()
    def val_violations(self, data: Any) -> float:
        """Margin violations per sentence of BSO's training search (beam max_beam, this stage's successors)
        on the validation split, without dropout: the same yardstick before and after BSO training."""
        was = self.training
        self.eval()
        total, n = 0, 0
        for batch in self._batches(data, "val"):
            total += self.violations(batch)
            n += batch["tgt"].shape[0]
        self.train(was)
        return total / max(n, 1)

    def violations(self, batch: dict[str, Tensor]) -> int:
        """Margin violations of BSO's training search at beam max_beam on one batch (the search alone)."""
        dev = next(self.parameters()).device
        batch = {k: batch[k].to(dev) for k in ("src", "src_len", "tgt", "tgt_len")}
        memory, state0 = self.net.encode(batch["src"], batch["src_len"])
        found = margin_search(self.net, memory, state0, batch, int(self.settings["max_beam"]), self.successors,
                              self.settings["margin"])
        return int(found["viol"].sum())

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        import sacrebleu

        beams = self.test_beams if split == "test" else self.val_beams
        modes = {"": None}
        if self.report_free and self.decode_with != "all":
            modes["free_"] = "all"
        hyps: dict[tuple[str, int], list[str]] = {(m, k): [] for m in modes for k in beams}
        refs: list[str] = []
        nll, words, viol, sents = 0.0, 0, 0, 0
        for batch in loader:
            refs.extend(batch["refs"])
            for m, succ in modes.items():
                for k in beams:
                    hyps[m, k].extend(self.decode(batch, k, succ))
            if split == "val" and self.searching():
                viol += self.violations(batch)
            elif split == "val":
                nll += float(xent_loss(self.net, batch)) * batch["tgt"].shape[0]
                words += int((batch["tgt"] != PAD).sum())
            sents += batch["tgt"].shape[0]
        out = {f"bleu_{m}k{k}": sacrebleu.corpus_bleu(h, [refs], tokenize="none").score for (m, k), h in hyps.items()}
        if split == "val" and self.searching():
            out["violations"] = viol / max(sents, 1)
            if self.violations_start is not None:
                out["violations_start"] = self.violations_start
        elif split == "val" and words:
            out["ppl"] = math.exp(nll / words)
        return out


# ---------------------------------------------------------------------------------------------- study


ARMS = {"seq2seq": "seq2seq", "bso_k2": "BSO (K_tr 2)", "bso_k6": "BSO (K_tr 6)", "conbso_k2": "ConBSO (K_tr 2)",
        "conbso_k6": "ConBSO (K_tr 6)"}


def _value(study: dict[str, Any], label: str, metric: str) -> float | None:
    m = study.get("groups", {}).get(label, {}).get(metric)
    return None if m is None else m["median"]


def summarize(study: dict[str, Any], gains: dict[str, list[str]] | None = None,
              baseline: str = "seq2seq") -> dict[str, float]:
    """Derived metrics from whatever runs the study holds (one seed's, or all: then medians over seeds).

    `gain_<arm>_k<K>`: the arm's test BLEU at beam K minus the baseline's, for each arm -> beams in `gains`;
    `viol_ratio_<arm>`: violations per sentence after BSO over before, on the validation set."""
    gains = gains or {"bso_k2": ["1"], "bso_k6": ["5", "10"], "conbso_k2": ["1"], "conbso_k6": ["5", "10"]}
    out: dict[str, float] = {}
    for arm, ks in gains.items():
        for k in ks:
            a, b = _value(study, arm, f"test/bleu_k{k}"), _value(study, baseline, f"test/bleu_k{k}")
            if a is not None and b is not None:
                out[f"gain_{arm}_k{k}"] = a - b
    for arm in study.get("groups", {}):
        after, before = _value(study, arm, "val/violations"), _value(study, arm, "val/violations_start")
        if after is not None and before:
            out[f"viol_ratio_{arm}"] = after / before
    return out


def study_figure(study: dict[str, Any], out_dir: Path, beams: Sequence[int] = (1, 5, 10)) -> list[Path]:
    """Left: constrained test BLEU against test beam, one colour per arm, each seed a dot, the line through the
    medians. Right: validation margin violations per sentence before and after BSO, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in study.get("runs", []) if r.get("status") == "completed"]
    labels = sorted({r["label"] for r in runs}, key=lambda x: list(ARMS).index(x) if x in ARMS else 99)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    table: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        colour = f"C{i}"
        mine = [r for r in runs if r["label"] == label]
        med = []
        for k in beams:
            vals = [float(r["metrics"][f"test/bleu_k{k}"]) for r in mine if f"test/bleu_k{k}" in r["metrics"]]
            jitter = (i - len(labels) / 2) * 0.12
            ax.scatter([k + jitter] * len(vals), vals, s=12, color=colour, alpha=0.7)
            med.append(statistics.median(vals) if vals else float("nan"))
        ax.plot([k + (i - len(labels) / 2) * 0.12 for k in beams], med, "-", color=colour,
                label=f"{ARMS.get(label, label)} (n={len(mine)})")
        table[ARMS.get(label, label)] = dict(zip(map(str, beams), med))
        before = [float(r["metrics"]["val/violations_start"]) for r in mine if "val/violations_start" in r["metrics"]]
        after = [float(r["metrics"]["val/violations"]) for r in mine if "val/violations" in r["metrics"]]
        if before and after:
            for b, a in zip(before, after):
                bx.plot([0, 1], [b, a], "-o", color=colour, alpha=0.6, ms=3)
            bx.plot([], [], "-o", color=colour, label=ARMS.get(label, label))
    ax.set_xlabel("test beam size K")
    ax.set_ylabel("test BLEU (constrained decoding)")
    ax.set_xticks(list(beams))
    ax.set_title("Word ordering: dots = seeds, lines = medians")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xticks([0, 1], ["start of BSO", "end of BSO"])
    bx.set_ylabel("val margin violations per sentence")
    bx.set_title("BSO's search at K_tr, one line per seed")
    bx.grid(alpha=0.3)
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "bleu_vs_beam.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    (out_dir / "bleu_table.json").write_text(json.dumps(table, indent=1))
    return [path]
