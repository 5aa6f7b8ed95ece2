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


def launch(run_dir: Path, nproc: int, hw: Any) -> None:
    """Start `nproc` workers on this node through torch's elastic launcher; they read run_dir's config."""
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
    elastic_launch(config, worker_entry)(str(run_dir))


def worker_entry(run_dir: str) -> None:
    """One rank: load the config composed by the launching process, and run."""
    from omegaconf import OmegaConf

    from mlrun.app import run_experiment

    cfg = OmegaConf.load(Path(run_dir) / ".hydra" / "resolved.yaml")
    run_experiment(cfg, Path(run_dir), worker=True)
