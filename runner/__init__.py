"""mlrun: reproduce landmark ML papers, each from one command.

Python API for notebooks (the same composition as the CLI)::

    from mlrun import compose, run
    cfg = compose("digits_classifier", ["trainer.max_steps=100", "logger=none"])
    results = run(cfg)                      # trains in-process, returns results.json's content
    results = run("digits_classifier", ["seed=1"], run_dir="outputs/notebook/seed1")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["compose", "run", "__version__"]


def compose(experiment: str | None = None, overrides: list[str] | None = None) -> Any:
    """Compose `experiment` with Hydra overrides exactly as `mlrun experiment=... key=value` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from mlrun.cli import setup

    setup()
    overrides = list(overrides or [])
    if experiment is not None:
        overrides = [f"experiment={experiment}", *overrides]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module="mlrun.conf", version_base=None, job_name="mlrun"):
        return hydra_compose(config_name="config", overrides=overrides)


def run(experiment: Any, overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one experiment in this process; return its results (also written to run_dir/results.json).

    `experiment` is a name or a config from `compose`. The run dir defaults to outputs/api/<time>_<id>_<name>.
    """
    from omegaconf import OmegaConf

    from mlrun.app import run_experiment
    from mlrun.loggers import redact

    cfg = compose(experiment, overrides) if isinstance(experiment, str) else experiment
    if run_dir is None:
        import secrets
        import time

        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path("outputs/api") / f"{stamp}_{secrets.token_hex(3)}_{cfg.experiment_name}"
    config = OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=False)))
    return run_experiment(cfg, Path(run_dir), files={".hydra/config.yaml": config})
