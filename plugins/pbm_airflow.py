"""Airflow-only glue for the pbmigrate DAGs: connections to URLs, shared params and task defaults.

Connections (names are stable; runbooks use them):
- `pbm_postgres`: the target PostgreSQL (host, port, login, password, schema = database).
- `pbm_redis`: Redis; `extra` may hold `{"db": 0}`, or `{"cluster": true, "startup_nodes":
  "host2:6379,host3:6379"}` for a Redis Cluster (every node listed survives one being down).
- `pbm_pocketbase`: API mode only; host = the PocketBase URL, login = superuser email, password.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from urllib.parse import quote

from airflow.sdk import BaseHook, Param


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


def hostname() -> str:
    """Airflow's hostname_callable: PBM_HOSTNAME names a worker as if it were its own host, so two
    Celery workers on one machine are told apart in the task instances (`make airflow EXECUTOR=celery`)."""
    return os.environ.get("PBM_HOSTNAME") or socket.getfqdn()


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


def _target_schema() -> Param:
    return Param("game", type="string", pattern=r"^[a-z_][a-z0-9_]{0,39}$",
                 description="Live PostgreSQL schema; the load goes to <target_schema>_staging first.")


def param_text(params: dict, name: str) -> str:
    """A string param as the task uses it: the form's null for an empty field is ''."""
    return params.get(name) or ""
