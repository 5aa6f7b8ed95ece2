"""Batch and Group Normalization: the hand-written layers against torch's, the study networks, the
measurements behind the studies' claims, and one step of each paper-scale experiment on a real-format fixture."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlrun.models.normalization import (
    BatchNorm,
    BNInception,
    DigitsResNet,
    GroupNorm,
    NormClassifier,
    SigmoidMLP,
    bn_figure,
    bn_summarize,
    drift,
    epoch_multistep,
    gn_figure,
    gn_summarize,
    make_norm,
    resnet50,
    sgd,
    steps_to,
)

# ---------------------------------------------------------------------------------------------- layers


def _pair(ours: nn.Module, ref: nn.Module) -> None:
    with torch.no_grad():
        ours.weight.copy_(torch.rand_like(ours.weight) + 0.5)
        ours.bias.copy_(torch.randn_like(ours.bias))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("shape, ref_cls", [((16, 6), nn.BatchNorm1d), ((8, 6, 5), nn.BatchNorm1d),
                                            ((4, 6, 5, 3), nn.BatchNorm2d)])
def test_batchnorm_matches_torch_in_training_and_eval(shape, ref_cls):
    torch.manual_seed(0)
    ours, ref = BatchNorm(6, momentum=0.1), ref_cls(6, momentum=0.1)
    _pair(ours, ref)
    for step in range(3):  # several steps: the running statistics accumulate the same way
        x = torch.randn(*shape) * 3 + step
        g = torch.randn(*shape)
        for a, b in zip(_forward_backward(ours, x, g), _forward_backward(ref, x, g)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        ours.zero_grad()
        ref.zero_grad()
    torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
    assert int(ours.num_batches_tracked) == 3
    ours.eval()
    ref.eval()
    x, g = torch.randn(*shape), torch.randn(*shape)
    for a, b in zip(_forward_backward(ours, x, g), _forward_backward(ref, x, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batchnorm_state_dict_is_torchs():
    ref = nn.BatchNorm2d(4)
    ref(torch.randn(8, 4, 3, 3) * 2 + 1)
    ours = BatchNorm(4)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    ref.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))


def test_batchnorm_eval_output_does_not_depend_on_the_batch_but_training_output_does():
    torch.manual_seed(0)
    bn = BatchNorm(5)
    for _ in range(5):
        bn(torch.randn(32, 5, 4, 4) * 2 + 3)
    x = torch.randn(8, 5, 4, 4)
    other = torch.cat([x[:1], torch.randn(7, 5, 4, 4) * 10])
    bn.eval()
    torch.testing.assert_close(bn(x)[0], bn(other)[0])
    torch.testing.assert_close(bn(x[:1])[0], bn(x)[0])
    bn.train()
    assert (bn(x)[0] - bn(other)[0]).abs().max() > 0.1  # mini-batch statistics: the batch matters


def test_batchnorm_rejects_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than one value"):
        BatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="in chunks of 1"):
        BatchNorm(3, ghost_batch=1)(torch.randn(4, 3))


def test_ghost_batches_are_separate_workers_with_rank_0_running_statistics():
    """BN over chunks of N in one batch equals N-image BNs on 8 workers, the gradient that of the whole batch;
    the running statistics follow the first chunk only (what DDP keeps: rank 0's buffers)."""
    torch.manual_seed(0)
    ghost, ref = BatchNorm(4, ghost_batch=2), nn.BatchNorm2d(4)
    _pair(ghost, ref)
    x, g = torch.randn(16, 4, 3, 3) * 2 + 1, torch.randn(16, 4, 3, 3)
    y, gx, gw, gb = _forward_backward(ghost, x, g)
    xs = x.clone().requires_grad_()
    workers = torch.cat([ref(chunk) for chunk in xs.split(2)])
    workers.backward(g)
    torch.testing.assert_close(y, workers.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, xs.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, ref.bias.grad, atol=1e-5, rtol=1e-5)
    rank0 = nn.BatchNorm2d(4)
    rank0(x[:2])
    torch.testing.assert_close(ghost.running_mean, rank0.running_mean)
    torch.testing.assert_close(ghost.running_var, rank0.running_var)
    assert not torch.allclose(y[:2], BatchNorm(4)(x)[:2], atol=1e-3)  # whole-batch BN differs
    with pytest.raises(ValueError, match="not a multiple of 2"):
        ghost(torch.randn(5, 4, 3, 3))
    ghost.eval()  # evaluation: running statistics, no chunks
    torch.testing.assert_close(ghost(x[:3]), ghost(x)[:3])


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 7), (2, 6, 5, 4)])
def test_groupnorm_matches_torch(groups, shape):
    if len(shape) == 2 and groups == 6:
        pytest.skip("one value per group: every output is beta, the gradient 0/sqrt(eps) is round-off")
    torch.manual_seed(groups)
    ours, ref = GroupNorm(groups, 6), nn.GroupNorm(groups, 6)
    _pair(ours, ref)
    x, g = torch.randn(*shape) * 4 - 2, torch.randn(*shape)
    for a, b in zip(_forward_backward(ours, x, g), _forward_backward(ref, x, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_groupnorm_sample_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    gn = GroupNorm(4, 8)
    x = torch.randn(6, 8, 5, 5)
    other = torch.cat([x[:1], torch.randn(5, 8, 5, 5) * 100 + 7])
    torch.testing.assert_close(gn(x)[0], gn(other)[0])
    torch.testing.assert_close(gn(x[:1])[0], gn(x)[0])


def test_groupnorm_extremes_are_layer_and_instance_norm():
    x = torch.randn(3, 8, 4, 4) * 2 + 1
    torch.testing.assert_close(make_norm("ln", 8)(x), F.layer_norm(x, x.shape[1:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(make_norm("in", 8)(x), F.instance_norm(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(make_norm("gn", 8, groups=8)(x), F.instance_norm(x), atol=1e-5, rtol=1e-5)


def test_make_norm_kinds():
    assert isinstance(make_norm("bn", 8), BatchNorm)
    gn = make_norm("gn", 8, groups=4)
    assert isinstance(gn, GroupNorm) and gn.num_groups == 4
    assert make_norm("ln", 8).num_groups == 1 and make_norm("in", 8).num_groups == 8
    assert isinstance(make_norm("none", 8), nn.Identity)
    with pytest.raises(ValueError, match="bn, gn, ln, in, none"):
        make_norm("batch", 8)
    with pytest.raises(ValueError, match="do not split"):
        make_norm("gn", 8, groups=3)


# ---------------------------------------------------------------------------------------------- networks


def test_sigmoid_mlp_inputs_and_init():
    torch.manual_seed(0)
    net = SigmoidMLP([64, 100, 100, 100, 10], norm="bn", init_std=0.1)
    assert all(layer.bias is None for layer in net.hidden)  # BN's beta replaces the bias
    assert abs(float(net.hidden[1].weight.detach().std()) - 0.1) < 0.01
    x = torch.rand(60, 64)
    logits, inputs = net.sigmoid_inputs(x)
    assert logits.shape == (60, 10) and [u.shape for u in inputs] == [(60, 100)] * 3
    torch.testing.assert_close(logits, net(x))
    # in training, BN makes each sigmoid input zero-mean, unit-variance over the batch (gamma 1, beta 0)
    torch.testing.assert_close(inputs[-1].mean(0), torch.zeros(100), atol=1e-5, rtol=0)
    plain = SigmoidMLP([64, 100, 10], norm="none")
    assert plain.hidden[0].bias is not None and isinstance(plain.norms[0], nn.Identity)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in", "none"])
def test_digits_resnet_takes_any_norm(norm):
    torch.manual_seed(0)
    net = DigitsResNet(norm, groups=8)
    kinds = {type(m) for m in net.modules()}
    expected = {"bn": BatchNorm, "gn": GroupNorm, "ln": GroupNorm, "in": GroupNorm, "none": nn.Identity}[norm]
    assert expected in kinds
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    if norm != "none":  # each block's last gamma starts at zero
        assert all(float(b.norm2.weight.abs().sum()) == 0 for b in net.blocks)


@pytest.fixture(scope="module")
def gn_resnet50() -> nn.Module:
    return resnet50("gn", groups=32, num_classes=10)


def test_resnet50_with_group_norm_and_zero_init(gn_resnet50):
    net = gn_resnet50
    gns = [m for m in net.modules() if isinstance(m, GroupNorm)]
    assert len(gns) == 53 and all(m.num_groups == 32 for m in gns)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    blocks = [m for m in net.modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 16
    assert all(float(b.bn3.weight.abs().sum()) == 0 for b in blocks)
    assert all(float(b.bn1.weight.min()) == 1 for b in blocks)


def test_bn_inception_widths():
    net = BNInception(num_classes=7)
    widths = [m.out_channels for m in net.features if hasattr(m, "out_channels")]
    # Figure 5's modules 3a..5b; 4c, 4d, 4e come to 608, 608, 1056 from their branch widths
    assert widths == [256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]
    assert sum(isinstance(m, BatchNorm) for m in net.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in net.modules())  # BN after every conv, before its ReLU
    assert all(m.kernel_size in ((1, 1), (3, 3), (7, 7)) for m in net.modules() if isinstance(m, nn.Conv2d))
    net.eval()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 7)


# ---------------------------------------------------------------------------------------------- training


def test_sgd_scales_the_learning_rate():
    p = [nn.Parameter(torch.zeros(1))]
    assert sgd(p, lr=0.1, batch_size=2, base_batch_size=32).param_groups[0]["lr"] == pytest.approx(0.1 * 2 / 32)
    assert sgd(p, lr=0.0015, lr_mult=30).param_groups[0]["lr"] == pytest.approx(0.045)
    opt = sgd(p, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4


def test_epoch_multistep_counts_epochs_in_steps():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = epoch_multistep(opt, [2, 3], gamma=0.1, images_per_epoch=100, batch_size=8, world_size=2)
    per_epoch = 100 // 16  # 6 steps an epoch, the last partial batch dropped as the trainer does
    lrs = []
    for _ in range(4 * per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[2 * per_epoch - 1] == 1.0 and lrs[2 * per_epoch] == pytest.approx(0.1)
    assert lrs[3 * per_epoch] == pytest.approx(0.01)


def test_weight_decay_on_gamma_and_beta_unless_turned_off(gn_resnet50):
    """The GN paper decays every weight layer, gamma and beta included (§4.1): one group by default."""
    make = lambda groups: sgd(groups, lr=0.1, weight_decay=1e-4)  # noqa: E731
    (group,) = NormClassifier(gn_resnet50, make).configure_optimizers()["model"].param_groups
    assert group["weight_decay"] == 1e-4 and len(group["params"]) == len(list(gn_resnet50.parameters()))
    decayed, free = NormClassifier(gn_resnet50, make, decay_norm=False).configure_optimizers()["model"].param_groups
    norm_ids = {id(p) for m in gn_resnet50.modules() if isinstance(m, GroupNorm) for p in m.parameters()}
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    assert {id(p) for p in free["params"]} == norm_ids
    assert len(decayed["params"]) + len(free["params"]) == len(list(gn_resnet50.parameters()))


def test_paper_configs_decay_gamma_and_beta():
    from mlrun import compose

    for name in ("groupnorm_digits", "groupnorm_digits_groups", "groupnorm_imagenet"):
        assert compose(name).model.decay_norm is True, name


def test_groupnorm_digits_simulates_8_workers_per_step():
    from omegaconf import OmegaConf

    from mlrun import compose

    cfg = OmegaConf.to_container(compose("groupnorm_digits", ["model.net={norm:bn,ghost_batch:2}"]), resolve=True)
    assert cfg["label"] == "bn_b2" and cfg["dataset"]["batch_size"] == 16  # SGD over 8 workers' 2 images
    assert cfg["model"]["net"]["ghost_batch"] == 2 and cfg["trainer"]["eval_every"] == 1077 // 16
    opt = sgd([nn.Parameter(torch.zeros(1))], **{k: v for k, v in cfg["model"]["optimizer"].items()
                                                 if not k.startswith("_")})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 2 / 32)


def test_evaluate_reports_the_median_of_the_last_evaluations_and_checkpoints_them():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    task = NormClassifier(net, lambda p: sgd(p, lr=0.1), median_last=3)
    x = torch.randn(10, 4)
    accs = []
    for i in range(5):
        y = (torch.arange(10) < 2 * i).long()  # a different accuracy at each evaluation
        out = task.evaluate([(x, y)], "val")
        accs.append(out["acc"])
        if i < 2:
            assert "acc_last3" not in out
        else:
            assert out["acc_last3"] == pytest.approx(sorted(accs[-3:])[1])
    assert "acc_last3" not in task.evaluate([(x, y)], "test")  # one test evaluation: no median of 3
    again = NormClassifier(net, lambda p: sgd(p, lr=0.1), median_last=3)
    again.load_extra_state(task.extra_state())
    assert again.eval_history == task.eval_history


def test_evaluate_reports_percentiles_of_one_sigmoid_input_on_the_probe_batch():
    torch.manual_seed(0)
    net = SigmoidMLP([64, 20, 20, 10], norm="bn")
    task = NormClassifier(net, lambda p: sgd(p, lr=0.1), probe_unit=3, probe_size=50, topk=(1, 5))
    x, y = torch.rand(90, 64), torch.randint(0, 10, (90,))
    task(x)  # one training-mode pass moves the running statistics
    task.eval()
    loader = [(x[:40], y[:40]), (x[40:], y[40:])]
    out = task.evaluate(loader, "val")
    with torch.no_grad():
        unit = net.sigmoid_inputs(x[:50])[1][-1][:, 3]
        logits = net(x)
    for p in (15, 50, 85):
        assert out[f"p{p}"] == pytest.approx(float(torch.quantile(unit, p / 100)), abs=1e-6)
    assert out["acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    top5 = logits.topk(5, 1).indices
    assert out["top5"] == pytest.approx(float((top5 == y[:, None]).any(1).float().mean()))
    assert out["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-5)


# ---------------------------------------------------------------------------------------------- studies


def _run(tmp_path, name, label, seed, rows, metrics=None):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": str(d), "label": label, "seed": seed, "status": "completed", "metrics": metrics or {}}


def test_steps_to_and_drift():
    curve = [(50, 0.5), (100, 0.89), (150, 0.91), (200, 0.95)]
    assert steps_to(curve, 0.9) == 150 and math.isinf(steps_to(curve, 0.99))
    assert drift([(100, 5.0), (250, 1.0), (300, 3.0)], after=200) == pytest.approx(1.0)


def test_bn_summarize_reads_each_runs_curves(tmp_path):
    def rows(hit_step, p50s):
        out = [{"step": s, "val/acc": 0.95 if s >= hit_step else 0.5, "val/p50": p} for s, p in zip(
            range(50, 50 * len(p50s) + 1, 50), p50s)]
        return out + [{"step": 500, "train/model_loss": 0.1}]  # training rows have no val metrics

    runs = [
        _run(tmp_path, "a", "none_x1", 0, rows(300, [0, 0, 0, 0, 1, 3])),
        _run(tmp_path, "b", "none_x1", 1, rows(250, [0, 0, 0, 0, 2, 4])),
        _run(tmp_path, "c", "none_x1", 2, rows(10_000, [0, 0, 0, 0, 0, 0])),
        _run(tmp_path, "d", "bn_x5", 0, rows(50, [0, 0, 0, 0, 1, 1])),
    ]
    out = bn_summarize({"runs": runs}, target=0.9, after=200)
    assert out["none_x1/steps_to_90"] == 300  # median of 300, 250, never
    assert not [k for k in out if k.count("/") > 1]  # per-seed values come from the study's per-seed pass
    assert math.isinf(bn_summarize({"runs": runs[2:3]}, target=0.9)["none_x1/steps_to_90"])  # seed 2 alone
    assert out["none_x1/p50_drift"] == pytest.approx(1.0)  # median of pstdev(1, 3), (2, 4), (0, 0)
    assert out["bn_x5/steps_to_90"] == 50 and out["bn_x5/p50_drift"] == 0.0


def test_bn_figure_draws_every_seed_and_names_the_median(tmp_path, monkeypatch):
    runs = []
    for label in ("none_x1", "bn_x1"):
        for seed in range(3):
            d = tmp_path / f"{label}_s{seed}"
            d.mkdir()
            rows = [{"step": s, "val/acc": 0.5 + 0.1 * k + 0.01 * seed, "val/p15": -1.0, "val/p50": 0.0,
                     "val/p85": 0.4} for k, s in enumerate((50, 100, 150))]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs.append({"dir": str(d), "label": label, "seed": seed, "status": "completed", "metrics": {}})
    import matplotlib.axes

    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append((ax.get_title(), a, k))
                        or real_plot(ax, *a, **k))
    (path,) = bn_figure({"runs": runs}, tmp_path / "figs")
    assert path.name == "bn_figure1.png" and path.stat().st_size > 1000
    panel_a = [(a, k) for _, a, k in drawn if len(a) >= 2 and len(a[1]) == 3 and a[1][0] >= 0.5]
    medians = [k["label"] for a, k in panel_a if "label" in k]
    assert sorted(medians) == ["bn_x1 (n=3)", "none_x1 (n=3)"]
    dots = [a for a, k in panel_a if a[2:] == (".",)]
    assert sorted(tuple(a[1]) for a in dots)[:1] == [(0.5, 0.6, 0.7)] and len(dots) == 6  # one per run


def test_gn_summary_and_figure(tmp_path):
    runs = []
    for norm, accs in (("bn", {32: 0.98, 2: 0.90}), ("gn", {32: 0.97, 2: 0.97})):
        for b, acc in accs.items():
            for seed, jitter in enumerate((0.0, 0.01, -0.01)):
                runs.append({"dir": str(tmp_path), "label": f"{norm}_b{b}", "seed": seed, "status": "completed",
                             "metrics": {"val/acc_last5": acc + jitter, "test/acc": acc - 0.01}})
    out = gn_summarize({"runs": runs})
    assert out["bn_b2/error"] == pytest.approx(10.0) and out["gn_b32/error"] == pytest.approx(3.0)
    assert out["bn_b2/test_error"] == pytest.approx(11.0)
    one_seed = gn_summarize({"runs": [r for r in runs if r["seed"] == 1]})  # called per seed: that seed's value
    assert one_seed["bn_b2/error"] == pytest.approx(9.0)
    paths = gn_figure({"runs": runs}, tmp_path / "figs")
    assert paths[0].name == "gn_figure1.png" and paths[0].stat().st_size > 1000
    ablation = [dict(r, label=f"gn_g{g}") for g, r in zip((1, 2, 4), runs)]
    assert gn_figure({"runs": ablation}, tmp_path / "figs")[0].name == "gn_groups.png"


# ---------------------------------------------------------------------------------------------- paper scale


def test_mnist_loader_reads_the_real_format_fixture(tmp_path):
    from mlrun.datasets.vision import MNIST, write_mnist_fixture

    write_mnist_fixture(tmp_path, n_train=40, n_test=10)
    data = MNIST(str(tmp_path), batch_size=60, flatten=True, val_size=10)
    x, y = data.dataset("train")[0]
    assert x.shape == (784,) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert len(data.dataset("test")) == 10


@pytest.mark.parametrize("name, overrides", [
    ("batchnorm_mnist", []),
    ("batchnorm_imagenet", ["dataset.image_size=32"]),
    ("groupnorm_imagenet", []),
])
def test_one_training_step_of_each_paper_scale_experiment(name, overrides, tmp_path, monkeypatch):
    from hydra.utils import get_method

    from mlrun import compose, run

    monkeypatch.chdir(tmp_path)
    cfg = compose(name)
    get_method(cfg.smoke.fixture)(tmp_path / "data")
    results = run(name, ["logger=none", "trainer.max_steps=1", "trainer.max_epochs=null", "trainer.eval_every=0",
                         "trainer.progress=none", "trainer.limit_eval_batches=1", "hardware.threads=1",
                         f"dataset.root={tmp_path / 'data'}", *cfg.smoke.overrides, *overrides],
                  run_dir=tmp_path / "run")
    assert results["status"] == "completed" and results["steps"] == 1
    assert 0.0 <= results["metrics"]["test/acc"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("train/model_loss", math.nan)) for r in rows)


def test_target_scenes_are_the_split_digits_as_large_targets_among_distractors():
    from mlrun.datasets.digits import load_digits_arrays, split_indices
    from mlrun.datasets.scenes import TargetScenes, target_scene

    data = TargetScenes(copies=2, seed=0)
    x, y = data.dataset("train").tensors
    labels = load_digits_arrays()[1][split_indices()["train"]]
    assert x.shape == (2 * len(labels), 1, 16, 16) and torch.equal(y, torch.from_numpy(labels).repeat(2))
    assert len(data.dataset("test")) == len(split_indices()["test"])  # one scene per held-out digit
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.testing.assert_close(TargetScenes(copies=2, seed=0).dataset("train").tensors[0], x)
    assert not torch.equal(TargetScenes(copies=2, seed=1).dataset("train").tensors[0], x)
    rng = np.random.default_rng(0)  # no distractors, no noise: the target digit resized somewhere on the canvas
    digit = load_digits_arrays()[0][0] / 16.0
    img = target_scene(rng, digit, digit[None], distractors=(0, 0), clutter=0.0, target_size=8, canvas=8)
    np.testing.assert_allclose(img, digit, atol=1e-6)
