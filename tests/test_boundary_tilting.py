"""Boundary tilting (Tanay & Griffin 2016): the paper's quantities against hand-computed cases, the exact SVM
against its objective, the minimal-perturbation attack against the analytic distance, the data
(flipped training labels, flat pixels), the tilting construction, the task's evaluation, and the study summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mlrun.models.boundary_tilting import (
    BoundaryTilting,
    TiltingData,
    adversarial_distance,
    boundary_distance,
    centroid_direction,
    degenerate,
    deviation_angle,
    fit_linear_svm,
    mean_adversarial_distance,
    minimal_l2_perturbation,
    mirror,
    nearest_centroid,
    study_figure,
    summarize,
    tilt,
    zero_variance_direction,
)
from mlrun.task import DataModule

T = torch.tensor


def test_deviation_angle_hand_cases():
    assert deviation_angle(T([1.0, 0.0]), T([1.0, 1.0])) == pytest.approx(45.0)
    assert deviation_angle(T([2.0, 2.0]), T([1.0, 1.0])) == pytest.approx(0.0, abs=1e-3)
    assert deviation_angle(T([0.0, 3.0]), T([1.0, 0.0])) == pytest.approx(90.0)
    assert deviation_angle(T([1.0, math.sqrt(3.0)]), T([1.0, 0.0])) == pytest.approx(60.0, abs=1e-4)


def test_boundary_distance_hand_case():
    # w·x + b = 2*4 - 2 = 6, ||w|| = 2
    assert boundary_distance(T([[3.0, 4.0], [0.0, 1.0]]), T([0.0, 2.0]), -2.0).tolist() == pytest.approx([3.0, 0.0])


def test_mean_adversarial_distance_hand_case_and_identity():
    assert mean_adversarial_distance(T([2.0, 0.0]), 60.0) == pytest.approx(0.5)
    # d_adv = ½||Δ|| cos θ is half the gap between the classes' mean signed distances, for any boundary
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = (torch.arange(200) % 2).long()
    x[y == 1] += 1.5
    w, b = torch.randn(5, generator=g, dtype=torch.float64), 0.3
    delta, _ = centroid_direction(x, y)
    signed = (x @ w + b) / w.norm()
    gap = 0.5 * (signed[y == 1].mean() - signed[y == 0].mean())
    assert mean_adversarial_distance(delta, deviation_angle(w, delta)) == pytest.approx(float(gap), rel=1e-9)


def test_mirror_hand_case_same_distance_other_side():
    w, b = T([1.0, 0.0]), -1.0  # the boundary x0 = 1
    assert mirror(T([[3.0, 5.0]]), w, b).tolist() == [[-1.0, 5.0]]
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(7, generator=g,
                                                                                 dtype=torch.float64), 0.4
    m = mirror(x, w, b)
    torch.testing.assert_close(boundary_distance(m, w, b), boundary_distance(x, w, b))
    assert torch.all(torch.sign(m @ w + b) == -torch.sign(x @ w + b))
    torch.testing.assert_close(mirror(m, w, b), x)


def test_nearest_centroid_is_the_zero_angle_classifier():
    x = T([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    y = T([0, 0, 1, 1])
    w, b = nearest_centroid(x, y)
    assert w.tolist() == [4.0, 0.0] and float(b) == -8.0  # boundary x0 = 2, midway between the means
    assert deviation_angle(w, centroid_direction(x, y)[0]) == pytest.approx(0.0, abs=1e-3)


def test_svm_matches_the_hand_solved_objective():
    # two points at ±1: minimise (1/2)·2·max(0, 1 - a) + λa²: a = 1/(2λ) for λ >= 1/2, else a = 1
    x, y = T([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64), T([0, 1])
    for lam, a in ((0.25, 1.0), (0.5, 1.0), (2.0, 0.25)):
        w, b = fit_linear_svm(x, y, lam)
        assert w.tolist() == pytest.approx([a, 0.0], abs=1e-5) and float(b) == pytest.approx(0.0, abs=1e-5)
    # on inputs scaled by 2 the λ = 2 problem: max(0, 1 - 2v) + 2v², v = 1/2 in scaled units, w = 2v = 1
    w, _ = fit_linear_svm(x, y, 2.0, input_scale=2.0)
    assert w.tolist() == pytest.approx([1.0, 0.0], abs=1e-5)


def test_svm_is_the_objective_minimum_and_tends_to_nearest_centroid():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = (torch.arange(60) % 2).long()
    x[y == 1] += T([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    lam = 0.05

    def objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (1 - (2 * y - 1) * (x @ w + b)).clamp_min(0).mean() + lam * w @ w

    w, b = fit_linear_svm(x, y, lam)
    best = objective(w, b)
    for _ in range(200):
        dw, db = 1e-2 * torch.randn(4, generator=g, dtype=torch.float64), 1e-2 * torch.randn((), generator=g)
        assert objective(w + dw, b + db) >= best - 1e-7
    # very strong regularisation: w -> Σ y_i x_i / (2nλ) ∝ Δ for balanced classes, θ -> 0
    w_strong, _ = fit_linear_svm(x, y, 1e4)
    assert deviation_angle(w_strong, centroid_direction(x, y)[0]) < 0.5


def test_attack_recovers_the_linear_distance_and_a_circle():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    w, b = torch.randn(6, generator=g, dtype=torch.float64), 0.2
    y = ((x @ w + b) > 0).long()
    eps = minimal_l2_perturbation(lambda z: z @ w + b, x, y, eps_max=10.0, search_steps=14, pgd_steps=5)
    dist = boundary_distance(x, w, b)
    assert torch.all((eps - dist).abs() <= 10.0 / 2**14 + 1e-9)
    assert torch.all(eps >= dist - 1e-9)  # never below the true minimum
    far = minimal_l2_perturbation(lambda z: z @ w + b, x, y, eps_max=1e-3, search_steps=4, pgd_steps=5)
    assert torch.isinf(far[dist > 1e-3]).all()
    # non-linear: class 1 outside the unit circle; a point at radius 2 is 1 away from it
    pts = T([[2.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    eps = minimal_l2_perturbation(lambda z: (z**2).sum(1) - 1, pts, T([1, 1]), 4.0, 12, 30)
    assert eps.tolist() == pytest.approx([1.0, 1.0], abs=2e-3)


class _Tiny(DataModule):
    batch_size, eval_batch_size = 8, 64

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(4)
        self.splits = {}
        for i, split in enumerate(("train", "val", "test")):
            x = torch.rand(40 + i, 9, generator=g)
            y = (torch.arange(40 + i) % 2).long()
            x[y == 1, :3] += 0.8
            self.splits[split] = TensorDataset(x, y)

    def dataset(self, split, stage=None):
        return self.splits[split]


def test_flat_pixels_append_fixed_tiny_noise():
    base = _Tiny()
    data = TiltingData(base, flat_pixels=5, std=0.01, value=0.2, seed=0)
    x, y = data.dataset("train").tensors
    assert x.shape == (40, 14)
    torch.testing.assert_close(x[:, :9], base.dataset("train").tensors[0])
    assert float(x[:, 9:].mean()) == pytest.approx(0.2, abs=0.005)
    assert float(x[:, 9:].std()) == pytest.approx(0.01, rel=0.2)
    again = TiltingData(base, flat_pixels=5, std=0.01, value=0.2, seed=0).dataset("train").tensors[0]
    other = TiltingData(base, flat_pixels=5, std=0.01, value=0.2, seed=1).dataset("train").tensors[0]
    torch.testing.assert_close(again, x)
    assert not torch.equal(other[:, 9:], x[:, 9:])
    assert not torch.equal(data.dataset("test").tensors[0][:40, 9:], x[:, 9:])
    assert torch.equal(TiltingData(base).dataset("val").tensors[0], base.dataset("val").tensors[0])


def test_label_noise_flips_a_seeded_fraction_of_training_labels_only():
    base = _Tiny()
    clean = base.dataset("train").tensors[1]
    data = TiltingData(base, label_noise=0.1, seed=3)
    noisy = data.dataset("train").tensors[1]
    assert int((noisy != clean).sum()) == 4 and data.describe()["flipped_train_labels"] == 4  # 10% of 40
    assert torch.equal(TiltingData(base, label_noise=0.1, seed=3).dataset("train").tensors[1], noisy)
    assert not torch.equal(TiltingData(base, label_noise=0.1, seed=4).dataset("train").tensors[1], noisy)
    for split in ("val", "test"):
        assert torch.equal(data.dataset(split).tensors[1], base.dataset(split).tensors[1])
    with pytest.raises(ValueError, match="label_noise"):
        TiltingData(base, label_noise=0.5)


def test_adversarial_distance_is_the_mean_signed_distance():
    x = T([[0.0, 0.0], [3.0, 0.0], [1.0, 5.0], [4.0, 1.0]])
    y = T([0, 0, 1, 1])
    w, b = T([2.0, 0.0]), -4.0  # the boundary x0 = 2; signed distances y·d: 2, -1, -1, 2
    assert adversarial_distance(x, y, w, b) == pytest.approx(0.5)
    # balanced classes: ½||Δ|| cos θ, whatever the bias
    delta, _ = centroid_direction(x, y)
    assert adversarial_distance(x, y, w, 7.0) == pytest.approx(0.5 * float(delta.norm())
                                                               * math.cos(math.radians(deviation_angle(w, delta))))


def test_tilting_along_a_zero_variance_direction_keeps_every_score():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    x[:, 1], x[:, 3] = 0.0, 0.7  # two constant coordinates
    e = zero_variance_direction(x)
    assert e.tolist() == pytest.approx([0.0, 2**-0.5, 0.0, 2**-0.5, 0.0])
    assert zero_variance_direction(torch.randn(4, 3, generator=g)) is None
    y = (torch.arange(30) % 2).long()
    x[y == 1, 0] += 2.0
    w, b = fit_linear_svm(x, y, 0.1)
    delta, _ = centroid_direction(x, y)
    tw, tb = tilt(w, b, e, 10 * float(w.norm()), x[0])
    torch.testing.assert_close(x @ tw + tb, x @ w + b)  # every training score, hence every prediction, unchanged
    assert deviation_angle(tw, delta) >= math.degrees(math.atan(10)) - 1e-6  # w·e = 0: tan θ >= 10


def _task(lam: float, extra: int = 0, hidden: int = 4) -> BoundaryTilting:
    torch.manual_seed(0)
    return BoundaryTilting(in_features=9, extra_features=extra, lam=lam, hidden=hidden,
                           optimizer=lambda p: torch.optim.Adam(p, lr=0.01), attack_search_steps=6,
                           attack_pgd_steps=4, mirror_examples=4)


def test_task_evaluation_matches_the_definitions(tmp_path):
    from sklearn.svm import SVC

    data = _Tiny()
    task = _task(lam=0.5)
    task.on_stage_start("svm", data)
    assert list(task.training_step(None)) == []  # the no-gradient stage yields nothing
    xtr, ytr = data.dataset("train").tensors
    svm = SVC(kernel="linear", C=1 / (2 * 40 * 0.5), tol=1e-6).fit(xtr.double().numpy(), ytr.numpy())
    xte, yte = data.dataset("test").tensors
    m = task.evaluate(DataLoader(data.dataset("test"), batch_size=16), "test")
    assert m["err"] == pytest.approx(float((svm.predict(xte.double().numpy()) != yte.numpy()).mean()))
    w = torch.tensor(svm.coef_[0]).float()
    delta = xtr[ytr == 1].mean(0) - xtr[ytr == 0].mean(0)
    assert m["theta"] == pytest.approx(deviation_angle(w, delta), abs=1e-2)
    # d_adv on the (balanced) training set: ½||Δ|| cos θ
    assert m["d_adv"] == pytest.approx(0.5 * float(delta.norm()) * math.cos(math.radians(m["theta"])), rel=1e-4)
    ok = torch.from_numpy(svm.predict(xte.double().numpy()) == yte.numpy())
    dist = (xte[ok] @ w + float(svm.intercept_[0])).abs() / w.norm()
    assert m["dist_norm"] == pytest.approx(float(dist.median() / delta.norm()), rel=1e-4)
    assert "mlp_err" not in m  # the MLP is reported once it has trained
    assert "tilt_theta" not in m  # no pixel of _Tiny is constant: no construction
    paths = task.figures(tmp_path, data)
    assert paths[0].exists() and (tmp_path / "mirrors.npz").exists()


def test_task_reports_the_tilting_construction():
    data = _Tiny()
    for split in ("train", "test"):
        data.splits[split].tensors[0][:, 4] = 0.0  # a blank pixel, as the digits' corners
    task = _task(lam=0.5)
    task.on_stage_start("svm", data)
    list(task.training_step(None))
    m = task.evaluate(DataLoader(data.dataset("test"), batch_size=16), "test")
    assert m["tilt_theta"] >= math.degrees(math.atan(10)) and m["tilt_err_change"] == 0.0


def test_mlp_step_is_the_svm_objective_on_the_mlp():
    data = _Tiny()
    task = _task(lam=0.3, hidden=3)
    task.on_stage_start("mlp", data)
    assert set(task.configure_optimizers()) == {"mlp"}
    x, y = data.dataset("train").tensors
    ((name, loss),) = list(task.training_step((x[:10], y[:10])))
    f = task.mlp(x[:10]).squeeze(-1)
    hinge = (1 - (2 * y[:10] - 1) * f).clamp_min(0).mean()
    l2 = task.mlp[0].weight.pow(2).sum() + task.mlp[2].weight.pow(2).sum()
    assert name == "mlp" and float(loss.detach()) == pytest.approx(float((hinge + 0.3 * l2).detach()), rel=1e-5)


def _study(rows: list[tuple[float, int, dict]]) -> dict:
    runs = []
    for lam, flat, m in rows:
        metrics = {"test/lam": lam, "test/flat_pixels": flat, "test/centroid_train_err": 0.02, "test/train_err": 0.0,
                   "test/delta_norm": 2.0, **{f"test/{k}": v for k, v in m.items()}}
        runs.append({"dir": "/nonexistent", "label": f"{lam}_{flat}", "seed": 0, "status": "completed",
                     "metrics": metrics})
    return {"runs": runs}


def test_summarize_hand_computed():
    rows = [  # λ: θ, median distance, error; λ = 1e4 is degenerate (training error 0.5)
        (1e-2, 0, {"theta": 70.0, "dist_norm": 0.1, "err": 0.02, "d_adv": 0.34}),
        (1e0, 0, {"theta": 50.0, "dist_norm": 0.2, "err": 0.01, "d_adv": 0.64}),
        (1e2, 0, {"theta": 20.0, "dist_norm": 0.4, "err": 0.03, "d_adv": 0.94, "tilt_theta": 85.0,
                  "tilt_err_change": 0.0}),
        (1e4, 0, {"theta": 1.0, "dist_norm": 5.0, "err": 0.5, "d_adv": 1.0, "train_err": 0.5}),
        (1e-2, 8, {"theta": 85.0, "dist_norm": 0.01, "err": 0.025, "d_adv": 0.08}),
    ]
    for (_, _, m), (d, u) in zip(rows[:4], ((0.1, 0.0), (0.3, 0.0), (0.5, 0.0), (2.0, 1.0))):
        m.update(mlp_dist_norm=d, mlp_unflipped=u, mlp_err=0.02)
    rows[2][2]["mlp_unflipped"] = 0.6  # the MLP has collapsed at λ = 1e2: its summary stops at λ = 1
    s = summarize(_study(rows))
    assert s["mlp_lam_strong"] == 1e0 and s["mlp_dist_ratio"] == pytest.approx(3.0)
    assert s["n_degenerate"] == 1 and s["lam_degenerate_min"] == 1e4
    assert s["spearman_rho"] == pytest.approx(1.0)
    assert (s["theta_strong"], s["theta_weak"]) == (20.0, 70.0)
    assert s["dist_ratio"] == pytest.approx(4.0) and s["err_range"] == pytest.approx(0.02)
    assert s["d_adv_ratio"] == pytest.approx(0.94 / 0.34)
    assert (s["theta_tilt_strong"], s["err_change_tilt_strong"]) == (85.0, 0.0)
    assert s["theta_weak_flat"] == 85.0 and s["err_gap_flat"] == pytest.approx(0.005)
    rows[1][2]["theta"] = 80.0  # one inversion among three: ρ = 1 - 6·2/(3·8) = 0.5
    assert summarize(_study(rows))["spearman_rho"] == pytest.approx(0.5)
    rows[1][2]["theta"] = 69.96  # unrounded θ: 0.04° below the weakest λ still ranks (rounded, it would tie)
    assert summarize(_study(rows))["spearman_rho"] == pytest.approx(1.0)
    assert degenerate({"train_err": 0.13, "centroid_train_err": 0.02}, 0.1)
    assert not degenerate({"train_err": 0.11, "centroid_train_err": 0.02}, 0.1)


def test_study_figure_draws_curves(tmp_path):
    rows = [(lam, 0, {"theta": t, "dist_norm": d, "err": 0.02, "d_adv": 0.5, "mlp_dist_norm": d, "mlp_err": 0.03,
                      "centroid_err": 0.04}) for lam, t, d in ((1e-2, 60.0, 0.1), (1.0, 20.0, 0.4))]
    paths = study_figure(_study(rows), tmp_path)
    assert [p.name for p in paths] == ["tilting_vs_lambda.png"] and paths[0].stat().st_size > 0


@pytest.mark.slow
def test_digits_weak_regularisation_tilts_more(tmp_path, monkeypatch):
    """Two λ of the miniature (seed 0, 3% flipped labels) through the shared trainer: weaker λ, larger θ,
    smaller distances, the same test error; the construction tilts the strong SVM without changing it."""
    from mlrun import run

    monkeypatch.chdir(tmp_path)
    out = {}
    for lam in (1e2, 1e4):
        res = run("boundary_tilting_digits", ["logger=none", f"model.lam={lam}", "trainer.progress=none",
                                              "trainer.max_steps=100"], run_dir=tmp_path / str(lam))
        out[lam] = res["metrics"]
    assert out[1e2]["test/theta"] > out[1e4]["test/theta"] + 30
    assert out[1e2]["test/dist_norm"] < out[1e4]["test/dist_norm"] / 2
    assert out[1e2]["test/err"] <= 0.05 and out[1e4]["test/err"] <= 0.05
    assert out[1e4]["test/tilt_theta"] >= 80 and out[1e4]["test/tilt_err_change"] == 0.0
    assert np.isfinite(out[1e2]["test/mlp_dist_norm"]) and out[1e2]["test/mlp_unflipped"] == 0.0


def test_mnist_pair_with_flat_pixels_from_the_real_format(tmp_path):
    from mlrun.datasets.vision import MNIST, write_mnist_fixture

    write_mnist_fixture(tmp_path, n_train=60, n_test=20)
    data = TiltingData(MNIST(str(tmp_path), classes=[3, 7], per_class=3500, flatten=True, val_size=1000),
                      flat_pixels=3, root=str(tmp_path))
    x, y = data.dataset("train").tensors
    assert x.shape[1] == 787 and set(y.tolist()) <= {0, 1}
    assert len(x) + len(data.dataset("val")) == 12 and len(data.dataset("test")) == 4
    assert float(x[:, :784].max()) <= 1.0
