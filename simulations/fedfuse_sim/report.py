"""Result tables: per-task scores to CSV, mean +- std summaries to JSON, markdown and the terminal."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def summarize(rows: list[dict[str, Any]], metric: str) -> dict[str, dict[int, tuple[float, float]]]:
    """``{method: {shots: (mean, std)}}`` over the per-task rows."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], int(r["shots"]))].append(float(r[metric]))
    out: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for (method, shots), vals in groups.items():
        out[method][shots] = (float(np.mean(vals)), float(np.std(vals)))
    return dict(out)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(summary: dict[str, dict[int, tuple[float, float]]], shots: list[int],
                   paper: dict[str, list[float]] | None = None, digits: int = 3) -> str:
    head = "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    lines = [head, "|---" * (len(shots) + 1) + "|"]
    for method, by_shots in summary.items():
        cells = [f"{by_shots[k][0]:.{digits}f} ± {by_shots[k][1]:.{digits}f}" if k in by_shots else "—"
                 for k in shots]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method, vals in (paper or {}).items():
        lines.append(f"| paper: {method} | " + " | ".join(f"{v:.{digits}f}" for v in vals) + " |")
    return "\n".join(lines)


def print_table(summary: dict[str, dict[int, tuple[float, float]]], shots: list[int], title: str,
                digits: int = 3) -> None:
    table = Table(title=title)
    table.add_column("method")
    for k in shots:
        table.add_column(f"{k}-shot", justify="right")
    for method, by_shots in summary.items():
        table.add_row(method, *[f"{by_shots[k][0]:.{digits}f} ± {by_shots[k][1]:.{digits}f}"
                                if k in by_shots else "—" for k in shots])
    Console().print(table)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
