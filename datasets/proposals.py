"""Region proposals and box operations shared by data and models (R-CNN's selective search, the scenes' IoU).

Both `mlrun.datasets` (scene composition, proposal caches) and `mlrun.models` (R-CNN, Bottom-Up Top-Down) import
from here, so that data never reaches into a model module for them.
"""

from __future__ import annotations

import numpy as np


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [n, 4] with every box in b [m, 4] (x2/y2 exclusive, so area = w * h)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def selective_search(image: np.ndarray, upscale: float = 1.0, k: int = 100, sigma: float = 0.8,
                     max_boxes: int = 2000, min_side: float = 2.0) -> np.ndarray:
    """Selective search in fast mode (opencv-contrib), as float32 [n, 4] (x1, y1, x2, y2) in image pixels.

    image: [H, W] or [H, W, 3], float in [0, 1] or uint8. `upscale` runs the search on an enlarged image, which
    on small canvases finds the small objects that the graph segmentation's minimum region size would merge.
    """
    import cv2
    import torch

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if upscale != 1.0:
        img = cv2.resize(img, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_LINEAR)
    cv2.setNumThreads(max(torch.get_num_threads(), 1))
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img))
    ss.switchToSelectiveSearchFast(int(k), int(k), float(sigma))
    rects = ss.process().astype(np.float32)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / upscale
    boxes = boxes[((boxes[:, 2:] - boxes[:, :2]) >= min_side).all(1)]
    _, first = np.unique(boxes.round(1), axis=0, return_index=True)
    return boxes[np.sort(first)][:max_boxes].astype(np.float32)
