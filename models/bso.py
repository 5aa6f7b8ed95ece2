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

A successor function limits each step's words: `all` (any word; padding and start symbols never) or
`permutation` (word ordering's constraint: each source word exactly once, then end of sentence), used by
training search (ConBSO) and by decoding. One `beam_search` decodes every model: cumulative log-probabilities
for a cross-entropy model, last-word scores for a BSO model. BLEU is sacrebleu's corpus BLEU on the
tokenized text (tokenize='none'); the translation cost is 1 - sentence BLEU (sacrebleu, exp smoothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.datasets.translation import BOS, EOS, PAD, Vocab
from mlrun.task import Task

State = tuple[Tensor, Tensor, Tensor]  # h (N, layers, H), c (N, layers, H), attentional output fed back (N, H)
NEG = float("-inf")


# ---------------------------------------------------------------------------------------------- network


class Seq2Seq(nn.Module):
    """LSTM encoder; LSTM decoder with Luong's general attention and input feeding (as seq2seq-attn, the
    paper's code base). The decoder starts from the encoder's last state. Scores are the output layer's
    logits: log-softmaxed for cross-entropy, used raw by BSO.

    `tie` shares one word-vector table between encoder input, decoder input and output layer (Press & Wolf,
    2017; not in the paper): with few sentences per word it lets the decoder learn to name a source word.

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

    def encode(self, src: Tensor, src_len: Tensor) -> tuple[tuple[Tensor, Tensor], State]:
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

    def step(self, tokens: Tensor, state: State, memory: tuple[Tensor, Tensor], mask: Tensor | None = None
             ) -> tuple[Tensor, State]:
        """Consume one token per row: the output features (N, H) that score the next word, and the new state.
        `scores(features)` gives every word's score; `score_of(features, words)` only the named ones."""
        h, c, feed = state
        enc, valid = memory
        x = torch.cat([self.tgt_emb(tokens), feed], dim=-1)
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if i > 0 and mask is not None:
                x = x * mask[:, i - 1]
            hi, ci = cell(x, (h[:, i], c[:, i]))
            hs.append(hi)
            cs.append(ci)
            x = hi
        att = torch.bmm(enc, self.attn_in(x).unsqueeze(-1)).squeeze(-1).masked_fill(~valid, NEG)
        context = torch.bmm(att.softmax(-1).unsqueeze(1), enc).squeeze(1)
        feed = torch.tanh(self.attn_out(torch.cat([context, x], dim=-1)))
        out = feed * mask[:, -1] if mask is not None else feed
        return out, (torch.stack(hs, 1), torch.stack(cs, 1), feed)

    def scores(self, features: Tensor) -> Tensor:
        return self.out(features)

    def score_of(self, features: Tensor, words: Tensor) -> Tensor:
        """The scores of one word per row, without computing the whole vocabulary's."""
        return (features * self.out.weight[words]).sum(-1) + self.out.bias[words]

    def teacher_force(self, memory: tuple[Tensor, Tensor], state: State, tgt: Tensor, masks: Tensor | None = None
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


# ---------------------------------------------------------------------------------------------- successors


class Successors:
    """Which words may extend a prefix: any word (never padding or the start symbol). The state is a tensor
    with one row per prefix, so beams can reorder it with index_select."""

    def init(self, src: Tensor, vocab: int) -> Tensor:
        return src.new_zeros(src.shape[0], 1)

    def allowed(self, state: Tensor, vocab: int) -> Tensor:
        ok = torch.ones(state.shape[0], vocab, dtype=torch.bool, device=state.device)
        ok[:, PAD] = False
        ok[:, BOS] = False
        return ok

    def advance(self, state: Tensor, tokens: Tensor) -> Tensor:
        return state


class Permutation(Successors):
    """Word ordering's constraint: each source token exactly once (as a multiset), then end of sentence.
    The state counts the source tokens not yet used."""

    def init(self, src: Tensor, vocab: int) -> Tensor:
        counts = torch.zeros(src.shape[0], vocab, dtype=torch.int16, device=src.device)
        counts.scatter_add_(1, src, torch.ones_like(src, dtype=torch.int16))
        counts[:, PAD] = 0
        return counts

    def allowed(self, state: Tensor, vocab: int) -> Tensor:
        ok = state > 0
        ok[:, EOS] = state.sum(1) == 0
        return ok

    def advance(self, state: Tensor, tokens: Tensor) -> Tensor:
        return state.scatter_add(1, tokens[:, None], torch.full_like(tokens[:, None], -1, dtype=state.dtype))


SUCCESSORS: dict[str, type[Successors]] = {"all": Successors, "permutation": Permutation}


# ---------------------------------------------------------------------------------------------- decoding


@torch.no_grad()
def beam_search(net: Seq2Seq, src: Tensor, src_len: Tensor, beam: int, max_len: Tensor,
                successors: Successors | None = None, scoring: str = "logprob") -> Tensor:
    """The best finished hypothesis of each source, (B, max(max_len)) token ids ending in EOS, then PAD.

    scoring: "logprob" ranks prefixes by their summed log-probabilities (a probabilistic seq2seq model; an
    example stops once no live prefix can beat its best finished one, which makes the search exact when the
    beam holds every prefix); "last" ranks them by the score of their last word (a BSO model; an example
    stops when its K best candidates all end the sentence). A candidate ending in EOS that ranks among the
    K best of its step is finished; the beam continues with the K best that do not end. A hypothesis has at
    most max_len tokens, EOS included (the last step may only end it).
    """
    successors = successors or Successors()
    B, K, V, dev = src.shape[0], beam, net.tgt_vocab, src.device
    L = int(max_len.max())
    memory, state = net.encode(src, src_len)
    rows = torch.arange(B, device=dev).repeat_interleave(K)
    memory, state = select(memory, rows), select(state, rows)
    cons = successors.init(src, V).index_select(0, rows)
    scores = torch.full((B, K), NEG, device=dev)
    scores[:, 0] = 0.0
    tokens = torch.full((B * K,), BOS, dtype=torch.long, device=dev)
    hist = torch.full((B, K, L), PAD, dtype=torch.long, device=dev)
    best = torch.full((B,), NEG, device=dev)
    best_seq = torch.full((B, L), PAD, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rank = torch.arange(2 * K, device=dev)
    for t in range(L):
        feats, state = net.step(tokens, state, memory)
        logits = net.scores(feats)
        s = logits.log_softmax(-1) + scores.view(-1, 1) if scoring == "logprob" else logits
        ok = successors.allowed(cons, V) & scores.view(-1, 1).isfinite()
        last = (t == max_len - 1).repeat_interleave(K)
        ok &= ~last[:, None] | (torch.arange(V, device=dev) == EOS)
        cand = s.masked_fill(~ok, NEG).view(B, K * V)
        top, idx = cand.topk(min(2 * K, K * V), dim=1)
        parent, word = idx // V, idx % V
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
        parent, word = parent.gather(1, pick), word.gather(1, pick)
        hist = hist.gather(1, parent[..., None].expand(B, K, L))
        hist[:, :, t] = word
        flat = (torch.arange(B, device=dev)[:, None] * K + parent).view(-1)
        state = select(state, flat)
        cons = successors.advance(cons.index_select(0, flat), word.view(-1))
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


def bso_loss(net: Seq2Seq, batch: dict[str, Tensor], beam: int, successors: Successors | None = None,
             margin: float = 1.0, cost: str = "zero_one", cost_scale: float = 1.0) -> tuple[Tensor, dict[str, Any]]:
    """The search-based margin loss of one batch (summed over violations, averaged over sentences).

    cost: "zero_one" (Δ = 1 for any wrong prefix) or "bleu" (Δ = 1 - sentence BLEU of the violating segment
    since the last restart against the gold segment), times cost_scale. Returns the loss and what the
    search found (violations, restarts, the search's own scores for checking the recomputation).
    """
    successors = successors or Successors()
    src, src_len, tgt, tgt_len = batch["src"], batch["src_len"], batch["tgt"], batch["tgt_len"]
    B, T, K, V, dev = tgt.shape[0], tgt.shape[1], beam, net.tgt_vocab, tgt.device
    memory, state0 = net.encode(src, src_len)
    masks = net.dropout_masks(B, T, dev)
    gold_feats, gold_states = net.teacher_force(memory, state0, tgt, masks)
    gold = net.score_of(gold_feats, tgt)  # (B, T)

    # ---- the search, without gradients
    viol = torch.zeros(B, T, dtype=torch.bool, device=dev)
    viol_word = torch.zeros(B, T, dtype=torch.long, device=dev)
    viol_score = torch.zeros(B, T, device=dev)
    zero_cost = torch.zeros(B, T, dtype=torch.bool, device=dev)
    spliced = tgt.clone()  # the tokens the violating sequences consumed (gold where they agree)
    with torch.no_grad():
        rows = torch.arange(B, device=dev).repeat_interleave(K)
        mem_k = select(memory, rows)
        state = select(state0, rows)
        cons = successors.init(src, V).index_select(0, rows)
        gold_cons = successors.init(src, V)
        alive = torch.zeros(B, K, dtype=torch.bool, device=dev)
        alive[:, 0] = True
        tokens = torch.full((B * K,), BOS, dtype=torch.long, device=dev)
        hist = torch.full((B, K, T), PAD, dtype=torch.long, device=dev)
        gold_slot = torch.zeros(B, dtype=torch.long, device=dev)
        last_reset = torch.zeros(B, dtype=torch.long, device=dev)
        ar = torch.arange(B, device=dev)
        for t in range(T):
            active = t < tgt_len
            mask_t = None if masks is None else masks[t].index_select(0, rows)
            feats, new_state = net.step(tokens, state, mem_k, mask_t)
            logits = net.scores(feats)
            ok = successors.allowed(cons, V) & alive.view(-1, 1)
            cand = logits.masked_fill(~ok, NEG).view(B, K * V)
            top, idx = cand.topk(K, dim=1)
            parent, word = idx // V, idx % V
            gold_flat = gold_slot * V + tgt[:, t]
            is_gold = (parent == gold_slot[:, None]) & (word == tgt[:, t, None])
            final = t == tgt_len - 1
            wrong = cand.scatter(1, gold_flat[:, None], NEG)
            best_wrong, best_idx = wrong.max(1)
            off = torch.where(final, best_wrong, top[:, K - 1])
            off_idx = torch.where(final, best_idx, idx[:, K - 1])
            off_parent, off_word = off_idx // V, off_idx % V
            g = gold[:, t].detach()
            v = active & off.isfinite() & (g < off + margin)
            viol[:, t] = v
            viol_word[:, t] = off_word
            viol_score[:, t] = torch.where(v, off, torch.zeros_like(off))
            zero_cost[:, t] = ~final & is_gold[:, K - 1]
            # the violating prefix's own tokens since the last restart
            pos = torch.arange(T, device=dev)
            own = (pos[None] >= last_reset[:, None]) & (pos[None] < t) & v[:, None]
            spliced = torch.where(own, hist[ar, off_parent], spliced)
            # advance: the K best, or restart from the gold prefix y_{<=t}
            hist = hist.gather(1, parent[..., None].expand(B, K, T))
            hist[:, :, t] = word
            flat = (ar[:, None] * K + parent).view(-1)
            state = select(new_state, flat)
            cons = successors.advance(cons.index_select(0, flat), word.view(-1))
            alive = top.isfinite()
            gold_slot = is_gold.float().argmax(1)
            gold_cons = successors.advance(gold_cons, tgt[:, t])
            if bool(v.any()):
                slot0 = torch.zeros(B, K, dtype=torch.bool, device=dev)
                slot0[:, 0] = True
                reset_rows = (v[:, None] & slot0).view(-1)
                gstate = select(tuple(s.detach() for s in gold_states[t]), rows)
                state = blend(reset_rows, gstate, state)
                cons = torch.where(reset_rows[:, None], gold_cons.index_select(0, rows), cons)
                word = torch.where(v[:, None] & slot0, tgt[:, t, None], word)
                hist = torch.where(v[:, None, None], tgt[:, None, :] * (pos <= t), hist)
                alive = torch.where(v[:, None], slot0, alive)
                gold_slot = torch.where(v, torch.zeros_like(gold_slot), gold_slot)
                last_reset = torch.where(v, torch.full_like(last_reset, t + 1), last_reset)
            tokens = word.reshape(-1)

    # ---- recompute the violating sequences' scores with gradients: one spliced pass
    n_viol = int(viol.sum())
    if n_viol == 0:
        return gold.sum() * 0.0, {"violations": 0, "search_scores": viol_score, "viol": viol}
    last_t = int(viol.any(0).nonzero().max()) + 1
    reset = torch.zeros(B, T, dtype=torch.bool, device=dev)
    reset[:, 1:] = viol[:, :-1]
    pred = []
    state = state0
    prev = torch.full((B,), BOS, dtype=torch.long, device=dev)
    for t in range(last_t):
        if t > 0:
            r = reset[:, t]
            state = blend(r, gold_states[t - 1], state)
            prev = torch.where(r, tgt[:, t - 1], spliced[:, t - 1])
        f, state = net.step(prev, state, memory, None if masks is None else masks[t])
        pred.append(net.score_of(f, viol_word[:, t]))
    pred_scores = torch.stack(pred, 1)
    delta = (~zero_cost[:, :last_t]).float()
    if cost == "bleu":
        delta = _bleu_costs(spliced, tgt, viol, viol_word, last_t) * delta
    elif cost != "zero_one":
        raise ValueError(f"cost={cost!r}: expected 'zero_one' or 'bleu'")
    terms = cost_scale * delta * (margin - gold[:, :last_t] + pred_scores)
    loss = terms.masked_fill(~viol[:, :last_t], 0.0).sum() / B
    info = {"violations": n_viol, "search_scores": viol_score, "viol": viol, "pred_scores": pred_scores}
    return loss, info


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


# ---------------------------------------------------------------------------------------------- task


class BSO(Task):
    """Cross-entropy or beam-search-optimization training of a `Seq2Seq`, evaluated by BLEU at several beams.

    Args:
        net: the encoder-decoder (a `_target_`; vocabulary sizes come from the dataset config).
        optimizer: a partial optimizer, built afresh at each stage (as the paper starts BSO with new state).
        stage_lr: optional learning rate per stage name, overriding the optimizer's (e.g. {train: 0.001}).
        loss: "xent" (seq2seq) or "bso", used in every stage but `pretrain_stage` (always cross-entropy).
        successors: "all" or "permutation" (word ordering's constraint), in training search and decoding.
        beam_start, max_beam, epochs_per_beam: the beam curriculum (2, +1 every 2 epochs, up to K_test + 1).
        margin, cost, cost_scale: the margin loss (cost "zero_one" or "bleu").
        val_beams, test_beams: the beams BLEU is reported at (`bleu_k<K>`).
        max_len_a, max_len_b: decoding stops at a * source length + b tokens.
    """

    def __init__(self, net: Seq2Seq, optimizer: Callable[..., torch.optim.Optimizer], loss: str = "bso",
                 successors: str = "all", pretrain_stage: str = "pretrain", beam_start: int = 2, max_beam: int = 6,
                 epochs_per_beam: float = 2.0, margin: float = 1.0, cost: str = "zero_one", cost_scale: float = 1.0,
                 val_beams: Sequence[int] = (5,), test_beams: Sequence[int] = (1, 5, 10), max_len_a: float = 1.0,
                 max_len_b: int = 5, stage_lr: dict[str, float] | None = None) -> None:
        super().__init__()
        if loss not in ("xent", "bso"):
            raise ValueError(f"loss={loss!r}: expected 'xent' or 'bso'")
        if successors not in SUCCESSORS:
            raise ValueError(f"successors={successors!r}: expected one of {sorted(SUCCESSORS)}")
        self.net, self._optimizer, self.loss = net, optimizer, loss
        self.successors = SUCCESSORS[successors]()
        self.pretrain_stage = pretrain_stage
        self.beam_start, self.max_beam, self.epochs_per_beam = beam_start, max_beam, epochs_per_beam
        self.margin, self.cost, self.cost_scale = margin, cost, cost_scale
        self.val_beams, self.test_beams = list(val_beams), list(test_beams)
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.stage_lr = dict(stage_lr or {})
        self.stage_steps: dict[str, int] = {}
        self.steps_per_epoch = 1
        self.vocab: Vocab | None = None

    # ------------------------------------------------------------------ stages and curriculum
    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self.vocab = data.tgt_vocab
        self.steps_per_epoch = max(len(data.dataset("train", stage)) // data.batch_size, 1)

    def searching(self) -> bool:
        return self.loss == "bso" and self.stage != self.pretrain_stage

    def beam_size(self) -> int:
        """The curriculum: beam_start, one more every epochs_per_beam epochs of this stage, up to max_beam."""
        epoch = self.stage_steps.get(self.stage, 0) / self.steps_per_epoch
        return min(self.beam_start + int(epoch // self.epochs_per_beam), self.max_beam)

    def extra_state(self) -> dict[str, Any]:
        return {"stage_steps": dict(self.stage_steps)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.stage_steps = dict(state.get("stage_steps", {}))

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        extra = {"lr": self.stage_lr[self.stage]} if self.stage in self.stage_lr else {}
        return {"model": self._optimizer(self.net.parameters(), **extra)}

    def xent(self, batch: dict[str, Tensor]) -> Tensor:
        memory, state = self.net.encode(batch["src"], batch["src_len"])
        tgt = batch["tgt"]
        feats, _ = self.net.teacher_force(memory, state, tgt, self.net.dropout_masks(*tgt.shape, tgt.device))
        return F.cross_entropy(self.net.scores(feats).flatten(0, 1), tgt.flatten(), ignore_index=PAD)

    def training_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        if self.searching():
            k = self.beam_size()
            loss, info = bso_loss(self.net, batch, k, self.successors, self.margin, self.cost, self.cost_scale)
            self.log("beam", float(k))
            self.log("violations", info["violations"] / batch["tgt"].shape[0])
        else:
            loss = self.xent(batch)
        self.stage_steps[self.stage] = self.stage_steps.get(self.stage, 0) + 1
        yield "model", loss

    # ------------------------------------------------------------------ evaluation
    def decode(self, batch: dict[str, Tensor], beam: int) -> list[str]:
        max_len = (batch["src_len"].float() * self.max_len_a).long() + self.max_len_b
        dev = next(self.parameters()).device
        scoring = "last" if self.loss == "bso" else "logprob"
        out = beam_search(self.net, batch["src"].to(dev), batch["src_len"].to(dev), beam, max_len.to(dev),
                          self.successors, scoring)
        return [" ".join(self.vocab.decode(row)) for row in out.tolist()]

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        import sacrebleu

        beams = self.test_beams if split == "test" else self.val_beams
        hyps: dict[int, list[str]] = {k: [] for k in beams}
        refs: list[str] = []
        for batch in loader:
            refs.extend(batch["refs"])
            for k in beams:
                hyps[k].extend(self.decode(batch, k))
        return {f"bleu_k{k}": sacrebleu.corpus_bleu(hyps[k], [refs], tokenize="none").score for k in beams}


# ---------------------------------------------------------------------------------------------- study


METHODS = {"xent_all": "seq2seq", "xent_permutation": "seq2seq + constraint", "bso_all": "BSO",
           "bso_permutation": "ConBSO"}


def _medians(study: dict[str, Any], beams: Sequence[int]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for label, metrics in study["groups"].items():
        out[label] = {k: metrics[f"test/bleu_k{k}"]["median"] for k in beams if f"test/bleu_k{k}" in metrics}
    return out


def summarize(study: dict[str, Any], beams: Sequence[int] = (1, 5, 10), baseline: str = "xent_all",
              method: str = "bso_all") -> dict[str, float]:
    """`gain_k<K>`: median BLEU of `method` minus median BLEU of `baseline` at test beam K."""
    med = _medians(study, beams)
    out = {}
    for k in beams:
        if k in med.get(method, {}) and k in med.get(baseline, {}):
            out[f"gain_k{k}"] = med[method][k] - med[baseline][k]
    return out


def study_figure(study: dict[str, Any], out_dir: Path, beams: Sequence[int] = (1, 5, 10)) -> list[Path]:
    """Test BLEU against test beam, one line per method (median over seeds, bars from min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    table = {}
    for label, metrics in sorted(study["groups"].items(), key=lambda kv: list(METHODS).index(kv[0])
                                 if kv[0] in METHODS else 99):
        ks = [k for k in beams if f"test/bleu_k{k}" in metrics]
        if not ks:
            continue
        st = [metrics[f"test/bleu_k{k}"] for k in ks]
        med = [s["median"] for s in st]
        err = [[m - s["min"] for m, s in zip(med, st)], [s["max"] - m for m, s in zip(med, st)]]
        ax.errorbar(ks, med, yerr=err, marker="o", capsize=3, label=f"{METHODS.get(label, label)} (n={st[0]['n']})")
        table[METHODS.get(label, label)] = dict(zip(ks, med))
    ax.set_xlabel("test beam size K")
    ax.set_ylabel("test BLEU")
    ax.set_xticks(list(beams))
    ax.set_title("Word ordering: BLEU against beam size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "bleu_vs_beam.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    (out_dir / "bleu_table.json").write_text(json.dumps(table, indent=1))
    return [path]
