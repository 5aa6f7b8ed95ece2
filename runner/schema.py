"""Typed schemas for mlrun's own config groups, registered in Hydra's ConfigStore, and what each key allows.

The primary config extends `MlrunConf`, so every group merged into `trainer`, `hardware` or `logger` is
checked against these dataclasses: a typo (`trainer.max_step=3`) or a wrong type (`trainer.max_steps=abc`)
fails while Hydra composes, before any work, with one line naming the key. What types cannot say (choices, ranges,
keys added with `+`, the keys of `stages`, interpolations that do not resolve) `check` says, at the start of every
run, in one line naming the key, the value and what is allowed. Model and dataset stay free-form: they are
`_target_` calls checked against their signatures by `mlrun validate`; `check` holds them only to rules every
experiment shares (a batch size is a positive integer, a learning rate a finite number >= 0).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from mlrun.errors import ConfigError


def choice(default: Any, *options: str) -> Any:
    """A key that takes one of `options` (None too when the default is None)."""
    return field(default=default, metadata={"choices": options})


def at_least(default: Any, low: float, above: bool = False) -> Any:
    """A number >= low (> low with `above`), finite; None too when the default is None."""
    return field(default=default, metadata={"min": low, "above": above})


@dataclass
class TrainerConf:
    max_steps: int = at_least(1000, 1)
    """Optimizer steps per stage (a step is one `training_step` call). Ignored when max_epochs is set."""
    max_epochs: int | None = at_least(None, 1)
    """If set, the stage runs this many passes over its train split instead of max_steps."""
    step_limit: int | None = at_least(None, 1)
    """Caps every stage's steps, whatever the stage or epochs say (debug presets, smoke runs)."""
    log_every: int = at_least(50, 0)
    eval_every: int = at_least(0, 0)
    """Evaluate on the val split every N steps (0: only at the end of each stage)."""
    checkpoint_every: int = at_least(0, 0)
    """Save checkpoints/last.pt every N steps (0: only at the end and on SIGINT/SIGTERM)."""
    keep_last: int = at_least(0, 0)
    """Also keep the last K step-numbered checkpoints (0: only last.pt)."""
    precision: str = choice("32", "32", "bf16", "16", "auto", "bf16-mixed", "16-mixed", "fp16")
    """32, bf16, 16 or auto (16 uses a GradScaler; bf16 and 16 are autocast; auto: bf16 on a CUDA device that
    supports it, else 32)."""
    accumulate: int = at_least(1, 1)
    clip_grad_norm: float | None = at_least(None, 0, above=True)
    scheduler: Any = None
    """A partial LR scheduler (`_target_` + `_partial_: true`), applied to every optimizer, stepped per step."""
    on_nan: str = choice("stop", "stop", "skip")
    """stop: end the run naming the step and loss, keeping the last good checkpoint; skip: drop the step."""
    monitor: str | None = None
    """A metric such as val/acc: keep checkpoints/best.pt and report test metrics from it."""
    mode: str = choice("max", "max", "min")
    patience: int | None = at_least(None, 1)
    """Stop a stage after this many evaluations without improvement of `monitor`."""
    progress: str = choice("auto", "auto", "bar", "plain", "none")
    """auto (a bar on a terminal, plain lines elsewhere), bar, plain or none."""
    num_workers: int = at_least(0, 0)
    pin_memory: bool = False
    compile: bool = False
    deterministic: bool = True
    detect_anomaly: bool = False
    profile_steps: int = at_least(0, 0)
    """Trace this many steps with torch.profiler into the run dir (0: off)."""
    limit_eval_batches: int | None = at_least(None, 1)
    overfit_batches: int | None = at_least(None, 1)
    """Train on the first N batches of the train split only, repeated."""


@dataclass
class HardwareConf:
    device: str = "cpu"
    """cpu, cuda or auto."""
    threads: int | None = at_least(None, 1)
    """torch intra-op threads for this process (None: 1 for CPU-scale experiments, torch's default otherwise)."""
    nproc_per_node: int = at_least(1, 1)
    """More than 1 starts that many data-parallel workers (gloo on CPU, NCCL on GPU)."""
    nnodes: int = at_least(1, 1)
    node_rank: int = at_least(0, 0)
    rdzv_endpoint: str = "localhost:0"
    rdzv_backend: str = "c10d"
    backend: str | None = choice(None, "gloo", "nccl", "mpi")
    start_method: str = choice("spawn", "spawn", "fork", "forkserver")
    channels_last: bool = False


@dataclass
class LoggerConf:
    wandb: bool = False
    project: str = "mlrun"
    entity: str | None = None
    mode: str | None = choice(None, "online", "offline", "disabled")
    """online, offline or disabled; None: online when logged in, else offline."""
    tags: list[str] = field(default_factory=list)
    """Extra W&B tags; every run is also tagged with its experiment, `arxiv:<id>` and `scale:<scale>`."""
    log_model: str = choice("false", "false", "False", "best", "last", "all")
    """Upload checkpoints as W&B artifacts when a run completes: false, best, last or all (every checkpoint the
    run kept), each with the run's results.json and config (offline: recorded for `mlrun sync`)."""
    init_timeout: float = at_least(60.0, 0, above=True)
    """Seconds W&B may take to start online before the run goes on with local records only."""
    csv: bool = False
    tensorboard: bool = False


@dataclass
class CacheConf:
    stages: str = choice("auto", "auto", "true", "false", "True", "False")
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
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
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
    scale: str = choice("cpu", "cpu", "paper")
    """cpu (a miniature on packaged data) or paper (the paper's dataset and settings)."""
    part_of: str | None = None
    """The study (experiment name) this single run is one arm of: `mlrun reproduce` runs the study, not this."""
    smoke: Any = None
    """How CI smoke-runs this experiment in seconds: {overrides: [...], fixture: dotted.path.to.writer}.
    The fixture writer gets a folder, writes a tiny dataset there in the real format, and the smoke run
    gets `dataset.root=<that folder>`."""


STAGE_KEYS = ("name", "batch_size", "split", "args", "max_steps_from_best")
"""Keys of a stage spec that are not trainer settings: the rest override `trainer` for that stage."""
GROUPS = {"trainer": TrainerConf, "hardware": HardwareConf, "logger": LoggerConf, "cache": CacheConf}
NAME = re.compile(r"^[^/\x00]{1,200}$")
DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps|auto)$")


def check(cfg: Any) -> None:
    """Raise one ConfigError line for the first thing in a composed config a run cannot do as asked (and say how
    many more there are): an interpolation that does not resolve, a key added with `+` under a typed group, a
    value outside its choices or range, a stage key the trainer does not have."""
    problems = problems_of(cfg)
    if problems:
        more = f" (and {len(problems) - 1} more: {', '.join(p.split('=')[0] for p in problems[1:4])})" \
            if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def problems_of(cfg: Any) -> list[str]:
    from omegaconf import OmegaConf

    from mlrun.errors import describe

    raw = OmegaConf.to_container(cfg, resolve=False)
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve, or resolves to a wrong type
        key = getattr(e, "full_key", None) or "?"
        return [f"{key}={_at(raw, key)}: {describe(e).split(chr(10))[0]}"]
    out: list[str] = []
    for group, schema in GROUPS.items():
        out += _check_group(c.get(group) or {}, schema, group)
    hw = c.get("hardware") or {}
    if isinstance(hw.get("node_rank"), int) and isinstance(hw.get("nnodes"), int) and hw["node_rank"] >= hw["nnodes"]:
        out.append(f"hardware.node_rank={hw['node_rank']}: expected an integer from 0 to hardware.nnodes - 1 "
                   f"({hw['nnodes'] - 1})")
    if isinstance(hw.get("device"), str) and not DEVICE.match(hw["device"]):
        out.append(f"hardware.device={hw['device']}: expected cpu, cuda, cuda:N, mps or auto")
    top = {f.name: f for f in fields(MlrunConf)}
    for key in ("seed", "scale"):
        out += _check_value(c.get(key), top[key], key)
    for key in ("experiment_name", "label"):
        if not (isinstance(c.get(key), str) and NAME.match(c[key])):
            out.append(f"{key}={_short(c.get(key))}: expected a name of 1 to 200 characters without '/' "
                       "(it names the run's folder)")
    trainer_keys = [f.name for f in fields(TrainerConf)]
    stages = c.get("stages") or []
    if not isinstance(stages, list):
        out.append(f"stages={_short(stages)}: expected a list of stages such as [{{name: train, max_steps: 100}}]")
        stages = []
    for i, st in enumerate(stages):
        where = f"stages.{i}"
        if not isinstance(st, dict):
            out.append(f"{where}={_short(st)}: expected a mapping such as {{name: train, max_steps: 100}}")
            continue
        for k, v in st.items():
            if k in STAGE_KEYS:
                continue
            if k not in trainer_keys:
                out.append(f"{where}.{k}={_short(v)}: a stage takes trainer keys and {', '.join(STAGE_KEYS)}"
                           f"{_did_you_mean(k, [*trainer_keys, *STAGE_KEYS])}")
            else:
                out += _check_value(v, {f.name: f for f in fields(TrainerConf)}[k], f"{where}.{k}")
        if "batch_size" in st and st["batch_size"] is not None and not _int_at_least(st["batch_size"], 1):
            out.append(f"{where}.batch_size={_short(st['batch_size'])}: expected a positive integer or null")
    for group in ("dataset", "model"):
        out += _shared_rules(c.get(group), group)
    return out


def _check_group(node: Any, schema: type, group: str) -> list[str]:
    if not isinstance(node, dict):
        return []
    known = {f.name: f for f in fields(schema)}
    out = []
    for k, v in node.items():
        if k not in known:  # `+trainer.foo=1` gets past Hydra's struct check
            out.append(f"{group}.{k}={_short(v)}: {group} has no key {k!r}{_did_you_mean(k, list(known))}")
        else:
            out += _check_value(v, known[k], f"{group}.{k}")
    return out


def _check_value(value: Any, f: Any, key: str) -> list[str]:
    meta = f.metadata
    if value is None:
        return []
    if "choices" in meta:
        options = [str(o) for o in meta["choices"]]
        if str(value) not in options:
            return [f"{key}={_short(value)}: expected one of {', '.join(options)}"
                    + (" or null" if f.default is None else "") + _did_you_mean(str(value), options)]
    if "min" in meta:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return [f"{key}={_short(value)}: expected a finite number"]
        low, high, above = meta["min"], meta.get("max"), meta.get("above", False)
        kind = "an integer" if f.type in ("int", "int | None") else "a number"
        if high is not None and not low <= value <= high:
            return [f"{key}={_short(value)}: expected {kind} from {low} to {high}"]
        if value < low or (above and value == low):
            return [f"{key}={_short(value)}: expected {kind} {'>' if above else '>='} {low}"
                    + (" or null" if f.default is None else "")]
    if f.name == "scheduler" and not (isinstance(value, dict) and "_target_" in value):
        return [f"{key}={_short(value)}: expected a partial `_target_` mapping such as "
                "{_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 100}"]
    return []


def _shared_rules(node: Any, path: str) -> list[str]:
    """Keys every model and dataset means the same way: batch sizes are positive integers (null: items are
    batches), learning rates finite and >= 0."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{path}.{k}"
            if k in ("batch_size", "eval_batch_size") and v is not None and not _int_at_least(v, 1):
                out.append(f"{where}={_short(v)}: expected a positive integer or null")
            elif k == "lr" and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                                or v < 0):
                out.append(f"{where}={_short(v)}: expected a finite learning rate >= 0")
            else:
                out += _shared_rules(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _shared_rules(v, f"{path}.{i}")
    return out


def _int_at_least(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close and close[0] != word else ""


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _at(raw: Any, key: str) -> str:
    node = raw
    for part in str(key).split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return "?"
    return _short(node)


def register() -> None:
    """Store the schema that conf/config.yaml extends."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="mlrun_schema", node=MlrunConf)
