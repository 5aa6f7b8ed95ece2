"""Claims as data: `lhs op factor*rhs + offset`, checked against a run's or a study's metrics.

A claim in an experiment file looks like::

    claims:
      - name: test accuracy at least 95%
        lhs: test/acc          # a metric name, a number, or {run: <label>, metric: <name>}
        op: ">="
        rhs: 0.95
      - name: no-BN needs 3x the steps of BN-x5
        lhs: {run: nobn, metric: steps_to_target}
        op: ">="
        rhs: {run: bn_x5, metric: steps_to_target}
        factor: 3

Nothing about any claim lives in Python: the runner evaluates whatever the experiment declares. A claim
whose metric is missing is recorded as `unknown` with the reason, never silently dropped.

A study's claims are **paired by seed** (`evaluate_paired`): each side is read from the runs (or the derived
metrics) of one seed, the claim is judged per seed, and its status comes from the per-seed outcomes:

- `held`: the median paired statistic meets the threshold and at least 80% of the seeds hold on their own
  (every seed with `all_seeds: true`);
- `fragile`: the median holds but fewer seeds do;
- `failed`: the median does not hold;
- `unknown`: no seed has both values.

The paired statistic is the difference `lhs - rhs` compared with the offset (a claim against a constant
compares the per-seed value itself), or, for a claim with a `factor` and no offset between two measured
sides, the ratio `lhs / rhs` compared with the factor. A seed that has one side but not the other counts as
not held. Sides measured on disjoint seed sets cannot be paired: such a claim is marked `unpaired` and judged
on the two medians, as the issue that introduced pairing asks.
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
HOLD_FRACTION = 0.8
"""A claim is `held` when at least this fraction of its seeds hold individually (4 of 5)."""


class MissingMetric(KeyError):
    pass


def _as_float(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError(f"{v!r} is not a number")
    return float(v)  # "nan"/"inf" strings as written by records._clean


def resolve(term: Any, metrics: Mapping[str, Any], runs: Mapping[str, Mapping[str, list[float]]] | None) -> float:
    """The value of one side of a claim.

    metrics: a single run's metrics (or a study's derived metrics); runs: label -> metric -> values per seed
    (reduced with the term's `stat`, the median by default).
    """
    if isinstance(term, int | float) and not isinstance(term, bool):
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
        return f"{term['run']}:{term['metric']}"
    return str(term)


def _header(c: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": c.get("name") or f"{describe(c['lhs'])} {c['op']} {describe(c['rhs'])}",
        "lhs": describe(c["lhs"]), "op": c["op"], "rhs": describe(c["rhs"]),
        "factor": float(c.get("factor", 1.0)), "offset": float(c.get("offset", 0.0)),
    }


def _holds(op: str, left: float, right: float) -> bool:
    return (not math.isnan(left)) and (not math.isnan(right)) and OPS[op](left, right)


def evaluate(claims: list[Mapping[str, Any]], metrics: Mapping[str, Any],
             runs: Mapping[str, Mapping[str, list[float]]] | None = None) -> list[dict[str, Any]]:
    """One run's claims (or a study's, judged on medians: the fallback for sides that cannot be paired)."""
    out = []
    for c in claims:
        rec = _header(c)
        try:
            left = resolve(c["lhs"], metrics, runs)
            right = resolve(c["rhs"], metrics, runs) * rec["factor"] + rec["offset"]
            rec.update(lhs_value=left, rhs_value=right, status="held" if _holds(c["op"], left, right) else "failed")
        except (MissingMetric, ValueError, TypeError, KeyError) as e:
            rec.update(status="unknown", reason=str(e))
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- paired


def _ratio_claim(c: Mapping[str, Any]) -> bool:
    """`lhs >= 3 x rhs` between two measured sides is judged on the ratio; everything else on the difference."""
    return float(c.get("factor", 1.0)) != 1.0 and float(c.get("offset", 0.0)) == 0.0 and not _constant(c["rhs"])


def _constant(term: Any) -> bool:
    return isinstance(term, int | float) and not isinstance(term, bool)


def _side(term: Any, view: Mapping[str, Any]) -> float:
    """One side for one seed. view: {"derived": {...}, "runs": {label: {metric: value}}}."""
    if _constant(term):
        return float(term)
    if isinstance(term, str):
        term = {"metric": term}
    if not isinstance(term, Mapping):
        raise TypeError(f"cannot read a claim term from {term!r}")
    name, label = term["metric"], term.get("run")
    if label is None:
        if name not in view["derived"]:
            raise MissingMetric(f"metric {name!r} not derived")
        return _as_float(view["derived"][name])
    if label not in view["runs"]:
        raise MissingMetric(f"run {label!r} not in the study")
    if name not in view["runs"][label]:
        raise MissingMetric(f"metric {name!r} missing in run {label!r}")
    return _as_float(view["runs"][label][name])


def _statistic(c: Mapping[str, Any], left: float, raw_right: float) -> float:
    """The per-seed number the claim's threshold is compared with (see the module docstring)."""
    if _constant(c["rhs"]):
        return left
    if _ratio_claim(c):
        if raw_right == 0:
            return math.nan if left == 0 else math.copysign(math.inf, left)
        return left / raw_right
    return left - float(c.get("factor", 1.0)) * raw_right


def _threshold(c: Mapping[str, Any]) -> float:
    if _constant(c["rhs"]):
        return float(c["rhs"]) * float(c.get("factor", 1.0)) + float(c.get("offset", 0.0))
    if _ratio_claim(c):
        return float(c.get("factor", 1.0))
    return float(c.get("offset", 0.0))


def status_of(median_holds: bool, held: int, n: int, all_seeds: bool = False) -> str:
    if n == 0:
        return "unknown"
    if not median_holds:
        return "failed"
    enough = held == n if all_seeds else held >= math.ceil(HOLD_FRACTION * n - 1e-9)
    return "held" if enough else "fragile"


def evaluate_paired(claims: list[Mapping[str, Any]], views: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A study's claims judged seed by seed.

    views: seed -> {"derived": {metric: value}, "runs": {label: {metric: value}}}, each from that seed's runs
    only. Each record keeps every seed's values (`per_seed`), the count held, the median paired statistic
    (`median`, compared with `threshold`) and the status; `lhs_value`/`rhs_value` are the medians of the two
    sides over the paired seeds, for display.
    """
    out = []
    for c in claims:
        rec = _header(c)
        rec.update(all_seeds=bool(c.get("all_seeds", False)), kind="ratio" if _ratio_claim(c) else (
            "value" if _constant(c["rhs"]) else "difference"))
        per_seed, lefts, rights, missing = [], {}, {}, {}
        for seed in sorted(views):
            view = views[seed]
            left = right = None
            try:
                left = _side(c["lhs"], view)
            except (MissingMetric, ValueError, TypeError, KeyError) as e:
                missing[seed] = str(e)
            try:
                right = _side(c["rhs"], view)
            except (MissingMetric, ValueError, TypeError, KeyError) as e:
                missing.setdefault(seed, str(e))
            if left is not None:
                lefts[seed] = left
            if right is not None and not _constant(c["rhs"]):
                rights[seed] = right
            if left is None or right is None:
                continue
            full_right = right * rec["factor"] + rec["offset"]
            per_seed.append({"seed": seed, "lhs": left, "rhs": full_right,
                             "value": _statistic(c, left, right), "held": _holds(c["op"], left, full_right)})
        rec["per_seed"] = per_seed
        if per_seed:
            values = [p["value"] for p in per_seed]
            finite = [v for v in values if not math.isnan(v)]
            median = statistics.median(finite) if finite else math.nan
            threshold = _threshold(c)
            held = sum(p["held"] for p in per_seed)
            n = len(per_seed) + sum(1 for s in missing if s in lefts or s in rights)  # one side only: not held
            rec.update(
                median=median, threshold=threshold, held_count=held, n_seeds=n, paired=True,
                lhs_value=statistics.median(p["lhs"] for p in per_seed),
                rhs_value=statistics.median(p["rhs"] for p in per_seed),
                status=status_of(_holds(c["op"], median, threshold), held, n, rec["all_seeds"]),
            )
            if missing:
                rec["missing"] = {str(s): why for s, why in missing.items()}
        elif lefts and (rights or _constant(c["rhs"])):
            # the two sides were measured on different seeds: nothing to pair, compare the medians
            left = statistics.median(lefts.values())
            right = (statistics.median(rights.values()) if rights else float(c["rhs"])) * rec["factor"] + rec["offset"]
            rec.update(paired=False, unpaired=True, lhs_value=left, rhs_value=right, held_count=None,
                       n_seeds=None, status="held" if _holds(c["op"], left, right) else "failed",
                       reason=f"unpaired: lhs seeds {sorted(lefts)}, rhs seeds {sorted(rights)}")
        else:
            reasons = sorted(set(missing.values())) or ["no seeds"]
            rec.update(status="unknown", reason="; ".join(reasons))
        out.append(rec)
    return out


def aggregate_run_claims(per_seed_claims: Mapping[int, list[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """A run-level claim (in each run's results.json) over the seeds of one condition: the same rules."""
    by_name: dict[str, dict[str, Any]] = {}
    for seed in sorted(per_seed_claims):
        for c in per_seed_claims[seed]:
            if not isinstance(c, Mapping) or "name" not in c:
                continue
            rec = by_name.setdefault(str(c["name"]), {
                "name": str(c["name"]), "lhs": c.get("lhs"), "op": c.get("op"), "rhs": c.get("rhs"),
                "kind": "value", "per_seed": [], "unknown_seeds": []})
            if c.get("status") == "unknown" or "lhs_value" not in c:
                rec["unknown_seeds"].append(seed)
                continue
            rec["per_seed"].append({"seed": seed, "lhs": c["lhs_value"], "rhs": c["rhs_value"],
                                    "value": c["lhs_value"], "held": c.get("status") == "held"})
    out = []
    for rec in by_name.values():
        ps = rec["per_seed"]
        n = len(ps) + len(rec["unknown_seeds"])
        if not ps:
            rec.update(status="unknown", n_seeds=n, held_count=0)
        else:
            try:
                lhs = statistics.median(_as_float(p["lhs"]) for p in ps)
                rhs = statistics.median(_as_float(p["rhs"]) for p in ps)
                ok = _holds(rec["op"], lhs, rhs)
            except (TypeError, ValueError, KeyError):
                lhs = rhs = math.nan
                ok = False
            held = sum(p["held"] for p in ps)
            rec.update(lhs_value=lhs, rhs_value=rhs, median=lhs, threshold=rhs, held_count=held, n_seeds=n,
                       status=status_of(ok, held, n))
        if not rec["unknown_seeds"]:
            del rec["unknown_seeds"]
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- text


def count_text(c: Mapping[str, Any]) -> str:
    """`held 5/5`, `fragile 3/5`, `failed 1/5`, `held (unpaired)`, `unknown`."""
    st = str(c.get("status", "unknown"))
    if c.get("n_seeds"):
        return f"{st} {c.get('held_count', 0)}/{c['n_seeds']}"
    if c.get("unpaired"):
        return f"{st} (unpaired)"
    return st


def number_text(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def measured_text(c: Mapping[str, Any], seeds: bool = True) -> str:
    """What a claim measured, in one line: the median paired statistic against its threshold, then each seed's."""
    if c.get("per_seed") and "median" in c:
        kind = c.get("kind", "difference")
        name = {"difference": "median Δ", "ratio": "median ratio", "value": "median"}.get(kind, "median")
        value = f"{float(c['median']):+.4g}" if kind == "difference" else number_text(c["median"])
        text = f"{name} {value} {c.get('op', '')} {number_text(c.get('threshold'))}"
        if seeds:
            text += " (seeds: " + ", ".join(number_text(p["value"]) for p in c["per_seed"]) + ")"
        return text
    if "lhs_value" in c:
        return f"{number_text(c['lhs_value'])} {c.get('op', '')} {number_text(c.get('rhs_value'))}" + (
            " (medians, unpaired)" if c.get("unpaired") else "")
    return str(c.get("reason", "-"))


def summary_line(results: list[Mapping[str, Any]]) -> str:
    held = sum(r.get("status") == "held" for r in results)
    fragile = sum(r.get("status") == "fragile" for r in results)
    return f"{held}/{len(results)} claims held" + (f", {fragile} fragile" if fragile else "")
