"""Weights on disk: safetensors plus a JSON header, written atomically. Never pickle."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save, save_file

from fedfuse.errors import FedfuseError

_META_KEY = "fedfuse"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                 sync_dir: bool = True) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to ``path``: temp file in the same folder, fsync,
    rename, fsync the folder; a reader never sees a half-written file, and once this returns the
    file survives a power failure (so an index entry written afterwards never names a lost file).
    ``sync_dir=False`` leaves the folder's fsync to a caller that writes many files into it and
    syncs it once before it names any of them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        prepared, header = _prepared(tensors, meta)
        save_file(prepared, tmp, metadata=header)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def dump_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """:func:`save_tensors`'s format as bytes, for a file that is sent rather than written;
    :func:`parse_tensors` reads it back."""
    prepared, header = _prepared(tensors, meta)
    return save(prepared, metadata=header)


def _prepared(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, {_META_KEY: json.dumps(meta)}


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the folder's entries (a rename, a new file) durable: fsyncing a file does not."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise FedfuseError(f"no such file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FedfuseError(f"{path} is not a readable safetensors file: {exc}") from exc
    return parse_tensors(data, path)


def parse_tensors(data: bytes, source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`load_tensors` on bytes already read, so that a hash check and the parse see the
    same bytes; ``source`` names them in errors."""
    try:
        tensors = load(data)
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size]).get("__metadata__") or {}
        meta = json.loads(header[_META_KEY]) if _META_KEY in header else None
    except (SafetensorError, ValueError, struct.error) as exc:
        raise FedfuseError(f"{source} is not a readable safetensors file: {exc}") from exc
    if not isinstance(meta, dict):
        raise FedfuseError(f"{source} was not written by fedfuse (no '{_META_KEY}' header)")
    return tensors, meta


def peek_tensors(path: str | os.PathLike, names: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The header and only the named tensors of a :func:`save_tensors` file: a listing of many
    large files reads a few bytes of each."""
    try:
        with safe_open(path, framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in names}
        meta = json.loads(header[_META_KEY]) if _META_KEY in header else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise FedfuseError(f"{path} is not a readable safetensors file: {exc}") from exc
    if not isinstance(meta, dict):
        raise FedfuseError(f"{path} was not written by fedfuse (no '{_META_KEY}' header)")
    return tensors, meta
