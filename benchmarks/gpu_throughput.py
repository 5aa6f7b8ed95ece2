"""Samples/s of the paper-scale models with and without each GPU option, and the data loader's own ceiling.

Models come from the experiments' own configs (composed exactly as `mlrun experiment=X` would), so the benchmark
measures what users run: Real NVP on CIFAR-10 shapes, ResNet-50 with GN and with BN, BN-Inception. Options:
bf16 autocast, channels_last, torch.compile. The loader ceiling decodes and augments ImageNet-sized JPEGs with
N workers, so a run can be shown not to be input-bound (samples/s of the loader > samples/s of the model).

    python benchmarks/gpu_throughput.py                       # on a CUDA machine
    python benchmarks/gpu_throughput.py --device cpu --batch 2 --steps 2 --models realnvp_cifar   # wiring check
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

MODELS = {  # name: (experiment, overrides, input shape (C, H, W))
    "realnvp_cifar": ("realnvp_cifar", [], (3, 32, 32)),
    "resnet50_gn": ("groupnorm_imagenet", ["model.net.norm=gn"], (3, 224, 224)),
    "resnet50_bn": ("groupnorm_imagenet", ["model.net.norm=bn"], (3, 224, 224)),
    "bn_inception": ("batchnorm_imagenet", [], (3, 224, 224)),
}
OPTIONS = {
    "fp32": dict(bf16=False, channels_last=False, compile=False),
    "bf16": dict(bf16=True, channels_last=False, compile=False),
    "bf16+channels_last": dict(bf16=True, channels_last=True, compile=False),
    "bf16+channels_last+compile": dict(bf16=True, channels_last=True, compile=True),
}


def build(experiment: str, overrides: list[str], device: torch.device):
    from hydra.utils import instantiate

    from mlrun import compose

    cfg = compose(experiment, [*overrides, "logger=none"])
    task = instantiate(cfg.model, _convert_="object").to(device)
    from mlrun.task import Task

    Task.on_stage_start(task, cfg.stages[0].name if cfg.stages else "train", None)  # no data-dependent set-up
    return task, task.configure_optimizers()


def samples_per_s(name: str, opts: dict, batch: int, steps: int, device: torch.device) -> float:
    experiment, overrides, shape = MODELS[name]
    task, optimizers = build(experiment, overrides, device)
    if opts["channels_last"]:
        task.to(memory_format=torch.channels_last)
    if opts["compile"]:
        for child in task.children():
            child.compile()
    x = torch.rand(batch, *shape, device=device)
    if opts["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if opts["bf16"] else contextlib.nullcontext()

    def step() -> None:
        gen = task.training_step((x, y))
        while True:
            with amp:
                try:
                    opt_name, loss = next(gen)
                except StopIteration:
                    break
            if loss is not None:
                loss.backward()
            optimizers[opt_name].step()
            optimizers[opt_name].zero_grad(set_to_none=True)

    for _ in range(3 if opts["compile"] else 1):
        step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def loader_ceiling(batch: int, workers: int, images: int = 256) -> float:
    """ImageNet-style JPEG decode + RandomResizedCrop + flip through ImageFolderData's own transforms."""
    from mlrun.datasets.vision import ImageFolderData, write_imagefolder_fixture

    with tempfile.TemporaryDirectory() as d:
        write_imagefolder_fixture(d, classes=4, per_class=images // 4, size=400)
        data = ImageFolderData(root=d, batch_size=batch)
        loader = torch.utils.data.DataLoader(data.dataset("train"), batch_size=batch, shuffle=True,
                                             num_workers=workers, pin_memory=torch.cuda.is_available(),
                                             persistent_workers=workers > 0, drop_last=True)
        for _ in loader:  # warm-up: start the workers
            break
        t, n = time.perf_counter(), 0
        for xb, _ in loader:
            n += len(xb)
        return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--options", nargs="*", default=list(OPTIONS))
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"{'model':16s} " + " ".join(f"{o:>28s}" for o in args.options))
    for name in args.models:
        cells = []
        for o in args.options:
            try:
                cells.append(f"{samples_per_s(name, OPTIONS[o], args.batch, args.steps, device):22.1f} img/s")
            except Exception as e:  # noqa: BLE001 - one option failing (e.g. compile) must not hide the rest
                cells.append(f"{'failed: ' + type(e).__name__:>28s}")
        print(f"{name:16s} " + " ".join(f"{c:>28s}" for c in cells))
    print(f"loader ceiling (ImageFolder JPEG 400px, {args.workers} workers, batch {args.batch}): "
          f"{loader_ceiling(args.batch, args.workers):.1f} img/s")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
