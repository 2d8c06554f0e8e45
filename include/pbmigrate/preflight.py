"""Pre-flight checks: every connection answers and has the privileges the run needs.

Each failure says which service, which address (never the password) and what is missing.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import redis

from pbmigrate.errors import BadTarget, TargetError


def safe_url(url: str) -> str:
    """host:port/db of a URL, without user or password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host  # IPv6
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_postgres(url: str) -> dict:
    """Connect, and make sure the role may create schemas in the target database."""
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            user, db, can_create, version = conn.execute(
                "SELECT current_user, current_database(), "
                "has_database_privilege(current_database(), 'CREATE'), current_setting('server_version_num')::int"
            ).fetchone()
    except psycopg.Error as exc:
        raise TargetError(f"PostgreSQL at {safe_url(url)}: cannot connect: {str(exc).strip()}") from exc
    if not can_create:
        raise BadTarget(
            f"PostgreSQL at {safe_url(url)}: role {user!r} lacks CREATE on database {db!r} "
            "(needed for the staging schema and pbm_meta); GRANT CREATE ON DATABASE to it"
        )
    if version < 120000:
        raise BadTarget(f"PostgreSQL at {safe_url(url)}: version {version} is too old; 12 or newer is needed")
    return {"user": user, "database": db, "server_version": version}


def check_redis(client: redis.Redis | redis.RedisCluster, where: str) -> dict:
    """PING, then write and delete a probe key: the warm-up and the flag need write access."""
    try:
        client.ping()
        client.set("pbm:probe", "1", ex=10)
        client.delete("pbm:probe")
    except redis.exceptions.ResponseError as exc:
        raise BadTarget(f"Redis at {where}: no write permission ({exc})") from exc
    except redis.exceptions.RedisError as exc:
        raise TargetError(f"Redis at {where}: cannot connect: {exc}") from exc
    return {"redis": where}
