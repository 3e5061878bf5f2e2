"""``fedfuse``: the command line (typer). Each experiment writes its figures and tables to --out."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import typer

app = typer.Typer(help="fedfuse: fuse independently trained models into personalized warm starts.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


bench_app = typer.Typer(help="Reproduce the paper's tables on this machine: results.csv, table.md "
                             "(mean ± std next to the paper), summary.json and plots in --out.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 0:
        raise typer.BadParameter(f"{what} must be non-negative integers")
    return values


def _parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` meta-model settings; values are JSON (numbers, strings, lists) or plain text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set takes key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    if "hidden" in out:
        out["hidden"] = tuple(out["hidden"])
    return out


def _bench(name: str, config_cls: Any, run: Any, out: Path | None, smoke: bool, seeds: str | None,
           threads: int, shots: str | None = None, settings: list[str] | None = None,
           overrides: dict[str, Any] | None = None) -> None:
    torch.set_num_threads(threads)
    cfg = config_cls.smoke() if smoke else config_cls()
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    if settings:
        cfg.meta = {**cfg.meta, **_parse_settings(settings)}
    if seeds is not None:
        cfg.seeds = _parse_ints(seeds, "seeds")
    if shots is not None:
        cfg.shots = _parse_ints(shots, "shots")
    out = out or Path("runs") / "bench" / (f"{name}-smoke" if smoke else name)
    run(out, cfg, progress=True)
    typer.echo(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")


OUT = typer.Option(None, help="folder for results (default runs/bench/NAME[-smoke])")
SMOKE = typer.Option(False, "--smoke", help="the reduced size CI runs (same code path)")
SEEDS = typer.Option(None, help="comma-separated seeds (default 0,1,2; smoke: 0)")
SET = typer.Option(None, "--set", help="a meta-model setting for this run, key=value (repeat), "
                   "e.g. --set kernel=rbf --set function_space=false")
THREADS = typer.Option(2, min=1, help="torch threads")


@bench_app.command("sine")
def bench_sine(out: Path | None = OUT, smoke: bool = SMOKE, seeds: str | None = SEEDS,
               shots: str | None = typer.Option(None, help="fine-tuning shots (default 0,10,20,30,40)"),
               threads: int = THREADS, settings: list[str] | None = SET,
               maml_steps: int | None = typer.Option(None, min=0, help="MAML meta-steps (default 20000; Finn et al.: 70000)"),
               ) -> None:
    """Table 1 and Fig. 2: ours and its ablations, no-align, cold-start, 1-NN, k-NN aligned, zoo
    average, MAML [1-100-1] and [1-40-40-1] on the sine tasks (nRMSE)."""
    from fedfuse_sim import sine as bench

    _bench("sine", bench.SineConfig, bench.run, out, smoke, seeds, threads, shots, settings,
           {"maml_steps": maml_steps} if maml_steps is not None else None)


@bench_app.command("mnist")
def bench_mnist(out: Path | None = OUT, smoke: bool = SMOKE, seeds: str | None = SEEDS,
                shots: str | None = typer.Option(None, help="shots per digit (default 0,1,10)"),
                threads: int = THREADS, settings: list[str] | None = SET) -> None:
    """Table 2: K-subset digit classifiers [784-100-10], K = 2..5 (K-way accuracy)."""
    from fedfuse_sim import mnist as bench

    _bench("mnist", bench.MnistConfig, bench.run, out, smoke, seeds, threads, shots, settings)


@bench_app.command("movielens")
def bench_movielens(out: Path | None = OUT, smoke: bool = SMOKE, seeds: str | None = SEEDS,
                    threads: int = THREADS, settings: list[str] | None = SET) -> None:
    """Table 3: 0-shot user embeddings (20/30/40 dims) for unseen MovieLens 100K users (RMSE)."""
    from fedfuse_sim import movielens as bench

    _bench("movielens", bench.MovieLensConfig, bench.run, out, smoke, seeds, threads, settings=settings)


deploy_app = typer.Typer(help="Run a real deployment on this machine: SuperLink and SuperNodes as "
                              "separate processes (TLS and SuperNode authentication by default).",
                         no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
WORKDIR = typer.Option(Path("runs/deploy"), help="folder holding the deployment's state, logs, keys")


@deploy_app.command("certs")
def deploy_certs(
    out: Path = typer.Option(Path("deploy/certs"), help="folder for ca.crt, server.pem, server.key"),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], help="IP or DNS name the SuperLink is reached at (repeat)"),
) -> None:
    """Make a CA and a SuperLink server certificate for the given hosts."""
    from fedfuse_deploy.credentials import make_certificates

    certs = make_certificates(out, host)
    typer.echo(f"CA {certs.ca_cert}\nserver certificate {certs.server_cert} for {', '.join(host)}")


@deploy_app.command("node-key")
def deploy_node_key(name: str, out: Path = typer.Option(Path("deploy/keys"))) -> None:
    """Make a SuperNode's EC key pair (register NAME.pub with `flwr supernode register`)."""
    from fedfuse_deploy.credentials import make_node_keys

    private, public = make_node_keys(out, name)
    typer.echo(f"private key {private}\npublic key {public}")


@deploy_app.command("device-data")
def deploy_device_data(
    out: Path, index: int = typer.Option(..., help="device number: below --clients trains a model"),
    clients: int = typer.Option(3), new: int = typer.Option(1), seed: int = typer.Option(0),
    shots: int = typer.Option(10), family: str = typer.Option("sine", help="task family"),
) -> None:
    """Write a simulated device's private data file (what `data=` points a SuperNode to)."""
    from fedfuse.tasks import DeviceConfig, get_family

    fam = get_family(family)
    device = fam.simulated_device(index, DeviceConfig(clients, new, seed, shots))
    device.save(out, family)
    typer.echo(f"{device.client_id} ({device.role}) -> {out}")


@deploy_app.command("up")
def deploy_up(
    workdir: Path = WORKDIR,
    devices: int = typer.Option(3, min=0, help="simulated devices with a model to upload"),
    new: int = typer.Option(0, min=0, help="new simulated devices to start now (more with add-node)"),
    family: str = typer.Option("sine", help="task family of the simulated devices"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS (and no authentication)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="TLS without SuperNode authentication"),
) -> None:
    """Start a SuperLink and SuperNodes on 127.0.0.1 and wait until each is healthy."""
    from fedfuse.tasks import DeviceConfig, get_family
    from fedfuse_deploy.launcher import LocalDeployment

    fam = get_family(family)
    dep = LocalDeployment(workdir, secure=not insecure, auth=not (insecure or no_auth))
    dep.start_superlink()
    typer.echo(f"SuperLink pid {dep.superlink.pid} on {dep.host}:{dep.superlink.port}")
    for i in range(devices + new):
        data = workdir / "data" / f"device{i}.safetensors"
        data.parent.mkdir(parents=True, exist_ok=True)
        device = fam.simulated_device(i, DeviceConfig(devices, new, 0, 10))
        device.save(data, family)
        node = dep.add_supernode(device.client_id, data)
        typer.echo(f"SuperNode {device.client_id} pid {node.pid} port {node.port}")
    typer.echo(f"FLWR_HOME={dep.flwr_home}  connection: fedfuse-local")


@deploy_app.command("add-node")
def deploy_add_node(name: str, data: Path, workdir: Path = WORKDIR) -> None:
    """Start one more SuperNode for device NAME with its private data file DATA."""
    from fedfuse_deploy.launcher import LocalDeployment

    node = LocalDeployment.load(workdir).add_supernode(name, data)
    typer.echo(f"SuperNode {name} pid {node.pid} port {node.port}")


@deploy_app.command("run")
def deploy_run(
    run_config: str = typer.Option(..., "--run-config", "-c", help="e.g. \"phase='collect,fit' store='/abs/store'\""),
    workdir: Path = WORKDIR, app_dir: Path = typer.Option(Path("."), "--app", help="the Flower app (this repo)"),
) -> None:
    """`flwr run` the app against this deployment's SuperLink, streaming its logs."""
    from fedfuse_deploy.launcher import LocalDeployment

    typer.echo(LocalDeployment.load(workdir).run(app_dir, run_config))


@deploy_app.command("status")
def deploy_status(workdir: Path = WORKDIR) -> None:
    """The processes this deployment started and whether each is alive."""
    from fedfuse_deploy.launcher import LocalDeployment, alive_pid

    dep = LocalDeployment.load(workdir)
    procs = ({"superlink": dep.superlink} if dep.superlink else {}) | dep.supernodes
    for name, p in procs.items():
        typer.echo(f"{name:24s} pid {p.pid:<8d} port {p.port:<6d} {'alive' if alive_pid(p.pid) else 'gone'}")


@deploy_app.command("down")
def deploy_down(workdir: Path = WORKDIR) -> None:
    """Stop exactly the processes `up`/`add-node` started."""
    from fedfuse_deploy.launcher import LocalDeployment

    still = LocalDeployment.load(workdir).down()
    if still:
        typer.echo(f"ports still listening: {still}", err=True)
        raise typer.Exit(1)
    typer.echo("stopped")


store_app = typer.Typer(help="Inspect and repair a server's model store (the folder its store= setting "
                             "names). Stop the server before rm and rebuild-index.",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")
STORE = typer.Argument(..., help="the store folder")


@contextmanager
def _operator_errors() -> Iterator[None]:
    """A store's refusal or failure as one line on stderr and exit code 1, not a traceback."""
    from fedfuse.errors import FedfuseError, FedfuseFailure

    try:
        yield
    except (FedfuseError, FedfuseFailure) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _existing(folder: Path) -> Path:
    """``folder`` if it holds a store: a command must not create one at a mistyped path."""
    from fedfuse.errors import FedfuseError

    if not (folder / "index.sqlite").is_file() and not (folder / "uploads").is_dir():
        raise FedfuseError(f"{folder} holds no model store (no index.sqlite, no uploads/): give the "
                           "folder the server's store= setting names")
    return folder


def _descriptor(values: list[float] | None) -> str:
    if values is None:
        return "?"
    shown = ", ".join(f"{v:.4g}" for v in values[:4])
    return f"[{shown}]" if len(values) <= 4 else f"[{shown}, ...] ({len(values)})"


@store_app.command("ls")
def store_ls(store: Path = STORE) -> None:
    """Every entry: client id, when it was received (UTC), its number of training examples, its
    descriptor and its status (ok, unreadable or quarantined, with the reason)."""
    from fedfuse_server.store import ModelStore

    with _operator_errors():
        entries = ModelStore(_existing(store)).entries()
    typer.echo(f"{'client':24s} {'received (UTC)':19s} {'examples':>8s}  {'descriptor':28s} status")
    for e in entries:
        who = repr(e.client_id) if e.client_id is not None else f"? ({e.file})"
        received = "?" if e.received is None else datetime.fromtimestamp(e.received, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        examples = "?" if e.n_examples is None else str(e.n_examples)
        status = f"{e.status}: {e.reason}" if e.reason else e.status
        typer.echo(f"{who:24s} {received:19s} {examples:>8s}  {_descriptor(e.descriptor):28s} {status}")


@store_app.command("rm")
def store_rm(store: Path = STORE, client_id: str = typer.Argument(..., help="as `ls` shows it, without quotes")) -> None:
    """Drop a client's entry; its file moves to quarantine/ (nothing is deleted)."""
    from fedfuse_server.store import ModelStore

    with _operator_errors():
        ModelStore(_existing(store)).remove(client_id)
    typer.echo(f"removed the entry of client {client_id!r}; its file is under {store / 'quarantine'}")


@store_app.command("verify")
def store_verify(store: Path = STORE) -> None:
    """Check every entry's file (present, unchanged since stored, readable, finite, of the zoo's
    architecture) and the meta-model's; list the problems and exit with 1 if there are any."""
    from fedfuse_server.store import ModelStore

    with _operator_errors():
        opened = ModelStore(_existing(store))
        problems, n = opened.verify(), len(opened.ids())
    for problem in problems:
        typer.echo(str(problem))
    if problems:
        typer.echo(f"{len(problems)} problem{'s' * (len(problems) != 1)} in {store}: `fedfuse store rm` "
                   "or a new upload from the client replaces a bad entry", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {n} entries (and the meta-model, if one is fitted) match the index")


@store_app.command("rebuild-index")
def store_rebuild_index(store: Path = STORE) -> None:
    """Rebuild the index from the upload files (each names its client); the old index is kept as
    index.sqlite.bak, and its rounds, metrics and quarantine records carry over where readable."""
    from fedfuse_server.store import rebuild_index

    with _operator_errors():
        n = len(rebuild_index(_existing(store)).ids())
    backup = store / "index.sqlite.bak"
    typer.echo(f"rebuilt the index of {store}: {n} entries" + (f"; the old index is {backup}" if backup.exists() else ""))


@app.command("serve")
def serve_initializers(
    store: Path = typer.Option(..., help="the server's store folder (its meta-model is served; a new fit is picked up)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=1, max=65535),
    replicas: int = typer.Option(1, min=1, help="Serve replicas (one CPU each)"),
    token_file: Path | None = typer.Option(None, help="file holding the bearer token clients must send"),
) -> None:
    """Serve personalized initializers over HTTP (Ray Serve) until Ctrl-C: POST /v1/initializers,
    GET /v1/model, GET /healthz. Joins the Ray cluster RAY_ADDRESS names, else starts a local Ray."""
    from fedfuse_server.serve import serve_until_stopped

    with _operator_errors():
        serve_until_stopped(_existing(store), lambda url: typer.echo(f"serving initializers at {url} (Ctrl-C stops)"),
                            host=host, port=port, replicas=replicas, token_file=token_file)
    typer.echo("stopped")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


if __name__ == "__main__":
    app()
