"""DAG files stay cheap to parse: no TensorFlow, MLflow or DVC at module top level, no import errors."""

import json
import os
import subprocess
import sys
from itertools import pairwise

import pytest

from tests.helpers import ROOT

HEAVY = ["tensorflow", "keras", "mlflow", "dvc", "git", "sklearn"]


@pytest.mark.parametrize("dag_file", ["gitops_ml_pipeline.py", "gitops_ml_watch.py"])
def test_dag_file_imports_nothing_heavy(dag_file, watch_file):
    code = (
        "import json, sys, runpy\n"
        f"ns = runpy.run_path({str(ROOT / 'dags' / dag_file)!r})\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    env = {**os.environ, "GITOPS_ML_WATCH_CONFIG": str(watch_file)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


@pytest.fixture
def watch_file(tmp_path, monkeypatch):
    path = tmp_path / "watch.yaml"
    path.write_text(
        "repositories:\n"
        "  - {name: a, repo_url: 'https://u:${TOK}@git.example.com/a.git', retrain_schedule: '@daily'}\n"
        "  - {name: b, repo_url: /srv/git/b.git, branch: dev, retrain_schedule: null}\n"
    )
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(path))
    return path


def test_dagbag_has_no_import_errors_and_expected_wiring(watch_file):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["gitops_ml_pipeline"]
    order = ["resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy", "record"]
    assert set(order) == set(dag.task_dict)
    for upstream, downstream in pairwise(order):
        assert downstream in dag.task_dict[upstream].downstream_task_ids
    # Runs go on in parallel (several repositories, several workers); deploys one at a time.
    assert dag.max_active_runs > 1 and dag.schedule is None
    assert dag.task_dict["deploy"].max_active_tis_per_dag == 1

    assert {"gitops_ml_watch__a", "gitops_ml_retrain__a", "gitops_ml_watch__b"} <= set(bag.dags)
    assert "gitops_ml_retrain__b" not in bag.dags
    watcher = bag.dags["gitops_ml_watch__b"]
    assert watcher.max_active_runs == 1 and type(watcher.timetable).__name__ == "ContinuousTimetable"
    assert list(watcher.task_dict) == ["wait_for_commit", "plan_commits", "start_pipeline_runs", "advance_cursor"]
    sensor = watcher.task_dict["wait_for_commit"]
    assert sensor.deferrable and sensor.branch == "dev" and sensor.previous_sha.startswith("{{ var.value.get(")
    assert "TOK" not in bag.dags["gitops_ml_watch__a"].description


def test_run_conf_with_credentials_in_repo_url_is_refused_at_trigger(watch_file):
    """Airflow validates a run conf against the DAG's params when a run is triggered (UI, REST, CLI):
    a repo_url with credentials never reaches the Airflow DB."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.param import ParamsDict

    from gitops_ml import flow
    from gitops_ml.errors import InputError

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["gitops_ml_pipeline"]
    for url in ("https://oauth2:s3cret@git.example.com/m.git", "https://tok@git.example.com/m.git"):
        params = ParamsDict(dag.params)
        with pytest.raises(Exception, match=r"repo_url|does not match"):
            params.update({"repo_url": url})
            params.validate()
        with pytest.raises(InputError, match="carries credentials") as err:
            flow.refuse_conf_credentials(url)
        assert "s3cret" not in str(err.value) and "tok@" not in str(err.value)
    for url in ("https://git.example.com/m.git", "/srv/git/m.git", "git@github.com:a/b.git", None):
        params = ParamsDict(dag.params)
        params.update({"repo_url": url})
        params.validate()
        flow.refuse_conf_credentials(url)
