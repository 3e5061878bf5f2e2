"""Fit the 200-model sine zoo twice in one run: assignments in process, then over Ray.

Usage: python benchmarks/fit_parallel.py [--models 200] [--chunk 25] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedfuse.meta_model import MetaModel
from fedfuse.parallel import serial_map
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo
from fedfuse_server.ray_map import RayMap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tasks = sine.sample_tasks(args.models, 0)
    zoo = ModelZoo(sine.SPEC, sine.pretrain(tasks, 1), tasks.tau,
                   [str(i) for i in range(args.models)])
    probe = sine.probe_grid()
    results = {}
    ray_map = RayMap(force=True)
    t0 = time.perf_counter()
    ray_map._ensure_ray()
    results["ray_start_s"] = time.perf_counter() - t0
    models = {}
    for name, pmap in (("serial", serial_map), ("ray", ray_map)):
        t0 = time.perf_counter()
        models[name] = MetaModel(pmap=pmap, chunk_size=args.chunk, seed=0).fit(zoo, probe=probe)
        results[f"fit_{name}_s"] = time.perf_counter() - t0
    same = all(torch.equal(a, b) for a, b in zip(models["serial"].perms_, models["ray"].perms_))
    results |= {"models": args.models, "chunk": args.chunk, "identical_alignment": same,
                "ratio_ray_over_serial": results["fit_ray_s"] / results["fit_serial_s"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit_parallel.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
