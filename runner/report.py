"""`mlrun report`, `mlrun ls`, `mlrun sync` (torch-free). Filled in by issue 14."""

from __future__ import annotations


def ls_main(argv: list[str]) -> int:
    from mlrun.cli import experiments

    for name in experiments():
        print(name)
    return 0


def report_main(argv: list[str]) -> int:
    print("mlrun report: not yet implemented")
    return 2


def sync_main(argv: list[str]) -> int:
    print("mlrun sync: not yet implemented")
    return 2
