"""Load on the initializer service over loopback, with a new fit landing mid-run.

    python benchmarks/serve_load.py [--out runs/bench/serve] [--seconds 10] [--sine-rate 200] [--mnist-rate 50] [--haproxy] [--no-access-log]

For a sine-size [1-100-1] and an MNIST-size [784-100-10] meta-model, at 1 and 2 replicas:

* open loop: requests start on a fixed schedule (``--*-rate`` per second) for ``--seconds``;
  latency counts from each request's scheduled start (a stalled server cannot hide queueing).
  Halfway through, a second meta-model is written to the store (``store.save_meta_model``); the
  run records every failed request and when the new version first answers.
* closed loop: ``--clients`` concurrent clients for ``--burst`` seconds: the most requests/s.
* then (``--sweep``) the sine model at ``--sweep-replicas`` (1): 1 and 4 closed-loop clients (the latency of
  a request on its own) and open loops at rising rates without a swap (where queueing starts).

Both stop by themselves (time and request bounds). The meta-models are fitted here in seconds
on small zoos (the MNIST-size one on randomly initialized nets with a random probe: serving cost
depends on the sizes, not on what the weights learned). Writes serve_load.json and serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import torch

from fedfuse import wire
from fedfuse.architectures import MLPSpec
from fedfuse.meta_model import MetaModel
from fedfuse.tasks import get_family, sine
from fedfuse.zoo import ModelZoo
from fedfuse_server.serve import APP_NAME, build_app, serving
from fedfuse_server.store import ModelStore

MNIST_SPEC = MLPSpec((784, 100, 10))
MAX_REQUESTS = 20_000  # per phase, whatever the rate and duration say
# Serve's HAProxy ingress: requests go from HAProxy straight to the replicas (direct ingress), no
# Python proxy in between; its default of 20,000 connections needs more file descriptors than a
# default ulimit gives
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_MAXCONN": "4096"}


def sine_models() -> list[MetaModel]:
    tasks = sine.sample_tasks(40, seed=0)
    zoo = ModelZoo(sine.SPEC, sine.pretrain(tasks, seed=1, points=100, steps=300), tasks.tau,
                   [f"sine-{i:05d}" for i in range(40)])
    return [_annotated(MetaModel(hidden=(64,), max_rounds=3, steps_per_round=100, seed=s).fit(
        zoo, probe=sine.probe_grid()), "sine") for s in (0, 1)]


def mnist_models() -> list[MetaModel]:
    gen = torch.Generator().manual_seed(0)
    n = 30
    tau = torch.zeros(n, 10)
    for i in range(n):
        tau[i, torch.randperm(10, generator=gen)[: 2 + i % 4]] = 1.0
    zoo = ModelZoo(MNIST_SPEC, MNIST_SPEC.init(n, gen), tau, [f"mnist-{i:03d}" for i in range(n)])
    probe = torch.rand(1000, 784, generator=gen)  # the MNIST family probes with 1,000 images
    return [_annotated(MetaModel(hidden=(64,), max_rounds=1, steps_per_round=20, likelihood="softmax",
                                 seed=s).fit(zoo, probe=probe), "mnist") for s in (0, 1)]


def _annotated(model: MetaModel, family: str) -> MetaModel:
    model.annotations_ = {"family": family, "descriptor": list(get_family(family).descriptor.names)}
    return model


@dataclass
class Phase:
    model: str
    replicas: int
    mode: str  # "open" (fixed rate, a fit lands halfway) or "closed" (saturation)
    offered_rps: float | None
    sent: int
    ok: int
    failed: int
    rps: float  # answered requests per second of the phase
    p50_ms: float
    p99_ms: float
    max_ms: float
    swap_after_s: float | None = None  # from the new fit's write to its first answer
    versions: int = 1


class Loopback:
    """The load's HTTP client: aiohttp with kept-alive connections, at most ``max_connections``.
    httpx costs about 1.4 ms of CPU per request, which on two shared cores the service would pay
    for; aiohttp about 0.3 ms."""

    def __init__(self, url: str, max_connections: int, timeout: float) -> None:
        self.url = f"{url}/v1/initializers"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections),
                                             timeout=aiohttp.ClientTimeout(total=timeout))

    async def post(self, body: bytes) -> tuple[int, str | None]:
        async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            return resp.status, resp.headers.get(wire.VERSION_HEADER)

    async def close(self) -> None:
        await self.session.close()


async def _one(http: Loopback, body: bytes, start: float, out: list) -> None:
    try:
        status, version = await http.post(body)
        out.append((start, time.perf_counter(), status, version))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        out.append((start, time.perf_counter(), repr(exc), None))


def quiet_gc() -> None:
    """Keep the load generator's own pauses out of the figures: this process holds Ray's driver,
    torch and the models (about 300,000 objects), and a full collection of them stalls its event
    loop for 150-190 ms, which counted as latency of every request due meanwhile. A phone's
    client holds a few hundred."""
    gc.collect()
    gc.freeze()


def _bodies(descriptors: list[list[float]]) -> list[bytes]:
    return [json.dumps(wire.initializer_request(f"phone-{i:05d}", t)).encode() for i, t in enumerate(descriptors)]


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float,
                    swap: threading.Event | None = None) -> list:
    """Requests started on a fixed schedule; ``swap`` is set halfway."""
    out: list = []
    n = min(int(rate * seconds), MAX_REQUESTS)
    http = Loopback(url, max_connections=256, timeout=120)
    quiet_gc()
    t0, tasks = time.perf_counter(), []
    for i in range(n):
        due = t0 + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if swap is not None and i == n // 2:
            swap.set()
        tasks.append(asyncio.create_task(_one(http, bodies[i % len(bodies)], due, out)))
    await asyncio.gather(*tasks)
    await http.close()
    return out


async def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> list:
    out: list = []
    end = time.perf_counter() + seconds

    async def client(k: int) -> None:
        i = k
        while time.perf_counter() < end and len(out) < MAX_REQUESTS:
            await _one(http, bodies[i % len(bodies)], time.perf_counter(), out)
            i += clients

    http = Loopback(url, max_connections=clients, timeout=30)
    quiet_gc()
    await asyncio.gather(*(client(k) for k in range(clients)))
    await http.close()
    return out


def land(store: ModelStore, model: MetaModel, swap: threading.Event, swapped: dict) -> None:
    """Write the second meta-model once ``swap`` is set: a new fit landing."""
    swap.wait()
    swapped["at"] = time.perf_counter()
    swapped["version"] = sha256_of(store.save_meta_model(model))


def summarize(out: list, model: str, replicas: int, mode: str, rate: float | None) -> Phase:
    ok = [(s, e, v) for s, e, code, v in out if code == 200]
    lat = np.array([e - s for s, e, _ in ok]) * 1000 if ok else np.array([np.nan])
    span = max(e for _, e, _, _ in out) - min(s for s, _, _, _ in out)
    return Phase(model, replicas, mode, rate, len(out), len(ok), len(out) - len(ok), len(ok) / span,
                 float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), float(lat.max()),
                 versions=len({v for _, _, v in ok}))


def wait_for_version(url: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).json().get("version") == version:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the service did not serve version {version[:12]} within {timeout:.0f}s")


def run(out_dir: Path, port: int, seconds: float, rates: dict[str, float], clients: int, burst: float,
        sweep: list[float], access_log: bool = True, sweep_replicas: tuple[int, ...] = (1,)) -> list[Phase]:
    torch.set_num_threads(1)
    rng = random.Random(0)
    work = {"sine": (sine_models(), _bodies([[rng.uniform(0.1, 5.0), rng.uniform(0, 3.14)] for _ in range(500)])),
            "mnist": (mnist_models(), _bodies([[float(rng.random() < 0.4) for _ in range(10)] for _ in range(500)]))}
    stores = {name: ModelStore(out_dir / f"store-{name}") for name in work}
    for name, (models, _) in work.items():
        stores[name].save_meta_model(models[0])
    phases: list[Phase] = []
    with serving(stores["sine"].root, port=port, access_log=access_log) as url:
        from ray import serve

        for name, (models, bodies) in work.items():
            for replicas in (1, 2):
                store = stores[name]
                first_version = sha256_of(store.save_meta_model(models[0]))
                serve.run(build_app({"store": str(store.root), "replicas": replicas, "access_log": access_log}), name=APP_NAME, route_prefix="/")
                wait_for_version(url, first_version)
                asyncio.run(open_loop(url, bodies, rates[name], 1.0))  # warm-up, not counted
                swap, swapped = threading.Event(), {}
                writer = threading.Thread(target=land, args=(store, models[1], swap, swapped))
                writer.start()
                out = asyncio.run(open_loop(url, bodies, rates[name], seconds, swap))
                writer.join()
                phase = summarize(out, name, replicas, "open", rates[name])
                after = [e for _, e, code, v in out if code == 200 and v == swapped["version"]]
                phase.swap_after_s = min(after) - swapped["at"] if after else None
                phases.append(phase)
                print(_row(phase), flush=True)
                closed = summarize(asyncio.run(closed_loop(url, bodies, clients, burst)), name, replicas, "closed", None)
                phases.append(closed)
                print(_row(closed), flush=True)
        if sweep:  # where latency starts to grow: sine, no swap
            models, bodies = work["sine"]
            for replicas in sweep_replicas:
                serve.run(build_app({"store": str(stores["sine"].root), "replicas": replicas, "access_log": access_log}), name=APP_NAME, route_prefix="/")
                wait_for_version(url, sha256_of(stores["sine"].save_meta_model(models[0])))
                for k in (1, 4):
                    phase = summarize(asyncio.run(closed_loop(url, bodies, k, burst)), "sine", replicas, f"closed, {k} client{'s' if k > 1 else ''}", None)
                    phases.append(phase)
                    print(_row(phase), flush=True)
                for rate in sweep:
                    phase = summarize(asyncio.run(open_loop(url, bodies, rate, seconds)), "sine", replicas, "open, no swap", rate)
                    phases.append(phase)
                    print(_row(phase), flush=True)
    return phases


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


HEADER = ("| model | replicas | load | offered (req/s) | answered (req/s) | p50 (ms) | p99 (ms) | max (ms) | "
          "failed / sent | new fit served after (s) |\n|---|---|---|---|---|---|---|---|---|---|")


def _row(p: Phase) -> str:
    size = "sine [1-100-1]" if p.model == "sine" else "MNIST [784-100-10]"
    load = {"open": "open loop, fit lands halfway", "closed": "closed loop"}.get(p.mode, p.mode)
    offered = f"{p.offered_rps:.0f}" if p.offered_rps else "—"
    swap = "—" if p.mode != "open" else ("never" if p.swap_after_s is None else f"{p.swap_after_s:.2f}")
    return (f"| {size} | {p.replicas} | {load} | {offered} | {p.rps:.0f} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | "
            f"{p.max_ms:.0f} | {p.failed} / {p.sent} | {swap} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/serve"))
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each open-loop run")
    parser.add_argument("--sine-rate", type=float, default=200.0)
    parser.add_argument("--mnist-rate", type=float, default=50.0)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the closed-loop run")
    parser.add_argument("--burst", type=float, default=5.0, help="length of each closed-loop run")
    parser.add_argument("--sweep", default="50,100,130,160",
                        help="then sine: 1 and 4 clients, and open loops at these rates ('': skip)")
    parser.add_argument("--sweep-replicas", default="1", help="the replica counts the sweep runs at, e.g. 1,2")
    parser.add_argument("--haproxy", action="store_true",
                        help="Serve's HAProxy ingress instead of its Python proxy (needs the haproxy and socat binaries)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="the service without a log line per request (fedfuse serve --no-access-log)")
    args = parser.parse_args()
    if args.haproxy:
        missing = [b for b in ("haproxy", "socat") if shutil.which(b) is None]
        if missing:
            parser.error(f"--haproxy needs {' and '.join(missing)} on PATH (e.g. apt-get install haproxy socat)")
        os.environ.update(HAPROXY_ENV)  # before the local Ray starts: its processes inherit them
    args.out.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    phases = run(args.out, args.port, args.seconds, {"sine": args.sine_rate, "mnist": args.mnist_rate}, args.clients,
                 args.burst, [float(r) for r in args.sweep.split(",") if r], args.access_log,
                 tuple(int(r) for r in args.sweep_replicas.split(",")))
    (args.out / "serve_load.json").write_text(json.dumps([asdict(p) for p in phases], indent=2))
    (args.out / "serve_load.md").write_text("\n".join([HEADER, *map(_row, phases)]) + "\n")
    print(f"wrote {args.out / 'serve_load.md'} and serve_load.json")


if __name__ == "__main__":
    main()
