"""What crosses the wire, as plain values (the apps wrap them in Flower records).

An upload carries the flat weights, the architecture, the task descriptor, the client's own id
and its number of training examples; a new client's query reply carries its id and descriptor;
its personalization reply carries metrics only. Parsers refuse anything else with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from fedfuse.errors import FedfuseError
from fedfuse.layout import MLPSpec

# record names inside a message's RecordDict
WEIGHTS, META, CONFIG, METRICS, INIT = "weights", "meta", "config", "metrics", "init"
FLAT = "flat"  # the single array inside the weights / init ArrayRecord
# message actions (in the server's CONFIG record)
ACTION, UPLOAD, PERSONALIZE = "action", "upload", "personalize"
# status a device answers an upload request with when it has no model of its own to share
STATUS, DECLINED = "status", "declined"

UPLOAD_META_KEYS = frozenset({"client-id", "arch-sizes", "activation", "tau", "n-examples"})
QUERY_META_KEYS = frozenset({"client-id", "tau"})
DECLINE_META_KEYS = frozenset({"client-id", STATUS})
METRIC_KEYS = frozenset({"shots", "score-0shot", "score-finetuned", "cold-score-0shot",
                         "cold-score-finetuned"})
MAX_CLIENT_ID = 128


class UploadRejected(FedfuseError):
    """An upload the server refuses; the message says exactly why."""


@dataclass(frozen=True)
class Upload:
    client_id: str
    spec: MLPSpec
    weights: torch.Tensor
    tau: list[float]
    n_examples: int


def upload_meta(client_id: str, spec: MLPSpec, tau: list[float], n_examples: int) -> dict[str, Any]:
    return {"client-id": client_id, "arch-sizes": list(spec.sizes), "activation": spec.activation,
            "tau": [float(t) for t in tau], "n-examples": int(n_examples)}


def client_id_of(meta: Mapping[str, Any]) -> str:
    cid = meta.get("client-id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CLIENT_ID or not cid.isprintable():
        raise UploadRejected(f"client-id must be a printable string of 1-{MAX_CLIENT_ID} characters, got {cid!r}")
    return cid


def parse_tau(meta: Mapping[str, Any], tau_dim: int | None) -> list[float]:
    tau = meta.get("tau")
    if not isinstance(tau, list) or not tau or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tau):
        raise UploadRejected(f"tau must be a non-empty list of numbers, got {type(tau).__name__}")
    if not all(math.isfinite(t) for t in tau):
        raise UploadRejected("tau has non-finite entries")
    if tau_dim is not None and len(tau) != tau_dim:
        raise UploadRejected(f"tau has length {len(tau)}; this federation's descriptors have length {tau_dim}")
    return [float(t) for t in tau]


def parse_upload(meta: Mapping[str, Any], weights: np.ndarray, expected: MLPSpec | None = None,
                 tau_dim: int | None = None) -> Upload:
    """Validate one upload; ``expected``/``tau_dim`` pin the federation's architecture."""
    extra = set(meta) - UPLOAD_META_KEYS
    if extra:
        raise UploadRejected(f"unexpected metadata keys {sorted(extra)}; an upload carries only {sorted(UPLOAD_META_KEYS)}")
    missing = UPLOAD_META_KEYS - set(meta)
    if missing:
        raise UploadRejected(f"missing metadata keys {sorted(missing)}")
    cid = client_id_of(meta)
    sizes, act = meta["arch-sizes"], meta["activation"]
    if not isinstance(sizes, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise UploadRejected(f"arch-sizes must be a list of integers, got {sizes!r}")
    try:
        spec = MLPSpec(tuple(sizes), str(act))
    except FedfuseError as exc:
        raise UploadRejected(f"bad architecture: {exc}") from exc
    if expected is not None and spec != expected:
        raise UploadRejected(f"architecture {list(spec.sizes)}/{spec.activation} does not match the "
                             f"federation's {list(expected.sizes)}/{expected.activation}")
    n_ex = meta["n-examples"]
    if not isinstance(n_ex, int) or isinstance(n_ex, bool) or n_ex < 0:
        raise UploadRejected(f"n-examples must be a non-negative integer, got {n_ex!r}")
    tau = parse_tau(meta, tau_dim)
    if not isinstance(weights, np.ndarray) or weights.dtype.kind != "f":
        raise UploadRejected("weights must be a floating-point array")
    if weights.ndim != 1 or weights.size != spec.num_weights:
        raise UploadRejected(f"weights have shape {tuple(weights.shape)}; architecture "
                             f"{list(spec.sizes)} needs a flat vector of {spec.num_weights}")
    if not np.isfinite(weights).all():
        raise UploadRejected("weights contain NaN or infinite values")
    return Upload(cid, spec, torch.from_numpy(weights.astype(np.float32)), tau, n_ex)
