"""The model code of the model repository through the live embedded stack (``airflow standalone``:
scheduler, dag-processor, triggerer, API server, LocalExecutor; MLflow; the model server), commits
found by the watcher: a change of ``model/model.py`` trains and serves a new version whose
``/version`` names the new SHA and code hash; a ``git revert`` of it serves the earlier version again
without training. (The bad-code cases, the custom layer after a server restart, DVC-pinned weights
and the enforce case run through ``dag.test()`` in ``test_model_code_dag``.)"""

from pathlib import Path

import httpx
import pytest
import yaml

from gitops_ml import model_code, registry
from gitops_ml.airflow.client import AirflowClient
from tests.e2e.test_dag import all_versions
from tests.helpers import commit_file, git

pytestmark = pytest.mark.e2e

# Two epochs and an open gate: this test is about which code trains and serves, not about accuracy.
FAST_PARAMS = {
    "train": {"epochs": 2, "batch_size": 64},
    "gate": {"min_accuracy": 0.0, "max_accuracy_drop": 1.0, "min_class_recall": None},
}


@pytest.fixture
def fast_demo_repo(demo_repo):
    """The demo repository (its own ``model/model.py``) with fast training committed before the stack starts."""
    repo = demo_repo["path"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in FAST_PARAMS.items():
        params[section] = {**params[section], **values}
    commit_file(repo, "params.yaml", yaml.safe_dump(params, sort_keys=False), "fast training, open gate")
    return demo_repo


def served(serving_url: str) -> dict:
    return httpx.get(serving_url + "/version", timeout=10).json()


def finished_run(client: AirflowClient, commit_sha: str) -> tuple[dict, dict[str, str]]:
    """The watcher's run of ``commit_sha`` once it ended successfully, and its task states."""
    run = client.wait_for_run(f"commit__{commit_sha}", timeout=600)
    states = {ti["task_id"]: ti["state"] for ti in client.task_instances(run["dag_run_id"])}
    assert run["state"] == "success", states
    assert run["conf"]["trigger"] == "push", run["conf"]
    return run, states


def test_model_code_change_serves_and_revert_reuses_on_the_live_stack(settings, fast_demo_repo, live_stack, tmp_path):
    repo = fast_demo_repo["path"]
    client = AirflowClient(live_stack["airflow"])
    client.wait_for_dag()

    # The head (the demo's model/model.py): found by the watcher, trained, served as version 1.
    first_sha = git(repo, "rev-parse", "HEAD")
    demo_hash = model_code.locate(repo, {}).code_hash
    run, _ = finished_run(client, first_sha)
    assert run["note"].endswith("PROMOTED: version 1 is the first model served"), run["note"]
    version = served(live_stack["serving"])
    assert (version["commit_sha"], version["model_version"], version["model_code_hash"]) == (first_sha, "1", demo_hash)

    # A commit that changes only the model code: a new version is trained from it and served.
    model_file = repo / "model" / "model.py"
    changed_code = model_file.read_text().replace("keras.layers.Dense(128,", "keras.layers.Dense(64,")
    assert changed_code != model_file.read_text()
    code_sha = commit_file(repo, "model/model.py", changed_code, "model: a smaller dense layer")
    code_hash = model_code.locate(repo, {}).code_hash
    assert code_hash != demo_hash
    run, states = finished_run(client, code_sha)
    assert states["train"] == "success" and run["note"].endswith("PROMOTED: version 2 replaced version 1"), run["note"]
    version = served(live_stack["serving"])
    assert (version["commit_sha"], version["model_version"], version["model_code_hash"]) == (code_sha, "2", code_hash)
    trained = registry.find_version(settings, code_sha)
    assert registry.version_tags(trained)["model_code_hash"] == code_hash
    logged = registry.client(settings).download_artifacts(trained.run_id, "model_code/model/model.py", str(tmp_path))
    assert Path(logged).read_text() == changed_code  # the version was built from the committed code

    # git revert of it: the inputs are those of version 1 again, so version 1 serves without training.
    git(repo, "revert", "--no-edit", code_sha)
    revert_sha = git(repo, "rev-parse", "HEAD")
    assert model_code.locate(repo, {}).code_hash == demo_hash
    run, states = finished_run(client, revert_sha)
    assert (states["train"], states["evaluate"], states["register"], states["deploy"]) == (
        "skipped",
        "skipped",
        "skipped",
        "success",
    ), states
    assert run["note"].endswith(f"PROMOTED: version 1 (reused, built from commit {first_sha}) replaced version 2"), run[
        "note"
    ]
    assert registry.find_training_run(settings, run["dag_run_id"]) is None  # nothing trained
    assert len(all_versions(settings)) == 2  # and nothing registered
    version = served(live_stack["serving"])
    assert (version["commit_sha"], version["built_from_commit"], version["model_version"]) == (
        revert_sha,
        first_sha,
        "1",
    )
    assert version["model_code_hash"] == demo_hash
