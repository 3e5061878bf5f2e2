"""The fit at scale: time and memory vs zoo size, the fast hyperparameter steps against the full
ones, and Ray against in-process, each fit in a fresh process.

    python benchmarks/scale.py --sizes 5000,20000,50000,100000 [--quality-n 20000] [--ray-n 20000]

Zoos are perf.py's synthetic sine zoos: permuted, slightly perturbed copies of 200 pre-trained
nets with jittered descriptors. Per size: fit wall time, peak RSS of the fit's process tree
(the fit, and for the Ray fit the local cluster's processes too), rounds, and the seconds spent
inside the parallel map (the alignment fan-out: `chain_align` and every round's realignment).
The log-log slope of fit time vs n is fitted over all sizes given.

Quality (``--quality-n``): the default fit (``gp_blocks=64``: each hyperparameter step sees 64
random PIC blocks) and the full-data fit (``gp_blocks=None``) of the same zoo, scored by 0-shot
nRMSE on the same 200 held-out sine tasks (drawn from the benchmark's task distribution with
their own seed; the zoo's 200 distinct functions cover that domain).

Ray (``--ray-n``): the same fit with the alignment on a local two-worker Ray cluster (`ray
start --head`, joined through RAY_ADDRESS) against the in-process fit of that size. The cluster's
processes are this script's descendants (it is their subreaper) and are stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from fleet import TreeSampler, become_subreaper, free_port, slope, stop_tree
from perf import base_sine_zoo, peak_rss_mb, synthetic_sine_zoo

from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.tasks import sine

T = TypeVar("T")
R = TypeVar("R")
TEST_SEED = 424_242  # held-out tasks, disjoint from the base zoo's seed 0


class TimedMap:
    """A parallel map that also adds up the seconds spent in it: the fit's alignment work."""

    def __init__(self, pmap: ParallelMap) -> None:
        self.pmap, self.seconds, self.calls = pmap, 0.0, 0

    def __call__(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        start = time.perf_counter()
        try:
            return self.pmap(fn, items)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def fit_once(n: int, gp_blocks: int | None, parallel: str, threads: int, out: Path) -> dict[str, Any]:
    """One fit of the synthetic zoo of ``n`` models in this process; its figures."""
    torch.set_num_threads(threads)
    zoo = synthetic_sine_zoo(base_sine_zoo(out), n)
    if parallel == "ray":
        from fedfuse_server.ray_map import RayMap

        ray_map = RayMap()  # as the server's parallel="auto": chain levels under 32 chunks stay here
        ray_map._ensure_ray()  # joining the cluster is not the fit's time
        pmap = TimedMap(ray_map)
    else:
        pmap = TimedMap(serial_map)
    rss0 = peak_rss_mb()
    start = time.perf_counter()
    model = MetaModel(seed=0, gp_blocks=gp_blocks, pmap=pmap).fit(zoo, probe=sine.probe_grid())
    wall = time.perf_counter() - start
    test = sine.sample_tasks(200, TEST_SEED)
    score = sine.nrmse(sine.SPEC, model.personalize(test.tau).mean, test)
    return {"n": n, "gp_blocks": gp_blocks, "parallel": parallel, "threads": threads, "fit_s": wall,
            "rounds": model.n_rounds_, "align_s": pmap.seconds, "align_share": pmap.seconds / wall,
            "pmap_calls": pmap.calls, "pic_blocks": model.module_.prior.num_blocks,
            "fit_process_peak_rss_mb": peak_rss_mb(), "rss_before_fit_mb": rss0,
            "nrmse_0shot": float(score.mean()), "nrmse_0shot_median": float(score.median())}


def in_fresh_process(n: int, gp_blocks: int | None, parallel: str, threads: int, out: Path,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`fit_once` in a child process, with the peak summed RSS of this script's process
    tree while it runs (the fit, and a Ray cluster's processes where one is up)."""
    cmd = [sys.executable, __file__, "fit", "--n", str(n), "--parallel", parallel, "--threads", str(threads),
           "--gp-blocks", "all" if gp_blocks is None else str(gp_blocks), "--out", str(out)]
    sampler = TreeSampler()
    sampler.start()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sampler.stop.set()
    sampler.join()
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return {"n": n, "gp_blocks": gp_blocks, "parallel": parallel, "error": res.stderr[-800:]}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["tree_peak_rss_mb"] = sampler.peak / 2**20
    print(json.dumps(row), flush=True)
    return row


def ray_cluster(cpus: int) -> tuple[str, list[str]]:
    """Start a local Ray head with ``cpus`` CPUs on free ports; its address. Its processes stay
    this script's descendants (subreaper), which :func:`fleet.stop_tree` stops by PID."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={cpus}",
           "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1",
           # its own temp dir (short: socket paths), so no address file in /tmp/ray outlives it
           f"--temp-dir={tempfile.mkdtemp(prefix='ray')}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return f"127.0.0.1:{port}", cmd


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.loglog(n, [r["fit_s"] for r in rows], "o-", label="fit")
    a.loglog(n, [r["align_s"] for r in rows], ".--", label="alignment (inside the map)")
    a.set(xlabel="models in the zoo (n)", ylabel="seconds", title="fit time vs n (sine, d=301)")
    a.legend(fontsize=8)
    b.loglog(n, [r["tree_peak_rss_mb"] for r in rows], "o-")
    b.set(xlabel="models in the zoo (n)", ylabel="peak RSS (MB)", title="fit memory vs n")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| n | gp_blocks | map | fit (s) | rounds | alignment in the map (s, share) | peak RSS (MB) | 0-shot nRMSE |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "fit_s" in r:
            lines.append(f"| {r['n']:,} | {r['gp_blocks'] if r['gp_blocks'] is not None else 'all'} | {r['parallel']} | "
                         f"{r['fit_s']:.1f} | {r['rounds']} | {r['align_s']:.1f} ({r['align_share']:.0%}) | "
                         f"{r['tree_peak_rss_mb']:.0f} | {r['nrmse_0shot']:.4f} |")
        else:
            lines.append(f"| {r['n']:,} | {r['gp_blocks']} | {r['parallel']} | failed | | | | |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "fit"])
    ap.add_argument("--sizes", default="5000,20000,50000,100000")
    ap.add_argument("--quality-n", type=int, default=20000, help="0: skip the fast-vs-full comparison")
    ap.add_argument("--ray-n", type=int, default=20000, help="0: skip the Ray-vs-serial comparison")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each fit (the server's default)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--gp-blocks", default="64", help="an int, or 'all' (the full-data hyperparameter steps)")
    ap.add_argument("--parallel", default="serial", choices=["serial", "ray"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "fit":
        gp_blocks = None if args.gp_blocks == "all" else int(args.gp_blocks)
        print(json.dumps(fit_once(args.n, gp_blocks, args.parallel, args.threads, args.out)))
        return
    become_subreaper()
    base_sine_zoo(args.out)  # pre-train the 200 base nets once, before any timing
    sizes = [int(s) for s in args.sizes.split(",")]
    fast = {n: in_fresh_process(n, 64, "serial", args.threads, args.out) for n in sizes}
    result: dict[str, Any] = {"fits": list(fast.values()), "threads": args.threads}
    ok = [r for r in fast.values() if "fit_s" in r]
    if len(ok) > 1:
        result["fit_time_slope"] = slope([r["n"] for r in ok], [r["fit_s"] for r in ok])
        plot(ok, args.out / "scale.png")
    if args.quality_n:
        ref = fast.get(args.quality_n) or in_fresh_process(args.quality_n, 64, "serial", args.threads, args.out)
        full = in_fresh_process(args.quality_n, None, "serial", args.threads, args.out)
        result["quality"] = {"fast": ref, "full": full}
        if "fit_s" in ref and "fit_s" in full:
            result["quality"]["relative_nrmse"] = ref["nrmse_0shot"] / full["nrmse_0shot"]
    if args.ray_n:
        ref = fast.get(args.ray_n) or in_fresh_process(args.ray_n, 64, "serial", args.threads, args.out)
        try:
            address, _ = ray_cluster(args.ray_cpus)
            ray_row = in_fresh_process(args.ray_n, 64, "ray", args.threads, args.out,
                                       env={**os.environ, "RAY_ADDRESS": address})
        finally:
            left = stop_tree()
        result["ray"] = {"serial": ref, "ray": ray_row, "cluster_cpus": args.ray_cpus, "left_running": left}
        if "fit_s" in ref and "fit_s" in ray_row:
            result["ray"]["speedup"] = ref["fit_s"] / ray_row["fit_s"]
            result["ray"]["alignment_speedup"] = ref["align_s"] / ray_row["align_s"]
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    lines = table(result["fits"])
    if "fit_time_slope" in result:
        lines += ["", f"log-log slope of fit time vs n over {sizes[0]:,}-{sizes[-1]:,}: {result['fit_time_slope']:.2f}"]
    if "quality" in result:
        lines += ["", f"quality at n = {args.quality_n:,}: fast (64 blocks) vs full-data hyperparameter steps", ""]
        lines += table([result["quality"]["fast"], result["quality"]["full"]])
    if "ray" in result:
        lines += ["", f"Ray ({args.ray_cpus} workers) vs in process at n = {args.ray_n:,}", ""]
        lines += table([result["ray"]["serial"], result["ray"]["ray"]])
        if "speedup" in result["ray"]:
            lines += ["", f"speed-up: fit {result['ray']['speedup']:.2f}x, alignment {result['ray']['alignment_speedup']:.2f}x"]
    (args.out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
