"""Result tables: per-task scores to CSV, mean +- std summaries to JSON, markdown and the terminal.

A summary is ``{method: {column: (mean, std)}}``; a column is a label such as ``"10-shot"`` or
``"K=3 1-shot"``. Means and standard deviations run over every test task of every seed.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

Summary = dict[str, dict[str, tuple[float, float]]]


def shot_column(row: dict[str, Any]) -> str:
    return f"{row['shots']}-shot"


def summarize(rows: list[dict[str, Any]], metric: str,
              column: Callable[[dict[str, Any]], str] = shot_column) -> Summary:
    """``{method: {column: (mean, std)}}`` over the per-task rows (methods in first-seen order)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], column(r))].append(float(r[metric]))
    out: Summary = {}
    for (method, col), vals in groups.items():
        out.setdefault(method, {})[col] = (float(np.mean(vals)), float(np.std(vals)))
    return out


def seed_spread(rows: list[dict[str, Any]], metric: str,
                column: Callable[[dict[str, Any]], str] = shot_column) -> Summary:
    """``{method: {column: (mean, std)}}`` of the per-seed means: how much a rerun moves."""
    per_seed: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        per_seed[(r["method"], column(r), int(r["seed"]))].append(float(r[metric]))
    means: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (method, col, _), vals in per_seed.items():
        means[(method, col)].append(float(np.mean(vals)))
    out: Summary = {}
    for (method, col), vals in means.items():
        out.setdefault(method, {})[col] = (float(np.mean(vals)), float(np.std(vals)))
    return out


def over_seeds(seeds: tuple[int, ...], run_seed: Callable[[int], tuple[list[dict[str, Any]], dict[str, Any]]]
               ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run one benchmark seed after another: all rows, and each seed's extras by seed."""
    rows, per_seed = [], {}
    for seed in seeds:
        seed_rows, per_seed[str(seed)] = run_seed(seed)
        rows += seed_rows
    return rows, per_seed


def worse_than_zero_shot(rows: list[dict[str, Any]], method: str, metric: str, lower_is_better: bool,
                         group: tuple[str, ...] = ("seed", "task")) -> dict[str, float]:
    """Per shot count, the share of test tasks whose fine-tuned score is worse than the same
    method's 0-shot score (fine-tuning should not destroy a good initializer)."""
    zero = {tuple(r[g] for g in group): float(r[metric]) for r in rows
            if r["method"] == method and int(r["shots"]) == 0}
    worse: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        key = tuple(r[g] for g in group)
        if r["method"] == method and int(r["shots"]) > 0 and key in zero:
            delta = float(r[metric]) - zero[key]
            worse[f"{r['shots']}-shot"].append(delta > 0 if lower_is_better else delta < 0)
    return {col: float(np.mean(v)) for col, v in worse.items()}


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _cell(by_col: dict[str, tuple[float, float]], col: str, digits: int) -> str:
    if col not in by_col:
        return "—"
    mean, std = by_col[col]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: Summary, columns: list[str],
                   paper: dict[str, dict[str, float]] | None = None, digits: int = 3) -> str:
    """Measured rows, then the paper's rows (``paper: method``) for the columns it reports."""
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, by_col in summary.items():
        lines.append(f"| {method} | " + " | ".join(_cell(by_col, c, digits) for c in columns) + " |")
    for method, vals in (paper or {}).items():
        cells = [f"{vals[c]:.{digits}f}" if c in vals else "—" for c in columns]
        lines.append(f"| paper: {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(summary: Summary, columns: list[str], title: str, digits: int = 3) -> None:
    table = Table(title=title)
    table.add_column("method")
    for c in columns:
        table.add_column(c, justify="right")
    for method, by_col in summary.items():
        table.add_row(method, *[_cell(by_col, c, digits) for c in columns])
    Console().print(table)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def finish(out: Path, rows: list[dict[str, Any]], metric: str, columns: list[str],
           paper: dict[str, dict[str, float]], title: str, extra: dict[str, Any],
           column: Callable[[dict[str, Any]], str] = shot_column, digits: int = 3,
           progress: bool = True) -> dict[str, Any]:
    """Write ``results.csv``, ``table.md`` and ``summary.json``; print the table."""
    summary = summarize(rows, metric, column)
    write_rows(out / "results.csv", rows)
    notes = extra.get("notes", [])
    table = markdown_table(summary, columns, paper, digits)
    (out / "table.md").write_text(f"{title}\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes))
    result = {"metric": metric, "summary": summary, "seed_spread": seed_spread(rows, metric, column),
              "paper": paper, **extra}
    write_json(out / "summary.json", result)
    if progress:
        print_table(summary, columns, title, digits)
        for n in notes:
            Console().print(n)
    return result
