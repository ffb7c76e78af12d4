"""``[logging] logging_config_class = gitops_ml.airflow.log_config.LOGGING_CONFIG``.

Airflow's default logging (live logs from the worker while a task runs) plus, when
``[logging] remote_logging`` is on and ``[elasticsearch] host`` is set, the task logs of
finished tries read back from Elasticsearch by :class:`EcsElasticsearchLogIO`.
"""

from __future__ import annotations

from copy import deepcopy

from airflow.config_templates.airflow_local_settings import BASE_LOG_FOLDER, DEFAULT_LOGGING_CONFIG
from airflow.configuration import conf

LOGGING_CONFIG = deepcopy(DEFAULT_LOGGING_CONFIG)
# Airflow's plain file handler: with the ES host set the stock config swaps in the provider's
# handler, whose reader expects the provider's own document shape.
LOGGING_CONFIG["handlers"]["task"] = {
    "class": "airflow.utils.log.file_task_handler.FileTaskHandler",
    "formatter": "airflow",
    "base_log_folder": BASE_LOG_FOLDER,
    "filters": ["mask_secrets_core"],
}

REMOTE_TASK_LOG = None
if conf.getboolean("logging", "remote_logging", fallback=False) and conf.get("elasticsearch", "host", fallback=""):
    from gitops_ml.airflow.remote_log import EcsElasticsearchLogIO

    REMOTE_TASK_LOG = EcsElasticsearchLogIO.from_config()
