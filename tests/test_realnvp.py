"""Real NVP: invertibility, log-determinants against autograd, bits/dim against hand-computed values, the
closed-form baselines against scipy, the batch-norm guard, and the CIFAR/CelebA loaders on real-format fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlrun.models.realnvp import (
    Coupling,
    FlowBatchNorm,
    RealNVP,
    RealNVPFlow,
    RunningBatchNorm,
    bits_per_dim,
    dequantize,
    logit_transform,
)


def _randomize(flow: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Give the zero-initialised output convolutions (and BN affine terms) random values: a non-trivial map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, torch.nn.Conv2d) and not hasattr(m, "parametrizations"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype) * std)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * std)
            if isinstance(m, RunningBatchNorm) and m.log_gamma is not None:
                m.log_gamma.copy_(torch.randn(m.log_gamma.shape, generator=g, dtype=m.log_gamma.dtype) * 0.2)
                m.beta.copy_(torch.randn(m.beta.shape, generator=g, dtype=m.beta.dtype) * 0.2)
            if isinstance(m, Coupling) and m.scale is not None:  # the checkerboard scales start at 0 (identity s)
                m.scale.fill_(0.5 + float(torch.rand((), generator=g, dtype=torch.double)))
        if getattr(flow, "log_scale", None) is not None:
            flow.log_scale.copy_(torch.randn(flow.log_scale.shape, generator=g, dtype=flow.log_scale.dtype) * 0.2)


def _flow(coupling: str = "affine", channels: int = 1, size: int = 4, scales: int = 2, **kw) -> RealNVPFlow:
    torch.manual_seed(0)
    flow = RealNVPFlow(channels, size, scales, mid_channels=8, num_blocks=1, coupling=coupling, **kw).double()
    _randomize(flow)
    return flow


def _warm_up(flow: RealNVPFlow, x: torch.Tensor, steps: int = 3) -> None:
    """A few training-mode forwards so the running statistics are not the first batch's."""
    flow.train()
    with torch.no_grad():
        for i in range(steps):
            flow(x * (1 + 0.1 * i))


@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_flow_inverts(coupling, mode):
    flow = _flow(coupling, channels=3, size=8, scales=3)
    x = torch.randn(6, 3, 8, 8, dtype=torch.double)
    _warm_up(flow, x)
    flow.train(mode == "train")
    z, _ = flow(x)
    assert z.shape == (6, 3 * 64)
    assert torch.allclose(flow.inverse(z), x, atol=1e-5, rtol=0)


def test_flow_inverts_in_float32():
    torch.manual_seed(0)
    flow = RealNVPFlow(1, 8, 2, mid_channels=8, num_blocks=1)
    _randomize(flow, std=0.05)  # larger random weights make a map too ill-conditioned for float32 round trips
    x = torch.randn(8, 1, 8, 8)
    _warm_up(flow, x)
    for mode in (True, False):
        flow.train(mode)
        z, _ = flow(x)
        assert (flow.inverse(z) - x).abs().max() < 1e-5


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_logdet_equals_autograd_jacobian(coupling):
    flow = _flow(coupling)
    x = torch.randn(3, 1, 4, 4, dtype=torch.double)
    _warm_up(flow, x)
    flow.eval()  # one sample's map (training mode couples the batch through its statistics)
    _, logdet = flow(x)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 1, 4, 4))[0].flatten(), x[i].flatten())
        assert jac.shape == (16, 16)
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-8)
    if coupling == "affine":  # non-trivial: the log-det varies with x
        assert (logdet - logdet[0]).abs().max() > 1e-3
    else:  # NICE: constant Jacobian, the scaling and batch norm only
        assert (logdet - logdet[0]).abs().max() < 1e-10


def test_coupling_keeps_the_conditioning_half_and_has_triangular_jacobian():
    torch.manual_seed(0)
    c = Coupling(4, "channel", 1, "affine", mid=8, blocks=1, bn=lambda ch: RunningBatchNorm(ch)).double().eval()
    _randomize(c)
    x = torch.randn(2, 4, 2, 2, dtype=torch.double)
    y, ld = c(x)
    assert torch.equal(y[:, 2:], x[:, 2:])  # parity 1 conditions on the second half of the channels
    jac = torch.autograd.functional.jacobian(lambda v: c(v.view(1, 4, 2, 2))[0].flatten(), x[0].flatten())
    assert ld[0].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)


def test_checkerboard_coupling_changes_only_the_other_squares():
    torch.manual_seed(0)
    c = Coupling(1, "checkerboard", 0, "affine", mid=8, blocks=1, bn=lambda ch: RunningBatchNorm(ch)).double().eval()
    _randomize(c)
    x = torch.randn(2, 1, 4, 4, dtype=torch.double)
    y, _ = c(x)
    kept = (torch.arange(4).view(-1, 1) + torch.arange(4).view(1, -1)) % 2 == 0
    assert torch.equal(y[:, :, kept], x[:, :, kept])
    assert not torch.allclose(y[:, :, ~kept], x[:, :, ~kept])


def test_preprocessing_logdet_equals_autograd():
    u = torch.rand(1, 1, 3, 3, dtype=torch.double)
    _, ld = logit_transform(u, 0.05)
    jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v, 0.05)[0].flatten(), u)
    assert ld.item() == pytest.approx(torch.log(jac.reshape(9, 9).diagonal()).sum().item(), abs=1e-12)


def test_dequantize_recovers_levels():
    k = torch.arange(17, dtype=torch.double)
    u = dequantize(k / 16, 17, torch.full_like(k, 0.5))
    assert torch.allclose(u * 17 - 0.5, k)
    assert ((dequantize(k / 16, 17) * 17).floor() == k).all()


def _identity_task(levels: int = 17, alpha: float = 0.05) -> RealNVP:
    """A task whose flow is the identity in eval mode: s = t = 0 in every coupling, BN with mean 0 and var + eps = 1."""
    flow = RealNVPFlow(1, 2, 1, mid_channels=4, num_blocks=1).double()
    for m in flow.modules():
        if isinstance(m, FlowBatchNorm):
            m.running_var.fill_(1 - m.eps)
        if isinstance(m, Coupling):  # zero output magnitude and bias: s = t = 0
            with torch.no_grad():
                m.net.out.parametrizations.weight.original0.zero_()
                m.net.out.bias.zero_()
    task = RealNVP(flow, torch.optim.Adam, levels=levels, alpha=alpha, baselines=False).double().eval()
    return task


def test_bits_per_dim_of_a_known_density_equals_hand_computation():
    """Identity flow: u has density N(logit(s); 0, 1) * (1 - 2a) / (s (1 - s)) per pixel, s = a + (1 - 2a) u."""
    task = _identity_task()
    x = torch.tensor([0.0, 4 / 16, 9 / 16, 1.0], dtype=torch.double).view(1, 1, 2, 2)
    noise = torch.tensor([0.5, 0.1, 0.9, 0.3], dtype=torch.double).view(1, 1, 2, 2)
    with torch.no_grad():
        got = task.bpd(x, noise).item()
    a, nats = 0.05, 0.0
    for k, e in zip([0, 4, 9, 16], [0.5, 0.1, 0.9, 0.3]):
        u = (k + e) / 17
        s = a + (1 - 2 * a) * u
        y = math.log(s / (1 - s))
        nats += -0.5 * y * y - 0.5 * math.log(2 * math.pi) + math.log((1 - 2 * a) / (s * (1 - s))) - math.log(17)
    assert got == pytest.approx(-nats / (4 * math.log(2)), abs=1e-9)


def test_uniform_density_scores_log2_levels():
    # log p(u) = 0 for the uniform density on [0, 1)^D: bits/dim = log2(levels) exactly.
    assert bits_per_dim(torch.zeros(3), 64, 17).tolist() == pytest.approx([math.log2(17)] * 3)
    assert bits_per_dim(torch.zeros(1), 3072, 256).item() == pytest.approx(8.0)


class _Data:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def dataset(self, split, stage=None):
        return torch.utils.data.TensorDataset(self.x, torch.zeros(len(self.x)))


def test_gaussian_baselines_match_scipy():
    from scipy.stats import multivariate_normal, norm

    rng = np.random.default_rng(0)
    k = rng.integers(0, 17, size=(200, 1, 2, 2))
    k[:, 0, 1, 1] = np.clip(k[:, 0, 0, 0] + rng.integers(-1, 2, size=200), 0, 16)  # correlated pixels
    x = torch.from_numpy(k / 16.0)
    task = _identity_task()
    task.baselines, task.baseline_draws, task.eval_draws = True, 2, 1
    task.on_stage_start("train", _Data(x))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:50], torch.zeros(50)), batch_size=20)
    got = task.evaluate(loader, "test")

    # the same dequantisation noise, drawn again, and scipy's densities
    g = torch.Generator().manual_seed(task.eval_seed)
    ys = []
    for _ in range(2):
        for start in range(0, 200, 500):
            noise = torch.rand(x[start:start + 500].shape, generator=g, dtype=torch.double)
            ys.append(logit_transform(dequantize(x[start:start + 500], 17, noise), 0.05)[0].flatten(1))
    y_train = torch.cat(ys).numpy()
    mean, cov = y_train.mean(0), np.cov(y_train.T, bias=True)
    g = torch.Generator().manual_seed(task.eval_seed)
    noise = torch.cat([torch.rand(x[i:min(i + 20, 50)].shape, generator=g) for i in range(0, 50, 20)]).double()
    y, ld = logit_transform(dequantize(x[:50], 17, noise), 0.05)
    y = y.flatten(1).numpy()
    full = multivariate_normal(mean, cov).logpdf(y) + ld.numpy()
    diag = norm(mean, np.sqrt(np.diag(cov))).logpdf(y).sum(1) + ld.numpy()
    expect_full = float(np.mean(-(full - 4 * math.log(17)) / (4 * math.log(2))))
    expect_diag = float(np.mean(-(diag - 4 * math.log(17)) / (4 * math.log(2))))
    assert got["gaussian_full_bpd"] == pytest.approx(expect_full, abs=1e-6)
    assert got["gaussian_diagonal_bpd"] == pytest.approx(expect_diag, abs=1e-6)
    assert got["gaussian_full_bpd"] < got["gaussian_diagonal_bpd"]  # the correlation is worth something
    assert got["uniform_bpd"] == pytest.approx(math.log2(17))


# ---------------------------------------------------------------------------------------------- the authors' L2


def _small_task(loss_unit: str = "nats", l2: float = 5e-5) -> RealNVP:
    torch.manual_seed(0)
    flow = RealNVPFlow(1, 4, 2, mid_channels=4, num_blocks=1).double()
    return RealNVP(flow, torch.optim.Adam, levels=17, baselines=False, l2=l2, loss_unit=loss_unit).double()


def test_l2_covers_the_weight_norm_magnitudes_and_the_checkerboard_scales_as_the_reference():
    """The authors' l2_reg sums the squares of every 'magnitude' (weight norm) and 'rescaling_scale' (the
    checkerboard couplings' tanh scale, initialised at 0); the channel-wise couplings' 'scale' starts at 1 and is
    outside the filter. The output convolution of s and t is weight-normed too."""
    task = _small_task()
    couplings = [m for m in task.modules() if isinstance(m, Coupling)]
    checker = [c for c in couplings if c.mask == "checkerboard"]
    channel = [c for c in couplings if c.mask == "channel"]
    assert len(checker) == 7 and len(channel) == 3
    assert all(c.scale.item() == 0.0 and c.scale_in_l2 for c in checker)
    assert all(c.scale.item() == 1.0 and not c.scale_in_l2 for c in channel)
    assert all(hasattr(c.net.out, "parametrizations") for c in couplings)
    ids = {id(p) for p in task.l2_parameters()}
    magnitudes = [p for n, p in task.named_parameters() if n.endswith("weight.original0")]
    assert len(magnitudes) == 4 * len(couplings)  # conv in, two in the block, conv out
    assert ids == {id(p) for p in magnitudes} | {id(c.scale) for c in checker}
    with torch.no_grad():
        expected = sum(float(p.pow(2).sum()) for p in magnitudes) + sum(float(c.scale) ** 2 for c in checker)
    assert task.regularizer().item() == pytest.approx(expected, rel=1e-12)
    opt = task.configure_optimizers()["model"]
    assert all(g["weight_decay"] == 0 for g in opt.param_groups)  # the penalty is in the loss, not in Adam


@pytest.mark.parametrize("loss_unit", ["nats", "bits/dim"])
def test_regularizer_gradient_equals_the_reference_formula_for_the_loss_scale(loss_unit):
    """d(loss)/dw = c * (d NLL_nats / dw + 2 * l2 * w) for the penalised w, with c = 1 for nats per image and
    1 / (D ln 2) for bits/dim: the penalty relative to the likelihood is the paper's whatever the loss's unit."""
    x = torch.rand(8, 1, 4, 4, dtype=torch.double).mul(16).round().div(16)
    grads = {}
    for l2 in (0.0, 0.3):
        task = _small_task(loss_unit, l2)
        for c in task.modules():
            if isinstance(c, Coupling) and c.scale_in_l2:
                with torch.no_grad():
                    c.scale.fill_(0.7)  # a non-zero w, so the formula's 2 l2 w is not trivially 0
        torch.manual_seed(1)  # the same dequantisation noise for both
        task.train()
        loss = next(task.training_step((x, torch.zeros(8))))[1]
        loss.backward()
        grads[l2] = ({id(p): p for p in task.l2_parameters()}, dict(task.named_parameters()))
    c = 1.0 if loss_unit == "nats" else 1.0 / (16 * math.log(2))
    penalised_names = {n for n, p in grads[0.3][1].items() if id(p) in grads[0.3][0]}
    assert penalised_names
    for name, p in grads[0.3][1].items():
        diff = p.grad - grads[0.0][1][name].grad
        expect = c * 2 * 0.3 * p.detach() if name in penalised_names else torch.zeros_like(p)
        assert torch.allclose(diff, expect, atol=1e-10, rtol=1e-7), name


def test_evaluation_averages_several_dequantisation_draws():
    task = _identity_task()
    task.eval_draws = 3
    x = torch.rand(10, 1, 2, 2, dtype=torch.double).mul(16).round().div(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(10)), batch_size=4)
    got = task.evaluate(loader, "test")
    g = torch.Generator().manual_seed(task.eval_seed)
    draws = []
    with torch.no_grad():
        for _ in range(3):
            noise = torch.cat([torch.rand(x[i:i + 4].shape, generator=g) for i in range(0, 10, 4)]).double()
            draws.append(task.bpd(x, noise).mean().item())
    assert got["eval_draws"] == 3
    assert got["bpd"] == pytest.approx(np.mean(draws), abs=1e-9)
    assert got["bpd_draw_std"] == pytest.approx(np.std(draws, ddof=1), abs=1e-9) and got["bpd_draw_std"] > 0
    assert got["bpd_draw_range"] == pytest.approx(max(draws) - min(draws), abs=1e-9)


def test_paper_scale_configs_carry_the_reference_settings():
    from mlrun import compose

    for name, blocks in (("realnvp_cifar", 8), ("realnvp_celeba", 4), ("realnvp_digits", 1)):
        cfg = compose(name)
        assert cfg.trainer.clip_grad_norm == 100, name
        assert cfg.model.l2 == 5e-5 and cfg.model.loss_unit == "nats" and "weight_decay" not in cfg.model, name
        assert "weight_decay" not in cfg.model.optimizer, name
        assert cfg.model.flow.num_blocks == blocks, name


# ---------------------------------------------------------------------------------------------- the BN guard


def test_running_batchnorm_train_and_eval_compute_the_same_map():
    """The paper's batch norm: after a training step on a batch, eval mode maps that batch exactly as training
    did, so validation uses the statistics the loss was optimised with. Plain batch norm does not."""
    x = torch.randn(16, 3, 4, 4, dtype=torch.double) * 3 + 1
    for mode, same in (("running", True), ("batch", False)):
        bn = FlowBatchNorm(3, decay=0.9, mode=mode).double()
        bn.train()
        for i in range(5):  # the layer's input drifts, as it does while the layers below it learn
            bn.forward_flow(x * (1 + 0.5 * i) + i)
        y_train, ld_train = bn.forward_flow(x * 3.5 + 5)
        bn.eval()
        y_eval, ld_eval = bn.forward_flow(x * 3.5 + 5)
        assert torch.allclose(y_train, y_eval) is same, mode
        assert torch.allclose(ld_train, ld_eval) is same, mode


def test_plain_batchnorm_loss_ignores_the_drift_that_ruins_eval():
    """The failure: with batch statistics the training loss cannot see a shift of the layer's input, so nothing
    stops the layers below from drifting; the running averages lag and eval-mode outputs blow up. The paper's
    variant normalises with the running average, so the training loss itself pays for the shift."""

    def nll(bn: FlowBatchNorm, v: torch.Tensor) -> float:
        y, ld = bn.forward_flow(v)
        return float((0.5 * y.pow(2).flatten(1).sum(1) - ld).mean())

    x = torch.randn(64, 2, 4, 4, dtype=torch.double)
    shift = {}
    for mode in ("batch", "running"):
        bn = FlowBatchNorm(2, decay=0.8, mode=mode).double().train()
        with torch.no_grad():
            for _ in range(5):
                bn.forward_flow(x)
            state = {k: v.clone() for k, v in bn.state_dict().items()}
            shifted = nll(bn, x + 5.0)
            bn.load_state_dict(state)  # the same starting statistics for both
            train = shifted - nll(bn, x)
            bn.load_state_dict(state)
            bn.eval()
            evaluation = nll(bn, x + 5.0) - nll(bn, x)
        shift[mode] = (train, evaluation)
    assert shift["batch"][0] == pytest.approx(0.0, abs=1e-9)  # training is blind to the shift...
    assert shift["batch"][1] > 100  # ...that costs eval hundreds of nats
    assert shift["running"][0] > 100  # the paper's variant: training sees it


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["running", "batch"])
def test_trained_flow_scores_a_batch_the_same_in_train_and_eval_mode_only_with_the_papers_batchnorm(mode):
    """End to end on the 8x8 digits: after training, a training-mode pass over a batch and an eval-mode pass over
    the same batch give the same bits/dim with the paper's batch norm (validation measures the map the loss
    trained), and differ with plain batch norm (validation measures a map built from stale averages)."""
    from mlrun.datasets.digits import Digits

    torch.manual_seed(0)
    x = Digits(batch_size=64).dataset("train").tensors[0][:512]
    flow = RealNVPFlow(1, 8, 2, mid_channels=8, num_blocks=1, bn_mode=mode, bn_decay=0.9)
    task = RealNVP(flow, lambda p: torch.optim.Adam(p, lr=3e-3), levels=17, baselines=False)
    opt = task.configure_optimizers()["model"]
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = task.bpd(x[torch.randint(0, len(x), (64,), generator=g)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch, noise = x[:64], torch.rand(x[:64].shape, generator=g)
    with torch.no_grad():
        train_bpd = task.train().bpd(batch, noise).mean().item()
        eval_bpd = task.eval().bpd(batch, noise).mean().item()
    assert 1.5 < train_bpd < 3.0  # it learned (uniform: 4.09)
    if mode == "running":
        assert eval_bpd == pytest.approx(train_bpd, abs=1e-5)
    else:
        assert abs(eval_bpd - train_bpd) > 1e-3, (train_bpd, eval_bpd)  # 100x the running mode's tolerance


# ---------------------------------------------------------------------------------------------- loaders, steps


def _one_step(experiment: str, fixture, tmp_path, extra: list[str]) -> dict:
    from mlrun import run

    root = tmp_path / "data"
    fixture(root)
    overrides = ["logger=none", "trainer.max_steps=1", "trainer.log_every=1", "trainer.progress=none",
                 "hardware.threads=1", f"dataset.root={root}", "model.flow.mid_channels=4", "model.flow.num_blocks=1",
                 *extra]
    return run(experiment, overrides, run_dir=tmp_path / "run")


def test_cifar_loader_and_one_step_on_the_pickle_fixture(tmp_path, monkeypatch):
    from mlrun.datasets.vision import CIFAR10, write_cifar10_fixture

    monkeypatch.chdir(tmp_path)
    write_cifar10_fixture(tmp_path / "c", per_batch=4)
    data = CIFAR10(root=str(tmp_path / "c"), batch_size=4)
    x, _ = data.dataset("test")[0]
    assert x.shape == (3, 32, 32)
    k = torch.round(x * 255)
    assert torch.allclose(x * 255, k, atol=1e-4)  # on the 256-level grid Real NVP dequantises
    res = _one_step("realnvp_cifar", write_cifar10_fixture, tmp_path,
                    ["dataset.batch_size=4", "model.baseline_draws=1"])
    assert res["status"] == "completed"
    m = res["metrics"]
    assert m["test/uniform_bpd"] == 8.0
    assert math.isfinite(m["test/bpd"]) and math.isfinite(m["test/gaussian_full_bpd"])
    assert (tmp_path / "run" / "figures" / "samples.png").exists()


def test_celeba_loader_and_one_step_on_the_jpeg_fixture(tmp_path, monkeypatch):
    from mlrun.datasets.vision import write_celeba_fixture

    monkeypatch.chdir(tmp_path)
    res = _one_step("realnvp_celeba", write_celeba_fixture, tmp_path,
                    ["dataset.batch_size=2", "model.flow.num_scales=2"])
    assert res["status"] == "completed"
    assert math.isfinite(res["metrics"]["test/bpd"])
    assert "test/gaussian_full_bpd" not in res["metrics"]


def test_summarize_and_figure(tmp_path):
    from mlrun.models.realnvp import study_figure, summarize

    runs, groups = [], {}
    for label, b in (("affine", 2.0), ("additive", 2.4)):
        for s in range(3):
            m = {"test/bpd": b + 0.01 * s, "test/gaussian_full_bpd": 2.8, "test/gaussian_diagonal_bpd": 3.3,
                 "test/uniform_bpd": math.log2(17)}
            runs.append({"label": label, "seed": s, "status": "completed", "metrics": m})
        groups[label] = {k: {"median": v if k != "test/bpd" else b + 0.01} for k, v in m.items()}
    study = {"runs": runs, "groups": groups, "experiment": "realnvp_digits"}
    d = summarize(study)
    assert d == pytest.approx({"realnvp_bpd": 2.01, "nice_bpd": 2.41, "gaussian_full_bpd": 2.8,
                               "gaussian_diagonal_bpd": 3.3, "uniform_bpd": math.log2(17)})
    paths = study_figure(study, tmp_path)
    assert paths[0].exists() and paths[0].stat().st_size > 1000
