"""``fedfuse``: the command line (typer). Each experiment writes its figures and tables to --out."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import typer

app = typer.Typer(help="fedfuse: fuse independently trained models into personalized warm starts.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"shots must be comma-separated integers, got {text!r}") from exc
    if not shots or min(shots) < 0:
        raise typer.BadParameter("shots must be non-negative integers")
    return shots


@app.command()
def sine(
    out: Path = typer.Option(Path("runs/sine"), help="folder for results, plots and the model"),
    train_tasks: int = typer.Option(200, min=2, help="pre-trained models in the zoo"),
    test_tasks: int = typer.Option(100, min=1, help="unseen tasks to personalize"),
    shots: str = typer.Option("0,10,20,30,40", help="fine-tuning shots per test task"),
    seed: int = typer.Option(0),
    quick: bool = typer.Option(False, "--quick", help="reduced size for smoke tests"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
) -> None:
    """Table 1 and Fig. 2: ours vs no-alignment vs cold-start on the sine benchmark."""
    from fedfuse_sim import sine as sine_bench

    torch.set_num_threads(threads)
    cfg = sine_bench.SineConfig.quick(seed) if quick else sine_bench.SineConfig(seed=seed)
    if not quick:
        cfg.n_train, cfg.n_test = train_tasks, test_tasks
    cfg.shots = _parse_shots(shots) if not quick else cfg.shots
    result = sine_bench.run(out, cfg, progress=True)
    t = result["timings"]
    typer.echo(f"fit {t['fit_s']:.1f}s (no-align {t['fit_no_align_s']:.1f}s), "
               f"peak RSS {result['peak_rss_mb']['after_fit']:.0f} MB, "
               f"model file {result['model_file_mb']:.2f} MB")
    typer.echo(f"wrote {out}/results.csv, summary.json, table.md, sine_fig2.png, fit_history.png")


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
    from fedfuse_server.credentials import make_certificates

    certs = make_certificates(out, host)
    typer.echo(f"CA {certs.ca_cert}\nserver certificate {certs.server_cert} for {', '.join(host)}")


@deploy_app.command("node-key")
def deploy_node_key(name: str, out: Path = typer.Option(Path("deploy/keys"))) -> None:
    """Make a SuperNode's EC key pair (register NAME.pub with `flwr supernode register`)."""
    from fedfuse_server.credentials import make_node_keys

    private, public = make_node_keys(out, name)
    typer.echo(f"private key {private}\npublic key {public}")


@deploy_app.command("device-data")
def deploy_device_data(
    out: Path, index: int = typer.Option(..., help="device number: below --clients trains a model"),
    clients: int = typer.Option(3), new: int = typer.Option(1), seed: int = typer.Option(0),
    shots: int = typer.Option(10),
) -> None:
    """Write a simulated sine device's private data file (what `data=` points a SuperNode to)."""
    from fedfuse.runconfig import RunConfig
    from fedfuse_client.data import simulated_device

    device = simulated_device(index, RunConfig(num_clients=clients, num_new=new, seed=seed, shots=shots))
    device.save(out)
    typer.echo(f"{device.client_id} ({device.role}) -> {out}")


@deploy_app.command("up")
def deploy_up(
    workdir: Path = WORKDIR,
    devices: int = typer.Option(3, min=0, help="sine devices with a model to upload"),
    new: int = typer.Option(0, min=0, help="new sine devices to start now (more with add-node)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS (and no authentication)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="TLS without SuperNode authentication"),
) -> None:
    """Start a SuperLink and SuperNodes on 127.0.0.1 and wait until each is healthy."""
    from fedfuse_server.launcher import LocalDeployment

    dep = LocalDeployment(workdir, secure=not insecure, auth=not (insecure or no_auth))
    dep.start_superlink()
    typer.echo(f"SuperLink pid {dep.superlink.pid} on {dep.host}:{dep.superlink.port}")
    for i in range(devices + new):
        data = workdir / "data" / f"device{i}.safetensors"
        data.parent.mkdir(parents=True, exist_ok=True)
        deploy_device_data(data, index=i, clients=devices, new=new, seed=0, shots=10)
        name = f"sine-{i:05d}" if i < devices else f"new-{i - devices:05d}"
        node = dep.add_supernode(name, data)
        typer.echo(f"SuperNode {name} pid {node.pid} port {node.port}")
    typer.echo(f"FLWR_HOME={dep.flwr_home}  connection: fedfuse-local")


@deploy_app.command("add-node")
def deploy_add_node(name: str, data: Path, workdir: Path = WORKDIR) -> None:
    """Start one more SuperNode for device NAME with its private data file DATA."""
    from fedfuse_server.launcher import LocalDeployment

    node = LocalDeployment.load(workdir).add_supernode(name, data)
    typer.echo(f"SuperNode {name} pid {node.pid} port {node.port}")


@deploy_app.command("run")
def deploy_run(
    run_config: str = typer.Option(..., "--run-config", "-c", help="e.g. \"phase='collect,fit' store='/abs/store'\""),
    workdir: Path = WORKDIR, app_dir: Path = typer.Option(Path("."), "--app", help="the Flower app (this repo)"),
) -> None:
    """`flwr run` the app against this deployment's SuperLink, streaming its logs."""
    from fedfuse_server.launcher import LocalDeployment

    typer.echo(LocalDeployment.load(workdir).run(app_dir, run_config))


@deploy_app.command("status")
def deploy_status(workdir: Path = WORKDIR) -> None:
    """The processes this deployment started and whether each is alive."""
    from fedfuse_server.launcher import LocalDeployment, alive_pid

    dep = LocalDeployment.load(workdir)
    procs = ({"superlink": dep.superlink} if dep.superlink else {}) | dep.supernodes
    for name, p in procs.items():
        typer.echo(f"{name:24s} pid {p.pid:<8d} port {p.port:<6d} {'alive' if alive_pid(p.pid) else 'gone'}")


@deploy_app.command("down")
def deploy_down(workdir: Path = WORKDIR) -> None:
    """Stop exactly the processes `up`/`add-node` started."""
    from fedfuse_server.launcher import LocalDeployment

    still = LocalDeployment.load(workdir).down()
    if still:
        typer.echo(f"ports still listening: {still}", err=True)
        raise typer.Exit(1)
    typer.echo("stopped")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


if __name__ == "__main__":
    app()
