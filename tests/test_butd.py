"""Bottom-Up Top-Down: metric, attention, gated tanh, geometry, the detector's box selection, its cache, the
corpus CIDEr reward and the self-critical loss, against hand-computed values."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mlrun.models.butd import (
    Attention,
    BottomUpTopDownVQA,
    DigitDetector,
    GatedTanh,
    Trunk,
    VQANet,
    box_geometry,
    cached_fit,
    detection_stats,
    grid_boxes,
    select_regions,
    summarize,
    vqa_accuracy,
)

torch.set_num_threads(1)


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


def _detector(**kw) -> DigitDetector:
    torch.manual_seed(0)
    return DigitDetector(Trunk(1, (4, 4, 8)), canvas=32, pool=2, representation=6, proposals=10, roi_batch=8, k=3,
                         **kw)


def test_box_selection_is_the_authors_per_class_nms_rule():
    """Proposals 0 and 1 overlap (IoU 0.9); 2 stands alone. Class 1: 0 (0.6) suppresses 1 (0.5); class 2: 1 (0.3)
    beats 0 (0.1), so 1 keeps 0.3 though class 1 suppressed it; 2's best is 0.2 (class 1); top-2 = [0, 1]."""
    props = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]])
    probs = torch.tensor([[0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.65, 0.2, 0.15]])
    order, best = select_regions(props, probs, nms=0.3, k=2)
    assert order.tolist() == [0, 1] and torch.allclose(best, torch.tensor([0.6, 0.3, 0.2]))
    # fewer proposals than k: the last one repeats, so every image has k regions
    order, _ = select_regions(props[:1], probs[:1], nms=0.3, k=3)
    assert order.tolist() == [0, 0, 0]


def test_detection_stats_hand_computed():
    gt = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 8, 8]])]
    boxes = torch.tensor([
        [[0.0, 0, 10, 10], [0, 0, 10, 9], [40, 40, 50, 50]],   # digit 0, its duplicate, background; digit 1 missed
        [[0.0, 0, 8, 8], [1, 1, 8, 8], [1, 1, 9, 9]],          # the digit, then two duplicates (IoU 0.77, 0.62)
    ])
    stats = detection_stats(boxes, gt)
    assert stats == pytest.approx({"recall": 100 * 2 / 3, "duplicates": 100 * 3 / 6, "background": 100 * 1 / 6})


def test_detector_fit_is_deterministic_and_leaves_the_global_rng_alone():
    from mlrun.datasets.scenes import make_scenes

    scenes = make_scenes("train", 6, 0, 32, scale_range=(1.0, 2.0), clutter=0.0)
    images = torch.from_numpy(np.stack([s.image for s in scenes]))[:, None]
    args = (images, [torch.from_numpy(s.boxes) for s in scenes], [torch.from_numpy(s.labels) for s in scenes])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = _detector(steps=3, batch_size=2), _detector(steps=3, batch_size=2)
    torch.set_rng_state(before)
    losses = a.fit(*args, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # a cached detector leaves the run's RNG where a fit does
    b.fit(*args, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert len(losses) == 2 and all(np.isfinite(losses))
    boxes, feats, scores = a.detect(images)
    assert boxes.shape == (6, 3, 4) and feats.shape == (6, 3, 6) and (scores[:, :-1] >= scores[:, 1:]).all()
    cells = grid_boxes(2, 32)[None].expand(6, -1, -1)
    assert a.pool(images, cells).shape == (6, 4, 6)


def test_cached_fit_trains_once_per_key(tmp_path):
    calls = []

    def make() -> nn.Linear:
        return nn.Linear(2, 2)

    def fit(m: nn.Linear) -> None:
        calls.append(1)
        with torch.no_grad():
            m.weight.fill_(float(len(calls)))

    first = make()
    assert cached_fit(first, tmp_path, {"seed": 0}, lambda: fit(first)) is None and len(calls) == 1
    second = make()
    assert cached_fit(second, tmp_path, {"seed": 0}, lambda: fit(second)) is not None and len(calls) == 1
    assert torch.equal(second.weight, first.weight)  # loaded, not trained again
    third = make()  # any change of the key (seed, settings, scenes, code) trains again
    assert cached_fit(third, tmp_path, {"seed": 1}, lambda: fit(third)) is None and len(calls) == 2
    assert cached_fit(make(), None, {"seed": 0}, lambda: fit(make())) is None and len(calls) == 3


def test_both_tasks_share_one_detector_configuration():
    """The VQA and captioning miniatures configure the same detector and training scenes, so the cache gives both
    the same detector of a seed."""
    from mlrun import compose

    vqa, cap = compose("butd_vqa_digits"), compose("butd_caption_digits")
    assert vqa.model.detector == cap.model.detector and vqa.model.cache == cap.model.cache
    for key in ("n_train", "canvas", "seed", "scene_kw"):
        assert vqa.dataset[key] == cap.dataset[key]


def _task(features: str, **kw) -> BottomUpTopDownVQA:
    return BottomUpTopDownVQA(features, vocab_size=8, num_answers=4, optimizers={}, detector=_detector(), grid=2,
                              canvas=32, embed=4, hidden=6, att_hidden=4, **kw)


def test_grid_and_bottom_up_pool_their_own_boxes_through_the_same_box_head():
    images = torch.rand(3, 1, 32, 32)
    v_bu, used_bu = _task("bottom_up").extract(images)
    task = _task("grid", normalize=True)
    v_grid, used_grid = task.extract(images)
    assert v_bu.shape == (3, 3, 6 + 5) and v_grid.shape == (3, 4, 6 + 5)
    assert torch.equal(used_grid[0], grid_boxes(2, 32))
    assert torch.equal(v_grid[..., -5:], box_geometry(used_grid, 32))
    feats = task.detector.pool(images, used_grid)
    assert torch.allclose(v_grid[..., :-5], nn.functional.normalize(feats, dim=-1))
    assert torch.allclose(v_grid[..., :-5].norm(dim=-1), torch.ones(3, 4), atol=1e-5)


def test_answer_classifier_is_sized_from_the_data_and_a_checkpoint_fits_it():
    data = SimpleNamespace(answers=["yes", "no", "1", "2", "3"], vocab=["<pad>", "<unk>", "is"])
    task = BottomUpTopDownVQA("bottom_up", vocab_size=8, optimizers={}, num_answers=None, feature_dim=4, embed=4,
                              hidden=6, att_hidden=4)
    task.setup(data)
    assert task.vqa.out.out_features == 5
    fresh = BottomUpTopDownVQA("bottom_up", vocab_size=8, optimizers={}, num_answers=None, feature_dim=4, embed=4,
                               hidden=6, att_hidden=4)
    fresh.setup(data)  # the runner calls setup before it restores a checkpoint
    fresh.load_state_dict(task.state_dict())


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
def test_corpus_cider_is_pycocoevalcaps_with_the_corpus_document_frequencies():
    """Given the scored references as its corpus, the reward equals pycocoevalcap's CIDEr caption by caption;
    with the training corpus, an n-gram common in the corpus weighs less than in a batch where it is rare."""
    from pycocoevalcap.cider.cider import Cider

    from mlrun.models.butd import CorpusCider

    refs = [["a 3 and a 7", "two digits a 3 and a 7"], ["a single 5", "one digit a 5"], ["an empty canvas"]]
    cands = ["two digits a 3 and a 7", "a 3 and a 7", "an empty canvas"]
    _, expected = Cider().compute_score(dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)})
    assert np.allclose(CorpusCider(refs)(cands, refs).numpy(), expected, atol=1e-5)
    corpus = refs + [["an empty canvas"], ["an empty canvas", "nothing on the canvas"]] * 5
    # the candidate shares only "canvas" with its reference: frequent in the corpus, it earns less
    common = CorpusCider(corpus)(["an empty canvas"], [["nothing on the canvas"]])
    rare = CorpusCider(refs)(["an empty canvas"], [["nothing on the canvas"]])
    assert common.shape == (1,) and 0 < float(common) < float(rare)


def test_self_critical_loss_is_reinforce_with_the_greedy_baseline():
    """The SCST loss is -(r(sample) - r(greedy)) log p(sample), averaged over words; one SGD step on it raises
    the advantage-weighted log-probability of the same samples."""
    from types import SimpleNamespace

    from mlrun.models.butd import BottomUpTopDownCaption, CorpusCider, decode

    torch.manual_seed(0)
    vocab = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "3", "7", "and"]
    refs = [["a 3 and a 7"], ["a 7"], ["a 3"], ["a 7 and a 3"], ["a 3 and a 3"], ["a 7 and a 7"]]
    data = SimpleNamespace(vocab=vocab, references=lambda split: refs)
    task = BottomUpTopDownCaption("bottom_up", vocab_size=8, optimizers={"scst": None}, feature_dim=4,
                                  embed=8, hidden=16, att_hidden=8, max_len=6)
    task.on_stage_start("scst", data)
    batch = {"scene": torch.arange(4), "features": torch.randn(4, 3, 4), "boxes": torch.rand(4, 3, 4)}
    v = task.regions(batch, "train")
    greedy = task.decoder.sample(v, 2, 3, 6, greedy=True)[0]  # argmax draws no random numbers
    torch.manual_seed(1)
    (name, loss), = list(task.training_step(batch))
    torch.manual_seed(1)
    words, logp, mask = task.decoder.sample(v, 2, 3, 6)
    # the reward's document frequencies come from all six training scenes' captions, not the batch's four
    r = CorpusCider(refs)([decode(w, vocab, 3) for w in [*words, *greedy]], refs[:4] * 2)
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
    """The miniature writes its frozen features in the released features' TSV layout: read back through the VQA v2
    / COCO loaders' FeatureStore and the paper-scale branch, they give the same regions as in memory."""
    from mlrun.datasets.butd import FeatureStore

    images = torch.rand(3, 1, 32, 32)
    task = _task(features, normalize=True)
    task._data = SimpleNamespace(images=lambda split: images)
    task.cache_dir = tmp_path
    scenes = torch.tensor([2, 0])
    in_memory = task.regions({"scene": scenes}, "test")
    store = FeatureStore(tmp_path / f"features_{features}" / "test.tsv")
    feats, norm_boxes = zip(*(store(int(i)) for i in scenes))
    from_disk = task.regions({"features": torch.stack(feats), "boxes": torch.stack(norm_boxes)}, "test")
    assert from_disk.shape == in_memory.shape == (2, 3 if features == "bottom_up" else 4, 6 + 5)
    assert torch.allclose(from_disk, in_memory, atol=1e-6)


def test_a_run_whose_classifier_follows_the_data_resumes(tmp_path):
    """num_answers null: the runner calls `setup(data)` before restoring, so an eval-only rerun of the checkpoint
    fits the model and scores what the run scored."""
    from mlrun import run

    smoke = ["logger=none", "trainer.progress=none", "dataset.n_train=16", "dataset.n_val=4", "dataset.n_test=8",
             "stages.1.batch_size=4", "stages.1.max_steps=3", "model.detector.steps=2", "model.detector.batch_size=2",
             "model.cache=null", "model.hidden=8", "model.att_hidden=8", "model.embed=4"]
    first = run("butd_vqa_digits", smoke, run_dir=tmp_path / "a")
    again = run("butd_vqa_digits", [*smoke, "eval_only=true", f"resume={tmp_path / 'a'}"], run_dir=tmp_path / "b")
    assert again["status"] == "completed" and again["metrics"]["test/acc"] == first["metrics"]["test/acc"]


@torch.no_grad()
def _beam_search_one_image_at_a_time(dec, v, bos, eos, beam, max_len):
    """The earlier, unbatched beam search (one decoder call per hypothesis per word): the reference."""
    results = []
    for i in range(len(v)):
        vi = v[i : i + 1]
        hyps = [([bos], 0.0, dec.init_state(vi))]
        done = []
        for _ in range(max_len + 1):
            cand = []
            for seq, score, state in hyps:
                logp, new, _ = dec.step(vi, torch.tensor([seq[-1]]), state)
                top = logp[0].topk(beam)
                cand += [(seq + [int(w)], score + float(s), new) for s, w in zip(top.values, top.indices)]
            cand.sort(key=lambda c: -c[1])
            hyps = []
            for seq, score, state in cand:
                (done if seq[-1] == eos else hyps).append((seq, score) if seq[-1] == eos else (seq, score, state))
                if len(hyps) == beam:
                    break
            if not hyps or (len(done) >= beam and max(s for _, s in done) >= hyps[0][1]):
                break
        best = max(done or [(h[0], h[1]) for h in hyps], key=lambda c: c[1])[0]
        results.append([w for w in best[1:] if w != eos])
    return results


@pytest.mark.parametrize("beam", [1, 2, 3, 5])
def test_batched_beam_search_equals_one_image_at_a_time(beam):
    from mlrun.models.butd import TopDownCaptioner

    torch.manual_seed(5)
    dec = TopDownCaptioner(vocab_size=9, v_dim=5, embed=8, hidden=16, att_hidden=8).eval()
    with torch.no_grad():  # sharper distributions: some captions end early, others run to max_len
        for p in dec.parameters():
            p.mul_(3)
    v = torch.randn(7, 3, 5)
    batched = dec.beam_search(v, bos=2, eos=3, beam=beam, max_len=6)
    assert batched == _beam_search_one_image_at_a_time(dec, v, 2, 3, beam, 6)
    assert len({len(c) for c in batched}) > 1
