"""Progress moves from the first step with the loss it has, redraws by time, and prints its last line once."""

from __future__ import annotations

import torch

from mlrun import progress as progress_mod
from mlrun.progress import Progress


def test_plain_progress_shows_step_one_then_redraws_by_time(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    p = Progress("plain", prefix="[gn s0] ")
    p.start("train", total=50)
    sums, counts = {"model_loss": torch.tensor(4.0)}, {"model_loss": 2}
    p.tick(1, sums, counts)
    clock[0] += 1.0
    p.tick(2, sums, counts)  # 1 s later: not due (plain lines every 10 s)
    clock[0] += 10.0
    p.tick(3, {"model_loss": torch.tensor(3.0)}, {"model_loss": 1})
    p.update(10, {"model_loss": 2.5})  # a log point right after a draw: nothing
    clock[0] += 1.0
    p.tick(50, {}, {})
    p.update(50, {"model_loss": 1.5})  # the last step was drawn already: once only
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["[gn s0] [train] step 1/50", "[gn s0] [train] step 3/50",
                                                       "[gn s0] [train] step 50/50"]
    assert "model_loss=2 " in lines[0] + " " and "model_loss=3" in lines[1] and "model_loss=2.5" in lines[2]


def test_none_draws_nothing(capsys):
    p = Progress("none")
    p.start("train", total=2)
    p.tick(1, {"l": torch.tensor(1.0)}, {"l": 1})
    p.update(2, {"l": 1.0})
    assert capsys.readouterr().out == ""


def test_closing_line_names_each_headline_metric_once():
    from mlrun.app import headline

    results = {"metrics": {"test/acc": 0.69444, "test/loss": 1.0, "val/acc": 0.7},
               "paper": {"metrics": {"maml": {"metric": "test/acc"}, "imaml": {"metric": "test/acc"},
                                     "test/loss": 0.5, "test/bleu": 30.0}}}
    assert headline(results) == "test/acc 0.6944, test/loss 1"
    assert headline({"metrics": {"test/acc": 0.5, "val/acc": 0.4}}) == "test/acc 0.5"  # no paper block: test/*
