"""MAML / first-order MAML / iMAML (models/meta.py): meta-gradients against closed forms and explicit unrolls,
conjugate gradient on a known system, and the saved-tensor memory meter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jvp

from mlrun.models.meta import (
    IMAML,
    MAML,
    ConvLearner,
    SavedTensorMeter,
    conjugate_gradient,
    hessian_vector_product,
    imaml_meta_gradient,
    memory_growth,
    params_of,
    pixel_nearest_neighbour,
    proximal_gd,
    proximal_newton_cg,
    saved_tensor_bytes,
    study_figure,
    summarize,
)


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(fa @ fb / (fa.norm() * fb.norm()))


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred.squeeze(-1) - y).pow(2).mean()


def episode(n_way=5, shot=1, queries=1, size=8, seed=0, tasks=None):
    g = torch.Generator().manual_seed(seed)
    shape = (tasks,) if tasks else ()
    return {
        "support": torch.randn(*shape, n_way * shot, 1, size, size, generator=g),
        "support_y": torch.arange(n_way).repeat_interleave(shot).expand(*shape, -1).clone(),
        "query": torch.randn(*shape, n_way * queries, 1, size, size, generator=g),
        "query_y": torch.arange(n_way).repeat_interleave(queries).expand(*shape, -1).clone(),
    }


# ---------------------------------------------------------------------------------------------- the learner


@pytest.mark.parametrize(("size", "downsample", "features"), [(8, "pool", 1), (28, "stride", 4), (84, "pool", 25)])
def test_conv_learner_shapes_and_batch_statistics(size, downsample, features):
    torch.manual_seed(0)
    net = ConvLearner(in_channels=1, channels=8, n_way=5, image_size=size, downsample=downsample)
    assert net.head.in_features == 8 * features
    assert list(net.buffers()) == []  # no running statistics: any parameter dict is a complete state
    x = torch.randn(6, 1, size, size)
    out = net(x)
    assert out.shape == (6, 5)
    net.eval()  # batch norm still uses the batch's statistics at test time, as in MAML
    torch.testing.assert_close(net(x), out)


# ---------------------------------------------------------------------------------------------- CG and HVP


def test_conjugate_gradient_solves_a_known_spd_system():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(1.0, 50.0, 30, dtype=torch.float64)) @ q.T
    x_true = torch.randn(30, generator=g, dtype=torch.float64)
    b = a @ x_true
    x = conjugate_gradient(lambda v: a @ v, b, steps=100, tol=1e-12)
    assert float((a @ x - b).norm()) < 1e-6
    assert float((x - x_true).norm()) < 1e-6
    # in exact arithmetic CG finishes in as many steps as there are distinct eigenvalues
    d = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).repeat(10))
    y = conjugate_gradient(lambda v: d @ v, b, steps=3)
    assert float((d @ y - b).norm()) < 1e-6


def test_hessian_vector_product_matches_torch_func():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}

    def loss(p):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    leaves = list(params.values())
    g = torch.autograd.grad(loss(params), leaves, create_graph=True)
    ours = hessian_vector_product(g, leaves, torch.cat([t.reshape(-1) for t in v.values()]))
    _, ref = jvp(grad(loss), ({n: p.detach() for n, p in params.items()},), (v,))
    torch.testing.assert_close(ours, torch.cat([t.reshape(-1) for t in ref.values()]))


# ---------------------------------------------------------------------------------------------- iMAML


def _regression_task(d=5, n_s=8, n_q=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    w = torch.randn(d, generator=g, dtype=f64)
    xs, xq = torch.randn(n_s, d, generator=g, dtype=f64), torch.randn(n_q, d, generator=g, dtype=f64)
    ys = xs @ w + 0.1 * torch.randn(n_s, generator=g, dtype=f64)
    yq = xq @ w + 0.1 * torch.randn(n_q, generator=g, dtype=f64)
    return (xs, ys), (xq, yq)


def test_imaml_meta_gradient_matches_the_closed_form_on_linear_regression():
    """Linear regression with squared loss: H is constant, the inner problem and the meta-gradient have closed forms,
    and (I + H/λ)^-1 ∇L_test(φ*) must equal the total derivative of L_test(φ*(θ)) (here by autograd through the
    closed-form φ*)."""
    torch.manual_seed(0)
    d, lam = 5, 2.0
    net = nn.Linear(d, 1).double()
    theta = params_of(net)
    (xs, ys), (xq, yq) = _regression_task(d)
    a_s = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)  # [x, 1] @ [w, b]
    a_q = torch.cat([xq, torch.ones(len(xq), 1, dtype=torch.float64)], 1)
    h = 2 * a_s.T @ a_s / len(xs)
    t = torch.cat([net.weight.detach().reshape(-1), net.bias.detach()]).requires_grad_()
    phi_star = torch.linalg.solve(h + lam * torch.eye(d + 1, dtype=torch.float64), lam * t + 2 * a_s.T @ ys / len(xs))
    test_loss = (a_q @ phi_star - yq).pow(2).mean()
    exact = torch.autograd.grad(test_loss, t)[0]
    g_test = 2 * a_q.T @ (a_q @ phi_star.detach() - yq) / len(xq)
    torch.testing.assert_close(exact, torch.linalg.solve(torch.eye(d + 1, dtype=torch.float64) + h / lam, g_test))

    grads, q_loss, _ = imaml_meta_gradient(net, theta, (xs, ys), (xq, yq), steps=400, lr=0.1, lam=lam, cg_steps=5,
                                           loss_fn=mse)
    ours = torch.cat([grads[0].reshape(-1), grads[1]])
    assert cosine([ours], [exact]) >= 0.99  # the paper's 5 CG steps
    grads, _, _ = imaml_meta_gradient(net, theta, (xs, ys), (xq, yq), steps=400, lr=0.1, lam=lam, cg_steps=d + 1,
                                      loss_fn=mse)
    torch.testing.assert_close(torch.cat([grads[0].reshape(-1), grads[1]]), exact)  # CG is exact after dim steps
    torch.testing.assert_close(q_loss, test_loss.detach(), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(("cg_damping", "lam_damping"), [(0.0, 0.0), (1.0, 10.0)])
def test_imaml_meta_gradient_matches_exact_solve_on_softmax_regression(cg_damping, lam_damping):
    """Cross-entropy (H depends on φ): the CG answer against the dense (I + H/λ)^-1 ∇L_test at the same φ, with H
    from torch.func.hessian (and the damped system of the authors' code)."""
    torch.manual_seed(0)
    lam = 2.0
    net = nn.Linear(6, 4)
    theta = params_of(net)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 6, generator=g), torch.arange(4).repeat(2)
    xq, yq = torch.randn(12, 6, generator=g), torch.arange(4).repeat(3)
    grads, _, _ = imaml_meta_gradient(net, theta, (xs, ys), (xq, yq), steps=16, lr=0.1, lam=lam, cg_steps=5,
                                      loss_fn=F.cross_entropy, cg_damping=cg_damping, lam_damping=lam_damping)
    phi = {n: p.detach() for n, p in proximal_gd(net, theta, xs, ys, 16, 0.1, lam, F.cross_entropy).items()}
    names = list(phi)
    flat = torch.cat([phi[n].reshape(-1) for n in names])

    def unpack(v):
        out, i = {}, 0
        for n in names:
            out[n] = v[i : i + phi[n].numel()].view_as(phi[n])
            i += phi[n].numel()
        return out

    def support_loss(v):
        return F.cross_entropy(functional_call(net, unpack(v), (xs,)), ys)

    def query_loss(v):
        return F.cross_entropy(functional_call(net, unpack(v), (xq,)), yq)

    h = hessian(support_loss)(flat)
    a = (1 + cg_damping) * torch.eye(len(flat)) + h / (lam + lam_damping)
    exact = torch.linalg.solve(a, grad(query_loss)(flat))
    assert cosine([torch.cat([t.reshape(-1) for t in grads])], [exact]) >= 0.99


def test_proximal_gd_converges_to_the_regularised_minimiser():
    torch.manual_seed(0)
    net = nn.Linear(5, 1).double()
    (xs, ys), _ = _regression_task(5)
    phi = proximal_gd(net, params_of(net), xs, ys, steps=400, lr=0.1, lam=2.0, loss_fn=mse)
    a = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    theta = torch.cat([net.weight.detach().reshape(-1), net.bias.detach()])
    star = torch.linalg.solve(2 * a.T @ a / len(xs) + 2.0 * torch.eye(6, dtype=torch.float64),
                              2.0 * theta + 2 * a.T @ ys / len(xs))
    torch.testing.assert_close(torch.cat([phi["weight"].reshape(-1), phi["bias"]]), star)
    assert all(p.grad_fn is None for p in phi.values())  # no graph kept through the inner loop


class _Quadratic(nn.Module):
    """L(φ) = ½ φᵀAφ - bᵀφ through the learner interface: forward returns φ, the loss function does the rest."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return self.phi


def _quadratic(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.1, 20.0, d, dtype=torch.float64)) @ q.T
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return a, b, (lambda phi, _y: 0.5 * phi @ a @ phi - b @ phi)


def test_hessian_free_inner_solver_reaches_the_closed_form_on_a_quadratic():
    """min_φ ½φᵀAφ - bᵀφ + (λ/2)||φ - θ||² has the solution (A + λI)^-1 (b + λθ): one Newton step whose CG runs
    dim steps lands on it (unit step accepted by the line search); with the paper's 5 CG steps a few Newton steps
    converge to it."""
    torch.manual_seed(0)
    d, lam = 12, 2.0
    net = _Quadratic(d)
    a, b, loss = _quadratic(d)
    theta = params_of(net)
    star = torch.linalg.solve(a + lam * torch.eye(d, dtype=torch.float64), b + lam * net.phi.detach())
    x = torch.zeros(1)
    one = proximal_newton_cg(net, theta, x, None, steps=1, cg_steps=d, lam=lam, loss_fn=loss)
    torch.testing.assert_close(one["phi"].detach(), star)
    few = proximal_newton_cg(net, theta, x, None, steps=6, cg_steps=5, lam=lam, loss_fn=loss)
    torch.testing.assert_close(few["phi"].detach(), star, atol=1e-8, rtol=1e-6)
    gd = proximal_gd(net, theta, x, None, steps=6, lr=0.04, lam=lam, loss_fn=loss)  # 6 GD steps are far from it
    assert float((gd["phi"].detach() - star).norm()) > 100 * float((few["phi"].detach() - star).norm())
    assert all(p.grad_fn is None and p.requires_grad for p in few.values())


def test_hessian_free_inner_solver_minimises_the_proximal_objective_of_a_network():
    """Cross-entropy on a small net (indefinite H possible): each Newton step decreases the proximal objective, and a
    few steps land where hundreds of GD steps converge."""
    torch.manual_seed(0)
    lam = 2.0
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    theta = params_of(net)
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.arange(4).repeat(3)

    def objective(phi):
        prox = sum((p - theta[n].detach()).pow(2).sum() for n, p in phi.items())
        return float((F.cross_entropy(functional_call(net, phi, (xs,)), ys) + 0.5 * lam * prox).detach())

    values = [objective({n: p.detach() for n, p in theta.items()})]
    for k in (1, 2, 3):
        values.append(objective(proximal_newton_cg(net, theta, xs, ys, k, 5, lam, F.cross_entropy)))
    assert values[0] > values[1] > values[2] >= values[3]
    ref = proximal_gd(net, theta, xs, ys, steps=2000, lr=0.05, lam=lam, loss_fn=F.cross_entropy)
    hf = proximal_newton_cg(net, theta, xs, ys, 8, 10, lam, F.cross_entropy)
    assert objective(hf) == pytest.approx(objective(ref), abs=1e-7)
    for n in ref:
        torch.testing.assert_close(hf[n].detach(), ref[n].detach(), atol=1e-4, rtol=1e-3)


def test_imaml_hf_meta_gradient_matches_the_closed_form_on_linear_regression():
    """iMAML-HF: the Newton-CG inner solve lands on φ* of linear regression in one step (CG exact after dim steps),
    so the implicit meta-gradient equals the closed form, as iMAML-GD's does after many steps."""
    torch.manual_seed(0)
    d, lam = 5, 2.0
    net = nn.Linear(d, 1).double()
    (xs, ys), (xq, yq) = _regression_task(d)
    gd, _, _ = imaml_meta_gradient(net, params_of(net), (xs, ys), (xq, yq), steps=400, lr=0.1, lam=lam,
                                   cg_steps=d + 1, loss_fn=mse)
    hf, _, _ = imaml_meta_gradient(net, params_of(net), (xs, ys), (xq, yq), steps=1, lr=0.1, lam=lam,
                                   cg_steps=d + 1, loss_fn=mse, inner_solver="hf", hf_cg_steps=d + 1)
    for a, b in zip(hf, gd):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="inner_solver"):
        IMAML(ConvLearner(channels=4, image_size=8), adam, inner_solver="newton")


# ---------------------------------------------------------------------------------------------- MAML


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _unrolled(w1, b1, w2, b2, xs, ys, xq, yq, steps, lr, create_graph):
    """MAML written out by hand: K explicit SGD steps on explicit weights, then the query loss."""
    ws = [w1, b1, w2, b2]
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(torch.tanh(F.linear(xs, ws[0], ws[1])), ws[2], ws[3]), ys)
        gs = torch.autograd.grad(loss, ws, create_graph=create_graph)
        ws = [w - lr * g for w, g in zip(ws, gs)]
    return F.cross_entropy(F.linear(torch.tanh(F.linear(xq, ws[0], ws[1])), ws[2], ws[3]), yq)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_autograd_through_an_unrolled_loop(first_order):
    torch.manual_seed(0)
    model = MAML(_MLP(), adam, inner_steps=3, inner_lr=0.5, first_order=first_order)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(6, 4, generator=g), torch.arange(3).repeat(2)
    xq, yq = torch.randn(9, 4, generator=g), torch.arange(3).repeat(3)
    grads, loss, _ = model.meta_gradient((xs, ys), (xq, yq), steps=3)

    leaves = [p.detach().clone().requires_grad_() for p in model.learner.parameters()]
    if first_order:  # the query gradient at φ, where φ came from steps whose gradients are constants
        phi = [p.detach().clone() for p in leaves]
        with torch.enable_grad():
            phi_leaves = [p.requires_grad_() for p in phi]
            for _ in range(3):
                loss_s = F.cross_entropy(F.linear(torch.tanh(F.linear(xs, phi[0], phi[1])), phi[2], phi[3]), ys)
                gs = torch.autograd.grad(loss_s, phi)
                phi = [(w - 0.5 * gg).detach().requires_grad_() for w, gg in zip(phi, gs)]
            del phi_leaves
        ref_loss = F.cross_entropy(F.linear(torch.tanh(F.linear(xq, phi[0], phi[1])), phi[2], phi[3]), yq)
        ref = torch.autograd.grad(ref_loss, phi)
    else:
        ref_loss = _unrolled(*leaves, xs, ys, xq, yq, steps=3, lr=0.5, create_graph=True)
        ref = torch.autograd.grad(ref_loss, leaves)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss.detach())
    if not first_order:  # and second order really differs from first order here
        fo = MAML(model.learner, adam, inner_steps=3, inner_lr=0.5, first_order=True)
        assert cosine(fo.meta_gradient((xs, ys), (xq, yq), 3)[0], grads) < 0.999


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_training_step_yields_the_mean_query_loss_over_the_meta_batch(first_order):
    """The training step runs every task's inner loop at once (task-batched weights); its loss and θ's gradient
    equal the per-task reference `query_loss` / `meta_gradient` averaged over the meta-batch."""
    torch.manual_seed(0)
    model = MAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=2, inner_lr=0.4,
                 first_order=first_order).double()  # float64: the two orders of summation agree to 1e-12
    batch = {k: v.double() if v.is_floating_point() else v for k, v in episode(tasks=3).items()}
    name, loss = next(iter(model.training_step(batch)))
    assert name == "meta" and loss.requires_grad
    loss.backward()
    ref = [model.meta_gradient((batch["support"][i], batch["support_y"][i]),
                               (batch["query"][i], batch["query_y"][i]), 2) for i in range(3)]
    torch.testing.assert_close(loss.detach(), torch.stack([r[1] for r in ref]).mean())
    for j, p in enumerate(model.learner.parameters()):
        torch.testing.assert_close(p.grad, sum(r[0][j] for r in ref) / 3, rtol=1e-9, atol=1e-12)
    acc = torch.stack([(r[2].argmax(1) == batch["query_y"][i]).float().mean() for i, r in enumerate(ref)]).mean()
    torch.testing.assert_close(model._step_logs["query_acc"], acc)


@pytest.mark.parametrize(("steps", "cg_damping", "lam_damping", "solver"),
                         [(3, 0.0, 0.0, "gd"), (16, 1.0, 10.0, "gd"), (2, 0.0, 0.0, "hf")])
def test_imaml_training_step_sets_the_mean_meta_gradient_and_yields_none(steps, cg_damping, lam_damping, solver):
    """The training step (iMAML-GD vectorised over the tasks with torch.func, iMAML-HF task by task) against the
    per-task reference `meta_gradient`: the same mean meta-gradient, loss and accuracy, in float64 (in float32
    undamped CG on an indefinite system amplifies the different summation orders' rounding to ~1e-5)."""
    torch.manual_seed(0)
    model = IMAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=steps, inner_lr=0.1, lam=2.0, cg_steps=5,
                  cg_damping=cg_damping, lam_damping=lam_damping, inner_solver=solver).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in episode(tasks=3).items()}
    out = list(model.training_step(batch))
    assert out == [("meta", None)]
    ref = [model.meta_gradient((batch["support"][i], batch["support_y"][i]),
                               (batch["query"][i], batch["query_y"][i]), steps) for i in range(3)]
    for j, p in enumerate(model.learner.parameters()):
        torch.testing.assert_close(p.grad, sum(r[0][j] for r in ref) / 3, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model._step_logs["meta_loss"], torch.stack([r[1] for r in ref]).mean())
    acc = torch.stack([(r[2].argmax(1) == batch["query_y"][i]).float().mean() for i, r in enumerate(ref)]).mean()
    torch.testing.assert_close(model._step_logs["query_acc"], acc)
    assert set(model._step_logs) == {"meta_loss", "query_acc"}


def test_imaml_single_episode_batch_is_one_task():
    torch.manual_seed(0)
    model = IMAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=2, inner_lr=0.1, lam=2.0, cg_steps=3)
    batch = episode()
    list(model.training_step(batch))
    ref = model.meta_gradient((batch["support"], batch["support_y"]), (batch["query"], batch["query_y"]), 2)[0]
    for p, r in zip(model.learner.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------- memory


def test_saved_tensor_meter_counts_each_storage_once_and_forgets_freed_graphs():
    x = torch.randn(100, requires_grad=True)  # 400 bytes
    w = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x * w  # mul saves both operands
        assert meter.current == 800
        z = (x * w).sum()  # the same storages again: no new bytes
        assert meter.current == 800
        del y, z
        assert meter.current == 0
        for _ in range(5):  # a loop that frees each step's graph peaks at one step (a and exp(a): 400 bytes)
            a = torch.randn(50, requires_grad=True)
            torch.autograd.grad((a * a.exp()).sum(), a)
            assert meter.current == 0
    assert meter.peak == 800
    assert meter.total > 800


def test_maml_memory_grows_with_inner_steps_and_imaml_memory_does_not():
    torch.manual_seed(0)
    batch = episode(queries=1)
    probe = ((batch["support"], batch["support_y"]), (batch["query"], batch["query_y"]))
    saved = {}
    for model in (MAML(ConvLearner(channels=8, image_size=8), adam, 5, 0.4),
                  MAML(ConvLearner(channels=8, image_size=8), adam, 5, 0.4, first_order=True, variant="fomaml"),
                  IMAML(ConvLearner(channels=8, image_size=8), adam, 5, 0.1)):
        model._probe = probe
        prof = model.memory_profile([1, 5, 20])
        saved[model.variant] = [prof[f"saved_mib_k{k}"] for k in (1, 5, 20)]
    m = saved["maml"]
    assert m[0] < m[1] < m[2]
    # linear in K: the per-step increment is the same between 1->5 and 5->20
    assert math.isclose((m[2] - m[1]) / 15, (m[1] - m[0]) / 4, rel_tol=0.05)
    growth = memory_growth(dict(zip((1, 5, 20), m)))
    assert growth["saved_step_spread"] == pytest.approx(max((m[2] - m[1]) / 15, (m[1] - m[0]) / 4)
                                                        / min((m[2] - m[1]) / 15, (m[1] - m[0]) / 4))
    assert growth["saved_step_over_first"] > 0.05
    for name in ("fomaml", "imaml"):
        assert max(saved[name]) == min(saved[name]) > 0
    assert saved_tensor_bytes(lambda: None) == 0


def test_memory_growth_hand_computed():
    out = memory_growth({1: 2.0, 5: 6.0, 10: 11.0, 20: 23.0})  # increments per step: 1.0, 1.0, 1.2
    assert out == pytest.approx({"saved_max_over_min": 11.5, "saved_step_spread": 1.2, "saved_step_over_first": 0.5})
    flat = memory_growth({1: 3.0, 20: 3.0})
    assert flat["saved_max_over_min"] == 1.0 and math.isnan(flat["saved_step_spread"])
    assert memory_growth({1: 3.0}) == {}


# ---------------------------------------------------------------------------------------------- study


def test_summarize_and_figure(tmp_path):
    def run(label, seed, acc, k1=None, k20=None):
        metrics = {"test/acc": acc, "test/acc_ci95": 0.01, "test/pixel_acc": 0.7}
        if k1 is not None:
            metrics.update({"test/saved_mib_k1": k1, "test/saved_mib_k20": k20, "test/saved_max_over_min": k20 / k1})
        return {"status": "completed", "label": label, "seed": seed, "metrics": metrics}

    runs = [run("maml", 0, 0.8, 1.0, 12.0), run("maml", 1, 0.82, 1.0, 12.0), run("imaml", 0, 0.79, 2.0, 2.0),
            run("untrained", 0, 0.7), {"status": "failed", "label": "imaml", "seed": 1, "metrics": {}}]
    out = summarize({"runs": runs})
    assert out["maml/test/acc"] == pytest.approx(0.81)  # the median of the seeds given
    assert out["imaml/test/saved_max_over_min"] == 1.0 and out["maml/test/saved_mib_k20"] == 12.0
    assert out["untrained/test/acc"] == 0.7 and "untrained/test/saved_mib_k1" not in out
    assert out["pixels/test/acc"] == 0.7
    assert summarize({"runs": runs[:1]})["maml/test/acc"] == 0.8  # one seed's runs: that seed's values
    paths = study_figure({"runs": runs}, tmp_path)
    assert paths[0].exists() and paths[0].stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- evaluation


def test_adapt_takes_sgd_steps_from_theta_and_evaluate_scores_each_episode():
    from mlrun.datasets.fewshot import FewShotDigits

    torch.manual_seed(0)
    data = FewShotDigits(q_queries=1, test_queries=3, test_episodes=4, val_episodes=2, tasks_per_item=2)
    model = MAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=1, inner_lr=0.4, memory_steps=[1, 3])
    model.on_stage_start("train", data)
    (xs, ys), (xq, _) = model._probe
    assert xs.shape == (5, 1, 8, 8) and xq.shape == (5, 1, 8, 8)  # one task of the training meta-batch
    episodes = [data.dataset("test")[i] for i in range(4)]

    ep = episodes[0]
    loss = F.cross_entropy(model.learner(ep["support"]), ep["support_y"])
    by_hand = [p - 0.4 * g for p, g in zip(model.learner.parameters(),
                                           torch.autograd.grad(loss, list(model.learner.parameters())))]
    for a, b in zip(model.adapt((ep["support"], ep["support_y"]), 1).values(), by_hand):
        torch.testing.assert_close(a, b)

    with torch.no_grad():
        out = model.evaluate(episodes, "test")
    accs = []
    for ep in episodes:
        phi = model.adapt((ep["support"], ep["support_y"]), 1)
        accs.append(float((functional_call(model.learner, phi, (ep["query"],)).argmax(1) == ep["query_y"]).float()
                          .mean()))
    assert out["acc"] == pytest.approx(sum(accs) / 4)
    assert out["acc_ci95"] == pytest.approx(1.96 * torch.tensor(accs).std().item() / 2)
    pixel = [float((pixel_nearest_neighbour((ep["support"], ep["support_y"]), ep["query"]) == ep["query_y"]).float()
                   .mean()) for ep in episodes]
    assert out["pixel_acc"] == pytest.approx(sum(pixel) / 4)
    assert 0 < out["saved_mib_k1"] < out["saved_mib_k3"] and "saved_step_spread" in out
    assert "saved_mib_k1" not in model.evaluate(episodes, "val")


def test_every_method_adapts_the_same_way_at_test_time():
    """The test-time adaptation is the shared one (steps, lr, λ), whatever the method trains with: MAML and iMAML
    holding the same θ give the same φ and the same scores; extra adaptations are scored beside it."""
    torch.manual_seed(0)
    maml = MAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=5, inner_lr=0.4, test_steps=3, test_lr=0.1,
                test_adaptations={"prox": {"steps": 2, "lr": 0.1, "lam": 2.0}})
    imaml = IMAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=16, inner_lr=0.1, lam=1.0, test_steps=3,
                  test_lr=0.1, test_adaptations={"prox": {"steps": 2, "lr": 0.1, "lam": 2.0}})
    imaml.learner.load_state_dict(maml.learner.state_dict())
    ep = episode(queries=3)
    support = (ep["support"], ep["support_y"])
    for a, b in zip(maml.adapt(support).values(), imaml.adapt(support).values()):
        torch.testing.assert_close(a, b)
    by_hand = params_of(maml.learner)
    for _ in range(3):  # λ = 0: plain SGD steps
        gs = torch.autograd.grad(F.cross_entropy(functional_call(maml.learner, by_hand, (support[0],)), support[1]),
                                 list(by_hand.values()))
        by_hand = {n: p - 0.1 * g for (n, p), g in zip(by_hand.items(), gs)}
    for a, b in zip(maml.adapt(support).values(), by_hand.values()):
        torch.testing.assert_close(a, b)
    prox = proximal_gd(maml.learner, params_of(maml.learner), *support, 2, 0.1, 2.0, F.cross_entropy)
    for a, b in zip(maml.adapt(support, 2, 0.1, 2.0).values(), prox.values()):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        out_m, out_i = maml.evaluate([ep], "test"), imaml.evaluate([ep], "test")
    assert {k: out_m[k] for k in ("acc", "acc_prox", "pixel_acc")} == {k: out_i[k] for k in ("acc", "acc_prox",
                                                                                             "pixel_acc")}
    assert "acc_prox" in maml.evaluate([ep], "val")


def test_vectorised_adaptation_equals_adapting_each_task():
    """adapt_many (vmap over tasks) gives each task the φ of `adapt`, and evaluate scores the same whatever the chunk
    (a change of episode shape starts a new chunk)."""
    torch.manual_seed(0)
    model = MAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=5, test_steps=4, test_lr=0.2, test_lam=0.5)
    batch = episode(tasks=3, queries=2)
    many = model.adapt_many((batch["support"], batch["support_y"]))
    for i in range(3):
        one = model.adapt((batch["support"][i], batch["support_y"][i]))
        for n, p in one.items():
            torch.testing.assert_close(many[n][i], p, rtol=1e-4, atol=1e-5)
    episodes = [episode(queries=3, seed=i) for i in range(4)] + [episode(n_way=3, queries=3, seed=9)]
    with torch.no_grad():
        by_one = MAML(model.learner, adam, test_steps=4, test_lr=0.2, eval_chunk=1).evaluate(episodes, "val")
        by_three = MAML(model.learner, adam, test_steps=4, test_lr=0.2, eval_chunk=3).evaluate(episodes, "val")
    assert by_one == pytest.approx(by_three, rel=1e-5)


def test_untrained_baseline_takes_no_meta_step_and_reports_no_memory():
    torch.manual_seed(0)
    model = MAML(ConvLearner(channels=4, image_size=8), adam, inner_steps=1, meta_train=False, variant="untrained")
    batch = episode(tasks=2)
    assert list(model.training_step(batch)) == []
    model._probe = ((batch["support"][0], batch["support_y"][0]), (batch["query"][0], batch["query_y"][0]))
    with torch.no_grad():
        out = model.evaluate([episode(queries=2)], "test")
    assert "acc" in out and not any(k.startswith("saved_") for k in out)


def test_pixel_nearest_neighbour_hand_computed():
    xs = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]).view(3, 1, 1, 2)
    ys = torch.tensor([2, 0, 1])
    xq = torch.tensor([[0.9, 1.2], [4.0, 6.0], [0.1, -0.2]]).view(3, 1, 1, 2)
    assert pixel_nearest_neighbour((xs, ys), xq).tolist() == [0, 1, 2]


def test_task_batch_stacks_tasks_whatever_an_example_is():
    from mlrun.models.meta import task_batch

    def batch(lead, example):
        return {"support": torch.randn(*lead, 5, *example), "support_y": torch.zeros(*lead, 5, dtype=torch.long),
                "query": torch.randn(*lead, 3, *example), "query_y": torch.zeros(*lead, 3, dtype=torch.long)}

    for lead, example, tasks in [((), (1, 8, 8), 1), ((4,), (1, 8, 8), 4), ((2, 3), (6,), 6)]:
        (xs, ys), (xq, yq) = task_batch(batch(lead, example))
        assert xs.shape == (tasks, 5, *example) and ys.shape == (tasks, 5)
        assert xq.shape == (tasks, 3, *example) and yq.shape == (tasks, 3)
