"""Airflow-only glue for the pbmigrate DAGs: connections to URLs, shared params and task defaults.

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
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote

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


def _conn(conn_id: str):
    return BaseHook.get_connection(conn_id)


def postgres_url(conn_id: str = "pbm_postgres") -> str:
    """A libpq URL for psycopg, from the connection (via the Postgres provider's hook)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    c = PostgresHook.get_connection(conn_id)
    auth = quote(c.login or "", safe="") + (":" + quote(c.password, safe="") if c.password else "")
    return f"postgresql://{auth}@{c.host or '127.0.0.1'}:{c.port or 5432}/{c.schema or 'postgres'}"


def redis_url(conn_id: str = "pbm_redis") -> str:
    """A redis:// URL (redis+cluster:// when the extra says cluster); the db lives in the extra."""
    c = _conn(conn_id)
    extra = c.extra_dejson
    cluster = bool(extra.get("cluster"))
    tls = "s" if extra.get("ssl") else ""
    scheme = f"redis{tls}+cluster" if cluster else f"redis{tls}"
    auth = (quote(c.login or "", safe="") + ":" + quote(c.password, safe="") + "@") if c.password else ""
    nodes = [f"{c.host or '127.0.0.1'}:{c.port or 6379}"]
    if cluster:
        nodes += [n.strip() for n in str(extra.get("startup_nodes", "")).split(",") if n.strip()]
        return f"{scheme}://{auth}{','.join(nodes)}"
    db = extra.get("db", c.schema if str(c.schema or "").isdigit() else 0)  # a URI's /db lands in schema
    return f"{scheme}://{auth}{nodes[0]}/{int(db)}"


def pocketbase_api(conn_id: str = "pbm_pocketbase") -> dict | None:
    """url/email/password for API mode, or None when the connection is not defined."""
    try:
        c = _conn(conn_id)
    except Exception:  # the connection is optional: SQLite mode does not need it
        return None
    host = c.host or ""
    url = host if "://" in host else f"{c.conn_type if c.conn_type in ('http', 'https') else 'http'}://{host}"
    if c.port and f":{c.port}" not in url.split("://", 1)[1]:
        url = f"{url}:{c.port}"
    return {"url": url.rstrip("/"), "email": c.login, "password": c.password}


def files_store(conn_id: str = "pbm_files") -> dict | None:
    """`{"url", "options"}` for pbmigrate's file store, or None when the connection is not defined.
    Passed straight into the engine, never returned to XCom (the options may hold S3 secrets)."""
    try:
        c = _conn(conn_id)
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


def source_params() -> dict[str, Param]:
    """The params shared by the migration and re-sync DAGs."""
    return {
        "source_path": Param(
            "", type="string",
            description="A PocketBase data.db or pb_data folder. Empty: API mode through the "
                        "pbm_pocketbase connection (password hashes cannot be exported that way).",
        ),
        "target_schema": Param(
            "game", type="string", pattern=r"^[a-z_][a-z0-9_]{0,39}$",
            description="Live PostgreSQL schema; the load goes to <target_schema>_staging first.",
        ),
        "mapping": Param(
            "game.yaml", type="string",
            description="Mapping file (a name under include/mappings or a path). Empty: copy every "
                        "collection under its own name.",
        ),
        "collections": Param(
            [], type="array", items={"type": "string"},
            description="Only these collections (empty: all).",
        ),
    }
