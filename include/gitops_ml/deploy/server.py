"""The serving app: ``POST /predict``, ``GET /version``, ``GET /health``, ``GET /metrics``, ``POST /admin/reload``.

The model behind the registry alias ``champion`` is loaded at start; ``/admin/reload``
loads another version beside the serving one, warms it up, then swaps a single
reference, so requests in flight finish on the old model and no request fails
during a switch.  A reload may carry a smoke sample (images with the classes the
evaluation predicted): the new model must reproduce them before it gets traffic.
The previous model stays loaded, so a rollback is a swap back, not a load.
Requests are micro-batched into compiled ``tf.function`` calls, never ``model.predict``.
Every response carries ``X-Model-Version`` and ``X-Commit-Sha``.

Safe by default (threat model: anyone who can reach the port is untrusted):

- **Admin.** ``/admin/reload`` needs ``Authorization: Bearer $GITOPS_ML_SERVING_TOKEN``.
  Without a token the server refuses to *start* on any host that is not loopback
  (``127.0.0.1``, ``::1``, ``localhost``), and when it does run on loopback without a
  token (the embedded demo) admin answers only direct loopback peers that carry no
  proxy headers (``X-Forwarded-For``, ``Forwarded``, ``X-Real-IP``) and only when no
  trusted proxy is configured: a local reverse proxy cannot expose it.
- **What a reload may serve.** Only the version the registry alias ``champion``
  names at the time of the reload: the server reads the alias before loading and
  again before switching, and refuses any other version (409 naming both). The
  deploy step moves the alias first and then reloads; a rollback moves it back
  first. Gate-failed versions never get the alias, so they can never be served, and
  registry and server cannot silently disagree. Versions are 1-9 ASCII digits.
- **Watch-window trust.** Public ``/predict`` traffic feeds the deploy's watch
  window, so one client must not decide a rollback: the judged numbers
  (``metrics.gitops_ml_watch_*``) count at most ``WATCH_REQUESTS_PER_CLIENT``
  requests per client per serving period, plus the number of distinct clients; the
  deploy decides nothing before ``deploy.min_clients`` distinct clients. A client is
  the TCP peer address; ``X-Forwarded-For`` is honoured only from the proxies listed
  in ``GITOPS_ML_TRUSTED_PROXIES`` (uvicorn's proxy-header handling, off otherwise).
  Residual risk: an attacker with ``min_clients`` or more addresses and little
  competing traffic can still push the numbers; leave ``deploy.watch_seconds`` at 0 or
  keep the server on a private network where that matters.
- **Resources.** A declared ``Content-Length`` over ``MAX_BODY_BYTES`` is refused (413)
  before any body byte is read; a chunked body is read chunk by chunk and cut off (413)
  as soon as it passes the limit (Starlette's own ``max_body_size`` on the routes that
  take a body); all bodies being received share ``MAX_INFLIGHT_BODY_BYTES`` (503 past
  it); a body must arrive within ``BODY_TIMEOUT_S`` (``BodyBudget``). A request's
  images may hold at most ``MAX_REQUEST_PIXELS`` pixels in total, read from the image
  headers before anything is decoded (413 naming the image). Tiny requests decode on
  the event loop (tens of microseconds); larger ones in a pool of ``DECODE_WORKERS``
  threads; inference runs in a thread, so one huge request cannot stall the others.
  The HTTP layer (``serve``): the request head must arrive within ``HEAD_TIMEOUT_S``
  of connecting or of the previous response and be at most ``MAX_HEAD_BYTES``; idle
  keep-alive connections close after ``KEEP_ALIVE_S``; past ``LIMIT_CONCURRENCY``
  connections uvicorn answers 503.
- **Errors.** Every error the app answers is JSON ``{"error": ...}``, rendered by one
  exception handler (``ServingState.on_error``) and counted in
  ``gitops_ml_error_responses_total``; an unexpected exception is a JSON 500
  (``server_error``), never a bare one. Protocol errors that never reach the app
  (malformed HTTP, an over-long head, uvicorn's concurrency 503) are plain text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from gitops_ml import images
from gitops_ml.config import Settings
from gitops_ml.deploy.metrics import ServerMetrics
from gitops_ml.errors import GitopsMLError

__all__ = [
    "AliasMismatch",
    "ApiError",
    "BadRequest",
    "Batcher",
    "ModelOutputError",
    "ReloadFailed",
    "ServedModel",
    "ServingState",
    "UnsafeServerConfig",
    "champion_version",
    "check_exposure",
    "create_app",
    "is_loopback",
    "load_from_registry",
    "serve",
    "served_for_commit",
    "server_config",
    "smoke_check",
]

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_BATCH = 256
MAX_BODY_BYTES = 16 * 1024 * 1024  # one request body (/predict and /admin/reload)
MAX_INFLIGHT_BODY_BYTES = 256 * 1024 * 1024  # every body being received or processed, together
MAX_REQUEST_PIXELS = 64_000_000  # sum of width*height over a request's images
INLINE_BYTES = 256 * 1024  # requests this small with ...
INLINE_PIXELS = 65_536  # ... this few pixels decode on the event loop
DECODE_WORKERS = 2
BODY_TIMEOUT_S = 30.0
HEAD_TIMEOUT_S = 5.0
KEEP_ALIVE_S = 5
MAX_HEAD_BYTES = 64 * 1024
LIMIT_CONCURRENCY = 256
VERSION = re.compile(r"[0-9]{1,9}", re.ASCII)
_PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
_ROUTES = {
    "/predict": "predict",
    "/admin/reload": "reload",
    "/version": "version",
    "/health": "health",
    "/metrics": "metrics",
}


class UnsafeServerConfig(GitopsMLError):
    """The server would start in a configuration that exposes its admin endpoints."""


def is_loopback(host: str) -> bool:
    """``True`` for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServedModel:
    """A loaded, warmed-up model version and what it was built from."""

    model_version: str
    commit_sha: str
    data_hash: str
    airflow_run_id: str
    class_names: list[str]
    height: int
    width: int
    channels: int
    predict: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    built_from_commit: str = ""  # "" when ``commit_sha`` (the revision served for) is the one it was built from
    model_code_hash: str = ""  # "" for the built-in model

    def info(self, model_name: str) -> dict[str, Any]:
        return {
            "model_name": model_name,
            "model_version": self.model_version,
            "commit_sha": self.commit_sha,
            "built_from_commit": self.built_from_commit or self.commit_sha,
            "data_hash": self.data_hash,
            "model_code_hash": self.model_code_hash or None,
            "airflow_run_id": self.airflow_run_id,
            "class_names": self.class_names,
        }


def load_from_registry(settings: Settings, model_version: str | None) -> ServedModel | None:
    """Load ``model_version`` (default: the champion) from MLflow; ``None`` if there is no champion."""
    from gitops_ml import registry  # noqa: PLC0415 - heavy, only in the server process

    version = registry.get_alias(settings) if model_version is None else registry.get_version(settings, model_version)
    if version is None:
        return None
    # The code-free serving artifact through its traced function: no repository code is imported here.
    predict = registry.load_predictor(settings, version.run_id, f"models:/{settings.model_name}/{version.version}")
    meta = registry.load_run_json(settings, version.run_id, registry.META_ARTIFACT)
    tags = registry.version_tags(version)
    return ServedModel(
        model_version=version.version,
        commit_sha=registry.served_for(version) or "",
        built_from_commit=tags.get("commit_sha", ""),
        data_hash=tags.get("data_hash", ""),
        airflow_run_id=tags.get("airflow_run_id", ""),
        class_names=list(meta["class_names"]),
        height=int(meta["height"]),
        width=int(meta["width"]),
        channels=int(meta["channels"]),
        predict=predict,
        model_code_hash=tags.get("model_code_hash", ""),
    )


def served_for_commit(settings: Settings, model_version: str) -> str | None:
    """The revision ``model_version`` serves for now (a reused version serves a newer commit)."""
    from gitops_ml import registry  # noqa: PLC0415 - heavy, only in the server process

    return registry.served_for(registry.get_version(settings, model_version))


def champion_version(settings: Settings) -> str | None:
    """The version the registry alias ``champion`` names now (``None``: no champion)."""
    from gitops_ml import registry  # noqa: PLC0415 - heavy, only in the server process

    version = registry.get_alias(settings)
    return None if version is None else version.version


class ApiError(Exception):
    """An error the app answers as JSON ``{"error": message, **extra}`` with ``status``.

    ``outcome`` is how a ``/predict`` request that ends in this error is counted
    (``gitops_ml_requests_total``): a bad request, or a failure of the model.
    """

    status = 400
    outcome = "bad_request"

    def __init__(self, message: str, status: int | None = None, **extra: Any):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.extra = extra


class BadRequest(ApiError):
    """The request is malformed or over a limit (4xx)."""


class AliasMismatch(ApiError):
    """A reload asked for a version the registry alias ``champion`` does not name."""

    status = 409

    def __init__(self, wanted: str, alias: str | None, serving: str):
        super().__init__(
            f"refusing to serve model version {wanted}: the registry alias champion names "
            f"{'no version' if alias is None else 'version ' + alias}; move the alias first "
            f"(deploy and rollback do); still serving {serving}",
            wanted_version=wanted,
            alias_version=alias,
        )


class ReloadFailed(ApiError):
    """A reload could not load the version or its smoke check failed: the old model keeps serving."""

    status = 409


class ModelOutputError(ApiError):
    """The model returned non-finite probabilities or raised: a server-side error, counted per version."""

    status = 500
    outcome = "error"


class Batcher:
    """Opportunistic micro-batching: requests that arrive while the model is busy share its next call.

    Nothing waits on a timer, so a lone request pays no extra latency; under load, one
    compiled call serves every queued request of the same model (up to ``max_batch`` images).
    """

    def __init__(self, metrics: ServerMetrics, max_batch: int = 128):
        self.metrics = metrics
        self.max_batch = max_batch
        self.queue: asyncio.Queue | None = None

    async def predict(self, model: ServedModel, batch: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        assert self.queue is not None, "the batcher is not running"
        await self.queue.put((model, batch, future))
        return await future

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        while True:
            items = [await self.queue.get()]
            size = len(items[0][1])
            while size < self.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                items.append(item)
                size += len(item[1])
            for model in {id(i[0]): i[0] for i in items}.values():
                group = [i for i in items if i[0] is model]
                await self._call(model, group)

    async def _call(self, model: ServedModel, group) -> None:
        x = np.concatenate([batch for _, batch, _ in group]) if len(group) > 1 else group[0][1]
        try:
            out = await asyncio.to_thread(model.predict, x)
        except Exception as exc:  # noqa: BLE001 - reported to every waiting request
            for _, _, future in group:
                if not future.done():
                    future.set_exception(ModelOutputError(f"model version {model.model_version} failed: {exc}"))
            return
        self.metrics.observe_batch(model.model_version, len(x))
        start = 0
        for _, batch, future in group:
            rows = out[start : start + len(batch)]
            start += len(batch)
            if not future.done():
                if np.isfinite(rows).all():
                    future.set_result(rows)
                else:
                    future.set_exception(
                        ModelOutputError(f"model version {model.model_version} returned non-finite probabilities")
                    )


def smoke_check(model: ServedModel, smoke: dict[str, Any]) -> str | None:
    """Replay the evaluation sample on ``model``; return why it failed, or ``None``."""
    expected = smoke.get("classes") or []
    encoded = smoke.get("images") or []
    if not expected or len(expected) != len(encoded):
        return "smoke sample must hold as many images as expected classes (at least one)"
    batch = np.stack(
        [
            images.decode(base64.b64decode(b), model.height, model.width, model.channels, name=f"smoke image {i}")
            for i, b in enumerate(encoded)
        ]
    )
    probabilities = model.predict(batch)
    if not np.isfinite(probabilities).all():
        return "the model returned non-finite probabilities on the smoke sample"
    got = [model.class_names[int(i)] for i in probabilities.argmax(axis=1)]
    wrong = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g]
    if wrong:
        i, e, g = wrong[0]
        return (
            f"{len(wrong)} of {len(expected)} smoke predictions differ from the evaluation "
            f"(image {i}: expected {e}, got {g})"
        )
    return None


@dataclass(frozen=True)
class Prediction:
    """A ``/predict`` request in progress (``request.state.prediction``): counted once, however it ends."""

    model: ServedModel
    started: float
    client: str


def client_of(request: Request) -> str:
    """The client of a request: the TCP peer (or what a trusted proxy reports, see ``server_config``)."""
    return request.client.host if request.client else "unknown"


class ServingState:
    """The app in one object: the model it serves, the one it served before, metrics, batcher, pools, endpoints.

    :param settings: model name and ``serving_token``.
    :param loader: loads a model version (``None``: the champion, at start only).
    :param alias_lookup: the version the registry alias ``champion`` names now; a reload
        serves only that version.
    :param commit_lookup: the revision a version serves for now, read again when a reload
        keeps a version that is already loaded; ``None``: never re-read.
    :param admin_without_token: allow ``/admin/reload`` without a token, to direct
        loopback peers only.
    """

    def __init__(
        self,
        settings: Settings,
        loader: Callable[[Settings, str | None], ServedModel | None],
        alias_lookup: Callable[[Settings], str | None],
        commit_lookup: Callable[[Settings, str], str | None] | None,
        admin_without_token: bool,
    ):
        self.settings = settings
        self.loader = loader
        self.alias_lookup = alias_lookup
        self.commit_lookup = commit_lookup
        self.admin_without_token = admin_without_token
        self.model: ServedModel | None = None
        self.previous: ServedModel | None = None  # still loaded and warm: a rollback is a swap back
        self.metrics = ServerMetrics()
        self.batcher = Batcher(self.metrics)
        self.decode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.inflight_body_bytes = 0  # every body being received or processed, together
        self._reload_lock = threading.Lock()

    # --- answers ---

    def headers(self, model: ServedModel | None = None) -> dict[str, str]:
        """``X-Model-Version`` / ``X-Commit-Sha`` of ``model`` (default: the one serving now)."""
        model = model or self.model
        return {"X-Model-Version": model.model_version, "X-Commit-Sha": model.commit_sha} if model else {}

    def error_response(self, message: str, status: int, model: ServedModel | None = None, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=self.headers(model))

    async def on_error(self, request: Request, exc: Exception) -> JSONResponse:
        """The one exception handler: every error is JSON, and a ``/predict`` request is counted by outcome."""
        prediction: Prediction | None = getattr(request.state, "prediction", None)
        extra: dict[str, Any] = {}
        headers: Mapping[str, str] = {}
        if isinstance(exc, ApiError):
            status, message, outcome, extra = exc.status, str(exc), exc.outcome, exc.extra
            if isinstance(exc, ModelOutputError):
                log.error("%s", exc)
        elif isinstance(exc, images.ImageDecodeError):
            status, message, outcome = 400, str(exc), "bad_request"
        elif isinstance(exc, HTTPException):
            status, message, outcome, headers = exc.status_code, str(exc.detail), "bad_request", exc.headers or {}
            if status == 413 and MAX_BODY_SIZE_SCOPE_KEY in request.scope:  # Starlette's body limit, mid-stream
                message = f"request body is over the limit of {request.scope[MAX_BODY_SIZE_SCOPE_KEY]} bytes"
        else:  # a bug: the outermost handler (Starlette's ServerErrorMiddleware), outside CountErrors
            log.error("unexpected error on %s: %r", request.url.path, exc)
            self.metrics.observe_error(_ROUTES.get(request.url.path, "other"), 500)
            status, message, outcome = 500, f"internal server error ({type(exc).__name__})", "server_error"
        if prediction is not None:
            self.metrics.observe_request(
                prediction.model.model_version, outcome, time.perf_counter() - prediction.started, prediction.client
            )
        response = self.error_response(message, status, prediction.model if prediction else None, **extra)
        response.headers.update(headers)
        return response

    def check_admin(self, request: Request) -> None:
        """Raise 401 unless this request may use an admin endpoint."""
        if self.settings.serving_token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.settings.serving_token.get_secret_value().encode()
            ):
                raise ApiError("missing or wrong bearer token for /admin/reload", 401)
        elif not self.admin_without_token:
            raise ApiError(
                "/admin/reload needs GITOPS_ML_SERVING_TOKEN (send Authorization: Bearer <token>); "
                "without a token it answers only on a server bound to loopback",
                401,
            )
        elif not is_loopback(client_of(request)) or any(h in request.headers for h in _PROXY_HEADERS):
            raise ApiError(
                "without GITOPS_ML_SERVING_TOKEN /admin/reload answers only direct loopback clients (no proxy headers)",
                401,
            )

    # --- what is served ---

    def serving_version(self) -> str:
        return self.model.model_version if self.model else "nothing"

    def refreshed(self, model: ServedModel) -> ServedModel:
        """``model`` reporting the revision it serves for now (the same object when that is unchanged)."""
        served_for = self.commit_lookup(self.settings, model.model_version) if self.commit_lookup else None
        if not served_for or served_for == model.commit_sha:
            return model
        return replace(model, commit_sha=served_for, built_from_commit=model.built_from_commit or model.commit_sha)

    def switch_to(self, model: ServedModel) -> None:
        current = self.model
        if current is not None and current is not model and current.model_version == model.model_version:
            self.model = model  # same version, new revision: the previous model stays the rollback target
        elif current is not model:
            self.previous, self.model = self.model, model  # one reference: requests in flight keep theirs
            self.metrics.start_period(model.model_version)
        self.metrics.info = {
            "model_version": model.model_version,
            "commit_sha": model.commit_sha,
            "data_hash": model.data_hash,
        }

    def load_champion(self) -> None:
        """At start: serve the champion if there is one; start anyway (``/health`` says what is loaded)."""
        try:
            model = self.loader(self.settings, None)
            if model is not None:
                self.switch_to(model)
        except Exception:  # start anyway, report at /health
            log.exception("could not load the champion at start")
        if self.model:
            log.info("serving model version %s (commit %s)", self.model.model_version, self.model.commit_sha)
        else:
            log.info("no champion yet: /predict answers 503 until a deploy")

    def reload_version(self, wanted: str | None, smoke: dict[str, Any] | None) -> ServedModel | None:
        """Serve ``wanted`` (``None``: the champion), which must be the version the alias names, before
        loading and again before switching; ``None`` when the registry has no champion (serve nothing)."""
        with self._reload_lock:
            serving = self.serving_version()
            try:
                return self._reload_version(wanted, smoke, serving)
            except ApiError:
                raise
            except Exception as exc:  # report any load failure, keep serving the old model
                log.exception("loading model version %s failed", wanted)
                raise ReloadFailed(
                    f"could not load model version {wanted or 'champion'}: {exc}; still serving {serving}"
                ) from None

    def _reload_version(self, wanted: str | None, smoke: dict[str, Any] | None, serving: str) -> ServedModel | None:
        alias = self.alias_lookup(self.settings)
        target = wanted if wanted is not None else alias
        if target is None:  # no champion (the first deploy was rolled back): serve nothing, as the registry
            if self.model is not None:
                self.previous, self.model = self.model, None
                self.metrics.info = {}
            return None
        if target != alias:
            raise AliasMismatch(target, alias, serving)
        candidate = self._candidate(target)
        if candidate is None:
            return None
        failure = smoke_check(candidate, smoke) if smoke else None
        if failure:
            log.error("smoke check of model version %s failed: %s", candidate.model_version, failure)
            raise ReloadFailed(
                f"smoke check of model version {candidate.model_version} failed: {failure}; still serving {serving}"
            )
        now = self.alias_lookup(self.settings)
        if now != target:  # the alias moved while the version was loading
            raise AliasMismatch(target, now, serving)
        self.switch_to(candidate)
        log.info("now serving model version %s (commit %s)", candidate.model_version, candidate.commit_sha)
        return candidate

    def _candidate(self, version: str) -> ServedModel | None:
        """``version`` ready to serve: the loaded previous or current model (a swap), else a fresh load."""
        for loaded in (self.previous, self.model):
            if loaded is not None and loaded.model_version == version:
                return self.refreshed(loaded)  # still loaded and warm, maybe for a newer revision
        return self.loader(self.settings, version)

    # --- endpoints ---

    async def health(self, request: Request) -> JSONResponse:
        model = self.model
        return JSONResponse(
            {
                "status": "ok",
                "model_loaded": model is not None,
                "model_version": model.model_version if model else None,
            },
            headers=self.headers(),
        )

    async def version(self, request: Request) -> JSONResponse:
        if self.model is None:
            raise ApiError("no model deployed yet: the registry has no champion", 503)
        return JSONResponse(self.model.info(self.settings.model_name), headers=self.headers())

    async def prometheus(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4", headers=self.headers())

    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        model = self.model  # one reference for the whole request: a switch cannot split it
        if model is None:
            raise ApiError("no model deployed yet: the registry has no champion", 503)
        client = client_of(request)
        request.state.prediction = Prediction(model, started, client)  # errors are counted by ``on_error``
        body = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            parts = await _multipart_images(request)
            batch = await _to_batch(self.decode_pool, model, lambda: parts, len(body))
        else:
            batch = await _to_batch(self.decode_pool, model, lambda: _body_images(content_type, body), len(body))
        probabilities = await self.batcher.predict(model, batch)
        names = model.class_names
        answer = {
            "predictions": [
                {
                    "class": names[int(row.argmax())],
                    "probabilities": {c: round(float(p), 6) for c, p in zip(names, row, strict=False)},
                }
                for row in probabilities
            ],
            "model_name": self.settings.model_name,
            "model_version": model.model_version,
            "commit_sha": model.commit_sha,
            "built_from_commit": model.built_from_commit or model.commit_sha,
            "data_hash": model.data_hash,
        }
        self.metrics.observe_request(
            model.model_version, "ok", time.perf_counter() - started, client, probabilities.max(axis=1).tolist()
        )
        return JSONResponse(answer, headers=self.headers(model))

    async def reload(self, request: Request) -> JSONResponse:
        self.check_admin(request)
        raw = await request.body()
        try:
            body = _json(raw) if raw.strip() else {}
        except BadRequest as exc:
            raise BadRequest(
                str(exc).replace(
                    "body is not valid JSON", 'body must be JSON: {"model_version": "<n>", "smoke": {...}} or {}'
                ),
                exc.status,
            ) from None
        wanted, smoke = _reload_request(body)
        loaded = await run_in_threadpool(self.reload_version, wanted, smoke)
        if loaded is None:
            return JSONResponse({"model_version": None, "status": "the registry has no champion: serving nothing"})
        return JSONResponse(loaded.info(self.settings.model_name), headers=self.headers())

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="decode")
        await run_in_threadpool(self.load_champion)
        task = asyncio.create_task(self.batcher.run())
        while self.batcher.queue is None:
            await asyncio.sleep(0)
        yield
        task.cancel()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


class CountErrors:
    """ASGI middleware: count every 4xx/5xx response the app sends, by route and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _ROUTES.get(scope.get("path", ""), "other")

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.observe_error(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class BodyBudget:
    """ASGI middleware: the body limits Starlette has no setting for.

    - A declared ``Content-Length`` over ``MAX_BODY_BYTES`` is answered 413 before any
      body byte is read (a chunked body is cut off mid-stream by the routes'
      ``max_body_size``, Starlette's own limit).
    - Every body being received or processed shares ``MAX_INFLIGHT_BODY_BYTES`` (503 past it).
    - A body must arrive within ``BODY_TIMEOUT_S`` of the first read (408).
    """

    def __init__(self, app, state: ServingState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            response = self.state.error_response(
                f"request body of {declared} bytes is over the limit of {MAX_BODY_BYTES} bytes", 413
            )
            return await response(scope, receive, send)
        counted = 0
        deadline: float | None = None
        complete = False

        async def budgeted_receive():
            nonlocal counted, deadline, complete
            if complete:
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + BODY_TIMEOUT_S
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BadRequest(f"request body not received within {BODY_TIMEOUT_S:.0f} s", 408) from None
            if message["type"] != "http.request":
                return message
            complete = not message.get("more_body", False)
            size = len(message.get("body", b""))
            if self.state.inflight_body_bytes + size > MAX_INFLIGHT_BODY_BYTES:
                raise BadRequest("the server is busy receiving other uploads; retry later", 503)
            self.state.inflight_body_bytes += size
            counted += size
            return message

        try:
            await self.app(scope, budgeted_receive, send)
        finally:
            self.state.inflight_body_bytes -= counted


def create_app(
    settings: Settings,
    loader: Callable[[Settings, str | None], ServedModel | None] = load_from_registry,
    alias_lookup: Callable[[Settings], str | None] = champion_version,
    admin_without_token: bool = False,
    commit_lookup: Callable[[Settings, str], str | None] | None = None,
) -> Starlette:
    """The ASGI app; its state is one ``ServingState`` (``app.state.serving``).

    :param settings: model name and ``serving_token``.
    :param loader: loads a model version (``None``: the champion, at start only).
    :param alias_lookup: the version the registry alias ``champion`` names now; a
        reload serves only that version.
    :param admin_without_token: allow ``/admin/reload`` without a token, to direct
        loopback peers only (``serve`` sets it for a loopback-bound demo server).
    :param commit_lookup: the revision a version serves for now, read again when a reload
        keeps a version that is already loaded (default with the registry loader:
        ``served_for_commit``); a reused version then reports the newer commit.
    """
    if commit_lookup is None and loader is load_from_registry:
        commit_lookup = served_for_commit
    state = ServingState(settings, loader, alias_lookup, commit_lookup, admin_without_token)

    app = Starlette(
        routes=[
            Route("/health", state.health),
            Route("/version", state.version),
            Route("/metrics", state.prometheus),
            Route("/predict", state.predict, methods=["POST"], max_body_size=MAX_BODY_BYTES),
            Route("/admin/reload", state.reload, methods=["POST"], max_body_size=MAX_BODY_BYTES),
        ],
        lifespan=state.lifespan,
        middleware=[Middleware(CountErrors, metrics=state.metrics), Middleware(BodyBudget, state=state)],
        exception_handlers={
            ApiError: state.on_error,
            images.ImageDecodeError: state.on_error,
            HTTPException: state.on_error,
            Exception: state.on_error,
        },
    )
    app.state.serving = state
    return app


def _reload_request(body: Any) -> tuple[str | None, dict[str, Any] | None]:
    """The version (``None``: the champion) and the smoke sample of a reload body, validated."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    wanted = body.get("model_version")
    if wanted is not None:
        if isinstance(wanted, bool) or not isinstance(wanted, (str, int)) or not VERSION.fullmatch(str(wanted)):
            raise BadRequest(f"model_version must be 1 to 9 ASCII digits, got {str(wanted)[:40]!r}")
        wanted = str(int(wanted))
    smoke = body.get("smoke")
    if smoke is not None and not isinstance(smoke, dict):
        raise BadRequest('smoke must be a JSON object {"images": [...], "classes": [...]}')
    return wanted, smoke


class _NotInline(Exception):
    """The request is too big to decode on the event loop."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON") from None


def _checked(blobs: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    if len(blobs) > MAX_BATCH:
        raise BadRequest(f"{len(blobs)} images in one request, the limit is {MAX_BATCH}", 413)
    for name, data in blobs:
        if len(data) > MAX_IMAGE_BYTES:
            raise BadRequest(f"{name} is {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}", 413)
    return blobs


def _body_images(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """Images of a JSON ``{"images": [base64, ...]}`` body or of a raw image body."""
    if content_type == "application/json":
        parsed = _json(body)
        items = parsed.get("images") if isinstance(parsed, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise BadRequest('JSON body must be {"images": ["<base64 image>", ...]} with at least one image')
        if len(items) > MAX_BATCH:
            raise BadRequest(f"{len(items)} images in one request, the limit is {MAX_BATCH}", 413)
        blobs = []
        for i, item in enumerate(items):
            try:
                blobs.append((f"images[{i}]", base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError):
                raise BadRequest(f"images[{i}] is not valid base64") from None
        return _checked(blobs)
    if not body:
        raise BadRequest("empty body: send an image (multipart 'file', JSON {\"images\": [...]} or raw bytes)")
    return _checked([("body", body)])


async def _multipart_images(request: Request) -> list[tuple[str, bytes]]:
    """Images of a multipart body already read (within the limit): every file part."""
    try:
        form = await request.form(max_files=MAX_BATCH, max_part_size=MAX_IMAGE_BYTES)
    except HTTPException as exc:  # Starlette's answer to a malformed multipart body
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types for bad multipart
        raise BadRequest(f"malformed multipart body: {exc}") from None
    try:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise BadRequest("multipart body has no file field (send the image as field 'file')")
        return _checked([(u.filename or f"file[{i}]", await u.read()) for i, u in enumerate(uploads)])
    finally:
        await form.close()


def _pixels(name: str, data: bytes) -> int:
    """Width x height from the image header, without decoding the pixels (PNG read directly, else Pillow)."""
    if not data:
        raise images.ImageDecodeError(f"{name} is empty")
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width * height
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad headers
        raise images.ImageDecodeError(f"{name} is not a decodable image: {exc}") from None


def _decode_all(model: ServedModel, blobs: list[tuple[str, bytes]], inline: bool = False) -> np.ndarray:
    """Check the request's pixel budget from the headers, then decode every image into one batch."""
    total = 0
    for name, data in blobs:
        total += _pixels(name, data)
        if total > MAX_REQUEST_PIXELS:
            raise BadRequest(
                f"{name} brings the request to {total:,} pixels, over the per-request budget of "
                f"{MAX_REQUEST_PIXELS:,} pixels (send fewer or smaller images)",
                413,
            )
    if inline and total > INLINE_PIXELS:
        raise _NotInline
    return np.stack([images.decode(b, model.height, model.width, model.channels, name=name) for name, b in blobs])


async def _to_batch(
    pool: concurrent.futures.Executor | None,
    model: ServedModel,
    blobs: Callable[[], list[tuple[str, bytes]]],
    body_bytes: int,
) -> np.ndarray:
    """Decode on the event loop when the request is tiny, else in the decode pool."""
    if body_bytes <= INLINE_BYTES:
        found = blobs()
        try:
            return _decode_all(model, found, inline=True)
        except _NotInline:

            def work() -> np.ndarray:
                return _decode_all(model, found)
    else:

        def work() -> np.ndarray:
            return _decode_all(model, blobs())

    return await asyncio.get_running_loop().run_in_executor(pool, work)


def _bounded_protocol():
    """uvicorn's httptools protocol plus a deadline and a size limit for every request head.

    uvicorn times out idle keep-alive connections but not a connection that never
    sends a complete head (nor one dribbling header bytes); this closes both.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: PLC0415

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_deadline_passed)

        def _disarm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline_passed(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                raise ValueError(f"request head over {MAX_HEAD_BYTES} bytes")

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if self._head_timer is None:
                self._arm_head_deadline()

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm_head_deadline()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._arm_head_deadline()

    return BoundedHttpToolsProtocol


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse a server whose admin endpoint would be open beyond loopback."""
    if not settings.serving_token and not is_loopback(host):
        raise UnsafeServerConfig(
            f"refusing to serve on {host}: without GITOPS_ML_SERVING_TOKEN anyone who reaches the port could "
            f"use /admin/reload; set GITOPS_ML_SERVING_TOKEN or bind 127.0.0.1 (the embedded demo)"
        )


def server_config(app, host: str, port: int, trusted_proxies: str = ""):
    """The uvicorn configuration with every limit of this module (``serve`` and the tests use it)."""
    import uvicorn  # noqa: PLC0415

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        http=_bounded_protocol(),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=LIMIT_CONCURRENCY,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=trusted_proxies or "127.0.0.1",
    )


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the server; refuses to start on a non-loopback host without ``GITOPS_ML_SERVING_TOKEN``.

    ``GITOPS_ML_TRUSTED_PROXIES`` (comma-separated addresses): proxies whose
    ``X-Forwarded-For`` names the client; unset, the TCP peer is the client.
    """
    import uvicorn  # noqa: PLC0415

    check_exposure(settings, host)
    trusted = settings.trusted_proxies.strip()
    app = create_app(settings, admin_without_token=not settings.serving_token and is_loopback(host) and not trusted)
    uvicorn.Server(server_config(app, host, port, trusted)).run()
