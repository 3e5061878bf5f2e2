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


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


if __name__ == "__main__":
    app()
