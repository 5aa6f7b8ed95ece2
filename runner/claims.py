"""Claims as data: `lhs op factor*rhs + offset`, checked against a run's or a study's metrics.

A claim in an experiment file looks like::

    claims:
      - name: test accuracy at least 95%
        lhs: test/acc          # a metric name, a number, or {run: <label>, metric: <name>, stat: median}
        op: ">="
        rhs: 0.95
      - name: no-BN needs 3x the steps of BN-x5
        lhs: {run: nobn, metric: steps_to_target}
        op: ">="
        rhs: {run: bn_x5, metric: steps_to_target}
        factor: 3

Nothing about any claim lives in Python: the runner evaluates whatever the experiment declares. A claim
whose metric is missing is recorded as `unknown` with the reason, never silently dropped.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Callable, Mapping
from typing import Any

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}
STATS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "mean": statistics.fmean,
    "min": min,
    "max": max,
}


class MissingMetric(KeyError):
    pass


def _as_float(v: Any) -> float:
    if isinstance(v, str):
        return float(v)  # "nan"/"inf" as written by records._clean
    return float(v)


def resolve(term: Any, metrics: Mapping[str, Any], runs: Mapping[str, Mapping[str, list[float]]] | None) -> float:
    """The value of one side of a claim.

    metrics: a single run's metrics (or a study's derived metrics); runs: label -> metric -> values per seed.
    """
    if isinstance(term, int | float):
        return float(term)
    if isinstance(term, str):
        if term not in metrics:
            raise MissingMetric(f"metric {term!r} not in results")
        return _as_float(metrics[term])
    if isinstance(term, Mapping):
        name = term["metric"]
        if term.get("run") is None:
            return resolve(name, metrics, runs)
        if runs is None or term["run"] not in runs:
            raise MissingMetric(f"run {term['run']!r} not in the study")
        values = runs[term["run"]].get(name)
        if not values:
            raise MissingMetric(f"metric {name!r} missing in run {term['run']!r}")
        return STATS[term.get("stat", "median")]([_as_float(v) for v in values])
    raise TypeError(f"cannot read a claim term from {term!r}")


def describe(term: Any) -> str:
    if isinstance(term, Mapping):
        if term.get("run") is None:
            return str(term["metric"])
        return f"{term.get('stat', 'median')}({term['run']}:{term['metric']})"
    return str(term)


def evaluate(
    claims: list[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    runs: Mapping[str, Mapping[str, list[float]]] | None = None,
) -> list[dict[str, Any]]:
    out = []
    for c in claims:
        c = dict(c)
        rec: dict[str, Any] = {
            "name": c.get("name") or f"{describe(c['lhs'])} {c['op']} {describe(c['rhs'])}",
            "lhs": describe(c["lhs"]), "op": c["op"], "rhs": describe(c["rhs"]),
            "factor": c.get("factor", 1.0), "offset": c.get("offset", 0.0),
        }
        try:
            left = resolve(c["lhs"], metrics, runs)
            right = resolve(c["rhs"], metrics, runs) * float(c.get("factor", 1.0)) + float(c.get("offset", 0.0))
            ok = (not math.isnan(left)) and (not math.isnan(right)) and OPS[c["op"]](left, right)
            rec.update(lhs_value=left, rhs_value=right, status="held" if ok else "failed")
        except (MissingMetric, ValueError, TypeError, KeyError) as e:
            rec.update(status="unknown", reason=str(e))
        out.append(rec)
    return out


def summary_line(results: list[dict[str, Any]]) -> str:
    held = sum(r["status"] == "held" for r in results)
    return f"{held}/{len(results)} claims held"
