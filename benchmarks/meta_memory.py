"""Memory of one meta-gradient against the number of inner steps K: MAML, first-order MAML, iMAML (iMAML Figure 2).

Measures, for one task, the peak bytes of tensors autograd saves for backward (`saved_tensors_hooks`, any device)
and, on a GPU, `torch.cuda.max_memory_allocated` above the starting allocation, plus the seconds per meta-gradient.
The task is random data of the chosen shape (memory does not depend on the values), by default the shape of a
training task of the preset (its shots and queries per class: MAML's Omniglot protocol, 1 query per class for 1-shot;
15 on miniImageNet): the query set's share of the bytes sets how steeply they grow with K.

    python benchmarks/meta_memory.py                       # Omniglot shape: 28x28, 64 filters, 5-way 1-shot
    python benchmarks/meta_memory.py --preset digits       # the CPU miniature's learner and training task
    python benchmarks/meta_memory.py --preset miniimagenet --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch

from mlrun.models.meta import IMAML, MAML, ConvLearner, memory_growth

PRESETS = {  # in_channels, image_size, channels, downsample, training queries per class
    "digits": (1, 8, 16, "pool", 1),
    "omniglot": (1, 28, 64, "stride", 1),
    "miniimagenet": (3, 84, 32, "pool", 15),
}


def sweep(preset: str, ks: list[int], n_way: int, shots: int, queries: int, device: str, repeats: int
          ) -> list[dict[str, float | str | int]]:
    in_ch, size, channels, down, _ = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(n_way * shots, in_ch, size, size, generator=g)
    xq = torch.rand(n_way * queries, in_ch, size, size, generator=g)
    ys, yq = torch.arange(n_way).repeat_interleave(shots), torch.arange(n_way).repeat_interleave(queries)

    def adam(p):
        return torch.optim.Adam(p, lr=1e-3)

    def learner():
        torch.manual_seed(0)
        return ConvLearner(in_ch, channels, n_way, size, downsample=down)

    methods = {
        "maml": MAML(learner(), adam, inner_lr=0.1),
        "fomaml": MAML(learner(), adam, inner_lr=0.1, first_order=True),
        "imaml": IMAML(learner(), adam, inner_lr=0.1, lam=2.0, cg_steps=5),
    }
    rows = []
    for name, model in methods.items():
        model.to(device)
        model._probe = ((xs, ys), (xq, yq))
        model.memory_profile([ks[0]])  # warm-up (allocator, kernels)
        for k in ks:
            best: dict[str, float] = {}
            for _ in range(repeats):
                prof = model.memory_profile([k])
                best = prof if not best else {m: min(v, best[m]) for m, v in prof.items()}
            rows.append({"method": name, "K": k, "saved_mib": best[f"saved_mib_k{k}"],
                         "seconds": best[f"seconds_k{k}"], "cuda_mib": best.get(f"cuda_mib_k{k}", float("nan"))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="omniglot")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=None,
                    help="query images per class (default: the preset's training tasks, 1 or 15)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="keep the fastest of this many timings")
    ap.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.queries is None:
        args.queries = PRESETS[args.preset][4]
    rows = sweep(args.preset, args.ks, args.n_way, args.shots, args.queries, args.device, args.repeats)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.preset}: {args.n_way}-way {args.shots}-shot, {args.queries} queries per class, device {args.device}")
    print("| method | K | saved MiB | x of K=1 | s / meta-gradient | CUDA peak MiB |")
    print("|---|---|---|---|---|---|")
    first = {r["method"]: r["saved_mib"] for r in rows if r["K"] == args.ks[0]}
    for r in rows:
        cuda = "-" if r["cuda_mib"] != r["cuda_mib"] else f"{r['cuda_mib']:.1f}"
        print(f"| {r['method']} | {r['K']} | {r['saved_mib']:.2f} | {r['saved_mib'] / first[r['method']]:.1f} | "
              f"{r['seconds']:.3f} | {cuda} |")
    print("\n| method | max / min over K | per-step increment: max / min | smallest increment / first K |")
    print("|---|---|---|---|")
    for method in first:
        g = memory_growth({r["K"]: r["saved_mib"] for r in rows if r["method"] == method})
        print(f"| {method} | {g['saved_max_over_min']:.2f} | {g['saved_step_spread']:.3f} | "
              f"{g['saved_step_over_first']:.3f} |")


if __name__ == "__main__":
    main()
