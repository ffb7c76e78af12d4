"""The settings model read from a real environment: defaults under the home, aliases, empty values,
wrong types named by their variable, keyword arguments winning over the environment."""

from __future__ import annotations

import pytest

from gitops_ml.config import Settings, SettingsError


def test_defaults_follow_the_home_and_empty_variables_count_as_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("GITOPS_ML_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.setenv("GITOPS_ML_BRANCH", "")
    settings = Settings.from_env()
    assert settings.home == (tmp_path / "h").resolve()
    assert settings.tracking_uri == f"sqlite:///{settings.home / 'mlflow' / 'mlflow.db'}"
    assert settings.artifact_root == str(settings.home / "mlflow" / "artifacts")
    assert settings.branch == "main" and settings.watch_config_path == settings.home / "watch.yaml"


def test_variables_outside_the_prefix_and_trailing_slashes(tmp_path, monkeypatch):
    monkeypatch.setenv("GITOPS_ML_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("GITOPS_ML_EXPERIMENT", "vision")
    monkeypatch.setenv("ES_URL", "https://es:9200")
    monkeypatch.setenv("AIRFLOW_API_URL", "http://airflow:8080/")
    monkeypatch.setenv("GITOPS_ML_PUSH_NOTES", "yes")
    monkeypatch.setenv("GITOPS_ML_SERVING_TOKEN", "s3cret-token")
    settings = Settings.from_env()
    assert (settings.tracking_uri, settings.experiment_name, settings.es_url) == (
        "http://mlflow:5000",
        "vision",
        "https://es:9200",
    )
    assert settings.airflow_api_url == "http://airflow:8080" and settings.push_notes is True
    assert "s3cret-token" not in repr(settings)
    assert Settings(home=tmp_path, experiment_name="other").experiment_name == "other"  # arguments win


def test_a_wrong_type_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("GITOPS_ML_HOME", str(tmp_path))
    monkeypatch.setenv("GITOPS_ML_KEEP_WORKTREES", "five")
    monkeypatch.setenv("GITOPS_ML_PUSH_NOTES", "maybe")
    with pytest.raises(SettingsError) as info:
        Settings.from_env()
    message = str(info.value)
    assert "GITOPS_ML_KEEP_WORKTREES must be a valid integer" in message and "got 'five'" in message
    assert "GITOPS_ML_PUSH_NOTES must be a valid boolean" in message and "got 'maybe'" in message


def test_overrides_skip_empty_values_and_keep_the_rest(tmp_path):
    settings = Settings(home=tmp_path, repo_url="/srv/models", branch="dev")
    changed = settings.with_overrides(repo_url="/srv/other", branch=None, model_name="")
    assert (changed.repo_url, changed.branch, changed.model_name) == ("/srv/other", "dev", "gitops-ml-classifier")
    assert settings.repo_url == "/srv/models"
