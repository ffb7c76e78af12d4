"""Airflow adapters: translate task context, XCom and failures; the work is in ``gitops_ml.pipeline``.

Importing this package is cheap (no TensorFlow, MLflow or DVC), so DAG files may
reference it at parse time.
"""
