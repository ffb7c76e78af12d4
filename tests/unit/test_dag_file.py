"""DAG files stay cheap to parse: no TensorFlow, MLflow or DVC at module top level, no import errors."""

import json
import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ["tensorflow", "keras", "mlflow", "dvc", "git", "sklearn"]


def test_dag_file_imports_nothing_heavy():
    code = (
        "import json, sys, runpy\n"
        f"runpy.run_path({str(ROOT / 'dags' / 'gitops_ml_pipeline.py')!r})\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_dagbag_has_no_import_errors_and_expected_wiring():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["gitops_ml_pipeline"]
    order = ["resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy", "record"]
    assert set(order) == set(dag.task_dict)
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.task_dict[upstream].downstream_task_ids
    assert dag.max_active_runs == 1 and dag.schedule is None
