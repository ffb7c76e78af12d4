# One image for every gitops-ml service of docker-compose.yml (Airflow components, worker, server).
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
USER airflow
COPY --chown=airflow:root pyproject.toml uv.lock README.md /opt/gitops-ml/
COPY --chown=airflow:root include /opt/gitops-ml/include
RUN pip install --no-cache-dir uv==0.13.9 \
 && cd /opt/gitops-ml && uv export --frozen --no-dev --no-emit-project -o /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt && pip install --no-cache-dir --no-deps /opt/gitops-ml
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
