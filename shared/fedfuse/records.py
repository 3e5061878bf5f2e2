"""Flower records <-> :class:`fedfuse.wire.Payload`: the one module of the core that knows
Flower, because Flower records are what travels (the apps use it; the math never does).

A message holds at most one record of each kind, by name: ``arrays`` (an ``ArrayRecord``),
``config`` (a ``ConfigRecord``) and ``metrics`` (a ``MetricRecord``). Anything else is refused
before a value is read; arrays stay undecoded until :func:`fedfuse.wire.decode_array` has
checked their declared size.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfuse.errors import MessageRejected
from fedfuse.wire import Payload

_KINDS = {"arrays": ArrayRecord, "config": ConfigRecord, "metrics": MetricRecord}


def to_records(payload: Payload) -> RecordDict:
    content = RecordDict()
    if payload.arrays:
        content["arrays"] = ArrayRecord({k: v if isinstance(v, Array) else Array(np.ascontiguousarray(v))
                                         for k, v in payload.arrays.items()})
    if payload.config:
        content["config"] = ConfigRecord(dict(payload.config))
    if payload.metrics:
        content["metrics"] = MetricRecord(dict(payload.metrics))
    return content


def from_records(content: Mapping[str, Any]) -> Payload:
    """The payload of a message's content; a record of the wrong kind or name is refused."""
    names = list(content.keys())
    unknown = [n for n in names if n not in _KINDS]
    if unknown:
        raise MessageRejected(f"unexpected records {sorted(map(str, unknown))[:5]}; a message holds only "
                              f"{sorted(_KINDS)}")
    parts: dict[str, dict[str, Any]] = {}
    for name, kind in _KINDS.items():
        if name not in names:
            parts[name] = {}
            continue
        record = content[name]
        if not isinstance(record, kind):
            raise MessageRejected(f"record {name!r} must be a {kind.__name__}, got {type(record).__name__}")
        parts[name] = dict(record.items())
    return Payload(parts["arrays"], parts["config"], parts["metrics"])
