"""BSO's per-step cost: cross-entropy, BSO and ConBSO training steps (forward + backward) on bso_prose's model.

    python benchmarks/bso_step.py [--old PATH] [--reps 3]

Measures this code on padded random batches of 64 and on length-bucketed batches (as bso_prose trains), and
with `--old PATH` another version of models/bso.py on the same padded batches (e.g. the code before issue 22:
`git show b9c790f:models/bso.py > /tmp/bso_old.py`). Variants alternate within each repetition, so machine load
hits them alike; the minimum over repetitions is reported, in ms per 64 sentences. Also times decoding the 500
test sentences under the word-ordering constraint at beams 1, 5 and 10. One torch thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from types import ModuleType

import torch

from mlrun.datasets.prose import ProseWordOrder
from mlrun.models import bso as new


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bso_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="another models/bso.py to compare on the same padded batches")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = ProseWordOrder(batch_size=64)
    ds = data.dataset("train")
    g = torch.Generator().manual_seed(0)
    padded = [data.collate([ds[i] for i in torch.randperm(len(ds), generator=g)[:64].tolist()]) for _ in range(12)]
    bt = ProseWordOrder(batch_size=64, bucket=True).dataset("train")
    bucketed = [bt[i] for i in torch.randperm(len(bt), generator=g)[:12].tolist()]
    per_b = sum(b["tgt"].shape[0] for b in bucketed) / len(bucketed)

    torch.manual_seed(0)
    net = new.Seq2Seq(1004, 1004, emb=128, hidden=128, layers=1, dropout=0.2).train()
    opt = torch.optim.Adagrad([{"params": p, "lr": lr} for p, lr in zip(net.layer_groups(), (0.02, 0.01, 0.2))])
    for _ in range(10):  # some pretraining, so the beams look like a trained model's
        for b in bucketed:
            opt.zero_grad()
            new.xent_loss(net, b).backward()
            opt.step()
    old = load(args.old) if args.old else None
    old_net = None
    if old is not None:
        old_net = old.Seq2Seq(1004, 1004, emb=128, hidden=128, layers=1, dropout=0.2).train()
        old_net.load_state_dict(net.state_dict())

    def once(fn, model, batches, per) -> float:
        t0 = time.process_time()
        for b in batches:
            model.zero_grad()
            fn(b).backward()
        return (time.process_time() - t0) / len(batches) * 64 / per

    def old_xent(b):  # the old task's step (it averaged over words; the cost is the same)
        memory, state = old_net.encode(b["src"], b["src_len"])
        tgt = b["tgt"]
        feats, _ = old_net.teacher_force(memory, state, tgt, old_net.dropout_masks(*tgt.shape, tgt.device))
        return torch.nn.functional.cross_entropy(old_net.scores(feats).flatten(0, 1), tgt.flatten(), ignore_index=0)

    cases = {"cross-entropy": (old_xent, lambda b: new.xent_loss(net, b))}
    for name, label in (("all", "BSO"), ("permutation", "ConBSO")):
        for k in (2, 6):
            cases[f"{label}, K = {k}"] = (
                (lambda b, k=k, name=name: old.bso_loss(old_net, b, k, old.SUCCESSORS[name]())[0]) if old else None,
                lambda b, k=k, name=name: new.bso_loss(net, b, k, new.SUCCESSORS[name]())[0])
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.reps):
        for case, (f_old, f_new) in cases.items():
            runs = [("new/padded", f_new, net, padded, 64), ("new/bucketed", f_new, net, bucketed, per_b)]
            if old is not None:
                runs.insert(0, ("old/padded", f_old, old_net, padded, 64))
            for variant, fn, model, batches, per in runs:
                best[case, variant] = min(best.get((case, variant), 1e9), once(fn, model, batches, per))
    variants = (["old/padded"] if old else []) + ["new/padded", "new/bucketed"]
    print("| step (ms per 64 sentences) | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for case in cases:
        print(f"| {case} | " + " | ".join(f"{best[case, v] * 1000:.1f}" for v in variants) + " |")

    test = data.dataset("test")
    tb = [data.collate([test[i] for i in range(j, min(j + 250, len(test)))]) for j in range(0, len(test), 250)]
    for scoring in ("logprob", "last"):
        out: dict[str, float] = {}
        for _ in range(2):
            for name, mod, model in (("new", new, net), ("old", old, old_net)):
                if mod is None:
                    continue
                model.eval()
                t0 = time.process_time()
                for b in tb:
                    for k in (1, 5, 10):
                        mod.beam_search(model, b["src"], b["src_len"], k, b["src_len"] + 5, mod.Permutation(), scoring)
                out[name] = min(out.get(name, 1e9), time.process_time() - t0)
                model.train()
        print(f"decode 500 test sentences, constrained, K = 1, 5, 10, {scoring} scoring: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in out.items()))


if __name__ == "__main__":
    main()
