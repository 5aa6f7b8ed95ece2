"""Bottom-Up and Top-Down attention (Anderson et al. 2018): the VQA model over region features.

Bottom-up features: one vector per detected region, pooled with `torchvision.ops.roi_align` from a CNN trunk,
plus the box's geometry. Top-down baseline (the paper's ResNet grid): the same trunk's features pooled over a
fixed G x G grid of cells, with the cells' geometry: the two kinds differ only in which boxes are pooled.

Miniature: the trunk is this module's `Trunk`, trained in a `pretrain` stage to classify the regions of the
training scenes (digit or background: the detector's classification head, as the paper's Faster R-CNN is trained
on Visual Genome before its features are frozen); the "detections" are the scenes' ground-truth boxes jittered,
padded with background boxes (`mlrun.datasets.butd.region_boxes`). At the start of the `vqa` stage the frozen
trunk's features of every scene are computed once and kept (the paper's cached features). At paper scale the
items carry the released features and boxes, and there is no trunk stage.

VQA model (the paper's Figure 4): word embedding and a GRU over at most 14 tokens; top-down attention (a gated
tanh layer over [region; question] then a linear score per region, softmax over the k regions); gated tanh
projections of the question and the attended feature, fused by a Hadamard product; a gated tanh layer and a
linear classifier over the candidate answers, trained with binary cross-entropy against soft scores.
Metric: VQA accuracy min(#annotators who gave the predicted answer / 3, 1), in percent, overall and per type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.task import Task

# ------------------------------------------------------------------------------------------- parts


class GatedTanh(nn.Module):
    """y = tanh(W x + b) * sigmoid(W' x + b'): the paper's non-linearity throughout."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x)) * torch.sigmoid(self.gate(x))


def vqa_accuracy(pred: Tensor, answers: Tensor) -> Tensor:
    """Per question: min(#of the ten answers equal to the prediction / 3, 1). pred [B], answers [B, 10] ids."""
    return ((answers == pred[:, None]).sum(1).float() / 3.0).clamp(max=1.0)


def box_geometry(boxes: Tensor, size: float | Tensor = 1.0) -> Tensor:
    """(x1, y1, x2, y2, area) normalised by the image size; boxes [..., 4]."""
    b = boxes / size
    return torch.cat([b, ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[..., None]], -1)


def grid_boxes(grid: int, size: float) -> Tensor:
    """The G x G cells of a size x size image as boxes [G*G, 4], row by row."""
    edges = torch.linspace(0, size, grid + 1)
    y1, x1 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")
    step = size / grid
    return torch.stack([x1, y1, x1 + step, y1 + step], -1).reshape(-1, 4)


class Trunk(nn.Module):
    """A small CNN with a stride-4 feature map (the paper's ResNet-101 trunk in miniature)."""

    stride = 4

    def __init__(self, in_channels: int = 1, channels: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        )
        self.out_channels = c3

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Attention(nn.Module):
    """Top-down attention: a_i = softmax_i(w . f([v_i; q])) over the k regions."""

    def __init__(self, v_dim: int, q_dim: int, hidden: int) -> None:
        super().__init__()
        self.f = GatedTanh(v_dim + q_dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, v: Tensor, q: Tensor) -> Tensor:
        qk = q[:, None].expand(-1, v.shape[1], -1)
        return torch.softmax(self.w(self.f(torch.cat([v, qk], -1))).squeeze(-1), dim=1)


class VQANet(nn.Module):
    """Question GRU, top-down attention over regions, Hadamard fusion, gated-tanh classifier."""

    def __init__(self, vocab_size: int, num_answers: int, v_dim: int, embed: int = 300, hidden: int = 512,
                 att_hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.att = Attention(v_dim, hidden, att_hidden)
        self.fq, self.fv = GatedTanh(hidden, hidden), GatedTanh(v_dim, hidden)
        self.fo = GatedTanh(hidden, 2 * hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, num_answers)

    def encode_question(self, tokens: Tensor) -> Tensor:
        """The GRU's state after the last real token (0 pads the end)."""
        lengths = (tokens != 0).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.gru(packed)[1][0]

    def forward(self, v: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        q = self.encode_question(tokens)
        a = self.att(v, q)
        v_hat = (a[..., None] * v).sum(1)
        h = self.fq(q) * self.fv(v_hat)
        return self.out(self.drop(self.fo(h))), a


def draw_attention(ax: Any, image: Tensor, att: Tensor, boxes: Tensor, features: str, grid: int,
                   canvas: int) -> None:
    """A scene with its attention: the regions' boxes, wider and brighter by weight, or the grid as a heat map."""
    import matplotlib.pyplot as plt

    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    if features == "grid":
        ax.imshow(att.reshape(grid, grid), cmap="inferno", alpha=0.5, extent=(0, canvas, canvas, 0),
                  interpolation="nearest")
        return
    for w, (x1, y1, x2, y2) in sorted(zip(att.tolist(), boxes.tolist())):
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1 + 3 * w,
                                   color=plt.cm.inferno(0.2 + 0.8 * w / float(att.max()))))


# ------------------------------------------------------------------------------------------- task


class BottomUpTopDownVQA(Task):
    """VQA over bottom-up (region) or grid features, as stages `pretrain` (trunk, miniature only) and `vqa`.

    Args:
        features: "bottom_up" (detected regions) or "grid" (G x G cells of the same trunk).
        vocab_size, num_answers: sizes of the question vocabulary and the candidate answers (at least the data's).
        trunk: the CNN (None at paper scale, where items carry precomputed features).
        optimizers: stage name -> partial optimizer.
        grid: cells per side for grid features; pool: roi_align output side; canvas: image side in pixels.
        qtypes: question types, for accuracy by type.
        embed, hidden, att_hidden, dropout: VQANet sizes; feature_dim: D of precomputed features (paper scale).
    """

    def __init__(self, features: str, vocab_size: int, num_answers: int,
                 optimizers: dict[str, Callable[..., torch.optim.Optimizer]], trunk: nn.Module | None = None,
                 grid: int = 4, pool: int = 2, canvas: int = 64, feature_dim: int | None = None,
                 qtypes: tuple[str, ...] = ("count", "presence", "spatial", "superlative"), embed: int = 300,
                 hidden: int = 512, att_hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        if features not in ("bottom_up", "grid"):
            raise ValueError(f"features must be 'bottom_up' or 'grid', got {features!r}")
        self.features, self.grid, self.pool, self.canvas = features, grid, pool, canvas
        self.trunk = trunk
        self.qtypes = tuple(qtypes)
        self.region_head = nn.Linear(trunk.out_channels * pool * pool, 11) if trunk is not None else None
        v_dim = (trunk.out_channels * pool * pool if trunk is not None else int(feature_dim)) + 5
        self.vqa = VQANet(vocab_size, num_answers, v_dim, embed, hidden, att_hidden, dropout)
        self.vocab_size, self.num_answers = vocab_size, num_answers
        self._optimizers = dict(optimizers)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._data: Any = None

    # ------------------------------------------------------------------ features
    def pool_regions(self, fmap: Tensor, boxes: Tensor) -> Tensor:
        """roi_align of [B, k, 4] pixel boxes from the trunk's map -> [B, k, C * pool * pool]."""
        from torchvision.ops import roi_align

        b, k = boxes.shape[:2]
        pooled = roi_align(fmap, list(boxes.float()), self.pool, spatial_scale=1.0 / self.trunk.stride,
                           sampling_ratio=2, aligned=True)
        return pooled.reshape(b, k, -1)

    def boxes_for(self, boxes: Tensor) -> Tensor:
        """The boxes this run pools: the detections, or the grid's cells."""
        if self.features == "bottom_up":
            return boxes
        return grid_boxes(self.grid, self.canvas).to(boxes)[None].expand(len(boxes), -1, -1)

    @torch.no_grad()
    def extract(self, images: Tensor, boxes: Tensor, batch: int = 128) -> tuple[Tensor, Tensor]:
        """Frozen features [N, k, D + 5] (pooled trunk features and box geometry) and the boxes used."""
        was = self.trunk.training
        self.trunk.eval()
        feats, used = [], []
        for i in range(0, len(images), batch):
            bx = self.boxes_for(boxes[i : i + batch])
            v = self.pool_regions(self.trunk(images[i : i + batch]), bx)
            feats.append(torch.cat([v, box_geometry(bx, self.canvas)], -1))
            used.append(bx)
        self.trunk.train(was)
        return torch.cat(feats), torch.cat(used)

    def _regions(self, batch: dict[str, Any], split: str) -> Tensor:
        if "features" in batch:  # paper scale: precomputed features, boxes normalised to [0, 1]
            return torch.cat([batch["features"], box_geometry(batch["boxes"])], -1)
        if split not in self._cache:
            images, boxes = self._data.images(split), self._data.regions(split)[0]
            device = next(self.parameters()).device
            self._cache[split] = self.extract(images.to(device), boxes.to(device))
            if self.cache_dir is not None:
                self.save_features(split)
        return self._cache[split][0][batch["scene"]]

    def save_features(self, split: str) -> Path:
        """The frozen trunk's features of a split in the layout the paper-scale loaders read
        (`cache/features_<kind>/<split>.h5`: image_ids = scene index, image_w/h, boxes in pixels, features)."""
        from mlrun.datasets.butd import write_features_hdf5

        feats, boxes = self._cache[split]
        n = len(feats)
        side = np.full(n, self.canvas, dtype=np.int64)
        return write_features_hdf5(
            Path(self.cache_dir) / f"features_{self.features}" / f"{split}.h5",
            {"image_ids": np.arange(n, dtype=np.int64), "image_w": side, "image_h": side,
             "boxes": boxes.float().cpu().numpy(), "features": feats[..., :-5].float().cpu().numpy()})

    # ------------------------------------------------------------------ stages
    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self._data = data
        self._cache = {}
        if stage == "vqa":
            if self.trunk is not None:
                self.trunk.requires_grad_(False)
            words, answers = len(getattr(data, "vocab", [])), len(getattr(data, "answers", []))
            if words > self.vocab_size or answers > self.num_answers:
                from mlrun.errors import ConfigError

                raise ConfigError(f"the data have {words} words and {answers} answers; set model.vocab_size >= "
                                  f"{words} and model.num_answers >= {answers}")

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.stage == "pretrain":
            params = list(self.trunk.parameters()) + list(self.region_head.parameters())
        elif self.stage == "vqa":
            params = list(self.vqa.parameters())
        else:
            raise ValueError(f"BUTD has no stage {self.stage!r}: expected pretrain or vqa")
        return {"model": self._optimizers[self.stage](params)}

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor | None]]:
        if self.stage == "pretrain":
            images, boxes, labels = batch
            logits = self.region_head(self.pool_regions(self.trunk(images), boxes))
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            self.log("region_acc", (logits.argmax(-1) == labels).float().mean())
            yield "model", loss
            return
        logits, _ = self.vqa(self._regions(batch, "train"), batch["question"])
        # the paper's soft-score BCE, summed over answers (scaled by their number as in the authors' code)
        target = F.pad(batch["target"], (0, logits.shape[1] - batch["target"].shape[1]))  # unused outputs: 0
        yield "model", F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        if self.stage == "pretrain":
            hit = total = 0
            for images, boxes, labels in loader:
                pred = self.region_head(self.pool_regions(self.trunk(images), boxes)).argmax(-1)
                hit += int((pred == labels).sum())
                total += labels.numel()
            return {"region_acc": 100.0 * hit / max(total, 1)}
        scores, types = [], []
        for batch in loader:
            logits, _ = self.vqa(self._regions(batch, split), batch["question"])
            scores.append(vqa_accuracy(logits.argmax(1), batch["answers"]))
            types.append(batch["qtype"])
        acc, qtype = torch.cat(scores), torch.cat(types)
        out = {"acc": 100.0 * float(acc.mean())}
        for i, name in enumerate(self.qtypes):
            mask = qtype == i
            if mask.any():
                out[f"acc_{name.replace('/', '_')}"] = 100.0 * float(acc[mask].mean())
        return out

    # ------------------------------------------------------------------ figures
    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        """Test scenes with this run's attention drawn on its regions (boxes) or cells (heat map)."""
        if self.trunk is None or not hasattr(data, "images"):
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ds = data.dataset("test", "vqa")
        vocab = data.vocab
        picks = [i for i in range(len(ds)) if ds[i]["qtype"] in (0, 2)][:4]
        images = data.images("test")
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.6), squeeze=False)
        for ax, i in zip(axes[0], picks):
            item = ds[i]
            v = self._regions({"scene": torch.tensor([item["scene"]])}, "test")
            boxes = self._cache["test"][1][item["scene"]].cpu()
            logits, att = self.vqa(v, item["question"][None])
            att = att[0].detach().cpu()
            draw_attention(ax, images[item["scene"], 0], att, boxes, self.features, self.grid, self.canvas)
            q = " ".join(vocab[t] for t in item["question"].tolist() if t)
            pred = data.answers[int(logits.argmax())]
            ax.set_title(f"{q}?\npred {pred} (max att {float(att.max()):.2f})", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{self.features} attention")
        fig.tight_layout()
        path = out_dir / f"attention_{self.features}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return [path]

    def extra_state(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------------------- study


def summarize(study: dict) -> dict[str, float]:
    """Median over seeds of bottom-up minus grid, overall and per question type (points)."""
    import statistics

    by: dict[str, dict[str, list[float]]] = {}
    for run in study["runs"]:
        for k, v in (run.get("metrics") or {}).items():
            if k.startswith("test/acc"):
                by.setdefault(run["label"], {}).setdefault(k, []).append(v)
    out: dict[str, float] = {}
    if "bottom_up" in by and "grid" in by:
        for k in by["bottom_up"]:
            if k in by["grid"]:
                name = k.removeprefix("test/")
                out[f"gain_{name}"] = statistics.median(by["bottom_up"][k]) - statistics.median(by["grid"][k])
    return out


def _by_label(study: dict, prefix: str) -> dict[str, dict[str, list[float]]]:
    """{label: {metric suffix: [value per seed]}} for the runs' `prefix*` metrics."""
    by: dict[str, dict[str, list[float]]] = {}
    for run in study["runs"]:
        for k, v in (run.get("metrics") or {}).items():
            if k.startswith(prefix):
                key = k.removeprefix(prefix).lstrip("_") or "all"
                by.setdefault(run["label"], {}).setdefault(key, []).append(v)
    return by


def _bars(by: dict[str, dict[str, list[float]]], ylabel: str, title: str, path: Path) -> Path:
    """Grouped bars (median over seeds) with each seed as a dot; the numbers beside as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = sorted({k for d in by.values() for k in d}, key=lambda k: (k != "all", k))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(by)
    for j, (label, d) in enumerate(sorted(by.items())):
        x = np.arange(len(keys)) + j * width
        ax.bar(x, [float(np.median(d.get(k, [np.nan]))) for k in keys], width, label=label)
        for xi, k in zip(x, keys):
            ax.scatter([xi] * len(d.get(k, [])), d.get(k, []), color="k", s=6, zorder=3)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(by, indent=1))
    return path


def _side_by_side(study: dict, name: str, path: Path) -> list[Path]:
    """The first seed's per-run figure `figures/<name>_<label>.png` of each kind, stacked into one image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {}
    for run in sorted(study["runs"], key=lambda r: r.get("seed", 0)):
        png = Path(run.get("dir", "")) / "figures" / f"{name}_{run['label']}.png"
        if png.exists():
            found.setdefault(run["label"], png)
    if not found:
        return []
    fig, axes = plt.subplots(len(found), 1, figsize=(12, 4 * len(found)), squeeze=False)
    for ax, (_label, png) in zip(axes[:, 0], sorted(found.items())):
        ax.imshow(plt.imread(png))
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def study_figure(study: dict, out_dir: Path) -> list[Path]:
    """VQA accuracy by question type for both feature kinds (median and each seed), and both kinds' attention."""
    by = _by_label(study, "test/acc")
    if not by:
        return []
    out_dir = Path(out_dir)
    paths = [_bars(by, "VQA accuracy (%)", "Bottom-up regions vs grid features (median over seeds; dots: seeds)",
                   out_dir / "vqa_by_type.png")]
    return paths + _side_by_side(study, "attention", out_dir / "attention_grid_vs_bottom_up.png")


def caption_study_figure(study: dict, out_dir: Path) -> list[Path]:
    """Caption metrics for both feature kinds (median and each seed), and both kinds' captions of test scenes."""
    by = {label: {k: v for k, v in d.items() if k in ("BLEU4", "CIDEr", "METEOR", "ROUGE_L")}
          for label, d in _by_label(study, "test/").items()}
    if not any(by.values()):
        return []
    out_dir = Path(out_dir)
    paths = [_bars(by, "score (x100)", "Captioning: bottom-up regions vs grid (median over seeds; dots: seeds)",
                   out_dir / "caption_metrics.png")]
    return paths + _side_by_side(study, "captions", out_dir / "captions_grid_vs_bottom_up.png")


# ------------------------------------------------------------------------------------------- captioning


class TopDownCaptioner(nn.Module):
    """The paper's two-LSTM decoder (Figure 3): an attention LSTM reads [language LSTM state; mean feature;
    previous word], attends over the regions; a language LSTM reads [attended feature; attention LSTM state]."""

    def __init__(self, vocab_size: int, v_dim: int, embed: int = 1000, hidden: int = 1000, att_hidden: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.att_lstm = nn.LSTMCell(hidden + v_dim + embed, hidden)
        self.lang_lstm = nn.LSTMCell(v_dim + hidden, hidden)
        self.w_v, self.w_h = nn.Linear(v_dim, att_hidden, bias=False), nn.Linear(hidden, att_hidden)
        self.w_a = nn.Linear(att_hidden, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)
        self.hidden = hidden
        self.words = vocab_size  # outputs past the data's vocabulary (vocab_size is an upper bound) are never said

    def init_state(self, v: Tensor) -> tuple[Tensor, ...]:
        z = v.new_zeros(len(v), self.hidden)
        return z, z, z, z

    def step(self, v: Tensor, word: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """One word: log-probabilities of the next word [B, V], the new state, the attention [B, k]."""
        h1, c1, h2, c2 = state
        h1, c1 = self.att_lstm(torch.cat([h2, v.mean(1), self.embed(word)], -1), (h1, c1))
        a = torch.softmax(self.w_a(torch.tanh(self.w_v(v) + self.w_h(h1)[:, None])).squeeze(-1), 1)
        h2, c2 = self.lang_lstm(torch.cat([(a[..., None] * v).sum(1), h1], -1), (h2, c2))
        logits = self.out(self.drop(h2))
        if self.words < logits.shape[-1]:
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= self.words, -1e9)
        return torch.log_softmax(logits, -1), (h1, c1, h2, c2), a

    def forward(self, v: Tensor, tokens: Tensor) -> Tensor:
        """Teacher forcing: log-probabilities [B, T, V] of tokens[:, 1:] given tokens[:, :-1]."""
        state, out = self.init_state(v), []
        for t in range(tokens.shape[1] - 1):
            logp, state, _ = self.step(v, tokens[:, t], state)
            out.append(logp)
        return torch.stack(out, 1)

    def sample(self, v: Tensor, bos: int, eos: int, max_len: int = 16,
               greedy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Batched decoding by sampling (or argmax): words [B, T], their log-probabilities [B, T] and a mask [B, T]
        that is 1 up to and including each sequence's <eos> (words after it are <pad> = 0)."""
        word = torch.full((len(v),), bos, dtype=torch.long, device=v.device)
        alive = torch.ones(len(v), dtype=torch.bool, device=v.device)
        state, words, logps, masks = self.init_state(v), [], [], []
        for _ in range(max_len + 1):
            logp, state, _ = self.step(v, word, state)
            word = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(1)
            word = torch.where(alive, word, torch.zeros_like(word))
            words.append(word)
            logps.append(logp.gather(1, word[:, None]).squeeze(1))
            masks.append(alive.float())
            alive = alive & (word != eos)
            if not alive.any():
                break
        return torch.stack(words, 1), torch.stack(logps, 1), torch.stack(masks, 1)

    @torch.no_grad()
    def beam_search(self, v: Tensor, bos: int, eos: int, beam: int = 3, max_len: int = 16) -> list[list[int]]:
        """Per image, the highest-scoring sequence (sum of log-probabilities) among `beam` hypotheses."""
        results = []
        for i in range(len(v)):
            vi = v[i : i + 1]
            hyps = [([bos], 0.0, self.init_state(vi))]
            done: list[tuple[list[int], float]] = []
            for _ in range(max_len + 1):
                cand = []
                for seq, score, state in hyps:
                    logp, new, _ = self.step(vi, torch.tensor([seq[-1]], device=v.device), state)
                    top = logp[0].topk(beam)
                    cand += [(seq + [int(w)], score + float(s), new) for s, w in zip(top.values, top.indices)]
                cand.sort(key=lambda c: -c[1])
                hyps = []
                for seq, score, state in cand:
                    (done if seq[-1] == eos else hyps).append((seq, score) if seq[-1] == eos else (seq, score, state))
                    if len(hyps) == beam:
                        break
                if not hyps or (len(done) >= beam and max(s for _, s in done) >= hyps[0][1]):
                    break
            best = max(done or [(h[0], h[1]) for h in hyps], key=lambda c: c[1])[0]
            results.append([w for w in best[1:] if w != eos])
        return results


def caption_scores(candidates: dict[int, str], references: dict[int, list[str]],
                   meteor: bool = True) -> dict[str, float]:
    """pycocoevalcap BLEU-4, CIDEr, ROUGE-L, and METEOR where Java is installed (SPICE is skipped: it downloads
    Stanford CoreNLP at first use, which fails offline). Captions are already tokenised (lower case, spaces)."""
    import shutil
    import warnings

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {k: [c] for k, c in candidates.items()}
    gts = {k: list(r) for k, r in references.items()}
    out = {"BLEU4": Bleu(4).compute_score(gts, res, verbose=0)[0][3], "CIDEr": Cider().compute_score(gts, res)[0],
           "ROUGE_L": Rouge().compute_score(gts, res)[0]}
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    elif meteor:
        warnings.warn("METEOR skipped: no java on PATH", stacklevel=2)
    warnings.warn("SPICE skipped: it needs Stanford CoreNLP files, downloaded at first use (offline here)",
                  stacklevel=2)
    return {k: 100.0 * float(v) for k, v in out.items()}


def decode(seq: list[int] | Tensor, vocab: list[str], eos: int) -> str:
    """Word ids -> a caption, stopping at <eos> and dropping <pad>."""
    words = []
    for w in (seq.tolist() if isinstance(seq, Tensor) else seq):
        if w == eos:
            break
        if w:
            words.append(vocab[w])
    return " ".join(words) or "<empty>"


def cider_per_caption(candidates: list[str], references: list[list[str]]) -> Tensor:
    """pycocoevalcap's CIDEr of each candidate against its references, as the self-critical reward. The
    document frequencies come from the references passed (one batch), not the whole training corpus."""
    from pycocoevalcap.cider.cider import Cider

    keys = range(len(candidates))
    _, scores = Cider().compute_score({k: list(references[k]) for k in keys}, {k: [candidates[k]] for k in keys})
    return torch.as_tensor(scores, dtype=torch.float32)


class BottomUpTopDownCaption(Task):
    """Captioning over bottom-up or grid features. Stages: `pretrain` (the trunk, miniature only), `caption`
    (cross-entropy) and, optionally, `scst` (self-critical sequence training: the reward of a sampled caption
    is its CIDEr minus the greedy caption's, Rennie et al. 2017, as the paper's CIDEr optimisation). Evaluation
    decodes with beam search and scores with pycocoevalcap. With `trunk=None` (paper scale) the items carry
    precomputed features of `feature_dim`."""

    pool_regions = BottomUpTopDownVQA.pool_regions
    boxes_for = BottomUpTopDownVQA.boxes_for
    extract = BottomUpTopDownVQA.extract
    _regions = BottomUpTopDownVQA._regions
    save_features = BottomUpTopDownVQA.save_features

    def __init__(self, features: str, vocab_size: int, optimizers: dict[str, Callable[..., torch.optim.Optimizer]],
                 trunk: nn.Module | None = None, grid: int = 4, pool: int = 2, canvas: int = 64,
                 feature_dim: int | None = None, embed: int = 1000, hidden: int = 1000, att_hidden: int = 512,
                 dropout: float = 0.0, beam: int = 3, max_len: int = 16, meteor: bool = True) -> None:
        super().__init__()
        if features not in ("bottom_up", "grid"):
            raise ValueError(f"features must be 'bottom_up' or 'grid', got {features!r}")
        self.features, self.grid, self.pool, self.canvas = features, grid, pool, canvas
        self.trunk = trunk
        self.region_head = nn.Linear(trunk.out_channels * pool * pool, 11) if trunk is not None else None
        v_dim = (trunk.out_channels * pool * pool if trunk is not None else int(feature_dim)) + 5
        self.decoder = TopDownCaptioner(vocab_size, v_dim, embed, hidden, att_hidden, dropout)
        self.vocab_size = vocab_size
        self._optimizers = dict(optimizers)
        self.beam, self.max_len, self.meteor = beam, max_len, meteor
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._data: Any = None

    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self._data, self._cache = data, {}
        if stage in ("caption", "scst"):
            if self.trunk is not None:
                self.trunk.requires_grad_(False)
            words = len(data.vocab)
            if words > self.vocab_size:
                from mlrun.errors import ConfigError

                raise ConfigError(f"the captions have {words} words; set model.vocab_size >= {words}")
            self.decoder.words = words

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.stage == "pretrain":
            params = list(self.trunk.parameters()) + list(self.region_head.parameters())
        elif self.stage in ("caption", "scst"):
            params = list(self.decoder.parameters())
        else:
            raise ValueError(f"captioning has no stage {self.stage!r}: expected pretrain, caption or scst")
        return {"model": self._optimizers[self.stage](params)}

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor | None]]:
        if self.stage == "pretrain":
            yield from BottomUpTopDownVQA.training_step(self, batch)
            return
        v = self._regions(batch, "train")
        if self.stage == "caption":
            tokens = batch["tokens"]
            logp = self.decoder(v, tokens)
            yield "model", F.nll_loss(logp.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
            return
        # self-critical: REINFORCE with the greedy caption's reward as the baseline
        vocab = self._data.vocab
        bos, eos = vocab.index("<bos>"), vocab.index("<eos>")
        self.decoder.eval()
        with torch.no_grad():
            greedy, _, _ = self.decoder.sample(v, bos, eos, self.max_len, greedy=True)
        self.decoder.train()
        words, logp, mask = self.decoder.sample(v, bos, eos, self.max_len)
        refs = self._data.references("train")
        scene_refs = [refs[i] for i in batch["scene"].tolist()]
        reward = cider_per_caption([decode(w, vocab, eos) for w in [*words, *greedy]], scene_refs * 2)
        sampled, baseline = reward[: len(words)], reward[len(words):]
        self.log("reward", sampled.mean())
        self.log("greedy_reward", baseline.mean())
        advantage = (sampled - baseline).to(logp)[:, None]
        yield "model", -(advantage * logp * mask).sum() / mask.sum()

    @torch.no_grad()
    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        """Test scenes with the beam-search caption under each, and the regions (or cells) drawn by the attention
        they got, averaged over the caption's words."""
        if self.trunk is None or not hasattr(data, "images"):
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        vocab, images, refs = data.vocab, data.images("test"), data.references("test")
        bos, eos = vocab.index("<bos>"), vocab.index("<eos>")
        picks = list(range(min(4, len(images))))
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.9), squeeze=False)
        was = self.decoder.training
        self.decoder.eval()
        for ax, i in zip(axes[0], picks):
            v = self._regions({"scene": torch.tensor([i])}, "test")
            seq = self.decoder.beam_search(v, bos, eos, self.beam, self.max_len)[0]
            state, atts = self.decoder.init_state(v), []
            for w in [bos, *seq]:  # replay the caption to read its attention
                _, state, a = self.decoder.step(v, torch.tensor([w], device=v.device), state)
                atts.append(a[0])
            att = torch.stack(atts).mean(0).cpu()
            boxes = self._cache["test"][1][i].cpu()
            draw_attention(ax, images[i, 0], att, boxes, self.features, self.grid, self.canvas)
            caption = decode(seq, vocab, eos)
            ax.set_title(f"{caption}\n(ref: {refs[i][0]})", fontsize=7, wrap=True)
            ax.axis("off")
        self.decoder.train(was)
        fig.suptitle(f"{self.features}: beam-search captions, attention averaged over the words")
        fig.tight_layout()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"captions_{self.features}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return [path]

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        if self.stage == "pretrain":
            return BottomUpTopDownVQA.evaluate(self, loader, split)
        vocab = self._data.vocab
        refs = self._data.references(split)
        cands: dict[int, str] = {}
        for batch in loader:
            seqs = self.decoder.beam_search(self._regions(batch, split), vocab.index("<bos>"), vocab.index("<eos>"),
                                            self.beam, self.max_len)
            for i, seq in zip(batch["scene"].tolist(), seqs):
                cands[i] = decode(seq, vocab, vocab.index("<eos>"))
        return caption_scores(cands, {i: refs[i] for i in cands}, self.meteor)
