"""What the MNIST uploads know together: how accurate any combination of them can be.

    python benchmarks/upload_ceiling.py --out runs/upload_ceiling [--seeds 0 1 2] [--bench runs/bench/mnist]

Not a speed figure. Per seed's bench zoo (the same 160 uploads `fedfuse bench mnist` trains),
per K: (1) the uploads' K-way accuracy on their own tasks (MNIST test images of their digits);
(2) for each unseen test task, every upload's logits on that task's test images combined by
class-subset coupling (each upload knows its classes' log-odds up to a per-image shift, so one
10-way log-odds vector per image is fitted to all of them by least squares), weighting every
upload alike or by the square of how many digits it shares with the task. The combination sees
the test images themselves, which no server has: a reference for what the uploads together
show at 0 shots without a device's labels (one combiner, not a proof that none does better). With ``--bench`` (a `fedfuse bench
mnist` output) the bench's ours, ours distilled and MAML rows are put next to it.
Writes upload_ceiling.json and upload_ceiling.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from fedfuse.datasets import kway_accuracy, load_mnist
from fedfuse.tasks import mnist
from fedfuse_sim.mnist import MnistConfig, pretrained_zoo

WEIGHTINGS = ("every upload alike", "shared digits squared")
BENCH_ROWS = (("ours", "0-shot"), ("ours, distilled", "0-shot"), ("MAML, own SGD", "1-shot"),
              ("MAML, own SGD", "10-shot"))


def coupled_logits(logits: Tensor, classes: Tensor, weight: Tensor) -> Tensor:
    """One log-odds vector per input ``(N, C)`` from models that each score only their own
    ``classes`` ``(n, C)`` (bool) with ``logits`` ``(n, N, C)``: the least-squares ``g`` with
    ``sum_m weight_m |P_m (z_m - g)|^2`` smallest, ``P_m`` centring over model m's classes (its
    logits mean nothing outside them, and inside only up to a shift). ``g`` is centred."""
    m = classes.double()
    n_cls = m.sum(1).clamp_min(1.0)
    # (sum_m w_m P_m) g = sum_m w_m P_m z_m; P_m = diag(m) - m m^T / |T_m|
    gram = torch.diag((weight.double()[:, None] * m).sum(0)) - torch.einsum("n,nc,nd->cd", weight.double() / n_cls, m, m)
    z = logits.double() * m[:, None]
    centred = z - (z.sum(-1, keepdim=True) / n_cls[:, None, None]) * m[:, None]
    rhs = torch.einsum("n,nic->ic", weight.double(), centred)
    g = torch.linalg.lstsq(gram, rhs.T).solution.T  # gram is singular along the constant vector
    return g - g.mean(1, keepdim=True)


def seed_rows(cfg: MnistConfig, seed: int, data: tuple[Tensor, Tensor, Tensor, Tensor]) -> list[dict]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    train, test = mnist.sample_tasks(seed, cfg.n_train, cfg.n_test)
    t0 = time.perf_counter()
    _, weights = pretrained_zoo(cfg, seed, train, x_train, y_train)
    print(f"seed {seed}: {len(train)} uploads trained in {time.perf_counter() - t0:.0f} s")
    classes = torch.stack([t.tau for t in train]).bool()
    own = mnist.accuracy(weights, train, x_test, y_test)
    rows = [{"seed": seed, "K": len(t.digits), "kind": "uploads on their own tasks", "accuracy": 100 * float(a)}
            for t, a in zip(train, own)]
    with torch.no_grad():
        for task in test:
            x, y = mnist.task_data(task, x_test, y_test, None, 0)
            logits = torch.stack([mnist.SPEC.forward(w, x) for w in weights])
            shared = (classes & task.tau.bool()).sum(1).double()
            for name, weight in zip(WEIGHTINGS, (torch.ones_like(shared), shared**2)):
                acc = kway_accuracy(coupled_logits(logits, classes, weight).float(), y, list(task.digits))
                rows.append({"seed": seed, "K": len(task.digits), "kind": f"coupled uploads, {name}",
                             "accuracy": 100 * float(acc)})
    return rows


def table(rows: list[dict], bench: dict | None) -> list[str]:
    ks = sorted({r["K"] for r in rows})
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lines = ["| | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for kind in kinds:
        means = [torch.tensor([r["accuracy"] for r in rows if r["kind"] == kind and r["K"] == k]).mean() for k in ks]
        lines.append(f"| {kind} | " + " | ".join(f"{float(v):.2f}" for v in means) + " |")
    for method, shots in BENCH_ROWS if bench else ():
        cells = [bench["summary"].get(method, {}).get(f"K={k} {shots}") for k in ks]
        lines.append(f"| bench: {method}, {shots} | " + " | ".join("—" if c is None else f"{c[0]:.2f}" for c in cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bench", type=Path, help="a `fedfuse bench mnist` output folder (its summary.json)")
    parser.add_argument("--smoke", action="store_true", help="the bench's smoke sizes (CI)")
    args = parser.parse_args()
    bench = json.loads((args.bench / "summary.json").read_text()) if args.bench else None
    cfg = MnistConfig.smoke() if args.smoke else MnistConfig()
    data = (*load_mnist("train"), *load_mnist("test"))
    rows = [r for seed in args.seeds for r in seed_rows(cfg, seed, data)]
    lines = table(rows, bench)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upload_ceiling.md").write_text("\n".join(lines) + "\n")
    (args.out / "upload_ceiling.json").write_text(json.dumps({"seeds": args.seeds, "smoke": args.smoke,
                                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
