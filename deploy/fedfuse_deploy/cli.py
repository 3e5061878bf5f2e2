"""``fedfuse deploy``: a real deployment on this machine (SuperLink and SuperNodes as separate
processes, TLS and SuperNode authentication by default)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Run a real deployment on this machine: SuperLink and SuperNodes as "
                              "separate processes (TLS and SuperNode authentication by default).",
                         no_args_is_help=True)
WORKDIR = typer.Option(Path("runs/deploy"), help="folder holding the deployment's state, logs, keys")


@app.command("certs")
def deploy_certs(
    out: Path = typer.Option(Path("deploy/certs"), help="folder for ca.crt, server.pem, server.key"),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], help="IP or DNS name the SuperLink is reached at (repeat)"),
) -> None:
    """Make a CA and a SuperLink server certificate for the given hosts."""
    from fedfuse_deploy.credentials import make_certificates

    certs = make_certificates(out, host)
    typer.echo(f"CA {certs.ca_cert}\nserver certificate {certs.server_cert} for {', '.join(host)}")


@app.command("node-key")
def deploy_node_key(name: str, out: Path = typer.Option(Path("deploy/keys"))) -> None:
    """Make a SuperNode's EC key pair (register NAME.pub with `flwr supernode register`)."""
    from fedfuse_deploy.credentials import make_node_keys

    private, public = make_node_keys(out, name)
    typer.echo(f"private key {private}\npublic key {public}")


@app.command("device-data")
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


@app.command("up")
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


@app.command("add-node")
def deploy_add_node(name: str, data: Path, workdir: Path = WORKDIR) -> None:
    """Start one more SuperNode for device NAME with its private data file DATA."""
    from fedfuse_deploy.launcher import LocalDeployment

    node = LocalDeployment.load(workdir).add_supernode(name, data)
    typer.echo(f"SuperNode {name} pid {node.pid} port {node.port}")


@app.command("run")
def deploy_run(
    run_config: str = typer.Option(..., "--run-config", "-c", help="e.g. \"phase='collect,fit' store='/abs/store'\""),
    workdir: Path = WORKDIR, app_dir: Path = typer.Option(Path("."), "--app", help="the Flower app (this repo)"),
) -> None:
    """`flwr run` the app against this deployment's SuperLink, streaming its logs."""
    from fedfuse_deploy.launcher import LocalDeployment

    typer.echo(LocalDeployment.load(workdir).run(app_dir, run_config))


@app.command("status")
def deploy_status(workdir: Path = WORKDIR) -> None:
    """The processes this deployment started and whether each is alive."""
    from fedfuse_deploy.launcher import LocalDeployment, alive_pid

    dep = LocalDeployment.load(workdir)
    procs = ({"superlink": dep.superlink} if dep.superlink else {}) | dep.supernodes
    for name, p in procs.items():
        typer.echo(f"{name:24s} pid {p.pid:<8d} port {p.port:<6d} {'alive' if alive_pid(p.pid) else 'gone'}")


@app.command("down")
def deploy_down(workdir: Path = WORKDIR) -> None:
    """Stop exactly the processes `up`/`add-node` started."""
    from fedfuse_deploy.launcher import LocalDeployment

    still = LocalDeployment.load(workdir).down()
    if still:
        typer.echo(f"ports still listening: {still}", err=True)
        raise typer.Exit(1)
    typer.echo("stopped")
