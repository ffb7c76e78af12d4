"""The settings model read from a real environment: defaults under the home, aliases, empty values,
wrong types named by their variable, keyword arguments winning over the environment."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

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


SECRETS = {
    "GITOPS_ML_SERVING_TOKEN": "serving-t0ken-1",
    "GITOPS_ML_WEBHOOK_SECRET": "webhook-s3cret-2",
    "ES_API_KEY": "es-api-k3y-3",
    "ES_PASSWORD": "es-passw0rd-4",
    "AIRFLOW_API_PASSWORD": "airflow-passw0rd-5",
}
URLS_WITH_CREDENTIALS = {
    "GITOPS_ML_REPO_URL": ("https://ci-bot:repo-t0ken-6@git.example.org/models.git", "repo-t0ken-6"),
    "MLFLOW_TRACKING_URI": ("postgresql://mlflow:db-passw0rd-7@db:5432/mlflow", "db-passw0rd-7"),
    "ES_URL": ("https://elastic:es-url-passw0rd-8@es:9200", "es-url-passw0rd-8"),
    "AIRFLOW_API_URL": ("http://admin:api-url-passw0rd-9@airflow:8080", "api-url-passw0rd-9"),
    "GITOPS_ML_SERVING_URL": ("http://a:srv-passw0rd-10@s1:8765,http://s2:8765", "srv-passw0rd-10"),
}


def test_no_secret_shows_when_the_settings_are_printed_or_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GITOPS_ML_HOME", str(tmp_path))
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    for name, (url, _) in URLS_WITH_CREDENTIALS.items():
        monkeypatch.setenv(name, url)
    settings = Settings.from_env().with_overrides(serving_token="override-t0ken-11")
    with caplog.at_level(logging.INFO):
        logging.getLogger("gitops_ml.test").info("settings: %s / %r", settings, settings)
    shown = "\n".join([repr(settings), str(settings), f"{settings}", caplog.text])
    secrets = [*SECRETS.values(), *(secret for _, secret in URLS_WITH_CREDENTIALS.values()), "override-t0ken-11"]
    assert [s for s in secrets if s in shown] == []
    assert "https://***@git.example.org/models.git" in shown  # masked, not dropped: still says which repository

    # The code still gets the real values.
    assert settings.serving_token.get_secret_value() == "override-t0ken-11"
    assert settings.es_password.get_secret_value() == SECRETS["ES_PASSWORD"]
    assert settings.repo_url == URLS_WITH_CREDENTIALS["GITOPS_ML_REPO_URL"][0]


def test_every_secret_field_is_a_secret_type():
    """A new password, token, key or secret setting is declared ``SecretStr`` (not a plain ``str`` that prints)."""
    named_secret = [f for f in Settings.model_fields if f.endswith(("password", "token", "secret", "api_key"))]
    assert sorted(named_secret) == sorted(
        ["serving_token", "webhook_secret", "es_api_key", "es_password", "airflow_api_password"]
    )
    assert [f for f in named_secret if Settings.model_fields[f].annotation is not SecretStr] == []
