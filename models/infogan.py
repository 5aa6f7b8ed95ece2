"""InfoGAN (Chen et al. 2016): a GAN whose generator is made to keep part of its input recoverable.

G(z, c) gets noise z and structured codes c (one categorical, a few uniform continuous ones); Q, a head on
D's trunk, predicts c from an image. The variational lower bound

    L_I(G, Q) = E_{c, z}[log Q(c | G(z, c))] + H(c)  <=  I(c; G(z, c))

is maximised by Q and, with weight λ, by G. As in the authors' code, Q's head lives with D (the shared trunk
and both heads are D's variables, stepped by D's optimizer at D's learning rate) and L_I enters both D's and
G's losses; the trainer steps D first, then resumes the step for G, which draws fresh codes (the authors' second
`sess.run` samples the prior again). λ = 0 is the paper's control (its Figure 1): Q is still fit to G's images,
but G is not asked to use c, so the bound shows how much of c survives in a plain GAN's images.

Q is trained on generated images only, so its batch-norm statistics are those of fake images. Where Q's
categorical code is scored as a classifier of *real* digits, the batch norms of the trunk and Q's head use
statistics re-estimated on the real training digits (one pass, a cumulative average, on a copy: training is
untouched); L_I on generated images keeps the trained statistics. k-means (10 clusters) on the trunk's features
of the real digits is scored the same way, as the reference for what a categorical code that ignores the digits
can reach by clustering D's features (`kmeans_accuracy`), beside k-means on raw pixels.

`matched_accuracy` comes first and needs only numpy and scipy when called, so torch-free code (the report)
can reuse it.
"""

from __future__ import annotations

from typing import Any


def best_assignment(pred: Any, labels: Any) -> dict[int, int]:
    """The one-to-one map cluster id -> label that agrees with the most items (Hungarian, on counts).

    A categorical code's index is an arbitrary permutation of the classes, so it is judged under its best map.
    numpy/scipy only.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    pred = np.asarray(pred, dtype=np.int64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if pred.shape != labels.shape:
        raise ValueError(f"pred has {pred.size} items, labels {labels.size}")
    if pred.size == 0:
        return {}
    k = int(max(pred.max(), labels.max())) + 1
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (pred, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


def matched_accuracy(pred: Any, labels: Any) -> float:
    """Unsupervised accuracy: the share of items whose cluster maps to their label under `best_assignment`.

    numpy/scipy only (no torch at call time), so the torch-free report can reuse it.
    """
    import numpy as np

    pred = np.asarray(pred, dtype=np.int64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if pred.size == 0:
        return float("nan")
    mapping = best_assignment(pred, labels)
    mapped = np.array([mapping.get(int(p), -1) for p in pred])
    return float((mapped == labels).mean())


# ---------------------------------------------------------------------------------------------- torch part

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mlrun.task import Task  # noqa: E402


def categorical_bound(logits: Tensor, codes: Tensor) -> Tensor:
    """L_I of one categorical code: E[log Q(c|x)] + H(c), with c uniform over k values (H = ln k).

    Equals ln k when Q puts all its mass on the true c, 0 when Q is uniform, and is lower when Q is confidently
    wrong.
    """
    k = logits.shape[1]
    return F.log_softmax(logits, dim=1).gather(1, codes[:, None]).mean() + math.log(k)


def gaussian_bound(mean: Tensor, log_std: Tensor, codes: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """L_I of continuous codes c ~ U(low, high)^d under a factored Gaussian Q: E[sum_j log N(c_j; mu_j, s_j)]
    + d ln(high - low) (the differential entropy of the uniform prior)."""
    log_q = -0.5 * ((codes - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return log_q.sum(1).mean() + codes.shape[1] * math.log(high - low)


class ConvGenerator(nn.Module):
    """The paper's MNIST generator, sized by arguments: FC hidden, FC (s/4)^2 x 2c, upconv c, upconv 1 (4x4,
    stride 2), BN and ReLU between, a sigmoid output (the authors' Bernoulli mean). MNIST: s=28, c=64, hidden=1024.
    """

    def __init__(self, latent_dim: int, image_size: int = 28, channels: int = 64, hidden: int = 1024,
                 out_channels: int = 1, batchnorm: bool = True) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size={image_size}: must be a multiple of 4 (two stride-2 upconvolutions)")
        self.base, self.channels = image_size // 4, channels

        def bn(n: int, conv: bool = False) -> nn.Module:
            return (nn.BatchNorm2d(n) if conv else nn.BatchNorm1d(n)) if batchnorm else nn.Identity()

        flat = self.base * self.base * 2 * channels
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, hidden), bn(hidden), nn.ReLU(),
            nn.Linear(hidden, flat), bn(flat), nn.ReLU(),
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1), bn(channels, conv=True), nn.ReLU(),
            nn.ConvTranspose2d(channels, out_channels, 4, 2, 1), nn.Sigmoid(),
        )

    def forward(self, latent: Tensor) -> Tensor:
        h = self.fc(latent).view(-1, 2 * self.channels, self.base, self.base)
        return self.up(h)


class ConvTrunk(nn.Module):
    """The paper's MNIST D/Q trunk, sized by arguments: conv c (4x4, stride 2), lReLU; conv 2c, BN, lReLU;
    FC hidden, BN, lReLU. D's and Q's heads sit on its `out_features` outputs."""

    def __init__(self, image_size: int = 28, channels: int = 64, hidden: int = 1024, in_channels: int = 1,
                 leak: float = 0.1, batchnorm: bool = True) -> None:
        super().__init__()
        side = image_size // 2 // 2  # two 4x4 stride-2 convolutions with padding 1
        self.out_features = hidden
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(leak),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.BatchNorm2d(2 * channels) if batchnorm else nn.Identity(),
            nn.LeakyReLU(leak), nn.Flatten(),
            nn.Linear(2 * channels * side * side, hidden), nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(),
            nn.LeakyReLU(leak),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPGenerator(nn.Module):
    """A fully connected G for tiny images (the CPU miniature): the conv G's layering with its upconvolutions
    replaced by one FC layer: FC hidden, BN, ReLU; FC hidden, BN, ReLU; FC pixels, sigmoid."""

    def __init__(self, latent_dim: int, image_size: int = 8, hidden: int = 256, out_channels: int = 1,
                 batchnorm: bool = True) -> None:
        super().__init__()
        self.shape = (out_channels, image_size, image_size)

        def bn(n: int) -> nn.Module:
            return nn.BatchNorm1d(n) if batchnorm else nn.Identity()

        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), bn(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), bn(hidden), nn.ReLU(),
            nn.Linear(hidden, out_channels * image_size * image_size), nn.Sigmoid(),
        )

    def forward(self, latent: Tensor) -> Tensor:
        return self.net(latent).view(-1, *self.shape)


class MLPTrunk(nn.Module):
    """A fully connected D/Q trunk for tiny images: FC hidden, lReLU; FC hidden, BN, lReLU (as the conv trunk,
    no BN on the first layer)."""

    def __init__(self, image_size: int = 8, hidden: int = 256, in_channels: int = 1, leak: float = 0.1,
                 batchnorm: bool = True) -> None:
        super().__init__()
        self.out_features = hidden
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.LeakyReLU(leak),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(), nn.LeakyReLU(leak),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class InfoGAN(Task):
    """Args:
        generator: partial module, called with `latent_dim` (noise + one-hot categorical + continuous).
        trunk: partial module mapping images to features, with an `out_features` attribute (D and Q share it).
        g_optimizer, d_optimizer: partial optimizers; D's also steps the trunk and Q's head (the authors' code).
        noise_dim, categories, continuous: sizes of z, of the one categorical code, and of the U(-1, 1) codes.
        noise: "uniform" (U(-1, 1), the authors') or "normal".
        mi_weight: λ, the weight of -L_I in G's loss (0: the paper's plain-GAN control).
        q_weight: the weight of -L_I in D/Q's loss (λ in the paper's runs; kept at 1 in the control so that Q
            still measures what c leaves in G's images).
        cont_weight: the extra weight of the continuous codes' bound (a smaller λ for continuous codes).
        fix_std: Q's Gaussians have standard deviation 1 (the authors' MNIST run), else Q predicts it.
        q_hidden: width of Q's own FC-BN-lReLU layer before its output.
        eval_samples: generated images on which evaluation measures L_I (fixed codes, `eval_seed`).
        score_splits: the splits whose real digits the final test evaluation scores together (e.g. [val, test]: no
            model selection uses val here, and more digits make a per-seed accuracy less noisy); None: the test
            split alone. Periodic val evaluations score the val split.
        bn_stats: "real" (re-estimate the batch-norm statistics of the trunk and Q's head on the real training
            digits before scoring real digits) or "trained" (the statistics accumulated in training, fake images
            for Q's head).
        kmeans: also report k-means (10 clusters, fitted on the training digits) on the trunk's features and on
            raw pixels, scored by the same matched accuracy.
        g_codes: "fresh" (G's step samples new noise and codes, as the authors' loop) or "reuse" (G's step
            reuses the D step's, the project's earlier behaviour, kept as a variant).
        traversal: the continuous codes' range in the traversal figure (the paper shows -2..2).
    """

    def __init__(self, generator: Callable[..., nn.Module], trunk: Callable[..., nn.Module],
                 g_optimizer: Callable[..., torch.optim.Optimizer], d_optimizer: Callable[..., torch.optim.Optimizer],
                 noise_dim: int = 62, categories: int = 10, continuous: int = 2, noise: str = "uniform",
                 mi_weight: float = 1.0, q_weight: float = 1.0, cont_weight: float = 1.0, fix_std: bool = True,
                 q_hidden: int = 128, leak: float = 0.1, eval_samples: int = 1000, eval_seed: int = 1234,
                 score_splits: list[str] | None = None, bn_stats: str = "real", kmeans: bool = True,
                 g_codes: str = "fresh", traversal: float = 2.0, traversal_steps: int = 9) -> None:
        super().__init__()
        if noise not in ("uniform", "normal"):
            raise ValueError(f"noise={noise!r}: expected 'uniform' or 'normal'")
        if bn_stats not in ("real", "trained"):
            raise ValueError(f"bn_stats={bn_stats!r}: expected 'real' or 'trained'")
        self.score_splits = list(score_splits) if score_splits else None
        if g_codes not in ("fresh", "reuse"):
            raise ValueError(f"g_codes={g_codes!r}: expected 'fresh' or 'reuse'")
        self.bn_stats, self.kmeans, self.g_codes = bn_stats, kmeans, g_codes
        self._data: Any = None
        self.noise_dim, self.categories, self.continuous, self.noise = noise_dim, categories, continuous, noise
        self.mi_weight, self.q_weight, self.cont_weight = float(mi_weight), float(q_weight), float(cont_weight)
        self.fix_std = fix_std
        self.eval_samples, self.eval_seed = eval_samples, eval_seed
        self.traversal, self.traversal_steps = traversal, traversal_steps
        self.generator = generator(latent_dim=noise_dim + categories + continuous)
        self.trunk = trunk()
        features = self.trunk.out_features
        self.d_head = nn.Linear(features, 1)
        q_out = categories + continuous * (1 if fix_std else 2)
        self.q_head = nn.Sequential(nn.Linear(features, q_hidden), nn.BatchNorm1d(q_hidden), nn.LeakyReLU(leak),
                                    nn.Linear(q_hidden, q_out))
        self._g_optimizer, self._d_optimizer = g_optimizer, d_optimizer

    # ------------------------------------------------------------------ pieces
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        d_params = [*self.trunk.parameters(), *self.d_head.parameters(), *self.q_head.parameters()]
        g_params = list(self.generator.parameters())
        return {"discriminator": self._d_optimizer(d_params), "generator": self._g_optimizer(g_params)}

    def sample_codes(self, n: int, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(z, categorical index, continuous codes) from the prior, on CPU when `gen` is given, else on the
        model's device."""
        device = torch.device("cpu") if gen is not None else self._device()
        if self.noise == "uniform":
            z = torch.rand(n, self.noise_dim, generator=gen, device=device) * 2 - 1
        else:
            z = torch.randn(n, self.noise_dim, generator=gen, device=device)
        cat = torch.randint(self.categories, (n,), generator=gen, device=device)
        cont = torch.rand(n, self.continuous, generator=gen, device=device) * 2 - 1
        return z, cat, cont

    def generate(self, z: Tensor, cat: Tensor, cont: Tensor) -> Tensor:
        return self.generator(torch.cat([z, F.one_hot(cat, self.categories).to(z.dtype), cont], dim=1))

    def q(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q's distribution parameters: categorical logits, Gaussian means and log standard deviations."""
        out = self.q_head(features)
        logits, rest = out[:, : self.categories], out[:, self.categories :]
        mean = rest[:, : self.continuous]
        log_std = torch.zeros_like(mean) if self.fix_std else rest[:, self.continuous :].clamp(-5.0, 2.0)
        return logits, mean, log_std

    def bounds(self, features: Tensor, cat: Tensor, cont: Tensor) -> tuple[Tensor, Tensor]:
        """(categorical L_I, continuous L_I) of Q on images whose codes were (cat, cont)."""
        logits, mean, log_std = self.q(features)
        li_cont = gaussian_bound(mean, log_std, cont) if self.continuous else logits.new_zeros(())
        return categorical_bound(logits, cat), li_cont

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor]]:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        z, cat, cont = self.sample_codes(len(x))
        fake = self.generate(z, cat, cont)

        real_logit = self.d_head(self.trunk(x))
        fake_features = self.trunk(fake.detach())
        fake_logit = self.d_head(fake_features)
        d_adv = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                 + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
        li_cat, li_cont = self.bounds(fake_features, cat, cont)
        self.log("mi_lower_bound", li_cat)
        if self.continuous:
            self.log("mi_cont", li_cont)
        yield "discriminator", d_adv - self.q_weight * (li_cat + self.cont_weight * li_cont)

        # D (trunk and heads) has just been stepped; G is judged by the updated D on fresh codes, as in the
        # authors' loop (its generator step is a second sess.run, which samples the prior again).
        if self.g_codes == "fresh":
            z, cat, cont = self.sample_codes(len(x))
            fake = self.generate(z, cat, cont)
        features = self.trunk(fake)
        logit = self.d_head(features)
        g_adv = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        g_cat, g_cont = self.bounds(features, cat, cont)
        yield "generator", g_adv - self.mi_weight * (g_cat + self.cont_weight * g_cont)

    # ------------------------------------------------------------------ evaluation
    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self._data = data

    def _split(self, name: str) -> Any:
        try:
            return self._data.dataset(name) if self._data is not None else None
        except KeyError:
            return None

    @torch.no_grad()
    def real_encoder(self) -> nn.Module:
        """trunk -> Q's head as used on real digits: with `bn_stats="real"`, a copy whose batch norms hold the
        statistics of the real training digits; else the trained modules themselves. One pass per batch norm, in
        forward order, with the layers before it already in eval mode, so each holds the cumulative average of
        exactly the input it will see at evaluation."""
        encoder = nn.Sequential(self.trunk, self.q_head)
        train = self._split("train")
        if self.bn_stats == "trained" or train is None:
            return encoder
        encoder = copy.deepcopy(encoder)
        norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return encoder
        encoder.eval()
        device = self._device()
        loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=False, drop_last=True)
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
            m.train()
            for x, _ in loader:
                encoder(x.to(device))
            m.eval()
        return encoder

    @torch.no_grad()
    def _features(self, module: nn.Module, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        out, labels = [], []
        device = self._device()
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=False):
            out.append(module(x.to(device)).cpu())
            labels.append(np.asarray(y))
        return torch.cat(out).numpy(), np.concatenate(labels)

    @torch.no_grad()
    def predict(self, loader: Any) -> tuple[np.ndarray, np.ndarray]:
        """Q's categorical argmax on real images, and their labels."""
        preds, labels = [], []
        device = self._device()
        was_training = self.training
        self.eval()
        encoder = self.real_encoder()
        for x, y in loader:
            logits = encoder(x.to(device))[:, : self.categories]
            preds.append(logits.argmax(1).cpu().numpy())
            labels.append(np.asarray(y))
        self.train(was_training)
        if not preds:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(preds), np.concatenate(labels)

    def _scored(self, loader: Any, split: str) -> Any:
        """What the split's real digits are scored on: the loader, or for the final test the union of
        `score_splits`."""
        if split != "test" or not self.score_splits:
            return loader
        parts = [self._split(name) for name in self.score_splits]
        if any(p is None for p in parts):
            return loader
        return torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(parts), batch_size=512, shuffle=False)

    @torch.no_grad()
    def kmeans_accuracies(self, scored: Any) -> dict[str, float]:
        """Matched accuracy of k-means (k = categories, fitted on the real training digits) on the trunk's
        features and on raw pixels of the scored digits."""
        from sklearn.cluster import KMeans

        train = self._split("train")
        if train is None:
            return {}
        scored_ds = scored.dataset if isinstance(scored, torch.utils.data.DataLoader) else None
        if scored_ds is None:
            return {}
        was_training = self.training
        self.eval()
        trunk = self.real_encoder()[0]
        out = {}
        for name, module in (("kmeans_accuracy", trunk), ("pixel_kmeans_accuracy", nn.Flatten())):
            f_train, _ = self._features(module, train)
            f_eval, y_eval = self._features(module, scored_ds)
            km = KMeans(n_clusters=self.categories, n_init=10, random_state=self.eval_seed).fit(f_train)
            out[name] = matched_accuracy(km.predict(f_eval), y_eval)
        self.train(was_training)
        return out

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        scored = self._scored(loader, split)
        preds, labels = self.predict(scored)
        # L_I on the same generated images at every evaluation and in every run: a fixed set of codes.
        z, cat, cont = (t.to(self._device()) for t in self.sample_codes(
            self.eval_samples, torch.Generator().manual_seed(self.eval_seed)))
        li_cat, li_cont = self.bounds(self.trunk(self.generate(z, cat, cont)), cat, cont)
        out = {"accuracy": matched_accuracy(preds, labels), "mi_lower_bound": float(li_cat),
               "scored_digits": float(len(labels))}
        if self.continuous:
            out["mi_cont"] = float(li_cont)
        if self.kmeans and split == "test":
            out.update(self.kmeans_accuracies(scored))
        return out

    # ------------------------------------------------------------------ figures
    @torch.no_grad()
    def traversal_images(self, code: int, order: list[int] | None = None) -> np.ndarray:
        """Images (rows: categorical values in `order`; columns: continuous code `code` from -r to r, the others
        at 0), one noise vector for the whole grid: shape (k, steps, C, H, W)."""
        order = list(range(self.categories)) if order is None else order
        k, steps = len(order), self.traversal_steps
        z, _, _ = self.sample_codes(1, torch.Generator().manual_seed(self.eval_seed))
        z = z.expand(k * steps, -1)
        cat = torch.tensor(order).repeat_interleave(steps)
        cont = torch.zeros(k * steps, self.continuous)
        cont[:, code] = torch.linspace(-self.traversal, self.traversal, steps).repeat(k)
        device = self._device()
        images = self.generate(z.to(device), cat.to(device), cont.to(device)).cpu().numpy()
        return images.reshape(k, steps, *images.shape[1:])

    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        was_training = self.training
        self.eval()
        try:
            mapping: dict[int, int] = {}
            for split in ("test", "val"):
                try:
                    ds = data.dataset(split)
                except KeyError:
                    continue
                loader = torch.utils.data.DataLoader(ds, batch_size=512)
                mapping = best_assignment(*self.predict(loader))
                break
            # rows sorted by the digit each categorical value was matched to, so row i should show digit i
            order = sorted(range(self.categories), key=lambda c: mapping.get(c, self.categories + c))
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            values = np.linspace(-self.traversal, self.traversal, self.traversal_steps)
            for code in range(self.continuous):
                grid = self.traversal_images(code, order)
                k, steps, _, h, w = grid.shape
                mosaic = grid[:, :, 0].transpose(0, 2, 1, 3).reshape(k * h, steps * w)
                fig, ax = plt.subplots(figsize=(0.5 * steps + 1.5, 0.5 * k + 1))
                ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
                ax.set_xticks((np.arange(steps) + 0.5) * w - 0.5, [f"{v:.1f}" for v in values], fontsize=7)
                ax.set_yticks((np.arange(k) + 0.5) * h - 0.5,
                              [f"c={c} ({mapping[c]})" if c in mapping else f"c={c}" for c in order], fontsize=7)
                ax.set_xlabel(f"continuous code {code + 1}")
                ax.set_ylabel("categorical code (matched digit)")
                ax.set_title(f"InfoGAN traversal (λ={self.mi_weight:g})", fontsize=9)
                fig.tight_layout()
                path = out_dir / f"traversal_c{code + 1}.png"
                fig.savefig(path, dpi=120)
                plt.close(fig)
                paths.append(path)
            return paths
        finally:
            self.train(was_training)


# ---------------------------------------------------------------------------------------------- study


def _run_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return steps, values
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if metric in row:
            steps.append(int(row.get("global_step", row.get("step", 0))))
            values.append(float(row[metric]))
    return steps, values


def _categories(run_dir: Path, default: int = 10) -> int:
    from omegaconf import OmegaConf

    try:
        return int(OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml").model.categories)
    except Exception:  # noqa: BLE001 - a figure never fails for want of a config
        return default


def study_figure(study: dict, out_dir: Path) -> list[Path]:
    """The paper's Figure 1 (L_I over training, InfoGAN against the λ=0 control, every seed) beside each run's
    final matched accuracy on the scored real digits (each seed a dot, the median a line), with k-means on each
    run's trunk features (open squares) and on pixels (dotted) as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in study["runs"] if r.get("status") == "completed"]
    labels = sorted({r["label"] for r in runs}, reverse=True)
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    k = 10
    for r in runs:
        steps, values = _run_curve(r["dir"], "train/mi_lower_bound")
        k = _categories(r["dir"], k)
        first = r is next(x for x in runs if x["label"] == r["label"])
        ax.plot(steps, values, color=colors[r["label"]], lw=1, alpha=0.8, label=r["label"] if first else None)
    ax.axhline(math.log(k), color="k", ls="--", lw=0.8, label=f"H(c) = ln {k}")
    ax.set_xlabel("update")
    ax.set_ylabel("L_I (nats)")
    ax.set_title("Mutual-information lower bound during training")
    ax.legend(fontsize=8)
    for i, label in enumerate(labels):
        accs = [float(r["metrics"]["test/accuracy"]) for r in runs
                if r["label"] == label and "test/accuracy" in r["metrics"]]
        bx.scatter([i] * len(accs), accs, color=colors[label], label="Q's categorical code" if i == 0 else None)
        if accs:
            bx.hlines(float(np.median(accs)), i - 0.25, i + 0.25, color=colors[label])
        km = [float(r["metrics"]["test/kmeans_accuracy"]) for r in runs
              if r["label"] == label and "test/kmeans_accuracy" in r["metrics"]]
        bx.scatter([i + 0.15] * len(km), km, facecolors="none", edgecolors=colors[label], marker="s", s=18,
                   label="k-means on D's trunk features" if i == 0 else None)
    pixel = [float(r["metrics"]["test/pixel_kmeans_accuracy"]) for r in runs
             if "test/pixel_kmeans_accuracy" in r["metrics"]]
    if pixel:
        bx.axhline(pixel[0], color="gray", ls=":", lw=1, label="k-means on pixels")
    scored = [int(r["metrics"]["test/scored_digits"]) for r in runs if "test/scored_digits" in r["metrics"]]
    bx.set_xticks(range(len(labels)), labels)
    bx.set_xlim(-0.6, len(labels) - 0.4)
    bx.set_ylim(0, 1)
    bx.set_ylabel(f"matched accuracy ({scored[0] if scored else 'test'} real digits)")
    bx.set_title("Categorical code as a classifier\n(dots: seeds, line: median)", fontsize=9)
    bx.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    path = out_dir / "mi_lower_bound.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
