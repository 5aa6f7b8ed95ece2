"""MAML (Finn et al. 2017), first-order MAML and iMAML (Rajeswaran et al. 2019): gradient-based meta-learning.

Both learn an initialisation θ of a small conv net (`ConvLearner`) such that a few gradient steps on a task's
support set give parameters φ that classify its query set well.

- MAML differentiates the query loss through K inner SGD steps: the graph of every step is kept, so the memory of
  one meta-gradient grows linearly with K. First-order MAML drops the second-order terms (dφ/dθ = I).
- iMAML's inner problem is  min_φ L_support(φ) + (λ/2)||φ - θ||², solved with no graph kept: by K steps of gradient
  descent (iMAML-GD) or by a few Newton steps whose directions come from conjugate gradient on Hessian-vector
  products, with a backtracking line search (iMAML-HF, the paper's Hessian-free solver). At its solution
  dφ/dθ = (I + H/λ)^-1 with H the Hessian of L_support at φ, so the meta-gradient is the solution v of
  (I + H/λ) v = ∇L_query(φ), found by conjugate gradient from Hessian-vector products. The memory is that of one
  forward/backward, whatever K.

Every method is evaluated by the same test-time adaptation (`MetaLearner.adapt`: K steps of gradient descent from θ
on the support loss plus an optional proximal term, λ = 0 being plain SGD), so a comparison of methods compares
their θ, not their adaptation. `meta_train=False` leaves θ at its initialisation: the untrained baseline scored by
that same adaptation. Evaluation also scores raw-pixel nearest neighbour on the same episodes.

The learner is called statelessly with `torch.func.functional_call`, so adapted weights are plain tensors. Gradients
and Hessian-vector products use `torch.autograd.grad` (Pearlmutter's double backward), not `torch.func.grad/jvp`:
torch.func refuses to run under `torch.autograd.graph.saved_tensors_hooks`, and those hooks are how we measure the
memory of a meta-gradient without a GPU (`saved_tensor_bytes`). Tests check these HVPs against torch.func's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mlrun.task import Task

LossFn = Callable[[Tensor, Tensor], Tensor]
Params = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------- the learner


class ConvLearner(nn.Module):
    """The 4-block learner of MAML and iMAML: [conv 3x3, batch norm, ReLU, 2x downsampling] x blocks + linear.

    Batch norm keeps no running statistics (`track_running_stats=False`): like the papers' code it normalises with
    the statistics of the batch at hand, in training and at test time alike (transductive), and its scale and shift
    are meta-learned and adapted like any other weight. That also leaves the module without buffers, so it can be
    called with any parameter dict.

    Args:
        in_channels: image channels (1 for digits and Omniglot, 3 for miniImageNet).
        channels: filters per conv (64 for Omniglot, 32 for miniImageNet in MAML).
        n_way: classes per task (the output size).
        image_size: input height = width, to size the linear head.
        blocks: conv blocks (4 in the papers).
        downsample: "pool" (2x2 max-pool, MAML's miniImageNet net: 84-42-21-10-5) or "stride" (stride-2 convs with
            'same' padding, MAML's Omniglot net: 28-14-7-4-2). An 8x8 digit goes 8-4-2-1-1 (no pool on a 1x1 map).
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, n_way: int = 5, image_size: int = 28,
                 blocks: int = 4, downsample: str = "pool") -> None:
        super().__init__()
        if downsample not in ("pool", "stride"):
            raise ValueError(f"downsample={downsample!r}: expected 'pool' or 'stride'")
        layers: list[nn.Module] = []
        size, c_in = image_size, in_channels
        for _ in range(blocks):
            stride = 2 if downsample == "stride" else 1
            layers += [nn.Conv2d(c_in, channels, 3, stride=stride, padding=1),
                       nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU()]
            if downsample == "stride":  # 'same' padding: rounds up
                size = math.ceil(size / 2)
            elif size >= 2:  # max-pool rounds down (84-42-21-10-5); a 1x1 map is left as it is
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * size * size, n_way)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------- the algorithms


def params_of(module: nn.Module) -> Params:
    return dict(module.named_parameters())


def inner_sgd(net: nn.Module, params: Params, x: Tensor, y: Tensor, steps: int, lr: float, loss_fn: LossFn,
              create_graph: bool) -> Params:
    """K steps of SGD on the support loss from `params`. With create_graph the result stays differentiable to
    second order in `params` (MAML); without it each step's gradient is a constant, so the result depends on
    `params` through the identity only (first-order MAML), and each step's graph is freed at once."""
    for _ in range(steps):
        loss = loss_fn(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    return params


def proximal_gd(net: nn.Module, theta: Params, x: Tensor, y: Tensor, steps: int, lr: float, lam: float,
                loss_fn: LossFn) -> Params:
    """iMAML's inner problem, min_φ L(φ) + (λ/2)||φ - θ||², by K steps of gradient descent from θ. No graph
    outlives a step: φ is returned as fresh leaves that require grad."""
    anchor = {n: p.detach() for n, p in theta.items()}
    phi = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
    for _ in range(steps):
        loss = loss_fn(functional_call(net, phi, (x,)), y)
        grads = torch.autograd.grad(loss, list(phi.values()))
        with torch.no_grad():
            for (n, p), g in zip(phi.items(), grads):
                p.sub_(lr * (g + lam * (p - anchor[n])))
    return phi


def _proximal_objective(net: nn.Module, phi: Params, anchor: Params, x: Tensor, y: Tensor, lam: float,
                        loss_fn: LossFn) -> Tensor:
    prox = sum((p - anchor[n]).pow(2).sum() for n, p in phi.items())
    return loss_fn(functional_call(net, phi, (x,)), y) + 0.5 * lam * prox


def proximal_newton_cg(net: nn.Module, theta: Params, x: Tensor, y: Tensor, steps: int, cg_steps: int, lam: float,
                       loss_fn: LossFn, line_search: int = 10, armijo: float = 1e-4) -> Params:
    """iMAML-HF's inner solver: `steps` Newton steps on  f(φ) = L(φ) + (λ/2)||φ - θ||²  from θ, each direction d the
    solution of (H + λI) d = ∇f(φ) by `cg_steps` of conjugate gradient on Hessian-vector products (Hessian-free),
    and a backtracking line search (halving from 1, at most `line_search` times, Armijo constant `armijo`) to pick
    the step size, as the paper describes (5 CG steps per direction). Where CG returns no descent direction (H + λI
    indefinite) the step falls back on the gradient. Returns φ as fresh leaves that require grad; no graph
    outlives a step."""
    anchor = {n: p.detach() for n, p in theta.items()}
    phi = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
    for _ in range(steps):
        leaves = list(phi.values())
        loss = loss_fn(functional_call(net, phi, (x,)), y)
        g_loss = torch.autograd.grad(loss, leaves, create_graph=True)
        with torch.no_grad():
            delta = _flat([p - anchor[n] for n, p in phi.items()])
            g = _flat(g_loss).detach() + lam * delta
            f0 = float(loss) + 0.5 * lam * float(delta @ delta)

        def matvec(u: Tensor, g_loss: Sequence[Tensor] = g_loss, leaves: list[Tensor] = leaves) -> Tensor:
            return hessian_vector_product(g_loss, leaves, u) + lam * u

        d = conjugate_gradient(matvec, g, cg_steps).detach()
        del matvec, g_loss  # free the HVP graph before the line search
        if float(g @ d) <= 0:
            d = g
        slope = float(g @ d)
        with torch.no_grad():
            t, new = 1.0, None
            for _ in range(line_search + 1):
                cand = {n: p - t * s_ for (n, p), s_ in zip(phi.items(), _unflat(d, leaves))}
                if float(_proximal_objective(net, cand, anchor, x, y, lam, loss_fn)) <= f0 - armijo * t * slope:
                    new = cand
                    break
                t *= 0.5
        if new is None:  # no decrease along d: φ is (numerically) the minimiser
            break
        phi = {n: p.detach().requires_grad_() for n, p in new.items()}
    return phi


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int, tol: float = 0.0) -> Tensor:
    """Solve A x = b for symmetric positive-definite A given only x -> A x, from x = 0, in at most `steps`
    iterations (exact after dim(b) in exact arithmetic); stops early once ||r|| <= tol."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(steps):
        if float(rs) <= tol * tol:
            break
        ap = matvec(p)
        alpha = rs / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def hessian_vector_product(grads: Sequence[Tensor], leaves: Sequence[Tensor], v: Tensor) -> Tensor:
    """H v (flat) by differentiating v·∇L once more, where `grads` = ∇L w.r.t. `leaves` computed with
    create_graph=True. The graph is retained, so many products reuse one forward/backward."""
    return _flat(torch.autograd.grad(grads, leaves, _unflat(v, leaves), retain_graph=True))


def imaml_meta_gradient(net: nn.Module, theta: Params, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor],
                        steps: int, lr: float, lam: float, cg_steps: int, loss_fn: LossFn, cg_damping: float = 0.0,
                        lam_damping: float = 0.0, inner_solver: str = "gd", hf_cg_steps: int = 5
                        ) -> tuple[list[Tensor], Tensor, Tensor]:
    """One task's implicit meta-gradient (I + H/λ)^-1 ∇L_query(φ), with φ from `proximal_gd` (inner_solver "gd": K =
    `steps` steps of size `lr`) or `proximal_newton_cg` ("hf": `steps` Newton steps of `hf_cg_steps` CG steps each)
    and H the Hessian of the support loss at φ. Returns (gradient per parameter of θ, query loss, query logits), all
    detached.

    With damping CG solves ((1 + cg_damping) I + H/(λ + lam_damping)) v = ∇L_query(φ) instead, as the authors' code
    does (cg_damping 1, lam_damping 10): it keeps the system positive-definite where H has negative curvature."""
    if inner_solver == "gd":
        phi = proximal_gd(net, theta, *support, steps, lr, lam, loss_fn)
    elif inner_solver == "hf":
        phi = proximal_newton_cg(net, theta, *support, steps, hf_cg_steps, lam, loss_fn)
    else:
        raise ValueError(f"inner_solver={inner_solver!r}: expected 'gd' or 'hf'")
    leaves = list(phi.values())
    logits = functional_call(net, phi, (query[0],))
    q_loss = loss_fn(logits, query[1])
    g_query = _flat(torch.autograd.grad(q_loss, leaves))
    s_loss = loss_fn(functional_call(net, phi, (support[0],)), support[1])
    g_support = torch.autograd.grad(s_loss, leaves, create_graph=True)  # one graph, reused by every HVP

    def matvec(u: Tensor) -> Tensor:
        return (1.0 + cg_damping) * u + hessian_vector_product(g_support, leaves, u) / (lam + lam_damping)

    v = conjugate_gradient(matvec, g_query, cg_steps)
    return [g.detach() for g in _unflat(v, leaves)], q_loss.detach(), logits.detach()


def task_losses(net: nn.Module, phi: Params, x: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    """Each task's loss and logits for a stack of tasks, each with its own weights: φ [T, ...], x [T, S, ...],
    y [T, S] -> losses [T], logits [T, S, n]. The forward pass is vmapped over the tasks (one batched call; the
    convolutions become grouped ones) and stays differentiable by plain autograd, so the gradient of the summed
    losses is every task's own gradient: a task's loss does not depend on another's weights."""
    logits = vmap(lambda p, xi: functional_call(net, p, (xi,)))(phi, x)
    return vmap(loss_fn)(logits, y), logits


def task_batch(batch: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A batch's tasks stacked: (support [T, S, ...], labels [T, S]), (query, labels); an episode is T = 1. The
    labels' leading dimensions (none for an episode) are the tasks'; whatever follows S in the inputs is one example."""
    out = []
    for x, y in (("support", "support_y"), ("query", "query_y")):
        lead = batch[y].dim() - 1
        out.append((batch[x].reshape(-1, *batch[x].shape[lead:]), batch[y].reshape(-1, batch[y].shape[-1])))
    return out[0], out[1]


def imaml_meta_gradients(net: nn.Module, theta: Params, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor],
                         steps: int, lr: float, lam: float, cg_steps: int, loss_fn: LossFn, cg_damping: float = 0.0,
                         lam_damping: float = 0.0) -> tuple[Params, Tensor, Tensor]:
    """`imaml_meta_gradient` (inner_solver "gd") for a stack of tasks at once (support [T, S, ...], labels [T, S]):
    the same proximal GD steps, query gradient and CG solve per task, computed for all tasks together (`task_losses`:
    one autograd call gives every task's gradient, one double backward every task's Hessian-vector product). A
    meta-batch then costs K + cg_steps + 2 batched calls instead of T times as many small ones. Returns
    (meta-gradient per parameter [T, ...], query losses [T], query logits [T, Q, n]), all detached.

    The per-task version stays the reference (tests compare the two) and is what the memory probe measures."""
    n_tasks = support[0].shape[0]
    anchor = {n: p.detach().expand(n_tasks, *p.shape) for n, p in theta.items()}

    def losses_of(phi: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return task_losses(net, phi, x, y, loss_fn)

    def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:  # per task: [T]
        return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))  # type: ignore[return-value]

    def per_task(scalars: Tensor, like: Tensor) -> Tensor:
        return scalars.view(-1, *[1] * (like.dim() - 1))

    phi = {n: p.clone().requires_grad_() for n, p in anchor.items()}
    for _ in range(steps):
        grads = torch.autograd.grad(losses_of(phi, *support)[0].sum(), list(phi.values()))
        with torch.no_grad():
            for (n, p), g in zip(phi.items(), grads):
                p.sub_(lr * (g + lam * (p - anchor[n])))
    leaves = list(phi.values())
    q_losses, logits = losses_of(phi, *query)
    g_query = torch.autograd.grad(q_losses.sum(), leaves)
    g_support = torch.autograd.grad(losses_of(phi, *support)[0].sum(), leaves, create_graph=True)

    def matvec(u: Sequence[Tensor]) -> list[Tensor]:
        hu = torch.autograd.grad(g_support, leaves, u, retain_graph=True)
        return [(1.0 + cg_damping) * a + h / (lam + lam_damping) for a, h in zip(u, hu)]

    # conjugate gradient from 0 for every task at once, as `conjugate_gradient` (its step sizes per task)
    x = [torch.zeros_like(g) for g in g_query]
    r = [g.clone() for g in g_query]
    d = [g.clone() for g in g_query]
    rs = dot(r, r)
    for _ in range(cg_steps):
        if not bool((rs > 0).any()):
            break
        ad = matvec(d)
        d_ad = dot(d, ad)
        alpha = torch.where(rs > 0, rs / torch.where(d_ad != 0, d_ad, 1.0), 0.0)  # a solved task stays put
        x = [a + per_task(alpha, a) * b for a, b in zip(x, d)]
        r = [a - per_task(alpha, a) * b for a, b in zip(r, ad)]
        rs_new = dot(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        d = [a + per_task(beta, a) * b for a, b in zip(r, d)]
        rs = rs_new
    return ({n: t.detach() for n, t in zip(phi, x)}, q_losses.detach(), logits.detach())


# ---------------------------------------------------------------------------------------------- memory


class _Packed:
    """A tensor saved for backward; counts its storage while the autograd graph holds it."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedTensorMeter, tensor: Tensor) -> None:
        self.meter, self.tensor = meter, tensor
        self.key = (tensor.device, tensor.untyped_storage().data_ptr())
        meter._add(self.key, tensor.untyped_storage().nbytes())

    def __del__(self) -> None:
        self.meter._remove(self.key)


class SavedTensorMeter:
    """Bytes of tensors that autograd saves for backward, live and at peak, while the context is open.

    Each storage counts once however many ops save it (or views of it), and stops counting when the last graph
    node holding it is freed: so a loop that frees its graph every step peaks at one step's worth, and one that
    keeps every step's graph (MAML) grows with the number of steps.
    """

    def __init__(self) -> None:
        self.live: dict[tuple, list[int]] = {}
        self.current = self.peak = self.total = 0

    def _add(self, key: tuple, nbytes: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, nbytes]
            self.current += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1

    def _remove(self, key: tuple) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Packed(self, t), lambda p: p.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes saved for backward while `fn()` runs (its graphs are freed before this returns)."""
    with SavedTensorMeter() as meter:
        fn()
    return meter.peak


# ---------------------------------------------------------------------------------------------- tasks


def _tasks(batch: dict[str, Tensor]) -> Iterator[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    """(support, query) pairs of an episode, or of each task of a meta-batch (a leading task dimension)."""
    if batch["support"].dim() == 4:
        yield (batch["support"], batch["support_y"]), (batch["query"], batch["query_y"])
        return
    for i in range(batch["support"].shape[0]):
        yield (batch["support"][i], batch["support_y"][i]), (batch["query"][i], batch["query_y"][i])


def pixel_nearest_neighbour(support: tuple[Tensor, Tensor], query: Tensor) -> Tensor:
    """The no-learning baseline: each query gets the label of its nearest support image in raw pixels (Euclidean)."""
    xs, ys = support
    return ys[torch.cdist(query.flatten(1), xs.flatten(1)).argmin(1)]


class MetaLearner(Task):
    """What MAML and iMAML share: a learner θ, the outer optimizer, test-time adaptation and the memory probe.

    Test-time adaptation is the same procedure for every method, so that methods differ only in θ: `test_steps`
    steps of gradient descent with step `test_lr` from θ on the support loss + (test_lam/2)||φ - θ||² (λ = 0: plain
    SGD, as MAML's test and iMAML's authors' evaluation, `measure_accuracy.py --lam 0.0`).

    Args:
        learner: the network whose initialisation is meta-learned (`ConvLearner`).
        optimizer: a partial outer optimizer (Adam 1e-3 in both papers), called with θ.
        inner_steps: K, inner steps on a task's support set in training.
        inner_lr: the inner step size α in training.
        test_steps, test_lr, test_lam: the test-time adaptation (None: inner_steps, inner_lr; λ 0).
        test_adaptations: more adaptations scored beside the main one, name -> {steps, lr, lam} (reported as
            acc_<name> on val and test): the same θ under other test-time procedures, to choose one on validation.
        meta_train: False leaves θ at its initialisation (the untrained baseline; the step yields nothing).
        memory_steps: the K at which the test evaluation measures the bytes saved for one task's meta-gradient.
        variant: the name this configuration reports (a study's label: maml, fomaml, imaml, untrained).
        eval_chunk: evaluation episodes adapted at once (vectorised; memory grows with it).
    """

    def __init__(self, learner: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], inner_steps: int = 5,
                 inner_lr: float = 0.4, test_steps: int | None = None, test_lr: float | None = None,
                 test_lam: float = 0.0, test_adaptations: Mapping[str, Mapping[str, float]] | None = None,
                 meta_train: bool = True, memory_steps: Sequence[int] = (1, 5, 10, 20), variant: str = "meta",
                 eval_chunk: int = 50) -> None:
        super().__init__()
        self.learner = learner
        self._optimizer = optimizer
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.test_steps = int(test_steps) if test_steps is not None else self.inner_steps
        self.test_lr = float(test_lr) if test_lr is not None else self.inner_lr
        self.test_lam = float(test_lam)
        self.test_adaptations = {str(k): (int(v["steps"]), float(v["lr"]), float(v.get("lam", 0.0)))
                                 for k, v in (test_adaptations or {}).items()}
        self.meta_train = bool(meta_train)
        self.memory_steps = [int(k) for k in memory_steps]
        self.variant = variant
        self.eval_chunk = max(int(eval_chunk), 1)
        self._probe: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"meta": self._optimizer(self.learner.parameters())}

    def on_stage_start(self, stage: str, data: Any) -> None:
        """Keep the first task of the first training item: the fixed task whose meta-gradient memory we measure
        (a training task: its shots and queries are those the method trains with)."""
        super().on_stage_start(stage, data)
        try:
            first = data.dataset("train", stage)[0]
        except (KeyError, AttributeError):
            return
        self._probe = next(_tasks(first))

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)

    # -- what each algorithm defines
    def meta_gradient(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], steps: int
                      ) -> tuple[list[Tensor], Tensor, Tensor]:
        """One task's meta-gradient w.r.t. θ with `steps` inner steps: (grads, query loss, query logits)."""
        raise NotImplementedError

    def meta_train_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, Tensor | None]]:
        raise NotImplementedError

    # -- shared
    def training_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, Tensor | None]]:
        if self.meta_train:
            yield from self.meta_train_step(batch)

    def adapt(self, support: tuple[Tensor, Tensor], steps: int | None = None, lr: float | None = None,
              lam: float | None = None) -> Params:
        """Task-specific weights φ from θ by the test-time adaptation (defaults: test_steps, test_lr, test_lam),
        with no graph to θ."""
        steps = self.test_steps if steps is None else steps
        lr = self.test_lr if lr is None else lr
        lam = self.test_lam if lam is None else lam
        phi = proximal_gd(self.learner, params_of(self.learner), *support, steps, lr, lam, self.loss_fn)
        return {n: p.detach() for n, p in phi.items()}

    @property
    def device_(self) -> torch.device:
        return next(self.parameters()).device

    def adapt_many(self, support: tuple[Tensor, Tensor], steps: int | None = None, lr: float | None = None,
                   lam: float | None = None) -> Params:
        """`adapt` for a stack of tasks at once (support [T, S, ...], labels [T, S]): the same steps, vectorised over
        the tasks with torch.func (vmap of grad), so many small episodes cost a few batched calls. Returns φ with a
        leading task dimension."""
        steps = self.test_steps if steps is None else steps
        lr = self.test_lr if lr is None else lr
        lam = self.test_lam if lam is None else lam
        theta = {n: p.detach() for n, p in params_of(self.learner).items()}

        def support_loss(phi: Params, x: Tensor, y: Tensor) -> Tensor:
            return self.loss_fn(functional_call(self.learner, phi, (x,)), y)

        def one_task(x: Tensor, y: Tensor) -> Params:
            phi = theta
            for _ in range(steps):
                g = grad(support_loss)(phi, x, y)
                phi = {n: p - lr * (g[n] + lam * (p - theta[n])) for n, p in phi.items()}
            return phi

        return vmap(one_task)(*support)

    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        """Adapt to each episode's support set, classify its query set: mean accuracy and its 95% interval; the
        same for raw-pixel nearest neighbour (`pixel_acc`) and for each of `test_adaptations` (`acc_<name>`).
        Episodes are adapted `eval_chunk` at a time (`adapt_many`). The test split also reports the saved-tensor
        memory of one meta-gradient at each of `memory_steps`."""
        from mlrun.datasets.fewshot import mean_ci95

        adaptations = {"": (self.test_steps, self.test_lr, self.test_lam)}
        adaptations.update({f"_{k}": v for k, v in self.test_adaptations.items()})
        accs: dict[str, list[Tensor]] = {f"acc{k}": [] for k in adaptations}
        accs["pixel_acc"] = []
        losses = []
        for xs, ys, xq, yq in self._chunks(loader):
            for key, (steps, lr, lam) in adaptations.items():
                phi = self.adapt_many((xs, ys), steps, lr, lam)
                with torch.no_grad():
                    logits = vmap(lambda p, x: functional_call(self.learner, p, (x,)))(phi, xq)  # noqa: B023
                    accs[f"acc{key}"].append((logits.argmax(-1) == yq).float().mean(1))
                    if not key:
                        losses.append(F.cross_entropy(logits.flatten(0, 1), yq.flatten(), reduction="none")
                                      .view_as(yq).mean(1))
            nearest = torch.stack([pixel_nearest_neighbour((a, b), c) for a, b, c in zip(xs, ys, xq)])
            accs["pixel_acc"].append((nearest == yq).float().mean(1))
        out: dict[str, float] = {"loss": float(torch.cat(losses).mean()) if losses else float("nan")}
        for name, values in accs.items():
            mean, ci = mean_ci95(torch.cat(values).cpu().numpy() if values else [])
            out[name], out[f"{name}_ci95"] = float(mean), float(ci)
        if split == "test" and self._probe is not None and self.meta_train:  # the untrained baseline has none
            out.update(self.memory_profile())
        return out

    def _chunks(self, loader: Any) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """The loader's tasks stacked `eval_chunk` at a time (consecutive tasks of one shape; a new shape, such as
        20-way after 5-way episodes, starts a new chunk), on the model's device."""
        pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

        def stack() -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return tuple(torch.stack([t[i] for t in pending]).to(self.device_) for i in range(4))  # type: ignore

        for batch in loader:
            for (xs, ys), (xq, yq) in _tasks(batch):
                if pending and (xs.shape != pending[0][0].shape or xq.shape != pending[0][2].shape):
                    yield stack()
                    pending = []
                pending.append((xs, ys, xq, yq))
                if len(pending) >= self.eval_chunk:
                    yield stack()
                    pending = []
        if pending:
            yield stack()

    def memory_profile(self, steps: Sequence[int] | None = None) -> dict[str, float]:
        """MiB saved for backward during one task's meta-gradient at each K (and seconds it took; on a GPU also
        torch.cuda's peak allocation above the start), on the probe task, and how the bytes grow with K
        (`memory_growth`)."""
        (xs, ys), (xq, yq) = self._probe
        xs, ys, xq, yq = (t.to(self.device_) for t in (xs, ys, xq, yq))
        out: dict[str, float] = {}
        cuda = self.device_.type == "cuda"
        saved: dict[int, float] = {}
        with torch.enable_grad():
            for k in steps or self.memory_steps:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                nbytes = saved_tensor_bytes(lambda k=k: self.meta_gradient((xs, ys), (xq, yq), k))
                if cuda:
                    torch.cuda.synchronize()
                    out[f"cuda_mib_k{k}"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                out[f"seconds_k{k}"] = time.perf_counter() - t0
                out[f"saved_mib_k{k}"] = saved[k] = nbytes / 2**20
        out.update(memory_growth(saved))
        return out


def memory_growth(saved: Mapping[int, float]) -> dict[str, float]:
    """How saved bytes grow with K, from {K: bytes} at three or more K (two for the ratio):

    - saved_max_over_min: the largest over the smallest (1.0 = flat, iMAML's claim);
    - saved_step_spread: the per-step increment between consecutive K, (b[K'] - b[K]) / (K' - K), largest over
      smallest (1.0 = exactly linear in K; nan if an increment is not positive);
    - saved_step_over_first: the smallest per-step increment over the bytes at the smallest K (how much each inner
      step adds, relative to a one-step meta-gradient at the smallest K).
    """
    ks = sorted(saved)
    if len(ks) < 2:
        return {}
    out = {"saved_max_over_min": max(saved.values()) / min(saved.values())}
    steps = [(saved[b] - saved[a]) / (b - a) for a, b in zip(ks, ks[1:])]
    out["saved_step_spread"] = max(steps) / min(steps) if min(steps) > 0 else float("nan")
    out["saved_step_over_first"] = min(steps) / saved[ks[0]]
    return out


class MAML(MetaLearner):
    """MAML: the query loss after K inner SGD steps, differentiated through them (second order), or with
    `first_order` the first-order approximation (the query gradient at φ, applied to θ).

    The step yields ("meta", mean query loss over the meta-batch); the trainer backprops it through the inner
    loops and steps Adam.
    """

    def __init__(self, learner: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], inner_steps: int = 5,
                 inner_lr: float = 0.4, first_order: bool = False, test_steps: int | None = None,
                 test_lr: float | None = None, test_lam: float = 0.0,
                 test_adaptations: Mapping[str, Mapping[str, float]] | None = None, meta_train: bool = True,
                 memory_steps: Sequence[int] = (1, 5, 10, 20), variant: str = "maml", eval_chunk: int = 50) -> None:
        super().__init__(learner, optimizer, inner_steps, inner_lr, test_steps, test_lr, test_lam, test_adaptations,
                         meta_train, memory_steps, variant, eval_chunk)
        self.first_order = bool(first_order)

    def query_loss(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], steps: int
                   ) -> tuple[Tensor, Tensor]:
        """(query loss after `steps` inner steps, differentiable w.r.t. θ; query logits)."""
        phi = inner_sgd(self.learner, params_of(self.learner), *support, steps, self.inner_lr, self.loss_fn,
                        create_graph=not self.first_order)
        logits = functional_call(self.learner, phi, (query[0],))
        return self.loss_fn(logits, query[1]), logits

    def meta_gradient(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], steps: int
                      ) -> tuple[list[Tensor], Tensor, Tensor]:
        loss, logits = self.query_loss(support, query, steps)
        grads = torch.autograd.grad(loss, list(self.learner.parameters()))
        return list(grads), loss.detach(), logits.detach()

    def meta_train_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        """The mean query loss over the meta-batch after each task's inner loop, all tasks at once: each task's
        weights start as a view of θ (expand), so backward through the inner steps reaches θ as `query_loss`
        per task would (tests compare the two)."""
        (xs, ys), (xq, yq) = task_batch(batch)
        phi = {n: p.expand(xs.shape[0], *p.shape) for n, p in params_of(self.learner).items()}
        for _ in range(self.inner_steps):
            losses, _ = task_losses(self.learner, phi, xs, ys, self.loss_fn)
            grads = torch.autograd.grad(losses.sum(), list(phi.values()), create_graph=not self.first_order)
            phi = {n: p - self.inner_lr * g for (n, p), g in zip(phi.items(), grads)}
        losses, logits = task_losses(self.learner, phi, xq, yq, self.loss_fn)
        self.log("query_acc", (logits.argmax(-1) == yq).float().mean())
        yield "meta", losses.mean()


class IMAML(MetaLearner):
    """iMAML: proximal inner problem solved by K steps of gradient descent (`inner_solver: gd`, iMAML-GD) or by K
    Hessian-free Newton steps (`hf`, iMAML-HF, `hf_cg_steps` CG steps per direction and a line search); the implicit
    meta-gradient is found by `cg_steps` of conjugate gradient. The step sets θ's .grad (mean over the meta-batch)
    and yields ("meta", None).

    Args (beyond `MetaLearner`'s):
        lam: λ, the strength of the proximal term (2.0 in the paper).
        cg_steps: conjugate-gradient iterations for the meta-gradient (5 in the paper).
        cg_damping, lam_damping: 0 solves the paper's (I + H/λ) v = g; the authors' code solves
            ((1 + cg_damping) I + H/(λ + lam_damping)) v = g with 1 and 10.
        inner_solver, hf_cg_steps: "gd" (K steps of size inner_lr) or "hf" (K Newton-CG steps of hf_cg_steps).
    """

    def __init__(self, learner: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], inner_steps: int = 16,
                 inner_lr: float = 0.1, lam: float = 2.0, cg_steps: int = 5, cg_damping: float = 0.0,
                 lam_damping: float = 0.0, inner_solver: str = "gd", hf_cg_steps: int = 5,
                 test_steps: int | None = None, test_lr: float | None = None, test_lam: float = 0.0,
                 test_adaptations: Mapping[str, Mapping[str, float]] | None = None, meta_train: bool = True,
                 memory_steps: Sequence[int] = (1, 5, 10, 20), variant: str = "imaml", eval_chunk: int = 50) -> None:
        super().__init__(learner, optimizer, inner_steps, inner_lr, test_steps, test_lr, test_lam, test_adaptations,
                         meta_train, memory_steps, variant, eval_chunk)
        if inner_solver not in ("gd", "hf"):
            raise ValueError(f"inner_solver={inner_solver!r}: expected 'gd' or 'hf'")
        self.lam, self.cg_steps = float(lam), int(cg_steps)
        self.cg_damping, self.lam_damping = float(cg_damping), float(lam_damping)
        self.inner_solver, self.hf_cg_steps = inner_solver, int(hf_cg_steps)

    def meta_gradient(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], steps: int
                      ) -> tuple[list[Tensor], Tensor, Tensor]:
        return imaml_meta_gradient(self.learner, params_of(self.learner), support, query, steps, self.inner_lr,
                                   self.lam, self.cg_steps, self.loss_fn, self.cg_damping, self.lam_damping,
                                   self.inner_solver, self.hf_cg_steps)

    def meta_train_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, None]]:
        """The mean meta-gradient over the meta-batch into θ's .grad: iMAML-GD vectorised over the tasks
        (`imaml_meta_gradients`), iMAML-HF task by task (its line search branches on each task's values)."""
        named = params_of(self.learner)
        if self.inner_solver == "gd":
            support, query = task_batch(batch)
            per_task, losses, logits = imaml_meta_gradients(
                self.learner, named, support, query, self.inner_steps, self.inner_lr, self.lam, self.cg_steps,
                self.loss_fn, self.cg_damping, self.lam_damping)
            mean = {n: g.mean(0) for n, g in per_task.items()}
            accs = (logits.argmax(-1) == query[1]).float().mean(1)
        else:
            total = {n: torch.zeros_like(p) for n, p in named.items()}
            loss_list, acc_list = [], []
            for support, query in _tasks(batch):
                grads, loss, lg = self.meta_gradient(support, query, self.inner_steps)
                for n, g in zip(total, grads):
                    total[n] += g
                loss_list.append(loss)
                acc_list.append((lg.argmax(1) == query[1]).float().mean())
            mean = {n: g / len(loss_list) for n, g in total.items()}
            losses, accs = torch.stack(loss_list), torch.stack(acc_list)
        for n, p in named.items():
            p.grad = mean[n] if p.grad is None else p.grad + mean[n]  # add, as backward would under accumulation
        self.log("meta_loss", losses.mean())
        self.log("query_acc", accs.mean())
        yield "meta", None


# ---------------------------------------------------------------------------------------------- study


def _k_of(metric: str, prefix: str) -> int | None:
    name = metric.split("/", 1)[-1]
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def summarize(study: dict[str, Any]) -> dict[str, float]:
    """Per method (label), medians over the runs given (one seed's runs: that seed's values): test accuracy and
    its interval, saved MiB at each K and how they grow with K; and raw-pixel nearest neighbour's test accuracy
    (`pixels/test/acc`, the same episodes in every run)."""
    import statistics

    out: dict[str, float] = {}
    pixel: list[float] = []
    for label, metrics in sorted(_by_label(study).items()):
        for name, values in metrics.items():
            if name in ("test/acc", "test/acc_ci95") or name.startswith(("test/saved_", "test/acc_")):
                out[f"{label}/{name}"] = statistics.median(values)
        pixel += metrics.get("test/pixel_acc", [])
    if pixel:
        out["pixels/test/acc"] = statistics.median(pixel)
    return out


def _by_label(study: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """label -> metric -> values over the completed runs in the study dict."""
    out: dict[str, dict[str, list[float]]] = {}
    for run in study.get("runs", []):
        if run.get("status") != "completed":
            continue
        metrics = out.setdefault(str(run["label"]), {})
        for name, value in run.get("metrics", {}).items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                metrics.setdefault(name, []).append(v)
    return out


def study_figure(study: dict[str, Any], out_dir: Path) -> list[Path]:
    """iMAML's Figure 2 beside Table 2: saved memory of one meta-gradient against K (median over seeds), and test
    accuracy of every method, the untrained network and raw-pixel nearest neighbour (bars: median over seeds;
    dots: single seeds)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _by_label(study)
    labels = sorted(runs)
    fig, (ax_m, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        ms = runs[label]
        ks = sorted(k for m in ms if (k := _k_of(m, "saved_mib_k")) is not None)
        if ks:  # the untrained baseline runs no meta-gradient and reports no memory
            ax_m.plot(ks, [statistics.median(ms[f"test/saved_mib_k{k}"]) for k in ks], "o-", label=label)
            ax_m.set_xticks(ks)
    ax_m.set(xlabel="inner gradient steps K", ylabel="MiB saved for backward",
             title="memory of one meta-gradient (one task, median of seeds)")
    ax_m.legend()
    bars = [(lb, runs[lb].get("test/acc", [])) for lb in labels]
    bars.append(("raw pixels, 1-NN", [v for lb in labels for v in runs[lb].get("test/pixel_acc", [])][:1]))
    names = [b[0] for b in bars]
    medians = [100 * statistics.median(v) if v else float("nan") for _, v in bars]
    ax_a.bar(names, medians, color=[f"C{i}" for i in range(len(bars))])
    for i, (_, values) in enumerate(bars):
        ax_a.plot([i] * len(values), [100 * v for v in values], "k.", zorder=3)
    ax_a.set(ylabel="test accuracy (%)",
             title="5-way 1-shot, unseen classes, one adaptation for all\nbars: median of seeds, dots: seeds")
    finite = [m for m in medians if m == m]
    ax_a.set_ylim(max(0.0, min(finite, default=0.0) - 15), 100)
    ax_a.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "memory_and_accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
