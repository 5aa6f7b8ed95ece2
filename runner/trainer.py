"""The one training loop. Every paper's loop runs here through the task protocol (`mlrun.task`).

The trainer owns: device placement, AMP, gradient accumulation and clipping, gradient sync across
ranks, LR schedules, evaluation cadence, best/last checkpoints with RNG states and data position,
resume, the NaN/inf guard, SIGINT/SIGTERM, progress and metrics. Per-step Python is kept light: losses
stay tensors and are synced to Python only at log points.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mlrun import distributed
from mlrun.errors import CheckpointError, ConfigError, Interrupted, NonFiniteLoss, describe
from mlrun.loggers import Loggers
from mlrun.progress import Progress
from mlrun.schema import STAGE_KEYS
from mlrun.task import DataModule, Task

log = logging.getLogger("mlrun")

CHECKPOINT_FORMAT = 1
ANNOUNCE_AFTER = 20
"""Steps after which a paper-scale run on a CPU estimates its duration."""
__all__ = ["Interrupted", "NonFiniteLoss", "Trainer", "request_stop", "seed_everything"]

_fitting: list[Trainer] = []  # the trainers inside `signals()` in this process


def _stop_code(reason: str | None) -> int:
    """A stop request as a number ranks can vote with: the signal's number, 1 for any other reason, 0 for none."""
    if reason is None:
        return 0
    return signal.Signals[reason].value if reason in signal.Signals.__members__ else 1


def _stop_reason(code: int) -> str:
    """What another rank's vote said."""
    if code > 1:
        return f"{signal.Signals(code).name} to another worker"
    return "a stop asked by another worker"


_pending_stop: list[str] = []  # a stop asked for before training began, for the next trainer (DDP set-up)


def request_stop(reason: str, remember: bool = False) -> bool:
    """Ask every trainer running in this process to checkpoint and stop after its current step, as SIGINT would
    (a sweep being stopped); False when none is running. With `remember`, a request made before training began
    stops the next trainer at its first step (under DDP, so that every rank stops together)."""
    for t in _fitting:
        t._stop_signal = t._stop_signal or reason
    if not _fitting and remember:
        _pending_stop.append(reason)
    return bool(_fitting)


# ---------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    state = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": [state[0], torch.from_numpy(state[1].astype(np.int64)), state[2], state[3], state[4]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------------------------------------- data


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Batches of indices from a permutation fixed by (seed, epoch), sharded by rank, startable mid-epoch.

    Because the order depends only on (seed, epoch), a resumed run sees exactly the batches an
    uninterrupted one would, without replaying the data.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = True, limit_batches: int | None = None) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last, self.limit = rank, world, drop_last, limit_batches
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.limit is not None:  # overfit: the same first batches every epoch
            return list(range(min(self.n, self.limit * self.batch_size * self.world)))[self.rank :: self.world]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = math.ceil(self.n / self.world)
        order += order[: per_rank * self.world - self.n]  # pad so every rank gets as many (as DistributedSampler)
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        local = len(self._indices()) if self.limit is not None else math.ceil(self.n / self.world)
        return local // self.batch_size if self.drop_last else math.ceil(local / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        for b in range(self.start, len(self)):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]


def move(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and not hasattr(batch, "_fields"):
        return type(batch)(move(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


def _first_item(items: list[Any]) -> Any:
    return items[0]


def _at_stage_start(position: dict[str, Any]) -> bool:
    """A checkpoint written at a stage's end points at the next stage's step 0 (a mid-stage one never does)."""
    return position.get("step", 0) == 0 and position.get("epoch", 0) == 0 and position.get("batch_in_epoch", 0) == 0




def start_stage(task: Task, spec: dict[str, Any], data: DataModule) -> None:
    """Hand the task its stage: `task.stage_args` is the stage's `args:` (what differs between the arms of a study
    that share earlier stages), then `on_stage_start`."""
    task.stage_args = dict(spec.get("args") or {})
    task.on_stage_start(spec.get("name", "train"), data)


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: DictConfig, device: torch.device, run_dir: Path, loggers: Loggers, seed: int,
                 dist: distributed.DistInfo | None = None, wandb_id: str | None = None) -> None:
        self.base_cfg = cfg
        self.device = device
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.loggers = loggers
        self.seed = seed
        self.dist = dist or distributed.DistInfo()
        self.wandb_id = wandb_id
        self.global_step = 0
        self.best: dict[str, Any] = {"value": None, "step": None}
        self.results: dict[str, float] = {}
        self._stop_signal: str | None = None
        self._t0 = time.perf_counter()
        self.nonfinite_skipped = 0
        self.channels_last = False
        self.cfg: Any = None  # the current stage's settings (a TrainerConf)
        self.stage_cache: Any = None  # an mlrun.cache.StageCache when stages may be reused (set by the runner)
        self.announce_duration = False  # a paper-scale run on a CPU says how long it will take (set by the runner)
        self._bad_evals = 0

    # ------------------------------------------------------------------ helpers
    def _loader(self, data: DataModule, split: str, stage: str | None, train: bool, cfg: DictConfig,
                batch_size: int | None) -> torch.utils.data.DataLoader:
        ds = data.dataset(split, stage)
        batched = batch_size is None
        bs = 1 if batched else batch_size
        collate = _first_item if batched else data.collate
        if train:
            sampler = ResumableBatchSampler(
                len(ds), bs, data.shuffle, self.seed, self.dist.rank, self.dist.world,
                data.drop_last and not batched, cfg.overfit_batches,
            )
        else:
            sampler = ResumableBatchSampler(len(ds), bs, False, 0, drop_last=False,
                                            limit_batches=cfg.limit_eval_batches)
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run (which
        # creates one mid-epoch) would see different dropout masks than an uninterrupted one.
        gen = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers, generator=gen,
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0 and train,
        )

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "auto":  # the paper-scale default: bf16 autocast on a GPU that has it, else full precision
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            precision = "bf16" if bf16 else "32"
        if precision in ("bf16", "bf16-mixed"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if precision in ("16", "16-mixed", "fp16"):
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask for a checkpoint and a stop after the current step; the process's own handlers are
        back when the block ends (the next job of an in-process sweep, a notebook)."""

        def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
            self._stop_signal = signal.Signals(signum).name

        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                old[s] = signal.signal(s, handler)
        if _pending_stop:
            self._stop_signal = self._stop_signal or _pending_stop.pop()
        _fitting.append(self)
        try:
            yield
        finally:
            _fitting.remove(self)
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, task: Task, optimizers: dict, schedulers: dict, scaler: Any, position: dict,
                        name: str = "last.pt") -> Path | None:
        if not self.dist.is_main:
            return None
        from mlrun.records import write_atomic

        self.loggers.flush()  # metrics.jsonl holds every row up to the checkpoint, so a resume loses none
        state = {
            "format": CHECKPOINT_FORMAT,
            "task": type(task).__qualname__,
            "model": task.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "position": dict(position, global_step=self.global_step),
            "best": self.best,
            "results": self.results,
            "wandb_id": self.wandb_id,
            "extra": task.extra_state(),
        }
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.ckpt_dir / name
        write_atomic(path, buf.getvalue())
        keep = int(self.cfg.keep_last) if self.cfg is not None else 0
        if name == "last.pt" and keep > 0:
            step_path = self.ckpt_dir / f"step-{self.global_step:08d}.pt"
            write_atomic(step_path, buf.getvalue())
            olds = sorted(self.ckpt_dir.glob("step-*.pt"))
            for old in olds[:-keep]:
                old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        torch.serialization.add_safe_globals([Counter])
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {path}") from None
        except Exception as e:  # noqa: BLE001 - truncated zip, pickle error, refused global...
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not an mlrun checkpoint (format {CHECKPOINT_FORMAT})")
        missing = [k for k in ("model", "position", "rng") if k not in state]
        pos = state.get("position")
        if not missing and not (isinstance(pos, dict) and {"stage_index", "step", "epoch", "batch_in_epoch",
                                                            "global_step"} <= set(pos)):
            missing = ["position.stage_index/step/epoch/batch_in_epoch/global_step"]
        if missing:
            raise CheckpointError(f"{path} is an incomplete mlrun checkpoint: no {', '.join(missing)}")
        return state

    @staticmethod
    def restore_model(task: Task, state: dict[str, Any], path: Path) -> None:
        if state.get("task") != type(task).__qualname__:
            raise CheckpointError(f"{path} holds a {state.get('task')}, not a {type(task).__qualname__}")
        own = task.state_dict()
        theirs = state["model"]
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        shapes = [k for k in set(own) & set(theirs) if tuple(own[k].shape) != tuple(theirs[k].shape)]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:5]}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:5]}")
            if shapes:
                k = shapes[0]
                parts.append(f"shape of {k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}")
            raise CheckpointError(f"{path} does not fit this model: " + "; ".join(parts))
        task.load_state_dict(theirs)
        task.load_extra_state(state.get("extra", {}))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, task: Task, data: DataModule, split: str, stage: str | None, cfg: DictConfig) -> dict:
        try:
            data.dataset(split, stage)
        except KeyError:
            return {}
        loader = self._loader(data, split, stage, False, cfg, data.eval_batch_size)
        was_training = task.training
        task.eval()
        # Evaluation never moves the training RNG, so evaluating more or less often changes nothing else.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), self.autocast(cfg.precision):
            metrics = task.evaluate(loader, split) or {}
        task.train(was_training)
        return {f"{split}/{k}": float(v) for k, v in metrics.items()}

    def _improved(self, value: float, cfg: DictConfig) -> bool:
        if self.best["value"] is None or math.isnan(self.best["value"]):
            return not math.isnan(value)
        return value > self.best["value"] if cfg.mode == "max" else value < self.best["value"]

    # ------------------------------------------------------------------ the loop
    def fit(self, task: Task, data: DataModule, stages: list[dict[str, Any]], resume: dict | None = None,
            progress: Progress | None = None) -> dict[str, float]:
        """Run every stage in order; return the final metrics (val of the last stage, then test).

        A checkpoint taken where a stage ended (the end of a finished run, say) continues that stage when the
        config now gives it more steps, exactly as if it had never stopped; a resume that would need fewer steps
        than the checkpoint already took, or other stages, is refused before any training.
        """
        progress = progress or Progress("none")
        task.to(self.device)
        if self.channels_last:
            task.to(memory_format=torch.channels_last)
        if self.base_cfg.compile:
            for child in task.children():  # in place: state_dict keys and checkpoints stay the same
                child.compile()
        task.train()
        first = 0
        if resume is not None:
            self.global_step = resume["position"]["global_step"]
            self.best = resume.get("best") or self.best
            self.results = dict(resume.get("results") or {})
            first, resume = self.resume_plan(data, stages, resume)
        if resume is not None and _at_stage_start(resume["position"]):
            # saved at the end of the previous stage: this stage starts fresh (its own optimizers), from the RNG
            # state the uninterrupted run had there, before the stage's own set-up draws from it
            set_rng_state(resume["rng"])
            resume = None
        for index, spec in enumerate(stages):
            if index < first:
                continue
            here = resume if (resume is not None and index == first) else None
            self._fit_stage(task, data, index, spec, here, progress)
        return self.results

    def _announce_duration(self, name: str, step: int, max_steps: int, seconds: float) -> None:
        """Once, after the first steps of a long run on a CPU: how long the stage will take on this machine."""
        per_step = seconds / max(step, 1)
        left = per_step * (max_steps - step)
        hours = left / 3600
        when = f"{hours:.1f} h" if hours >= 1 else f"{left / 60:.0f} min"
        log.warning("stage '%s': about %s more on this machine (%d steps at %.2f s a step)", name, when,
                    max_steps - step, per_step)

    def resume_plan(self, data: DataModule, stages: list[dict[str, Any]], resume: dict) -> tuple[int, dict]:
        """(stage to start at, checkpoint state to start it from), or a ConfigError naming what cannot be done."""
        pos = resume["position"]
        self.best = resume.get("best") or self.best  # a `max_steps_from_best` stage's length comes from it
        start, end = pos["stage_index"], pos.get("stage_end")
        if start > len(stages):
            raise ConfigError(f"the checkpoint has finished {start} stages; this config has {len(stages)}: "
                              f"{', '.join(s.get('name', 'train') for s in stages)}")
        if end is None and (start == len(stages) or pos["step"] == 0):
            return start, resume  # nothing of a stage to check (or a checkpoint older than `stage_end`)
        at, index = (end, start - 1) if end is not None else (pos, start)
        if at.get("name") not in (None, stages[index].get("name", "train")):
            raise ConfigError(f"the checkpoint stopped in stage '{at['name']}'; stage {index} of this config is "
                              f"'{stages[index].get('name', 'train')}'")
        _, length, _ = self._stage_length(data, stages[index])
        done = (end or pos)["step"]
        if length < done:
            raise ConfigError(f"stage '{stages[index].get('name', 'train')}' already ran {done} steps in the "
                              f"checkpoint; this config gives it {length}, and a resumed run cannot take steps back")
        if end is not None and length > done:  # a finished stage made longer: continue it where it ended
            return index, dict(resume, position=dict(pos, stage_index=index, step=end["step"], epoch=end["epoch"],
                                                     batch_in_epoch=end["batch_in_epoch"], stage_end=None))
        return start, resume

    def _stage_cfg(self, spec: dict[str, Any]) -> Any:
        """The stage's trainer settings as a plain TrainerConf (the hot loop reads them every step)."""
        from mlrun.schema import TrainerConf

        overrides = {k: v for k, v in spec.items() if k not in STAGE_KEYS}
        # Resolve against the whole run config first: keys such as ${dataset.batch_size} live outside `trainer`.
        base = self.base_cfg
        if OmegaConf.is_config(base):
            base = OmegaConf.to_container(base, resolve=True)
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConf), base, overrides))
        except Exception as e:  # noqa: BLE001 - an unknown or mistyped stage key
            raise ConfigError(f"stage '{spec.get('name', 'train')}': {describe(e)}") from None

    def _stage_length(self, data: DataModule, spec: dict[str, Any]) -> tuple[Any, int, int]:
        """(settings, optimizer steps, batches per epoch) of a stage, from its settings and its train split's size."""
        cfg = self._stage_cfg(spec)
        name, split = spec.get("name", "train"), spec.get("split", "train")
        bs = spec.get("batch_size", data.batch_size)
        batched = bs is None
        n = len(data.dataset(split, name))
        per_epoch = len(ResumableBatchSampler(n, 1 if batched else bs, False, self.seed, self.dist.rank,
                                              self.dist.world, data.drop_last and not batched, cfg.overfit_batches))
        if per_epoch == 0:
            raise ConfigError(f"stage '{name}': the {split} split has {n} items, fewer than one batch of {bs}")
        accumulate = max(int(cfg.accumulate), 1)
        steps = int(cfg.max_epochs * per_epoch // accumulate) if cfg.max_epochs is not None else int(cfg.max_steps)
        if spec.get("max_steps_from_best"):
            # Retrain for the length an earlier stage chose by its monitored metric (select on val, then train
            # on train+val for that many steps: ProtoNets' protocol).
            if self.best.get("stage_step") is None:
                raise ValueError(f"stage '{name}': max_steps_from_best needs an earlier stage with a monitor that "
                                 "was evaluated (trainer.monitor and eval_every in that stage)")
            steps = int(self.best["stage_step"])
        if cfg.step_limit is not None:
            steps = min(steps, int(cfg.step_limit))
        return cfg, steps, per_epoch

    def _fit_stage(self, task: Task, data: DataModule, index: int, spec: dict[str, Any], resume: dict | None,
                   progress: Progress) -> None:
        name = spec.get("name", "train")
        start_stage(task, spec, data)
        cfg, max_steps, per_epoch = self._stage_length(data, spec)
        self.cfg = cfg
        task.to(self.device)
        optimizers = task.configure_optimizers() or {}
        schedulers = {}
        if cfg.scheduler is not None:
            from hydra.utils import instantiate

            for k, opt in optimizers.items():
                schedulers[k] = instantiate(cfg.scheduler)(opt)
        scaler = None
        if cfg.precision in ("16", "16-mixed", "fp16"):
            scaler = torch.amp.GradScaler(self.device.type)

        if self.dist.enabled:
            distributed.broadcast_state(task)

        split = spec.get("split", "train")
        bs = spec.get("batch_size", data.batch_size)
        loader = self._loader(data, split, name, True, cfg, bs)
        sampler: ResumableBatchSampler = loader.batch_sampler
        accumulate = max(int(cfg.accumulate), 1)

        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        step, epoch, batch_in_epoch = 0, 0, 0
        if resume is not None:  # mid-stage (a checkpoint at a stage's end starts the next stage fresh: `fit`)
            for k, opt in optimizers.items():
                opt.load_state_dict(resume["optimizers"][k])
            for k, s in schedulers.items():
                s.load_state_dict(resume["schedulers"][k])
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            pos = resume["position"]
            step, epoch, batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
            # the losses summed since the last log point, so the next logged mean is the uninterrupted one's
            sums = {k: v.to(self.device) for k, v in (pos.get("log_sums") or {}).items()}
            counts = dict(pos.get("log_counts") or {})
            set_rng_state(resume["rng"])

        params = {k: [p for g in o.param_groups for p in g["params"]] for k, o in optimizers.items()}
        all_params = [p for p in task.parameters() if p.requires_grad]
        others = {}
        if len(optimizers) > 1:
            for k, ps in params.items():
                mine = {id(p) for p in ps}
                others[k] = [p for p in all_params if id(p) not in mine]

        position = {"stage_index": index, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "name": name}

        def save(name_: str = "last.pt") -> None:
            position.update(stage_index=index, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                            log_sums={k: v.detach().cpu().clone() for k, v in sums.items()}, log_counts=dict(counts))
            self.save_checkpoint(task, optimizers, schedulers, scaler, position, name_)

        def interrupted(code: int = 0) -> Interrupted:
            save()
            self.loggers.flush()
            why = self._stop_signal or _stop_reason(code)
            return Interrupted(f"{why} at step {step}: checkpoint saved")

        # Under DDP every rank must stop at the same step: each step's stop flag joins an all-reduce the next step
        # collects (asynchronous, on the CPU), so ranks agree within one step without a sync per step.
        vote = distributed.StopVote() if self.dist.enabled else None
        progress.start(name, max_steps, step)
        first_step, stage_t0 = step, time.perf_counter()
        profiler = self._profiler(cfg)
        anomaly = torch.autograd.detect_anomaly() if cfg.detect_anomaly else contextlib.nullcontext()
        micro = 0
        stop_early = False
        with anomaly, contextlib.closing(progress):  # the bar stops before any message, Ctrl-C's included
            while step < max_steps and not stop_early:
                if batch_in_epoch >= per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                sampler.set_position(epoch, batch_in_epoch)
                for batch in loader:
                    batch_in_epoch += 1
                    micro += 1
                    boundary = micro % accumulate == 0
                    batch = move(batch, self.device)
                    self._step(task, batch, cfg, optimizers, params, others, scaler, accumulate, boundary, sums,
                               counts, step)
                    if not boundary:
                        continue
                    for s in schedulers.values():
                        s.step()
                    step += 1
                    self.global_step += 1
                    if profiler is not None:
                        profiler.step()
                    progress.tick(step, sums, counts)
                    if self.announce_duration and step - first_step == ANNOUNCE_AFTER:
                        self._announce_duration(name, step, max_steps, time.perf_counter() - stage_t0)
                    done = step >= max_steps
                    if cfg.log_every and (step % cfg.log_every == 0 or done):
                        self._log(sums, counts, optimizers, name, step, epoch, progress)
                    if cfg.eval_every and step % cfg.eval_every == 0 and not done:
                        stop_early = self._eval_and_track(task, data, name, cfg, step, epoch, save)
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not done:
                        save()
                    stop_now = _stop_code(self._stop_signal)
                    if vote is not None:
                        stop_now = vote.step(stop_now)
                    if stop_now:
                        raise interrupted(stop_now)
                    if done or stop_early:
                        break
        if vote is not None and (code := vote.close()):
            raise interrupted(code)
        if profiler is not None:
            self._finish_profiler(profiler)
        progress.close()
        self._eval_and_track(task, data, name, cfg, step, epoch, save, final=True)
        position.update(stage_index=index + 1, step=0, epoch=0, batch_in_epoch=0, log_sums={}, log_counts={},
                        stage_end={"name": name, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch})
        position.pop("name")
        self.save_checkpoint(task, optimizers, schedulers, scaler, position)
        if self.stage_cache is not None and self.dist.is_main:
            from mlrun.records import METRICS

            self.loggers.flush()  # the cached history must hold every row up to this stage's end
            self.stage_cache.store(index, self.ckpt_dir / "last.pt", self.run_dir / METRICS, self.run_dir)

    def _step(self, task: Task, batch: Any, cfg: DictConfig, optimizers: dict, params: dict, others: dict,
              scaler: Any, accumulate: int, boundary: bool, sums: dict, counts: dict, step: int) -> bool:
        gen = task.training_step(batch)
        ok = True
        while True:
            with self.autocast(cfg.precision):
                try:
                    opt_name, loss = next(gen)
                except StopIteration:
                    break
            if loss is not None:
                detached = loss.detach().float()
                key = f"{opt_name}_loss"
                if key in sums:
                    sums[key] += detached
                    counts[key] += 1
                else:
                    sums[key], counts[key] = detached.clone(), 1
                if loss.requires_grad:
                    held = others.get(opt_name, [])
                    saved = [p.grad for p in held]
                    for p in held:
                        p.grad = None
                    (scaler.scale(loss / accumulate) if scaler else loss / accumulate).backward()
                    for p, g in zip(held, saved):
                        p.grad = g
            if boundary and opt_name in optimizers:
                ok = self._optimizer_step(opt_name, optimizers[opt_name], params[opt_name], cfg, scaler, loss,
                                          step) and ok
        for k, v in getattr(task, "_step_logs", {}).items():
            v = v.detach().float()
            if k in sums:
                sums[k] += v
                counts[k] += 1
            else:
                sums[k], counts[k] = v.clone(), 1
        if hasattr(task, "_step_logs"):
            task._step_logs.clear()
        if boundary and scaler is not None:
            scaler.update()
        return ok

    def _optimizer_step(self, name: str, opt: torch.optim.Optimizer, params: list, cfg: DictConfig, scaler: Any,
                        loss: torch.Tensor | None, step: int) -> bool:
        if self.dist.enabled:
            distributed.average_gradients(params)
        if scaler is not None:
            scaler.unscale_(opt)
        finite = None
        if cfg.clip_grad_norm is not None:
            finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(params, float(cfg.clip_grad_norm)))
        if scaler is None:
            # The loss is checked every step (one scalar); gradients when clipping computes their norm anyway.
            # A gradient that turns non-finite under a finite loss makes the next step's loss non-finite.
            if loss is not None:
                lf = torch.isfinite(loss.detach()).all()
                finite = lf if finite is None else finite & lf
            if finite is not None and not bool(finite):
                value = float(loss.detach().float().mean()) if loss is not None else float("nan")
                if cfg.on_nan == "skip":
                    self.nonfinite_skipped += 1
                    opt.zero_grad(set_to_none=True)
                    return False
                raise NonFiniteLoss(
                    f"non-finite {'loss' if loss is not None and not math.isfinite(value) else 'gradient'} "
                    f"for optimizer '{name}' at step {step + 1} (loss={value}); the last good checkpoint is kept. "
                    "Set trainer.on_nan=skip to drop such steps instead."
                )
            opt.step()
        else:
            scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        return True

    def _log(self, sums: dict, counts: dict, optimizers: dict, stage: str, step: int, epoch: int,
             progress: Progress) -> None:
        keys = sorted(sums)
        means = torch.stack([sums[k].float().reshape(()) / counts[k] for k in keys]) if keys else torch.zeros(0)
        if self.dist.enabled and keys:
            means = distributed.mean_over_ranks(means)  # the logged loss is the global batch's
        values = dict(zip(keys, means.tolist()))  # the one sync per log interval
        sums.clear()
        counts.clear()
        record: dict[str, Any] = {"stage": stage, "step": step, "global_step": self.global_step, "epoch": epoch,
                                  "time": round(time.perf_counter() - self._t0, 3)}
        record.update({f"train/{k}": v for k, v in values.items()})
        for k, o in optimizers.items():
            record[f"lr/{k}"] = o.param_groups[0]["lr"]
        if self.dist.is_main:
            self.loggers.log(record)
        progress.update(step, {k: v for k, v in values.items()})

    def _eval_and_track(self, task: Task, data: DataModule, stage: str, cfg: DictConfig, step: int, epoch: int,
                        save: Any, final: bool = False) -> bool:
        metrics = self.evaluate(task, data, "val", stage, cfg)
        if not metrics:
            return False
        record = {"stage": stage, "step": step, "global_step": self.global_step, "epoch": epoch,
                  "time": round(time.perf_counter() - self._t0, 3), **metrics}
        if self.dist.is_main:
            self.loggers.log(record)
        self.results.update(metrics)
        if cfg.monitor and cfg.monitor not in metrics:
            hint = " (the monitor sees the val split only)" if not cfg.monitor.startswith("val/") else ""
            raise ConfigError(f"trainer.monitor={cfg.monitor} is not among the metrics of the first evaluation of "
                              f"stage '{stage}': {', '.join(sorted(metrics))}{hint}")
        if cfg.monitor:
            value = metrics[cfg.monitor]
            if self._improved(value, cfg):
                self.best = {"value": value, "step": self.global_step, "stage": stage, "stage_step": step}
                self._bad_evals = 0
                save("best.pt")
            else:
                self._bad_evals += 1
                if cfg.patience is not None and self._bad_evals >= cfg.patience and not final:
                    log.info("early stop: %s did not improve for %d evaluations", cfg.monitor, self._bad_evals)
                    return True
        return False

    # ------------------------------------------------------------------ profiling
    def _profiler(self, cfg: DictConfig) -> Any:
        if not cfg.profile_steps:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        prof = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=int(cfg.profile_steps)),
                       record_shapes=False)
        prof.start()
        return prof

    def _finish_profiler(self, prof: Any) -> None:
        prof.stop()
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        try:
            prof.export_chrome_trace(str(out / "trace.json"))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        except (RuntimeError, AssertionError) as e:  # too few steps for the schedule
            log.warning("profiler recorded nothing (%s); run more steps than profile_steps + 2", e)
            return
        (out / "top_ops.txt").write_text(table)
        log.info("profile: %s\n%s", out / "trace.json", table)
