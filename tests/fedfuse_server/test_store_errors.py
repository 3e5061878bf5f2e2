"""Storage failures are StoreErrors (not ValueErrors: the input was fine) that name the path."""

import errno
import os
import shutil

import pytest
import torch

from fedfuse.errors import FedfuseError, FedfuseFailure, StoreError
from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore

SPEC = MLPSpec((1, 5, 1))


def _upload(cid: str) -> Upload:
    return Upload(cid, SPEC, torch.ones(SPEC.num_weights), [1.0, 0.5], 10)


def test_store_errors_are_failures_not_bad_input():
    assert issubclass(StoreError, FedfuseFailure)
    assert not issubclass(StoreError, (ValueError, FedfuseError))


def test_a_damaged_index_names_itself_and_the_repair(tmp_path):
    ModelStore(tmp_path).record_round("collect", {})
    (tmp_path / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="fedfuse store rebuild-index") as err:
        ModelStore(tmp_path)
    assert str(tmp_path / "index.sqlite") in str(err.value)


def _break_uploads_folder(root) -> None:
    """A regular file where uploads/ should be: no process, root included, can write there."""
    shutil.rmtree(root / "uploads")
    (root / "uploads").write_bytes(b"")


def test_a_failed_write_names_the_path(tmp_path):
    store = ModelStore(tmp_path)
    _break_uploads_folder(tmp_path)
    with pytest.raises(StoreError, match=str(tmp_path / "uploads")):
        store.put(_upload("a"))


def test_check_writable_passes_and_leaves_nothing_behind(tmp_path):
    store = ModelStore(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    store.check_writable()
    assert sorted(tmp_path.rglob("*")) == before


def test_check_writable_names_a_folder_that_takes_no_files(tmp_path):
    store = ModelStore(tmp_path)
    _break_uploads_folder(tmp_path)
    with pytest.raises(StoreError, match=f"{tmp_path / 'uploads'} is not writable"):
        store.check_writable()


def test_check_writable_names_a_full_disk(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match=f"{tmp_path} is not writable.*No space left on device"):
        store.check_writable()
