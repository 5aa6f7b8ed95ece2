"""`mlrun validate`: compose every experiment with every hardware preset and check each `_target_` and each value
against what the schema allows.

All problems are printed at once, each with the experiment, the key and the config file it most likely comes
from; torch is imported only when a target's module needs it (to read its signature).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from mlrun.claims import OPS

SPECIAL = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def _targets(node: Any, path: str) -> list[tuple[str, dict]]:
    out = []
    if isinstance(node, dict):
        if "_target_" in node:
            out.append((path, node))
        for k, v in node.items():
            out += _targets(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _targets(v, f"{path}[{i}]")
    return out


def check_target(path: str, node: dict) -> str | None:
    from hydra.utils import get_object

    target = node["_target_"]
    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - report every import problem, keep going
        return f"{path}._target_: cannot import {target!r} ({type(e).__name__}: {str(e).splitlines()[0]})"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = sig.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    given = [k for k in node if k not in SPECIAL]
    unknown = [k for k in given if k not in params]
    if unknown:
        return f"{path}: {target} takes no argument {', '.join(map(repr, unknown))} (it takes: {', '.join(params)})"
    if not node.get("_partial_"):
        required = [n for n, p in params.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                    p.KEYWORD_ONLY) and n not in node and n != "self"]
        if required and not node.get("_args_"):
            return f"{path}: {target} needs {', '.join(map(repr, required))}"
    return None


def check_claims(claims: list[Any], where: str) -> list[str]:
    problems = []
    for i, c in enumerate(claims or []):
        if not isinstance(c, dict) or not {"lhs", "op", "rhs"} <= set(c):
            problems.append(f"{where}[{i}]: a claim needs lhs, op and rhs")
        elif c["op"] not in OPS:
            problems.append(f"{where}[{i}].op: {c['op']!r} is not one of {', '.join(OPS)}")
    return problems


def validate(names: list[str], hardware: list[str]) -> list[str]:
    from omegaconf import OmegaConf

    from mlrun import compose
    from mlrun.cli import experiments

    names_all = set(experiments())
    problems: list[str] = []
    checked: dict[str, str | None] = {}
    for name in names:
        for hw in hardware:
            where = f"{name} (conf/experiment/{name}.yaml, hardware={hw})"
            try:
                cfg = compose(name, [f"hardware={hw}", "logger=none"])
            except Exception as e:  # noqa: BLE001
                problems.append(f"{where}: does not compose: {str(e).splitlines()[0]}")
                continue
            from mlrun.schema import problems_of

            problems += [f"{where}: {p}" for p in problems_of(cfg)]  # choices, ranges, keys added with `+`
            if hw != hardware[0]:
                continue  # targets and claims do not depend on the hardware preset
            c = OmegaConf.to_container(cfg, resolve=False)
            if c.get("experiment_name") != name:
                problems.append(f"{where}: experiment_name is {c.get('experiment_name')!r}, expected {name!r}")
            if c.get("scale") not in ("cpu", "paper"):
                problems.append(f"{where}: scale must be cpu or paper")
            if not c.get("paper"):
                problems.append(f"{where}: paper block missing")
            if c.get("part_of") and c["part_of"] not in names_all:
                problems.append(f"{where}: part_of names {c['part_of']!r}, which is not an experiment")
            problems += [f"{where}: {p}" for p in check_claims(c.get("claims"), "claims")]
            problems += [f"{where}: {p}" for p in check_claims((c.get("study") or {}).get("claims"), "study.claims")]
            for group in ("model", "dataset", "study", "trainer"):
                for path, node in _targets(c.get(group), group):
                    key = repr(sorted((k, str(v)) for k, v in node.items() if not isinstance(v, dict | list)))
                    if key not in checked:
                        checked[key] = check_target(path, node)
                    if checked[key]:
                        problems.append(f"{where}: {checked[key]}")
    return problems


def validate_main(argv: list[str]) -> int:
    from mlrun.cli import experiments, groups

    ap = argparse.ArgumentParser(prog="mlrun validate", description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="*", help="default: all")
    args = ap.parse_args(argv)
    names = args.experiments or experiments()
    unknown = [n for n in names if n not in experiments()]
    if unknown:
        from difflib import get_close_matches

        for n in unknown:
            close = get_close_matches(n, experiments(), n=1, cutoff=0.6)
            print(f"mlrun validate: no experiment {n!r}; " + (f"did you mean {close[0]}?" if close else
                                                               "`mlrun ls` lists them"), file=sys.stderr)
        return 1
    problems = validate(names, groups()["hardware"])
    for p in problems:
        print(p)
    print(f"{len(names)} experiments x {len(groups()['hardware'])} hardware presets: "
          f"{len(problems)} problem{'s' if len(problems) != 1 else ''}")
    return 1 if problems else 0
