"""R-CNN (Girshick et al. 2014): selective-search proposals, warped-window CNN features, per-class linear SVMs,
class-specific box regression, per-class NMS and VOC average precision.

The whole pipeline runs as stages of one run (the experiment's `stages:` list; each name below is a kind of
stage this task knows):

- `proposals`: selective search (fast mode) on every image of every split, cached; recall at IoU 0.5 logged.
- `pretrain`: supervised classification of isolated digits (the paper's ImageNet pretraining, in miniature).
- `svm_pixels` / `svm_hog` / `svm_pretrained` / `svm_finetuned`: per-class linear SVMs with hard-negative mining
  on one kind of window feature (raw warped pixels; HOG of the warped window, scikit-image's `hog`, the pre-CNN
  features of DPM's era; fc7 of a frozen copy of the pretrained CNN; fc7 of the fine-tuned CNN). A step that
  yields nothing: the fit is closed over the whole train split.
- `finetune`: SGD on warped proposals, (N+1)-way with background, 25% positives (IoU >= 0.5) per mini-batch.
- `bbox`: class-specific ridge regression from pool5 to box offsets, on proposals with IoU > 0.6.

Evaluation reports mAP (percent) for every variant fitted so far: a = pixels + SVM, hog = HOG + SVM, b = frozen
pretrained CNN + SVM, c = fine-tuned CNN + SVM, d = c + box regression; at each IoU threshold of `ap_ious` (the
first, VOC's 0.5, as `mAP_<v>`, the others as `mAP<100 x iou>_<v>`, e.g. `mAP70_d`, where a loose box no longer
counts and box regression matters); plus per-class AP, proposal recall and the number of scored images.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlrun.datasets.proposals import selective_search
from mlrun.errors import DataError
from mlrun.task import Task

log = logging.getLogger("mlrun")

FEATURES = ("pixels", "hog", "pretrained", "finetuned")
VARIANT = {"pixels": "a", "hog": "hog", "pretrained": "b", "finetuned": "c", "bbox": "d"}
VARIANTS = ("a", "hog", "b", "c", "d")  # the order of tables and figures


# ---------------------------------------------------------------------------------------------- boxes


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix; boxes are (x1, y1, x2, y2) with x2/y2 exclusive, so a box's area is w * h."""
    from torchvision.ops import box_iou as tv_box_iou

    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b))
    return tv_box_iou(a.float(), b.float())


def nms(boxes: Tensor, scores: Tensor, iou: float) -> Tensor:
    """Greedy NMS: keep the best-scoring box, drop every box overlapping a kept one by IoU > iou."""
    from torchvision.ops import nms as tv_nms

    return tv_nms(boxes.float(), scores.float(), iou)


def proposal_recall(proposals: list[Tensor], gt_boxes: list[Tensor], iou: float = 0.5) -> float:
    """Share of ground-truth boxes covered by some proposal with IoU >= iou."""
    hit = total = 0
    for p, g in zip(proposals, gt_boxes):
        total += len(g)
        if len(g) and len(p):
            hit += int((box_iou(g, p).max(1).values >= iou).sum())
    return hit / max(total, 1)


def context_boxes(boxes: Tensor, size: int, pad: int) -> Tensor:
    """Dilate each box about its centre so that, once warped to size x size, `pad` pixels of context surround
    the original box (the paper's p = 16 at 227)."""
    scale = size / (size - 2 * pad)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    return torch.cat([centre - half, centre + half], dim=1)


def warp(images: Tensor, boxes: Tensor | list[Tensor], size: int, pad: int = 0) -> Tensor:
    """Crop each box (with context) and warp it anisotropically to size x size, bilinearly (roi_align).

    images: [B, C, H, W]; boxes: a list of [n_i, 4] per image, or [n, 5] rows (batch index, x1, y1, x2, y2).
    Pixel i covers [i, i + 1), so a box with exclusive x2 maps exactly (aligned=True). Outside the image is 0.
    """
    from torchvision.ops import roi_align

    if isinstance(boxes, list):
        boxes = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b.float()], 1) for i, b in enumerate(boxes)])
    if len(boxes) == 0:
        return images.new_zeros(0, images.shape[1], size, size)
    rois = torch.cat([boxes[:, :1], context_boxes(boxes[:, 1:], size, pad)], dim=1).to(images)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def encode(proposals: Tensor, gt: Tensor) -> Tensor:
    """The paper's regression targets: centre shifts in units of the proposal's size, log size ratios."""
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    px, py = proposals[:, 0] + pw / 2, proposals[:, 1] + ph / 2
    gx, gy = gt[:, 0] + gw / 2, gt[:, 1] + gh / 2
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)


def decode(proposals: Tensor, t: Tensor) -> Tensor:
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    px, py = proposals[:, 0] + pw / 2, proposals[:, 1] + ph / 2
    x, y = px + pw * t[:, 0], py + ph * t[:, 1]
    w, h = pw * torch.exp(t[:, 2].clamp(max=4)), ph * torch.exp(t[:, 3].clamp(max=4))
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=1)


def hog_features(windows: Tensor, cell: int = 6, block: int = 2, orientations: int = 9) -> Tensor:
    """HOG descriptors (scikit-image's `hog`: unsigned gradients, `cell` x `cell` pixel cells, `block` x `block`
    cell blocks, L2-Hys) of warped windows [n, C, s, s] -> [n, d]; colour windows use the strongest channel's
    gradient at each pixel, as Dalal and Triggs."""
    from skimage.feature import hog

    if len(windows) == 0:
        side = windows.shape[-1] // cell
        blocks = max(side - block + 1, 0) ** 2
        return torch.zeros(0, blocks * block * block * orientations)
    arr = windows.detach().cpu().double().numpy()
    kw = dict(orientations=orientations, pixels_per_cell=(cell, cell), cells_per_block=(block, block),
              block_norm="L2-Hys", feature_vector=True)
    if arr.shape[1] == 1:
        feats = [hog(w[0], **kw) for w in arr]
    else:
        feats = [hog(w.transpose(1, 2, 0), channel_axis=-1, **kw) for w in arr]
    return torch.from_numpy(np.stack(feats)).float()


# ---------------------------------------------------------------------------------------------- VOC AP


def average_precision(scores: np.ndarray, tp: np.ndarray, n_pos: int, use_07: bool = True) -> float:
    """AP of a ranking: detections' scores and true-positive flags, against n_pos ground-truth objects.

    use_07: the VOC 2007 11-point interpolation (mean of the best precision at recall >= 0, 0.1, ..., 1);
    else the area under the monotone precision envelope (VOC 2010 onwards).
    """
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(tp, dtype=np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    rec = ctp / n_pos
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if use_07:
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def match_detections(det_boxes: list[Tensor], det_scores: list[Tensor], gt_boxes: list[Tensor],
                     gt_difficult: list[Tensor] | None = None, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, int]:
    """VOC matching for one class: in descending score order over all images, a detection is a true positive
    when its best-overlapping ground truth (IoU > iou) is not yet taken; a match to a 'difficult' object counts
    neither way. Returns (scores, tp flags, number of non-difficult objects)."""
    scores = torch.cat([s.float() for s in det_scores]).numpy() if det_scores else np.zeros(0)
    image = np.concatenate([np.full(len(s), i) for i, s in enumerate(det_scores)]) if det_scores else np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    difficult = gt_difficult or [torch.zeros(len(g), dtype=torch.bool) for g in gt_boxes]
    taken = [np.zeros(len(g), dtype=bool) for g in gt_boxes]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in det_scores])]) if det_scores else np.zeros(1, int)
    keep = np.ones(len(scores), dtype=bool)
    tp = np.zeros(len(scores))
    for j in order:
        i = int(image[j])
        g = gt_boxes[i]
        if len(g) == 0:
            continue
        ov = box_iou(det_boxes[i][j - offsets[i]][None], g)[0]
        best = int(ov.argmax())
        if float(ov[best]) > iou:
            if bool(difficult[i][best]):
                keep[j] = False
            elif not taken[i][best]:
                taken[i][best] = True
                tp[j] = 1
    n_pos = int(sum(int((~d.bool()).sum()) for d in difficult))
    return scores[keep], tp[keep], n_pos


# ---------------------------------------------------------------------------------------------- networks


class DigitNet(nn.Module):
    """A miniature AlexNet for warped windows: three conv blocks (pool5), then fc6 and fc7 (the SVMs' features).

    Args:
        in_channels: image channels; size: the warp size the net expects (pool5 is (size / 8)^2 cells).
        channels: conv widths; hidden: fc6 and fc7 width.
    """

    def __init__(self, in_channels: int = 1, size: int = 24, channels: tuple[int, int, int] = (16, 32, 64),
                 hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.in_channels, self.size = in_channels, size
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool5_dim = c3 * (size // 8) ** 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(self.pool5_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.fc7_dim = hidden

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pool5 flattened, fc7)."""
        p5 = self.conv(x)
        return p5.flatten(1), self.fc(p5)


TORCHVISION_WEIGHTS = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth"}


class TorchvisionNet(nn.Module):
    """torchvision's AlexNet (the paper's T-Net) or VGG-16 (O-Net) as pool5 and fc7, ImageNet weights from a file.

    Args:
        arch: "alexnet" or "vgg16".
        weights: a torchvision state-dict file (e.g. alexnet-owt-7be5be79.pth); None: random init (smoke runs).
        size: the warp size (227 in the paper; 224 is torchvision's native size, 227 works through the
            adaptive pooling).
    """

    def __init__(self, arch: str = "alexnet", weights: str | None = None, size: int = 227) -> None:
        super().__init__()
        import torchvision

        if arch not in TORCHVISION_WEIGHTS:
            raise ValueError(f"arch={arch!r}: expected one of {sorted(TORCHVISION_WEIGHTS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise DataError(
                    path, f"torchvision's ImageNet weights for {arch} ({TORCHVISION_WEIGHTS[arch]}, a state dict)",
                    f"Download https://download.pytorch.org/models/{TORCHVISION_WEIGHTS[arch]} where there is network "
                    "access and copy it there (or point model.net.weights at it); model.net.weights=null trains "
                    "from random init (smoke runs only)",
                )
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.in_channels, self.size = 3, size
        self.conv = nn.Sequential(net.features, net.avgpool)
        cls = list(net.classifier.children())
        fc7_end = 6 if arch == "alexnet" else 5  # up to fc7's ReLU (AlexNet puts dropout first, VGG after)
        self.fc = nn.Sequential(nn.Flatten(), *cls[:fc7_end])
        self.pool5_dim = cls[1].in_features if arch == "alexnet" else cls[0].in_features
        self.fc7_dim = 4096
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        p5 = self.conv((x - self.mean) / self.std)
        return p5.flatten(1), self.fc(p5)


# ---------------------------------------------------------------------------------------------- the task


class RCNN(Task):
    """R-CNN as a task over stages (see the module docstring).

    Args:
        net: the CNN (`DigitNet` or `TorchvisionNet`), returning (pool5, fc7) for warped windows.
        optimizers: stage name -> partial optimizer, e.g. {pretrain: SGD lr 0.01, finetune: SGD lr 0.001}.
        num_classes: object classes (background is one more output when fine-tuning).
        pretrain_classes: classes of the pretraining task (None: no pretraining head, the net comes pretrained).
        context_pad: pixels of context around each window at the warp size (the paper's p).
        pixel_size: warp size of the raw-pixel features (variant a).
        proposals: selective-search settings (`selective_search` keywords); cache_dir keeps them on disk.
        fg_iou / batch_windows / fg_fraction: fine-tuning windows: positives at IoU >= fg_iou, the rest
            background; mini-batches of batch_windows with fg_fraction positives.
        svm_neg_iou, svm_C, svm_pos_weight, svm_bias, feat_norm, hard_rounds, hard_init: per-class linear SVMs
            (liblinear's L1-loss dual, as the authors' code), negatives below svm_neg_iou, features scaled to
            a mean norm of feat_norm; hard-negative mining from hard_init random negatives for hard_rounds.
        bbox_iou, ridge_lambda: box regression on proposals with IoU > bbox_iou, ridge penalty.
        hog_size, hog_cell, hog_block, hog_orientations: the HOG baseline's warp size and descriptor.
        nms_iou: per-class greedy NMS threshold at test; ap_ious and voc07: the AP protocol (the first IoU is the
            primary `mAP_<v>`).
        max_windows: forward at most this many windows at once (memory).
    """

    def __init__(self, net: nn.Module, optimizers: dict[str, Callable[..., torch.optim.Optimizer]],
                 num_classes: int = 10, pretrain_classes: int | None = 10, context_pad: int = 2,
                 pixel_size: int = 12, proposals: dict | None = None, fg_iou: float = 0.5, batch_windows: int = 128,
                 fg_fraction: float = 0.25, pretrain_jitter: float = 0.1, svm_neg_iou: float = 0.3,
                 svm_C: float = 0.001, svm_pos_weight: float = 2.0, svm_bias: float = 10.0, feat_norm: float = 20.0,
                 hard_rounds: int = 3, hard_init: int = 2000, bbox_iou: float = 0.6, ridge_lambda: float = 1000.0,
                 hog_size: int = 24, hog_cell: int = 6, hog_block: int = 2, hog_orientations: int = 9,
                 nms_iou: float = 0.3, ap_ious: tuple[float, ...] | list[float] = (0.5, 0.7), voc07: bool = True,
                 max_windows: int = 1024) -> None:
        super().__init__()
        self.net = net
        self.pretrained_net = copy.deepcopy(net).requires_grad_(False)  # variant b: frozen after pretraining
        self.num_classes = num_classes
        self.pretrain_head = nn.Linear(net.fc7_dim, pretrain_classes) if pretrain_classes else None
        self.det_head = nn.Linear(net.fc7_dim, num_classes + 1)  # index 0 is background
        self._optimizers = dict(optimizers)
        self.size, self.pad, self.pixel_size = net.size, context_pad, pixel_size
        self.proposal_kw = dict(proposals or {})
        self.cache_dir = self.proposal_kw.pop("cache_dir", None)
        self.fg_iou, self.batch_windows, self.fg_fraction = fg_iou, batch_windows, fg_fraction
        self.pretrain_jitter = pretrain_jitter
        self.svm_neg_iou, self.svm_C, self.svm_pos_weight, self.svm_bias = svm_neg_iou, svm_C, svm_pos_weight, svm_bias
        self.feat_norm, self.hard_rounds, self.hard_init = feat_norm, hard_rounds, hard_init
        self.bbox_iou, self.ridge_lambda = bbox_iou, ridge_lambda
        self.hog_size, self.hog_kw = hog_size, {"cell": hog_cell, "block": hog_block, "orientations": hog_orientations}
        self.nms_iou, self.ap_ious, self.voc07 = nms_iou, tuple(float(v) for v in ap_ious), voc07
        self.max_windows = max_windows
        self.svms: dict[str, dict[str, Tensor]] = {}
        self.bbox: dict[str, Tensor] = {}
        self._proposals: dict[tuple[str, Any], Tensor] = {}
        self._data: Any = None
        self.last_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ stages
    def on_stage_start(self, stage: str, data: Any) -> None:
        super().on_stage_start(stage, data)
        self._data = data
        if stage == "svm_pretrained":
            self.pretrained_net.load_state_dict(self.net.state_dict())

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.stage == "pretrain":
            params = list(self.net.parameters()) + list(self.pretrain_head.parameters())
        elif self.stage == "finetune":
            params = list(self.net.parameters()) + list(self.det_head.parameters())
        else:
            return {}
        return {"model": self._optimizers[self.stage](params)}

    def training_step(self, batch: Any) -> Iterator[tuple[str, Tensor | None]]:
        if self.stage == "pretrain":
            yield "model", self._pretrain_loss(*batch)
        elif self.stage == "finetune":
            yield "model", self._finetune_loss(*batch)
        elif self.stage == "proposals":
            self._fit_proposals()
        elif self.stage.startswith("svm_"):
            self._fit_svms(self.stage.removeprefix("svm_"))
        elif self.stage == "bbox":
            self._fit_bbox()
        else:
            raise ValueError(f"R-CNN has no stage {self.stage!r}: expected proposals, pretrain, svm_<features> "
                             f"with features in {FEATURES}, finetune or bbox")

    # ------------------------------------------------------------------ proposals
    def proposals(self, split: str, image_id: Any, image: Tensor) -> Tensor:
        """Selective-search boxes of one image, computed once per (split, image) and kept."""
        key = (split, image_id)
        if key not in self._proposals:
            path = None
            if self.cache_dir is not None:
                path = Path(self.cache_dir).expanduser() / f"{split}_{image_id}.npy"
                if path.exists():
                    self._proposals[key] = torch.from_numpy(np.load(path))
                    return self._proposals[key]
            arr = image.detach().cpu().float()
            arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
            boxes = selective_search(arr, **self.proposal_kw)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, boxes)
            self._proposals[key] = torch.from_numpy(boxes)
        return self._proposals[key]

    def _fit_proposals(self) -> None:
        for split in ("train", "val", "test"):
            try:
                ds = self._data.dataset(split)
            except KeyError:
                continue
            props, gts = [], []
            for image, target in ds:
                props.append(self.proposals(split, target["image_id"], image))
                gts.append(target["boxes"])
            self.log(f"recall_{split}", proposal_recall(props, gts))
            self.log(f"proposals_per_image_{split}", sum(len(p) for p in props) / max(len(props), 1))

    # ------------------------------------------------------------------ gradient stages
    def _pretrain_loss(self, x: Tensor, y: Tensor) -> Tensor:
        boxes = self._ink_boxes(x)
        if self.pretrain_jitter:
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            boxes = boxes + (torch.rand_like(boxes) * 2 - 1) * self.pretrain_jitter * wh
        windows = warp(x.float(), torch.cat([torch.arange(len(x), dtype=torch.float32)[:, None], boxes], 1),
                       self.size, self.pad)
        return F.cross_entropy(self.pretrain_head(self.net(windows)[1]), y)

    @staticmethod
    def _ink_boxes(x: Tensor, threshold: float = 0.2) -> Tensor:
        """Tight boxes around each isolated digit's ink ([B, 1, h, w] images)."""
        ink = x[:, 0] > threshold
        cols, rows = ink.any(1), ink.any(2)
        idx_c = torch.arange(x.shape[-1]).expand_as(cols)
        idx_r = torch.arange(x.shape[-2]).expand_as(rows)
        x1 = torch.where(cols, idx_c, x.shape[-1]).min(1).values
        x2 = torch.where(cols, idx_c, -1).max(1).values + 1
        y1 = torch.where(rows, idx_r, x.shape[-2]).min(1).values
        y2 = torch.where(rows, idx_r, -1).max(1).values + 1
        boxes = torch.stack([x1, y1, x2, y2], 1).float()
        empty = ~cols.any(1)
        boxes[empty] = torch.tensor([0.0, 0.0, x.shape[-1], x.shape[-2]])
        return boxes

    def _windows(self, split: str, image: Tensor, target: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Proposals plus ground truth, each with its best IoU and label (0 = background below fg_iou)."""
        gt = target["boxes"].float()
        boxes = torch.cat([self.proposals(split, target["image_id"], image), gt])
        labels = torch.zeros(len(boxes), dtype=torch.long)
        best = torch.zeros(len(boxes))
        if len(gt):
            ov = box_iou(boxes, gt)
            best, arg = ov.max(1)
            labels = torch.where(best >= self.fg_iou, target["labels"][arg] + 1, 0)
        return boxes, labels, best

    def _finetune_loss(self, images: list[Tensor], targets: list[dict]) -> Tensor:
        rois, labels = [], []
        for i, (image, target) in enumerate(zip(images, targets)):
            boxes, lab, _ = self._windows("train", image, target)
            rois.append(torch.cat([torch.full((len(boxes), 1), float(i)), boxes], 1))
            labels.append(lab)
        rois, labels = torch.cat(rois), torch.cat(labels)
        fg, bg = torch.nonzero(labels > 0)[:, 0], torch.nonzero(labels == 0)[:, 0]
        n_fg = min(int(round(self.batch_windows * self.fg_fraction)), len(fg))
        n_bg = min(self.batch_windows - n_fg, len(bg))
        pick = torch.cat([fg[torch.randperm(len(fg))[:n_fg]], bg[torch.randperm(len(bg))[:n_bg]]])
        stack = _stack(images)
        windows = warp(stack, rois[pick], self.size, self.pad)
        self.log("fg_windows", torch.tensor(float(n_fg)))
        return F.cross_entropy(self.det_head(self.net(windows)[1]), labels[pick])

    # ------------------------------------------------------------------ features
    def features(self, kind: str, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor | None]:
        """Window features of one image: (SVM features, pool5 or None). kind: pixels, hog, pretrained or
        finetuned."""
        if kind == "pixels":
            w = warp(image[None].float(), [boxes], self.pixel_size, round(self.pad * self.pixel_size / self.size))
            return w.flatten(1), None
        if kind == "hog":
            w = warp(image[None].float(), [boxes], self.hog_size, round(self.pad * self.hog_size / self.size))
            return hog_features(w, **self.hog_kw), None
        net = self.pretrained_net if kind == "pretrained" else self.net
        was = net.training
        net.eval()
        out5, out7 = [], []
        with torch.no_grad():
            for chunk in boxes.split(self.max_windows):
                p5, f7 = net(warp(image[None].float(), [chunk], self.size, self.pad))
                out5.append(p5)
                out7.append(f7)
        net.train(was)
        if not out7:
            return torch.zeros(0, net.fc7_dim), torch.zeros(0, net.pool5_dim)
        return torch.cat(out7), torch.cat(out5)

    def _train_items(self) -> list[tuple[Tensor, dict]]:
        return list(self._data.dataset("train"))

    # ------------------------------------------------------------------ SVMs
    def _fit_svms(self, kind: str) -> None:
        """One linear SVM per class: ground-truth windows are positives, proposals below svm_neg_iou with every
        object of the class are negatives; start from hard_init random negatives, then add every negative
        inside the margin (score > -1) and drop easy ones (< -1.2), hard_rounds times."""
        from sklearn.svm import LinearSVC

        if kind not in FEATURES:
            raise ValueError(f"svm_{kind}: features must be one of {FEATURES}")
        gt_x, gt_y, neg_x, neg_ov = [], [], [], []
        for image, target in self._train_items():
            props = self.proposals("train", target["image_id"], image)
            gt = target["boxes"].float()
            feats, _ = self.features(kind, image, torch.cat([props, gt]))
            gt_x.append(feats[len(props):])
            gt_y.append(target["labels"])
            neg_x.append(feats[: len(props)])
            ov = torch.zeros(len(props), self.num_classes)
            if len(gt):
                iou = box_iou(props, gt)
                for c in target["labels"].unique():
                    ov[:, c] = iou[:, target["labels"] == c].max(1).values
            neg_ov.append(ov)
        gt_x, gt_y, neg_x, neg_ov = torch.cat(gt_x), torch.cat(gt_y), torch.cat(neg_x), torch.cat(neg_ov)
        scale = self.feat_norm / float(torch.cat([gt_x, neg_x]).norm(dim=1).mean().clamp_min(1e-8))
        gx, nx = (gt_x * scale).numpy(), (neg_x * scale).numpy()
        weights = torch.zeros(gx.shape[1], self.num_classes)
        bias = torch.zeros(self.num_classes)
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
        hard_counts = []
        for c in range(self.num_classes):
            pos = gx[(gt_y == c).numpy()]
            cand = torch.nonzero(neg_ov[:, c] < self.svm_neg_iou)[:, 0]
            if len(pos) == 0 or len(cand) == 0:
                bias[c] = -1e3
                continue
            active = cand[torch.randperm(len(cand), generator=gen)[: self.hard_init]].numpy()
            for _ in range(max(self.hard_rounds, 1)):
                svm = LinearSVC(C=self.svm_C, loss="hinge", dual=True, class_weight={1: self.svm_pos_weight, 0: 1.0},
                                intercept_scaling=self.svm_bias, max_iter=5000, random_state=0)
                x = np.concatenate([pos, nx[active]])
                y = np.concatenate([np.ones(len(pos)), np.zeros(len(active))])
                svm.fit(x, y)
                scores = nx[cand.numpy()] @ svm.coef_[0] + svm.intercept_[0]
                hard = cand.numpy()[scores > -1.0]
                keep = active[(nx[active] @ svm.coef_[0] + svm.intercept_[0]) >= -1.2]
                new = np.union1d(keep, hard)
                if np.array_equal(np.sort(active), new):
                    break
                active = new
            hard_counts.append(len(active))
            weights[:, c] = torch.from_numpy(svm.coef_[0]).float() * scale
            bias[c] = float(svm.intercept_[0])
        self.svms[kind] = {"weight": weights, "bias": bias}
        self.log(f"svm_{kind}_negatives", float(np.mean(hard_counts)) if hard_counts else 0.0)

    # ------------------------------------------------------------------ box regression
    def _fit_bbox(self) -> None:
        """Ridge regression per class from pool5 (fine-tuned net) to the offsets of the matched object."""
        from sklearn.linear_model import Ridge

        xs, ts, cs = [], [], []
        for image, target in self._train_items():
            gt = target["boxes"].float()
            if len(gt) == 0:
                continue
            props = self.proposals("train", target["image_id"], image)
            best, arg = box_iou(props, gt).max(1)
            sel = best > self.bbox_iou
            if not sel.any():
                continue
            _, p5 = self.features("finetuned", image, props[sel])
            xs.append(p5)
            ts.append(encode(props[sel], gt[arg[sel]]))
            cs.append(target["labels"][arg[sel]])
        x, t, cls = torch.cat(xs), torch.cat(ts), torch.cat(cs)
        scale = self.feat_norm / float(x.norm(dim=1).mean().clamp_min(1e-8))
        weight = torch.zeros(self.num_classes, x.shape[1], 4)
        bias = torch.zeros(self.num_classes, 4)
        for c in range(self.num_classes):
            m = cls == c
            if int(m.sum()) < 2:
                continue
            ridge = Ridge(alpha=self.ridge_lambda).fit((x[m] * scale).numpy(), t[m].numpy())
            weight[c] = torch.from_numpy(ridge.coef_.T).float() * scale
            bias[c] = torch.from_numpy(ridge.intercept_).float()
        self.bbox = {"weight": weight, "bias": bias}
        self.log("bbox_samples", float(len(x)))

    # ------------------------------------------------------------------ detection and evaluation
    def detect(self, split: str, image: Tensor, target: dict) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Detections of one image for every fitted variant: variant -> (boxes, scores, labels) after NMS."""
        props = self.proposals(split, target["image_id"], image)
        out = {}
        cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        for kind, svm in self.svms.items():
            cache[kind] = self.features(kind, image, props)
            scores = cache[kind][0] @ svm["weight"] + svm["bias"]
            out[VARIANT[kind]] = self._nms_all(props.expand(self.num_classes, -1, -1), scores)
        if self.bbox and "finetuned" in self.svms:
            p5 = cache["finetuned"][1]
            t = torch.einsum("nd,kdf->knf", p5, self.bbox["weight"]) + self.bbox["bias"][:, None]
            boxes = torch.stack([decode(props, t[c]) for c in range(self.num_classes)])
            scores = cache["finetuned"][0] @ self.svms["finetuned"]["weight"] + self.svms["finetuned"]["bias"]
            out["d"] = self._nms_all(boxes, scores)
        return out

    def _nms_all(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """boxes [K, n, 4] (per class), scores [n, K] -> kept (boxes, scores, labels)."""
        kb, ks, kl = [], [], []
        for c in range(self.num_classes):
            keep = nms(boxes[c], scores[:, c], self.nms_iou)
            kb.append(boxes[c][keep])
            ks.append(scores[keep, c])
            kl.append(torch.full((len(keep),), c, dtype=torch.long))
        return torch.cat(kb), torch.cat(ks), torch.cat(kl)

    @torch.no_grad()
    def evaluate(self, loader: Any, split: str) -> dict[str, float]:
        dets: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
        gts, difficult, props = [], [], []
        for batch in loader:
            if not isinstance(batch[1], list):  # isolated digits: the pretraining task
                return self._digit_accuracy(loader)
            for image, target in zip(*batch):
                props.append(self.proposals(split, target["image_id"], image))
                gts.append((target["boxes"].float(), target["labels"]))
                difficult.append(target.get("difficult", torch.zeros(len(target["labels"]), dtype=torch.bool)))
                for v, d in self.detect(split, image, target).items():
                    dets.setdefault(v, []).append(d)
        metrics = {"recall": proposal_recall(props, [g[0] for g in gts]),
                   "proposals_per_image": sum(len(p) for p in props) / max(len(props), 1),
                   "images": float(len(gts))}
        per_class: dict[str, list[float]] = {}
        for v, per_image in sorted(dets.items()):
            for k, iou in enumerate(self.ap_ious):
                aps = []
                for c in range(self.num_classes):
                    scores, tp, n_pos = match_detections(
                        [b[lab == c] for b, _, lab in per_image], [s[lab == c] for _, s, lab in per_image],
                        [g[lab == c] for g, lab in gts], [d[lab == c] for d, (_, lab) in zip(difficult, gts)], iou)
                    aps.append(100 * average_precision(scores, tp, n_pos, self.voc07))
                name = "mAP" if k == 0 else f"mAP{round(100 * iou)}"
                metrics[f"{name}_{v}"] = float(np.nanmean(aps)) if not all(math.isnan(a) for a in aps) else float("nan")
                if k == 0:
                    per_class[v] = aps
                    metrics.update({f"AP_{v}/{c}": a for c, a in enumerate(aps) if not math.isnan(a)})
        self.last_eval = {"split": split, "per_class": per_class}
        return metrics

    def _digit_accuracy(self, loader: Any) -> dict[str, float]:
        correct = total = 0
        for x, y in loader:
            boxes = torch.cat([torch.arange(len(x), dtype=torch.float32)[:, None], self._ink_boxes(x)], 1)
            logits = self.pretrain_head(self.net(warp(x.float(), boxes, self.size, self.pad))[1])
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        return {"digit_acc": correct / max(total, 1)}

    # ------------------------------------------------------------------ figures and state
    def figures(self, out_dir: Path, data: Any) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = list(getattr(data, "class_names", None) or [str(c) for c in range(self.num_classes)])
        paths = []
        try:
            ds = data.dataset("test")
        except KeyError:
            return paths
        variant = "d" if self.bbox else (VARIANT[list(self.svms)[-1]] if self.svms else None)
        if variant is not None:
            n = min(6, len(ds))
            fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3), squeeze=False)
            with torch.no_grad():
                for ax, i in zip(axes[0], range(n)):
                    image, target = ds[i]
                    boxes, scores, labels = self.detect("test", image, target)[variant]
                    shown = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
                    ax.imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1)
                    for b in target["boxes"]:
                        ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                                   color="lime", lw=1))
                    top = nms(boxes, scores, self.nms_iou)[: max(len(target["boxes"]), 1) + 2]  # across classes
                    for j in top:
                        b = boxes[j]
                        ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                                   color="red", lw=1))
                        ax.text(float(b[0]), float(b[1]) - 1, f"{names[int(labels[j])]} {float(scores[j]):.1f}",
                                color="red", fontsize=7)
                    ax.axis("off")
            fig.suptitle(f"R-CNN ({variant}): top detections (red, digit and SVM score; objects + 2 per image) and "
                         "ground truth (green)")
            fig.tight_layout()
            paths.append(out_dir / "detections.png")
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
        per_class = self.last_eval.get("per_class") if self.last_eval.get("split") == "test" else None
        if per_class:
            fig, ax = plt.subplots(figsize=(max(6, 0.6 * self.num_classes * len(per_class) / 2), 3.5))
            width = 0.8 / len(per_class)
            for k, (v, aps) in enumerate(sorted(per_class.items())):
                ax.bar(np.arange(self.num_classes) + k * width, aps, width, label=f"{v}: mAP {np.nanmean(aps):.1f}")
            ax.set_xticks(np.arange(self.num_classes) + 0.4 - width / 2, names, rotation=90 if len(names) > 10 else 0)
            ax.set_ylabel("test AP (%)")
            ax.set_title("per-class AP (IoU 0.5): a pixels+SVM, hog HOG+SVM, b pretrained+SVM, c fine-tuned+SVM, "
                         "d c+box regression", fontsize=8)
            ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(out_dir / "per_class_ap.png")
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
        return paths

    def extra_state(self) -> dict[str, Any]:
        return {"svms": self.svms, "bbox": self.bbox}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.svms = dict(state.get("svms", {}))
        self.bbox = dict(state.get("bbox", {}))


def _stack(images: list[Tensor]) -> Tensor:
    """Images of one batch in one tensor, zero-padded at the bottom right to the largest size."""
    h = max(i.shape[-2] for i in images)
    w = max(i.shape[-1] for i in images)
    out = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for k, im in enumerate(images):
        out[k, :, : im.shape[-2], : im.shape[-1]] = im
    return out.float()


# ---------------------------------------------------------------------------------------------- study


def summarize(study: dict) -> dict[str, float]:
    """Over the runs given (one seed's, or all): the median of each variant's test mAP at every IoU, the paper's
    gains (fine-tuning c - b, box regression d - c at IoU 0.5 and 0.7, d - a, CNN over HOG b - hog), and the
    median stage wall times."""
    import json
    import statistics

    runs = [r for r in study.get("runs", []) if r.get("status") == "completed"]
    out: dict[str, float] = {}

    def med(label: str, key: str) -> float | None:
        vals = [float(r["metrics"][key]) for r in runs if r["label"] == label and key in r["metrics"]]
        vals = [v for v in vals if not math.isnan(v)]
        return statistics.median(vals) if vals else None

    def gain(label: str, hi: str, lo: str) -> float | None:
        diffs = [float(r["metrics"][hi]) - float(r["metrics"][lo]) for r in runs
                 if r["label"] == label and hi in r["metrics"] and lo in r["metrics"]]
        return statistics.median(diffs) if diffs else None

    for label in sorted({r["label"] for r in runs}):
        for prefix in ("mAP", "mAP70"):
            for v in VARIANTS:
                value = med(label, f"test/{prefix}_{v}")
                if value is not None:
                    out[f"{label}/{prefix}_{v}"] = value
        for name, hi, lo in (("finetune_gain", "mAP_c", "mAP_b"), ("bbox_gain", "mAP_d", "mAP_c"),
                             ("bbox_gain70", "mAP70_d", "mAP70_c"), ("d_minus_a", "mAP_d", "mAP_a"),
                             ("cnn_minus_hog", "mAP_b", "mAP_hog"), ("hog_minus_pixels", "mAP_hog", "mAP_a")):
            value = gain(label, f"test/{hi}", f"test/{lo}")
            if value is not None:
                out[f"{label}/{name}"] = value
    stage_times: dict[str, list[float]] = {}
    for run in runs:
        path = Path(run["dir"]) / "metrics.jsonl"
        if not path.exists():
            continue
        last: dict[str, float] = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "stage" in rec and "time" in rec:
                last[rec["stage"]] = rec["time"]
        prev = 0.0
        for stage, t in last.items():
            stage_times.setdefault(stage, []).append(t - prev)
            prev = t
    out.update({f"stage_s/{k}": statistics.median(v) for k, v in stage_times.items()})
    return out


def study_figure(study: dict, out_dir: Path) -> list[Path]:
    """Test mAP of every variant at IoU 0.5 and 0.7: each seed a dot, the median over seeds a bar; the title
    gives the test size, the seeds and the proposal recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in study.get("runs", []) if r["status"] == "completed"]
    variants = [v for v in VARIANTS if any(f"test/mAP_{v}" in r["metrics"] for r in runs)]
    names = {"a": "a: pixels\n+SVM", "hog": "HOG\n+SVM", "b": "b: pretrained\nCNN+SVM",
             "c": "c: fine-tuned\nCNN+SVM", "d": "d: c + box\nregression"}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.38
    for j, (prefix, iou, color) in enumerate((("mAP", "0.5", "C0"), ("mAP70", "0.7", "C1"))):
        for k, v in enumerate(variants):
            vals = [float(r["metrics"][f"test/{prefix}_{v}"]) for r in runs if f"test/{prefix}_{v}" in r["metrics"]]
            if not vals:
                continue
            x = k + (j - 0.5) * width
            ax.bar(x, np.median(vals), width, color=color, alpha=0.6, label=f"IoU {iou}" if k == 0 else None)
            ax.scatter([x] * len(vals), vals, color="k", s=10, zorder=3)
            ax.text(x, max(vals) + 1, f"{np.median(vals):.1f}", ha="center", fontsize=7)
    recall = [float(r["metrics"]["test/recall"]) for r in runs if "test/recall" in r["metrics"]]
    images = [int(r["metrics"]["test/images"]) for r in runs if "test/images" in r["metrics"]]
    ax.set_xticks(range(len(variants)), [names[v] for v in variants], fontsize=8)
    ax.set_ylabel("test mAP (%, VOC07 11-point)")
    ax.legend(fontsize=8, loc="upper left")
    seeds = sorted({r.get("seed") for r in runs}, key=str)
    title = f"R-CNN on digit scenes: {images[0] if images else '?'} test scenes, {len(seeds)} seeds"
    title += " (bars: median, dots: seeds)"
    if recall:
        title += f"\nproposal recall@0.5 {np.median(recall):.3f} (median)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = out_dir / "rcnn_map.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
