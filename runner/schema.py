"""Typed schemas for mlrun's own config groups, registered in Hydra's ConfigStore.

The primary config extends `MlrunConf`, so every group merged into `trainer`, `hardware` or `logger` is
checked against these dataclasses: a typo (`trainer.max_step=3`) or a wrong type (`trainer.max_steps=abc`)
fails while Hydra composes,
before any work, with one line naming the key. Model and dataset stay free-form: they are `_target_`
calls checked against their signatures by `mlrun validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class TrainerConf:
    max_steps: int = 1000
    """Optimizer steps per stage (a step is one `training_step` call). Ignored when max_epochs is set."""
    max_epochs: int | None = None
    """If set, the stage runs this many passes over its train split instead of max_steps."""
    step_limit: int | None = None
    """Caps every stage's steps, whatever the stage or epochs say (debug presets, smoke runs)."""
    log_every: int = 50
    eval_every: int = 0
    """Evaluate on the val split every N steps (0: only at the end of each stage)."""
    checkpoint_every: int = 0
    """Save checkpoints/last.pt every N steps (0: only at the end and on SIGINT/SIGTERM)."""
    keep_last: int = 0
    """Also keep the last K step-numbered checkpoints (0: only last.pt)."""
    precision: str = "32"
    """32, bf16, 16 or auto (16 uses a GradScaler; bf16 and 16 are autocast; auto: bf16 on a CUDA device that
    supports it, else 32)."""
    accumulate: int = 1
    clip_grad_norm: float | None = None
    scheduler: Any = None
    """A partial LR scheduler (`_target_` + `_partial_: true`), applied to every optimizer, stepped per step."""
    on_nan: str = "stop"
    """stop: end the run naming the step and loss, keeping the last good checkpoint; skip: drop the step."""
    monitor: str | None = None
    """A metric such as val/acc: keep checkpoints/best.pt and report test metrics from it."""
    mode: str = "max"
    patience: int | None = None
    """Stop a stage after this many evaluations without improvement of `monitor`."""
    progress: str = "auto"
    """auto (a bar on a terminal, plain lines elsewhere), bar, plain or none."""
    num_workers: int = 0
    pin_memory: bool = False
    compile: bool = False
    deterministic: bool = True
    detect_anomaly: bool = False
    profile_steps: int = 0
    """Trace this many steps with torch.profiler into the run dir (0: off)."""
    limit_eval_batches: int | None = None
    overfit_batches: int | None = None
    """Train on the first N batches of the train split only, repeated."""


@dataclass
class HardwareConf:
    device: str = "cpu"
    """cpu, cuda or auto."""
    threads: int | None = None
    """torch intra-op threads for this process (None: 1 for CPU-scale experiments, torch's default otherwise)."""
    nproc_per_node: int = 1
    """More than 1 starts that many data-parallel workers (gloo on CPU, NCCL on GPU)."""
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = "localhost:0"
    rdzv_backend: str = "c10d"
    backend: str | None = None
    start_method: str = "spawn"
    channels_last: bool = False


@dataclass
class LoggerConf:
    wandb: bool = False
    project: str = "mlrun"
    entity: str | None = None
    mode: str | None = None
    """online, offline or disabled; None: online when logged in, else offline."""
    tags: list[str] = field(default_factory=list)
    """Extra W&B tags; every run is also tagged with its experiment, `arxiv:<id>` and `scale:<scale>`."""
    log_model: str = "false"
    """Upload checkpoints as W&B artifacts when a run completes: false, best, last or all (every checkpoint the
    run kept), each with the run's results.json and config (offline: recorded for `mlrun sync`)."""
    init_timeout: float = 60.0
    """Seconds W&B may take to start online before the run goes on with local records only."""
    csv: bool = False
    tensorboard: bool = False


@dataclass
class CacheConf:
    stages: str = "auto"
    """Reuse an earlier run's end-of-stage checkpoint when the stage's inputs match (mlrun.cache): auto (inside
    a multirun), true or false (`mlrun --no-cache ...`)."""
    dir: str | None = None
    """Where cached stages live (default: `.stage_cache` beside the sweep dir)."""


@dataclass
class MlrunConf:
    """The top level. `model` and `dataset` are `_target_` calls chosen by the experiment."""

    model: Any = MISSING
    dataset: Any = MISSING
    trainer: TrainerConf = field(default_factory=TrainerConf)
    hardware: HardwareConf = field(default_factory=HardwareConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    cache: CacheConf = field(default_factory=CacheConf)
    experiment_name: str = "unnamed"
    label: str = "run"
    """Names this run's condition inside a study (runs that differ only by seed share a label)."""
    seed: int = 0
    resume: str | None = None
    """A run dir to continue from, or `auto` (the newest unfinished run of this experiment)."""
    eval_only: bool = False
    stages: list[Any] = field(default_factory=list)
    """Named phases run in order in one run dir; each may override trainer keys."""
    paper: Any = field(default_factory=dict)
    claims: list[Any] = field(default_factory=list)
    study: Any = None
    objective: str | None = None
    """The metric returned to a Hydra sweeper (Optuna), e.g. test/acc."""
    debug: Any = field(default_factory=dict)
    scale: str = "cpu"
    """cpu (a miniature on packaged data) or paper (the paper's dataset and settings)."""
    part_of: str | None = None
    """The study (experiment name) this single run is one arm of: `mlrun reproduce` runs the study, not this."""
    smoke: Any = None
    """How CI smoke-runs this experiment in seconds: {overrides: [...], fixture: dotted.path.to.writer}.
    The fixture writer gets a folder, writes a tiny dataset there in the real format, and the smoke run
    gets `dataset.root=<that folder>`."""


def register() -> None:
    """Store the schema that conf/config.yaml extends."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="mlrun_schema", node=MlrunConf)
