"""Performance and scale of the fit, the alignment and the personalization path, in one run.

    python benchmarks/perf.py all --out runs/bench [--sizes 200,1000,5000,20000]

Each fit runs in a fresh process so that its peak memory (max RSS) is its own. Zoos larger than
the 200 pre-trained sine nets are synthetic: permuted, slightly perturbed copies of those nets
with jittered descriptors (each still a function-preserving re-ordering of a trained net). The
[784-100-10] zoo is 40 randomly initialized nets with 10-bit digit-subset descriptors (the fit's
cost does not depend on what the weights learned). Writes perf.json, perf.md, fit_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedfuse.alignment import align_zoo
from fedfuse.architectures import MLPSpec
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import serial_map
from fedfuse.tasks import sine
from fedfuse.records import to_records
from fedfuse.wire import FLAT, upload
from fedfuse.zoo import ModelZoo

MNIST_SPEC = MLPSpec((784, 100, 10))


def base_sine_zoo(out: Path) -> ModelZoo:
    path = out / "base_sine_zoo.safetensors"
    if path.exists():
        return ModelZoo.load(path)
    tasks = sine.sample_tasks(200, 0)
    zoo = ModelZoo(sine.SPEC, sine.pretrain(tasks, 1), tasks.tau, [f"sine-{i:05d}" for i in range(200)])
    zoo.save(path)
    return zoo


def synthetic_sine_zoo(base: ModelZoo, n: int, seed: int = 0) -> ModelZoo:
    if n <= len(base):
        return base.subset(range(n))
    gen = torch.Generator().manual_seed(seed)
    src = torch.arange(n) % len(base)
    perms = [torch.stack([torch.randperm(100, generator=gen) for _ in range(n)])]
    from fedfuse.alignment import apply_perms

    weights = apply_perms(base.spec, base.weights[src], perms)
    weights = weights + 0.01 * torch.randn(weights.shape, generator=gen)
    tau = base.tau[src] + 0.02 * torch.randn(n, 2, generator=gen)
    return ModelZoo(base.spec, weights, tau, [f"syn-{i:06d}" for i in range(n)])


def mnist_sized_zoo(n: int = 40, seed: int = 0) -> ModelZoo:
    gen = torch.Generator().manual_seed(seed)
    tau = torch.zeros(n, 10)
    for i in range(n):
        tau[i, torch.randperm(10, generator=gen)[: 2 + i % 4]] = 1.0
    return ModelZoo(MNIST_SPEC, MNIST_SPEC.init(n, gen), tau, [f"mnist-{i:03d}" for i in range(n)])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one fit in this process --------------------------------------------------------------------
def fit_once(kind: str, n: int, out: Path) -> dict:
    torch.set_num_threads(2)
    zoo = synthetic_sine_zoo(base_sine_zoo(out), n) if kind == "sine" else mnist_sized_zoo(n)
    probe = sine.probe_grid() if kind == "sine" else None
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    model = MetaModel(seed=0).fit(zoo, probe=probe)
    wall = time.perf_counter() - t0
    path = out / f"meta_{kind}_{n}.safetensors"
    model.save(path)
    tau = zoo.tau[:1]
    model.personalize(tau)  # warm-up
    lat = []
    for i in range(100):
        t = time.perf_counter()
        model.personalize(zoo.tau[i % len(zoo) : i % len(zoo) + 1]).mean
        lat.append((time.perf_counter() - t) * 1000)
    return {"kind": kind, "n": n, "d": zoo.spec.num_weights, "fit_s": wall, "rounds": model.n_rounds_,
            "peak_rss_mb": peak_rss_mb(), "rss_before_fit_mb": rss0,
            "model_file_mb": path.stat().st_size / 2**20,
            "initializer_ms_median": statistics.median(lat),
            "initializer_ms_p95": sorted(lat)[94]}


# -- alignment rounds: serial vs Ray ------------------------------------------------------------
def alignment_rounds(sizes: list[int], out: Path) -> list[dict]:
    from fedfuse_server.ray_map import RayMap

    torch.set_num_threads(2)
    base = base_sine_zoo(out)
    ray_map = RayMap(force=True)
    t0 = time.perf_counter()
    ray_map._ensure_ray()
    ray_start = time.perf_counter() - t0
    rows = []
    for n in sizes:
        zoo = synthetic_sine_zoo(base, n, seed=1)
        gen = torch.Generator().manual_seed(2)
        mean = (zoo.weights + 0.05 * torch.randn(zoo.weights.shape, generator=gen))[:, None]
        var = torch.full_like(mean, 0.01)
        ident = [torch.arange(100).repeat(n, 1)]
        row = {"n": n, "ray_start_s": ray_start}
        for name, pmap, chunk in (("serial", serial_map, 256), ("ray", ray_map, 256)):
            t = time.perf_counter()
            align_zoo(zoo.spec, zoo.weights, mean, var, ident, pmap, chunk)
            row[f"{name}_s"] = time.perf_counter() - t
        row["ray_speedup"] = row["serial_s"] / row["ray_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    import ray

    ray.shutdown()
    return rows


def upload_bytes(spec: MLPSpec, rounds: list[int]) -> dict:
    """Bytes of one upload message's content as Flower serializes it, against synchronized
    training that sends the weights both ways every round."""
    content = to_records(upload("client-000001", spec, torch.zeros(spec.num_weights), [0.0] * 2, 200))
    ours = len(content["arrays"][FLAT].data) + len(json.dumps(dict(content["config"])).encode())
    return {"d": spec.num_weights, "ours_bytes_once": ours,
            **{f"synchronized_{r}_rounds_bytes": r * spec.num_weights * 4 * 2 for r in rounds}}


def plot_scaling(rows: list[dict], path: Path) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["n"] for r in rows], dtype=float)
    t = np.array([r["fit_s"] for r in rows])
    slope, icpt = np.polyfit(np.log10(n), np.log10(t), 1)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(n, t, "o-", label="measured")
    ax.loglog(n, 10 ** (icpt + slope * np.log10(n)), "--", label=f"fit: slope {slope:.2f}")
    ax.set(xlabel="models in the zoo (n)", ylabel="fit wall time (s)", title="fit time vs zoo size (sine, d=301)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return float(slope)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["all", "fit", "align"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--sizes", default="200,1000,5000,20000")
    ap.add_argument("--kind", default="sine")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.what == "fit":
        print(json.dumps(fit_once(args.kind, args.n, args.out)))
        return
    if args.what == "align":
        alignment_rounds(sizes, args.out)
        return
    base_sine_zoo(args.out)
    fits = []
    for kind, n in [("sine", s) for s in sizes] + [("mnist", 40)]:
        res = subprocess.run([sys.executable, __file__, "fit", "--kind", kind, "--n", str(n),
                              "--out", str(args.out)], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            fits.append({"kind": kind, "n": n, "error": res.stderr[-500:]})
            continue
        fits.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(fits[-1]), flush=True)
    aligns = alignment_rounds(sizes, args.out)
    sine_rows = [r for r in fits if r["kind"] == "sine" and "fit_s" in r]
    slope = plot_scaling(sine_rows, args.out / "fit_scaling.png") if len(sine_rows) > 1 else None
    result = {"fits": fits, "alignment_rounds": aligns, "fit_time_slope": slope,
              "upload": [upload_bytes(sine.SPEC, [100, 1000]), upload_bytes(MNIST_SPEC, [100, 1000])]}
    (args.out / "perf.json").write_text(json.dumps(result, indent=2))
    lines = ["| zoo | n | d | fit (s) | rounds | peak RSS (MB) | initializer median / p95 (ms) | model file (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in fits:
        if "fit_s" in r:
            lines.append(f"| {r['kind']} | {r['n']} | {r['d']} | {r['fit_s']:.1f} | {r['rounds']} | "
                         f"{r['peak_rss_mb']:.0f} | {r['initializer_ms_median']:.2f} / {r['initializer_ms_p95']:.2f} | "
                         f"{r['model_file_mb']:.2f} |")
    lines += ["", f"fit time slope on log-log (sine): {slope:.2f}" if slope is not None else "", "",
              "| n | alignment round serial (s) | Ray (s) | speed-up |", "|---|---|---|---|"]
    lines += [f"| {a['n']} | {a['serial_s']:.2f} | {a['ray_s']:.2f} | {a['ray_speedup']:.2f} |" for a in aligns]
    lines += ["", "| model | d | ours: bytes uploaded once | synchronized, 100 rounds | 1000 rounds |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {u['d']} | {u['ours_bytes_once']} | {u['synchronized_100_rounds_bytes']} | "
              f"{u['synchronized_1000_rounds_bytes']} |" for name, u in zip(("sine", "mnist"), result["upload"])]
    (args.out / "perf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
