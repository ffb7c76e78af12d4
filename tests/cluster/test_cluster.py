"""Scenarios on the cluster of ``tests/cluster/harness.py`` (CeleryExecutor, two workers that share no
disk, PostgreSQL, Redis, S3, an MLflow server, Elasticsearch, two replicas of the model server).

The tests run in file order on one cluster; each starts from what the previous one left (the
commits of a repository only move forward)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime

import pytest

from gitops_ml.airflow.client import AirflowClient
from gitops_ml.runs import run_id_for
from tests.cluster.harness import BIN, watched_run
from tests.helpers import free_port, git

pytestmark = pytest.mark.cluster


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.fixture(scope="session")
def airflow(cluster):
    client = AirflowClient(cluster.url("api"), retry_seconds=120)
    client.wait_for_dag(timeout=180)
    return client


def finished_run(airflow, watch: str, commit_sha: str, timeout: float = 900) -> dict:
    """The watcher's run of ``commit_sha``, asserted successful."""
    run = watched_run(airflow, watch, commit_sha, timeout)
    states = {ti["task_id"]: (ti["state"], ti.get("hostname")) for ti in airflow.task_instances(run["dag_run_id"])}
    assert run["state"] == "success", f"{run['dag_run_id']}: {states}"
    return run


def test_a_two_repositories_pushed_at_once_run_concurrently_on_both_workers(cluster, airflow):
    """Both repositories were pushed before the watchers' first poll: both pipelines run at the same
    time, their task instances land on both workers, and each model is served by its servers."""
    runs = {name: finished_run(airflow, name, repo["commit_sha"]) for name, repo in cluster.repos.items()}
    tis = {name: airflow.task_instances(run["dag_run_id"]) for name, run in runs.items()}
    spans = {name: (when(run["start_date"]), when(run["end_date"])) for name, run in runs.items()}
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end, f"the two runs did not overlap: {spans}"
    hosts = {name: {ti["hostname"] for ti in items if ti["state"] == "success"} for name, items in tis.items()}
    assert set().union(*hosts.values()) == {"worker-a", "worker-b"}, hosts
    # At least one moment where one run's task ran on one worker while the other run's ran on the other.
    overlapping = [
        (x["task_id"], x["hostname"], y["task_id"], y["hostname"])
        for x in tis["digits"]
        for y in tis["digits-b"]
        if x["state"] == y["state"] == "success"
        and x["hostname"] != y["hostname"]
        and when(x["start_date"]) < when(y["end_date"])
        and when(y["start_date"]) < when(x["end_date"])
    ]
    assert overlapping, {
        name: [(t["task_id"], t["hostname"], t["start_date"], t["end_date"]) for t in items]
        for name, items in tis.items()
    }
    print(f"scenario a: runs {spans}; hosts {hosts}; concurrent pairs on different workers: {len(overlapping)}")
    for server in ("serve-1", "serve-2"):
        served = cluster.serving(server)
        assert served and served["commit_sha"] == cluster.repos["digits"]["commit_sha"], (server, served)
    served = cluster.serving("serve-b")
    assert served and served["commit_sha"] == cluster.repos["digits-b"]["commit_sha"], served
    # The model artifacts went through the MLflow server into S3, not onto a worker's disk.
    keys = [o["Key"] for o in cluster.s3_client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert keys, "no artifact in the MLflow bucket"


def doctor(cluster, **changes: str) -> tuple[int, dict[str, str], str]:
    """``gitops-ml doctor`` with the scheduler's configuration (plus ``changes``): status, line per check."""
    env = {**os.environ, **cluster.procs["scheduler"].env, **changes}
    done = subprocess.run(
        [str(BIN / "gitops-ml"), "doctor"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    lines = {}
    for line in done.stdout.splitlines():  # library log lines may be interleaved: only the checks
        status, _, rest = line.partition(" ")
        if status not in ("OK", "FAIL", "SKIP"):
            continue
        name, _, detail = rest.strip().partition(": ")
        lines[name] = f"{status} {detail}"
    return done.returncode, lines, done.stdout


def test_doctor_passes_every_check_on_the_working_cluster(cluster, airflow):
    status, lines, output = doctor(cluster)
    print(output)
    expected = {
        "watch file",
        "airflow api",
        "metadata db",
        "broker",
        "mlflow",
        "artifact store",
        "elasticsearch",
        *(f"serving {cluster.url(s)}" for s in ("serve-1", "serve-2", "serve-b")),
        *(f"{kind} {name}" for kind in ("git", "dvc remote") for name in ("digits", "digits-b")),
    }
    assert set(lines) == expected, output
    assert status == 0 and all(v.startswith("OK ") for v in lines.values()), output
    for secret in cluster.secret.values():
        assert secret not in output


def test_doctor_names_what_to_fix_in_a_broken_configuration(cluster, airflow, tmp_path):
    """Wrong database password, unreachable broker host, a DVC remote whose bucket is missing, wrong Git token."""
    repo = cluster.create_model_repository("no-bucket", 2)
    dvc = [str(BIN / "dvc"), "remote", "modify", "s3r", "url", "s3://missing-bucket/no-bucket"]
    subprocess.run(dvc, cwd=repo["path"], check=True, capture_output=True)
    git(repo["path"], "commit", "-qam", "DVC remote in a bucket that does not exist")
    git(repo["path"], "push", "-q", "origin", "main")
    watches = [
        *cluster.watches,
        {"name": "no-bucket", "repo_url": cluster.git_url("no-bucket"), "retrain_schedule": None},
    ]
    wrong_db = cluster.airflow_db_url.replace(cluster.secret["airflow"], "wrong-password")
    unreachable = cluster.broker_url.replace(str(cluster.ports["redis"]), str(free_port()))
    status, lines, output = doctor(
        cluster,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=wrong_db,
        AIRFLOW__CELERY__BROKER_URL=unreachable,
        GITOPS_ML_WATCH_CONFIG=str(cluster.write_watch_file(tmp_path, watches)),
    )
    print(output)
    assert status == 1, output
    assert lines["metadata db"].startswith("FAIL") and "password authentication failed" in lines["metadata db"]
    assert "set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" in lines["metadata db"]
    assert lines["broker"].startswith("FAIL") and "set AIRFLOW__CELERY__BROKER_URL" in lines["broker"]
    assert lines["dvc remote no-bucket"].startswith("FAIL") and "missing-bucket" in lines["dvc remote no-bucket"]
    assert "no-bucket" in lines["dvc remote no-bucket"].split("fix:")[1]
    assert lines["dvc remote digits"].startswith("OK") and lines["mlflow"].startswith("OK")
    assert "wrong-password" not in output and cluster.secret["redis"] not in output

    status, lines, output = doctor(cluster, GIT_TOKEN="wrong-token")
    assert status == 1 and lines["git digits"].startswith("FAIL") and "watch 'digits'" in lines["git digits"], output
    assert "wrong-token" not in output


def registry_settings(cluster, model_name: str = "digits"):
    from gitops_ml.config import Settings

    return Settings(
        home=cluster.folder("developer") / "home", tracking_uri=cluster.url("mlflow"), model_name=model_name
    )


def versions_of(cluster, commit_sha: str, model_name: str = "digits") -> list:
    from gitops_ml import registry

    settings = registry_settings(cluster, model_name)
    found = registry.client(settings).search_model_versions(f"name='{model_name}'")
    return [v for v in found if registry.version_tags(v).get("commit_sha") == commit_sha]


def champion_commit(cluster, model_name: str = "digits") -> str | None:
    from gitops_ml import registry

    champion = registry.get_alias(registry_settings(cluster, model_name))
    return registry.version_tags(champion).get("commit_sha") if champion is not None else None


def wait_running(airflow, watch: str, commit_sha: str, task_id: str, timeout: float = 900) -> dict:
    """The task instance ``task_id`` of the commit's run once it is running (its hostname known)."""
    run_id = run_id_for(commit_sha, watch=watch)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if airflow.get_run(run_id) is not None:
            for ti in airflow.task_instances(run_id):
                if ti["task_id"] == task_id and ti["state"] == "running" and ti.get("hostname"):
                    return ti
        time.sleep(0.5)
    raise AssertionError(f"{task_id} of {run_id} never ran within {timeout:.0f} s")


def both_replicas_serve(cluster, commit_sha: str) -> list[dict]:
    served = [cluster.serving(name) for name in ("serve-1", "serve-2")]
    assert all(s and s["commit_sha"] == commit_sha for s in served), served
    return served


def test_b_two_quick_commits_never_deploy_at_once_and_the_newest_serves_on_both_replicas(cluster, airflow):
    repo = cluster.repos["digits"]
    older = cluster.commit_param(repo, "train.epochs", 3)
    newer = cluster.commit_param(repo, "train.epochs", 4)  # pushed right after: one burst
    runs = [finished_run(airflow, "digits", sha) for sha in (older, newer)]
    deploys = []
    for run in runs:
        ti = next(t for t in airflow.task_instances(run["dag_run_id"]) if t["task_id"] == "deploy")
        deploys.append((when(ti["start_date"]), when(ti["end_date"]), ti["state"]))
    (s1, e1, _), (s2, e2, _) = deploys
    assert e1 <= s2 or e2 <= s1, f"the two deploys overlapped: {deploys}"
    served = both_replicas_serve(cluster, newer)
    assert champion_commit(cluster) == newer
    print(f"scenario b: deploys {deploys}; both replicas serve {newer} (version {served[0]['model_version']})")


def test_f_a_replica_down_fails_the_deploy_and_both_replicas_keep_the_previous_model(cluster, airflow):
    repo = cluster.repos["digits"]
    previous = both_replicas_serve(cluster, champion_commit(cluster))[0]
    cluster.kill("serve-2")
    try:
        commit_sha = cluster.commit_param(repo, "train.epochs", 5)
        run = watched_run(airflow, "digits", commit_sha, timeout=900)
        states = {t["task_id"]: t["state"] for t in airflow.task_instances(run["dag_run_id"])}
        assert run["state"] == "failed" and states["deploy"] == "failed", states
        assert cluster.serving("serve-1")["model_version"] == previous["model_version"]
        assert champion_commit(cluster) == previous["commit_sha"]
    finally:
        cluster.start_server("serve-2", "digits")
    served = both_replicas_serve(cluster, previous["commit_sha"])
    assert {s["model_version"] for s in served} == {previous["model_version"]}
    print(
        f"scenario f: deploy of {commit_sha} failed with serve-2 down ({states}); both replicas on version "
        f"{previous['model_version']} of {previous['commit_sha']}"
    )


def es_documents(cluster, run_id: str, task_id: str, try_number: int) -> list[dict]:
    from gitops_ml import logs

    client = logs.es_client(cluster.url("es"))
    try:
        client.indices.refresh(index=f"{logs.LOGS_INDEX}*")
        hits = client.search(
            index=f"{logs.LOGS_INDEX}*",
            size=10_000,
            sort=[{"offset": "asc"}],
            query={"term": {"log_id": f"gitops_ml_pipeline-{task_id}-{run_id}--1-{try_number}"}},
        )
        return [h["_source"] for h in hits["hits"]["hits"]]
    finally:
        client.close()


def log_file_lines(cluster, worker: str, run_id: str, task_id: str, try_number: int) -> list[str]:
    path = (
        cluster.folder(worker)
        / "airflow"
        / "logs"
        / "dag_id=gitops_ml_pipeline"
        / f"run_id={run_id}"
        / f"task_id={task_id}"
        / f"attempt={try_number}.log"
    )
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_c_kill_9_of_the_worker_running_train_retries_it_on_the_other_worker(cluster, airflow):
    repo = cluster.repos["digits"]
    commit_sha = cluster.commit_param(repo, "train.epochs", 6)
    running = wait_running(airflow, "digits", commit_sha, "train")
    victim = running["hostname"]
    survivor = next(w for w in ("worker-a", "worker-b") if w != victim)
    killed_at = time.monotonic()
    cluster.kill(victim, signal.SIGKILL)  # the whole worker: Celery, the task supervisor and the task
    try:
        run = finished_run(airflow, "digits", commit_sha)
        recovered = time.monotonic() - killed_at
        tis = {t["task_id"]: t for t in airflow.task_instances(run["dag_run_id"])}
        train = tis["train"]
        assert train["try_number"] == 2 and train["hostname"] == survivor, train
        assert len(versions_of(cluster, commit_sha)) == 1
        both_replicas_serve(cluster, commit_sha)
        # Every line of every finished try is in Elasticsearch, in order (the task log files on the workers'
        # own disks against the documents).
        for task_id, ti in tis.items():
            if ti["state"] != "success":
                continue
            written = log_file_lines(cluster, ti["hostname"], run["dag_run_id"], task_id, ti["try_number"])
            docs = wait_for(
                lambda task_id=task_id, ti=ti: es_documents(cluster, run["dag_run_id"], task_id, ti["try_number"]),
                len(written),
            )
            assert [d["offset"] for d in docs] == list(range(1, len(written) + 1)), (task_id, len(docs), len(written))
        print(
            f"scenario c: killed {victim} during train; retried on {survivor}, run succeeded "
            f"{recovered:.0f} s after the kill; one model version"
        )
    finally:
        cluster.start_worker(victim, cluster.watches)


def wait_for(fetch, count: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = fetch()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_d_scheduler_restarted_with_runs_in_flight_no_duplicate_run_no_missed_sha(cluster, airflow):
    repo = cluster.repos["digits"]
    first = cluster.commit_param(repo, "train.epochs", 7)
    wait_running(airflow, "digits", first, "train")
    cluster.kill("scheduler", signal.SIGKILL)
    second = cluster.commit_param(repo, "train.epochs", 8)  # pushed while no scheduler runs
    time.sleep(5)
    control = cluster.folder("control")
    cluster.spawn(
        "scheduler", [str(BIN / "airflow"), "scheduler"], cluster.airflow_env(control, cluster.watches), control
    )
    runs = [finished_run(airflow, "digits", sha) for sha in (first, second)]
    listed = airflow._check(
        airflow._http.get("/api/v2/dags/gitops_ml_pipeline/dagRuns", params={"limit": 100}), "list runs"
    )["dag_runs"]
    ids = [r["dag_run_id"] for r in listed]
    assert len(ids) == len(set(ids))
    for sha in (first, second):
        assert sum(sha in run_id for run_id in ids) == 1, ids
        assert len(versions_of(cluster, sha)) == 1
    both_replicas_serve(cluster, second)
    print(
        f"scenario d: scheduler killed during {runs[0]['dag_run_id']}, {second} pushed while it was down; "
        f"one run each, {len(ids)} pipeline runs in all"
    )


def test_e_mlflow_restarted_during_register_is_retried_without_a_half_registered_version(cluster, airflow):
    repo = cluster.repos["digits"]
    commit_sha = cluster.commit_param(repo, "train.epochs", 9)
    wait_running(airflow, "digits", commit_sha, "register")
    cluster.kill("mlflow", signal.SIGKILL)
    time.sleep(10)
    cluster.start_mlflow()
    run = finished_run(airflow, "digits", commit_sha)
    register = next(t for t in airflow.task_instances(run["dag_run_id"]) if t["task_id"] == "register")
    versions = versions_of(cluster, commit_sha)
    assert len(versions) == 1 and versions[0].status == "READY", versions
    both_replicas_serve(cluster, commit_sha)
    print(
        f"scenario e: MLflow killed during register (tries {register['try_number']}); one READY version "
        f"{versions[0].version}"
    )
