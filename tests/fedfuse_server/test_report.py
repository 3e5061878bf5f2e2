"""The personalize table shows client ids as sent: a device cannot style or link the operator's
console with Rich markup in its id."""

from rich.console import Console

from fedfuse.tasks import Score
from fedfuse_server.report import personalized_table


def test_client_ids_are_printed_literally_not_as_markup():
    metrics = {"shots": 10, "score-0shot": 0.1, "score-adapted": 0.05, "cold-score-0shot": 0.4,
               "cold-score-adapted": 0.2, "uncertainty": 0.1}
    cid = "[link=https://evil.example]new-0[/link][bold red]"
    console = Console(record=True, width=300, color_system=None)
    console.print(personalized_table({cid: metrics}, Score("nRMSE", higher_is_better=False)))
    assert cid in console.export_text()
