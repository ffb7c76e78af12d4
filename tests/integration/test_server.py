"""The serving app with a real Keras model: predict formats, input validation, version, atomic reload."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from gitops_ml import training
from gitops_ml.config import Settings
from gitops_ml.deploy import server

CLASSES = ["zero", "one", "two"]


def served(version: str, commit_sha: str, bias: int = 0) -> server.ServedModel:
    params = {"image": {"height": 8, "width": 8, "channels": 1}, "train": {"learning_rate": 0.01}}
    import keras

    keras.utils.set_random_seed(int(version))
    model = training.build_model(len(CLASSES), params)
    return server.ServedModel(
        model_version=version,
        commit_sha=commit_sha,
        data_hash="d" * 32,
        airflow_run_id=f"commit__{commit_sha}",
        class_names=CLASSES,
        height=8,
        width=8,
        channels=1,
        predict=training.compile_predictor(model),
    )


MODELS = {"1": lambda: served("1", "a" * 40), "2": lambda: served("2", "b" * 40)}


def loader(settings, version):
    if version is None:
        return MODELS["1"]()
    if version not in MODELS:
        raise RuntimeError(f"model version {version} has no artifacts")
    return MODELS[version]()


ALIAS = {"champion": "1"}  # what the registry alias names, as the server reads it at each reload


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("home"), serving_token="t0ken")
    app = server.create_app(settings, loader=loader, alias_lookup=lambda s: ALIAS["champion"])
    with TestClient(app) as test_client:
        yield test_client


def png(size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (*size, 3) if mode == "RGB" else size, dtype=np.uint8), mode
    ).save(buf, "PNG")
    return buf.getvalue()


def test_version_health_and_headers(client):
    body = client.get("/version").json()
    assert body["model_version"] == "1" and body["commit_sha"] == "a" * 40 and body["class_names"] == CLASSES
    health = client.get("/health")
    assert health.json()["model_loaded"] is True
    assert health.headers["X-Model-Version"] == "1" and health.headers["X-Commit-Sha"] == "a" * 40


def test_predict_multipart_json_and_raw(client):
    one = client.post("/predict", files={"file": ("x.png", png(), "image/png")})
    assert one.status_code == 200
    prediction = one.json()["predictions"][0]
    assert prediction["class"] in CLASSES and abs(sum(prediction["probabilities"].values()) - 1) < 1e-3
    assert one.json()["commit_sha"] == "a" * 40 and one.headers["X-Commit-Sha"] == "a" * 40
    batch = client.post(
        "/predict", json={"images": [base64.b64encode(png()).decode(), base64.b64encode(png((20, 30), "RGB")).decode()]}
    )
    assert batch.status_code == 200 and len(batch.json()["predictions"]) == 2
    raw = client.post("/predict", content=png(), headers={"content-type": "image/png"})
    assert raw.status_code == 200


@pytest.mark.parametrize(
    "kwargs,status,message",
    [
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty body"),
        ({"content": b"this is text", "headers": {"content-type": "image/png"}}, 400, "body is not a decodable image"),
        ({"files": {"file": ("notes.txt", b"hello", "text/plain")}}, 400, "notes.txt is not a decodable image"),
        ({"json": {"images": "not-a-list"}}, 400, 'JSON body must be {"images"'),
        ({"json": {"images": ["%%%"]}}, 400, "images[0] is not valid base64"),
        ({"content": b"{bad json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        (
            {"content": b"\x89PNG" + b"0" * (server.MAX_IMAGE_BYTES + 1), "headers": {"content-type": "image/png"}},
            413,
            "over the limit",
        ),
    ],
)
def test_bad_input_gets_4xx_json_and_server_keeps_serving(client, kwargs, status, message):
    response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert client.post("/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200


def test_reload_requires_token_and_swaps_atomically(client):
    assert client.post("/admin/reload", json={"model_version": "2"}).status_code == 401
    auth = {"Authorization": "Bearer t0ken"}
    ALIAS["champion"] = "9"
    bad = client.post("/admin/reload", json={"model_version": "9"}, headers=auth)
    assert bad.status_code == 409 and "still serving 1" in bad.json()["error"]
    assert client.get("/version").json()["model_version"] == "1"
    assert client.post("/admin/reload", json={"model_version": "x; rm"}, headers=auth).status_code == 400
    ALIAS["champion"] = "2"
    ok = client.post("/admin/reload", json={"model_version": "2"}, headers=auth)
    assert ok.status_code == 200 and ok.json()["commit_sha"] == "b" * 40
    predicted = client.post("/predict", files={"file": ("x.png", png(), "image/png")})
    assert predicted.headers["X-Model-Version"] == "2"
    ALIAS["champion"] = "1"
    assert client.post("/admin/reload", json={}, headers=auth).json()["model_version"] == "1"


def test_no_champion_answers_503_not_500(tmp_path):
    app = server.create_app(Settings(home=tmp_path), loader=lambda s, v: None)
    with TestClient(app) as empty:
        assert empty.get("/health").json()["model_loaded"] is False
        assert empty.get("/version").status_code == 503
        response = empty.post("/predict", files={"file": ("x.png", png(), "image/png")})
        assert response.status_code == 503 and "no model deployed" in response.json()["error"]


def test_metrics_count_requests_by_version_and_outcome(client):
    client.post("/predict", files={"file": ("x.png", png(), "image/png")})
    client.post("/predict", content=b"", headers={"content-type": "image/png"})
    from gitops_ml.deploy import metrics

    text = client.get("/metrics").text
    samples = metrics.parse(text)
    version = client.get("/version").json()["model_version"]
    stats = metrics.version_stats(samples, version)
    assert stats["requests"] >= 2 and stats["latency_count"] == stats["requests"] and stats["predictions"] >= 1
    assert any(n == "gitops_ml_requests_total" and labels.get("outcome") == "bad_request" for n, labels, _ in samples)
    assert f'gitops_ml_model_info{{commit_sha="{"a" * 40 if version == "1" else "b" * 40}"' in text


def test_batcher_serves_queued_requests_in_one_call():
    import asyncio
    import time as _time

    from gitops_ml.deploy.metrics import ServerMetrics

    calls = []

    def slow_predict(x):
        calls.append(len(x))
        _time.sleep(0.2)
        return np.repeat(x.reshape(len(x), -1)[:, :1], 3, axis=1)

    model = server.ServedModel("7", "c" * 40, "", "", CLASSES, 1, 1, 1, slow_predict)

    async def scenario():
        batcher = server.Batcher(ServerMetrics())
        worker = asyncio.create_task(batcher.run())
        while batcher.queue is None:
            await asyncio.sleep(0)
        inputs = [np.full((1, 1, 1, 1), i, np.float32) for i in range(10)]
        results = await asyncio.gather(*(batcher.predict(model, x) for x in inputs))
        worker.cancel()
        return results

    results = asyncio.run(scenario())
    assert [float(r[0, 0]) for r in results] == list(range(10))  # each request gets its own rows back
    assert sum(calls) == 10 and len(calls) < 10 and max(calls) >= 5


def test_non_finite_model_output_is_a_counted_500(tmp_path):
    def nan_loader(settings, version):
        return server.ServedModel(
            "5", "e" * 40, "", "", CLASSES, 8, 8, 1, lambda x: np.full((len(x), 3), np.nan, np.float32)
        )

    with TestClient(server.create_app(Settings(home=tmp_path), loader=nan_loader)) as broken:
        response = broken.post("/predict", files={"file": ("x.png", png(), "image/png")})
        assert response.status_code == 500 and "non-finite" in response.json()["error"]
        assert 'gitops_ml_requests_total{model_version="5",outcome="error"} 1' in broken.get("/metrics").text
