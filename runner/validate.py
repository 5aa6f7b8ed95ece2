"""`mlrun validate`: compose every experiment (filled in by issue 16)."""

from __future__ import annotations


def validate_main(argv: list[str]) -> int:
    from mlrun import compose
    from mlrun.cli import experiments

    problems = 0
    for name in experiments():
        try:
            compose(name, ["logger=none"])
        except Exception as e:  # noqa: BLE001
            problems += 1
            print(f"{name}: {type(e).__name__}: {e}")
    print(f"{len(experiments())} experiments, {problems} problems")
    return 1 if problems else 0
