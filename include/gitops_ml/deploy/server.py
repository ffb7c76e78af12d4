"""The serving app: ``POST /predict``, ``GET /version``, ``GET /health``, ``GET /metrics``, ``POST /admin/reload``.

The model behind the registry alias ``champion`` is loaded at start; ``/admin/reload``
loads another version beside the serving one, warms it up, then swaps a single
reference, so requests in flight finish on the old model and no request fails
during a switch.  A reload may carry a smoke sample (images with the classes the
evaluation predicted): the new model must reproduce them before it gets traffic.
The previous model stays loaded, so a rollback is a swap back, not a load.
Requests are micro-batched into compiled ``tf.function`` calls, never ``model.predict``.
Every response carries ``X-Model-Version`` and ``X-Commit-Sha``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from gitops_ml import images
from gitops_ml.config import Settings
from gitops_ml.deploy.metrics import ServerMetrics

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_BATCH = 256


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

    def info(self, model_name: str) -> dict[str, Any]:
        return {"model_name": model_name, "model_version": self.model_version, "commit_sha": self.commit_sha,
                "data_hash": self.data_hash, "airflow_run_id": self.airflow_run_id, "class_names": self.class_names}


def load_from_registry(settings: Settings, model_version: str | None) -> ServedModel | None:
    """Load ``model_version`` (default: the champion) from MLflow; ``None`` if there is no champion."""
    from gitops_ml import registry, training  # noqa: PLC0415 - heavy, only in the server process

    version = registry.get_alias(settings) if model_version is None else registry.get_version(settings, model_version)
    if version is None:
        return None
    model, meta = registry.load_model(settings, version)
    tags = registry.version_tags(version)
    return ServedModel(
        model_version=str(version.version), commit_sha=tags.get("commit_sha", ""),
        data_hash=tags.get("data_hash", ""), airflow_run_id=tags.get("airflow_run_id", ""),
        class_names=list(meta["class_names"]), height=int(meta["height"]), width=int(meta["width"]),
        channels=int(meta["channels"]), predict=training.compile_predictor(model),
    )


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelOutputError(Exception):
    """The model returned non-finite probabilities or raised: a server-side error, counted per version."""


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
            rows = out[start:start + len(batch)]
            start += len(batch)
            if not future.done():
                if np.isfinite(rows).all():
                    future.set_result(rows)
                else:
                    future.set_exception(ModelOutputError(
                        f"model version {model.model_version} returned non-finite probabilities"))


def smoke_check(model: ServedModel, smoke: dict[str, Any]) -> str | None:
    """Replay the evaluation sample on ``model``; return why it failed, or ``None``."""
    expected = smoke.get("classes") or []
    encoded = smoke.get("images") or []
    if not expected or len(expected) != len(encoded):
        return "smoke sample must hold as many images as expected classes (at least one)"
    batch = np.stack([images.decode(base64.b64decode(b), model.height, model.width, model.channels,
                                    name=f"smoke image {i}") for i, b in enumerate(encoded)])
    probabilities = model.predict(batch)
    if not np.isfinite(probabilities).all():
        return "the model returned non-finite probabilities on the smoke sample"
    got = [model.class_names[int(i)] for i in probabilities.argmax(axis=1)]
    wrong = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    if wrong:
        i, e, g = wrong[0]
        return (f"{len(wrong)} of {len(expected)} smoke predictions differ from the evaluation "
                f"(image {i}: expected {e}, got {g})")
    return None


def create_app(settings: Settings,
               loader: Callable[[Settings, str | None], ServedModel | None] = load_from_registry) -> Starlette:
    state: dict[str, ServedModel | None] = {"model": None, "previous": None}
    reload_lock = threading.Lock()
    metrics = ServerMetrics()
    batcher = Batcher(metrics)

    def headers(model: ServedModel | None = None) -> dict[str, str]:
        """``X-Model-Version`` / ``X-Commit-Sha`` of ``model`` (default: the one serving now)."""
        model = model or state["model"]
        return {"X-Model-Version": model.model_version, "X-Commit-Sha": model.commit_sha} if model else {}

    def error(message: str, status: int, model: ServedModel | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers(model))

    def switch_to(model: ServedModel) -> None:
        if state["model"] is not model:
            state["previous"] = state["model"]
            state["model"] = model  # one reference: requests in flight keep the model they started with
        metrics.info = {"model_version": model.model_version, "commit_sha": model.commit_sha,
                        "data_hash": model.data_hash}

    async def health(request: Request) -> JSONResponse:
        model = state["model"]
        return JSONResponse({"status": "ok", "model_loaded": model is not None,
                             "model_version": model.model_version if model else None}, headers=headers())

    async def version(request: Request) -> JSONResponse:
        model = state["model"]
        if model is None:
            return error("no model deployed yet: the registry has no champion", 503)
        return JSONResponse(model.info(settings.model_name), headers=headers())

    async def prometheus(request: Request) -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4", headers=headers())

    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        model = state["model"]  # one reference for the whole request: a switch cannot split it
        if model is None:
            return error("no model deployed yet: the registry has no champion", 503)
        try:
            blobs = await _read_images(request)
            batch = np.stack([images.decode(b, model.height, model.width, model.channels, name=name)
                              for name, b in blobs])
            probabilities = await batcher.predict(model, batch)
        except (BadRequest, images.ImageDecodeError) as exc:
            metrics.observe_request(model.model_version, "bad_request", time.perf_counter() - started)
            return error(str(exc), getattr(exc, "status", 400), model)
        except ModelOutputError as exc:
            metrics.observe_request(model.model_version, "error", time.perf_counter() - started)
            log.error("%s", exc)
            return error(str(exc), 500, model)
        top = probabilities.max(axis=1)
        metrics.observe_predictions(model.model_version, top.tolist())
        names = model.class_names
        body = {"predictions": [{"class": names[int(row.argmax())],
                                 "probabilities": {c: round(float(p), 6) for c, p in zip(names, row)}}
                                for row in probabilities],
                "model_name": settings.model_name, "model_version": model.model_version,
                "commit_sha": model.commit_sha, "data_hash": model.data_hash}
        metrics.observe_request(model.model_version, "ok", time.perf_counter() - started)
        return JSONResponse(body, headers=headers(model))

    async def reload(request: Request) -> JSONResponse:
        if settings.serving_token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), settings.serving_token.encode()):
                return error("missing or wrong bearer token for /admin/reload", 401)
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return error("body must be JSON: {\"model_version\": \"<n>\", \"smoke\": {...}} or {}", 400)
        if not isinstance(body, dict):
            return error("body must be a JSON object", 400)
        wanted = body.get("model_version")
        if wanted is not None and not str(wanted).isdigit():
            return error(f"model_version must be a version number, got {wanted!r}", 400)
        smoke = body.get("smoke")

        def _load() -> tuple[ServedModel | None, str | None]:
            with reload_lock:
                previous = state["previous"]
                if wanted is not None and previous is not None and previous.model_version == str(wanted):
                    candidate = previous  # rollback: the old model is still loaded and warm
                elif wanted is not None and state["model"] is not None and state["model"].model_version == str(wanted):
                    candidate = state["model"]
                else:
                    candidate = loader(settings, None if wanted is None else str(wanted))
                if candidate is None:
                    return None, None
                failure = smoke_check(candidate, smoke) if smoke else None
                if failure is None:
                    switch_to(candidate)
                return candidate, failure

        try:
            loaded, failure = await run_in_threadpool(_load)
        except Exception as exc:  # noqa: BLE001 - report any load failure, keep serving the old model
            log.exception("loading model version %s failed", wanted)
            return error(f"could not load model version {wanted}: {exc}; still serving "
                         f"{state['model'].model_version if state['model'] else 'nothing'}", 409)
        if loaded is None:
            return error("the registry has no champion to load", 409)
        if failure:
            current = state["model"].model_version if state["model"] else "nothing"
            log.error("smoke check of model version %s failed: %s", loaded.model_version, failure)
            return error(f"smoke check of model version {loaded.model_version} failed: {failure}; "
                         f"still serving {current}", 409)
        log.info("now serving model version %s (commit %s)", loaded.model_version, loaded.commit_sha)
        return JSONResponse(loaded.info(settings.model_name), headers=headers())

    def startup() -> None:
        try:
            model = loader(settings, None)
            if model is not None:
                switch_to(model)
        except Exception:  # noqa: BLE001 - start anyway, report at /health
            log.exception("could not load the champion at start")
        if state["model"]:
            log.info("serving model version %s (commit %s)", state["model"].model_version, state["model"].commit_sha)
        else:
            log.info("no champion yet: /predict answers 503 until a deploy")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await run_in_threadpool(startup)
        task = asyncio.create_task(batcher.run())
        while batcher.queue is None:
            await asyncio.sleep(0)
        yield
        task.cancel()

    app = Starlette(routes=[
        Route("/health", health), Route("/version", version), Route("/metrics", prometheus),
        Route("/predict", predict, methods=["POST"]), Route("/admin/reload", reload, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.served = state
    return app


async def _read_images(request: Request) -> list[tuple[str, bytes]]:
    """Images of a request: multipart ``file`` fields, JSON ``{"images": [base64, ...]}`` or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES * MAX_BATCH:
        raise BadRequest(f"request body of {declared} bytes is over the limit", 413)
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=MAX_BATCH, max_part_size=MAX_IMAGE_BYTES)
        except Exception as exc:  # noqa: BLE001 - starlette raises several types for bad multipart
            raise BadRequest(f"malformed multipart body: {exc}") from None
        uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            raise BadRequest("multipart body has no file field (send the image as field 'file')")
        blobs = [(u.filename or f"file[{i}]", await u.read()) for i, u in enumerate(uploads)]
    elif content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        items = body.get("images") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise BadRequest('JSON body must be {"images": ["<base64 image>", ...]} with at least one image')
        blobs = []
        for i, item in enumerate(items):
            try:
                blobs.append((f"images[{i}]", base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError):
                raise BadRequest(f"images[{i}] is not valid base64") from None
    else:
        data = await request.body()
        if not data:
            raise BadRequest("empty body: send an image (multipart 'file', JSON {\"images\": [...]} or raw bytes)")
        blobs = [("body", data)]
    if len(blobs) > MAX_BATCH:
        raise BadRequest(f"{len(blobs)} images in one request, the limit is {MAX_BATCH}", 413)
    for name, data in blobs:
        if len(data) > MAX_IMAGE_BYTES:
            raise BadRequest(f"{name} is {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}", 413)
    return blobs


def serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn  # noqa: PLC0415

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)
