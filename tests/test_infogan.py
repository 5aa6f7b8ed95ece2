"""InfoGAN: the mutual-information bound, where its gradients go, the matched accuracy, the networks' shapes,
the MNIST loader on a real-format fixture, and the figures."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from mlrun.models.infogan import (
    ConvGenerator,
    ConvTrunk,
    InfoGAN,
    best_assignment,
    categorical_bound,
    gaussian_bound,
    matched_accuracy,
    study_figure,
)

LN10 = math.log(10)


def small_task(**kw) -> InfoGAN:
    from functools import partial

    args = dict(
        generator=partial(ConvGenerator, image_size=8, channels=4, hidden=16),
        trunk=partial(ConvTrunk, image_size=8, channels=4, hidden=16),
        g_optimizer=partial(torch.optim.Adam, lr=1e-3), d_optimizer=partial(torch.optim.Adam, lr=2e-4),
        noise_dim=4, categories=10, continuous=2, q_hidden=8, eval_samples=64,
    )
    args.update(kw)
    torch.manual_seed(0)
    return InfoGAN(**args)


# ---------------------------------------------------------------------------------------------- the bound


def test_categorical_bound_equals_entropy_when_q_is_perfect():
    codes = torch.arange(10).repeat(3)
    perfect = torch.nn.functional.one_hot(codes, 10).float() * 50.0
    assert categorical_bound(perfect, codes).item() == pytest.approx(LN10, abs=1e-6)


def test_categorical_bound_hand_computed_cases():
    codes = torch.tensor([0, 1])
    # a uniform Q knows nothing: log(1/10) + ln 10 = 0
    assert categorical_bound(torch.zeros(2, 10), codes).item() == pytest.approx(0.0, abs=1e-6)
    # Q gives the true code probability 1/2 (the rest 1/18 each): ln(1/2) + ln 10 = ln 5
    half = torch.full((2, 10), math.log(1 / 18))
    half[0, 0] = half[1, 1] = math.log(1 / 2)
    assert categorical_bound(half, codes).item() == pytest.approx(math.log(5), abs=1e-6)
    # confidently wrong: below zero, far below H(c)
    wrong = torch.nn.functional.one_hot(torch.tensor([5, 6]), 10).float() * 5.0
    expected = -math.log(math.exp(5) + 9) + LN10  # log-softmax of a 0 logit beside one 5 and eight more 0s
    assert categorical_bound(wrong, codes).item() == pytest.approx(expected, abs=1e-6)
    assert expected < 0 < LN10


def test_gaussian_bound_matches_scipy():
    mean = torch.tensor([[0.2, -0.5], [0.0, 0.9]])
    log_std = torch.tensor([[0.0, -1.0], [0.3, 0.0]])
    codes = torch.tensor([[0.1, -0.4], [-0.7, 0.95]])
    want = norm.logpdf(codes.numpy(), mean.numpy(), np.exp(log_std.numpy())).sum(1).mean() + 2 * math.log(2)
    assert gaussian_bound(mean, log_std, codes).item() == pytest.approx(want, abs=1e-5)


def test_task_bound_is_h_c_for_a_perfect_q_and_lower_otherwise():
    task = small_task()
    cat = torch.arange(10)
    cont = torch.zeros(10, 2)
    with torch.no_grad():
        task.q_head[-1].weight.zero_()
        task.q_head[-1].bias.zero_()
    features = torch.zeros(10, task.trunk.out_features)
    li_cat, _ = task.bounds(features, cat, cont)
    assert li_cat.item() == pytest.approx(0.0, abs=1e-6)  # an uninformed Q
    # make Q read the code off the features perfectly
    task.q = lambda f: (f[:, :10] * 100.0, torch.zeros(len(f), 2), torch.zeros(len(f), 2))
    perfect = torch.nn.functional.one_hot(cat, 16).float()
    assert task.bounds(perfect, cat, cont)[0].item() == pytest.approx(LN10, abs=1e-5)
    shuffled = torch.nn.functional.one_hot(cat.roll(1), 16).float()
    assert task.bounds(shuffled, cat, cont)[0].item() < 0


# ---------------------------------------------------------------------------------------------- gradients


def grads_of(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def step_losses(task: InfoGAN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.rand(16, 1, 8, 8)
    gen = task.training_step((x, torch.zeros(16)))
    name_d, d_loss = next(gen)
    name_g, g_loss = next(gen)
    assert (name_d, name_g) == ("discriminator", "generator")
    return d_loss, g_loss


def test_q_and_the_shared_trunk_are_stepped_by_the_discriminator():
    task = small_task()
    opts = task.configure_optimizers()
    d_ids = {id(p) for g in opts["discriminator"].param_groups for p in g["params"]}
    g_ids = {id(p) for g in opts["generator"].param_groups for p in g["params"]}
    assert all(id(p) in d_ids for p in [*task.trunk.parameters(), *task.q_head.parameters(), *task.d_head.parameters()])
    assert {id(p) for p in task.generator.parameters()} == g_ids
    assert not d_ids & g_ids


def test_mi_loss_reaches_the_shared_trunk_and_q():
    """The D-side loss with Q's term minus the one without it leaves a non-zero gradient on the trunk and Q."""
    trunk_and_q = lambda t: [*t.trunk.parameters(), *t.q_head.parameters()]  # noqa: E731
    with_mi, without = small_task(q_weight=1.0), small_task(q_weight=0.0)
    d1, _ = step_losses(with_mi)
    d0, _ = step_losses(without)
    g1, g0 = grads_of(d1, trunk_and_q(with_mi)), grads_of(d0, trunk_and_q(without))
    trunk_n = len(list(with_mi.trunk.parameters()))
    diff_trunk = sum(float((a - b).abs().sum()) for a, b in zip(g1[:trunk_n], g0[:trunk_n]))
    assert diff_trunk > 1e-4
    assert all(float(g.abs().sum()) == 0 for g in g0[trunk_n:])  # without the term Q learns nothing
    assert sum(float(g.abs().sum()) for g in g1[trunk_n:]) > 1e-4


def test_mi_weight_zero_removes_the_term_from_the_generator_only():
    with_mi, control = small_task(mi_weight=1.0), small_task(mi_weight=0.0)
    d1, g1 = step_losses(with_mi)
    d0, g0 = step_losses(control)
    assert d1.item() == pytest.approx(d0.item(), abs=1e-6)  # Q is still fit in the control
    # the generator's losses differ by exactly λ·L_I on the same batch and on the G step's own (second) codes
    torch.manual_seed(0)
    torch.rand(16, 1, 8, 8)
    with_mi.sample_codes(16)  # the D step's codes
    z, cat, cont = with_mi.sample_codes(16)
    li_cat, li_cont = with_mi.bounds(with_mi.trunk(with_mi.generate(z, cat, cont)), cat, cont)
    assert (g0 - g1).item() == pytest.approx((li_cat + li_cont).item(), abs=1e-5)
    gen_grads = grads_of(g1, list(with_mi.generator.parameters()))
    ctrl_grads = grads_of(g0, list(control.generator.parameters()))
    assert sum(float((a - b).abs().sum()) for a, b in zip(gen_grads, ctrl_grads)) > 1e-4


def test_generator_step_draws_fresh_codes():
    """As the authors' loop (two sess.run calls, each sampling the prior): G's step does not reuse D's codes."""
    task = small_task()
    drawn = []
    original = task.sample_codes

    def record(n, gen=None):
        codes = original(n, gen)
        drawn.append(codes)
        return codes

    task.sample_codes = record
    step_losses(task)
    assert len(drawn) == 2
    assert not torch.equal(drawn[0][0], drawn[1][0]) and not torch.equal(drawn[0][2], drawn[1][2])
    drawn.clear()
    task.g_codes = "reuse"  # the earlier behaviour, kept as a variant: one draw per step
    step_losses(task)
    assert len(drawn) == 1


# ---------------------------------------------------------------------------------------------- accuracy


def test_matched_accuracy_is_permutation_invariant():
    labels = np.arange(10).repeat(5)
    perm = np.random.default_rng(0).permutation(10)
    assert matched_accuracy(perm[labels], labels) == 1.0
    assert best_assignment(perm[labels], labels) == {int(perm[i]): i for i in range(10)}


def test_matched_accuracy_hand_computed():
    # counts: cluster 0 -> {1: 2}, cluster 1 -> {0: 1, 2: 1}, cluster 2 -> {2: 1}; best: 0->1, 1->0, 2->2: 4/5
    assert matched_accuracy([0, 0, 1, 1, 2], [1, 1, 0, 2, 2]) == pytest.approx(0.8)
    # everything in one cluster: only one class can be matched
    assert matched_accuracy([3] * 6, [0, 0, 0, 1, 1, 2]) == pytest.approx(0.5)
    assert math.isnan(matched_accuracy([], []))


def test_matched_accuracy_needs_no_torch():
    """The function's source runs alone where importing torch fails (the torch-free report can reuse it)."""
    src = (Path(__file__).parents[1] / "models" / "infogan.py").read_text()
    tree = ast.parse(src)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("best_assignment",
                                                                                    "matched_accuracy")]
    assert len(funcs) == 2
    code = "\n\n".join(ast.get_source_segment(src, f) for f in funcs)
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from typing import Any
        exec(compile(sys.stdin.read(), "infogan_accuracy", "exec"))
        print(matched_accuracy([2, 2, 0, 1], [0, 0, 1, 2]))
    """)
    out = subprocess.run([sys.executable, "-c", script], input=code, capture_output=True, text=True, check=True)
    assert float(out.stdout) == 1.0


# ---------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("size,channels,hidden", [(8, 4, 16), (28, 8, 32)])
def test_networks_shapes(size, channels, hidden):
    g = ConvGenerator(latent_dim=14, image_size=size, channels=channels, hidden=hidden)
    d = ConvTrunk(image_size=size, channels=channels, hidden=hidden)
    x = g(torch.rand(5, 14))
    assert x.shape == (5, 1, size, size)
    assert float(x.detach().min()) >= 0 and float(x.detach().max()) <= 1
    assert d(x).shape == (5, d.out_features) == (5, hidden)


def test_paper_mnist_networks_have_the_papers_layers():
    g = ConvGenerator(latent_dim=74)
    d = ConvTrunk()
    assert [m.out_features for m in g.fc if isinstance(m, torch.nn.Linear)] == [1024, 7 * 7 * 128]
    assert [m.out_channels for m in g.up if isinstance(m, torch.nn.ConvTranspose2d)] == [64, 1]
    assert [m.out_channels for m in d.net if isinstance(m, torch.nn.Conv2d)] == [64, 128]
    assert [m.out_features for m in d.net if isinstance(m, torch.nn.Linear)] == [1024]


def test_evaluate_is_deterministic_and_in_range():
    task = small_task().eval()
    x = torch.rand(40, 1, 8, 8)
    y = torch.arange(40) % 10
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    a, b = task.evaluate(loader, "val"), task.evaluate(loader, "val")
    assert a == b
    assert 0.1 <= a["accuracy"] <= 1.0
    assert a["mi_lower_bound"] <= LN10


class _Data:
    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.splits = splits

    def dataset(self, split, stage=None):
        if split not in self.splits:
            raise KeyError(split)
        return torch.utils.data.TensorDataset(*self.splits[split])


def _digits_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 8x8 images in 10 tight clusters (one bright pixel per class plus a little noise) with their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.05
    x.view(n, -1)[torch.arange(n), y * 6] = 1.0
    return x, y


def test_real_digits_are_scored_with_batch_norm_statistics_of_real_training_digits():
    """Q's head only ever sees fakes in training; scoring real digits re-estimates the statistics on the real
    training digits (a copy: the trained statistics stay), and 'trained' keeps the fake-image ones."""
    task = small_task()
    train = _digits_like(128, 0)
    task.on_stage_start("train", _Data({"train": train}))
    task.train()
    with torch.no_grad():
        for _ in range(3):  # training on fakes moves the running statistics
            z, c, k = task.sample_codes(32)
            task.q_head(task.trunk(task.generate(z, c, k)))
    bn = task.q_head[1]
    trained_mean = bn.running_mean.clone()
    task.eval()
    encoder = task.real_encoder()
    # expected: the mean over the two real batches of 64 of the head's first-layer activations on real digits
    real_bn = encoder[1][1]
    trunk_copy, first = encoder[0], encoder[1][0]
    with torch.no_grad():
        acts = torch.cat([first(trunk_copy(train[0][i:i + 64])) for i in (0, 64)])
    assert torch.allclose(real_bn.running_mean, acts.mean(0), atol=1e-5)
    assert not torch.allclose(real_bn.running_mean, trained_mean, atol=1e-3)
    assert torch.equal(bn.running_mean, trained_mean)  # the task's own statistics are untouched
    task.bn_stats = "trained"
    assert task.real_encoder()[1] is task.q_head


def test_final_test_scores_the_union_of_score_splits_and_reports_kmeans():
    task = small_task(score_splits=["val", "test"])
    data = _Data({"train": _digits_like(200, 0), "val": _digits_like(30, 1), "test": _digits_like(50, 2)})
    task.on_stage_start("train", data)
    task.eval()
    test_loader = torch.utils.data.DataLoader(data.dataset("test"), batch_size=16)
    out = task.evaluate(test_loader, "test")
    assert out["scored_digits"] == 80
    assert out["pixel_kmeans_accuracy"] == 1.0  # ten tight pixel clusters: k-means finds them all
    assert 0.0 < out["kmeans_accuracy"] <= 1.0
    val = task.evaluate(torch.utils.data.DataLoader(data.dataset("val"), batch_size=16), "val")
    assert val["scored_digits"] == 30 and "kmeans_accuracy" not in val


# ---------------------------------------------------------------------------------------------- runs, figures


def test_digits_run_moves_both_players_and_records_the_bound(in_tmp):
    """Through the shared trainer: one step moves D (trunk, both heads) and G, each at its own learning rate;
    L_I is logged during training, the metrics and traversal figures are written."""
    from hydra.utils import instantiate

    from mlrun import compose, run
    from mlrun.trainer import seed_everything

    overrides = ["logger=none", "trainer.max_steps=1", "trainer.log_every=1", "trainer.progress=none",
                 "hardware.threads=1", "model.eval_samples=32", "model.traversal_steps=3",
                 "model.generator.hidden=16", "model.trunk.hidden=16"]
    res = run("infogan_digits", overrides, run_dir=in_tmp / "r")
    assert res["status"] == "completed"
    cfg = compose("infogan_digits", overrides)
    seed_everything(0)
    instantiate(cfg.dataset, _convert_="object")
    init = instantiate(cfg.model, _convert_="object").state_dict()
    after = torch.load(in_tmp / "r" / "checkpoints" / "last.pt", weights_only=True)["model"]
    # Adam's first step moves each weight by its optimizer's lr (m/sqrt(v) = sign(g)): G's 1e-3, D's and Q's 2e-4
    for part, lr in [("generator.net.0.weight", 1e-3), ("generator.net.6.weight", 1e-3), ("trunk.net.1.weight", 2e-4),
                     ("d_head.weight", 2e-4), ("q_head.3.weight", 2e-4)]:
        moved = (after[part] - init[part]).abs().max().item()
        assert moved == pytest.approx(lr, rel=0.01), (part, moved)

    rows = [json.loads(line) for line in (in_tmp / "r" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["train/mi_lower_bound"] for r in rows if "train/mi_lower_bound" in r]
    assert len(logged) == 1 and math.isfinite(logged[0]) and logged[0] <= LN10  # never above H(c)
    for key in ("test/accuracy", "test/mi_lower_bound", "val/accuracy"):
        assert key in res["metrics"]
    assert sorted(res["figures"]) == ["figures/traversal_c1.png", "figures/traversal_c2.png"]
    assert (in_tmp / "r" / "figures" / "traversal_c1.png").stat().st_size > 1000


def test_mnist_fixture_one_step(in_tmp):
    from mlrun import run
    from mlrun.datasets.vision import write_mnist_fixture

    root = write_mnist_fixture(in_tmp / "data")
    res = run("infogan_mnist", ["logger=none", "trainer.max_steps=1", "trainer.progress=none", "hardware.threads=1",
                                f"dataset.root={root}", "dataset.batch_size=16", "model.eval_samples=16",
                                "model.traversal_steps=2"], run_dir=in_tmp / "m")
    assert res["status"] == "completed" and res["steps"] == 1
    assert res["metrics"]["test/accuracy"] >= 0.1  # 20 fixture test digits, 2 per class


def test_study_figure(tmp_path):
    runs = []
    for label, seed, acc in [("lambda1.0", 0, 0.8), ("lambda0.0", 0, 0.2)]:
        d = tmp_path / f"{label}_s{seed}"
        d.mkdir()
        rows = [{"step": s, "global_step": s, "train/mi_lower_bound": 2.3 * s / 300 if label == "lambda1.0" else 0.1}
                for s in (100, 200, 300)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append({"dir": str(d), "label": label, "seed": seed, "status": "completed",
                     "metrics": {"test/accuracy": acc}})
    paths = study_figure({"runs": runs}, tmp_path / "figures")
    assert [p.name for p in paths] == ["mi_lower_bound.png"] and paths[0].stat().st_size > 1000
