"""Airflow-only glue for the pbmigrate DAGs: connections to URLs (through the providers' hooks),
shared params and task defaults.

Connections (names are stable; runbooks use them):
- `pbm_postgres`: the target PostgreSQL (host, port, login, password, schema = database).
- `pbm_redis`: Redis; `extra` may hold `{"db": 0}`, or `{"cluster": true, "startup_nodes":
  "host2:6379,host3:6379"}` for a Redis Cluster (every node listed survives one being down).
- `pbm_pocketbase`: API mode only; host = the PocketBase URL, login = superuser email, password.
- `pbm_files`: the file store for PocketBase's uploads; host = a URL (`file:///srv/files/game`, or
  `s3://bucket/prefix`), login/password = S3 key and secret, `extra` = fsspec/s3fs options
  (`{"client_kwargs": {"endpoint_url": "http://minio:9000"}}`). Undefined: PBM_FILES_URL, else
  a directory under PBM_WORK_DIR (`files/<target_schema>`).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from airflow.sdk import BaseHook, Param
from airflow.sdk.exceptions import AirflowFailException

from pbmigrate.errors import Permanent

F = TypeVar("F", bound=Callable[..., Any])


def fail_fast(fn: F) -> F:
    """Under `@task`: an error a retry cannot fix (pbmigrate's `Permanent`: a bad mapping or param,
    a missing privilege, a source that is not PocketBase, a refused gate) fails the task at once,
    in one line, instead of being retried with backoff for minutes. Anything else is retried."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Permanent as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper  # type: ignore[return-value]


def _host(host: str) -> str:
    """A host for a URL's authority: an IPv6 address goes in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _auth(login: str | None, password: str | None) -> str:
    if not login and not password:
        return ""
    return quote(login or "", safe="") + (":" + quote(password, safe="") if password else "") + "@"


def _query(params: dict[str, Any]) -> str:
    items = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items() if v is not None]
    return ("?" + urlencode(items, quote_via=quote)) if items else ""


def postgres_url(conn_id: str = "pbm_postgres") -> str:
    """A libpq URL for psycopg holding what PostgresHook itself would connect with: host (an IPv6
    one in brackets), port, login, password, database and every extra it passes to the driver
    (`sslmode`, `sslrootcert`, `options`, `keepalives`...), the hook's own keys left out; an IAM
    extra gets its token through the hook."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    hook = PostgresHook(postgres_conn_id=conn_id)
    c = hook.connection
    login, password, port = c.login, c.password, c.port
    if c.extra_dejson.get("iam", False):
        login, password, port = hook.get_iam_token(c)
    extras = {k: v for k, v in c.extra_dejson.items() if k not in hook.ignored_extra_options}
    return (f"postgresql://{_auth(login, password)}{_host(c.host or '127.0.0.1')}:{port or 5432}/"
            f"{quote(c.schema or 'postgres', safe='')}{_query(extras)}")


REDIS_TLS_EXTRAS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_keyfile", "ssl_certfile", "ssl_check_hostname")


def redis_url(conn_id: str = "pbm_redis") -> str:
    """A redis:// URL (rediss:// with TLS, redis+cluster:// for a cluster) from the connection as
    RedisHook reads it: login as username (alone too), a password unless 'none'/'false'/'', `db`,
    `cluster` and `startup_nodes` from the extra, and its TLS extras as URL options."""
    from airflow.providers.redis.hooks.redis import RedisHook

    c = RedisHook.get_connection(conn_id)
    extra = c.extra_dejson
    password = None if str(c.password).lower() in ("none", "false", "") else c.password
    cluster = bool(extra.get("cluster"))
    tls = "s" if extra.get("ssl") in (True, "true", "True", "1", 1) else ""
    scheme = f"redis{tls}+cluster" if cluster else f"redis{tls}"
    options = _query({k: extra[k] for k in REDIS_TLS_EXTRAS if k in extra})
    nodes = [f"{_host(c.host or '127.0.0.1')}:{c.port or 6379}"]
    if cluster:
        startup = extra.get("startup_nodes") or ""
        startup = startup.split(",") if isinstance(startup, str) else list(startup)
        nodes += [n.strip() for n in startup if n and n.strip()]
        return f"{scheme}://{_auth(c.login, password)}{','.join(nodes)}{options}"
    db = extra.get("db", c.schema if str(c.schema or "").isdigit() else 0)  # a URI's /db lands in schema
    return f"{scheme}://{_auth(c.login, password)}{nodes[0]}/{int(db)}{options}"


class PocketBaseHook(BaseHook):
    """The `pbm_pocketbase` connection (API mode): host = the PocketBase URL (or a host name, with
    the connection type http/https and the port), login = superuser email, password."""

    conn_name_attr = "pocketbase_conn_id"
    default_conn_name = "pbm_pocketbase"
    conn_type = "http"
    hook_name = "PocketBase"

    def __init__(self, pocketbase_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.pocketbase_conn_id = pocketbase_conn_id

    def get_conn(self) -> dict[str, Any]:
        """url/email/password, the arguments of `pbmigrate.source.api.ApiSource`."""
        c = self.get_connection(self.pocketbase_conn_id)
        host = c.host or ""
        scheme = c.conn_type if c.conn_type in ("http", "https") else "http"
        url = host if "://" in host else f"{scheme}://{_host(host)}"
        if c.port and f":{c.port}" not in url.split("://", 1)[1]:
            url = f"{url}:{c.port}"
        return {"url": url.rstrip("/"), "email": c.login, "password": c.password}


def pocketbase_api(conn_id: str = "pbm_pocketbase") -> dict | None:
    """url/email/password for API mode, or None when the connection is not defined."""
    try:
        return PocketBaseHook(conn_id).get_conn()
    except Exception:  # the connection is optional: SQLite mode does not need it
        return None


def hostname() -> str:
    """Airflow's hostname_callable: PBM_HOSTNAME names a worker as if it were its own host, so two
    Celery workers on one machine are told apart in the task instances (`make airflow EXECUTOR=celery`)."""
    return os.environ.get("PBM_HOSTNAME") or socket.getfqdn()


def files_store(conn_id: str = "pbm_files") -> dict | None:
    """`{"url", "options"}` for pbmigrate's file store, or None when the connection is not defined.
    Passed straight into the engine, never returned to XCom (the options may hold S3 secrets)."""
    try:
        c = BaseHook.get_connection(conn_id)
    except Exception:  # optional: the engine then uses PBM_FILES_URL or the work dir
        return None
    host = c.host or ""
    if "://" in host:  # the JSON form: {"conn_type": "fs", "host": "s3://bucket/prefix", ...}
        url = host
    elif c.conn_type in ("aws", "s3"):  # s3://bucket/prefix as a URI: host = bucket, schema = prefix
        url = f"s3://{host}" + (f"/{c.schema}" if c.schema else "")
    else:  # file:///srv/files as a URI lands in schema
        url = host or "/" + (c.schema or "").lstrip("/")
    options = dict(c.extra_dejson)
    if c.login:
        options.setdefault("key", c.login)
    if c.password:
        options.setdefault("secret", c.password)
    return {"url": url, "options": options}


def default_args() -> dict:
    """Retries with exponential backoff; PBM_RETRY_DELAY_SECONDS shortens the delay in tests."""
    delay = float(os.environ.get("PBM_RETRY_DELAY_SECONDS", "15"))
    return {
        "owner": "data-engineering",
        "retries": int(os.environ.get("PBM_RETRIES", "3")),
        "retry_delay": timedelta(seconds=delay),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
    }


def source_params(*, recorded: bool = False) -> dict[str, Param]:
    """The params shared by the migration and re-sync DAGs.

    Every param that may be empty also accepts null: the trigger form sends null for an empty
    field, and a string-only type would keep the Trigger button disabled. Tasks read null as empty
    (`param_text`). With `recorded` (the re-sync), source_path, mapping and collections default to
    null, meaning "as the migration that built the target ran": a scheduled run has no conf.
    """
    if recorded:
        same = " Empty: as recorded by the migration that built the target (pbm_meta.runs)."
        return {
            "source_path": Param(None, type=["null", "string"],
                                 description="A PocketBase data.db or pb_data folder." + same),
            "target_schema": _target_schema(),
            "mapping": Param(None, type=["null", "string"],
                             description="Mapping file (a name under include/mappings or a path)." + same),
            "collections": Param(None, type=["null", "array"], items={"type": "string"},
                                 description="Only these collections." + same),
        }
    return {
        "source_path": Param(
            "", type=["null", "string"],
            description="A PocketBase data.db or pb_data folder. Empty: API mode through the "
                        "pbm_pocketbase connection (password hashes cannot be exported that way).",
        ),
        "target_schema": _target_schema(),
        "mapping": Param(
            "game.yaml", type=["null", "string"],
            description="Mapping file (a name under include/mappings or a path). Empty: copy every "
                        "collection under its own name.",
        ),
        "collections": Param(
            [], type=["null", "array"], items={"type": "string"},
            description="Only these collections (empty: all).",
        ),
    }


def loadtest_params() -> dict[str, Param]:
    """The optional load test before promotion (pbmigrate.cutover.loadgate), shared by the migration and
    cut-over DAGs."""
    return {
        "loadtest": Param(False, type="boolean",
                          description="Before promotion, load-test the staging schema: the game service on it "
                                      "(private Redis) against PocketBase on a copy of the source snapshot, "
                                      "figures in pbm_meta.loadtests. Off by default; takes a few minutes."),
        "loadtest_gate": Param(False, type="boolean",
                               description="Refuse promotion when the load test misses the two limits below "
                                           "(off: the figures are recorded only)."),
        "loadtest_min_improvement": Param(1.5, type="number", minimum=0,
                                          description="Gate: the new stack's capacity (p95 <= 100 ms, < 0.1 % "
                                                      "errors) divided by PocketBase's, same run, at least this. "
                                                      "0: no limit (needed in API mode: no PocketBase reference)."),
        "loadtest_max_error_rate": Param(0.001, type="number", minimum=0, maximum=1,
                                         description="Gate: the new stack's error rate over the players run, "
                                                     "at most this (0.001 = 0.1 %)."),
        "loadtest_users": Param(300, type="integer", minimum=1,
                                description="Simulated players of the load test's players run (1-3 s think time)."),
        "loadtest_duration": Param(15, type="integer", minimum=1,
                                   description="Seconds per load-test step (the players run and each capacity step)."),
        "loadtest_mix": Param(None, type=["null", "string"],
                              description="Journeys and weights, e.g. profile_me=3,leaderboard=3. Empty: reads only "
                                          "(match results written into staging would be promoted with it)."),
    }


def _target_schema() -> Param:
    return Param("game", type="string", pattern=r"^[a-z_][a-z0-9_]{0,39}$",
                 description="Live PostgreSQL schema; the load goes to <target_schema>_staging first.")


def param_text(params: dict, name: str) -> str:
    """A string param as the task uses it: the form's null for an empty field is ''."""
    return params.get(name) or ""
