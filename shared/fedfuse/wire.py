"""The protocol: every message between the server and a device, one builder and one parser each.

Devices never call the server; the server asks and the devices answer. Every message is routed
by its Flower message type (``train.<action>`` or ``query.<action>``):

==================  ====================  ==================================================
request (server)    reply (device)        content of the reply / request
==================  ====================  ==================================================
``train.upload``    upload                arrays ``flat``; config ``client-id``, ``arch``
                                          (JSON), ``tau``, ``n-examples``
``train.upload``    decline               config ``client-id``, ``status = "declined"``
``query.describe``  description           config ``client-id``, ``tau``
``query.receipt``   (empty)               request config ``status`` (accepted/rejected),
                                          ``reason``
``train.personalize`` metrics             request: arrays ``flat`` [, ``readout-factor``,
                                          ``readout-diag``], config ``uncertainty``,
                                          ``novelty``, ``distilled``; reply: metrics ``shots``,
                                          ``score-0shot``, ``score-adapted``,
                                          ``cold-score-0shot``, ``cold-score-adapted``
==================  ====================  ==================================================

A new device may also ask the initializer service (``fedfuse serve``) over HTTP instead:
``POST /v1/initializers`` with :func:`initializer_request` (JSON ``client_id``, ``descriptor``,
optionally ``samples`` and ``distill``), answered by :func:`initializer_file`, a safetensors file
with the same arrays (plus ``samples``) and a ``fedfuse`` header naming the architecture, family,
meta-model version, uncertainty, novelty, low-confidence and distilled flags; the response header
``X-Content-SHA256`` carries the body's hash. :func:`parse_initializer_request` and
:func:`parse_initializer_file` are their parsers.

A message's content is a :class:`Payload` (one array, one config and one metric record, each
possibly empty), plain values that :mod:`fedfuse.records` maps to Flower records. Parsers refuse
anything else with :class:`~fedfuse.errors.MessageRejected` and a reason; nothing a device
sends is trusted before it is checked, and no array is decoded before its declared size is.
No raw example, label or gradient ever leaves a device.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from fedfuse import architectures
from fedfuse.architectures import Architecture
from fedfuse.errors import ArchitectureError, FedfuseError, MessageRejected

if TYPE_CHECKING:
    from fedfuse.posterior import ReadoutGaussian, WeightPosterior

# Flower message types of the server's requests
UPLOAD, DESCRIBE, RECEIPT, PERSONALIZE = "train.upload", "query.describe", "query.receipt", "train.personalize"
# keys
FLAT = "flat"
READOUT_FACTOR, READOUT_DIAG = "readout-factor", "readout-diag"
STATUS, REASON, DECLINED, ACCEPTED, REJECTED = "status", "reason", "declined", "accepted", "rejected"
UPLOAD_KEYS = frozenset({"client-id", "arch", "tau", "n-examples"})
METRIC_KEYS = ("shots", "score-0shot", "score-adapted", "cold-score-0shot", "cold-score-adapted")
# the initializer service (HTTP)
SAMPLES, DISTILL = "samples", "distill"
DISTILLED = "distilled"  # an initializer's flag: made by the distilled path
REQUEST_KEYS = frozenset({"client_id", "descriptor", SAMPLES, DISTILL})
INITIALIZER_FORMAT = "fedfuse.initializer/1"
CHECKSUM_HEADER, VERSION_HEADER = "X-Content-SHA256", "X-Model-Version"
MAX_SAMPLES = 64
MAX_REQUEST_BYTES = 256 * 1024
# limits: anything beyond them is refused before it is decoded
MAX_CLIENT_ID = 128
MAX_TAU = 4096
MAX_ARCH_JSON = 4096
MAX_WEIGHTS = 50_000_000  # 200 MB of float32
MAX_ABS_WEIGHT = 1e4  # a trained weight this large means a broken or hostile model
MAX_ABS_TAU = 1e30  # far inside float32, so a stored descriptor stays finite
MAX_ABS_METRIC = 1e6  # a score or count beyond this means a broken or hostile device; it would swamp every mean


@dataclass(frozen=True)
class Payload:
    """A message's content as plain values: arrays, config values, metrics."""

    arrays: dict[str, Any] = field(default_factory=dict)  # numpy arrays, or undecoded arrays
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class Upload:
    client_id: str
    spec: Architecture
    weights: torch.Tensor
    tau: list[float]
    n_examples: int


@dataclass(frozen=True)
class Initializer:
    """What a new device receives: its initializer and, where there is one, the Gaussian prior
    of its readout (for :func:`fedfuse.adaptation.condition_readout`)."""

    weights: torch.Tensor  # (d,)
    readout: "ReadoutGaussian | None"
    uncertainty: float
    novelty: float
    distilled: bool = False  # made by the slower, distilled path (what the device asked for may not be)


# -- upload / decline ---------------------------------------------------------------------------
def upload(client_id: str, spec: Architecture, weights: torch.Tensor, tau: list[float], n_examples: int) -> Payload:
    return Payload(arrays={FLAT: weights.detach().cpu().numpy().astype(np.float32).reshape(-1)},
                   config={"client-id": client_id, "arch": json.dumps(spec.to_dict()),
                           "tau": [float(t) for t in tau], "n-examples": int(n_examples)})


def decline(client_id: str) -> Payload:
    """A device with no model of its own to share (a new device)."""
    return Payload(config={"client-id": client_id, STATUS: DECLINED})


def is_decline(payload: Payload) -> bool:
    return not payload.arrays and payload.config.get(STATUS) == DECLINED and set(payload.config) == {"client-id", STATUS}


def parse_upload(payload: Payload, expected: Architecture, tau_dim: int) -> Upload:
    """Validate one upload against the federation's pinned architecture and descriptor length."""
    if payload.metrics:
        raise MessageRejected("an upload carries no metrics")
    meta = payload.config
    extra, missing = set(meta) - UPLOAD_KEYS, UPLOAD_KEYS - set(meta)
    if extra:
        raise MessageRejected(f"unexpected metadata keys {sorted(map(str, extra))[:5]}; an upload carries "
                              f"only {sorted(UPLOAD_KEYS)}")
    if missing:
        raise MessageRejected(f"missing metadata keys {sorted(missing)}")
    cid = parse_client_id(meta)
    spec = _parse_arch(meta["arch"], expected)
    n_ex = meta["n-examples"]
    if not isinstance(n_ex, int) or isinstance(n_ex, bool) or n_ex < 0:
        raise MessageRejected(f"n-examples must be a non-negative integer, got {str(n_ex)[:40]!r}")
    tau = parse_tau(meta, tau_dim)
    if set(payload.arrays) != {FLAT}:
        raise MessageRejected(f"an upload holds exactly one array {FLAT!r}, got {sorted(map(str, payload.arrays))[:5]}")
    weights = decode_array(payload.arrays[FLAT], (spec.num_weights,), f"weights of {spec}")
    if not np.isfinite(weights).all():
        raise MessageRejected("weights contain NaN or infinite values")
    largest = float(np.abs(weights).max()) if weights.size else 0.0
    if largest > MAX_ABS_WEIGHT:
        raise MessageRejected(f"absurd weight magnitude {largest:.3g} (limit {MAX_ABS_WEIGHT:g})")
    return Upload(cid, spec, torch.from_numpy(weights.astype(np.float32)), tau, n_ex)


# -- describe -----------------------------------------------------------------------------------
def description(client_id: str, tau: list[float]) -> Payload:
    return Payload(config={"client-id": client_id, "tau": [float(t) for t in tau]})


def parse_description(payload: Payload, tau_dim: int) -> tuple[str, list[float]]:
    if payload.arrays or payload.metrics or set(payload.config) != {"client-id", "tau"}:
        raise MessageRejected("a description carries exactly client-id and tau")
    return parse_client_id(payload.config), parse_tau(payload.config, tau_dim)


# -- receipt ------------------------------------------------------------------------------------
def receipt(accepted: bool, reason: str = "") -> Payload:
    return Payload(config={STATUS: ACCEPTED if accepted else REJECTED, REASON: reason})


def parse_receipt(payload: Payload) -> tuple[bool, str]:
    status, reason = payload.config.get(STATUS), payload.config.get(REASON, "")
    if status not in (ACCEPTED, REJECTED) or not isinstance(reason, str):
        raise MessageRejected(f"a receipt's status is {ACCEPTED!r} or {REJECTED!r}, got {str(status)[:40]!r}")
    return status == ACCEPTED, reason


# -- initializer --------------------------------------------------------------------------------
def initializer(post: "WeightPosterior", j: int) -> Payload:
    """Task ``j`` of a posterior, as the server sends it to its device."""
    arrays = {FLAT: post.mean[j].detach().numpy().astype(np.float32)}
    if post.readout is not None:
        arrays[READOUT_FACTOR] = post.readout.factor[j].detach().numpy().astype(np.float32)
        arrays[READOUT_DIAG] = post.readout.diag[j].detach().numpy().astype(np.float32)
    return Payload(arrays=arrays, config={"uncertainty": float(post.uncertainty[j]),
                                          "novelty": float(post.novelty[j]), DISTILLED: bool(post.distilled)})


def parse_initializer(payload: Payload, spec: Architecture) -> Initializer:
    """The device side: every array checked against the device's own architecture."""
    from fedfuse.posterior import ReadoutGaussian

    extra = set(payload.arrays) - {FLAT, READOUT_FACTOR, READOUT_DIAG}
    if FLAT not in payload.arrays or extra:
        raise MessageRejected(f"an initializer holds {FLAT!r} and optionally its readout prior, got "
                              f"{sorted(map(str, payload.arrays))[:5]}")
    flat = torch.from_numpy(decode_array(payload.arrays[FLAT], (spec.num_weights,), f"initializer of {spec}").copy())
    if not torch.isfinite(flat).all():
        raise MessageRejected("the initializer has non-finite weights")
    readout = None
    if READOUT_FACTOR in payload.arrays or READOUT_DIAG in payload.arrays:
        p = spec.readout_index.numel()
        factor = decode_array(payload.arrays.get(READOUT_FACTOR), (p, None), "readout factor")
        diag = decode_array(payload.arrays.get(READOUT_DIAG), (p,), "readout diagonal")
        if not (np.isfinite(factor).all() and np.isfinite(diag).all()) or (diag < 0).any():
            raise MessageRejected("the readout prior has non-finite or negative entries")
        readout = ReadoutGaussian(flat[spec.readout_index.flatten()][None],
                                  torch.from_numpy(factor.copy())[None], torch.from_numpy(diag.copy())[None])
    unc, nov = (payload.config.get(k, math.nan) for k in ("uncertainty", "novelty"))
    if not all(isinstance(v, float) or isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 2**53
               for v in (unc, nov)):
        raise MessageRejected("uncertainty and novelty must be numbers (whole ones at most 2**53)")
    distilled = payload.config.get(DISTILLED, False)  # absent from older servers' initializers
    if not isinstance(distilled, bool):
        raise MessageRejected(f"{DISTILLED} must be true or false, got {str(distilled)[:40]!r}")
    return Initializer(flat, readout, float(unc), float(nov), distilled)


# -- initializer over HTTP (the initializer service) ---------------------------------------------
def initializer_request(client_id: str, tau: list[float], samples: int = 0, distill: bool = False
                        ) -> dict[str, Any]:
    """The JSON body a device posts to ``/v1/initializers``; ``distill`` asks for the slower,
    distilled initializer (``MetaModel.personalize(distill=True)``)."""
    body: dict[str, Any] = {"client_id": client_id, "descriptor": [float(t) for t in tau]}
    if samples:
        body[SAMPLES] = int(samples)
    if distill:
        body[DISTILL] = True
    return body


def parse_initializer_request(body: bytes, tau_dim: int) -> tuple[str, list[float], int, bool]:
    """``(client id, descriptor, number of samples, distill)`` from a posted body, checked as
    uploads are (the family's domain is the caller's to check)."""
    if len(body) > MAX_REQUEST_BYTES:
        raise MessageRejected(f"the request body exceeds {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MessageRejected(f"the request body is not JSON: {str(exc)[:80]}") from exc
    if not isinstance(request, dict):
        raise MessageRejected("the request body must be a JSON object with client_id and descriptor")
    extra = set(request) - REQUEST_KEYS
    if extra:
        raise MessageRejected(f"unexpected keys {sorted(map(str, extra))[:5]}; a request carries only "
                              f"{sorted(REQUEST_KEYS)}")
    cid = parse_client_id({"client-id": request.get("client_id")})
    try:
        tau = parse_tau({"tau": request.get("descriptor")}, tau_dim)
    except MessageRejected as exc:
        raise MessageRejected(f"descriptor: {exc}") from exc
    k = request.get(SAMPLES, 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_SAMPLES:
        raise MessageRejected(f"samples must be an integer from 0 to {MAX_SAMPLES}, got {str(k)[:40]!r}")
    distill = request.get(DISTILL, False)
    if not isinstance(distill, bool):
        raise MessageRejected(f"distill must be true or false, got {str(distill)[:40]!r}")
    return cid, tau, k, distill


@dataclass(frozen=True)
class ServedInitializer:
    """An initializer as the service sends it: the initializer, which meta-model made it, and
    posterior samples if they were asked for."""

    initializer: Initializer
    version: str  # the sha256 of the meta-model's file in the server's store
    family: str | None
    low_confidence: bool
    samples: torch.Tensor | None  # (k, d)


def initializer_file(post: "WeightPosterior", j: int, *, version: str, family: str | None,
                     samples: torch.Tensor | None = None) -> bytes:
    """Task ``j`` of a posterior as the service's response body: :func:`initializer`'s arrays
    (and ``samples`` ``(k, d)``) in a safetensors file whose header says what made them."""
    from fedfuse.io import dump_tensors

    payload = initializer(post, j)
    tensors = {key: torch.from_numpy(arr) for key, arr in payload.arrays.items()}
    if samples is not None:
        tensors[SAMPLES] = samples.float()
    meta = {"format": INITIALIZER_FORMAT, "architecture": post.spec.to_dict(), "family": family,
            "version": version, **payload.config, "low-confidence": bool(post.low_confidence()[j])}
    return dump_tensors(tensors, meta)


def parse_initializer_file(data: bytes, spec: Architecture) -> ServedInitializer:
    """The device side of :func:`initializer_file`: refused unless its architecture is the
    device's own; every array checked as :func:`parse_initializer` checks them."""
    from fedfuse.io import parse_tensors

    try:
        tensors, meta = parse_tensors(data, "the initializer service's response")
    except FedfuseError as exc:
        raise MessageRejected(str(exc)) from exc
    if meta.get("format") != INITIALIZER_FORMAT:
        raise MessageRejected(f"the response holds {str(meta.get('format'))[:40]!r}, not {INITIALIZER_FORMAT!r}")
    try:
        _parse_arch(json.dumps(meta.get("architecture")), spec)
    except MessageRejected as exc:
        raise MessageRejected(f"the service's meta-model does not fit this device ({exc})") from exc
    odd = sorted(k for k, v in tensors.items() if v.dtype not in (torch.float16, torch.float32, torch.float64))
    if odd:
        raise MessageRejected(f"arrays {odd[:5]} are not float16/32/64")
    arrays = {k: v.numpy() for k, v in tensors.items()}
    samples = arrays.pop(SAMPLES, None)
    if samples is not None:
        samples = torch.from_numpy(decode_array(samples, (None, spec.num_weights), "samples").copy())
        if len(samples) > MAX_SAMPLES or not torch.isfinite(samples).all():
            raise MessageRejected(f"samples must be at most {MAX_SAMPLES} finite rows")
    version, family, low = meta.get("version"), meta.get("family"), meta.get("low-confidence")
    if not isinstance(version, str) or not (family is None or isinstance(family, str)) or not isinstance(low, bool):
        raise MessageRejected("the response's header needs a version, a family (or null) and a low-confidence flag")
    config = {k: meta.get(k) for k in ("uncertainty", "novelty")}
    if DISTILLED in meta:  # older services' files lack it
        config[DISTILLED] = meta[DISTILLED]
    init = parse_initializer(Payload(arrays=arrays, config=config), spec)
    return ServedInitializer(init, version, family, low, samples)


# -- metrics ------------------------------------------------------------------------------------
def metrics(shots: int, score_0shot: float, score_adapted: float, cold_0shot: float, cold_adapted: float) -> Payload:
    return Payload(metrics=dict(zip(METRIC_KEYS, (int(shots), float(score_0shot), float(score_adapted),
                                                   float(cold_0shot), float(cold_adapted)))))


def parse_metrics(payload: Payload) -> dict[str, float]:
    m = payload.metrics
    if payload.arrays or payload.config or set(m) != set(METRIC_KEYS):
        raise MessageRejected(f"a metrics reply carries exactly {list(METRIC_KEYS)}")
    out = {}
    for key in METRIC_KEYS:
        value = m[key]  # abs(v) <= limit: False for NaN, compares a huge int exactly (no float overflow)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) <= MAX_ABS_METRIC:
            raise MessageRejected(f"metric {key} must be a finite number within ±{MAX_ABS_METRIC:g}, "
                                  f"got {str(value)[:40]!r}")
        out[key] = float(value)
    return out


# -- pieces ---------------------------------------------------------------------------------------
def parse_client_id(meta: Mapping[str, Any]) -> str:
    cid = meta.get("client-id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CLIENT_ID or not cid.isprintable():
        raise MessageRejected(f"client-id must be a printable string of 1-{MAX_CLIENT_ID} characters, "
                              f"got {str(cid)[:40]!r}")
    return cid


def parse_tau(meta: Mapping[str, Any], tau_dim: int) -> list[float]:
    """A descriptor of the federation's length whose entries stay finite as float32."""
    tau = meta.get("tau")
    if not isinstance(tau, list) or not tau or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in tau):
        raise MessageRejected(f"tau must be a non-empty list of numbers, got {type(tau).__name__}")
    if len(tau) != tau_dim:
        raise MessageRejected(f"tau has length {len(tau)}; this federation's descriptors have length {tau_dim}")
    try:
        values = [float(t) for t in tau]
    except OverflowError as exc:
        raise MessageRejected("tau has entries too large to represent") from exc
    if not all(math.isfinite(t) and abs(t) <= MAX_ABS_TAU for t in values):
        raise MessageRejected(f"tau has non-finite entries or entries beyond {MAX_ABS_TAU:g}")
    return values


def _parse_arch(text: Any, expected: Architecture) -> Architecture:
    """The federation's architecture if ``text`` describes it; else MessageRejected saying what
    differs. A module architecture is never built from a device's description (building runs its
    constructor on whatever sizes the sender chose); MLPs and vectors are plain numbers."""
    if not isinstance(text, str) or len(text) > MAX_ARCH_JSON:
        raise MessageRejected(f"arch must be a JSON string of at most {MAX_ARCH_JSON} characters")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MessageRejected(f"bad architecture: not JSON ({str(exc)[:80]})") from exc
    if data == json.loads(json.dumps(expected.to_dict())):
        return expected
    if isinstance(data, dict) and data.get("kind") == "module":
        raise MessageRejected(f"architecture {text[:200]!r} does not match the federation's {expected}")
    try:
        spec = architectures.from_dict(data)
    except (ValueError, ArchitectureError) as exc:
        raise MessageRejected(f"bad architecture: {str(exc)[:200]}") from exc
    if spec != expected:
        raise MessageRejected(f"architecture {spec} does not match the federation's {expected}")
    return spec


def decode_array(array: Any, shape: tuple[int | None, ...], what: str) -> np.ndarray:
    """A float array of ``shape`` (``None``: any length, bounded by :data:`MAX_WEIGHTS`) from a
    numpy array or an npy-serialized array (Flower's ``Array``: ``.data`` bytes). The npy header
    is read and checked against the data length before anything is allocated."""
    if isinstance(array, np.ndarray):
        arr = array
    else:
        arr = _decode_npy(getattr(array, "data", None), what)
    if arr.dtype.kind != "f":
        raise MessageRejected(f"{what} must be floating point, got {arr.dtype}")
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = tuple("any" if s is None else s for s in shape)
        raise MessageRejected(f"{what} has shape {tuple(arr.shape)}; expected {want}")
    return arr.astype(np.float32, copy=False)


def _decode_npy(data: Any, what: str) -> np.ndarray:
    import io

    if not isinstance(data, bytes) or len(data) > 8 * MAX_WEIGHTS + 4096:
        raise MessageRejected(f"{what}: no array data or more than {8 * MAX_WEIGHTS} bytes")
    fh = io.BytesIO(data)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(fh)
        if version not in readers:
            raise ValueError(f"npy format version {version}")
        shape, fortran, dtype = readers[version](fh)
    except (ValueError, TypeError, SyntaxError, EOFError, RecursionError) as exc:
        raise MessageRejected(f"{what}: not a readable npy array ({str(exc)[:80]})") from exc
    if dtype.hasobject or dtype.kind != "f" or dtype.itemsize > 8:
        raise MessageRejected(f"{what} must be float16/32/64, got {dtype}")
    if any(n < 0 for n in shape):
        raise MessageRejected(f"{what}: header declares negative dimensions {shape}")
    count = math.prod(shape)
    if count > MAX_WEIGHTS or len(data) - fh.tell() != count * dtype.itemsize:
        raise MessageRejected(f"{what}: header declares shape {shape} of {dtype} but {len(data) - fh.tell()} "
                              "bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=fh.tell())
    return arr.reshape(shape, order="F" if fortran else "C")
