"""A whole fleet through a real `flwr run`: collect, fit and personalize with N simulated devices.

    python benchmarks/fleet.py --devices 100 [--family sine] [--out runs/bench]
    python benchmarks/fleet.py --devices 100,300,1000      # + slope, fleet.json, fleet.png

As `make demo` does it: `flwr run . local --stream` against a local SuperLink that `flwr` starts
in simulation mode, with Flower's state in a temporary FLWR_HOME, runtime dependency installation
and telemetry off. A tenth of the devices are new (they only get personalized). Each size runs on
its own free port, so neither another user's SuperLink is reused nor theirs disturbed.

Measured per size: wall time of `flwr run`, devices per minute, the peak of the summed RSS of
every process this script started (`flwr`, the SuperLink it detaches, the SuperExec, the
simulation, Ray and its actors: this process is their subreaper, so detached ones stay in its
tree), and each phase's seconds as the server recorded them in the store's rounds table.
Afterwards every process left is stopped by PID (SIGTERM, then SIGKILL) and the port is checked
to be free; both are part of the result (`leftover_pids`, `listening`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("shared", "server", "clients", "deploy", "simulations")
PR_SET_CHILD_SUBREAPER = 36
PAGE = os.sysconf("SC_PAGE_SIZE")


def become_subreaper() -> None:
    """Orphans of our descendants (the SuperLink `flwr` detaches, Ray's daemons) are re-parented
    to this process instead of init, so they stay findable, and stoppable, by walking our tree."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def descendants(root: int) -> dict[int, int]:
    """``pid -> rss bytes`` of every live (non-zombie) process below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/statm") as fh:
                pages = int(fh.read().split()[1])
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = pages * PAGE
    out: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = rss[pid]
        todo.extend(children.get(pid, []))
    return out


class TreeSampler(threading.Thread):
    """Polls the summed RSS of this process's descendants; keeps the peak and every PID seen."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.seen = interval, 0, set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tree = descendants(os.getpid())
            self.peak = max(self.peak, sum(tree.values()))
            self.seen |= set(tree)
            self.stop.wait(self.interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether anything listens on 127.0.0.1:``port`` (a refused connection means nothing)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def reap() -> None:
    """Collect the exit status of re-parented children that ended (they are ours to reap)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(grace: float = 10.0) -> list[int]:
    """Stop every process below this one by PID: SIGTERM, then SIGKILL after ``grace`` seconds.
    Returns the PIDs still alive after that (none, normally)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap()
            if not descendants(os.getpid()):
                return []
            time.sleep(0.2)
    reap()
    return sorted(descendants(os.getpid()))


def flwr_env(home: Path, port: int) -> dict[str, str]:
    """The environment `make demo` gives `flwr`, plus this checkout's sources first on the path
    (so the code measured is this tree's, not whatever is installed) and our own port."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([*(str(ROOT / s) for s in SOURCES), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    env.setdefault("RAY_ADDRESS", "local")  # a stale `ray start` address file must not capture the run
    return env


def run_fleet(devices: int, family: str, work: Path, train_steps: int = 0, client_cpus: int = 1,
              timeout: float = 3600.0) -> dict[str, Any]:
    """One `flwr run` with ``devices`` simulated devices (a tenth new); its measurements."""
    from fedfuse_server.store import ModelStore

    num_new = max(1, devices // 10)
    home, store = work / "flwr", work / "store"
    home.mkdir(parents=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    port = free_port()
    # one actor per core (Flower's default of 2 CPUs per client leaves one actor on 2 cores)
    federation = f"num-supernodes={devices} client-resources-num-cpus={client_cpus}"
    run_config = (f"family='{family}' store='{store}' num-clients={devices - num_new} num-new={num_new} "
                  f"train-steps={train_steps} wait-for-nodes=600.0 round-timeout={timeout}")
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "local", "--stream",
           "--federation-config", federation, "--run-config", run_config]
    sampler = TreeSampler()
    sampler.start()
    log_path = work / "flwr.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=flwr_env(home, port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    leftover = stop_tree()
    result: dict[str, Any] = {
        "devices": devices, "new": num_new, "family": family, "train_steps": train_steps,
        "client_cpus": client_cpus, "returncode": rc, "wall_s": wall,
        "devices_per_min": devices / wall * 60, "peak_rss_mb": sampler.peak / 2**20,
        "processes_seen": len(sampler.seen), "leftover_pids": leftover, "listening": listening(port),
    }
    if (store / "index.sqlite").exists():
        st = ModelStore(store)
        phases = st.rounds("phases")
        result["phase_s"] = phases[-1]["seconds"] if phases else {}
        result["completed"] = phases[-1]["completed"] if phases else []
        result["uploads"] = len(st.ids())
        metrics = st.metrics()
        result["personalized"] = len(metrics)
        if metrics:
            for key in ("score-0shot", "score-adapted", "cold-score-adapted"):
                result[f"mean_{key}"] = sum(m[key] for m in metrics.values()) / len(metrics)
    if result.get("completed") != ["collect", "fit", "personalize"]:
        result["log_tail"] = log_path.read_text()[-3000:]
    return result


def slope(xs: list[float], ys: list[float]) -> float:
    import numpy as np

    return float(np.polyfit(np.log10(xs), np.log10(ys), 1)[0])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["devices"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.loglog(n, [r["wall_s"] for r in rows], "o-", label="end to end")
    for phase in ("collect", "fit", "personalize"):
        a.loglog(n, [r.get("phase_s", {}).get(phase, float("nan")) for r in rows], ".--", label=phase)
    a.set(xlabel="devices (N)", ylabel="seconds", title="fleet: time vs N")
    b.loglog(n, [r["peak_rss_mb"] for r in rows], "o-")
    b.set(xlabel="devices (N)", ylabel="peak RSS of the process tree (MB)", title="fleet: memory vs N")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="100", help="fleet sizes, comma-separated")
    ap.add_argument("--family", default="sine")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--train-steps", type=int, default=0, help="a zoo device's steps (0: the family's recipe)")
    ap.add_argument("--client-cpus", type=int, default=1, help="CPUs Flower reserves per client actor")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds one `flwr run` may take")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.devices.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"fleet-{n}-") as tmp:
            row = run_fleet(n, args.family, Path(tmp), args.train_steps, args.client_cpus, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        ok = [r for r in rows if r.get("completed") == ["collect", "fit", "personalize"]]
        summary = {"runs": rows, "slope_wall_vs_devices": slope([r["devices"] for r in ok], [r["wall_s"] for r in ok])
                   if len(ok) > 1 else None}
        (args.out / "fleet.json").write_text(json.dumps(summary, indent=2))
        if len(ok) > 1:
            plot(ok, args.out / "fleet.png")
        print(f"log-log slope of wall time vs devices: {summary['slope_wall_vs_devices']}")
    print("| devices | wall (s) | devices/min | collect (s) | fit (s) | personalize (s) | peak RSS (MB) | left running | listening |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r.get("phase_s", {})
        print(f"| {r['devices']} | {r['wall_s']:.0f} | {r['devices_per_min']:.0f} | {p.get('collect', float('nan')):.0f} | "
              f"{p.get('fit', float('nan')):.0f} | {p.get('personalize', float('nan')):.0f} | {r['peak_rss_mb']:.0f} | "
              f"{len(r['leftover_pids'])} | {r['listening']} |")
    return rows


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / s) for s in SOURCES]
    main()
