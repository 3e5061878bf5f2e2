import os
import stat

import torch

from fedfuse.io import load_tensors, save_tensors


def test_save_fsyncs_the_file_then_its_folder_after_the_rename(tmp_path, monkeypatch):
    """A durable index row must never point at a rename that a power failure undid: the folder
    entry is fsynced once the file is in place."""
    path = tmp_path / "sub" / "w.safetensors"
    synced: list[tuple[str, int, bool]] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino, path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    save_tensors(path, {"w": torch.arange(3.0)}, {"k": 1})
    assert [(kind, done) for kind, _, done in synced] == [("file", False), ("dir", True)]
    assert synced[0][1] == path.stat().st_ino and synced[1][1] == path.parent.stat().st_ino
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta == {"k": 1}
