"""The serving app: ``POST /predict``, ``GET /version``, ``GET /health``, ``POST /admin/reload``.

The model behind the registry alias ``champion`` is loaded at start; ``/admin/reload``
loads another version beside the serving one, warms it up, then swaps a single
reference, so requests in flight finish on the old model and no request fails
during a switch.  Every response carries ``X-Model-Version`` and ``X-Commit-Sha``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gitops_ml import images
from gitops_ml.config import Settings

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


def create_app(settings: Settings,
               loader: Callable[[Settings, str | None], ServedModel | None] = load_from_registry) -> Starlette:
    state: dict[str, ServedModel | None] = {"model": None}
    reload_lock = threading.Lock()

    def headers() -> dict[str, str]:
        model = state["model"]
        return {"X-Model-Version": model.model_version, "X-Commit-Sha": model.commit_sha} if model else {}

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers())

    async def health(request: Request) -> JSONResponse:
        model = state["model"]
        return JSONResponse({"status": "ok", "model_loaded": model is not None,
                             "model_version": model.model_version if model else None}, headers=headers())

    async def version(request: Request) -> JSONResponse:
        model = state["model"]
        if model is None:
            return error("no model deployed yet: the registry has no champion", 503)
        return JSONResponse(model.info(settings.model_name), headers=headers())

    async def predict(request: Request) -> JSONResponse:
        model = state["model"]  # one reference for the whole request: a switch cannot split it
        if model is None:
            return error("no model deployed yet: the registry has no champion", 503)
        try:
            blobs = await _read_images(request)
            batch = np.stack([images.decode(b, model.height, model.width, model.channels, name=name)
                              for name, b in blobs])
        except BadRequest as exc:
            return error(str(exc), exc.status)
        except images.ImageDecodeError as exc:
            return error(str(exc), 400)
        probabilities = await run_in_threadpool(model.predict, batch)
        predictions = [
            {"class": model.class_names[int(row.argmax())],
             "probabilities": {c: round(float(p), 6) for c, p in zip(model.class_names, row)}}
            for row in probabilities
        ]
        body = {"predictions": predictions, **model.info(settings.model_name)}
        body.pop("class_names")
        return JSONResponse(body, headers={"X-Model-Version": model.model_version, "X-Commit-Sha": model.commit_sha})

    async def reload(request: Request) -> JSONResponse:
        if settings.serving_token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), settings.serving_token.encode()):
                return error("missing or wrong bearer token for /admin/reload", 401)
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return error("body must be JSON: {\"model_version\": \"<n>\"} or {}", 400)
        wanted = body.get("model_version") if isinstance(body, dict) else None
        if wanted is not None and not str(wanted).isdigit():
            return error(f"model_version must be a version number, got {wanted!r}", 400)

        def _load() -> ServedModel | None:
            with reload_lock:
                loaded = loader(settings, None if wanted is None else str(wanted))
                if loaded is not None:
                    state["model"] = loaded  # atomic swap of one reference
                return loaded

        try:
            loaded = await run_in_threadpool(_load)
        except Exception as exc:  # noqa: BLE001 - report any load failure, keep serving the old model
            log.exception("loading model version %s failed", wanted)
            return error(f"could not load model version {wanted}: {exc}; still serving "
                         f"{state['model'].model_version if state['model'] else 'nothing'}", 409)
        if loaded is None:
            return error("the registry has no champion to load", 409)
        log.info("now serving model version %s (commit %s)", loaded.model_version, loaded.commit_sha)
        return JSONResponse(loaded.info(settings.model_name), headers=headers())

    def startup() -> None:
        try:
            state["model"] = loader(settings, None)
        except Exception:  # noqa: BLE001 - start anyway, report at /health
            log.exception("could not load the champion at start")
        if state["model"]:
            log.info("serving model version %s (commit %s)", state["model"].model_version, state["model"].commit_sha)
        else:
            log.info("no champion yet: /predict answers 503 until a deploy")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await run_in_threadpool(startup)
        yield

    app = Starlette(routes=[
        Route("/health", health), Route("/version", version),
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
