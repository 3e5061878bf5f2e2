"""A personal assistant's recommendation model, warm-started on a new user's phone.

    python simulations/examples/assistant.py --store runs/assistant [--users 100] [--new 5]

1. The store holds a MovieLens zoo: each of ``--users`` users trained its own user model (an
   embedding against the public item embeddings) on its phone and uploaded it once (simulated
   here); the server fitted the meta-model. A store that already has one is reused.
2. The initializer service (Ray Serve, ``fedfuse serve``) serves that store on 127.0.0.1.
3. Each new user's phone, a plain Python process without Flower, posts its descriptor (its
   ratings of the context movies, embedded) over HTTP, receives its user model, adapts it on its
   first ratings and reports RMSE on its held-back ratings next to a cold start trained on the
   same ratings. Its ratings never leave it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

from fedfuse import wire
from fedfuse.runconfig import RunConfig
from fedfuse.tasks import DeviceConfig, LocalData, TaskFamily, get_family
from fedfuse_client.local import cold_start
from fedfuse_client.warmstart import warm_start
from fedfuse_server import phases
from fedfuse_server.serve import serving
from fedfuse_server.store import ModelStore

FAMILY = "movielens"


def build_store(root: Path, users: int, new: int, seed: int = 0, fit_rounds: int = 3,
                fit_steps: int = 100) -> ModelStore:
    """Every zoo user's own model uploaded once, then the fit; as the server's phases would."""
    family, store = get_family(FAMILY), ModelStore(root)
    cfg = DeviceConfig(users, new, seed, shots=10)
    for i in range(users):
        data = family.simulated_device(i, cfg)
        weights = family.train(data, seed + i)
        store.put(wire.Upload(data.client_id, family.arch, weights, data.tau, len(data.y)))
    phases.fit(store, RunConfig(family=FAMILY, seed=seed, fit_rounds=fit_rounds, fit_steps=fit_steps,
                                parallel="serial"), progress=False)
    return store


def phone(url: str, family: TaskFamily, data: LocalData) -> dict[str, Any]:
    """One new user's phone: its warm start from the service next to its own cold start."""
    start = time.perf_counter()
    warm = warm_start(url, family, data, timeout=10.0, retries=2)
    seconds = time.perf_counter() - start
    cold = cold_start(family, data)[1]
    return {"user": data.client_id, "ratings": len(data.y), "source": warm.source, "uncertainty": warm.uncertainty,
            "rmse_warm": float(family.evaluate(warm.weights[None], data)[0]),
            "rmse_cold": float(family.evaluate(cold, data)[0]), "seconds": seconds, "reason": warm.reason}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="the store folder (created and fitted if empty)")
    parser.add_argument("--users", type=int, default=100, help="zoo users that uploaded a model")
    parser.add_argument("--new", type=int, default=5, help="new users' phones")
    parser.add_argument("--shots", type=int, default=10, help="ratings a new user has given on its phone")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    family = get_family(FAMILY)
    if ModelStore(args.store).meta_model_entry() is None:
        print(f"fitting a meta-model on {args.users} users' uploads into {args.store} ...", flush=True)
        build_store(args.store, args.users, args.new, args.seed)
    cfg = DeviceConfig(0, args.new, args.seed, args.shots)  # devices 0.. are new users, none in the zoo
    with serving(args.store, port=args.port) as url:
        print(f"initializer service at {url}", flush=True)
        rows = [phone(url, family, family.simulated_device(j, cfg)) for j in range(args.new)]
    print(f"\n{'user':16s} {'ratings':>7s} {'source':10s} {'uncert.':>7s} {'RMSE warm':>9s} {'RMSE cold':>9s} {'HTTP+adapt':>10s}")
    for r in rows:
        print(f"{r['user']:16s} {r['ratings']:7d} {r['source']:10s} {r['uncertainty']:7.3f} {r['rmse_warm']:9.3f} "
              f"{r['rmse_cold']:9.3f} {r['seconds']:9.2f}s" + (f"  ({r['reason']})" if r["reason"] else ""))
    warm, cold = (statistics.mean(r[key] for r in rows) for key in ("rmse_warm", "rmse_cold"))
    print(f"{'mean':16s} {'':7s} {'':10s} {'':7s} {warm:9.3f} {cold:9.3f}")
    if any(math.isnan(r["uncertainty"]) for r in rows):
        print("some phones fell back to a cold start: the service was not usable (see the reasons)")
    return rows


if __name__ == "__main__":
    main()
