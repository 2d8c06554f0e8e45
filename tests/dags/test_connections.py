"""The three connections as the DAG tasks read them, through the providers' hooks: every extra a
data engineer sets (TLS, options, usernames, cluster nodes) reaches the engine, IPv6 hosts too."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict

from pbmigrate.preflight import safe_url


@pytest.fixture
def plugin(airflow_home, monkeypatch: pytest.MonkeyPatch):
    import pbm_airflow

    return pbm_airflow


def _conn(monkeypatch: pytest.MonkeyPatch, name: str, **fields: object) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", json.dumps(fields))


def test_postgres_keeps_tls_extras_options_and_an_ipv6_host(plugin, monkeypatch):
    _conn(monkeypatch, "pbm_postgres", conn_type="postgres", host="2001:db8::7", port=6432, login="mig@rator",
          password="p:ss/w@rd", schema="game db", extra={
              "sslmode": "verify-full", "sslrootcert": "/etc/ssl/ca.pem", "sslcert": "/etc/ssl/c.pem",
              "options": "-c statement_timeout=60000", "application_name": "pbmigrate", "keepalives": 1,
              "cursor": "dictcursor", "sqlalchemy_scheme": "postgresql+psycopg"})  # the hook's own keys
    url = plugin.postgres_url()
    info = conninfo_to_dict(url)
    assert info["host"] == "2001:db8::7" and info["port"] == "6432"
    assert info["user"] == "mig@rator" and info["password"] == "p:ss/w@rd" and info["dbname"] == "game db"
    assert info["sslmode"] == "verify-full" and info["sslrootcert"] == "/etc/ssl/ca.pem"
    assert info["sslcert"] == "/etc/ssl/c.pem" and info["options"] == "-c statement_timeout=60000"
    assert info["application_name"] == "pbmigrate" and info["keepalives"] == "1"
    assert "cursor" not in info and "sqlalchemy_scheme" not in info
    assert safe_url(url) == "postgresql://[2001:db8::7]:6432/game%20db" and "p:ss" not in safe_url(url)


def test_postgres_url_with_extras_really_connects(plugin, monkeypatch, pg_url):
    target = conninfo_to_dict(pg_url)
    _conn(monkeypatch, "pbm_postgres", conn_type="postgres", host=target["host"], port=int(target["port"]),
          login=target["user"], schema=target["dbname"],
          extra={"sslmode": "disable", "options": "-c statement_timeout=4321", "application_name": "pbm-test"})
    with psycopg.connect(plugin.postgres_url()) as conn:
        timeout, app = conn.execute("SELECT current_setting('statement_timeout'), "
                                    "current_setting('application_name')").fetchone()
    assert (timeout, app) == ("4321ms", "pbm-test")


def test_redis_keeps_a_username_without_password_tls_extras_and_the_db(plugin, monkeypatch):
    _conn(monkeypatch, "pbm_redis", conn_type="redis", host="::1", port=6380, login="warmer", extra={
        "db": 4, "ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/ssl/redis-ca.pem",
        "ssl_check_hostname": True})
    url = plugin.redis_url()
    parts = urlsplit(url)
    assert parts.scheme == "rediss" and parts.username == "warmer" and parts.password is None
    assert parts.hostname == "::1" and parts.port == 6380 and parts.path == "/4"
    assert parse_qs(parts.query) == {"ssl_cert_reqs": ["required"], "ssl_ca_certs": ["/etc/ssl/redis-ca.pem"],
                                     "ssl_check_hostname": ["true"]}
    kwargs = redis.Redis.from_url(url).connection_pool.connection_kwargs  # redis-py reads every option
    assert kwargs["username"] == "warmer" and kwargs["ssl_ca_certs"] == "/etc/ssl/redis-ca.pem"
    assert kwargs["db"] == 4


def test_redis_cluster_lists_every_startup_node_and_ipv6_answers(plugin, monkeypatch):
    _conn(monkeypatch, "pbm_redis", conn_type="redis", host="10.0.0.1", port=7000, password="none",
          extra={"cluster": True, "startup_nodes": "10.0.0.2:7000,[2001:db8::3]:7000"})
    assert plugin.redis_url() == "redis+cluster://10.0.0.1:7000,10.0.0.2:7000,[2001:db8::3]:7000"
    _conn(monkeypatch, "pbm_redis", conn_type="redis", host="::1", port=6379, extra={"db": 13})
    assert redis.Redis.from_url(plugin.redis_url()).ping()  # the local server listens on ::1


def test_pocketbase_hook_builds_the_api_url_from_host_type_and_port(plugin, monkeypatch):
    _conn(monkeypatch, "pbm_pocketbase", conn_type="https", host="pb.example.com", port=8443,
          login="root@example.com", password="s3cret")
    assert plugin.pocketbase_api() == {"url": "https://pb.example.com:8443", "email": "root@example.com",
                                       "password": "s3cret"}
    _conn(monkeypatch, "pbm_pocketbase", conn_type="http", host="::1", port=8090, login="a@b.c", password="x")
    assert plugin.PocketBaseHook().get_conn()["url"] == "http://[::1]:8090"
    monkeypatch.delenv("AIRFLOW_CONN_PBM_POCKETBASE")
    assert plugin.pocketbase_api() is None  # SQLite mode needs no connection
