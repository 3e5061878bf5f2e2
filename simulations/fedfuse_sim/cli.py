"""``fedfuse``: the command line (typer). Each experiment writes its figures and tables to --out."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import typer

from fedfuse_deploy.cli import app as deploy_app
from fedfuse_server.cli import serve_initializers, store_app

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


app.add_typer(deploy_app, name="deploy")
app.add_typer(store_app, name="store")
app.command("serve")(serve_initializers)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


if __name__ == "__main__":
    app()
