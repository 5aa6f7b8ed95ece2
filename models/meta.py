"""MAML (Finn et al. 2017), first-order MAML and iMAML (Rajeswaran et al. 2019): gradient-based meta-learning.

Both learn an initialisation θ of a small conv net (`ConvLearner`) such that a few gradient steps on a task's
support set give parameters φ that classify its query set well.

- MAML differentiates the query loss through K inner SGD steps: the graph of every step is kept, so the memory of
  one meta-gradient grows linearly with K. First-order MAML drops the second-order terms (dφ/dθ = I).
- iMAML's inner problem is  min_φ L_support(φ) + (λ/2)||φ - θ||²  (K steps of gradient descent, no graph kept). At
  its solution dφ/dθ = (I + H/λ)^-1 with H the Hessian of L_support at φ, so the meta-gradient is the solution v
  of (I + H/λ) v = ∇L_query(φ), found by conjugate gradient from Hessian-vector products. The memory is that of
  one forward/backward, whatever K.

The learner is called statelessly with `torch.func.functional_call`, so adapted weights are plain tensors. Gradients
and Hessian-vector products use `torch.autograd.grad` (Pearlmutter's double backward), not `torch.func.grad/jvp`:
torch.func refuses to run under `torch.autograd.graph.saved_tensors_hooks`, and those hooks are how we measure the
memory of a meta-gradient without a GPU (`saved_tensor_bytes`). Tests check these HVPs against torch.func's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

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
                        lam_damping: float = 0.0) -> tuple[list[Tensor], Tensor, Tensor]:
    """One task's implicit meta-gradient (I + H/λ)^-1 ∇L_query(φ), with φ from `proximal_gd` and H the Hessian of
    the support loss at φ. Returns (gradient per parameter of θ, query loss, query logits), all detached.

    With damping CG solves ((1 + cg_damping) I + H/(λ + lam_damping)) v = ∇L_query(φ) instead, as the authors' code
    does (cg_damping 1, lam_damping 10): it keeps the system positive-definite where H has negative curvature."""
    phi = proximal_gd(net, theta, *support, steps, lr, lam, loss_fn)
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


class MetaLearner(Task):
    """What MAML and iMAML share: a learner θ, the outer optimizer, test-time adaptation and the memory probe.

    Args:
        learner: the network whose initialisation is meta-learned (`ConvLearner`).
        optimizer: a partial outer optimizer (Adam 1e-3 in both papers), called with θ.
        inner_steps: K, gradient steps on a task's support set, in training.
        inner_lr: the inner step size α.
        test_inner_steps: K at evaluation (None: as in training; MAML used 10 at test on miniImageNet).
        memory_steps: the K at which the test evaluation measures the bytes saved for one task's meta-gradient.
        variant: the name this configuration reports (a study's label: maml, fomaml, imaml).
    """

    def __init__(self, learner: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], inner_steps: int = 5,
                 inner_lr: float = 0.4, test_inner_steps: int | None = None,
                 memory_steps: Sequence[int] = (1, 5, 10, 20), variant: str = "meta") -> None:
        super().__init__()
        self.learner = learner
        self._optimizer = optimizer
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.test_inner_steps = int(test_inner_steps) if test_inner_steps is not None else self.inner_steps
        self.memory_steps = [int(k) for k in memory_steps]
        self.variant = variant
        self._probe: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"meta": self._optimizer(self.learner.parameters())}

    def on_stage_start(self, stage: str, data: Any) -> None:
        """Keep the first task of the first training item: the fixed task whose meta-gradient memory we measure."""
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

    def adapt(self, support: tuple[Tensor, Tensor], steps: int) -> Params:
        """Task-specific weights φ from θ, as at test time (no graph to θ)."""
        raise NotImplementedError

    # -- shared
    @property
    def device_(self) -> torch.device:
        return next(self.parameters()).device

    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        """Adapt to each episode's support set, classify its query set: mean accuracy and its 95% interval.
        The test split also reports the saved-tensor memory of one meta-gradient at each of `memory_steps`."""
        from mlrun.datasets.fewshot import mean_ci95

        accs, losses = [], []
        with torch.enable_grad():  # adaptation takes gradient steps; the trainer evaluates under no_grad
            for batch in loader:
                for (xs, ys), (xq, yq) in _tasks(batch):
                    xs, ys, xq, yq = (t.to(self.device_) for t in (xs, ys, xq, yq))
                    phi = self.adapt((xs, ys), self.test_inner_steps)
                    with torch.no_grad():
                        logits = functional_call(self.learner, phi, (xq,))
                        losses.append(float(self.loss_fn(logits, yq)))
                        accs.append(float((logits.argmax(1) == yq).float().mean()))
        mean, ci = mean_ci95(accs)
        out = {"acc": float(mean), "acc_ci95": float(ci), "loss": sum(losses) / max(len(losses), 1)}
        if split == "test" and self._probe is not None:
            out.update(self.memory_profile())
        return out

    def memory_profile(self, steps: Sequence[int] | None = None) -> dict[str, float]:
        """MiB saved for backward during one task's meta-gradient at each K (and seconds it took; on a GPU also
        torch.cuda's peak allocation above the start), on the probe task."""
        (xs, ys), (xq, yq) = self._probe
        xs, ys, xq, yq = (t.to(self.device_) for t in (xs, ys, xq, yq))
        out: dict[str, float] = {}
        cuda = self.device_.type == "cuda"
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
                out[f"saved_mib_k{k}"] = nbytes / 2**20
        return out

class MAML(MetaLearner):
    """MAML: the query loss after K inner SGD steps, differentiated through them (second order), or with
    `first_order` the first-order approximation (the query gradient at φ, applied to θ).

    The step yields ("meta", mean query loss over the meta-batch); the trainer backprops it through the inner
    loops and steps Adam.
    """

    def __init__(self, learner: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], inner_steps: int = 5,
                 inner_lr: float = 0.4, first_order: bool = False, test_inner_steps: int | None = None,
                 memory_steps: Sequence[int] = (1, 5, 10, 20), variant: str = "maml") -> None:
        super().__init__(learner, optimizer, inner_steps, inner_lr, test_inner_steps, memory_steps, variant)
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

    def adapt(self, support: tuple[Tensor, Tensor], steps: int) -> Params:
        theta = {n: p.detach().requires_grad_() for n, p in params_of(self.learner).items()}
        phi = inner_sgd(self.learner, theta, *support, steps, self.inner_lr, self.loss_fn, create_graph=False)
        return {n: p.detach() for n, p in phi.items()}

    def training_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        losses, accs = [], []
        for support, query in _tasks(batch):
            loss, logits = self.query_loss(support, query, self.inner_steps)
            losses.append(loss)
            accs.append((logits.argmax(1) == query[1]).float().mean())
        self.log("query_acc", torch.stack(accs).mean())
        yield "meta", torch.stack(losses).mean()


class IMAML(MetaLearner):
    """iMAML: proximal inner problem solved by K steps of gradient descent; the implicit meta-gradient is found by
    `cg_steps` of conjugate gradient. The step sets θ's .grad (mean over the meta-batch) and yields ("meta", None).

    Args (beyond `MetaLearner`'s):
        lam: λ, the strength of the proximal term (2.0 in the paper).
        cg_steps: conjugate-gradient iterations (5 in the paper).
        cg_damping, lam_damping: 0 solves the paper's (I + H/λ) v = g; the authors' code solves
            ((1 + cg_damping) I + H/(λ + lam_damping)) v = g with 1 and 10.
    """

    def __init__(self, learner: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], inner_steps: int = 16,
                 inner_lr: float = 0.1, lam: float = 2.0, cg_steps: int = 5, cg_damping: float = 0.0,
                 lam_damping: float = 0.0, test_inner_steps: int | None = None,
                 memory_steps: Sequence[int] = (1, 5, 10, 20), variant: str = "imaml") -> None:
        super().__init__(learner, optimizer, inner_steps, inner_lr, test_inner_steps, memory_steps, variant)
        self.lam, self.cg_steps = float(lam), int(cg_steps)
        self.cg_damping, self.lam_damping = float(cg_damping), float(lam_damping)

    def meta_gradient(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], steps: int
                      ) -> tuple[list[Tensor], Tensor, Tensor]:
        return imaml_meta_gradient(self.learner, params_of(self.learner), support, query, steps, self.inner_lr,
                                   self.lam, self.cg_steps, self.loss_fn, self.cg_damping, self.lam_damping)

    def adapt(self, support: tuple[Tensor, Tensor], steps: int) -> Params:
        phi = proximal_gd(self.learner, params_of(self.learner), *support, steps, self.inner_lr, self.lam,
                          self.loss_fn)
        return {n: p.detach() for n, p in phi.items()}

    def training_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, None]]:
        params = list(self.learner.parameters())
        total = [torch.zeros_like(p) for p in params]
        losses, accs = [], []
        for support, query in _tasks(batch):
            grads, loss, logits = self.meta_gradient(support, query, self.inner_steps)
            torch._foreach_add_(total, grads)
            losses.append(loss)
            accs.append((logits.argmax(1) == query[1]).float().mean())
        for p, g in zip(params, total):
            g = g / len(losses)
            p.grad = g if p.grad is None else p.grad + g  # add, as backward would under accumulation
        self.log("meta_loss", torch.stack(losses).mean())
        self.log("query_acc", torch.stack(accs).mean())
        yield "meta", None


# ---------------------------------------------------------------------------------------------- study


def _k_of(metric: str, prefix: str) -> int | None:
    name = metric.split("/", 1)[-1]
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def summarize(study: dict[str, Any]) -> dict[str, float]:
    """Per method (label), medians over seeds: test accuracy and its interval, saved MiB at each K, the ratio of
    saved MiB at the largest K to the smallest, and the largest saved MiB over the smallest across K."""
    out: dict[str, float] = {}
    for label, metrics in study.get("groups", {}).items():
        for name in ("test/acc", "test/acc_ci95"):
            if name in metrics:
                out[f"{label}/{name}"] = metrics[name]["median"]
        saved = {k: metrics[m]["median"] for m in metrics if (k := _k_of(m, "saved_mib_k")) is not None}
        if len(saved) >= 2:
            lo, hi = min(saved), max(saved)
            out[f"{label}/saved_ratio_k{hi}_k{lo}"] = saved[hi] / saved[lo]
            out[f"{label}/saved_max_over_min"] = max(saved.values()) / min(saved.values())
            out.update({f"{label}/saved_mib_k{k}": v for k, v in sorted(saved.items())})
    return out


def study_figure(study: dict[str, Any], out_dir: Path) -> list[Path]:
    """iMAML's Figure 2 beside Table 2: saved memory of one meta-gradient against K, and test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = study.get("groups", {})
    labels = sorted(groups)
    fig, (ax_m, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for label in labels:
        ms = groups[label]
        ks = sorted(k for m in ms if (k := _k_of(m, "saved_mib_k")) is not None)
        if ks:
            ax_m.plot(ks, [ms[f"test/saved_mib_k{k}"]["median"] for k in ks], "o-", label=label)
            ax_m.set_xticks(ks)
    ax_m.set(xlabel="inner gradient steps K", ylabel="MiB saved for backward (one task)",
             title="memory of one meta-gradient")
    ax_m.legend()
    accs = [100 * groups[lb].get("test/acc", {}).get("median", float("nan")) for lb in labels]
    cis = [100 * groups[lb].get("test/acc_ci95", {}).get("median", 0.0) for lb in labels]
    ax_a.bar(labels, accs, yerr=cis, capsize=6, color=[f"C{i}" for i in range(len(labels))])
    for run in study.get("runs", []):
        if run["status"] == "completed" and "test/acc" in run["metrics"] and run["label"] in labels:
            ax_a.plot(labels.index(run["label"]), 100 * float(run["metrics"]["test/acc"]), "k.", zorder=3)
    ax_a.set(ylabel="test accuracy (%), median of seeds ± 95% CI", title="5-way 1-shot, unseen classes")
    lo = min((a for a in accs if a == a), default=0.0)
    ax_a.set_ylim(max(0.0, lo - 15), 100)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "memory_and_accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
