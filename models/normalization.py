"""Batch Normalization (Ioffe & Szegedy 2015) and Group Normalization (Wu & He 2018).

The layers are written by hand from the papers' definitions (autograd does the backward pass); one factory,
`make_norm`, gives every study network its normalization as a config choice (bn, gn, ln, in, none). The
networks (the BN paper's sigmoid MLP, a small residual CNN for digits, BN-Inception, ResNet-50 with any
norm), the classifier task they train under, and the studies' summaries and figures live here too.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlrun.models.classifier import Classifier

# ---------------------------------------------------------------------------------------------- layers


class BatchNorm(nn.Module):
    """Batch normalization over every dimension but the channel (dim 1): (N, C) or (N, C, *).

    Training normalizes with the mini-batch mean and biased variance and updates population estimates by a
    moving average (momentum as torch's: new = (1 - m) old + m batch, the variance unbiased); evaluation uses
    the population estimates, so a sample's output no longer depends on the rest of its batch.
    Parameter and buffer names match torch's BatchNorm, so state dicts are interchangeable.

    `ghost_batch=N` normalizes each consecutive chunk of N samples with its own statistics (ghost batches):
    one process then stands for several data-parallel workers whose BN sees only its own N images, as in the
    GN paper's 8-GPU protocol, while the gradient is the whole batch's. The population estimates follow the
    first chunk only (rank 0's, whose buffers data-parallel training keeps).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 ghost_batch: int | None = None) -> None:
        super().__init__()
        if ghost_batch is not None and ghost_batch < 1:
            raise ValueError(f"BatchNorm: ghost_batch must be at least 1, got {ghost_batch}")
        self.num_features, self.eps, self.momentum, self.ghost_batch = num_features, eps, momentum, ghost_batch
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) got input of shape {tuple(x.shape)}")
        shape = [1, -1] + [1] * (x.dim() - 2)
        if not self.training:
            x_hat = (x - self.running_mean.reshape(shape)) * torch.rsqrt(self.running_var.reshape(shape) + self.eps)
            return torch.addcmul(self.bias.reshape(shape), x_hat, self.weight.reshape(shape))
        chunk = self.ghost_batch or x.shape[0]
        if x.shape[0] % chunk:
            raise ValueError(f"BatchNorm(ghost_batch={chunk}) got a batch of {x.shape[0]}, not a multiple of {chunk}")
        g = x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])  # (chunks, samples per chunk, C, *)
        dims = [1, *range(3, g.dim())]
        n = g[0].numel() // self.num_features
        if n < 2:
            raise ValueError(f"BatchNorm needs more than one value per channel in training, got {tuple(x.shape)}"
                             + (f" in chunks of {chunk}" if self.ghost_batch else ""))
        var, mean = torch.var_mean(g, dims, correction=0, keepdim=True)  # (chunks, 1, C, 1, ...)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean[0].reshape(-1), alpha=m)
            self.running_var.mul_(1 - m).add_(var[0].reshape(-1) * (n / (n - 1)), alpha=m)
            self.num_batches_tracked += 1
        x_hat = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        return torch.addcmul(self.bias.reshape(shape), x_hat, self.weight.reshape(shape))

    def extra_repr(self) -> str:
        ghost = f", ghost_batch={self.ghost_batch}" if self.ghost_batch else ""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}{ghost}"


class GroupNorm(nn.Module):
    """Group normalization: each sample's channels split into G groups, each normalized over (C/G, *).

    Statistics are per sample, so the output never depends on the batch, in training or evaluation alike.
    G = 1 is layer normalization, G = C instance normalization (both with per-channel gamma and beta).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm(C={self.num_channels}) got input of shape {tuple(x.shape)}")
        g = x.reshape(x.shape[0], self.num_groups, -1)
        var, mean = torch.var_mean(g, -1, correction=0, keepdim=True)
        x_hat = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.addcmul(self.bias.reshape(shape), x_hat, self.weight.reshape(shape))

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


NORMS = ("bn", "gn", "ln", "in", "none")


def make_norm(kind: str, channels: int, groups: int = 32, ghost_batch: int | None = None) -> nn.Module:
    """The one place a network's normalization is chosen: bn (over chunks of `ghost_batch` samples if set),
    gn (`groups` groups), ln, in or none."""
    if kind == "bn":
        return BatchNorm(channels, ghost_batch=ghost_batch)
    if kind == "gn":
        return GroupNorm(groups, channels)
    if kind == "ln":
        return GroupNorm(1, channels)
    if kind == "in":
        return GroupNorm(channels, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r}: expected one of {', '.join(NORMS)}")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, BatchNorm | GroupNorm | nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)


# ---------------------------------------------------------------------------------------------- networks


class SigmoidMLP(nn.Module):
    """The BN paper's MNIST network: fully connected sigmoid layers, small Gaussian initial weights, optional
    normalization of each hidden layer's input to its sigmoid (BN replaces the layer's bias by its beta)."""

    def __init__(self, sizes: list[int], norm: str = "none", init_std: float = 0.01) -> None:
        super().__init__()
        self.hidden = nn.ModuleList()
        self.norms = nn.ModuleList()
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            self.hidden.append(nn.Linear(fan_in, fan_out, bias=norm == "none"))
            self.norms.append(make_norm(norm, fan_out))
        self.out = nn.Linear(sizes[-2], sizes[-1])
        for layer in [*self.hidden, self.out]:
            nn.init.normal_(layer.weight, 0.0, init_std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def sigmoid_inputs(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The logits and, per hidden layer, the inputs to its sigmoids (what the paper's Figure 1 tracks)."""
        inputs = []
        for linear, norm in zip(self.hidden, self.norms):
            u = norm(linear(x))
            inputs.append(u)
            x = torch.sigmoid(u)
        return self.out(x), inputs

    def forward(self, x: Tensor) -> Tensor:
        return self.sigmoid_inputs(x)[0]


class ResBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus the (projected) input, then ReLU; the last norm's gamma may start at 0."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module],
                 zero_init_last: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = norm(c_out)
        self.skip = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))
        if zero_init_last and getattr(self.norm2, "weight", None) is not None:
            nn.init.zeros_(self.norm2.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.skip(x))


class DigitsResNet(nn.Module):
    """A small residual CNN for 8x8 digits: a conv-norm-ReLU stem, one residual block per stage (`strides`
    sets each stage's stride), global average pooling and a linear classifier. `norm` is bn, gn, ln, in or
    none; every layer has the same width by default so the group ablation can run G = 1 ... 32. `ghost_batch`
    makes BN normalize each chunk of that many samples on its own (one simulated worker's batch); `stem_stride`
    2 halves larger inputs (16x16 scenes) before the blocks."""

    def __init__(self, norm: str = "gn", groups: int = 8, widths: tuple[int, ...] = (32, 32),
                 strides: tuple[int, ...] = (2, 1), num_classes: int = 10, in_channels: int = 1,
                 zero_init_last: bool = True, ghost_batch: int | None = None, stem_stride: int = 1) -> None:
        super().__init__()
        make = functools.partial(make_norm, norm, groups=groups, ghost_batch=ghost_batch)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False), make(widths[0]),
                                  nn.ReLU())
        layers: list[nn.Module] = []
        c = widths[0]
        for w, s in zip(widths, strides, strict=True):
            layers.append(ResBlock(c, w, s, make, zero_init_last))
            c = w
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def resnet50(norm: str = "gn", groups: int = 32, num_classes: int = 1000, zero_init_last: bool = True) -> nn.Module:
    """torchvision's ResNet-50 with its norm layers from `make_norm` (the GN paper's G = 32); the last
    norm of each bottleneck starts with gamma = 0 (torchvision's zero_init_residual), as the GN paper does."""
    from torchvision.models import resnet50 as tv_resnet50

    return tv_resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_last,
                       norm_layer=functools.partial(make_norm, norm, groups=groups))


class ConvNorm(nn.Sequential):
    """conv (no bias: the norm's beta replaces it), norm, ReLU: BN before every nonlinearity."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, norm: str = "bn") -> None:
        super().__init__(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=norm == "none"), make_norm(norm, c_out),
                         nn.ReLU(inplace=True))


class InceptionBN(nn.Module):
    """One BN-Inception module: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 (the 5x5 replaced) | pool (+ 1x1 projection).

    A stride-2 module has no 1x1 branch, strides its 3x3 branches and passes the max-pooled input through.
    """

    def __init__(self, c_in: int, c1: int, c3r: int, c3: int, d3r: int, d3: int, pool: str, proj: int,
                 stride: int = 1, norm: str = "bn") -> None:
        super().__init__()
        self.b1 = ConvNorm(c_in, c1, 1, norm=norm) if c1 else None
        self.b3 = nn.Sequential(ConvNorm(c_in, c3r, 1, norm=norm), ConvNorm(c3r, c3, 3, stride, norm=norm))
        self.d3 = nn.Sequential(ConvNorm(c_in, d3r, 1, norm=norm), ConvNorm(d3r, d3, 3, norm=norm),
                                ConvNorm(d3, d3, 3, stride, norm=norm))
        pooling = nn.MaxPool2d(3, stride, 1) if pool == "max" else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        self.pool = nn.Sequential(pooling, ConvNorm(c_in, proj, 1, norm=norm)) if proj else pooling
        self.out_channels = c1 + c3 + d3 + (proj or c_in)

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.b3(x), self.d3(x), self.pool(x)]
        if self.b1 is not None:
            parts.insert(0, self.b1(x))
        return torch.cat(parts, 1)


# (name, #1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool, pool proj, stride): the BN paper's Figure 5.
BN_INCEPTION = [
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1), ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 224, 64, 96, 96, 128, "avg", 128, 1), ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 160, 128, 160, 128, 160, "avg", 128, 1), ("4d", 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1), ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
]


class BNInception(nn.Module):
    """Inception with BN before every nonlinearity and each 5x5 conv replaced by two 3x3 (the BN paper's
    Figure 5). `norm=none` gives the un-normalized variant; `dropout` is the paper's (removed for BN-x5)."""

    def __init__(self, num_classes: int = 1000, norm: str = "bn", dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            ConvNorm(3, 64, 7, 2, norm), nn.MaxPool2d(3, 2, 1),
            ConvNorm(64, 64, 1, norm=norm), ConvNorm(64, 192, 3, norm=norm), nn.MaxPool2d(3, 2, 1),
        ]
        c = 192
        for _name, *spec, stride in BN_INCEPTION:
            block = InceptionBN(c, *spec, stride=stride, norm=norm)
            layers.append(block)
            c = block.out_channels
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.features(x).mean((2, 3))))


# ---------------------------------------------------------------------------------------------- training


def sgd(params: Iterable[Any], lr: float, lr_mult: float = 1.0, batch_size: int | None = None,
        base_batch_size: int | None = None, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> torch.optim.SGD:
    """SGD at lr x lr_mult (the BN paper's BN-x5, BN-x30), x batch_size / base_batch_size when both are given
    (the GN paper's linear scaling, 0.1 N/32), so a sweep over one key moves the learning rate with it."""
    if batch_size is not None and base_batch_size is not None:
        lr = lr * batch_size / base_batch_size
    return torch.optim.SGD(params, lr=lr * lr_mult, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def _steps_per_epoch(images_per_epoch: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    per_step = batch_size * world_size
    return images_per_epoch // per_step if drop_last else math.ceil(images_per_epoch / per_step)


def epoch_multistep(optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float = 0.1,
                    images_per_epoch: int = 1_281_167, batch_size: int = 32, world_size: int = 1,
                    drop_last: bool = True) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning rate x gamma at each epoch in `milestones` (the trainer steps schedulers once per step, so the
    epochs become steps here: the same epochs for every batch size)."""
    per_epoch = _steps_per_epoch(images_per_epoch, batch_size, world_size, drop_last)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [m * per_epoch for m in milestones], gamma)


def epoch_exponential(optimizer: torch.optim.Optimizer, decay: float = 0.96, every_epochs: float = 8.0,
                      images_per_epoch: int = 1_281_167, batch_size: int = 32, world_size: int = 1,
                      drop_last: bool = True) -> torch.optim.lr_scheduler.LRScheduler:
    """Inception's schedule: x decay every `every_epochs` epochs, stepwise (BN-x5 decays 6x faster)."""
    per_epoch = _steps_per_epoch(images_per_epoch, batch_size, world_size, drop_last)
    return torch.optim.lr_scheduler.StepLR(optimizer, max(1, round(every_epochs * per_epoch)), decay)


class NormClassifier(Classifier):
    """The shared `Classifier` plus what the normalization papers measure and need.

    Args:
        decay_norm: apply the optimizer's weight decay to norm gamma/beta too (the GN paper decays all weight
            layers, gamma and beta included, §4.1); false puts them in a group without decay.
        probe_unit: track one unit of the network's last `sigmoid_inputs` layer on a fixed probe batch (the
            first `probe_size` evaluation samples) and report its 15th/50th/85th percentiles (BN Figure 1).
        median_last: also report `acc_last<k>`, the median accuracy of a split's last k evaluations (the GN
            paper reports the median error of the final 5 epochs); 0 turns it off.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], label_smoothing: float = 0.0,
                 decay_norm: bool = True, probe_unit: int | None = None, probe_size: int = 60,
                 percentiles: tuple[int, ...] = (15, 50, 85), topk: tuple[int, ...] = (1,),
                 median_last: int = 0) -> None:
        super().__init__(net, optimizer, label_smoothing)
        self.decay_norm, self.probe_unit, self.probe_size = decay_norm, probe_unit, probe_size
        self.percentiles, self.topk = tuple(percentiles), tuple(topk)
        self.median_last = int(median_last)
        self.eval_history: dict[str, list[float]] = {}

    def extra_state(self) -> dict[str, Any]:
        return {"eval_history": {k: list(v) for k, v in self.eval_history.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.eval_history = {k: [float(x) for x in v] for k, v in state.get("eval_history", {}).items()}

    def param_groups(self) -> list[dict[str, Any]]:
        norm_params = {id(p) for m in self.net.modules() if is_norm(m) for p in m.parameters(recurse=False)}
        rest = [p for p in self.net.parameters() if id(p) not in norm_params]
        norms = [p for p in self.net.parameters() if id(p) in norm_params]
        if self.decay_norm or not norms:
            return [{"params": rest + norms}]
        return [{"params": rest}, {"params": norms, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self._optimizer(self.param_groups())}

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        correct = dict.fromkeys(self.topk, 0)
        total, loss = 0, 0.0
        probe: list[Tensor] = []
        for x, y in loader:
            x, y = x.to(self.device_), y.to(self.device_)
            if self.probe_unit is not None and sum(len(p) for p in probe) < self.probe_size:
                probe.append(x[: self.probe_size - sum(len(p) for p in probe)])
            logits = self.net(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(max(self.topk), logits.shape[1]), 1).indices
            for k in self.topk:
                correct[k] += int((top[:, :k] == y[:, None]).any(1).sum())
            total += len(y)
        out = {"acc" if k == 1 else f"top{k}": correct[k] / total for k in self.topk}
        out["loss"] = loss / total
        if self.median_last:
            history = self.eval_history.setdefault(split, [])
            history.append(out["acc"])
            if len(history) >= self.median_last:
                out[f"acc_last{self.median_last}"] = statistics.median(history[-self.median_last:])
        if probe:
            _, inputs = self.net.sigmoid_inputs(torch.cat(probe))
            unit = inputs[-1][:, self.probe_unit].float()
            q = torch.quantile(unit, torch.tensor([p / 100 for p in self.percentiles], device=unit.device))
            out.update({f"p{p}": float(v) for p, v in zip(self.percentiles, q)})
        return out


# ---------------------------------------------------------------------------------------------- studies


def read_curve(run_dir: str | Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) for every record of `metric` in a run's metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if metric in rec:
            out.append((int(rec["step"]), float(rec[metric])))
    return out


def steps_to(curve: list[tuple[int, float]], target: float) -> float:
    """The first step at which the curve reaches `target`; inf if it never does."""
    return next((float(s) for s, v in curve if v >= target), math.inf)


def drift(curve: list[tuple[int, float]], after: int) -> float:
    """Standard deviation over the steps after `after`: how much a distribution's statistic moves."""
    values = [v for s, v in curve if s > after]
    return statistics.pstdev(values) if len(values) > 1 else math.nan


def _by_label(study: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in study["runs"]:
        if r["status"] == "completed":
            out.setdefault(r["label"], []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"] or 0) for k, v in out.items()}


def bn_summarize(study: dict, metric: str = "val/acc", target: float = 0.9, percentile: str | None = "val/p50",
                 after: int = 200) -> dict[str, float]:
    """Per label, the median over its runs: steps to reach `target` on the held-out curve (inf if never), and the
    drift of the probe unit's `percentile` after `after` steps. (The study also calls this once per seed, which
    gives each seed's values: no per-seed keys here.)"""
    out: dict[str, float] = {}
    tag = f"{target * 100:g}"
    for label, runs in _by_label(study).items():
        steps = [steps_to(read_curve(r["dir"], metric), target) for r in runs]
        out[f"{label}/steps_to_{tag}"] = statistics.median(steps)
        if percentile:
            drifts = [drift(read_curve(r["dir"], percentile), after) for r in runs]
            name = percentile.rsplit("/", 1)[-1]
            out[f"{label}/{name}_drift"] = statistics.median(drifts)
    return out


def bn_figure(study: dict, out_dir: Path, without: str = "none_x1", with_: str = "bn_x1") -> list[Path]:
    """The BN paper's Figure 1: held-out accuracy against steps (every condition, seed-median), and the
    15/50/85th percentiles of one last-layer sigmoid input against steps, without and with BN (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _by_label(study)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label in sorted(runs):
        curves = [read_curve(r["dir"], "val/acc") for r in runs[label]]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        steps = [s for s, _ in curves[0][:n]]
        med = [statistics.median(c[i][1] for c in curves) for i in range(n)]
        line = axes[0].plot(steps, med, label=f"{label} (n={len(curves)})", lw=2 if label in (without, with_) else 1)[0]
        for c in curves:  # each seed, faint, in its condition's colour: the spread behind the median
            axes[0].plot([s for s, _ in c], [v for _, v in c], ".", ms=2, color=line.get_color(), alpha=0.35)
    axes[0].set(title="(a) held-out accuracy: line = median of seeds, dots = each seed", xlabel="training step",
                ylabel="accuracy", ylim=(0.5, 1.0))
    axes[0].legend(fontsize=8)
    for ax, label, title in ((axes[1], without, "(b) without BN"), (axes[2], with_, "(c) with BN")):
        if label not in runs:
            ax.set_title(f"{title}: no runs")
            continue
        for p, style in (("val/p15", "--"), ("val/p50", "-"), ("val/p85", "--")):
            curve = read_curve(runs[label][0]["dir"], p)
            ax.plot([s for s, _ in curve], [v for _, v in curve], style, color="k", label=p.split("/")[1])
        ax.set(title=f"{title} ({label}, seed {runs[label][0].get('seed', '?')}): last-layer sigmoid input",
               xlabel="training step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "bn_figure1.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _label_parts(label: str) -> tuple[str, int] | None:
    norm, _, rest = label.rpartition("_")
    if not rest[1:].isdigit():
        return None
    return norm, int(rest[1:])


def gn_summarize(study: dict, metric: str = "val/acc_last5", test_metric: str | None = "test/acc") -> dict[str, float]:
    """Error (100 x (1 - accuracy), in points) per label, the median over the runs given (called per seed, that
    is the seed's value): `<label>/error` from `metric` (the paper's median of the last 5 evaluations) and
    `<label>/test_error` from `test_metric` (the final model on the test split)."""
    out = {}
    for label, runs in _by_label(study).items():
        for name, m in (("error", metric), ("test_error", test_metric)):
            values = [float(r["metrics"][m]) for r in runs if m and m in r["metrics"]]
            if values:
                out[f"{label}/{name}"] = 100 * (1 - statistics.median(values))
    return out


def gn_figure(study: dict, out_dir: Path, metric: str = "val/acc_last5") -> list[Path]:
    """The GN paper's Figure 1 (error against images per batch, one line per norm) for labels `<norm>_b<N>`,
    or error against G for labels `gn_g<G>` (the group ablation): each seed a dot, the line the seeds' median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, list[float]]] = {}
    for label, runs in _by_label(study).items():
        parts = _label_parts(label)
        if parts is None:
            continue
        values = [100 * (1 - float(r["metrics"][metric])) for r in runs if metric in r["metrics"]]
        if values:
            series.setdefault(parts[0], {})[parts[1]] = values
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ablation = all(label.startswith("gn_g") for label in _by_label(study))
    what = "median of the last 5 evaluations" if "last" in metric else metric
    if ablation:
        gs = sorted(series.get("gn", {}))
        xs = range(len(gs))
        ax.plot(xs, [statistics.median(series["gn"][g]) for g in gs], "-", color="tab:red", label="median of seeds")
        for x, g in zip(xs, gs):
            ax.plot([x] * len(series["gn"][g]), series["gn"][g], "o", color="tab:red", alpha=0.4, ms=4)
        ax.set_xticks(list(xs), [str(g) for g in gs])
        ax.set(xlabel="groups G", ylabel="error (%)", title=f"GN: number of groups\n({what}; dots: seeds)")
        ax.legend()
        name = "gn_groups.png"
    else:
        sizes = sorted({n for per in series.values() for n in per}, reverse=True)
        pos = {n: i for i, n in enumerate(sizes)}
        for k, norm in enumerate(sorted(series)):
            ns = sorted(series[norm], reverse=True)
            line = ax.plot([pos[n] for n in ns], [statistics.median(series[norm][n]) for n in ns], "-",
                           marker="s" if len(ns) == 1 else None, label=f"{norm.upper()} (median)")[0]
            for n in ns:
                jitter = (k - len(series) / 2) * 0.04
                ax.plot([pos[n] + jitter] * len(series[norm][n]), series[norm][n], "o", color=line.get_color(),
                        alpha=0.4, ms=4)
        ax.set_xticks(range(len(sizes)), [str(n) for n in sizes])
        ax.set(xlabel="images per worker (BN's batch); SGD batch 8x", ylabel="error (%)",
               title=f"error vs batch ({what}; dots: seeds)")
        ax.legend(fontsize=8)
        name = "gn_figure1.png"
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
