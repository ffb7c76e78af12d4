"""Continuous delivery a careful team would trust: gate, reuse on revert, smoke check, watch-window
rollback, zero failed requests during a switch, the Git note, and ``gitops-ml trace``.

Real Git, DVC, MLflow, TensorFlow and a real ``gitops-ml serve`` process throughout.
"""

import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from gitops_ml import demo, flow, pipeline, registry, trace, training
from gitops_ml.errors import DeployError
from tests.e2e.test_dag import all_versions, load_dag, run_note, task_states
from tests.helpers import git

pytestmark = pytest.mark.e2e


@pytest.fixture
def champion(settings, demo_repo, server):
    """Version 1, trained from the demo's first commit and serving (the first model ever: absolute gate only)."""
    result = flow.run_local(settings, demo_repo["commit_sha"])
    assert result.model_version == "1" and result.gate_passed
    evaluation = registry.load_run_json(settings, result.mlflow_run_id, "evaluation/evaluation.json")
    assert evaluation["champion_version"] is None and evaluation["gate"]["passed"]
    return result


def digit_png(repo, invert: bool = False) -> bytes:
    path = sorted((repo / "data" / "images" / "4").glob("*.png"))[0]
    pixels = np.asarray(Image.open(path))
    buf = io.BytesIO()
    Image.fromarray((255 - pixels) if invert else pixels).save(buf, "PNG")
    return buf.getvalue()


class Traffic:
    """Sends images to /predict until stopped; counts answers by status and model version."""

    def __init__(self, url: str, payloads: list[bytes]):
        self.url, self.payloads = url, payloads
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                response = client.post(
                    self.url + "/predict",
                    content=self.payloads[i % len(self.payloads)],
                    headers={"content-type": "image/png"},
                )
                self.statuses.append(response.status_code)
                self.versions.add(response.headers.get("X-Model-Version"))
                i += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def test_gate_failure_is_not_promoted_and_noted_on_the_commit(
    airflow_db, settings, demo_repo, server, champion, monkeypatch
):
    monkeypatch.setenv("GITOPS_ML_PUSH_NOTES", "true")
    repo = demo_repo["path"]
    demo.bump_param(repo, "train.learning_rate", 0.00001)
    bad_sha = demo.bump_param(repo, "train.epochs", 1, "a model that cannot learn")
    run = load_dag().test(run_conf={"commit_sha": bad_sha})
    states = task_states(run)
    assert run.state == "success", states
    assert states["deploy"] == "skipped" and states["record"] == "skipped" and states["register"] == "success"
    version = registry.find_version(settings, bad_sha)
    tags = registry.version_tags(version)
    assert tags["gate"] == "failed" and "below gate.min_accuracy 0.8" in tags["gate_reasons"]
    assert tags["gate_compared_with"] == "1"
    assert str(registry.get_alias(settings, registry.CHALLENGER).version) == str(version.version)
    assert str(registry.get_alias(settings).version) == "1"
    assert server.version()["model_version"] == "1"
    note = git(repo, "notes", "--ref", "gitops-ml", "show", bad_sha)
    assert "gate: failed" in note and "deployed: false" in note and f"version {version.version}" in note
    assert f"NOT PROMOTED: version {version.version} failed the gate: accuracy " in run_note(run)


def test_revert_reuses_the_previous_version_without_training(settings, demo_repo, server, champion):
    repo = demo_repo["path"]
    second = flow.run_local(settings, demo.bump_param(repo, "train.learning_rate", 0.004, "tune"))
    assert second.model_version == "2" and server.version()["model_version"] == "2"
    git(repo, "revert", "--no-edit", "HEAD")
    revert_sha = git(repo, "rev-parse", "HEAD")
    started = time.monotonic()
    result = flow.run_local(settings, revert_sha)
    seconds = time.monotonic() - started
    assert result.reused is True and result.model_version == "1" and result.mlflow_run_id is None
    assert result.outcome["reused_from_commit"] == demo_repo["commit_sha"]
    assert len(all_versions(settings)) == 2
    assert server.version()["model_version"] == "1" and str(registry.get_alias(settings).version) == "1"
    # The server answers for the revert (the desired revision) and says what the model was built from.
    served = server.version()
    assert served["commit_sha"] == revert_sha and served["built_from_commit"] == demo_repo["commit_sha"]
    assert registry.serving_commit(settings) == revert_sha
    assert result.outcome["summary"].startswith(
        f"PROMOTED: version 1 (reused, built from commit {demo_repo['commit_sha']}) replaced version 2"
    )
    print(f"revert brought version 1 back in {seconds:.1f} s")  # measured in the benchmark, not asserted


def test_smoke_check_failure_rolls_back(settings, demo_repo, server, champion):
    challenger = flow.run_local(settings, demo.bump_param(demo_repo["path"], "train.seed", 7), deploy_model=False)
    version = registry.get_version(settings, challenger.model_version)
    store = settings.home / "mlflow" / "artifacts"

    def model_file(v):
        model_id = v.source.rsplit("/", 1)[-1]
        return next(p for p in store.rglob("model.keras") if model_id in str(p))

    # A real fault: the challenger's serving artifact in the store is altered after its evaluation
    # (its output layer now names the neighbouring class), so it loads fine but predicts wrong.
    import shutil

    import keras

    model = keras.models.load_model(model_file(version))
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.roll(kernel, 1, axis=1), np.roll(bias, 1)])
    serving = next(p for p in store.rglob(registry.SERVING_ARTIFACT) if version.run_id in str(p))
    shutil.rmtree(serving)
    training.export_serving(model, serving, np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(DeployError, match=r"smoke check of model version 2 failed: .* differ from the evaluation"):
        pipeline.deploy(settings, challenger.commit, "2", {})
    assert str(registry.get_alias(settings).version) == "1" and server.version()["model_version"] == "1"
    assert registry.version_tags(registry.get_version(settings, "2"))["deploy_outcome"] == "rolled_back"


def test_no_request_fails_while_switching(settings, demo_repo, server, champion):
    repo = demo_repo["path"]
    second = flow.run_local(settings, demo.bump_param(repo, "train.seed", 11), deploy_model=False)
    with Traffic(server.url, [digit_png(repo)]) as traffic:
        time.sleep(0.5)
        pipeline.deploy(settings, second.commit, second.model_version, {})
        pipeline.deploy(settings, champion.commit, "1", {})
        pipeline.deploy(settings, second.commit, second.model_version, {})
        time.sleep(0.5)
    assert len(traffic.statuses) > 50
    assert set(traffic.statuses) == {200}, f"{sum(s != 200 for s in traffic.statuses)} failed requests"
    assert {"1", second.model_version} <= traffic.versions


def register_bright_image_bug(settings, demo_repo) -> tuple[dict, str]:
    """A model that passes the gate (dark digits) but returns inf on bright images, as buggy code would."""
    import keras

    commit_sha = demo.bump_param(demo_repo["path"], "train.seed", 99, "custom output layer")
    commit = pipeline.resolve(settings, commit_sha).commit
    base, meta = registry.load_model(settings, registry.get_version(settings, "1"))
    image = keras.Input((8, 8, 1), name="image")
    brightness = keras.layers.GlobalAveragePooling2D()(image)
    bright = keras.layers.Dense(
        1,
        activation="relu",
        kernel_initializer=keras.initializers.Constant(1000.0),
        bias_initializer=keras.initializers.Constant(-500.0),
    )(brightness)
    blow_up = keras.layers.Dense(10, kernel_initializer=keras.initializers.Constant(1e38))(bright)
    model = keras.Model(image, keras.layers.Add()([base(image), blow_up]))
    run_tags = registry.lineage_tags({"commit_sha": commit_sha})
    logged = registry.log_training(
        settings, "bright-image-bug", run_tags, {}, model, {}, meta, np.zeros((1, 8, 8, 1), np.float32)
    )
    champion_run = registry.get_version(settings, "1").run_id
    registry.log_evaluation(
        settings,
        logged["run_id"],
        {"test_accuracy": 0.98},
        {},
        {"smoke_sample.json": registry.load_run_json(settings, champion_run, "evaluation/smoke_sample.json")},
    )
    version = registry.register(
        settings,
        logged["run_id"],
        logged["model_uri"],
        {"commit_sha": commit_sha, "data_hash": demo_repo["data_hash"], "gate": "passed"},
    )
    return commit, str(version.version)


def test_watch_window_rolls_back_a_model_that_fails_live(settings, demo_repo, server, champion):
    commit, bad_version = register_bright_image_bug(settings, demo_repo)
    policy = {"deploy": {"watch_seconds": 20, "min_requests": 10, "min_clients": 1, "max_error_rate": 0.05}}
    payloads = [digit_png(demo_repo["path"]), digit_png(demo_repo["path"], invert=True)]
    with Traffic(server.url, payloads) as traffic:
        started = time.monotonic()
        with pytest.raises(DeployError, match=f"version {bad_version} .* rolled back to version 1 after .* error rate"):
            pipeline.deploy(settings, commit, bad_version, policy)
        elapsed = time.monotonic() - started
        time.sleep(0.3)
    assert elapsed < 20, "the rollback should happen as soon as the limit is breached"
    assert 500 in traffic.statuses  # the bug was live, and seen
    assert server.version()["model_version"] == "1" and str(registry.get_alias(settings).version) == "1"
    tags = registry.version_tags(registry.get_version(settings, bad_version))
    assert tags["deploy_outcome"] == "rolled_back" and "error rate" in tags["rollback_reason"]
    metrics = httpx.get(server.url + "/metrics").text
    assert f'gitops_ml_requests_total{{model_version="{bad_version}",outcome="error"}}' in metrics
    assert 'gitops_ml_model_info{commit_sha="' in metrics

    chain = trace.trace(settings, bad_version)
    assert chain["commit"]["commit_sha"] == commit.commit_sha
    assert any(e["step"] == "deploy" and e["outcome"] == "rolled_back" for e in chain["deploy_events"])
    assert chain["serving_now"]["model_version"] == "1"
    text = trace.render(trace.trace(settings, demo_repo["commit_sha"]))
    assert "version 1" in text and "serving    version 1 of commit" in text


def test_every_server_converges_or_all_roll_back(settings, demo_repo, server, champion, tmp_path, monkeypatch):
    from tests.conftest import ServerProcess
    from tests.helpers import free_port

    second = ServerProcess(
        settings.with_overrides(serving_url=f"http://127.0.0.1:{free_port()}"), tmp_path / "serve2.log"
    )
    # A third server whose MLflow store is not the registry's: it cannot load any version.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    misconfigured = ServerProcess(
        settings.with_overrides(serving_url=f"http://127.0.0.1:{free_port()}"), tmp_path / "serve3.log"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    try:
        assert second.version()["model_version"] == "1" and misconfigured.version() is None
        challenger = flow.run_local(settings, demo.bump_param(demo_repo["path"], "train.seed", 5), deploy_model=False)
        both = settings.with_overrides(serving_url=f"{server.url},{second.url}")
        result = pipeline.deploy(both, challenger.commit, challenger.model_version, {})
        assert set(result.serving) == {server.url, second.url}
        assert server.version()["model_version"] == second.version()["model_version"] == "2"

        all_three = settings.with_overrides(serving_url=f"{server.url},{second.url},{misconfigured.url}")
        # A newer commit going back to version 1's inputs (a revert): deploys version 1 again.
        back = pipeline.resolve(settings, demo.bump_param(demo_repo["path"], "train.seed", 42, "back")).commit
        with pytest.raises(DeployError, match=f"failed on {misconfigured.url} and was rolled back to version 2"):
            pipeline.deploy(all_three, back, "1", {})
        assert str(registry.get_alias(settings).version) == "2"
        assert server.version()["model_version"] == second.version()["model_version"] == "2"
    finally:
        second.stop()
        misconfigured.stop()


def test_bookkeeping_cut_short_by_a_crash_is_completed_by_the_next_run(settings, demo_repo, server, champion):
    """A run killed between the alias move and the outcome tags (the fault is reproduced by running the
    real steps up to the switch and stopping there, as ``kill -9`` would): the re-run records the
    promotion with the version it replaced instead of "unchanged"."""
    commit_sha = demo.bump_param(demo_repo["path"], "train.seed", 7, "second model")
    second = flow.run_local(settings, commit_sha, run_id="commit__crashed", deploy_model=False)
    version = second.model_version
    params = {"deploy": {}}
    assert pipeline.deploy_intent(settings, version, "commit__crashed") is None
    from gitops_ml import deploy as deploy_mod

    deploy_mod.deploy(settings, version)  # alias moved and server switched; the process dies here
    assert server.version()["model_version"] == version
    assert "deploy_outcome" not in registry.version_tags(registry.get_version(settings, version))

    result = pipeline.deploy(settings, second.commit, version, params, run_id="commit__rerun")
    assert result.changed and result.previous_version == "1"
    assert result.recovered_from_run == "commit__crashed"
    tags = registry.version_tags(registry.get_version(settings, version))
    assert (
        tags["deploy_outcome"] == "promoted" and tags["replaced_version"] == "1" and tags["deploy_pending"] == "false"
    )
    assert registry.version_tags(registry.get_version(settings, "1"))["replaced_by"] == version
    again = pipeline.deploy(settings, second.commit, version, params, run_id="commit__rerun2")
    assert not again.changed, "once recorded, a further run is unchanged"


def test_runs_finishing_out_of_order_converge_on_the_branch_head(settings, demo_repo, server, champion):
    """A burst B (passes), C (fails the gate), D (passes, same inputs as B) run newest first, as a queue that
    started the newer run first would: the older B never deploys over D, C is not promoted, and once the
    runs settle the server serves D's revision (the convergence rule of a branch)."""
    repo = demo_repo["path"]
    b = demo.bump_param(repo, "gate.max_accuracy_drop", 1.0, "B: tolerate any drop")
    c = demo.bump_param(repo, "gate.min_accuracy", 0.9999, "C: an impossible gate")
    d = demo.bump_param(repo, "gate.min_accuracy", 0.8, "D: back to B's params")
    results = {sha: flow.run_local(settings, sha, run_id=f"commit__{sha}") for sha in (d, b, c)}

    d_version = results[d].model_version
    assert results[d].deploy.changed and results[d].outcome["summary"].startswith("PROMOTED")
    assert results[b].model_version == d_version and results[b].reused, "B has D's inputs: reused"
    assert results[b].deploy.superseded_by == d
    assert results[b].outcome["summary"].startswith(f"NOT DEPLOYED: version {d_version}")
    assert not results[c].gate_passed and results[c].outcome["summary"].startswith("NOT PROMOTED")
    assert registry.serving_commit(settings) == d
    assert str(registry.get_alias(settings).version) == d_version
    assert server.version()["model_version"] == d_version
    assert git(repo, "rev-parse", "HEAD") == d


def test_first_model_that_fails_on_one_server_leaves_every_server_serving_nothing(
    settings, demo_repo, server, tmp_path, monkeypatch
):
    """No champion yet: server 1 switches to version 1, server 2 (wrong MLflow store) cannot load it. The
    rollback removes the alias and server 1 follows the registry (serves nothing) instead of silently
    serving a version the registry no longer names."""
    from tests.conftest import ServerProcess
    from tests.helpers import free_port

    first = flow.run_local(settings, demo_repo["commit_sha"], deploy_model=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    misconfigured = ServerProcess(
        settings.with_overrides(serving_url=f"http://127.0.0.1:{free_port()}"), tmp_path / "serve2.log"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    try:
        both = settings.with_overrides(serving_url=f"{server.url},{misconfigured.url}")
        with pytest.raises(DeployError, match="rolled back to version None"):
            pipeline.deploy(both, first.commit, first.model_version, {})
        assert registry.get_alias(settings) is None
        assert server.version() is None and misconfigured.version() is None
        assert (
            httpx.post(
                server.url + "/predict", content=digit_png(demo_repo["path"]), headers={"content-type": "image/png"}
            ).status_code
            == 503
        )
    finally:
        misconfigured.stop()
