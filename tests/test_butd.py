"""Bottom-Up Top-Down VQA: metric, attention, gated tanh, geometry and pooling against hand-computed values."""

import pytest
import torch
from torch import nn

from mlrun.models.butd import (
    Attention,
    BottomUpTopDownVQA,
    GatedTanh,
    Trunk,
    VQANet,
    box_geometry,
    grid_boxes,
    summarize,
    vqa_accuracy,
)


def test_vqa_accuracy_hand_computed():
    answers = torch.tensor([[1] * 10, [1, 1, 2, 2, 2, 2, 2, 2, 2, 2], [3, 0, 0, 0, 0, 0, 0, 0, 0, 0], [5] * 10])
    pred = torch.tensor([1, 1, 3, 4])
    assert torch.allclose(vqa_accuracy(pred, answers), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    # three matching answers are enough for full credit
    assert vqa_accuracy(torch.tensor([7]), torch.tensor([[7, 7, 7, 0, 0, 0, 0, 0, 0, 0]])).item() == 1.0


def test_gated_tanh_matches_formula():
    torch.manual_seed(0)
    g = GatedTanh(3, 2)
    x = torch.randn(4, 3)
    expected = torch.tanh(x @ g.fc.weight.T + g.fc.bias) * torch.sigmoid(x @ g.gate.weight.T + g.gate.bias)
    assert torch.allclose(g(x), expected)
    with torch.no_grad():  # a closed gate gives 0 whatever the tanh branch says
        g.gate.bias.fill_(-1e4)
    assert g(x).abs().max() < 1e-6


def test_attention_sums_to_one_and_follows_the_score():
    torch.manual_seed(0)
    att = Attention(v_dim=5, q_dim=3, hidden=4)
    v, q = torch.randn(2, 7, 5), torch.randn(2, 3)
    a = att(v, q)
    assert a.shape == (2, 7)
    assert torch.allclose(a.sum(1), torch.ones(2))
    assert (a > 0).all()
    scores = att.w(att.f(torch.cat([v, q[:, None].expand(-1, 7, -1)], -1))).squeeze(-1)
    assert torch.allclose(a, torch.softmax(scores, 1))


def test_grid_boxes_and_geometry():
    boxes = grid_boxes(2, 64)
    assert torch.equal(boxes, torch.tensor([[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64.0]]))
    geo = box_geometry(torch.tensor([[16.0, 0.0, 48.0, 16.0]]), 64)
    assert torch.allclose(geo, torch.tensor([[0.25, 0.0, 0.75, 0.25, 0.125]]))


def test_question_encoding_ignores_padding():
    torch.manual_seed(0)
    net = VQANet(vocab_size=10, num_answers=3, v_dim=4, embed=5, hidden=6, att_hidden=4)
    short = torch.tensor([[3, 4, 0, 0]])
    q = net.encode_question(short)
    # the GRU run by hand over the two real tokens only
    _, h = net.gru(net.embed(torch.tensor([[3, 4]])))
    assert torch.allclose(q, h[0], atol=1e-6)


def _task(features: str) -> BottomUpTopDownVQA:
    return BottomUpTopDownVQA(features, vocab_size=8, num_answers=4, optimizers={}, trunk=Trunk(1, (4, 4, 4)),
                              grid=2, pool=1, canvas=16, embed=4, hidden=6, att_hidden=4)


def test_region_pooling_equals_mean_of_the_box_on_the_feature_map():
    torch.manual_seed(0)
    task = _task("bottom_up")
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    task.trunk.stride = 4
    # box covering feature cells (1..2, 1..2) in pixels of stride 4: mean of those four cells
    pooled = task.pool_regions(fmap, torch.tensor([[[4.0, 4.0, 12.0, 12.0]]]))
    assert torch.allclose(pooled, fmap[0, 0, 1:3, 1:3].mean().reshape(1, 1, 1))


def test_grid_and_bottom_up_pool_their_own_boxes():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 12.0, 16.0]]).expand(3, -1, -1)
    v_bu, used_bu = _task("bottom_up").extract(images, boxes)
    v_grid, used_grid = _task("grid").extract(images, boxes)
    assert v_bu.shape == (3, 2, 4 + 5) and v_grid.shape == (3, 4, 4 + 5)
    assert torch.equal(used_bu, boxes)
    assert torch.equal(used_grid[0], grid_boxes(2, 16))


def test_vqa_stage_learns_a_feature_lookup():
    """With features that hold the answer in one region, the model reaches full accuracy in a few hundred steps."""
    torch.manual_seed(0)
    n, k = 64, 3
    answer = torch.randint(0, 4, (n,))
    v = torch.randn(n, k, 4) * 0.1
    v[torch.arange(n), 0, :] = nn.functional.one_hot(answer, 4).float()
    net = VQANet(vocab_size=5, num_answers=4, v_dim=4, embed=4, hidden=16, att_hidden=8)
    opt = torch.optim.Adamax(net.parameters(), lr=0.01)
    tokens = torch.tensor([[1, 2, 0]]).expand(n, -1)
    target = nn.functional.one_hot(answer, 4).float()
    for _ in range(300):
        logits, _ = net(v, tokens)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (net(v, tokens)[0].argmax(1) == answer).float().mean() == 1.0


def test_summarize_gain_is_median_difference():
    runs = [{"label": "bottom_up", "metrics": {"test/acc": a, "test/acc_count": c}} for a, c in [(60, 50), (70, 55),
                                                                                                   (65, 40)]]
    runs += [{"label": "grid", "metrics": {"test/acc": a, "test/acc_count": c}} for a, c in [(50, 30), (55, 35),
                                                                                             (52, 32)]]
    out = summarize({"runs": runs})
    assert out == {"gain_acc": 65 - 52, "gain_acc_count": 50 - 32}


def test_captioner_teacher_forcing_matches_steps_and_beam1_is_greedy():
    from mlrun.models.butd import TopDownCaptioner

    torch.manual_seed(0)
    dec = TopDownCaptioner(vocab_size=7, v_dim=5, embed=4, hidden=6, att_hidden=4).eval()
    v, tokens = torch.randn(2, 3, 5), torch.tensor([[2, 4, 5, 3], [2, 6, 3, 0]])
    logp = dec(v, tokens)
    state = dec.init_state(v)
    for t in range(3):
        step, state, a = dec.step(v, tokens[:, t], state)
        assert torch.allclose(logp[:, t], step, atol=1e-6)
        assert torch.allclose(a.sum(1), torch.ones(2)) and torch.allclose(step.exp().sum(1), torch.ones(2))
    greedy, state, word = [], dec.init_state(v[:1]), torch.tensor([2])
    for _ in range(5):
        step, state, _ = dec.step(v[:1], word, state)
        word = step.argmax(1)
        if word.item() == 3:
            break
        greedy.append(word.item())
    assert dec.beam_search(v[:1], bos=2, eos=3, beam=1, max_len=4)[0] == greedy[:5]


@pytest.mark.filterwarnings("ignore:SPICE skipped")
def test_caption_scores_hand_checked():
    from mlrun.models.butd import caption_scores

    refs = {0: ["a 3 and a 7", "two digits : a 3 and a 7"], 1: ["a single 5", "one digit : a 5"]}
    perfect = caption_scores({0: "two digits : a 3 and a 7", 1: "one digit : a 5"}, refs, meteor=False)
    wrong = caption_scores({0: "a single 5", 1: "a 3 and a 7"}, refs, meteor=False)
    assert abs(perfect["BLEU4"] - 100.0) < 1e-3 and perfect["ROUGE_L"] > 99.9
    assert perfect["CIDEr"] > wrong["CIDEr"] and wrong["BLEU4"] < 1.0


def test_sampling_log_probs_match_teacher_forcing_and_greedy_matches_beam1():
    from mlrun.models.butd import TopDownCaptioner

    torch.manual_seed(0)
    dec = TopDownCaptioner(vocab_size=7, v_dim=5, embed=4, hidden=6, att_hidden=4).eval()
    v = torch.randn(4, 3, 5)
    words, logp, mask = dec.sample(v, bos=2, eos=3, max_len=6)
    # the log-probabilities of the sampled words are the teacher-forced ones of the same sequence
    tf = dec(v, torch.cat([torch.full((4, 1), 2), words], 1)).gather(2, words[..., None]).squeeze(-1)
    assert torch.allclose(logp * mask, tf * mask, atol=1e-6)
    # the mask covers each word up to and including <eos>; after it only <pad>
    for w, m in zip(words.tolist(), mask.tolist()):
        n = w.index(3) + 1 if 3 in w else len(w)
        assert m == [1.0] * n + [0.0] * (len(w) - n) and all(x == 0 for x in w[n:])
    greedy, _, _ = dec.sample(v, bos=2, eos=3, max_len=6, greedy=True)
    beam1 = dec.beam_search(v, bos=2, eos=3, beam=1, max_len=6)
    assert [[x for x in g if x not in (0, 3)] for g in greedy.tolist()] == beam1


@pytest.mark.filterwarnings("ignore:SPICE skipped")
def test_per_caption_cider_averages_to_the_corpus_score():
    from mlrun.models.butd import caption_scores, cider_per_caption

    refs = [["a 3 and a 7", "two digits : a 3 and a 7"], ["a single 5", "one digit : a 5"], ["an empty canvas"]]
    cands = ["two digits : a 3 and a 7", "a 3 and a 7", "an empty canvas"]
    per = cider_per_caption(cands, refs)
    corpus = caption_scores(dict(enumerate(cands)), dict(enumerate(refs)), meteor=False)["CIDEr"]
    assert per.shape == (3,) and abs(100 * float(per.mean()) - corpus) < 1e-3
    assert per[0] > per[1]  # the right caption earns more reward than a wrong one


def test_self_critical_loss_is_reinforce_with_the_greedy_baseline():
    """The SCST loss is -(r(sample) - r(greedy)) log p(sample), averaged over words; one SGD step on it raises
    the advantage-weighted log-probability of the same samples."""
    from types import SimpleNamespace

    from mlrun.models.butd import BottomUpTopDownCaption, cider_per_caption, decode

    torch.manual_seed(0)
    vocab = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "3", "7", "and"]
    refs = [["a 3 and a 7"], ["a 7"], ["a 3"], ["a 7 and a 3"]]
    data = SimpleNamespace(vocab=vocab, references=lambda split: refs)
    task = BottomUpTopDownCaption("bottom_up", vocab_size=8, optimizers={"scst": None}, feature_dim=4,
                                  embed=8, hidden=16, att_hidden=8, max_len=6)
    task.on_stage_start("scst", data)
    batch = {"scene": torch.arange(4), "features": torch.randn(4, 3, 4), "boxes": torch.rand(4, 3, 4)}
    v = task._regions(batch, "train")
    greedy = task.decoder.sample(v, 2, 3, 6, greedy=True)[0]  # argmax draws no random numbers
    torch.manual_seed(1)
    (name, loss), = list(task.training_step(batch))
    torch.manual_seed(1)
    words, logp, mask = task.decoder.sample(v, 2, 3, 6)
    r = cider_per_caption([decode(w, vocab, 3) for w in [*words, *greedy]], refs * 2)
    adv = (r[:4] - r[4:])[:, None]
    assert adv.abs().sum() > 0, "degenerate fixture: every sample scored like its greedy caption"
    assert name == "model" and torch.allclose(loss, -(adv * logp * mask).sum() / mask.sum())

    def objective() -> torch.Tensor:
        tf = task.decoder(v, torch.cat([torch.full((4, 1), 2), words], 1)).gather(2, words[..., None]).squeeze(-1)
        return (adv * tf * mask).sum()

    before = objective().item()
    loss.backward()
    torch.optim.SGD(task.decoder.parameters(), lr=0.05).step()
    assert objective().item() > before


@pytest.mark.parametrize("features", ["bottom_up", "grid"])
def test_cached_features_are_what_the_paper_scale_loader_reads(tmp_path, features):
    """The miniature writes its frozen features in the released features' layout: read back through the VQA v2 /
    COCO loaders' FeatureStore and the paper-scale branch, they give the same regions as in memory."""
    from types import SimpleNamespace

    from mlrun.datasets.butd import FeatureStore

    torch.manual_seed(0)
    images = torch.rand(3, 1, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 2.0, 15.0, 12.0]]).expand(3, -1, -1)
    task = _task(features)
    task._data = SimpleNamespace(images=lambda split: images, regions=lambda split: (boxes, None))
    task.cache_dir = tmp_path
    scenes = torch.tensor([2, 0])
    in_memory = task._regions({"scene": scenes}, "test")
    store = FeatureStore(tmp_path / f"features_{features}" / "test.h5")
    feats, norm_boxes = zip(*(store(int(i)) for i in scenes))
    from_disk = task._regions({"features": torch.stack(feats), "boxes": torch.stack(norm_boxes)}, "test")
    assert from_disk.shape == in_memory.shape == (2, 2 if features == "bottom_up" else 4, 4 + 5)
    assert torch.allclose(from_disk, in_memory, atol=1e-6)
