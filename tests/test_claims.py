"""Paired claims: judged seed by seed, `held` only when the median holds and at least 80% of seeds do."""

from __future__ import annotations

import pytest

from mlrun.claims import aggregate_run_claims, count_text, evaluate, evaluate_paired, measured_text

A_BEATS_B = {"name": "a above b", "lhs": {"run": "a", "metric": "m"}, "op": ">", "rhs": {"run": "b", "metric": "m"}}


def views(a: list[float], b: list[float], seeds: list[int] | None = None, derived: list[dict] | None = None):
    seeds = seeds or list(range(len(a)))
    return {s: {"runs": {"a": {"m": x}, "b": {"m": y}}, "derived": (derived or [{}] * len(a))[i]}
            for i, (s, x, y) in enumerate(zip(seeds, a, b))}


def test_medians_hold_but_pairs_do_not_is_fragile():
    # medians 10 > 9, but seeds 3 and 4 go the other way: 3/5 seeds hold
    a, b = [10, 10, 10, 0, 0], [9, 9, 9, 1, 1]
    old = evaluate([A_BEATS_B], {}, {"a": {"m": a}, "b": {"m": b}})[0]
    assert old["status"] == "held"  # what the unpaired medians said
    c = evaluate_paired([A_BEATS_B], views(a, b))[0]
    assert c["status"] == "fragile" and c["held_count"] == 3 and c["n_seeds"] == 5
    assert c["median"] == 1 and c["threshold"] == 0
    assert [p["held"] for p in c["per_seed"]] == [True, True, True, False, False]
    assert count_text(c) == "fragile 3/5"


def test_medians_fail_but_pairs_hold_is_held():
    # medians 3 < 3.5, yet 4 of 5 seeds have a above b: the pairing is what the claim is about
    a, b = [1, 2, 3, 4, 5], [0.9, 1.9, 3.5, 3.9, 4.9]
    assert evaluate([A_BEATS_B], {}, {"a": {"m": a}, "b": {"m": b}})[0]["status"] == "failed"
    c = evaluate_paired([A_BEATS_B], views(a, b))[0]
    assert c["status"] == "held" and count_text(c) == "held 4/5"
    assert c["median"] == pytest.approx(0.1)


def test_median_failing_is_failed_whatever_the_count():
    c = evaluate_paired([A_BEATS_B], views([1, 1, 5], [2, 2, 1]))[0]
    assert c["status"] == "failed" and count_text(c) == "failed 1/3"


def test_offset_and_constant_and_ratio_claims():
    plus_one = dict(A_BEATS_B, op=">=", offset=1.0)
    c = evaluate_paired([plus_one], views([3, 3, 3], [2, 1.5, 2.5]))[0]  # differences 1, 1.5, 0.5
    assert c["median"] == 1.0 and c["threshold"] == 1.0 and c["status"] == "fragile"  # 2/3 < 80%
    const = {"name": "a at least 0.95", "lhs": {"run": "a", "metric": "m"}, "op": ">=", "rhs": 0.95}
    c = evaluate_paired([const], views([0.96, 0.97, 0.94, 0.99, 0.98], [0] * 5))[0]
    assert c["status"] == "held" and c["held_count"] == 4 and c["kind"] == "value" and c["median"] == 0.97
    ratio = {"name": "a 3x b", "lhs": {"run": "a", "metric": "m"}, "op": ">=", "rhs": {"run": "b", "metric": "m"},
             "factor": 3}
    c = evaluate_paired([ratio], views([30, 35, 40], [10, 10, 10]))[0]
    assert c["kind"] == "ratio" and c["median"] == 3.5 and c["threshold"] == 3 and c["status"] == "held"
    assert c["held_count"] == 3 and measured_text(c) == "median ratio 3.5 >= 3 (seeds: 3, 3.5, 4)"


def test_all_seeds_requires_every_seed():
    strict = dict(A_BEATS_B, all_seeds=True)
    c = evaluate_paired([strict], views([2, 2, 2, 2, 0], [1, 1, 1, 1, 1]))[0]
    assert c["status"] == "fragile" and c["held_count"] == 4  # would be held without all_seeds
    assert evaluate_paired([A_BEATS_B], views([2, 2, 2, 2, 0], [1, 1, 1, 1, 1]))[0]["status"] == "held"


def test_derived_metrics_are_per_seed():
    claim = {"name": "gain", "lhs": "gain", "op": ">=", "rhs": 1.0}
    c = evaluate_paired([claim], views([0, 0, 0], [0, 0, 0], derived=[{"gain": 2}, {"gain": 0.5}, {"gain": 3}]))[0]
    assert [p["lhs"] for p in c["per_seed"]] == [2, 0.5, 3] and c["status"] == "fragile"


def test_a_seed_missing_one_side_counts_as_not_held():
    v = views([2, 2, 2, 2, 2], [1, 1, 1, 1, 1])
    del v[4]["runs"]["b"]
    c = evaluate_paired([A_BEATS_B], v)[0]
    assert c["n_seeds"] == 5 and c["held_count"] == 4 and c["status"] == "held" and "4" in c["missing"]
    del v[3]["runs"]["b"]
    assert evaluate_paired([A_BEATS_B], v)[0]["status"] == "fragile"  # 3 of 5


def test_disjoint_seeds_are_unpaired_and_fall_back_to_medians():
    v = {0: {"runs": {"a": {"m": 5}}, "derived": {}}, 1: {"runs": {"a": {"m": 6}}, "derived": {}},
         2: {"runs": {"b": {"m": 1}}, "derived": {}}, 3: {"runs": {"b": {"m": 2}}, "derived": {}}}
    c = evaluate_paired([A_BEATS_B], v)[0]
    assert c["unpaired"] is True and c["status"] == "held" and c["lhs_value"] == 5.5 and c["rhs_value"] == 1.5
    assert count_text(c) == "held (unpaired)"


def test_missing_everywhere_is_unknown():
    c = evaluate_paired([dict(A_BEATS_B, lhs={"run": "nope", "metric": "m"})], views([1], [0]))[0]
    assert c["status"] == "unknown" and "nope" in c["reason"]


def test_run_claims_aggregate_over_seeds_with_the_same_rules():
    def claim(v: float) -> dict:
        return {"name": "acc", "op": ">=", "lhs_value": v, "rhs_value": 0.9,
                "status": "held" if v >= 0.9 else "failed"}

    out = aggregate_run_claims({s: [claim(v)] for s, v in enumerate([0.95, 0.91, 0.5, 0.92, 0.93])})
    assert out[0]["status"] == "held" and count_text(out[0]) == "held 4/5"
    out = aggregate_run_claims({0: [claim(0.95)], 1: [claim(0.5)], 2: [claim(0.92)]})
    assert count_text(out[0]) == "fragile 2/3"
