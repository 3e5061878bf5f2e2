"""The server operator's commands: ``fedfuse store ...`` (inspect and repair a model store) and
``fedfuse serve`` (the initializer service)."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import typer

store_app = typer.Typer(help="Inspect and repair a server's model store (the folder its store= setting "
                             "names). Stop the server before rm and rebuild-index.",
                        no_args_is_help=True)
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


def serve_initializers(
    store: Path = typer.Option(..., help="the server's store folder (its meta-model is served; a new fit is picked up)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=1, max=65535),
    replicas: int = typer.Option(1, min=1, help="Serve replicas (one CPU each)"),
    token_file: Path | None = typer.Option(None, help="file holding the bearer token clients must send"),
    access_log: bool = typer.Option(True, help="a log line per request (off: less CPU per request under load)"),
) -> None:
    """Serve personalized initializers over HTTP (Ray Serve) until Ctrl-C: POST /v1/initializers,
    GET /v1/model, GET /healthz. Joins the Ray cluster RAY_ADDRESS names, else starts a local Ray."""
    from fedfuse_server.serve import serve_until_stopped

    with _operator_errors():
        serve_until_stopped(_existing(store), lambda url: typer.echo(f"serving initializers at {url} (Ctrl-C stops)"),
                            host=host, port=port, replicas=replicas, token_file=token_file,
                            access_log=access_log)
    typer.echo("stopped")
