"""Prototypical Networks (Snell, Swersky & Zemel, 2017): few-shot classification by distance to class means.

An embedding network maps support and query images into a metric space; each class's prototype is the
mean of its support embeddings, and a query's class probabilities are a softmax over negative distances
to the prototypes. Training is episodic (the dataset yields N-way K-shot episodes, `mlrun.datasets.fewshot`),
so the step is plain cross-entropy on the queries.

With the squared Euclidean distance the classifier is linear in the query embedding, with weights 2c_k and
bias -||c_k||^2 (`linear_head`): the paper's argument for why it works well. `distance: cosine` is the
paper's comparison. Evaluation also scores a raw-pixel nearest-prototype baseline (no learning) on the
same episodes, and reports each (way, shot) setting with its 95% confidence interval over episodes.

The paper's two-phase protocol (choose the number of episodes on the validation classes, then retrain on train+val
for that many) is two stages: the second is named in `reinit_stages` (it restarts from the same initial weights,
as the authors' code, which seeds both phases alike), trains on train+val (the data module's `trainval_stages`) and
runs for the first stage's best step (the trainer's `max_steps_from_best`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.datasets.fewshot import episode_setting, mean_ci95
from mlrun.task import Task

DISTANCES = ("euclidean", "cosine")


class ConvEmbedding(nn.Sequential):
    """The paper's embedding: `blocks` x [conv 3x3 (`hidden` filters), batch norm, ReLU, max-pool 2], flattened.

    28x28 Omniglot -> 64-d, 84x84 miniImageNet -> 1600-d (floor pooling, as the paper). `pool_blocks` < blocks
    pools only in the first `pool_blocks` blocks: the CPU miniature's 8x8 digits would be pooled to 1x1 after
    three blocks, losing the stroke layout that tells digits apart. `ceil_mode` keeps a 1x1 map at 1x1.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, blocks: int = 4, pool_blocks: int | None = None,
                 ceil_mode: bool = False) -> None:
        pool_blocks = blocks if pool_blocks is None else pool_blocks
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden),
                       nn.ReLU(inplace=True)]
            if i < pool_blocks:
                layers.append(nn.MaxPool2d(2, ceil_mode=ceil_mode))
        super().__init__(*layers, nn.Flatten())


def prototypes(z: Tensor, y: Tensor, n_way: int) -> Tensor:
    """Class means of embeddings z [S, D] with labels y in 0..n_way-1 -> [n_way, D] (any order, any counts)."""
    sums = torch.zeros(n_way, z.shape[-1], dtype=z.dtype, device=z.device).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=n_way).clamp_min(1).to(z.dtype)
    return sums / counts[:, None]


def proto_logits(query: Tensor, protos: Tensor, distance: str = "euclidean") -> Tensor:
    """[Q, D] x [N, D] -> [Q, N] logits: -||q - c||^2 (euclidean) or cos(q, c) (cosine = 1 - cosine distance,
    the same softmax as its negative distance)."""
    if distance == "euclidean":
        return -(query[:, None, :] - protos[None, :, :]).pow(2).sum(-1)
    if distance == "cosine":
        return F.cosine_similarity(query[:, None, :], protos[None, :, :], dim=-1, eps=1e-8)
    raise ValueError(f"distance={distance!r}: expected one of {DISTANCES}")


def linear_head(protos: Tensor) -> tuple[Tensor, Tensor]:
    """The linear classifier equal (up to a per-query constant -||q||^2) to Euclidean prototype logits:
    weights 2c_k and bias -||c_k||^2 (the paper's section 2.4)."""
    return 2 * protos, -protos.pow(2).sum(-1)


class ProtoNet(Task):
    """Episodic training and evaluation of a prototypical network.

    Args:
        embedding: the network f_phi (images -> vectors), e.g. `ConvEmbedding`.
        optimizer: a partial optimizer (`_partial_: true`) over the embedding's parameters.
        distance: `euclidean` (squared) or `cosine`.
        pixel_baseline: also score nearest-prototype on raw pixels (Euclidean) on every evaluation episode.
        reinit_stages: stages that start again from the initial weights (the retraining phase on train+val).
    """

    def __init__(self, embedding: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 distance: str = "euclidean", pixel_baseline: bool = True, reinit_stages: Sequence[str] = ()) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r}: expected one of {DISTANCES}")
        self.embedding = embedding
        self.optimizer_factory = optimizer
        self.distance = distance
        self.pixel_baseline = pixel_baseline
        self.reinit_stages = tuple(reinit_stages)
        self._initial = {k: v.detach().clone() for k, v in self.state_dict().items()} if reinit_stages else {}
        self._reinitialised: list[str] = []

    def on_stage_start(self, stage: str, data: Any) -> None:
        """Restore the initial weights at the start of a stage in `reinit_stages`, once (a run resumed inside that
        stage keeps its progress: the checkpoint records that the stage was reinitialised)."""
        super().on_stage_start(stage, data)
        if stage in self.reinit_stages and stage not in self._reinitialised:
            self.load_state_dict(self._initial)
            self._reinitialised.append(stage)

    def extra_state(self) -> dict[str, Any]:
        return {"reinitialised": list(self._reinitialised)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._reinitialised = list(state.get("reinitialised", []))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.optimizer_factory(self.parameters())}

    def episode_logits(self, episode: dict[str, Tensor]) -> Tensor:
        """Embed support and query in one pass (one set of batch-norm statistics), then score queries."""
        s, q = episode["support"], episode["query"]
        n_way = int(episode["support_y"].max()) + 1
        z = self.embedding(torch.cat([s, q]))
        protos = prototypes(z[: len(s)], episode["support_y"], n_way)
        return proto_logits(z[len(s):], protos, self.distance)

    def training_step(self, batch: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        logits = self.episode_logits(batch)
        loss = F.cross_entropy(logits, batch["query_y"])
        self.log("acc", (logits.argmax(-1) == batch["query_y"]).float().mean())
        yield "model", loss

    @staticmethod
    def pixel_logits(episode: dict[str, Tensor]) -> Tensor:
        """The no-learning baseline: nearest prototype by squared Euclidean distance between raw pixels."""
        s, q = episode["support"].flatten(1), episode["query"].flatten(1)
        protos = prototypes(s, episode["support_y"], int(episode["support_y"].max()) + 1)
        return proto_logits(q, protos, "euclidean")

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        """Accuracy (a fraction) per (way, shot) setting with its 95% CI over episodes; the first setting is also
        reported as acc / ci95 / acc_lo / acc_hi (and pixel_* for the raw-pixel baseline)."""
        accs: dict[str, dict[str, list[float]]] = {}
        losses = []
        for episode in loader:
            way, shot = episode_setting(episode)
            key = f"{way}w{shot}s"
            logits = self.episode_logits(episode)
            losses.append(float(F.cross_entropy(logits, episode["query_y"])))
            got = accs.setdefault(key, {"acc": [], "pixel_acc": []})
            got["acc"].append(float((logits.argmax(-1) == episode["query_y"]).float().mean()))
            if self.pixel_baseline:
                hit = self.pixel_logits(episode).argmax(-1) == episode["query_y"]
                got["pixel_acc"].append(float(hit.float().mean()))
        out: dict[str, float] = {"loss": sum(losses) / max(len(losses), 1)}
        for i, (key, got) in enumerate(accs.items()):
            for name, values in got.items():
                if not values:
                    continue
                mean, ci = mean_ci95(values)
                prefix = name[: -len("acc")]
                out[f"{name}_{key}"], out[f"{prefix}ci95_{key}"] = mean, ci
                if i == 0:
                    out[name], out[f"{prefix}ci95"] = mean, ci
                    out[f"{name}_lo"], out[f"{name}_hi"] = mean - ci, mean + ci
        return out


# ---------------------------------------------------------------------------------------------- study


def _by_condition(study: dict[str, Any], metric: str) -> dict[tuple[str, int], list[float]]:
    """(distance, shot) -> the metric over seeds, read from each run's overrides-free label and metrics."""
    out: dict[tuple[str, int], list[float]] = {}
    for r in study["runs"]:
        if r.get("status") != "completed" or metric not in r["metrics"]:
            continue
        distance, _, shot = str(r["label"]).rpartition("_k")
        out.setdefault((distance, int(shot)), []).append(float(r["metrics"][metric]))
    return out


def summarize(study: dict[str, Any]) -> dict[str, float]:
    """Margins behind the claims (median over seeds, accuracy as a fraction): Euclidean over the raw-pixel
    baseline and over cosine at each shot, and the baseline's accuracy itself."""
    import statistics

    acc = {k: statistics.median(v) for k, v in _by_condition(study, "test/acc").items()}
    pix = {k: statistics.median(v) for k, v in _by_condition(study, "test/pixel_acc").items()}
    out: dict[str, float] = {}
    for shot in sorted({s for _, s in acc}):
        if ("euclidean", shot) in acc:
            e = acc[("euclidean", shot)]
            if ("euclidean", shot) in pix:
                out[f"pixel_acc_k{shot}"] = pix[("euclidean", shot)]
                out[f"euclidean_minus_pixel_k{shot}"] = e - pix[("euclidean", shot)]
            if ("cosine", shot) in acc:
                out[f"euclidean_minus_cosine_k{shot}"] = e - acc[("cosine", shot)]
    return out


def study_figure(study: dict[str, Any], out_dir: Path) -> list[Path]:
    """Test accuracy against shot for each distance and the raw-pixel baseline (median over seeds, bars: the
    median 95% CI over test episodes; dots: single seeds)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acc, ci = _by_condition(study, "test/acc"), _by_condition(study, "test/ci95")
    pix, pci = _by_condition(study, "test/pixel_acc"), _by_condition(study, "test/pixel_ci95")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    series = [(d, acc, ci, f"ProtoNet, {d}", "o-") for d in DISTANCES]
    pix_one = {("pixels", s): v for (_, s), v in pix.items()}  # one baseline per shot: same episodes in every run
    pci_one = {("pixels", s): v for (_, s), v in pci.items()}
    series.append(("pixels", pix_one, pci_one, "raw-pixel nearest prototype", "s--"))
    for name, values, cis, text, style in series:
        shots = sorted(s for d, s in values if d == name)
        if not shots:
            continue
        med = [100 * statistics.median(values[(name, s)]) for s in shots]
        err = [100 * statistics.median(cis.get((name, s), [0.0])) for s in shots]
        line = ax.errorbar(shots, med, yerr=err, fmt=style, capsize=4, label=text)
        if name != "pixels":
            for s in shots:
                seeds = [100 * v for v in values[(name, s)]]
                ax.plot([s] * len(seeds), seeds, ".", color=line[0].get_color(), alpha=0.5)
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("test accuracy (%): line = median of seeds,\ndots = seeds, bars = median 95% CI", fontsize=8)
    ax.set_xticks(sorted({s for _, s in acc} | {s for _, s in pix}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "accuracy_vs_shot.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
