"""Bottom-Up and Top-Down attention (Anderson et al. 2018): VQA and captioning over detected regions.

Bottom-up features: one vector per region proposed by a detector trained on object boxes (the paper's Faster
R-CNN on Visual Genome), the box head's output for that region, plus the box's geometry. Top-down baseline (the
paper's ResNet grid): the same backbone pooled over a fixed G x G grid of cells, with the cells' geometry.

Miniature: the detector is torchvision's `FasterRCNN` with this module's `Trunk` as backbone (`DigitDetector`),
trained on the training scenes' digit boxes only, in a `detector` stage, then frozen; no ground truth is used at
test time. Its top-k boxes per image (score threshold 0) are the bottom-up regions, selected as the authors'
feature extraction does; grid cells go through the same RoI pooling and box head, so the two kinds differ only in
which boxes are pooled. The trained detector is kept in a content-addressed cache (`cache`), keyed by its
settings, the training scenes' settings and seed, and the code: both tasks and both feature kinds of a seed share
one. At the start of the `vqa`/`caption` stage every scene's features are computed once and kept (the paper's
cached features). At paper scale the items carry the released features and boxes, and there is no detector stage.

VQA model (the paper's Figure 4): word embedding and a GRU over at most 14 tokens; top-down attention (a gated
tanh layer over [region; question] then a linear score per region, softmax over the k regions); gated tanh
projections of the question and the attended feature, fused by a Hadamard product; a gated tanh layer and a
linear classifier over the candidate answers, trained with binary cross-entropy against soft scores.
Metric: VQA accuracy min(#annotators who gave the predicted answer / 3, 1), in percent, overall and per type.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.task import Task

log = logging.getLogger("mlrun")

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



# ------------------------------------------------------------------------------------------- detector


class DigitDetector(nn.Module):
    """Faster R-CNN (torchvision's) with the miniature's `Trunk` as backbone: the paper's bottom-up attention.

    Trained by `fit` on the training scenes' digit boxes (the paper's detector is trained on Visual Genome before
    its features are frozen). `detect` keeps k boxes per image as the authors' feature extraction does
    (peteanderson80/bottom-up-attention, tools/generate_tsv.py): the RPN's proposals are scored by the box
    classifier; per-class NMS (IoU `nms`) marks each proposal with its best surviving class score; the k proposals
    with the highest such score are kept (score threshold 0, so always k); their features are the box head's
    output for those proposals (the RoIs, not the regressed boxes, as the authors keep). `pool` runs the same RoI
    pooling and box head over any boxes: the grid's cells.

    Args:
        trunk: the backbone (stride-4 feature map, `out_channels`).
        num_classes: object classes (background is added).
        canvas: image side in pixels (images are not resized).
        anchor_sizes, aspect_ratios: the RPN's anchors (small: digits are 6-28 px).
        pool: RoIAlign output side; representation: the box head's width (the region feature's size).
        proposals: RPN proposals kept per image after its NMS at test time (the authors' 300, in miniature).
        roi_batch, positive_fraction: RoIs sampled per image for the box head's loss, and the share of them that
            may be objects (torchvision's default 0.25; 0.5 trains the classifier faster on few objects).
        nms: per-class NMS IoU of the box selection; k: boxes kept per image.
        steps, batch_size, lr: `fit`'s Adam steps, images per step and learning rate.
    """

    def __init__(self, trunk: nn.Module, num_classes: int = 10, canvas: int = 64,
                 anchor_sizes: tuple[int, ...] = (8, 16, 32), aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
                 pool: int = 2, representation: int = 128, proposals: int = 50, roi_batch: int = 32,
                 positive_fraction: float = 0.25, nms: float = 0.3, k: int = 8, steps: int = 1500,
                 batch_size: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.ops import MultiScaleRoIAlign

        channels = trunk.out_channels
        self.net = FasterRCNN(
            trunk, num_classes=None, min_size=canvas, max_size=canvas,
            image_mean=[0.0] * getattr(trunk, "in_channels", 1), image_std=[1.0] * getattr(trunk, "in_channels", 1),
            rpn_anchor_generator=AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),)),
            rpn_pre_nms_top_n_train=6 * proposals, rpn_post_nms_top_n_train=2 * proposals,
            rpn_pre_nms_top_n_test=6 * proposals, rpn_post_nms_top_n_test=proposals,
            rpn_batch_size_per_image=64, box_batch_size_per_image=roi_batch, box_positive_fraction=positive_fraction,
            box_roi_pool=MultiScaleRoIAlign(["0"], pool, sampling_ratio=2),
            box_head=TwoMLPHead(channels * pool * pool, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        )
        self.canvas, self.nms, self.k = canvas, nms, k
        self.representation = representation
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.settings = {  # what the trained weights depend on besides the data and the code (the cache key)
            "trunk": repr(trunk), "num_classes": num_classes, "canvas": canvas, "anchor_sizes": list(anchor_sizes),
            "aspect_ratios": list(aspect_ratios), "pool": pool, "representation": representation,
            "proposals": proposals, "roi_batch": roi_batch, "positive_fraction": positive_fraction, "steps": steps,
            "batch_size": batch_size, "lr": lr}

    # ------------------------------------------------------------------ training
    def fit(self, images: Tensor, boxes: list[Tensor], labels: list[Tensor], seed: int) -> list[float]:
        """`steps` Adam steps on random batches of the given scenes (labels 0-9); returns the loss every 50 steps.
        The global RNG is left as it was: the detector trains the same whether or not a run reuses a cached one."""
        targets = [{"boxes": b.float(), "labels": c.long() + 1} for b, c in zip(boxes, labels)]
        losses: list[float] = []
        was = self.training
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
            self.train()
            for step in range(self.steps):
                idx = torch.randint(0, len(images), (self.batch_size,), generator=g).tolist()
                loss = sum(self.net([images[i] for i in idx], [targets[i] for i in idx]).values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % 50 == 0 or step == self.steps - 1:
                    losses.append(float(loss.detach()))
        self.train(was)
        return losses

    # ------------------------------------------------------------------ features
    def _backbone(self, images: Tensor) -> tuple[dict[str, Tensor], list[tuple[int, int]], Any]:
        image_list, _ = self.net.transform(list(images))
        return {"0": self.net.backbone(image_list.tensors)}, image_list.image_sizes, image_list

    def _head(self, fmaps: dict[str, Tensor], boxes: list[Tensor], sizes: list[tuple[int, int]]) -> Tensor:
        heads = self.net.roi_heads
        return heads.box_head(heads.box_roi_pool(fmaps, boxes, sizes))

    @torch.no_grad()
    def detect(self, images: Tensor, chunk: int = 100) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes [N, k, 4] (pixels), box-head features [N, k, D] and selection scores [N, k], best first."""
        was = self.training
        self.eval()
        out_boxes, out_feats, out_scores = [], [], []
        for i in range(0, len(images), chunk):
            fmaps, sizes, image_list = self._backbone(images[i : i + chunk])
            proposals, _ = self.net.rpn(image_list, fmaps)
            feats = self._head(fmaps, proposals, sizes)
            probs = self.net.roi_heads.box_predictor(feats)[0].softmax(-1)
            counts = [len(p) for p in proposals]
            for props, f, p in zip(proposals, feats.split(counts), probs.split(counts)):
                order, best = select_regions(props, p, self.nms, self.k)
                out_boxes.append(props[order])
                out_feats.append(f[order])
                out_scores.append(best[order])
        self.train(was)
        return torch.stack(out_boxes), torch.stack(out_feats), torch.stack(out_scores)

    @torch.no_grad()
    def pool(self, images: Tensor, boxes: Tensor, chunk: int = 100) -> Tensor:
        """The box head's features [N, m, D] of given boxes [N, m, 4] (pixels)."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(images), chunk):
            fmaps, sizes, _ = self._backbone(images[i : i + chunk])
            bx = boxes[i : i + chunk].float()
            out.append(self._head(fmaps, list(bx), sizes).reshape(len(bx), bx.shape[1], -1))
        self.train(was)
        return torch.cat(out)


def select_regions(proposals: Tensor, probs: Tensor, nms: float, k: int) -> tuple[Tensor, Tensor]:
    """The authors' box selection (generate_tsv.py): for every object class, NMS at IoU `nms` over all the proposals
    scored by that class; a proposal's score is the best class score with which it survives; the k best proposals
    (repeating the last if there are fewer). proposals [n, 4], probs [n, 1 + classes] (column 0: background).
    Returns the k indices, best first, and every proposal's score [n]."""
    from torchvision.ops import batched_nms

    n, c = probs.shape[0], probs.shape[1] - 1
    cls = torch.arange(1, c + 1).repeat(n)
    idx = torch.arange(n).repeat_interleave(c)
    score = probs[:, 1:].reshape(-1)
    keep = batched_nms(proposals[idx].float(), score, cls, nms)
    best = torch.zeros(n, dtype=probs.dtype).scatter_reduce(0, idx[keep], score[keep], "amax")
    order = best.argsort(descending=True, stable=True)[:k]
    return torch.cat([order, order[-1:].repeat(k - len(order))]), best


def detection_stats(boxes: Tensor, gt_boxes: list[Tensor], iou: float = 0.5) -> dict[str, float]:
    """Recall at k (share of ground-truth objects covered by one of an image's k boxes at IoU >= iou), duplicate
    rate (share of the k boxes that cover an object a higher-ranked box already covers) and background rate (share
    that cover no object), in percent. boxes: [N, k, 4], best first; gt_boxes: N tensors [m_i, 4]."""
    from torchvision.ops import box_iou

    hit = total = dup = bg = 0
    for b, g in zip(boxes, gt_boxes):
        total += len(g)
        if not len(g):
            bg += len(b)
            continue
        ov = box_iou(b.float(), g.float())
        best, which = ov.max(1)
        hit += int((ov.max(0).values >= iou).sum())
        seen: set[int] = set()
        for o, j in zip(best.tolist(), which.tolist()):
            if o < iou:
                bg += 1
            elif j in seen:
                dup += 1
            else:
                seen.add(j)
    n = boxes.shape[0] * boxes.shape[1]
    return {"recall": 100.0 * hit / max(total, 1), "duplicates": 100.0 * dup / max(n, 1),
            "background": 100.0 * bg / max(n, 1)}


def code_digest(*objects: Any) -> str:
    """A hash of the source of the given classes/functions/modules and of torch's and torchvision's versions."""
    import inspect

    import torchvision

    h = hashlib.sha256(f"{torch.__version__} {torchvision.__version__}".encode())
    for obj in objects:
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()[:16]


def cached_fit(module: nn.Module, root: str | Path | None, key: dict[str, Any],
               fit: Callable[[], Any]) -> Path | None:
    """Train `module` with `fit()` once per key: if `root/<name>-<hash of key>.pt` exists its state is loaded
    instead (bit-identical to training again: same key, same settings, data, seed and code), else `fit()` runs and
    the state is written there atomically. Returns the file reused, or None when it trained. root None: no cache."""
    if root is None:
        fit()
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(root).expanduser() / f"{type(module).__name__.lower()}-{digest}.pt"
    if path.exists():
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return path
    fit()
    import io

    from mlrun.records import write_atomic

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    write_atomic(path, buf.getvalue())
    (path.with_suffix(".json")).write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
    return None


# ------------------------------------------------------------------------------------------- tasks


class RegionTask(Task):
    """What the VQA and captioning tasks share: the `detector` stage (train the detector on the training scenes, or
    reuse the cached one), the frozen bottom-up or grid features of every scene computed once per split, the
    detector's recall and duplicates, and the paper-scale path where items carry precomputed features.

    Args:
        features: "bottom_up" (the detector's top-k regions) or "grid" (G x G cells through the same box head).
        detector: a `DigitDetector` (None at paper scale, where items carry the released features).
        grid: cells per side of the grid features; canvas: image side in pixels.
        feature_dim: D of precomputed features (paper scale).
        normalize: L2-normalise each region's feature vector (the box head's ReLU outputs vary in scale from box
            to box, and that scale feeds the attention's gated tanh directly).
        cache: folder of the detector cache (`cached_fit`); None trains it in every run.
    """

    def __init__(self, features: str, detector: DigitDetector | None = None, grid: int = 4, canvas: int = 64,
                 feature_dim: int | None = None, normalize: bool = False, cache: str | None = None) -> None:
        super().__init__()
        if features not in ("bottom_up", "grid"):
            raise ValueError(f"features must be 'bottom_up' or 'grid', got {features!r}")
        if detector is None and feature_dim is None:
            raise ValueError("give a detector (miniature) or the feature_dim of precomputed features (paper scale)")
        self.features, self.grid, self.canvas, self.normalize = features, grid, canvas, normalize
        self.detector = detector
        self.detector_cache = cache
        self.v_dim = (detector.representation if detector is not None else int(feature_dim)) + 5
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._det_stats: dict[str, dict[str, float]] = {}
        self._data: Any = None

    # ------------------------------------------------------------------ detector stage
    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self._data, self._cache, self._det_stats = data, {}, {}
        if self.detector is not None:
            self.detector.requires_grad_(stage == "detector")

    def fit_detector(self) -> None:
        """Train the detector on the training scenes (boxes and labels), or load the one a run with the same
        detector settings, training scenes, seed and code trained before."""
        from mlrun.datasets import scenes as scenes_module

        data = self._data
        train = data.scenes("train")
        images = torch.from_numpy(np.stack([s.image for s in train]))[:, None]
        boxes = [torch.from_numpy(s.boxes) for s in train]
        labels = [torch.from_numpy(s.labels) for s in train]
        key = {"detector": self.detector.settings, "scenes": data.scene_key("train"),
               "code": code_digest(DigitDetector, Trunk, scenes_module)}
        losses: list[float] = []
        reused = cached_fit(self.detector, self.detector_cache, key,
                            lambda: losses.extend(self.detector.fit(images, boxes, labels, seed=data.seed)))
        log.info("detector %s", f"reused from {reused}" if reused else f"trained: loss {losses[0]:.3f} -> "
                 f"{losses[-1]:.3f}")
        self.log("detector_reused", float(reused is not None))
        if losses:
            self.log("detector_loss", losses[-1])

    def detector_step(self) -> Iterator[tuple[str, Tensor | None]]:
        """The `detector` stage's one step: the whole fit (its own loop, so that a cached detector skips it)."""
        self.fit_detector()
        return iter(())

    def detection_metrics(self, split: str) -> dict[str, float]:
        """The detector's recall at k, duplicate and background rates (percent) on a split's scenes."""
        if self.detector is None or not hasattr(self._data, "scenes"):
            return {}
        if split not in self._det_stats:
            scenes = self._data.scenes(split)
            if self.features == "bottom_up" and split in self._cache:
                boxes = self._cache[split][1].cpu()
            else:
                images = torch.from_numpy(np.stack([s.image for s in scenes]))[:, None]
                boxes = self.detector.detect(images.to(self._device()))[0].cpu()
            stats = detection_stats(boxes, [torch.from_numpy(s.boxes) for s in scenes])
            self._det_stats[split] = {f"det_{k}": v for k, v in stats.items()}
        return self._det_stats[split]

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ features
    def extract(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen features [N, m, D + 5] (box-head features and box geometry) and the boxes [N, m, 4] pooled."""
        if self.features == "bottom_up":
            boxes, feats, _ = self.detector.detect(images)
        else:
            boxes = grid_boxes(self.grid, self.canvas).to(images)[None].expand(len(images), -1, -1)
            feats = self.detector.pool(images, boxes)
        return self.compose(feats, box_geometry(boxes, self.canvas)), boxes

    def compose(self, feats: Tensor, geometry: Tensor) -> Tensor:
        """A region's vector: its feature (L2-normalised if `normalize`) and its geometry."""
        if self.normalize:
            feats = F.normalize(feats, dim=-1)
        return torch.cat([feats, geometry], -1)

    def regions(self, batch: dict[str, Any], split: str) -> Tensor:
        """The batch's region vectors [B, m, D + 5]: from the items (paper scale) or the split's frozen features."""
        if "features" in batch:  # paper scale: precomputed features, boxes normalised to [0, 1]
            return self.compose(batch["features"], box_geometry(batch["boxes"]))
        if split not in self._cache:
            self._cache[split] = self.extract(self._data.images(split).to(self._device()))
            if self.cache_dir is not None:
                self.save_features(split)
        return self._cache[split][0][batch["scene"]]

    def save_features(self, split: str) -> Path:
        """A split's frozen features in the released features' layout (`cache/features_<kind>/<split>.tsv`: one row
        per scene, image_id = scene index, boxes in pixels), as the paper-scale `FeatureStore` reads them."""
        from mlrun.datasets.butd import write_feature_tsv

        feats, boxes = self._cache[split]
        rows = ({"image_id": i, "image_w": self.canvas, "image_h": self.canvas, "boxes": b.float().cpu().numpy(),
                 "features": f[:, :-5].float().cpu().numpy()} for i, (f, b) in enumerate(zip(feats, boxes)))
        return write_feature_tsv(Path(self.cache_dir) / f"features_{self.features}" / f"{split}.tsv", rows)

    # ------------------------------------------------------------------ figures
    def draw_detections(self, out_dir: Path, data: Any, n: int = 4) -> Path | None:
        """Test scenes with the ground-truth digits (dashed) and the detector's k boxes, numbered by rank (drawn by
        the bottom-up run; the grid run pools the same detector's cells)."""
        if self.detector is None or self.features != "bottom_up" or not hasattr(data, "scenes"):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        scenes = data.scenes("test")[:n]
        images = torch.from_numpy(np.stack([s.image for s in scenes]))[:, None]
        boxes, _, scores = self.detector.detect(images.to(self._device()))
        stats = self.detection_metrics("test")
        fig, axes = plt.subplots(1, len(scenes), figsize=(3.2 * len(scenes), 3.6), squeeze=False)
        for ax, s, b, sc in zip(axes[0], scenes, boxes.cpu(), scores.cpu()):
            ax.imshow(s.image, cmap="gray", vmin=0, vmax=1)
            for x1, y1, x2, y2 in s.boxes.tolist():
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1, ls="--", color="lime"))
            for r, ((x1, y1, x2, y2), p) in enumerate(zip(b.tolist(), sc.tolist())):
                color = plt.cm.autumn(r / max(len(b) - 1, 1))
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, color=color))
                ax.text(x1 + 1, y1 + 4, f"{r + 1}:{p:.2f}", color=color, fontsize=6)
            ax.set_title(f"digits {' '.join(map(str, s.labels.tolist()))}", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"detector: top-{boxes.shape[1]} boxes (rank:score), ground truth dashed; test recall@"
                     f"{boxes.shape[1]} {stats.get('det_recall', float('nan')):.1f}%, duplicates "
                     f"{stats.get('det_duplicates', float('nan')):.1f}%", fontsize=9)
        fig.tight_layout()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"detections_{self.features}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


class BottomUpTopDownVQA(RegionTask):
    """VQA over bottom-up (region) or grid features, as stages `detector` (miniature only) and `vqa`.

    Args (besides `RegionTask`'s):
        vocab_size: the question vocabulary's size (at least the data's words).
        num_answers: candidate answers; None sizes the classifier from the data (`setup`).
        optimizers: stage name -> partial optimizer.
        qtypes: question types, for accuracy by type.
        embed, hidden, att_hidden, dropout: VQANet sizes.
    """

    def __init__(self, features: str, vocab_size: int, optimizers: dict[str, Callable[..., torch.optim.Optimizer]],
                 num_answers: int | None = None, detector: DigitDetector | None = None, grid: int = 4,
                 canvas: int = 64, feature_dim: int | None = None, normalize: bool = False,
                 qtypes: tuple[str, ...] = ("count", "presence", "spatial", "superlative"), embed: int = 300,
                 hidden: int = 512, att_hidden: int = 512, dropout: float = 0.0, cache: str | None = None) -> None:
        super().__init__(features, detector, grid, canvas, feature_dim, normalize, cache)
        self.qtypes = tuple(qtypes)
        self.vocab_size, self.num_answers = vocab_size, num_answers
        self.net_sizes = {"embed": embed, "hidden": hidden, "att_hidden": att_hidden, "dropout": dropout}
        self.vqa = VQANet(vocab_size, num_answers, self.v_dim, **self.net_sizes) if num_answers else None
        self._optimizers = dict(optimizers)

    def setup(self, data: Any) -> None:
        """Size the answer classifier from the data's candidate answers when `num_answers` is None."""
        answers = len(getattr(data, "answers", []))
        if self.vqa is None:
            self.num_answers = answers
            self.vqa = VQANet(self.vocab_size, answers, self.v_dim, **self.net_sizes)

    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        if self.vqa is None:
            self.setup(data)
        if stage == "vqa":
            words, answers = len(getattr(data, "vocab", [])), len(getattr(data, "answers", []))
            if words > self.vocab_size or answers > self.num_answers:
                from mlrun.errors import ConfigError

                raise ConfigError(f"the data have {words} words and {answers} answers; set model.vocab_size >= "
                                  f"{words} and model.num_answers >= {answers} (or null: from the data)")

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.stage == "detector":
            return {}
        if self.stage == "vqa":
            return {"model": self._optimizers["vqa"](self.vqa.parameters())}
        raise ValueError(f"BUTD VQA has no stage {self.stage!r}: expected detector or vqa")

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor | None]]:
        if self.stage == "detector":
            yield from self.detector_step()
            return
        logits, _ = self.vqa(self.regions(batch, "train"), batch["question"])
        # the paper's soft-score BCE, summed over answers (scaled by their number as in the authors' code)
        target = F.pad(batch["target"], (0, logits.shape[1] - batch["target"].shape[1]))  # unused outputs: 0
        yield "model", F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        if self.stage == "detector":
            return self.detection_metrics(split)
        scores, types = [], []
        for batch in loader:
            logits, _ = self.vqa(self.regions(batch, split), batch["question"])
            scores.append(vqa_accuracy(logits.argmax(1), batch["answers"]))
            types.append(batch["qtype"])
        acc, qtype = torch.cat(scores), torch.cat(types)
        out = {"acc": 100.0 * float(acc.mean())}
        for i, name in enumerate(self.qtypes):
            mask = qtype == i
            if mask.any():
                out[f"acc_{name.replace('/', '_')}"] = 100.0 * float(acc[mask].mean())
        return {**out, **self.detection_metrics(split)}

    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        """Test scenes with this run's attention drawn on its regions (boxes) or cells (heat map), and the
        detector's boxes on test scenes."""
        if self.detector is None or not hasattr(data, "images"):
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ds = data.dataset("test", "vqa")
        vocab = data.vocab
        picks = [i for i in range(len(ds)) if ds[i]["qtype"] in (1, 2)][:4]
        images = data.images("test")
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.6), squeeze=False)
        for ax, i in zip(axes[0], picks):
            item = ds[i]
            v = self.regions({"scene": torch.tensor([item["scene"]])}, "test")
            boxes = self._cache["test"][1][item["scene"]].cpu()
            logits, att = self.vqa(v, item["question"][None].to(v.device))
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
        det = self.draw_detections(out_dir, data)
        return [path] + ([det] if det else [])


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
    paths += _side_by_side(study, "detections", out_dir / "detections.png")
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
    paths += _side_by_side(study, "detections", out_dir / "detections.png")
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
        """Per image, the highest-scoring sequence (sum of log-probabilities) among `beam` hypotheses, without
        <bos>/<eos>. Each step extends every live hypothesis by its `beam` best words; of all these, best first, a
        candidate ending in <eos> is finished, the others refill the beam; an image stops when it has `beam`
        finished captions and the best of them scores at least its best live one; its answer is its best finished
        caption (else its best live one). The decoder runs once per step for all images and hypotheses."""
        n = len(v)
        vb = v.repeat_interleave(beam, 0)
        state = self.init_state(vb)
        words = torch.full((n * beam,), bos, dtype=torch.long, device=v.device)
        hyps: list[list[tuple[list[int], float]]] = [[([bos], 0.0)] for _ in range(n)]
        done: list[list[tuple[list[int], float]]] = [[] for _ in range(n)]
        active = [True] * n
        for _ in range(max_len + 1):
            logp, state, _ = self.step(vb, words, state)
            top = logp.view(n, beam, -1).topk(beam, dim=2)
            values, indices = top.values.tolist(), top.indices.tolist()
            parents: list[int] = []
            for i in range(n):
                parent = []
                if active[i]:
                    cand = [(score + values[i][h][j], h, indices[i][h][j])
                            for h, (_, score) in enumerate(hyps[i]) for j in range(beam)]
                    cand.sort(key=lambda c: -c[0])  # stable: ties keep (hypothesis, rank) order
                    live = []
                    for score, h, w in cand:
                        seq = hyps[i][h][0] + [w]
                        if w == eos:
                            done[i].append((seq, score))
                        else:
                            live.append((seq, score))
                            parent.append(h)
                        if len(live) == beam:
                            break
                    hyps[i] = live
                    if not live or (len(done[i]) >= beam and max(s for _, s in done[i]) >= live[0][1]):
                        active[i] = False
                parents += [i * beam + h for h in parent + [0] * (beam - len(parent))]
            if not any(active):
                break
            state = tuple(x[parents] for x in state)
            words = torch.tensor([hyps[i][j][0][-1] if j < len(hyps[i]) else eos for i in range(n)
                                  for j in range(beam)], dtype=torch.long, device=v.device)
        best = [max(done[i] or hyps[i], key=lambda c: c[1])[0] for i in range(n)]
        return [[w for w in seq[1:] if w != eos] for seq in best]


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


class CorpusCider:
    """CIDEr-D of each caption against its references, with the n-grams' document frequencies taken once from a
    fixed corpus (the training captions), as the self-critical reward of ruotianluo/self-critical.pytorch (its
    `cider_df: coco-train-idxs`), rather than from the references of the batch being scored. The formula is
    pycocoevalcap's (`CiderScorer`: tf-idf n-gram vectors for n = 1..4, clipped cosine similarity, Gaussian length
    penalty with sigma 6, x10); given the scored references as the corpus it equals pycocoevalcap's CIDEr."""

    def __init__(self, corpus: list[list[str]], n: int = 4, sigma: float = 6.0) -> None:
        from pycocoevalcap.cider.cider_scorer import precook

        self.n, self.sigma, self._precook = n, sigma, precook
        df: Counter = Counter()
        for refs in corpus:
            df.update({g for ref in refs for g in precook(ref, n)})
        self.log_df = {g: math.log(c) for g, c in df.items()}
        self.ref_len = math.log(float(len(corpus)))

    def _vec(self, counts: dict) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(self.n)]
        norm, length = [0.0] * self.n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = w = float(tf) * (self.ref_len - self.log_df.get(g, 0.0))
            norm[k] += w * w
            if k == 1:  # pycocoevalcap's length: the number of bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def __call__(self, candidates: list[str], references: list[list[str]]) -> Tensor:
        scores = []
        for cand, refs in zip(candidates, references):
            vh, nh, lh = self._vec(self._precook(cand, self.n))
            total = np.zeros(self.n)
            for ref in refs:
                vr, nr, lr = self._vec(self._precook(ref, self.n))
                for k in range(self.n):
                    val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                    if nh[k] and nr[k]:
                        val /= nh[k] * nr[k]
                    total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
            scores.append(10.0 * total.mean() / len(refs))
        return torch.as_tensor(scores, dtype=torch.float32)


class BottomUpTopDownCaption(RegionTask):
    """Captioning over bottom-up or grid features. Stages: `detector` (miniature only), `caption` (cross-entropy)
    and, optionally, `scst` (self-critical sequence training: the reward of a sampled caption is its CIDEr minus
    the greedy caption's, Rennie et al. 2017, as the paper's CIDEr optimisation; document frequencies from the
    training captions). Evaluation decodes with beam search and scores with pycocoevalcap. Without a detector
    (paper scale) the items carry precomputed features of `feature_dim`."""

    def __init__(self, features: str, vocab_size: int, optimizers: dict[str, Callable[..., torch.optim.Optimizer]],
                 detector: DigitDetector | None = None, grid: int = 4, canvas: int = 64,
                 feature_dim: int | None = None, normalize: bool = False, embed: int = 1000, hidden: int = 1000,
                 att_hidden: int = 512, dropout: float = 0.0, beam: int = 3, max_len: int = 16, meteor: bool = True,
                 cache: str | None = None) -> None:
        super().__init__(features, detector, grid, canvas, feature_dim, normalize, cache)
        self.decoder = TopDownCaptioner(vocab_size, self.v_dim, embed, hidden, att_hidden, dropout)
        self.vocab_size = vocab_size
        self._optimizers = dict(optimizers)
        self.beam, self.max_len, self.meteor = beam, max_len, meteor
        self._cider: CorpusCider | None = None

    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        if stage in ("caption", "scst"):
            words = len(data.vocab)
            if words > self.vocab_size:
                from mlrun.errors import ConfigError

                raise ConfigError(f"the captions have {words} words; set model.vocab_size >= {words}")
            self.decoder.words = words
        if stage == "scst" and self._cider is None:
            self._cider = CorpusCider(data.references("train"))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.stage == "detector":
            return {}
        if self.stage in ("caption", "scst"):
            return {"model": self._optimizers[self.stage](self.decoder.parameters())}
        raise ValueError(f"captioning has no stage {self.stage!r}: expected detector, caption or scst")

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor | None]]:
        if self.stage == "detector":
            yield from self.detector_step()
            return
        v = self.regions(batch, "train")
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
        reward = self._cider([decode(w, vocab, eos) for w in [*words, *greedy]], scene_refs * 2)
        sampled, baseline = reward[: len(words)], reward[len(words):]
        self.log("reward", sampled.mean())
        self.log("greedy_reward", baseline.mean())
        advantage = (sampled - baseline).to(logp)[:, None]
        yield "model", -(advantage * logp * mask).sum() / mask.sum()

    @torch.no_grad()
    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        """Test scenes with the beam-search caption under each, and the regions (or cells) drawn by the attention
        they got, averaged over the caption's words."""
        if self.detector is None or not hasattr(data, "images"):
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
            v = self.regions({"scene": torch.tensor([i])}, "test")
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
        det = self.draw_detections(out_dir, data)
        return [path] + ([det] if det else [])

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        if self.stage == "detector":
            return self.detection_metrics(split)
        vocab = self._data.vocab
        refs = self._data.references(split)
        cands: dict[int, str] = {}
        for batch in loader:
            seqs = self.decoder.beam_search(self.regions(batch, split), vocab.index("<bos>"), vocab.index("<eos>"),
                                            self.beam, self.max_len)
            for i, seq in zip(batch["scene"].tolist(), seqs):
                cands[i] = decode(seq, vocab, vocab.index("<eos>"))
        return {**caption_scores(cands, {i: refs[i] for i in cands}, self.meteor), **self.detection_metrics(split)}
