"""The initializer service: new devices ask for their initializer over HTTP, at any time, instead
of waiting for a personalize round. A Ray Serve application (Ray is the server's engine: locally
it starts its own, on a cluster it joins ``RAY_ADDRESS``, under KubeRay it is a ``RayService``).

* ``POST /v1/initializers`` JSON ``{"client_id", "descriptor", "samples"?, "distill"?}``: a
  safetensors file (:func:`fedfuse.wire.initializer_file`), its sha256 in ``X-Content-SHA256``
  and the meta-model's version in ``X-Model-Version``. ``distill`` asks for the slower, distilled
  initializer (an optimizer loop, run off the event loop, ``MAX_DISTILLING`` at a time per
  replica: beyond that a 503 with ``Retry-After``).
* ``GET /v1/model``: what is served (family, architecture, descriptor, version, fit time).
* ``GET /healthz``: liveness, and which version is loaded.

Errors are JSON ``{"error": ...}``: 400 a bad request (checked as uploads are), 401 a missing or
wrong bearer token (when a token file is given), 503 before the first fit.

Sample-free requests that arrive together are answered by one ``personalize`` call (Serve's
dynamic batching, up to ``MAX_BATCH``); each still gets its own descriptor's initializer.

Each replica polls the store's meta-model row and swaps in a new fit when its sha256 changes and
the fit loads and answers one initializer (a damaged one is logged once and the last good one
kept); a request uses the model it found when it started, so none fails or mixes two models while
a fit lands.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import logging
import os
import signal
import sys
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from ray import serve
from ray.serve import Application
from ray.serve.schema import LoggingConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fedfuse import wire
from fedfuse.errors import FedfuseError
from fedfuse.meta_model import MetaModel
from fedfuse.tasks import TaskFamily, get_family
from fedfuse_server.store import MetaModelEntry, ModelStore

log = logging.getLogger("fedfuse_server.serve")

APP_NAME = "fedfuse"
DEPLOYMENT_NAME = "initializers"
POLL_S = 1.0
APP_ARGS = ("store", "token_file", "replicas", "poll_s", "access_log")  # what build_app takes
ROUTES = {"/v1/initializers": "POST", "/v1/model": "GET", "/healthz": "GET"}
MAX_TOKEN_BYTES = 4096
MAX_BATCH = 16  # sample-free requests answered by one personalize call
MAX_ONGOING = 32  # per replica (Serve's default, 5, caps the batches at 5)
MAX_DISTILLING = 2  # distilled initializers computed at once per replica (each an optimizer loop)
# how long the poller, loading a new fit (tens of ms of Python), may keep the interpreter from a
# request that is ready: with Python's default of 5 ms a fit landing lifted the p99 at 200 req/s
# to 19-22 ms on two cores (about 13 without one); at 1 ms, 15 ms (benchmarks/README.md)
SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class Served:
    """One loaded meta-model with its store entry and, where the fit named one whose
    architecture matches, its task family (whose descriptor domain requests must respect)."""

    model: MetaModel
    entry: MetaModelEntry
    family: TaskFamily | None

    @property
    def family_name(self) -> str | None:
        return self.model.annotations_.get("family")

    def info(self) -> dict[str, Any]:
        names = self.model.annotations_.get("descriptor")
        return {"family": self.family_name, "architecture": self.model.spec_.to_dict(),
                "descriptor": {"length": self.model.tau_dim, "names": names},
                "version": self.entry.sha256, "n_models": self.entry.n_models,
                "distill_steps": self.model.distill_steps_,
                "fitted_at": datetime.fromtimestamp(self.entry.fitted, timezone.utc).isoformat()}

    def initializer(self, client_id: str, tau: list[float], samples: int, distill: bool = False) -> bytes:
        """The response body; samples are seeded by client and version, so a device that asks
        again gets the same ones."""
        post = self.model.personalize(torch.tensor([tau]), distill=distill)
        drawn = None
        if samples:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{client_id}/{self.entry.sha256}".encode()))
            drawn = post.sample(torch.Size([samples]), generator=gen)[:, 0]
        return wire.initializer_file(post, 0, version=self.entry.sha256, family=self.family_name, samples=drawn)

    def initializers(self, taus: list[list[float]]) -> list[bytes]:
        """Several sample-free response bodies from one ``personalize`` call: a batch of 16 sine
        descriptors costs about what five single calls do (13 ms against 2.7 ms)."""
        post = self.model.personalize(torch.tensor(taus))
        return [wire.initializer_file(post, j, version=self.entry.sha256, family=self.family_name)
                for j in range(len(taus))]


def _family(model: MetaModel) -> TaskFamily | None:
    """The family the fit recorded, if it can be loaded here and its architecture is the
    model's; otherwise requests get no domain check (said once, in the log)."""
    name = model.annotations_.get("family")
    if name is None:
        return None
    try:
        family = get_family(name)
    except FedfuseError as exc:
        log.warning("the meta-model names family %r, which cannot be loaded here (%s): descriptors are "
                    "checked for length and finiteness only", name, exc)
        return None
    if family.arch != model.spec_:
        log.warning("the meta-model's architecture %s is not family %r's %s: descriptors are checked for "
                    "length and finiteness only", model.spec_, name, family.arch)
        return None
    return family


def read_token(path: str | os.PathLike | None) -> bytes | None:
    """The bearer token a client must send, from a file (a Kubernetes secret, say); ``None``: no
    authentication."""
    if path is None:
        return None
    try:
        token = Path(path).read_bytes()[:MAX_TOKEN_BYTES + 1].strip()
    except OSError as exc:
        raise FedfuseError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    if not token or len(token) > MAX_TOKEN_BYTES or not token.isascii() or any(c <= 32 for c in token):
        raise FedfuseError(f"the token file {path} must hold one token of 1-{MAX_TOKEN_BYTES} printable "
                           "ASCII characters")
    return token


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class InitializerService:
    """One replica: the store's current meta-model, swapped when a new fit lands."""

    def __init__(self, store: str, token_file: str | None = None, poll_s: float = POLL_S) -> None:
        torch.set_num_threads(1)  # a request is small; replicas, not threads, use the cores
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._store = ModelStore(store)
        self._token = read_token(token_file)
        self._served: Served | None = None
        self._rejected: str | None = None  # the version that last failed to load or answer
        self._distill_slots = threading.BoundedSemaphore(MAX_DISTILLING)
        self._refresh_or_log()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(poll_s,), name="fedfuse-meta-model-poll",
                                        daemon=True)
        self._poller.start()

    # -- the model ------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Load the store's meta-model if its version is not the one served and answers one
        initializer (at the centre of its descriptors) without error; one reference assignment
        swaps it, so a request holds either model whole. A version that failed is not retried."""
        entry = self._store.meta_model_entry()
        if entry is None or entry.sha256 == self._rejected or (
                self._served is not None and entry.sha256 == self._served.entry.sha256):
            return
        self._rejected = entry.sha256  # until it has loaded and answered
        model, entry = self._store.load_meta_model_entry()
        model.personalize(model.tau_loc_[None])
        self._rejected = None
        self._served = Served(model, entry, _family(model))
        # what is alive now (Ray, torch, Starlette and the model: about 310,000 objects) lives as
        # long as this model is served; out of the collector's scans, a full collection no longer
        # takes 150-190 ms, a pause that stalled every request queued behind it. A model swapped
        # out later is still freed: nothing in it is kept alive by a cycle
        gc.freeze()
        log.info("serving meta-model %s (%d models, family %r)", entry.sha256[:12], entry.n_models,
                 self._served.family_name)

    def _refresh_or_log(self) -> None:
        try:
            self._refresh()
        except Exception:  # a bad new fit must never stop the replica serving the last good one
            log.exception("could not load the store's meta-model; still serving %s",
                          self._served.entry.sha256[:12] if self._served else "nothing (503)")

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self._refresh_or_log()

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica that can no longer pick up new fits is replaced."""
        if not self._poller.is_alive():
            raise RuntimeError("the meta-model poller has stopped")

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()

    # -- HTTP -----------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
        served = self._served  # this request's model, whatever lands meanwhile
        if path not in ROUTES:
            return _error(404, f"no route {path[:80]!r}: use POST /v1/initializers, GET /v1/model or GET /healthz")
        if request.method != ROUTES[path]:
            return _error(405, f"{path} takes {ROUTES[path]}", {"Allow": ROUTES[path]})
        if path == "/healthz":  # liveness for probes: no token, and no model needed
            return JSONResponse({"status": "ok", "version": served.entry.sha256 if served else None})
        if not self._authorized(request):
            return _error(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                          {"WWW-Authenticate": "Bearer"})
        if served is None:
            return _error(503, "no meta-model has been fitted yet: run the fit phase, then ask again",
                          {"Retry-After": "5"})
        if path == "/v1/model":
            return JSONResponse(served.info())
        return await self._initializer(request, served)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0)
    async def _batched(self, jobs: list[tuple[Served, list[float]]]) -> list[bytes | Exception]:
        """The sample-free requests waiting together, one ``personalize`` per served model (a
        batch can straddle a swap); a failing batch is retried one by one, so only the request
        that fails gets a 500."""
        out: list[bytes | Exception] = [b""] * len(jobs)
        for served in {id(s): s for s, _ in jobs}.values():
            idx = [i for i, (s, _) in enumerate(jobs) if s is served]
            try:
                for i, data in zip(idx, served.initializers([jobs[i][1] for i in idx])):
                    out[i] = data
            except Exception:
                for i in idx:
                    try:
                        out[i] = served.initializers([jobs[i][1]])[0]
                    except Exception as exc:
                        out[i] = exc
        return out

    async def _distilled(self, served: Served, cid: str, tau: list[float], samples: int) -> bytes | None:
        """A distilled initializer, off the event loop so other requests keep being answered;
        ``None`` when ``MAX_DISTILLING`` are already running here (optimizer loops would only
        slow each other and every fast request down)."""
        if not self._distill_slots.acquire(blocking=False):
            return None
        try:
            return await asyncio.to_thread(served.initializer, cid, tau, samples, True)
        finally:
            self._distill_slots.release()

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    async def _initializer(self, request: Request, served: Served) -> Response:
        body = b""
        async for chunk in request.stream():  # stop reading once past the limit
            body += chunk
            if len(body) > wire.MAX_REQUEST_BYTES:
                break
        try:
            cid, tau, samples, distill = wire.parse_initializer_request(body, served.model.tau_dim)
            if served.family is not None:
                served.family.descriptor.check(tau)
            if distill and not served.model.distillable:
                raise FedfuseError("distill: this meta-model has no function space to distill from")
        except FedfuseError as exc:
            log.info("refused a request: %r", str(exc))
            return _error(400, str(exc))
        try:
            if distill:
                data = await self._distilled(served, cid, tau, samples)
                if data is None:
                    return _error(503, f"this replica is already distilling {MAX_DISTILLING} initializers: "
                                  "ask again shortly", {"Retry-After": "1"})
            elif samples:
                data = served.initializer(cid, tau, samples)
            else:
                data = await self._batched((served, tau))
            if isinstance(data, Exception):
                raise data
        except Exception:  # the client gets a JSON 500, the log the traceback
            log.exception("initializer for client %r failed", cid)
            return _error(500, "the server could not compute this initializer")
        return Response(data, media_type="application/octet-stream", headers={
            wire.CHECKSUM_HEADER: hashlib.sha256(data).hexdigest(), wire.VERSION_HEADER: served.entry.sha256,
            "Cache-Control": "no-store"})


InitializerDeployment = serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=MAX_ONGOING)(InitializerService)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application, import path ``fedfuse_server.serve:build_app`` (``serve run``, a
    RayService). ``args``: ``store`` (a folder every replica can read), ``token_file``,
    ``replicas`` (1), ``poll_s`` (seconds between checks for a new fit, 1), ``access_log``
    (true: a log line per request, which costs CPU on the replica and in Ray's log forwarding;
    false sets the deployment's logging config, which then replaces an application-level one)."""
    unknown = set(args) - set(APP_ARGS)
    if unknown or "store" not in args:
        raise FedfuseError(f"the initializer service takes args store (required), token_file, replicas, "
                           f"poll_s and access_log; got {sorted(args)}")
    access_log = args.get("access_log", True)
    if not isinstance(access_log, bool):
        raise FedfuseError(f"access_log must be true or false, got {access_log!r}")
    token_file = args.get("token_file")
    if token_file:
        read_token(token_file)  # a bad token file fails the deploy, not every replica
    options: dict[str, Any] = {"num_replicas": int(args.get("replicas", 1))}
    if not access_log:  # a deployment's own logging config replaces the application's, so only when asked
        options["logging_config"] = LoggingConfig(enable_access_log=False)
    return InitializerDeployment.options(**options).bind(
        str(args["store"]), str(token_file) if token_file else None, float(args.get("poll_s", POLL_S)))


@contextmanager
def serving(store: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
            token_file: str | os.PathLike | None = None, poll_s: float = POLL_S,
            access_log: bool = True) -> Iterator[str]:
    """Serve ``store``'s initializers while the block runs; yields the base URL. With
    ``RAY_ADDRESS`` set it joins that cluster and removes only its own app at exit; otherwise it
    starts a local Ray sized to this machine and shuts Serve and Ray down at exit."""
    import ray

    read_token(token_file)  # a bad token file is named before Ray starts
    cluster = os.environ.get("RAY_ADDRESS")
    cluster = None if cluster == "local" else cluster
    if cluster:
        ray.init(address=cluster)
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        args = {"store": str(Path(store).resolve()), "replicas": replicas, "poll_s": poll_s, "access_log": access_log}
        if token_file is not None:
            args["token_file"] = str(Path(token_file).resolve())
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield f"http://{host}:{port}"
    finally:
        try:
            if cluster:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()


def serve_until_stopped(store: str | os.PathLike, on_ready: Callable[[str], None], **options: Any) -> None:
    """:func:`serving` until Ctrl-C or SIGTERM (a container being stopped), then a clean stop."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with serving(store, **options) as url:
        previous = signal.signal(signal.SIGTERM, stop)  # after ray.init, which sets its own
        try:
            on_ready(url)
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
