"""One way to get a Redis client from a URL, for a single Redis and for a Redis Cluster alike.

The DAG, the game-server cache layer and the tests all call `connect()`, so a URL that works in
one place works everywhere. URL forms:

- ``redis://[user:password@]host:port/db`` and ``rediss://...``: a single Redis (``unix://`` too).
- ``redis+cluster://[user:password@]host1:port1,host2:port2,...`` (``rediss+cluster://`` for TLS):
  a Redis Cluster through redis-py's ``RedisCluster``; the hosts are startup nodes (one is enough,
  more survive a node being down at start). ``redis://host:port?cluster=true`` or
  ``connect(url, cluster=True)`` mean the same with one startup node.

Both clients get bounded retries with short, jittered backoff, so a Redis that is down fails a
task within seconds instead of hanging it (redis-py's default is 10 retries).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from pbmigrate.errors import BadTarget, TargetError

RedisClient = redis.Redis | RedisCluster  # what connect() returns; both speak the same commands

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
_TRUE = {"1", "true", "yes", "on"}


def is_cluster(client: Any) -> bool:
    """True for a cluster client (the code paths differ only where slots matter)."""
    return isinstance(client, RedisCluster)


def describe(client: RedisClient) -> str:
    """``Redis host:port/db`` or ``Redis Cluster host:port,...`` for messages (never a password)."""
    if is_cluster(client):
        return "Redis Cluster " + ",".join(f"{n.host}:{n.port}" for n in client.get_primaries())
    kw = client.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    return f"Redis {where}/{kw.get('db', 0)}"


def redact(url: str) -> str:
    """The URL with its password replaced, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def _retry(retries: int) -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries)


def _split_hosts(hostlist: str) -> list[tuple[str, int]]:
    """``h1:p1,[::1]:p2,h3`` -> [(host, port)], default port 6379."""
    nodes = []
    for item in filter(None, (part.strip() for part in hostlist.split(","))):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":") or "6379"
        else:
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "6379")
        try:
            nodes.append((host, int(port)))
        except ValueError:
            raise BadTarget(f"Redis URL: bad port in startup node {item!r}") from None
    if not nodes:
        raise BadTarget("Redis cluster URL names no host")
    return nodes


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Startup nodes and client options of a ``redis+cluster://`` URL (or ``redis://...?cluster=true``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise BadTarget(f"{redact(url)}: not a Redis URL")
    tls = CLUSTER_SCHEMES.get(scheme, scheme == "rediss")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hostlist = netloc.rpartition("@")
    options: dict[str, Any] = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    if path.strip("/") not in ("", "0"):
        raise BadTarget(f"{redact(url)}: a Redis Cluster has only database 0")
    if tls:
        options["ssl"] = True
    for key, value in parse_qsl(query):
        if key != "cluster":
            options[key] = value
    return _split_hosts(hostlist), options


def connect(
    url: str,
    *,
    cluster: bool | None = None,
    decode_responses: bool = True,
    retries: int = 3,
    socket_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    **kwargs: Any,
) -> RedisClient:
    """A client for `url`: ``redis.Redis`` for one server, ``RedisCluster`` for a cluster.

    `cluster` overrides what the URL says. Strings come back decoded (``decode_responses``)
    because every value pbmigrate stores is UTF-8 text. A single-server client connects lazily;
    a cluster client reads the slot map now, so an unreachable cluster raises `TargetError` here.
    """
    scheme = url.partition("://")[0]
    query = dict(parse_qsl(urlsplit(url).query)) if "?" in url else {}
    if cluster is None:
        cluster = scheme in CLUSTER_SCHEMES or query.get("cluster", "").lower() in _TRUE
    common: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        **kwargs,
    }
    if not cluster:
        if scheme in CLUSTER_SCHEMES:
            raise BadTarget(f"{redact(url)}: a cluster URL used with cluster=False")
        clean = url
        if "cluster" in query:  # redis-py would pass an unknown `cluster` option on to the connection
            parts = urlsplit(url)
            rest = "&".join(f"{k}={v}" for k, v in parse_qsl(parts.query) if k != "cluster")
            clean = urlunsplit(parts._replace(query=rest))
        return redis.Redis.from_url(clean, retry=_retry(retries), **common)
    nodes, options = parse_cluster_url(url)
    try:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            retry=_retry(retries),
            **options,
            **common,
        )
    except (redis.ConnectionError, redis.TimeoutError, RedisClusterException) as exc:
        raise TargetError(f"Redis Cluster {redact(url)} cannot be reached: {exc}") from exc
