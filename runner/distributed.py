"""Data parallelism that serves every loop shape, and the compose-once launch.

mlrun does not wrap tasks in DistributedDataParallel: a task's step may yield two losses for two
optimizers (GAN), or set `.grad` itself (iMAML), which DDP's forward-hook bookkeeping does not follow.
The trainer instead averages each optimizer's gradients across ranks right before that optimizer
steps (one flattened all-reduce per step), and starts every rank from rank 0's parameters and buffers.
The arithmetic is DDP's: with equal local batches, the averaged gradient is the gradient of the global
batch mean.

Launch: the `mlrun` process composes the config once, saves it resolved in the run dir, and starts its
workers with torch's elastic launcher; every worker loads that file, so no rank re-composes Hydra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_process_group(device: str, backend: str | None = None) -> DistInfo:
    """Join the group torch's launcher set up through the environment (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return current()
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    dist.init_process_group(backend=backend)
    info = current()
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


def broadcast_state(module: torch.nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Make every rank's parameters (and buffers) equal to rank `src`'s."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    tensors = [t for t in tensors if t.is_floating_point() or not buffers_only]
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors([t.data for t in tensors])
    dist.broadcast(flat, src)
    for t, v in zip(tensors, torch._utils._unflatten_dense_tensors(flat, [t.data for t in tensors])):
        t.data.copy_(v)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of `params` in one flattened buffer; missing grads count as zero."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world)
    for g, v in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(v)


def replicas_identical(module: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (elementwise max over ranks equals min)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def all_agree(flag: bool) -> bool:
    """True on every rank only if `flag` is true on every rank (so all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item()) == 0


class StopVote:
    """All ranks agree to stop at the same step, whichever rank a signal reached, without a sync per step.

    Each step every rank adds its stop flag to an asynchronous all-reduce over a CPU (gloo) group and reads the
    previous step's sum, which has long arrived: all ranks learn of a stop at the same step, one step after any
    rank asked. The GPU stream is never synchronised for it.
    """

    def __init__(self) -> None:
        self.group = None if dist.get_backend() == "gloo" else _cpu_group()
        self._pending: tuple[Any, torch.Tensor] | None = None

    def step(self, code: int) -> int:
        """Vote `code` (0: go on; else why to stop, a signal number, say); return the previous step's outcome, the
        largest code any rank voted (0: every rank goes on)."""
        agreed = self._collect()
        if agreed:  # every rank stops now: no new collective, so none waits on a rank that has exited
            return agreed
        flag = torch.tensor([int(code)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def close(self) -> int:
        """The last vote's outcome (call where the loop ends, on every rank)."""
        return self._collect()

    def _collect(self) -> int:
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()
        return int(flag.item())


_CPU_GROUP: Any = None


def _cpu_group() -> Any:
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def launch(run_dir: Path, nproc: int, hw: Any, config_yaml: str) -> None:
    """Start `nproc` workers on this node through torch's elastic launcher, each given the resolved config."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=hw.nnodes,
        max_nodes=hw.nnodes,
        nproc_per_node=nproc,
        rdzv_backend=hw.rdzv_backend,
        rdzv_endpoint=hw.rdzv_endpoint,
        run_id=f"mlrun-{Path(run_dir).name}",
        max_restarts=0,
        start_method=hw.start_method,
        monitor_interval=0.5,
    )
    elastic_launch(config, worker_entry)(str(run_dir), config_yaml)


def worker_entry(run_dir: str, config_yaml: str) -> None:
    """One rank: run the config composed by the launching process (handed over in memory: the copy saved in the
    run dir has its secrets redacted). Exits 130 when interrupted, 1 on a failure, without a traceback: rank 0's
    results.json and the launching process say what happened."""
    import sys

    from omegaconf import OmegaConf

    from mlrun.app import RunFailed, run_experiment
    from mlrun.errors import describe

    cfg = OmegaConf.create(config_yaml)
    try:
        run_experiment(cfg, Path(run_dir), worker=True)
    except RunFailed as e:
        if os.environ.get("MLRUN_TRACEBACK"):  # HYDRA_FULL_ERROR=1: every rank's traceback
            import traceback

            traceback.print_exception(e.__cause__ or e)
        sys.exit(e.code)
    except Exception as e:  # noqa: BLE001 - before the run could record anything
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"mlrun: error: {describe(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
