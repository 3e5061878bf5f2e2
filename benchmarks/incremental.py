"""An incremental refit against a full one: +100 models on a 5,000-model sine zoo.

    python benchmarks/incremental.py --out runs/bench [--base 5000 --new 100 --test 100]

Pre-trains ``base + new`` real sine nets (each from its own init on its own points), fits the
first ``base``, then fits all of them twice: in full, and incrementally from the first fit
(``MetaModel.fit(zoo, probe, previous=...)``). Prints the time of each and their 0-shot nRMSE on
unseen test tasks; writes incremental.json. The pre-trained weights are kept in
``OUT/incremental_zoo.safetensors`` and reused by the next run of the same size (the pre-training
takes about 11 min at the default size). Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedfuse.meta_model import MetaModel
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--base", type=int, default=5000)
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--test", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    n = args.base + args.new
    tasks = sine.sample_tasks(n, 0)
    t0 = time.perf_counter()
    cache = args.out / "incremental_zoo.safetensors"
    cached = load_file(cache) if cache.exists() else {}
    reused = cached.get("weights") is not None and cached["weights"].shape[0] == n
    if reused:
        weights = cached["weights"]
    else:
        weights = sine.pretrain(tasks, 1)
        save_file({"weights": weights.contiguous()}, cache)
    zoo = ModelZoo(sine.SPEC, weights, tasks.tau, [f"sine-{i:05d}" for i in range(n)], [200] * n)
    row: dict = {"base": args.base, "new": args.new, "pretrain_s": time.perf_counter() - t0, "pretrain_reused": reused}
    test = sine.sample_tasks(args.test, 7919)
    score = lambda m: float(sine.nrmse(sine.SPEC, m.personalize(test.tau).mean, test).mean())  # noqa: E731
    fits = {}
    for name, data, previous in (("first", zoo.subset(range(args.base)), None), ("full", zoo, None),
                                 ("incremental", zoo, "first")):
        t0 = time.perf_counter()
        fits[name] = MetaModel(seed=0).fit(data, probe=sine.probe_grid(), previous=fits.get(previous))
        row[f"{name}_s"], row[f"{name}_nrmse"] = time.perf_counter() - t0, score(fits[name])
        print(json.dumps({k: v for k, v in row.items() if k.startswith(name)}), flush=True)
    row["incremental"] = fits["incremental"].refit_
    row["time_ratio"] = row["incremental_s"] / row["full_s"]
    row["quality_ratio"] = row["incremental_nrmse"] / row["full_nrmse"]
    (args.out / "incremental.json").write_text(json.dumps(row, indent=2))
    print(f"full {row['full_s']:.1f} s, nRMSE {row['full_nrmse']:.4f}; incremental {row['incremental_s']:.1f} s "
          f"({row['time_ratio']:.1%}), nRMSE {row['incremental_nrmse']:.4f} ({row['quality_ratio']:.3f}x)")


if __name__ == "__main__":
    main()
