"""`fedfuse store ...`: the operator's view of a model store, as a person runs it."""

import torch
from typer.testing import CliRunner

from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore
from fedfuse_sim.cli import app

SPEC = MLPSpec((1, 5, 1))


def _store(tmp_path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    for i, cid in enumerate(["dev-a", "dev-b", "dev-c"]):
        store.put(Upload(cid, SPEC, torch.full((SPEC.num_weights,), float(i)), [0.25 + i, 1.0], 1231 + i))
    return store


def _run(*args):
    return CliRunner().invoke(app, ["store", *map(str, args)])


def _file_of(store: ModelStore, cid: str):
    (entry,) = [e for e in store.entries() if e.client_id == cid]
    return store.root / entry.file


def test_ls_lists_every_entry_with_its_status(tmp_path):
    store = _store(tmp_path)
    store.quarantine("dev-c", "outlier in the fit's screen")
    result = _run("ls", store.root)
    assert result.exit_code == 0, result.output
    line = {cid: next(line for line in result.output.splitlines() if cid in line) for cid in ("dev-a", "dev-c")}
    assert "1231" in line["dev-a"] and "0.25" in line["dev-a"] and line["dev-a"].rstrip().endswith("ok")
    assert "quarantined: outlier in the fit's screen" in line["dev-c"]
    assert store.zoo().ids == ["dev-a", "dev-b"]


def test_rm_moves_the_file_to_quarantine_and_drops_the_entry(tmp_path):
    store = _store(tmp_path)
    path = _file_of(store, "dev-b")
    result = _run("rm", store.root, "dev-b")
    assert result.exit_code == 0, result.output
    assert store.zoo().ids == ["dev-a", "dev-c"] and not path.exists()
    assert (store.root / "quarantine" / path.name).is_file()
    result = _run("rm", store.root, "nobody")
    assert result.exit_code == 1 and "'nobody'" in result.output and "fedfuse store ls" in result.output


def test_verify_lists_each_problem_and_exits_1(tmp_path):
    store = _store(tmp_path)
    result = _run("verify", store.root)
    assert result.exit_code == 0 and "3 entries" in result.output
    tampered = _file_of(store, "dev-b")
    tampered.write_bytes(tampered.read_bytes()[:-4] + b"\x00" * 4)
    _file_of(store, "dev-c").unlink()
    result = _run("verify", store.root)
    assert result.exit_code == 1
    problems = [line for line in result.output.splitlines() if "'dev-" in line]
    assert len(problems) == 2
    assert "'dev-b'" in problems[0] and "does not match its index entry" in problems[0]
    assert "'dev-c'" in problems[1] and "cannot be read" in problems[1]


def test_rebuild_index_replaces_a_damaged_index_and_keeps_it(tmp_path):
    store = _store(tmp_path)
    damaged = b"not a database" * 100
    (store.root / "index.sqlite").write_bytes(damaged)
    result = _run("ls", store.root)
    assert result.exit_code == 1 and f"fedfuse store rebuild-index {store.root}" in result.output
    result = _run("rebuild-index", store.root)
    assert result.exit_code == 0, result.output
    assert (store.root / "index.sqlite.bak").read_bytes() == damaged
    zoo = ModelStore(store.root).zoo()
    assert zoo.ids == ["dev-a", "dev-b", "dev-c"] and zoo.n_examples == [1231, 1232, 1233]
    result = _run("rebuild-index", store.root)  # never overwrites an earlier backup
    assert result.exit_code == 1 and "index.sqlite.bak already exists" in result.output


def test_rebuild_index_carries_rounds_metrics_and_quarantine_over(tmp_path):
    store = _store(tmp_path)
    store.record_round("collect", {"accepted": ["dev-a", "dev-b", "dev-c"]})
    store.record_metrics("new-1", "run-1", {"score-0shot": 0.5})
    store.quarantine("dev-c", "outlier")
    result = _run("rebuild-index", store.root)
    assert result.exit_code == 0, result.output
    again = ModelStore(store.root)
    assert again.zoo().ids == ["dev-a", "dev-b"]
    assert again.rounds() == store.rounds() and again.metrics() == {"new-1": {"score-0shot": 0.5}}
    assert [(e.client_id, e.status, e.reason) for e in again.entries() if e.status != "ok"] == [
        ("dev-c", "quarantined", "outlier")]


def test_commands_refuse_a_folder_that_holds_no_store(tmp_path):
    for command in ("ls", "verify", "rebuild-index"):
        result = _run(command, tmp_path / "typo")
        assert result.exit_code != 0 and "holds no model store" in result.output
    assert not (tmp_path / "typo").exists()
