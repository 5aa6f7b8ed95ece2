"""Prototypical networks: prototypes, distances, the linear-classifier identity, evaluation, study summary."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from mlrun.models import protonet as pn


def test_prototypes_hand_computed():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0], [3.0, 3.0]])
    y = torch.tensor([0, 0, 2, 1, 1])  # unordered, unequal counts
    assert torch.equal(pn.prototypes(z, y, 3), torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 4.0]]))


def test_euclidean_and_cosine_logits_hand_computed():
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    q = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    assert torch.allclose(pn.proto_logits(q, protos, "euclidean"), torch.tensor([[-1.0, -2.0], [-4.0, -13.0]]))
    s = 2 ** -0.5
    assert torch.allclose(pn.proto_logits(q, protos, "cosine"), torch.tensor([[s, s], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="distance"):
        pn.proto_logits(q, protos, "manhattan")


def test_euclidean_is_linear_classifier_with_paper_weights():
    g = torch.Generator().manual_seed(0)
    protos, q = torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g)
    w, b = pn.linear_head(protos)
    assert torch.allclose(w, 2 * protos) and torch.allclose(b, -(protos**2).sum(-1))
    linear = q @ w.T + b
    logits = pn.proto_logits(q, protos, "euclidean")
    assert torch.allclose(logits, linear - (q**2).sum(-1, keepdim=True), atol=1e-5)  # differ by -||q||^2 per row
    assert torch.allclose(logits.softmax(-1), linear.softmax(-1), atol=1e-6)


def test_embedding_output_sizes():
    assert pn.ConvEmbedding(1)(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    assert pn.ConvEmbedding(3)(torch.zeros(2, 3, 84, 84)).shape == (2, 64 * 5 * 5)
    assert pn.ConvEmbedding(1, ceil_mode=True)(torch.zeros(2, 1, 8, 8)).shape == (2, 64)
    assert pn.ConvEmbedding(1, hidden=8, pool_blocks=0)(torch.zeros(2, 1, 8, 8)).shape == (2, 8 * 8 * 8)
    assert pn.ConvEmbedding(1, hidden=8, pool_blocks=1)(torch.zeros(2, 1, 8, 8)).shape == (2, 8 * 4 * 4)
    assert sum(isinstance(m, nn.MaxPool2d) for m in pn.ConvEmbedding(pool_blocks=2)) == 2
    n_conv = sum(isinstance(m, nn.Conv2d) for m in pn.ConvEmbedding())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in pn.ConvEmbedding())
    assert n_conv == n_bn == 4


def _episode():
    """2-way 2-shot in 2-d pixel space; prototypes (0, 1) and (4, 5). Query (3, 3) has squared distances 13 and 5
    (nearer class 1), query (1, 1) has 1 and 25 (nearer class 0); the labels say the opposite: both wrong."""
    s = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 4.0], [4.0, 6.0]]).view(4, 1, 1, 2)
    q = torch.tensor([[3.0, 3.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    return {"support": s, "support_y": torch.tensor([0, 0, 1, 1]), "query": q, "query_y": torch.tensor([0, 1])}


def test_training_step_is_cross_entropy_over_negative_distances():
    task = pn.ProtoNet(nn.Flatten(), partial(torch.optim.SGD, lr=0.1))
    (name, loss), = list(task.training_step(_episode()))
    assert name == "model"
    expected = torch.nn.functional.cross_entropy(torch.tensor([[-13.0, -5.0], [-1.0, -25.0]]), torch.tensor([0, 1]))
    assert torch.isclose(loss, expected)


def test_evaluate_hand_computed_and_identity_embedding_equals_pixel_baseline():
    task = pn.ProtoNet(nn.Flatten(), partial(torch.optim.SGD, lr=0.1)).eval()
    right = {**_episode(), "query_y": torch.tensor([1, 0])}
    out = task.evaluate([_episode(), right], "test")  # accuracies 0 and 1
    assert out["acc"] == 0.5 and out["acc_2w2s"] == 0.5
    assert out["ci95"] == pytest.approx(1.96 * 2**-0.5 / 2**0.5)  # sample std of (0, 1) is 0.707
    assert out["pixel_acc"] == out["acc"] and out["pixel_ci95"] == out["ci95"]
    assert out["acc_lo"] == pytest.approx(0.5 - out["ci95"]) and out["acc_hi"] == pytest.approx(0.5 + out["ci95"])


def test_evaluate_groups_settings_and_reports_ci():
    from mlrun.datasets.fewshot import EpisodeDataset, mean_ci95

    g = torch.Generator().manual_seed(0)
    images = torch.randn(60, 1, 4, 4, generator=g) + (torch.arange(60) // 10).view(60, 1, 1, 1).float()
    labels = torch.arange(60) // 10
    eps = [EpisodeDataset(images, labels, list(range(6)), w, 1, 3, 8, seed=w) for w in (3, 5)]
    task = pn.ProtoNet(nn.Flatten(), partial(torch.optim.SGD, lr=0.1)).eval()
    episodes = [e[i] for e in eps for i in range(8)]
    out = task.evaluate(episodes, "test")
    assert {"acc_3w1s", "acc_5w1s", "ci95_3w1s", "pixel_acc_5w1s", "pixel_ci95_5w1s"} <= set(out)
    assert out["acc"] == out["acc_3w1s"]
    per = [float((task.pixel_logits(e).argmax(-1) == e["query_y"]).float().mean()) for e in episodes[8:]]
    assert (out["pixel_acc_5w1s"], out["pixel_ci95_5w1s"]) == pytest.approx(mean_ci95(per))


def test_training_improves_accuracy_on_new_episodes():
    """Twenty episodes of training beat the untrained embedding on other episodes of the training classes."""
    from mlrun.datasets.fewshot import EpisodeDataset, FewShotDigits

    torch.manual_seed(0)
    data = FewShotDigits(n_way=5, k_shot=1, q_queries=5)
    x, y, classes = data.pools["train"]
    held_out = [EpisodeDataset(x, y, classes, 5, 1, 5, 20, seed=99)[i] for i in range(20)]
    task = pn.ProtoNet(pn.ConvEmbedding(hidden=8, pool_blocks=1), partial(torch.optim.Adam, lr=1e-2))
    opt = task.configure_optimizers()["model"]
    before = task.eval().evaluate(held_out, "val")["acc"]
    task.train()
    for i in range(20):
        for _, loss in task.training_step(data.dataset("train")[i]):
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = task.eval().evaluate(held_out, "val")["acc"]
    assert after > before + 0.05, (before, after)


def _study(tmp_path: Path) -> dict:
    runs = []
    table = {("euclidean", 1): 0.80, ("cosine", 1): 0.70, ("euclidean", 5): 0.95, ("cosine", 5): 0.90}
    for (dist, shot), acc in table.items():
        for seed in range(3):
            pix = 0.71 if shot == 1 else 0.90
            runs.append({"label": f"{dist}_k{shot}", "seed": seed, "status": "completed", "dir": str(tmp_path),
                         "metrics": {"test/acc": acc + seed / 100, "test/ci95": 0.02, "test/pixel_acc": pix,
                                     "test/pixel_ci95": 0.015}})
    return {"runs": runs}


def test_study_summary_margins_and_figure(tmp_path):
    study = _study(tmp_path)
    s = pn.summarize(study)
    assert s["euclidean_minus_pixel_k1"] == pytest.approx(0.81 - 0.71)
    assert s["euclidean_minus_cosine_k5"] == pytest.approx(0.05)
    assert s["pixel_acc_k5"] == 0.90
    paths = pn.study_figure(study, tmp_path / "figs")
    assert paths[0].exists() and paths[0].stat().st_size > 1000
    json.dumps(s)


def test_two_phase_protocol_retrains_from_the_same_init_on_train_and_val_for_the_chosen_steps(tmp_path):
    """The paper's protocol as two stages: `select` trains on the train classes with validation; `retrain` starts
    again from the initial weights (reinit_stages), on train+val classes (the data's trainval_stages), for the
    step at which the monitored val metric was best (the trainer's max_steps_from_best)."""
    from omegaconf import OmegaConf

    from mlrun.datasets.fewshot import FewShotDigits
    from mlrun.loggers import Loggers
    from mlrun.schema import LoggerConf, TrainerConf
    from mlrun.trainer import Trainer

    torch.manual_seed(0)
    data = FewShotDigits(n_way=5, k_shot=1, q_queries=2, train_way=5, test_episodes=2, val_episodes=3,
                         trainval_stages=["retrain"])
    task = pn.ProtoNet(pn.ConvEmbedding(hidden=4, blocks=2, pool_blocks=0), partial(torch.optim.Adam, lr=1e-2),
                       reinit_stages=["retrain"])
    initial = {k: v.clone() for k, v in task.state_dict().items()}
    seen: list[tuple[str, int]] = []
    step = task.training_step

    def recording_step(batch):
        seen.append((task.stage, int(batch["support_y"].numel())))
        yield from step(batch)

    task.training_step = recording_step
    reinit_seen = []
    start = task.on_stage_start

    def recording_start(stage, data_):
        start(stage, data_)
        reinit_seen.append(all(torch.equal(v, initial[k]) for k, v in task.state_dict().items()))

    task.on_stage_start = recording_start
    cfg = OmegaConf.merge(OmegaConf.structured(TrainerConf), {"progress": "none", "log_every": 1})
    trainer = Trainer(cfg, torch.device("cpu"), tmp_path, Loggers(tmp_path, OmegaConf.structured(LoggerConf), {}), 0)
    trainer.fit(task, data, [{"name": "select", "max_steps": 8, "eval_every": 2, "monitor": "val/loss", "mode": "min"},
                             {"name": "retrain", "max_steps_from_best": True}])
    best = trainer.best["stage_step"]
    assert trainer.best["stage"] == "select" and best in (2, 4, 6, 8)
    assert [s for s, _ in seen] == ["select"] * 8 + ["retrain"] * best
    assert reinit_seen == [True, True]  # the retrain stage restarted from the initial weights
    assert task.extra_state() == {"reinitialised": ["retrain"]}
    with pytest.raises(ValueError, match="max_steps_from_best"):
        Trainer(cfg, torch.device("cpu"), tmp_path, Loggers(tmp_path, OmegaConf.structured(LoggerConf), {}), 0).fit(
            task, data, [{"name": "retrain", "max_steps_from_best": True}])
