"""What crosses the wire, as plain values (the apps wrap them in Flower records).

An upload carries the flat weights, the architecture, the task descriptor, the client's own id
and its number of training examples; a new client's query reply carries its id and descriptor;
its personalization reply carries metrics only. Parsers refuse anything else with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from fedfuse.errors import FedfuseError
from fedfuse.layout import MLPSpec

if TYPE_CHECKING:
    from fedfuse.posterior import ReadoutGaussian, WeightPosterior

# record names inside a message's RecordDict
WEIGHTS, META, CONFIG, METRICS, INIT = "weights", "meta", "config", "metrics", "init"
FLAT = "flat"  # the single array inside the weights / init ArrayRecord
# the initializer's readout prior, next to its weights (see fedfuse.finetune.condition_readout)
READOUT_FACTOR, READOUT_DIAG = "readout-factor", "readout-diag"
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
MAX_TAU = 4096  # descriptor entries
MAX_LAYERS = 32
MAX_WIDTH = 1_000_000
MAX_WEIGHTS = 50_000_000  # 200 MB of float32: anything larger is refused before it is read
MAX_ABS_WEIGHT = 1e4  # a trained weight this large means a broken or hostile model
# a device's answer to a receipt (the server telling it whether its upload was accepted)
RECEIPT, REASON, ACCEPTED, REJECTED = "receipt", "reason", "accepted", "rejected"


def initializer_arrays(post: "WeightPosterior", j: int) -> dict[str, np.ndarray]:
    """What a new device receives for task ``j`` of a posterior: the initializer's flat weights
    and, where there is one, its Gaussian readout prior (low-rank factor and diagonal)."""
    out = {FLAT: post.mean[j].detach().numpy().astype(np.float32)}
    if post.readout is not None:
        out[READOUT_FACTOR] = post.readout.factor[j].detach().numpy().astype(np.float32)
        out[READOUT_DIAG] = post.readout.diag[j].detach().numpy().astype(np.float32)
    return out


def readout_prior(spec: MLPSpec, flat: torch.Tensor, arrays: Mapping[str, np.ndarray]) -> "ReadoutGaussian | None":
    """The device side of :func:`initializer_arrays`: the readout prior for weights ``flat``
    ``(d,)`` of architecture ``spec``, or ``None`` when the server sent none. Shapes are checked
    against the device's own architecture."""
    from fedfuse.posterior import ReadoutGaussian

    if READOUT_FACTOR not in arrays or READOUT_DIAG not in arrays:
        return None
    factor, diag = np.asarray(arrays[READOUT_FACTOR]), np.asarray(arrays[READOUT_DIAG])
    p = spec.readout_index.numel()
    if factor.ndim != 2 or factor.shape[0] != p or diag.shape != (p,):
        raise FedfuseError(f"readout prior of shape {factor.shape}/{diag.shape} does not fit "
                           f"architecture {list(spec.sizes)} ({p} readout entries)")
    loc = flat[spec.readout_index.flatten()]
    return ReadoutGaussian(loc[None], torch.from_numpy(factor).float()[None], torch.from_numpy(diag).float()[None])


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
        raise UploadRejected(f"client-id must be a printable string of 1-{MAX_CLIENT_ID} "
                             f"characters, got {str(cid)[:40]!r}")
    return cid


def parse_tau(meta: Mapping[str, Any], tau_dim: int | None) -> list[float]:
    tau = meta.get("tau")
    if not isinstance(tau, list) or not tau or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tau):
        raise UploadRejected(f"tau must be a non-empty list of numbers, got {type(tau).__name__}")
    try:
        values = [float(t) for t in tau]
    except OverflowError as exc:
        raise UploadRejected("tau has entries too large to represent") from exc
    if not all(math.isfinite(t) for t in values):
        raise UploadRejected("tau has non-finite entries")
    if len(tau) > MAX_TAU:
        raise UploadRejected(f"tau has {len(tau)} entries; at most {MAX_TAU} are accepted")
    if tau_dim is not None and len(tau) != tau_dim:
        raise UploadRejected(f"tau has length {len(tau)}; this federation's descriptors have length {tau_dim}")
    return values


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
        raise UploadRejected(f"arch-sizes must be a list of integers, got {str(sizes)[:80]}")
    if not 1 <= len(sizes) <= MAX_LAYERS or max(sizes) > MAX_WIDTH:
        raise UploadRejected(f"arch-sizes {str(sizes)[:80]} is outside the accepted range "
                             f"(1-{MAX_LAYERS} layers of at most {MAX_WIDTH} units)")
    if not isinstance(act, str):
        raise UploadRejected(f"activation must be a string, got {type(act).__name__}")
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
    if spec.num_weights > MAX_WEIGHTS:
        raise UploadRejected(f"architecture {list(spec.sizes)} has {spec.num_weights} weights; "
                             f"at most {MAX_WEIGHTS} are accepted")
    if not isinstance(weights, np.ndarray) or weights.dtype.kind != "f":
        raise UploadRejected("weights must be a floating-point array")
    if weights.ndim != 1 or weights.size != spec.num_weights:
        raise UploadRejected(f"weights have shape {tuple(weights.shape)}; architecture "
                             f"{list(spec.sizes)} needs a flat vector of {spec.num_weights}")
    if not np.isfinite(weights).all():
        raise UploadRejected("weights contain NaN or infinite values")
    largest = float(np.abs(weights).max()) if weights.size else 0.0
    if largest > MAX_ABS_WEIGHT:
        raise UploadRejected(f"absurd weight magnitude {largest:.3g} (limit {MAX_ABS_WEIGHT:g})")
    return Upload(cid, spec, torch.from_numpy(weights.astype(np.float32)), tau, n_ex)


def parse_upload_content(content: Mapping[str, Any], expected: MLPSpec | None = None,
                         tau_dim: int | None = None) -> Upload:
    """Validate a whole upload message's records (any mapping of record name to record whose
    arrays expose ``shape``, ``data`` and ``numpy()``, as Flower's do) before deserializing."""
    extra = set(content) - {WEIGHTS, META}
    if extra:
        raise UploadRejected(f"unexpected records {sorted(extra)}; an upload carries only weights and meta")
    if WEIGHTS not in content or META not in content:
        raise UploadRejected("an upload needs a weights record and a meta record")
    arrays = content[WEIGHTS]
    if set(arrays) != {FLAT}:
        raise UploadRejected(f"the weights record must hold exactly one array {FLAT!r}, got {sorted(arrays)[:5]}")
    array = arrays[FLAT]
    if len(array.data) > 8 * MAX_WEIGHTS + 4096:
        raise UploadRejected(f"oversized upload: {len(array.data)} bytes of weights")
    if not isinstance(content[META], Mapping):
        raise UploadRejected("meta must be a record of key/value pairs")
    return parse_upload(dict(content[META]), array.numpy(), expected, tau_dim)
