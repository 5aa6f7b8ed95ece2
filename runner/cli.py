"""`mlrun`: the Hydra app, plus the verbs `ls`, `report`, `validate` and `sync`.

Nothing heavy is imported at module level, so `--help`, tab completion, listing and reporting start
in well under a second; torch is imported only when a run starts.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("mlrun")

VERBS = ("ls", "report", "validate", "sync", "reproduce")


def _stamp() -> str:
    """`<date>/<time>_<random id>`, fixed once per launch and shared with every job process.

    Kept in the environment so that jobs run by other processes (joblib, submitit, SLURM) resolve the same
    sweep dir as the launching process, and two launches in the same second still get distinct dirs.
    """
    if "MLRUN_STAMP" not in os.environ:
        now = datetime.now()
        os.environ["MLRUN_STAMP"] = f"{now:%Y-%m-%d}/{now:%H-%M-%S}_{secrets.token_hex(3)}"
    return os.environ["MLRUN_STAMP"]


def setup() -> None:
    """Register the schemas and resolvers; idempotent (the API and tests call it too)."""
    from omegaconf import OmegaConf

    from mlrun import schema

    schema.register()
    if not OmegaConf.has_resolver("mlrun_stamp"):
        OmegaConf.register_new_resolver("mlrun_stamp", _stamp)
    if not OmegaConf.has_resolver("mlrun_pad"):  # sweep subfolders sort in job order: 000_, 001_, ..., 010_
        OmegaConf.register_new_resolver("mlrun_pad", lambda n, width=3: str(n).zfill(int(width)))
    # Integer arithmetic between config keys, e.g. a simulated data-parallel batch `${mlrun_mul:8,${n}}` or
    # steps per epoch `${mlrun_floordiv:1077,${dataset.batch_size}}`.
    if not OmegaConf.has_resolver("mlrun_mul"):
        OmegaConf.register_new_resolver("mlrun_mul", lambda a, b: int(a) * int(b))
    if not OmegaConf.has_resolver("mlrun_floordiv"):
        OmegaConf.register_new_resolver("mlrun_floordiv", lambda a, b: int(a) // int(b))


def experiments() -> list[str]:
    return groups()["experiment"]


def _job(cfg: Any) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if OmegaConf.is_missing(cfg, "model") or OmegaConf.is_missing(cfg, "dataset"):
        _fail("choose an experiment: mlrun experiment=NAME, one of: " + ", ".join(experiments()), multirun)
        return None
    from mlrun.app import RunFailed, run_experiment
    from mlrun.errors import MlrunError
    from mlrun.records import RecordError

    run_dir = Path(hc.runtime.output_dir)
    if "Joblib" in str(hc.launcher.get("_target_", "")) and cfg.hardware.nproc_per_node * cfg.hardware.nnodes > 1:
        cfg.hardware.start_method = "fork"  # spawned workers cannot start from inside a loky worker process
    try:
        results = run_experiment(cfg, run_dir)
    except RunFailed as e:
        _fail(f"{cfg.experiment_name}: {e.results.get('status', 'failed')}: {e}. Records in {run_dir}", multirun,
              e.code)
        return None
    except (MlrunError, RecordError) as e:
        _fail(f"{cfg.experiment_name}: {e}", multirun)
        return None
    if hc.sweeper.get("_target_", "").endswith("OptunaSweeper") and not cfg.objective:
        _fail("a search needs the metric to optimise: set objective=<metric> (e.g. objective=val/acc)", multirun)
        return float("nan")
    if cfg.objective:
        value = results["metrics"].get(cfg.objective)
        if value is None:
            _fail(f"objective {cfg.objective!r} is not among the metrics: {sorted(results['metrics'])}", multirun)
        return float(value) if value is not None else float("nan")
    return None


def _fail(message: str, multirun: bool, code: int = 1) -> None:
    """One line, no traceback. In a multirun the sweep goes on (the run's results.json says it failed)."""
    print(f"mlrun: error: {message}", file=sys.stderr, flush=True)
    if not multirun:
        sys.exit(code)


HIDDEN = ("claims.", "paper.", "smoke=", "part_of=", "study=", "study.", "scale=")
"""Keys the experiment files own: tab completion does not offer them."""


def _complete(argv: list[str]) -> None:
    """Tab completion: Hydra's candidates without the experiment files' own keys, plus the verbs as first word."""
    import contextlib
    import io

    buf = io.StringIO()
    sys.argv = [sys.argv[0], *argv]
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        _hydra_main()
    words = os.environ.get("COMP_LINE", "").split()
    typing = "" if os.environ.get("COMP_LINE", "").endswith(" ") else (words[-1] if len(words) > 1 else "")
    first = len(words) == 1 or (len(words) == 2 and typing)
    verbs = [v for v in VERBS if v.startswith(typing)] if first else []
    out = verbs + [w for w in buf.getvalue().split() if not w.startswith(HIDDEN)]
    print("\n".join(out))


def _quote_sweep_param(arg: str) -> str:
    """`hydra.sweeper.params.seed=5,6,7` replaces the study's own sweep of that key (fresh seeds without editing a
    file). Hydra refuses a sweep over its own config, so the list goes in as the string its sweeper parses."""
    key, eq, value = arg.partition("=")
    if eq and key.startswith("hydra.sweeper.params.") and "," in value and value[:1] not in "'\"":
        return f"{key}='{value}'"
    return arg


def _hydra_main() -> None:
    import hydra

    setup()
    app = hydra.main(version_base=None, config_path="pkg://mlrun.conf", config_name="config")(_job)
    app()


HELP = """mlrun: reproduce landmark ML papers, each from one command.

Usage:
  mlrun experiment=NAME [group=option] [key=value ...]   run one experiment
  mlrun -m experiment=NAME [key=a,b ...]                 run its study (the sweep it declares), or any sweep
  mlrun ls                                               list the experiments
  mlrun report [DIRS] [--format markdown|csv|json] [--out FILE]   gather results beside the papers' numbers
  mlrun validate                                         compose and check every experiment and preset
  mlrun reproduce [NAMES] [--readme README.md]           every CPU-scale experiment and study, then the report
  mlrun sync [DIRS]                                      upload finished offline W&B runs

Config groups (choose one with group=option):
{groups}
Common keys: seed=N  resume=<run dir>|auto  eval_only=true  trainer.max_steps=N  trainer.precision=bf16
             --no-cache (or cache.stages=false): recompute stages a study's arms would share
             hardware.nproc_per_node=N  logger.project=NAME  dataset.root=PATH

Examples:
  mlrun experiment=digits_classifier
  mlrun -m experiment=groupnorm_digits hydra/launcher=local
  mlrun experiment=realnvp_cifar hardware=gpu dataset.root=/data

More: docs/usage.md. Hydra's own flags: mlrun --hydra-help. Full tracebacks: HYDRA_FULL_ERROR=1.
"""


def groups() -> dict[str, list[str]]:
    """Config groups and options read off the shipped files (Hydra's own listing costs seconds)."""
    from importlib.resources import files

    root = files("mlrun.conf")
    out = {}
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        if d.is_dir() and d.name not in ("hydra", "__pycache__"):
            out[d.name] = sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))
    return out


def print_help() -> None:
    text = "".join(f"  {g}: {', '.join(opts)}\n" for g, opts in groups().items())
    print(HELP.format(groups=text))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--help"], ["-h"]):
        print_help()
        return
    if argv and argv[0] in VERBS:
        verb, rest = argv[0], argv[1:]
        if verb == "ls":
            from mlrun.report import ls_main

            sys.exit(ls_main(rest))
        if verb == "report":
            from mlrun.report import report_main

            sys.exit(report_main(rest))
        if verb == "validate":
            from mlrun.validate import validate_main

            sys.exit(validate_main(rest))
        if verb == "reproduce":
            from mlrun.reproduce import reproduce_main

            sys.exit(reproduce_main(rest))
        if verb == "sync":
            from mlrun.report import sync_main

            sys.exit(sync_main(rest))
    if any(a.startswith("query=") for a in argv) and ("-sc" in argv or "--shell-completion" in argv):
        _complete(argv)
        return
    argv = [_quote_sweep_param(a) for a in argv]
    if "--no-cache" in argv:  # the stage cache's off switch, as a flag
        argv = [a for a in argv if a != "--no-cache"] + ["cache.stages=false"]
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("MLRUN_STAMP", None)  # a new launch, a new stamp (job processes inherit it, never call main)
    _stamp()
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
