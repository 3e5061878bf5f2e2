"""Warm starts on a device, without Flower: ask the initializer service (``fedfuse serve``) for
this device's initializer, check it, adapt it on the device's own shots; when no usable
initializer comes back, train a cold start instead and say why.

Nothing but the client id and the descriptor leaves the device; the shots stay on it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from fedfuse import wire
from fedfuse.architectures import Architecture
from fedfuse.errors import FedfuseError, FedfuseFailure, MessageRejected
from fedfuse.tasks import LocalData, TaskFamily
from fedfuse_client.local import adapt, cold_start

log = logging.getLogger("fedfuse_client.warmstart")

SLACK_BYTES = 16 * 2**20  # header and readout prior on top of the weights a response may hold
# how a service from before the distilled path answers a request that carries the key
_PREDATES_DISTILL = f"unexpected keys [{wire.DISTILL!r}]"


class ServiceUnavailable(FedfuseFailure):
    """The service could not be reached, or kept failing, through every retry."""


class ServiceRefused(FedfuseError):
    """The service answered and refused the request (a bad descriptor or token): retrying the
    same request would not help."""


@dataclass(frozen=True)
class WarmStart:
    """What a device starts from: weights ``(d,)``, where they came from (``"service"`` or
    ``"cold-start"``), the service's expected error (NaN for a cold start) and, for a cold
    start, why the service's initializer was not used."""

    weights: torch.Tensor
    source: str
    uncertainty: float
    reason: str = ""
    version: str | None = None  # the meta-model that made it
    distilled: bool = False  # made by the service's slower path (a model whose zoo chose 0 steps answers fast)


def fetch_initializer(url: str, client_id: str, tau: list[float], spec: Architecture, *,
                      token: str | None = None, samples: int = 0, distill: bool = False, timeout: float = 10.0,
                      retries: int = 3, backoff: float = 0.5, client: httpx.Client | None = None
                      ) -> wire.ServedInitializer:
    """This device's initializer from the service at ``url``, checked: the body's sha256 against
    ``X-Content-SHA256``, its architecture against ``spec``, every array as the Flower path
    checks them. Connection failures, timeouts, 429, 5xx and corrupted bodies are retried
    ``retries`` times with exponential backoff (``backoff`` s, doubling, jittered); then
    :class:`ServiceUnavailable`. A 4xx is final (:class:`ServiceRefused`); so is an answer that
    does not fit this device (:class:`~fedfuse.errors.MessageRejected`). A service older than the
    distilled path refuses ``distill``; the device then takes the fast initializer
    (``initializer.distilled`` says which it got)."""
    options = dict(token=token, samples=samples, timeout=timeout, retries=retries, backoff=backoff, client=client)
    try:
        return _fetch(url, client_id, tau, spec, distill=distill, **options)
    except ServiceRefused as exc:
        if not distill or _PREDATES_DISTILL not in str(exc):
            raise
        log.warning("initializer service %s predates the distilled path; asking for the fast initializer", url)
        return _fetch(url, client_id, tau, spec, distill=False, **options)


def _fetch(url: str, client_id: str, tau: list[float], spec: Architecture, *, token: str | None, samples: int,
           distill: bool, timeout: float, retries: int, backoff: float, client: httpx.Client | None
           ) -> wire.ServedInitializer:
    """:func:`fetch_initializer`'s one request, with its retries."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = wire.initializer_request(client_id, tau, samples, distill)
    limit = 4 * spec.num_weights * (samples + 2) + SLACK_BYTES
    endpoint = url.rstrip("/") + "/v1/initializers"
    owned, problem = client is None, "no attempt made"
    http = client or httpx.Client(timeout=timeout)
    try:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
            try:
                data, version = _post(http, endpoint, body, headers, limit, timeout)
            except _Retry as exc:
                problem = str(exc)
                log.info("initializer service %s: %s (attempt %d of %d)", endpoint, problem, attempt + 1, retries + 1)
                continue
            served = wire.parse_initializer_file(data, spec)
            if served.version != version:
                raise MessageRejected(f"the body was made by meta-model {served.version[:12]!r}, the header "
                                      f"says {version[:12]!r}")
            return served
    finally:
        if owned:
            http.close()
    raise ServiceUnavailable(f"no initializer from {endpoint} after {retries + 1} attempts: {problem}")


class _Retry(Exception):
    """A failure worth another attempt."""


def _post(http: httpx.Client, endpoint: str, body: dict[str, Any], headers: dict[str, str], limit: int,
          timeout: float) -> tuple[bytes, str]:
    """One attempt: the checked body and the meta-model version the response names."""
    try:
        with http.stream("POST", endpoint, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status_code == 429 or resp.status_code >= 500:
                resp.read()
                raise _Retry(f"HTTP {resp.status_code}: {_error_text(resp)}")
            if resp.status_code != 200:
                resp.read()
                raise ServiceRefused(f"the initializer service refused the request (HTTP {resp.status_code}): "
                                     f"{_error_text(resp)}")
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise MessageRejected(f"the response exceeds {limit} bytes, more than this device's "
                                          "architecture needs")
                chunks.append(chunk)
            data = b"".join(chunks)
            expected, version = resp.headers.get(wire.CHECKSUM_HEADER), resp.headers.get(wire.VERSION_HEADER)
    except httpx.TransportError as exc:  # refused, reset, timed out, DNS
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc
    if expected is None or version is None:
        raise MessageRejected(f"the response lacks {wire.CHECKSUM_HEADER} or {wire.VERSION_HEADER}: not an "
                              "initializer service")
    if hashlib.sha256(data).hexdigest() != expected.strip().lower():
        raise _Retry(f"the body's sha256 does not match {wire.CHECKSUM_HEADER} (corrupted in transit)")
    return data, version


def _error_text(resp: httpx.Response) -> str:
    """The service's ``{"error": ...}``, or the start of whatever else came back."""
    try:
        return str(resp.json()["error"])[:300]
    except (ValueError, KeyError, TypeError):
        return repr(resp.text[:120])


def warm_start(url: str, family: TaskFamily, data: LocalData, **options: Any) -> WarmStart:
    """The device's starting model: the service's initializer adapted on ``data``'s shots, or,
    if none usable came back (unreachable, refused, corrupted, another architecture), a cold
    start trained on them with the family's recipe. ``options`` go to :func:`fetch_initializer`."""
    try:
        served = fetch_initializer(url, data.client_id, data.tau, family.arch, **options)
    except (FedfuseError, FedfuseFailure) as exc:
        log.warning("device %r: no initializer from %s (%r); training a cold start", data.client_id, url, str(exc))
        return WarmStart(cold_start(family, data)[1][0], "cold-start", math.nan, str(exc))
    return WarmStart(adapt(family, served.initializer, data)[0], "service", served.initializer.uncertainty,
                     version=served.version, distilled=served.initializer.distilled)
