"""Tanay & Griffin (2016), "A Boundary Tilting Perspective on the Phenomenon of Adversarial Examples".

A linear classifier on a pair of classes is summarised by its deviation angle θ to the nearest-centroid
classifier: the mean distance of the data to its boundary is d_adv = ½||Δ|| cos θ (Δ = mean_j - mean_i),
so a boundary tilted towards the data (θ near 90°) lies close to every image while classifying them all
correctly. The paper measures θ for linear SVMs across the L2 regularisation λ, and shows each image's
mirror image through the boundary: far from the image (a different digit) when θ is small, a faint
perturbation of it when θ is large.

The mechanism, as the authors' later article "A New Angle on L2 Regularization" (Tanay & Griffin 2018) shows
it: with the objective (1/n) Σ hinge + λ||w||², weak regularisation lets the SVM fit a few noisy training
points by tilting along directions in which the data hardly vary, so θ grows towards 90° and the adversarial
distance d_adv = (1/n) Σ_T y d(x) = ½||j - i|| cos θ (T the training set, i, j its class centroids) shrinks,
while the test error barely moves.

Here: the paper's quantities as functions, the SVM fit exactly by scikit-learn (a no-gradient stage), a
tiny MLP trained by the shared trainer with the same objective as a non-linear check (its minimal L2
adversarial perturbation found by projected gradient steps), the data (a digit pair with a seeded fraction
of flipped training labels and optional near-constant "flat" pixels), the paper's tilting construction
(w + t·e along a zero-variance direction e), and the study's summary and figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from mlrun.task import DataModule, Task

# ---------------------------------------------------------------------------------------------- quantities


def centroid_direction(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Δ = mean of class 1 - mean of class 0, and the midpoint between the two means."""
    m0, m1 = x[y == 0].mean(0), x[y == 1].mean(0)
    return m1 - m0, (m0 + m1) / 2


def nearest_centroid(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest-centroid classifier as a hyperplane: normal Δ, through the midpoint of the means."""
    delta, mid = centroid_direction(x, y)
    return delta, -(delta @ mid)


def deviation_angle(w: Tensor, delta: Tensor) -> float:
    """θ in degrees between the boundary's normal w and the centroid direction Δ (0 for nearest centroid)."""
    cos = (w @ delta) / (w.norm() * delta.norm())
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


def boundary_distance(x: Tensor, w: Tensor, b: Tensor | float) -> Tensor:
    """Each point's Euclidean distance to the hyperplane w·x + b = 0."""
    return (x @ w + b).abs() / w.norm()


def mean_adversarial_distance(delta: Tensor, theta_deg: float) -> float:
    """d_adv = ½||Δ|| cos θ: the mean signed distance of two equal-sized classes to a boundary through their
    midpoint; it shrinks to 0 as the boundary tilts towards the data, whatever the error rate."""
    return 0.5 * float(delta.norm()) * math.cos(math.radians(theta_deg))


def adversarial_distance(x: Tensor, y: Tensor, w: Tensor, b: Tensor | float) -> float:
    """The article's d_adv = (1/n) Σ y d(x): the mean signed distance of the (training) points to the boundary,
    y = ±1, negative for misclassified points. Equals ½||Δ|| cos θ when the classes are balanced."""
    return float(((2 * y - 1).to(x.dtype) * (x @ w + b)).mean() / w.norm())


def zero_variance_direction(x: Tensor) -> Tensor | None:
    """A unit vector e along which every row of x has the same value (the normalised sum of the constant
    coordinates): adding t·e to a boundary's normal tilts it without moving any of these points' scores but
    by one constant. None if no coordinate is constant."""
    constant = (x == x[:1]).all(0)
    if not constant.any():
        return None
    return constant.to(x.dtype) / constant.sum().sqrt()


def tilt(w: Tensor, b: Tensor | float, e: Tensor, t: float, x_ref: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's construction: w + t·e with the bias moved so that points like x_ref (constant along e) keep
    their scores exactly: (w + t e)·x + b - t e·x_ref = w·x + b when e·x = e·x_ref."""
    return w + t * e, torch.as_tensor(b, dtype=w.dtype) - t * (e @ x_ref)


def mirror(x: Tensor, w: Tensor, b: Tensor | float) -> Tensor:
    """Reflect x through the boundary: x - 2(ŵ·x + b')ŵ with ŵ = w/||w||, b' = b/||w||. The mirror image is
    classified the other way, at the same distance from the boundary."""
    n = w.norm()
    w_hat = w / n
    return x - 2 * ((x @ w_hat) + b / n).unsqueeze(-1) * w_hat


def fit_linear_svm(x: Tensor, y: Tensor, lam: float, input_scale: float = 1.0, tol: float = 1e-6,
                   cache_mb: float = 500) -> tuple[Tensor, Tensor]:
    """The exact soft-margin SVM in the authors' normalisation: minimise (1/n) Σ_i max(0, 1 - y_i (v·(s x_i) + b))
    + λ ||v||² on inputs scaled by s = input_scale, i.e. LIBSVM's ½||v||² + C Σ hinge with C = 1/(2nλ).
    Returned as (w, b) for unscaled x (w = s v).

    SMO (scikit-learn's SVC) solves the dual to `tol` at any λ, so θ is the problem's own angle at every one
    of the sweep's decades, not a measure of how far gradient descent got in a fixed number of steps."""
    from sklearn.svm import SVC

    svm = SVC(kernel="linear", C=1.0 / (2 * len(y) * lam), tol=tol, cache_size=cache_mb)
    svm.fit(x.double().numpy() * input_scale, y.numpy())
    w = torch.from_numpy(np.array(svm.coef_[0])).to(x.dtype) * input_scale
    return w, torch.tensor(float(svm.intercept_[0]), dtype=x.dtype)


def minimal_l2_perturbation(score: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps_max: float,
                            search_steps: int = 12, pgd_steps: int = 20) -> Tensor:
    """The smallest L2 radius at which projected gradient steps flip each point's class (inf if none up to
    eps_max). `score(x)` is a logit per point, positive for class 1.

    For every radius a bisection proposes, L2 PGD (normalised gradient steps of 2.5ε/steps, projected onto
    the ε-ball) pushes the margin y·score below 0; the bisection keeps the smallest radius that worked.
    For a linear score this recovers |w·x + b|/||w|| to within eps_max / 2^search_steps."""
    sign = (2 * y - 1).to(x.dtype)
    lo = torch.zeros(len(x), dtype=x.dtype)
    hi = torch.full((len(x),), float(eps_max), dtype=x.dtype)
    found = torch.zeros(len(x), dtype=torch.bool)
    for it in range(search_steps + 1):
        eps = hi if it == 0 else (lo + hi) / 2
        ok = _pgd_flips(score, x, sign, eps, pgd_steps)
        if it == 0:
            found = ok
            continue
        hi = torch.where(ok, eps, hi)
        lo = torch.where(ok, lo, eps)
    return torch.where(found, hi, torch.full_like(hi, math.inf))


def _pgd_flips(score: Callable[[Tensor], Tensor], x: Tensor, sign: Tensor, eps: Tensor, steps: int) -> Tensor:
    delta = torch.zeros_like(x)
    flipped = torch.zeros(len(x), dtype=torch.bool)
    step = (2.5 * eps / steps).unsqueeze(1)
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            margin = sign * score(x + delta)
            flipped |= (margin < 0).detach()
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                g = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                delta = delta - step * g
                delta = delta * (eps / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).unsqueeze(1)
    with torch.no_grad():
        flipped |= sign * score(x + delta) < 0
    return flipped


# ---------------------------------------------------------------------------------------------- data


class TiltingData(DataModule):
    """A digit pair as the tilting experiments need it: `base` (the pair as 0/1 labels), with a fraction
    `label_noise` of the *training* labels flipped (which, fixed per `seed`; validation and test labels stay
    clean), and `flat_pixels` near-constant pixels (value + N(0, std²) noise, fixed per split by `seed`)
    appended to every image: directions of tiny variance along which a boundary can tilt without changing how
    the data is classified. 0 and 0: `base` unchanged.
    `root` is only recorded: configs pass it on to `base` (`base.root: ${dataset.root}`), so that
    `dataset.root=...` works as for every other dataset.
    """

    def __init__(self, base: DataModule, flat_pixels: int = 0, std: float = 0.01, value: float = 0.0,
                 label_noise: float = 0.0, seed: int = 0, batch_size: int | None = None,
                 eval_batch_size: int | None = None, drop_last: bool = False, root: str | None = None,
                 download: bool = False) -> None:
        if not 0.0 <= label_noise < 0.5:
            raise ValueError(f"label_noise={label_noise}: expected a fraction in [0, 0.5)")
        self.root, self.download = root, download  # both reach `base` through the config (dataset.root/download)
        self.base, self.flat_pixels, self.std, self.value, self.seed = base, int(flat_pixels), std, value, seed
        self.label_noise = label_noise
        self.batch_size = batch_size if batch_size is not None else base.batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else base.eval_batch_size
        self.drop_last = drop_last
        self._cache: dict[str, TensorDataset] = {}
        self.flipped = 0

    def dataset(self, split: str, stage: str | None = None) -> Dataset:
        if split not in self._cache:
            x, y = split_tensors(self.base.dataset(split, stage))
            if split == "train" and self.label_noise:
                g = torch.Generator().manual_seed(self.seed * 7919 + 104729)
                k = round(self.label_noise * len(y))
                idx = torch.randperm(len(y), generator=g)[:k]
                y = y.clone()
                y[idx] = 1 - y[idx]
                self.flipped = k
            if self.flat_pixels:
                g = torch.Generator().manual_seed(self.seed * 7919 + ("train", "val", "test").index(split))
                noise = torch.randn(len(x), self.flat_pixels, generator=g, dtype=x.dtype)
                x = torch.cat([x, self.value + self.std * noise], dim=1)
            self._cache[split] = TensorDataset(x, y)
        return self._cache[split]

    def describe(self) -> dict[str, Any]:
        self.dataset("train")
        return {**self.base.describe(), "flat_pixels": self.flat_pixels, "flat_std": self.std,
                "label_noise": self.label_noise, "flipped_train_labels": self.flipped}


def split_tensors(ds: Dataset) -> tuple[Tensor, Tensor]:
    """A whole (x, y) split as two tensors, x flattened to vectors."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
    else:
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        x, y = torch.stack(xs), torch.as_tensor(ys)
    return x.reshape(len(x), -1).float(), y.long()


# ---------------------------------------------------------------------------------------------- task


class BoundaryTilting(Task):
    """Stage `svm` (no gradient: one step that fits on the whole train split) and stage `mlp` (the shared
    trainer fits a one-hidden-layer ReLU MLP to the same objective, (1/n) Σ hinge + λ Σ||W||², on the same
    scaled inputs). Evaluation reports the SVM's error, θ, d_adv and normalised boundary distances, the
    nearest-centroid classifier's error, the tilting construction's θ and error change, and the MLP's error
    and minimal L2 adversarial distance.

    Args:
        in_features: pixels per image; extra_features: flat pixels appended by `TiltingData`.
        lam: the L2 regularisation λ of (1/n) Σ hinge + λ||w||² on inputs scaled by input_scale.
        input_scale: the factor to the [0, 1] pixel values the data arrive in, so that λ means what it means on
            the pixel scale the authors' λ assumes.
        tilt_factor: the construction adds t·e with t = tilt_factor x ||w|| along a zero-variance direction e
            of the training images (θ >= arctan(tilt_factor) when w·e = 0); 0 turns it off.
        hidden: MLP width (0: no MLP stage metrics). optimizer: a partial optimizer for the MLP.
        attack_search_steps, attack_pgd_steps, attack_eps_max: the minimal-perturbation search (eps_max in
            units of ||Δ||).
        mirror_examples: test digits shown with their mirror images in the run's figure.
    """

    def __init__(self, in_features: int, lam: float, optimizer: Callable[..., torch.optim.Optimizer],
                 extra_features: int = 0, input_scale: float = 1.0, tilt_factor: float = 10.0, hidden: int = 32,
                 attack_search_steps: int = 12, attack_pgd_steps: int = 20, attack_eps_max: float = 2.0,
                 svm_tol: float = 1e-6, mirror_examples: int = 8) -> None:
        super().__init__()
        d = int(in_features) + int(extra_features)
        self.in_features, self.extra_features = in_features, extra_features
        self.lam, self.input_scale, self.tilt_factor = lam, input_scale, tilt_factor
        self._optimizer = optimizer
        self.attack = {"search_steps": attack_search_steps, "pgd_steps": attack_pgd_steps, "eps_max": attack_eps_max}
        self.svm_tol, self.mirror_examples = svm_tol, mirror_examples
        self.mlp = nn.Sequential(nn.Linear(d, max(hidden, 1)), nn.ReLU(), nn.Linear(max(hidden, 1), 1))
        self.use_mlp = hidden > 0
        for name, shape in (("w", (d,)), ("b", ()), ("delta", (d,)), ("centroid_b", ()), ("train_err", ()),
                            ("train_in_margin", ()), ("centroid_train_err", ()), ("d_adv", ()), ("tilt_w", (d,)),
                            ("tilt_b", ()), ("tilted", ()), ("mlp_steps", ())):
            self.register_buffer(name, torch.zeros(shape))
        self._train: tuple[Tensor, Tensor] | None = None

    # -------------------------------------------------------------- stages
    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self._train = split_tensors(data.dataset("train", stage))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.stage == "mlp" and self.use_mlp:
            return {"mlp": self._optimizer(self.mlp.parameters())}
        return {}

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor]]:
        if self.stage == "svm":
            self.fit_svm()
            return
        if not self.use_mlp:
            return
        x, y = batch
        hinge = (1 - (2 * y - 1) * self.mlp_score(x)).clamp_min(0).mean()
        l2 = sum((m.weight**2).sum() for m in self.mlp if isinstance(m, nn.Linear))
        self.log("hinge", hinge)
        self.mlp_steps += 1
        yield "mlp", hinge + self.lam * l2

    @torch.no_grad()
    def fit_svm(self) -> None:
        x, y = self._train
        w, b = fit_linear_svm(x.cpu(), y.cpu(), self.lam, self.input_scale, self.svm_tol)
        self.w.copy_(w)
        self.b.fill_(float(b))
        delta, cb = nearest_centroid(x.cpu(), y.cpu())
        self.delta.copy_(delta)
        self.centroid_b.fill_(float(cb))
        f = x @ self.w + self.b
        self.train_err.fill_(float(((f > 0).long() != y).float().mean()))
        # f is also the scaled problem's functional margin: (w/s)·(s x) + b
        self.train_in_margin.fill_(float(((2 * y - 1) * f < 1 - 1e-6).float().mean()))
        self.centroid_train_err.fill_(float((((x @ delta + cb) > 0).long() != y).float().mean()))
        self.d_adv.fill_(adversarial_distance(x, y, self.w, self.b))
        e = zero_variance_direction(x.cpu()) if self.tilt_factor else None
        if e is not None:
            tw, tb = tilt(self.w, self.b, e.to(x.dtype), self.tilt_factor * float(self.w.norm()), x[0])
            self.tilt_w.copy_(tw)
            self.tilt_b.fill_(float(tb))
            self.tilted.fill_(1.0)

    def mlp_score(self, x: Tensor) -> Tensor:
        return self.mlp(x * self.input_scale).squeeze(-1)

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        xs, ys = zip(*loader)
        x, y = torch.cat(xs).float(), torch.cat(ys).long()
        w, b, delta = self.w, self.b, self.delta
        correct = ((x @ w + b) > 0).long() == y
        theta = deviation_angle(w, delta)
        scale = float(delta.norm())
        out = {
            "err": 1 - float(correct.float().mean()), "train_err": float(self.train_err),
            "train_in_margin": float(self.train_in_margin), "theta": theta, "d_adv": float(self.d_adv),
            "centroid_err": float((((x @ delta + self.centroid_b) > 0).long() != y).float().mean()),
            "centroid_train_err": float(self.centroid_train_err), "delta_norm": scale, "lam": float(self.lam),
            "flat_pixels": float(self.extra_features),
        }
        if correct.any():
            out["dist_norm"] = float(boundary_distance(x[correct], w, b).median()) / scale
        if bool(self.tilted):
            tilted_correct = ((x @ self.tilt_w + self.tilt_b) > 0).long() == y
            out["tilt_theta"] = deviation_angle(self.tilt_w, delta)
            out["tilt_err_change"] = abs(float(tilted_correct.float().mean()) - float(correct.float().mean()))
        if self.use_mlp and int(self.mlp_steps) > 0:
            ok = (self.mlp_score(x) > 0).long() == y
            out["mlp_err"] = 1 - float(ok.float().mean())
            if ok.any():  # points not flipped within eps_max count as eps_max (a lower bound): finite metrics
                eps_max = self.attack["eps_max"] * scale
                eps = minimal_l2_perturbation(self.mlp_score, x[ok], y[ok], eps_max,
                                              self.attack["search_steps"], self.attack["pgd_steps"])
                out["mlp_dist_norm"] = float(eps.clamp(max=eps_max).median()) / scale
                out["mlp_unflipped"] = float(torch.isinf(eps).float().mean())
        return out

    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        x, y = split_tensors(data.dataset("test"))
        k = self.mirror_examples
        idx = torch.cat([torch.nonzero(y == c).flatten()[: (k + 1) // 2] for c in (0, 1)])[:k]
        orig, mirrored = x[idx], mirror(x[idx], self.w, self.b)
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(out_dir / "mirrors.npz", x=orig.numpy(), mirror=mirrored.numpy(), y=y[idx].numpy(),
                 in_features=self.in_features, lam=self.lam, theta=deviation_angle(self.w, self.delta))
        path = out_dir / "mirrors.png"
        _draw_mirror_rows([(f"λ={self.lam:g}, θ={deviation_angle(self.w, self.delta):.0f}°", orig.numpy(),
                            mirrored.numpy())], self.in_features, path)
        return [path]


# ---------------------------------------------------------------------------------------------- study


def _per_lambda(study: dict, flat: bool) -> dict[float, dict[str, float]]:
    """λ -> metric -> median over seeds, for the runs with (flat=True) or without flat pixels."""
    by: dict[float, dict[str, list[float]]] = {}
    for r in study["runs"]:
        m = r.get("metrics") or {}
        if r.get("status") != "completed" or "test/lam" not in m or (m.get("test/flat_pixels", 0) > 0) != flat:
            continue
        g = by.setdefault(float(m["test/lam"]), {})
        for k, v in m.items():
            if k.startswith("test/"):
                g.setdefault(k[5:], []).append(float(v))
    return {lam: {k: float(np.median(v)) for k, v in ms.items()} for lam, ms in sorted(by.items())}


def degenerate(row: dict[str, float], gap: float) -> bool:
    """Regularisation so strong that the SVM has lost the training data: its training error exceeds the
    nearest-centroid classifier's by more than `gap` (every point sits inside the margin, w is pinned to the
    class-sum direction and the offset b is no longer set by the data)."""
    return row["train_err"] > row["centroid_train_err"] + gap


def summarize(study: dict, degenerate_gap: float = 0.1) -> dict[str, float]:
    """The sweep-level numbers the claims check, from per-λ medians over the runs given (called once per seed,
    these are that seed's values; non-degenerate λ only): Spearman ρ between log(1/λ) and θ; θ at the strongest
    and the weakest λ; the normalised distance's and d_adv's ratios between them; the test-error range; the
    tilting construction at the strongest λ; and, with flat pixels, θ and the test-error gap at the weakest λ."""
    from scipy.stats import spearmanr

    base, flat = _per_lambda(study, False), _per_lambda(study, True)
    lams = [lam for lam, row in base.items() if not degenerate(row, degenerate_gap)]
    out: dict[str, float] = {"n_lambda": float(len(base)), "n_degenerate": float(len(base) - len(lams))}
    if len(lams) < 2:
        return out
    strong, weak = max(lams), min(lams)
    thetas = [base[lam]["theta"] for lam in lams]
    errs = [base[lam]["err"] for lam in lams]
    rho = spearmanr([-math.log10(lam) for lam in lams], thetas).statistic
    out.update({
        "spearman_rho": float(rho), "lam_strong": strong, "lam_weak": weak,
        "theta_strong": base[strong]["theta"], "theta_weak": base[weak]["theta"],
        "dist_norm_strong": base[strong]["dist_norm"], "dist_norm_weak": base[weak]["dist_norm"],
        "dist_ratio": base[strong]["dist_norm"] / base[weak]["dist_norm"],
        "d_adv_ratio": base[strong]["d_adv"] / base[weak]["d_adv"],
        "err_range": max(errs) - min(errs), "err_strong": base[strong]["err"], "err_weak": base[weak]["err"],
    })
    if "tilt_theta" in base[strong]:
        out.update({"theta_tilt_strong": base[strong]["tilt_theta"],
                    "err_change_tilt_strong": base[strong]["tilt_err_change"]})
    degen = [lam for lam in base if lam not in lams]
    if degen:
        out["lam_degenerate_min"] = min(degen)
    # the MLP collapses at a different λ than the SVM: keep the λ where most correct points can be flipped
    mlp_lams = [lam for lam in lams if base[lam].get("mlp_unflipped", 1.0) < 0.5]
    if len(mlp_lams) >= 2:
        ms, mw = max(mlp_lams), min(mlp_lams)
        mlp = [base[lam]["mlp_dist_norm"] for lam in mlp_lams]
        out.update({"mlp_lam_strong": ms, "mlp_dist_ratio": base[ms]["mlp_dist_norm"] / base[mw]["mlp_dist_norm"],
                    "mlp_dist_norm_strong": base[ms]["mlp_dist_norm"], "mlp_dist_norm_weak": base[mw]["mlp_dist_norm"],
                    "mlp_err_strong": base[ms]["mlp_err"], "mlp_err_weak": base[mw]["mlp_err"],
                    "mlp_spearman_rho": float(spearmanr([-math.log10(lam) for lam in mlp_lams], mlp).statistic)})
    if weak in flat:
        out.update({"theta_weak_flat": flat[weak]["theta"], "err_weak_flat": flat[weak]["err"],
                    "err_gap_flat": abs(flat[weak]["err"] - base[weak]["err"]),
                    "dist_norm_weak_flat": flat[weak]["dist_norm"]})
    return out


def _per_lambda_seeds(study: dict, flat: bool, key: str) -> dict[float, list[float]]:
    """λ -> the metric's value in each completed run (one per seed), for the runs with or without flat pixels."""
    out: dict[float, list[float]] = {}
    for r in study["runs"]:
        m = r.get("metrics") or {}
        if r.get("status") != "completed" or "test/lam" not in m or (m.get("test/flat_pixels", 0) > 0) != flat:
            continue
        if key == "d_adv_over":
            value = m.get("test/d_adv", math.nan) / m.get("test/delta_norm", math.nan)
        else:
            value = m.get(f"test/{key}", math.nan)
        out.setdefault(float(m["test/lam"]), []).append(float(value))
    return dict(sorted(out.items()))


def study_figure(study: dict, out_dir: Path, degenerate_gap: float = 0.1) -> list[Path]:
    """θ, normalised distances and test error against λ (lines: the median over seeds; dots: each seed);
    mirror images at strong and weak regularisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = _per_lambda(study, False)
    if not base:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lams = list(base)
    degen = [lam for lam in lams if degenerate(base[lam], degenerate_gap)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("deviation angle θ (degrees)", [("SVM", False, "theta"), ("SVM + flat pixels", True, "theta")]),
        ("distance to boundary / ||Δ||", [("SVM: median distance, correct test points", False, "dist_norm"),
                                           ("SVM: d_adv / ||Δ|| (training set)", False, "d_adv_over"),
                                           ("SVM + flat pixels: median distance", True, "dist_norm"),
                                           ("MLP: minimal L2 attack, median", False, "mlp_dist_norm")]),
        ("test error", [("SVM", False, "err"), ("SVM + flat pixels", True, "err"), ("MLP", False, "mlp_err"),
                        ("nearest centroid", False, "centroid_err")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        top = 0.0
        for k, (label, flat, key) in enumerate(series):
            per = {lam: [v for v in vs if math.isfinite(v)] for lam, vs in _per_lambda_seeds(study, flat, key).items()}
            per = {lam: vs for lam, vs in per.items() if vs}
            if not per:
                continue
            xs = list(per)
            line = ax.plot(xs, [float(np.median(per[lam])) for lam in xs], label=label, ls="--" if flat else "-")[0]
            jitter = 1.06 ** (k - len(series) / 2)
            for lam in xs:
                ax.plot([lam * jitter] * len(per[lam]), per[lam], "o", ms=3, alpha=0.35, color=line.get_color())
            if not key.startswith("mlp"):  # a collapsed MLP's distances sit at the attack's cap
                top = max([top] + [max(per[lam]) for lam in xs if lam not in degen])
        if degen:
            ax.axvspan(min(degen) / 10**0.25, max(degen) * 10**0.25, color="grey", alpha=0.2, label="degenerate λ")
        if title.startswith("distance") and top > 0:
            ax.set_ylim(0, 1.15 * top)  # the degenerate λ's distances (and a collapsed MLP's) run off the scale
        ax.set_xscale("log")
        ax.set_xlabel("λ (weaker regularisation to the left)")
        ax.set_title(f"{title}\nlines: median of seeds; dots: seeds", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    curves = out_dir / "tilting_vs_lambda.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    paths = [curves]

    ok = [lam for lam in lams if lam not in degen]
    rows = []
    for lam, want_flat in ((max(ok), False), (min(ok), False), (min(ok), True)) if ok else ():
        run = _first_run(study, lam, want_flat)
        if run is None or not (Path(run["dir"]) / "figures" / "mirrors.npz").exists():
            continue
        z = np.load(Path(run["dir"]) / "figures" / "mirrors.npz")
        tag = " + flat pixels" if want_flat else ""
        rows.append((f"λ={lam:g}{tag}: θ={float(z['theta']):.0f}°", z["x"], z["mirror"]))
        in_features = int(z["in_features"])
    if rows:
        path = out_dir / "mirror_images.png"
        _draw_mirror_rows(rows, in_features, path)
        paths.append(path)
    return paths


def _first_run(study: dict, lam: float, flat: bool) -> dict | None:
    runs = [r for r in study["runs"] if r.get("status") == "completed"
            and float((r.get("metrics") or {}).get("test/lam", math.nan)) == lam
            and ((r["metrics"].get("test/flat_pixels", 0) > 0) == flat)]
    return min(runs, key=lambda r: r.get("seed") or 0) if runs else None


def _draw_mirror_rows(rows: list[tuple[str, np.ndarray, np.ndarray]], in_features: int, path: Path) -> None:
    """Each row: test digits (top) over their mirror images through the boundary (bottom), pixels only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = math.isqrt(in_features)
    k = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(2 * len(rows), k, figsize=(1.1 * k, 2.4 * len(rows)), squeeze=False)
    for i, (title, orig, mir) in enumerate(rows):
        lo, hi = float(orig[:, :in_features].min()), float(orig[:, :in_features].max())
        for j in range(k):
            for r, imgs in ((2 * i, orig), (2 * i + 1, mir)):
                ax = axes[r, j]
                ax.axis("off")
                if j < len(imgs):
                    ax.imshow(imgs[j, :in_features].reshape(side, side), cmap="gray", vmin=lo, vmax=hi)
        axes[2 * i, 0].set_title(title, loc="left", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
