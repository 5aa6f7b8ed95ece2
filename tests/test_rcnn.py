"""R-CNN pieces against hand-computed values: IoU, NMS, VOC AP and matching, the warp with context padding, box
regression targets, proposals' recall, the SVM and fine-tuning stages; a full miniature run is marked slow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlrun.models import rcnn


def test_box_iou_and_nms_on_hand_boxes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5]])
    iou = rcnn.box_iou(boxes, boxes)
    assert float(iou[0, 1]) == pytest.approx(90 / 110)  # 9x10 shared of 10x10 + 10x10
    assert float(iou[0, 3]) == pytest.approx(50 / 100)
    assert float(iou[0, 2]) == 0.0
    scores = torch.tensor([0.9, 0.95, 0.5, 0.8])
    # 1 beats 0 (IoU 0.82 > 0.3); 3 overlaps 1 by 45/105 = 0.43 > 0.3: dropped; 2 is alone
    assert rcnn.nms(boxes, scores, 0.3).tolist() == [1, 2]
    assert rcnn.nms(boxes, scores, 0.5).tolist() == [1, 3, 2]


def test_average_precision_on_a_hand_ranking():
    # ranking TP FP TP FP TP against 4 objects: (recall, precision) = (.25, 1) (.25, .5) (.5, .67) (.5, .5) (.75, .6)
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.8])  # given out of order: the function sorts
    tp = np.array([1, 1, 0, 1, 0])  # sorted: 0.9 TP, 0.8 FP, 0.7 TP, 0.5 FP, 0.1 TP
    # 11-point: recall >= 0, .1, .2 -> 1; .3, .4, .5 -> 2/3; .6, .7 -> .6; .8, .9, 1 -> 0
    assert rcnn.average_precision(scores, tp, 4, use_07=True) == pytest.approx((3 + 2 + 1.2) / 11)
    # area under the envelope: .25 * 1 + .25 * 2/3 + .25 * .6
    assert rcnn.average_precision(scores, tp, 4, use_07=False) == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.15)
    assert rcnn.average_precision(np.array([1.0]), np.array([1]), 1) == pytest.approx(1.0)
    assert np.isnan(rcnn.average_precision(np.zeros(0), np.zeros(0), 0))


def test_match_detections_duplicates_and_difficult():
    gt = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 10, 10]])]
    difficult = [torch.tensor([False, True]), torch.tensor([False])]
    dets = [torch.tensor([[0.0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
            torch.tensor([[0.0, 0, 10, 9]])]
    scores = [torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.85])]
    s, tp, n_pos = rcnn.match_detections(dets, scores, gt, difficult, iou=0.5)
    assert n_pos == 2  # the difficult object is not counted
    # 0.9 TP; 0.85 TP (other image, IoU .9); 0.8 duplicate FP; 0.7 on the difficult object: ignored; 0.6 FP
    order = np.argsort(-s)
    assert s[order].tolist() == pytest.approx([0.9, 0.85, 0.8, 0.6])
    assert tp[order].tolist() == [1, 1, 0, 0]


def test_context_boxes_and_warp_on_a_ramp():
    box = torch.tensor([[10.0, 20.0, 30.0, 30.0]])
    # size 24, pad 2: the box fills the inner 20 px, so it grows by 24/20 about its centre (20, 25)
    torch.testing.assert_close(rcnn.context_boxes(box, 24, 2), torch.tensor([[8.0, 19.0, 32.0, 31.0]]))
    h, w = 40, 50
    ramp = torch.arange(w, dtype=torch.float32).expand(h, w)[None, None].clone()  # value = x index
    out = rcnn.warp(ramp, [box], size=24, pad=2)
    assert out.shape == (1, 1, 24, 24)
    # column j samples x = 8 + (j + 0.5) * 24 / 24 in box coordinates, i.e. pixel index 8 + j (centres at +0.5)
    expected = 8.0 + torch.arange(24, dtype=torch.float32)
    torch.testing.assert_close(out[0, 0, 5], expected, atol=1e-4, rtol=0)
    # without padding, the box [10, 30) maps to 24 columns of width 20/24
    out0 = rcnn.warp(ramp, [box], size=24, pad=0)
    torch.testing.assert_close(out0[0, 0, 0], 10 + (torch.arange(24) + 0.5) * 20 / 24 - 0.5, atol=1e-4, rtol=0)


def test_encode_decode_inverse_and_hand_targets():
    p = torch.tensor([[0.0, 0, 10, 20], [5, 5, 15, 10]])
    g = torch.tensor([[2.0, 0, 12, 40], [5, 5, 15, 10]])
    t = rcnn.encode(p, g)
    torch.testing.assert_close(t[0], torch.tensor([0.2, 0.5, 0.0, float(np.log(2))]))
    torch.testing.assert_close(t[1], torch.zeros(4))
    torch.testing.assert_close(rcnn.decode(p, t), g)


def test_selective_search_recall_on_scenes():
    from mlrun.datasets.scenes import make_scenes

    scenes = make_scenes("val", 4, seed=0)
    props = [torch.from_numpy(rcnn.selective_search(s.image, upscale=1.5, k=100)) for s in scenes]
    for p in props:
        assert p.shape[1] == 4 and (p[:, 2:] > p[:, :2]).all() and (p >= 0).all() and (p <= 64).all()
    assert rcnn.proposal_recall(props, [torch.from_numpy(s.boxes) for s in scenes]) >= 0.8
    assert rcnn.proposal_recall([torch.zeros(0, 4)], [torch.tensor([[0.0, 0, 5, 5]])]) == 0.0


def test_hog_features_are_scikit_images_and_see_edge_orientation():
    from skimage.feature import hog

    g = torch.Generator().manual_seed(0)
    windows = torch.rand(3, 1, 24, 24, generator=g)
    feats = rcnn.hog_features(windows)
    assert feats.shape == (3, 3 * 3 * 2 * 2 * 9)  # 4 x 4 cells of 6 px, 3 x 3 blocks of 2 x 2 cells, 9 bins
    want = hog(windows[1, 0].double().numpy(), orientations=9, pixels_per_cell=(6, 6), cells_per_block=(2, 2),
               block_norm="L2-Hys")
    np.testing.assert_allclose(feats[1].numpy(), want, atol=1e-6)
    # a vertical edge (dark left, bright right): the energy is in the horizontal-gradient bin (0 degrees)
    edge = torch.zeros(1, 1, 24, 24)
    edge[..., 12:] = 1.0
    bins = rcnn.hog_features(edge).view(-1, 9).sum(0)
    assert int(bins.argmax()) == 0 and float(bins[0]) > 0.9 * float(bins.sum())
    assert rcnn.hog_features(torch.zeros(0, 1, 24, 24)).shape == (0, 324)
    assert rcnn.hog_features(torch.rand(2, 3, 24, 24, generator=g)).shape == (2, 324)  # colour: one histogram


def test_map_at_iou_0_7_drops_loose_boxes():
    """A detection overlapping its object by IoU 0.6 is a hit at VOC's 0.5 and a miss at 0.7; a tight one is a hit
    at both."""
    task = _task(num_classes=2, ap_ious=(0.5, 0.7))
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1]),
          "image_id": 0}
    # class 0: box [0, 0, 10, 6] has IoU 0.6 with its object; class 1: exact box
    dets = (torch.tensor([[0.0, 0, 10, 6], [20, 20, 30, 30]]), torch.tensor([0.9, 0.8]), torch.tensor([0, 1]))
    task.proposals = lambda split, image_id, image: torch.zeros(0, 4)
    task.detect = lambda split, image, target: {"d": dets}
    metrics = task.evaluate([([torch.zeros(1, 32, 32)], [gt])], "test")
    assert metrics["AP_d/0"] == pytest.approx(100.0) and metrics["AP_d/1"] == pytest.approx(100.0)
    assert metrics["mAP_d"] == pytest.approx(100.0)
    assert metrics["mAP70_d"] == pytest.approx(50.0)  # class 0 missed at 0.7
    assert metrics["images"] == 1


def test_ink_boxes_of_isolated_digits():
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 2:6, 1:4] = 1.0
    boxes = rcnn.RCNN._ink_boxes(x)
    torch.testing.assert_close(boxes, torch.tensor([[1.0, 2, 4, 6], [0, 0, 8, 8]]))  # empty -> whole image


def _task(**kw):
    net = rcnn.DigitNet(size=16, channels=(4, 8, 8), hidden=16)
    opt = {"pretrain": lambda p: torch.optim.SGD(p, lr=0.1), "finetune": lambda p: torch.optim.SGD(p, lr=0.01)}
    return rcnn.RCNN(net, opt, pixel_size=8, proposals={"upscale": 1.5, "k": 100}, batch_windows=16,
                     hard_init=100, **kw)


def test_networks_give_pool5_and_fc7(tmp_path):
    from mlrun.errors import DataError

    p5, f7 = rcnn.DigitNet(size=24)(torch.zeros(3, 1, 24, 24))
    assert p5.shape == (3, 64 * 9) and f7.shape == (3, 256)
    alex = rcnn.TorchvisionNet("alexnet", None, size=64)
    p5, f7 = alex(torch.rand(2, 1, 64, 64))  # grey windows are repeated to RGB
    assert p5.shape == (2, alex.pool5_dim) == (2, 9216) and f7.shape == (2, 4096)
    with pytest.raises(DataError, match="alexnet-owt-7be5be79.pth"):
        rcnn.TorchvisionNet("alexnet", str(tmp_path / "missing.pth"))


def test_finetune_batch_holds_a_quarter_positives_and_trains():
    from mlrun.datasets.scenes import DigitScenes

    torch.manual_seed(0)
    data = DigitScenes(n_train=4, n_val=0, n_test=0)
    task = _task()
    task.on_stage_start("finetune", data)
    opt = task.configure_optimizers()["model"]
    images, targets = data.collate([data.dataset("train")[i] for i in range(4)])
    (name, loss), = list(task.training_step((images, targets)))
    assert name == "model"
    assert float(task._step_logs["fg_windows"]) == 4  # 25% of 16
    loss.backward()
    assert task.net.conv[0].weight.grad is not None and task.pretrain_head.weight.grad is None
    opt.step()


def test_svm_and_bbox_stages_fit_and_detect():
    """Pixel SVMs on a few scenes separate their own training windows; the state round-trips."""
    from mlrun.datasets.scenes import DigitScenes

    torch.manual_seed(0)
    data = DigitScenes(n_train=12, n_val=0, n_test=3, scene_kw={"clutter": 0.0})
    task = _task(svm_C=1.0)  # the paper's C = 0.001 is for thousands of windows; 12 scenes need a weaker penalty
    for stage in ("proposals", "svm_pixels", "svm_hog", "svm_finetuned", "bbox"):
        task.on_stage_start(stage, data)
        assert task.configure_optimizers() == {}
        assert list(task.training_step(None)) == []
    assert set(task.svms) == {"pixels", "hog", "finetuned"} and task.bbox["weight"].shape == (10, task.net.pool5_dim, 4)
    image, target = data.dataset("train")[0]
    gt_feats, _ = task.features("pixels", image, target["boxes"])
    scores = gt_feats @ task.svms["pixels"]["weight"] + task.svms["pixels"]["bias"]
    own = scores[torch.arange(len(target["labels"])), target["labels"]]
    assert (own > 0).float().mean() >= 0.5  # training positives mostly on the right side
    dets = task.detect("train", image, target)
    assert set(dets) == {"a", "hog", "c", "d"}
    other = _task()
    other.load_extra_state(task.extra_state())
    torch.testing.assert_close(other.svms["pixels"]["weight"], task.svms["pixels"]["weight"])
    loader = torch.utils.data.DataLoader(data.dataset("test"), batch_size=2, collate_fn=data.collate)
    metrics = task.evaluate(loader, "test")
    assert {"recall", "mAP_a", "mAP_hog", "mAP_c", "mAP_d", "mAP70_a", "mAP70_d"} <= set(metrics)
    assert 0 <= metrics["mAP_a"] <= 100
    for v in ("a", "hog", "c", "d"):  # a hit at IoU 0.7 is a hit at 0.5: AP can only fall
        assert metrics[f"mAP70_{v}"] <= metrics[f"mAP_{v}"] + 1e-9


@pytest.mark.slow
def test_full_miniature_seed0_orders_the_variants(tmp_path, monkeypatch):
    """The whole rcnn_digits run on seed 0 (about 2 CPU minutes): a < b < c < d and recall >= 0.9."""
    from mlrun import run

    monkeypatch.chdir(tmp_path)
    res = run("rcnn_digits", ["logger=none", "trainer.progress=none", "hardware.threads=1"], run_dir=tmp_path / "r")
    m = res["metrics"]
    assert m["test/recall"] >= 0.9
    assert m["test/mAP_a"] < m["test/mAP_b"] < m["test/mAP_c"] < m["test/mAP_d"]
