"""What the server prints at the end of a personalize phase, in the family's own score."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfuse.tasks import Score


def personalized_table(results: dict[str, dict[str, Any]], score: Score) -> Table:
    better = "higher" if score.higher_is_better else "lower"
    table = Table(title=f"personalized devices: {score.name} on their own held-back examples ({better} is better)")
    for col in ("device", "shots", "ours 0-shot", "adapted", "cold 0-shot", "cold tuned", "uncert."):
        table.add_column(col, justify="right", no_wrap=True)
    cell = lambda v: f"{v:.{score.digits}f}"  # noqa: E731
    for cid, m in sorted(results.items()):  # a client's id is text, never markup
        table.add_row(escape(cid), str(int(m["shots"])), *(cell(m[k]) for k in (
            "score-0shot", "score-adapted", "cold-score-0shot", "cold-score-adapted")), f"{m['uncertainty']:.3f}")
    if results:
        mean = lambda k: sum(m[k] for m in results.values()) / len(results)  # noqa: E731
        table.add_row("mean", "", *(cell(mean(k)) for k in (
            "score-0shot", "score-adapted", "cold-score-0shot", "cold-score-adapted")), "", style="bold")
    return table


def print_personalized(results: dict[str, dict[str, Any]], score: Score) -> None:
    Console().print(personalized_table(results, score))
