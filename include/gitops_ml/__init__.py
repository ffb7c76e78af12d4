"""gitops-ml: GitOps for machine-learning systems on Apache Airflow.

Every commit of a model repository becomes one pipeline run keyed by its
``commit_sha``: check out, ``dvc pull``, train, evaluate, register in MLflow,
deploy.  Each sub-module owns one dependency (see ``docs`` in the README).
"""

__version__ = "0.1.0"
