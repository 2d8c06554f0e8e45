#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on 127.0.0.1: start them, or install them with apt.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
}

if ! pg_up; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  if [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then apt_install postgresql; fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
pg_up || { echo "PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }

if ! redis_up; then
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 30); do redis_up && break; sleep 0.5; done
fi
redis_up || { echo "Redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
# Prometheus and its Pushgateway, binaries only, for tests/test_monitoring.py (no service is started).
if ! command -v promtool >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then
  export RUNLEVEL=1
  apt_install --no-install-recommends prometheus prometheus-pushgateway
fi
# pgloader, the peer the benchmark in bench/ measures against.
command -v pgloader >/dev/null || apt_install pgloader || echo "pgloader unavailable: bench/ will skip it" >&2
# Debian's Chromium for the browser test of the Airflow UI (Playwright drives it; never a browser download).
[ -x /usr/bin/chromium ] || apt_install chromium
echo "services: PostgreSQL and Redis answer"
