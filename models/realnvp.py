"""Real NVP (Dinh, Sohl-Dickstein & Bengio, 2016): affine coupling flows for images, scored in bits/dim.

The flow maps dequantised, logit-transformed pixels to a standard Gaussian through coupling layers with
checkerboard and channel-wise masks, squeezes, and the multi-scale architecture that factors out half the
dimensions after each scale. `coupling="additive"` turns the same flow into NICE (Dinh et al. 2014):
volume-preserving couplings plus NICE's diagonal scaling of the output.

Bits/dim are in discrete units: the model's density of the dequantised value u = (k + noise) / levels in
[0, 1)^D bounds the probability of the integer pixels k from below by p(u) / levels^D, and the logit
preprocessing's log-det is counted, so the numbers compare with log2(levels) for a uniform model.

Batch normalization follows the paper's appendix E: training normalises with the running average *updated
with the current batch* (gradient only through the current batch's share). Evaluation uses the same stored
averages, so train and eval mode compute the same map and validation bits/dim cannot explode through stale
running statistics, the failure of plain batch norm (`bn_mode="batch"`) in flows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.task import Task

# ---------------------------------------------------------------------------------------------- preprocessing


def dequantize(x: Tensor, levels: int, noise: Tensor | None = None) -> Tensor:
    """Pixels in [0, 1] on a grid of `levels` values -> u = (k + noise) / levels in [0, 1)."""
    k = torch.round(x * (levels - 1))
    if noise is None:
        noise = torch.rand_like(x)
    return (k + noise) / levels


def logit_transform(u: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """y = logit(alpha + (1 - 2 alpha) u) and log|dy/du| summed per sample (the preprocessing's log-det)."""
    s = alpha + (1 - 2 * alpha) * u
    y = torch.log(s) - torch.log1p(-s)
    logdet = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return y, logdet


def logit_inverse(y: Tensor, alpha: float) -> Tensor:
    return ((torch.sigmoid(y) - alpha) / (1 - 2 * alpha)).clamp(0, 1)


def bits_per_dim(log_p_u: Tensor, dims: int, levels: int) -> Tensor:
    """Discrete bits/dim from log p(u) (nats, per sample): -(log p(u) - D log levels) / (D ln 2)."""
    return -(log_p_u - dims * math.log(levels)) / (dims * math.log(2))


def standard_normal_logprob(z: Tensor) -> Tensor:
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------- batch norm


class RunningBatchNorm(nn.Module):
    """Per-channel batch norm of (N, C, H, W) maps with two ways of using statistics in training.

    - ``mode="running"`` (Real NVP, appendix E): normalise with ``decay * running + (1 - decay) * batch`` and
      store that as the new running value; eval mode uses the stored value, so both modes compute one map.
    - ``mode="batch"`` (plain batch norm): normalise with the batch's statistics and track an exponential
      average that only eval mode uses; kept to show the failure the paper's variant avoids.

    The statistics used by the last training forward are kept so an inverse pass can undo exactly that map.
    """

    def __init__(self, num_features: int, decay: float = 0.8, eps: float = 1e-4, mode: str = "running",
                 affine: bool = True) -> None:
        super().__init__()
        if mode not in ("running", "batch"):
            raise ValueError(f"bn_mode={mode!r}: expected 'running' or 'batch'")
        self.decay, self.eps, self.mode = decay, eps, mode
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        self.log_gamma = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.beta = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.frozen = False  # set by `frozen_statistics`: reuse the last statistics (inverse passes)
        self._last: tuple[Tensor, Tensor] | None = None

    def statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self.running_mean, self.running_var
        if self.frozen and self._last is not None:
            return self._last
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        with torch.no_grad():
            if not bool(self.initialized):  # the first batch sets the averages (no lag from zeros/ones)
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
                self.initialized.fill_(True)
        if self.mode == "running":
            mean = self.decay * self.running_mean + (1 - self.decay) * mean
            var = self.decay * self.running_var + (1 - self.decay) * var
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        else:
            with torch.no_grad():
                self.running_mean.lerp_(mean, 1 - self.decay)
                self.running_var.lerp_(var, 1 - self.decay)
        self._last = (mean.detach(), var.detach())
        return mean, var

    def _shape(self, v: Tensor, x: Tensor) -> Tensor:
        return v.view(1, -1, *([1] * (x.dim() - 2)))

    def normalize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised output and the variance it used (with its gradient, for a log-det)."""
        mean, var = self.statistics(x)
        y = (x - self._shape(mean, x)) * self._shape(torch.rsqrt(var + self.eps), x)
        if self.log_gamma is not None:
            y = y * self._shape(self.log_gamma.exp(), x) + self._shape(self.beta, x)
        return y, var

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x)[0]


class FlowBatchNorm(RunningBatchNorm):
    """Batch norm as a flow layer: a per-channel affine map with log-det H*W*sum(log gamma - log sigma)."""

    def forward_flow(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, var = self.normalize(x)
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum() * x[0, 0].numel()
        return y, logdet.expand(x.shape[0])

    def _used(self) -> tuple[Tensor, Tensor]:
        """The statistics of the map: the last training forward's, or the running ones in eval mode."""
        if not self.training:
            return self.running_mean, self.running_var
        if self._last is None:
            raise RuntimeError("a training-mode inverse undoes the last forward's map: run a forward first")
        return self._last

    def inverse(self, y: Tensor) -> Tensor:
        mean, var = self._used()
        x = (y - self._shape(self.beta, y)) * self._shape((-self.log_gamma).exp(), y)
        return x * self._shape(torch.sqrt(var + self.eps), y) + self._shape(mean, y)


@contextlib.contextmanager
def frozen_statistics(module: nn.Module) -> Iterator[None]:
    """Make every batch norm reuse the statistics of its last forward (so a training-mode inverse undoes it)."""
    bns = [m for m in module.modules() if isinstance(m, RunningBatchNorm)]
    for m in bns:
        m.frozen = True
    try:
        yield
    finally:
        for m in bns:
            m.frozen = False


# ---------------------------------------------------------------------------------------------- s and t


def _wn_conv(cin: int, cout: int, k: int) -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return weight_norm(nn.Conv2d(cin, cout, k, padding=k // 2))


class ResBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3 twice, weight-normalised convolutions."""

    def __init__(self, ch: int, bn: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(bn(ch), nn.ReLU(), _wn_conv(ch, ch, 3), bn(ch), nn.ReLU(), _wn_conv(ch, ch, 3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ResNet(nn.Module):
    """The s and t functions: conv in, residual blocks, BN-ReLU, conv out. Every convolution is weight-normalised,
    the output one included, as in the authors' code (its magnitude is one of the L2-penalised "weight scale
    parameters"); the output starts random, not zero, so that a tanh scale initialised at 0 still gets a gradient.
    """

    def __init__(self, cin: int, mid: int, cout: int, blocks: int, bn: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.inp = _wn_conv(cin, mid, 3)
        self.blocks = nn.Sequential(*[ResBlock(mid, bn) for _ in range(blocks)])
        self.out_norm = nn.Sequential(bn(mid), nn.ReLU())
        self.out = _wn_conv(mid, cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.out_norm(self.blocks(self.inp(x))))


# ---------------------------------------------------------------------------------------------- couplings


def checkerboard(h: int, w: int, parity: int, device: torch.device | None = None) -> Tensor:
    """A (1, 1, h, w) mask of ones where (i + j + parity) is even: the conditioning half."""
    i = torch.arange(h, device=device).view(-1, 1)
    j = torch.arange(w, device=device).view(1, -1)
    return ((i + j + parity) % 2 == 0).float().view(1, 1, h, w)


class Coupling(nn.Module):
    """One coupling layer: y_b = x_b (kept), y_(1-b) = x_(1-b) * exp(s(x_b)) + t(x_b) (affine) or + t(x_b)
    (additive), with s = scale * tanh(.) bounding the log-scale. Masks: checkerboard over space, or the
    first/second half of the channels.

    `scale` is one scalar per coupling, as in the authors' code, where the two kinds differ: a checkerboard
    coupling's `rescaling_scale` starts at 0 and is L2-penalised; a channel-wise coupling's `scale` starts at 1 and
    is not (its variable name is not in the authors' L2 filter). `scale_in_l2` marks which.
    """

    def __init__(self, channels: int, mask: str, parity: int, coupling: str, mid: int, blocks: int,
                 bn: Callable[[int], nn.Module], scale_init: float | None = None,
                 scale_in_l2: bool | None = None) -> None:
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask={mask!r}")
        if coupling not in ("affine", "additive"):
            raise ValueError(f"coupling={coupling!r}: expected 'affine' (Real NVP) or 'additive' (NICE)")
        self.mask, self.parity, self.affine = mask, parity, coupling == "affine"
        if mask == "checkerboard":
            cin, cout = channels + 1, channels  # the mask itself is an input channel
        else:
            cin = cout = channels // 2
        self.net = ResNet(cin, mid, (2 if self.affine else 1) * cout, blocks, bn)
        checker = mask == "checkerboard"
        init = (0.0 if checker else 1.0) if scale_init is None else scale_init
        self.scale = nn.Parameter(torch.tensor(float(init))) if self.affine else None
        self.scale_in_l2 = self.affine and (checker if scale_in_l2 is None else scale_in_l2)

    def _st(self, cond: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        if b is not None:
            h = self.net(torch.cat([cond, b.expand(cond.shape[0], 1, -1, -1)], 1))
        else:
            h = self.net(cond)
        if not self.affine:
            return torch.zeros_like(h), h
        s, t = h.chunk(2, 1)
        return self.scale * torch.tanh(s), t

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[1] // 2
        return (x[:, :half], x[:, half:]) if self.parity == 0 else (x[:, half:], x[:, :half])

    def _join(self, cond: Tensor, other: Tensor) -> Tensor:
        return torch.cat([cond, other], 1) if self.parity == 0 else torch.cat([other, cond], 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mask == "checkerboard":
            b = checkerboard(x.shape[2], x.shape[3], self.parity, x.device)
            s, t = self._st(x * b, b)
            s, t = s * (1 - b), t * (1 - b)
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        cond, other = self._split(x)
        s, t = self._st(cond, None)
        return self._join(cond, other * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        if self.mask == "checkerboard":
            b = checkerboard(y.shape[2], y.shape[3], self.parity, y.device)
            s, t = self._st(y * b, b)
            s, t = s * (1 - b), t * (1 - b)
            return (y - t) * torch.exp(-s)
        cond, other = self._split(y)
        s, t = self._st(cond, None)
        return self._join(cond, (other - t) * torch.exp(-s))


class CouplingBN(nn.Module):
    """A coupling layer followed by batch norm on its whole output (the paper's section 3.7)."""

    def __init__(self, coupling: Coupling, bn: FlowBatchNorm | None) -> None:
        super().__init__()
        self.coupling, self.bn = coupling, bn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, ld = self.coupling(x)
        if self.bn is not None:
            y, ld_bn = self.bn.forward_flow(y)
            ld = ld + ld_bn
        return y, ld

    def inverse(self, y: Tensor) -> Tensor:
        if self.bn is not None:
            y = self.bn.inverse(y)
        return self.coupling.inverse(y)


# ---------------------------------------------------------------------------------------------- the flow


class RealNVPFlow(nn.Module):
    """The multi-scale flow. Each scale but the last: 3 checkerboard couplings, squeeze, 3 channel-wise
    couplings, then half the channels are factored out to z; the last scale: 4 checkerboard couplings.
    `forward` maps images (N, C, H, W) to z flattened to (N, D) and the summed log-det; `inverse` maps back.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_scales: int = 2, mid_channels: int = 64,
                 num_blocks: int = 8, coupling: str = "affine", bn_mode: str = "running", bn_decay: float = 0.8,
                 flow_batchnorm: bool = True, nice_scaling: bool | None = None) -> None:
        super().__init__()
        if image_size % 2 ** (num_scales - 1):
            raise ValueError(f"image_size {image_size} cannot be squeezed {num_scales - 1} times")
        def bn(ch: int) -> nn.Module:
            return RunningBatchNorm(ch, bn_decay, mode=bn_mode)

        def flow_bn(ch: int) -> FlowBatchNorm | None:
            return FlowBatchNorm(ch, bn_decay, mode=bn_mode) if flow_batchnorm else None

        def layer(ch: int, mask: str, parity: int) -> CouplingBN:
            return CouplingBN(Coupling(ch, mask, parity, coupling, mid_channels, num_blocks, bn), flow_bn(ch))

        self.scales = nn.ModuleList()
        self.z_shapes: list[tuple[int, int, int]] = []
        c, s = in_channels, image_size
        for i in range(num_scales):
            if i == num_scales - 1:
                self.scales.append(nn.ModuleList([layer(c, "checkerboard", p % 2) for p in range(4)]))
                self.z_shapes.append((c, s, s))
            else:
                self.scales.append(nn.ModuleList(
                    [layer(c, "checkerboard", p % 2) for p in range(3)]
                    + [layer(4 * c, "channel", p % 2) for p in range(3)]))
                c, s = 4 * c, s // 2
                self.z_shapes.append((c // 2, s, s))
                c = c // 2
        self.dims = in_channels * image_size * image_size
        # NICE's diagonal scaling: additive couplings have a unit Jacobian, so NICE rescales each output dim.
        use_scaling = (coupling == "additive") if nice_scaling is None else nice_scaling
        self.log_scale = nn.Parameter(torch.zeros(self.dims)) if use_scaling else None

    @staticmethod
    def _run(layers: nn.ModuleList, x: Tensor, ld: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        for layer in layers[start:stop]:
            x, d = layer(x)
            ld = ld + d
        return x, ld

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ld = x.new_zeros(x.shape[0])
        zs = []
        for i, layers in enumerate(self.scales):
            if i == len(self.scales) - 1:
                x, ld = self._run(layers, x, ld, 0, 4)
                zs.append(x)
            else:
                x, ld = self._run(layers, x, ld, 0, 3)
                x = F.pixel_unshuffle(x, 2)
                x, ld = self._run(layers, x, ld, 3, 6)
                z, x = x.chunk(2, 1)
                zs.append(z)
        z = torch.cat([v.flatten(1) for v in zs], 1)
        if self.log_scale is not None:
            z = z * self.log_scale.exp()
            ld = ld + self.log_scale.sum()
        return z, ld

    def inverse(self, z: Tensor) -> Tensor:
        """z (N, D) -> images. In training mode this undoes the last forward's map (its batch statistics)."""
        if self.log_scale is not None:
            z = z * (-self.log_scale).exp()
        sizes = [c * h * w for c, h, w in self.z_shapes]
        parts = [p.reshape(-1, *shape) for p, shape in zip(z.split(sizes, 1), self.z_shapes)]
        with frozen_statistics(self):
            x = parts[-1]
            for i in range(len(self.scales) - 1, -1, -1):
                layers = self.scales[i]
                if i < len(self.scales) - 1:
                    x = torch.cat([parts[i], x], 1)
                    for layer in reversed(layers[3:6]):
                        x = layer.inverse(x)
                    x = F.pixel_shuffle(x, 2)
                    for layer in reversed(layers[0:3]):
                        x = layer.inverse(x)
                else:
                    for layer in reversed(layers):
                        x = layer.inverse(x)
        return x


# ---------------------------------------------------------------------------------------------- the task


class RealNVP(Task):
    """Maximum likelihood training of a Real NVP (or NICE) flow on dequantised, logit-transformed pixels.

    The training loss is the authors': the negative log-likelihood in nats per image plus
    `l2 * sum ||w||^2` over the weight-normalisation magnitudes and the checkerboard couplings' tanh scales (the
    paper's "L2 regularization on the weight scale parameters", 5e-5). `loss_unit="bits/dim"` divides the whole
    loss by D ln 2 (the same penalty relative to the likelihood, a different gradient scale for clipping and
    Adam's epsilon). The penalty is never Adam weight decay: that would add `l2 * w` to the gradient of whatever
    the loss's unit is, which against a bits/dim loss is D ln 2 / 2 times the paper's penalty.

    Args:
        flow: the `RealNVPFlow` (a `_target_` in the config).
        optimizer: partial optimizer, applied to every parameter without weight decay.
        levels: grey levels of the data (17 for the 8x8 digits, 256 for 8-bit images).
        alpha: the logit preprocessing's margin: y = logit(alpha + (1 - 2 alpha) u).
        baselines: fit full-covariance and diagonal Gaussians in the same logit space (closed form, on the
            train split) and report their bits/dim beside the flow's, plus the uniform model's log2(levels).
        l2: the penalty's coefficient, added to the loss in nats per image.
        loss_unit: "nats" (per image, the authors') or "bits/dim".
        temperature: the standard deviation of z for samples.
        eval_draws: dequantisation draws per evaluated image; the reported bits/dim is their mean, and
            `bpd_draw_std` the standard deviation over draws of the split's mean.
        eval_seed: the dequantisation noise of evaluation comes from this seed, so a model's score is a number.
    """

    def __init__(self, flow: RealNVPFlow, optimizer: Callable[..., torch.optim.Optimizer], levels: int = 256,
                 alpha: float = 0.05, baselines: bool = True, l2: float = 5e-5, loss_unit: str = "nats",
                 temperature: float = 1.0, baseline_draws: int = 4, eval_draws: int = 4,
                 eval_seed: int = 1234) -> None:
        super().__init__()
        if loss_unit not in ("nats", "bits/dim"):
            raise ValueError(f"loss_unit={loss_unit!r}: expected 'nats' (per image) or 'bits/dim'")
        self.flow = flow
        self._optimizer = optimizer
        self.levels, self.alpha, self.l2, self.loss_unit = levels, alpha, l2, loss_unit
        self.baselines, self.baseline_draws, self.eval_seed = baselines, baseline_draws, eval_seed
        self.eval_draws = eval_draws
        self.temperature = temperature
        self.gaussians: dict[str, Any] = {}

    @property
    def device_(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ likelihood
    def log_prob_u(self, u: Tensor) -> Tensor:
        """log p(u) in nats per sample, u in [0, 1)^D: flow, Gaussian prior and the preprocessing's log-det."""
        y, ld_pre = logit_transform(u, self.alpha)
        z, ld = self.flow(y)
        return standard_normal_logprob(z) + ld + ld_pre

    def bpd(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Discrete bits/dim per sample of images x in [0, 1] (dequantised with `noise`, uniform by default)."""
        return bits_per_dim(self.log_prob_u(dequantize(x, self.levels, noise)), x[0].numel(), self.levels)

    def l2_parameters(self) -> list[Tensor]:
        """The penalised "weight scale parameters": every weight-norm magnitude and the L2-marked tanh scales."""
        params = [p for n, p in self.named_parameters() if n.endswith("parametrizations.weight.original0")]
        params += [m.scale for m in self.modules() if isinstance(m, Coupling) and m.scale_in_l2]
        return params

    def regularizer(self) -> Tensor:
        """sum ||w||^2 over `l2_parameters` (the authors' l2_reg, before the coefficient)."""
        return sum((p.pow(2).sum() for p in self.l2_parameters()), torch.zeros((), device=self.device_))

    def loss_scale(self, dims: int) -> float:
        """The factor from nats per image to the loss's unit."""
        return 1.0 if self.loss_unit == "nats" else 1.0 / (dims * math.log(2))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self._optimizer(self.parameters())}

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor]]:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        dims = x[0].numel()
        bpd = self.bpd(x).mean()
        reg = self.regularizer()
        self.log("bpd", bpd)
        self.log("l2_reg", reg)
        nats = bpd * dims * math.log(2)  # discrete NLL per image (a constant away from the continuous one)
        yield "model", self.loss_scale(dims) * (nats + self.l2 * reg)

    # ------------------------------------------------------------------ baselines
    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        if self.baselines and not self.gaussians:
            self.gaussians = self.fit_gaussians(data.dataset("train"))

    @torch.no_grad()
    def fit_gaussians(self, dataset: Any) -> dict[str, Any]:
        """Maximum-likelihood full and diagonal Gaussians of the logit-space training data (float64)."""
        g = torch.Generator().manual_seed(self.eval_seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=500, shuffle=False)
        n, total, outer = 0, None, None
        with torch.random.fork_rng(devices=[]):  # the dataset's own augmentation must not move the run's RNG
            for _ in range(self.baseline_draws):
                for batch in loader:
                    x = (batch[0] if isinstance(batch, list | tuple) else batch).double()
                    u = dequantize(x, self.levels, torch.rand(x.shape, generator=g, dtype=x.dtype))
                    y = logit_transform(u, self.alpha)[0].flatten(1).to(self.device_)
                    total = y.sum(0) if total is None else total + y.sum(0)
                    outer = y.T @ y if outer is None else outer + y.T @ y
                    n += len(y)
        mean = total / n
        cov = outer / n - torch.outer(mean, mean)
        cov = cov + 1e-9 * torch.eye(len(mean), dtype=cov.dtype, device=cov.device)
        return {
            "full": torch.distributions.MultivariateNormal(mean, covariance_matrix=cov),
            "diagonal": torch.distributions.Independent(torch.distributions.Normal(mean, cov.diagonal().sqrt()), 1),
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        """Bits/dim of the split averaged over `eval_draws` dequantisation draws (the same draws for the flow and
        the Gaussians); `bpd_draw_std` is the spread over draws of the split's mean."""
        g = torch.Generator().manual_seed(self.eval_seed)
        per_draw: list[dict[str, float]] = []
        for _ in range(max(self.eval_draws, 1)):
            sums: dict[str, float] = {}
            n = 0
            for batch in loader:
                x = (batch[0] if isinstance(batch, list | tuple) else batch).to(self.device_)
                noise = torch.rand(x.shape, generator=g).to(x.device)
                u = dequantize(x, self.levels, noise)
                dims = x[0].numel()
                scores = {"bpd": bits_per_dim(self.log_prob_u(u), dims, self.levels)}
                if self.gaussians:
                    y, ld_pre = logit_transform(u.double(), self.alpha)
                    for name, dist in self.gaussians.items():
                        scores[f"gaussian_{name}_bpd"] = bits_per_dim(dist.log_prob(y.flatten(1)) + ld_pre, dims,
                                                                      self.levels)
                for k, v in scores.items():
                    sums[k] = sums.get(k, 0.0) + float(v.double().sum())
                n += len(x)
            per_draw.append({k: v / n for k, v in sums.items()})
        out = {k: float(np.mean([d[k] for d in per_draw])) for k in per_draw[0]}
        flow_draws = [d["bpd"] for d in per_draw]
        out["bpd_draw_std"] = float(np.std(flow_draws, ddof=1)) if len(flow_draws) > 1 else 0.0
        out["bpd_draw_range"] = float(max(flow_draws) - min(flow_draws))
        out["eval_draws"] = float(len(per_draw))
        out["uniform_bpd"] = math.log2(self.levels)
        return out

    # ------------------------------------------------------------------ sampling and figures
    @torch.no_grad()
    def sample(self, n: int, temperature: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] from z ~ N(0, T^2 I) through the inverse flow (eval mode: running statistics)."""
        t = self.temperature if temperature is None else temperature
        z = torch.randn(n, self.flow.dims, generator=generator).to(self.device_) * t
        return logit_inverse(self.flow.inverse(z), self.alpha)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """z of images (pixel centres, no noise)."""
        u = dequantize(x.to(self.device_), self.levels, torch.full_like(x, 0.5, device=self.device_))
        return self.flow(logit_transform(u, self.alpha)[0])[0]

    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchvision.utils import make_grid

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = self.training
        self.eval()
        try:
            test = data.dataset("test")
            n = min(64, len(test))
            real = torch.stack([test[i][0] for i in range(n)])
            g = torch.Generator().manual_seed(self.eval_seed)
            fake = self.sample(n, 1.0, g).cpu()
            rows = max(1, int(math.sqrt(n)))

            def show(ax: Any, imgs: Tensor, title: str, nrow: int = rows) -> None:
                grid = make_grid(imgs, nrow=nrow, padding=1, pad_value=1.0)
                ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_title(title)
                ax.axis("off")

            fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
            show(axes[0], fake, "samples, T = 1")
            show(axes[1], real, "real test images")
            fig.tight_layout()
            samples_path = out_dir / "samples.png"
            fig.savefig(samples_path, dpi=120)
            plt.close(fig)

            pairs = [(i, (i + n // 2) % n) for i in range(min(6, n // 2 if n > 1 else 1))]
            steps = 9
            phi = torch.linspace(0, math.pi / 2, steps)
            rows_imgs = []
            for a, b in pairs:
                z = self.encode(torch.stack([test[a][0], test[b][0]]))
                zs = torch.cos(phi).view(-1, 1).to(z) * z[0] + torch.sin(phi).view(-1, 1).to(z) * z[1]
                rows_imgs.append(logit_inverse(self.flow.inverse(zs), self.alpha).cpu())
            grid = torch.cat(rows_imgs)
            fig, ax = plt.subplots(figsize=(steps, len(pairs) * 1.1 + 0.5))
            show(ax, grid, "z = cos(phi) z1 + sin(phi) z2 between two test images", nrow=steps)
            fig.tight_layout()
            interp_path = out_dir / "interpolation.png"
            fig.savefig(interp_path, dpi=120)
            plt.close(fig)
        finally:
            self.train(was_training)
        return [samples_path, interp_path]


# ---------------------------------------------------------------------------------------------- the study


MODELS = {"affine": "Real NVP", "additive": "NICE (additive)"}


def summarize(study: dict[str, Any]) -> dict[str, float]:
    """Median test bits/dim of each model over the runs given (one seed's runs, or all), the baselines (identical
    in every run) and the median spread of the flows' bits/dim over dequantisation draws."""
    import statistics

    runs = [r for r in study["runs"] if r.get("status") == "completed"]
    out: dict[str, float] = {}

    def median(label: str | None, key: str) -> float | None:
        vals = [float(r["metrics"][key]) for r in runs
                if (label is None or r["label"] == label) and key in r["metrics"]]
        return statistics.median(vals) if vals else None

    for label, name in (("affine", "realnvp"), ("additive", "nice")):
        for key, suffix in (("test/bpd", "bpd"), ("test/bpd_draw_std", "bpd_draw_std")):
            v = median(label, key)
            if v is not None:
                out[f"{name}_{suffix}"] = v
    for key in ("gaussian_full_bpd", "gaussian_diagonal_bpd", "uniform_bpd"):
        v = median(None, f"test/{key}")
        if v is not None:
            out[key] = v
    return out


def study_figure(study: dict[str, Any], out_dir: Path) -> list[Path]:
    """Test bits/dim of the five models (each seed a dot, the median a bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in study["runs"] if r["status"] == "completed"]
    entries: list[tuple[str, list[float]]] = []
    for label, name in MODELS.items():
        vals = [float(r["metrics"]["test/bpd"]) for r in runs if r["label"] == label and "test/bpd" in r["metrics"]]
        if vals:
            entries.append((name, vals))
    for key, name in (("gaussian_full_bpd", "full-cov. Gaussian"), ("gaussian_diagonal_bpd", "diagonal Gaussian"),
                      ("uniform_bpd", "uniform")):
        vals = [float(r["metrics"][f"test/{key}"]) for r in runs if f"test/{key}" in r["metrics"]]
        if vals:
            entries.append((name, vals[:1]))  # deterministic: the same in every run
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (_name, vals) in enumerate(entries):
        vals_sorted = sorted(vals)
        ax.bar(i, vals_sorted[len(vals) // 2], color="C0" if i < 2 else "C7", alpha=0.7)
        ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
        ax.text(i, vals_sorted[len(vals) // 2] + 0.05, f"{vals_sorted[len(vals) // 2]:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(entries)), [e[0] for e in entries], rotation=15, fontsize=8)
    ax.set_ylabel("test bits/dim (discrete, lower is better)")
    draws = [r["metrics"].get("test/eval_draws") for r in runs if "test/eval_draws" in r["metrics"]]
    seeds = len({r.get("seed") for r in runs})
    ax.set_title(f"{study.get('experiment', '')}: held-out bits/dim (bar: median over {seeds} seeds, dots: seeds; "
                 f"each the mean of {int(draws[0]) if draws else 1} dequantisation draws)", fontsize=9)
    fig.tight_layout()
    path = out_dir / "bits_per_dim.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
