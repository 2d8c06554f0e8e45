"""`make airflow` / `make airflow-stop`: a real local Airflow 3 without Docker.

The api-server, scheduler, dag-processor and triggerer (and, with the CeleryExecutor, N workers)
run as separate processes, each in its own session so that stopping one stops its children
(executor slots, task processes). Their process ids go to `<home>/pids/`, their output to
`<home>/logs/`. The metadata database is a PostgreSQL database of its own on the local server,
created if missing; `pbm_postgres` and `pbm_redis` come from PBM_POSTGRES_URL / PBM_REDIS_URL.

Used by the Makefile and by the tests (`Stack(...).start()` / `.stop()`), which give it free
ports, their own home and their own metadata database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = ROOT / "airflow_home"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/pbmigrate_local"
DEFAULT_REDIS = "redis://127.0.0.1:6379/3"
DEFAULT_BROKER = "redis://127.0.0.1:6379/4"
DEFAULT_METADATA = "postgresql://postgres@127.0.0.1:5432/pbm_airflow"
DAG_IDS = ("pocketbase_migration", "pocketbase_resync", "pocketbase_cutover")


class StackError(Exception):
    """Something the user can act on, said in one line (the CLI prints it and exits 1)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _server_db(url: str) -> tuple[str, str]:
    """(a URL of the same server's `postgres` database, the database name) for a libpq URL."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "postgres"
    return urlunsplit(parts._replace(path="/postgres")), name


def ensure_database(url: str) -> bool:
    """Create the database the URL names if the server has none by that name; True if created."""
    admin, name = _server_db(url)
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        host = urlsplit(url).netloc.rsplit("@", 1)[-1]
        raise StackError(f"PostgreSQL does not answer at {host}: {str(exc).splitlines()[0]} "
                         "(start it: make services)") from exc
    with conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(f'CREATE DATABASE "{name}"')
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie has exited: only its parent has not reaped it
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot: with the pid, it names one process for good
    (a pid reused after a crash belongs to a process started later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass
class Stack:
    """One local Airflow: where it lives, on which port, with which executor and targets."""

    home: Path = DEFAULT_HOME
    port: int = 8080
    executor: str = "local"  # local | celery
    workers: int = 2
    metadata_url: str = DEFAULT_METADATA
    pg_url: str = DEFAULT_PG
    redis_url: str = DEFAULT_REDIS
    broker_url: str = DEFAULT_BROKER
    user: str = "admin"
    password: str = "admin"
    parallelism: int = 2  # two cores: more task processes than cores only queue up for CPU
    sample_rows: int = 20_000
    work_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pid_dir(self) -> Path:
        return self.home / "pids"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def shared_work_dir(self) -> Path:
        return self.work_dir or self.home / "work"

    @property
    def sample_dir(self) -> Path:
        return self.home / "sample"

    # --- configuration ------------------------------------------------------------------------

    def _secret(self, name: str) -> str:
        path = self.home / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        """The environment every process of this stack shares (Airflow reads it as its config)."""
        meta = self.metadata_url.replace("postgresql://", "postgresql+psycopg2://", 1)
        executor = {"local": "LocalExecutor", "celery": "CeleryExecutor"}[self.executor]
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # migration and cut-over ready to trigger; pocketbase_resync still starts paused (its own flag)
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.user}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__CORE__FERNET_KEY": self._fernet(),
            # the task's hostname: PBM_HOSTNAME names a Celery worker "as if on its own host"
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pbm_airflow.hostname",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.log_dir / "tasks"),
            "AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY": str(self.log_dir / "dag_processor"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self._port_file("worker_log_port")),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self._port_file("trigger_log_port")),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # The migration is a chain of short tasks: an idle scheduler that sleeps 1 s (Airflow's default)
            # before noticing one ended cost 4-8 s of a 47 s run on the 2M sample; 0.2 s, measured.
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": os.environ.get(
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME", "0.2"),
            # A task's supervisor waits in select() for up to this many seconds (default 5) when the task
            # process has closed its sockets but not yet been reaped, holding the executor slot: the next
            # task started 3.5-5 s after each heavy one on the 2M sample. 1 s (it is an integer) also
            # heartbeats running tasks once a second, a few ms of API-server time each.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": os.environ.get(
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1"),
            "AIRFLOW_CONN_PBM_POSTGRES": self.pg_url,
            "AIRFLOW_CONN_PBM_REDIS": self.redis_url,
            "PBM_WORK_DIR": str(self.shared_work_dir),
            # the plugins folder on the path from the first import: hostname_callable lives there
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "plugins"), os.environ.get("PYTHONPATH")) if p),
        }
        if self.executor == "celery":
            env.update({
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.metadata_url,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
                "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            })
        env.update(self.extra_env)
        return env

    def _fernet(self) -> str:
        path = self.home / "fernet_key"
        if not path.exists():
            from cryptography.fernet import Fernet

            path.write_text(Fernet.generate_key().decode())
        return path.read_text().strip()

    def _port_file(self, name: str) -> int:
        """An internal port (log servers) picked free once per home, so two stacks never clash."""
        path = self.home / name
        if not path.exists():
            path.write_text(str(free_port()))
        return int(path.read_text())

    def processes(self) -> list[tuple[str, list[str], dict[str, str], Path]]:
        """(name, argv, extra env, working folder) of every long-running process."""
        af = [sys.executable, "-m", "airflow"]
        procs = [
            ("api-server", [*af, "api-server", "--port", str(self.port), "--host", "127.0.0.1", "--workers", "1"],
             {}, self.home),
            ("scheduler", [*af, "scheduler"], {}, self.home),
            ("dag-processor", [*af, "dag-processor"], {}, self.home),
            ("triggerer", [*af, "triggerer"], {}, self.home),
        ]
        if self.executor == "celery":
            for i in range(1, self.workers + 1):
                name = f"worker{i}"
                folder = self.home / "workers" / name
                procs.append((name, [*af, "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", "1",
                                     "--skip-serve-logs", "--without-mingle", "--without-gossip"],
                              {"PBM_HOSTNAME": name}, folder))
        return procs

    # --- checks -------------------------------------------------------------------------------

    def recorded(self) -> dict[str, tuple[int, str]]:
        """name -> (pid, start time) of each process in the pid folder (alive or not)."""
        out = {}
        for f in sorted(self.pid_dir.glob("*.pid")) if self.pid_dir.is_dir() else []:
            with contextlib.suppress(ValueError):
                pid, _, started = f.read_text().strip().partition(" ")
                out[f.stem] = (int(pid), started)
        return out

    def running(self) -> dict[str, int]:
        """name -> pid of each recorded process (alive or not)."""
        return {name: pid for name, (pid, _) in self.recorded().items()}

    def ours(self, pid: int, started: str) -> bool:
        """The recorded process is alive and is still the one this stack started."""
        return _alive(pid) and (not started or start_time(pid) == started)

    def preflight(self) -> None:
        """Refuse, in one line, what would make the start fail half-way."""
        for name, (pid, started) in self.recorded().items():
            if self.ours(pid, started):
                raise StackError(f"Airflow is already running from {self.home} ({name}, pid {pid}): "
                                 "make airflow-stop first")
            raise StackError(f"stale pid file {self.pid_dir / (name + '.pid')} (pid {pid} is not running, "
                             "an earlier run crashed): make airflow-stop removes it")
        if port_busy(self.port):
            raise StackError(f"port {self.port} is busy on 127.0.0.1 (another process listens there): stop it or "
                             "choose another port (make airflow AIRFLOW_PORT=8081)")
        for url in {self.metadata_url, self.pg_url}:
            ensure_database(url)
        for what, url in [("pbm_redis", self.redis_url)] + ([("broker", self.broker_url)]
                                                            if self.executor == "celery" else []):
            try:
                redis.Redis.from_url(url, socket_connect_timeout=3).ping()
            except redis.RedisError as exc:
                raise StackError(f"Redis ({what}) does not answer at {urlsplit(url).netloc}: {exc} "
                                 "(start it: make services)") from exc

    # --- start and stop -----------------------------------------------------------------------

    def _airflow(self, *args: str, log: str) -> None:
        with (self.log_dir / log).open("ab") as fh:
            proc = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env(), cwd=self.home,
                                  stdout=fh, stderr=subprocess.STDOUT, check=False)
        if proc.returncode:
            raise StackError(f"airflow {' '.join(args)} failed (exit {proc.returncode}): see {self.log_dir / log}")

    def build_sample(self) -> Path:
        """The sample game (a real PocketBase builds it), reused when already there."""
        db = self.sample_dir / "pb_data" / "data.db"
        info_file = self.sample_dir / "sample.json"
        if db.is_file() and info_file.is_file() and json.loads(info_file.read_text()).get("rows") == self.sample_rows:
            return db.parent
        from pbdev.sample import build_sample

        info = build_sample(self.sample_dir, rows=self.sample_rows)
        info_file.write_text(json.dumps({"rows": self.sample_rows, "superuser": info["superuser"],
                                         "counts": info["counts"]}, default=str))
        return Path(info["pb_data"])

    def start(self, *, timeout: float = 240.0, sample: bool = True) -> dict:
        """Start every process, wait until the UI answers and the DAGs are parsed; what to tell the user."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.preflight()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.shared_work_dir.mkdir(parents=True, exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({self.user: self.password}))
        self._airflow("db", "migrate", log="db_migrate.log")
        pb_data = self.build_sample() if sample else None
        env = self.env()
        try:
            for name, argv, extra, cwd in self.processes():
                cwd.mkdir(parents=True, exist_ok=True)
                with (self.log_dir / f"{name}.log").open("ab") as fh:
                    proc = subprocess.Popen(argv, env={**env, **extra}, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                (self.pid_dir / f"{name}.pid").write_text(f"{proc.pid} {start_time(proc.pid)}\n")
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return {"url": self.url, "user": self.user, "password": self.password, "logs": str(self.log_dir),
                "pids": str(self.pid_dir), "sample": str(pb_data) if pb_data else None,
                "executor": self.executor, "work_dir": str(self.shared_work_dir)}

    def token(self) -> str:
        resp = requests.post(f"{self.url}/auth/token", json={"username": self.user, "password": self.password},
                             timeout=10)
        resp.raise_for_status()
        return resp.json()["access_token"]

    def api(self) -> requests.Session:
        """A REST API v2 session logged in as the stack's user (base URL: `stack.url`)."""
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {self.token()}"
        return s

    def wait_ready(self, timeout: float) -> None:
        """Until the API answers, the scheduler beats and every DAG is parsed, or say which process died."""
        deadline = time.monotonic() + timeout
        last = "the API server does not answer"
        while time.monotonic() < deadline:
            for name, pid in self.running().items():
                if not _alive(pid):
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise StackError(f"{name} (pid {pid}) exited during start-up: {tail[0] if tail else ''} "
                                     f"(log: {self.log_dir / (name + '.log')})")
            try:
                health = requests.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
                if health.get("scheduler", {}).get("status") != "healthy":
                    last = "the scheduler has not sent a heartbeat"
                else:
                    s = self.api()
                    dags = {d["dag_id"] for d in s.get(f"{self.url}/api/v2/dags", timeout=10).json()["dags"]}
                    if set(DAG_IDS) <= dags:
                        if self.executor != "celery" or self._workers_up():
                            self._warm_execution_api()
                            return
                        last = "the Celery workers have not answered"
                    else:
                        last = f"the dag-processor has parsed {sorted(dags)} so far"
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(1)
        raise StackError(f"Airflow did not come up within {timeout:.0f} s: {last} (logs: {self.log_dir})")

    def _warm_execution_api(self) -> None:
        """Build the task execution API's versioned routes now, not in the first task.

        Airflow's execution API (a Cadwyn app mounted at /execution) generates its versioned
        routers on the first request it serves: 5 to 10 s of CPU here, which the first task of the
        first run otherwise waits for (its start call to the API). Any request does it; the health
        route needs no token."""
        requests.get(f"{self.url}/execution/health", timeout=120).raise_for_status()

    def _workers_up(self) -> bool:
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            replies = app.control.ping(timeout=2.0) or []
        finally:
            app.close()
        return len(replies) >= self.workers

    def stop(self, *, timeout: float = 30.0) -> list[str]:
        """Stop every recorded process and its children (by process group), then drop the pid files."""
        stopped = []
        pids = self.recorded()
        groups = {}
        for name, (pid, started) in pids.items():
            # each process leads its own group (start_new_session): a pid reused since a crash is
            # somebody else's process, but a group by that id still holds what the crashed one started
            if self.ours(pid, started) or (not _alive(pid) and _group_alive(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                    groups[name] = pid
                    stopped.append(f"{name} (pid {pid})")
        deadline = time.monotonic() + timeout
        while groups and time.monotonic() < deadline:
            groups = {n: g for n, g in groups.items() if _group_alive(g)}
            time.sleep(0.3)
        for g in groups.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGKILL)
        for name in pids:
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        return stopped


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for proc in Path("/proc").iterdir():  # zombies still count for killpg: look for a live member
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (proc / "stat").read_text().split(") ", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
    return False


def stack_from_env(args: argparse.Namespace) -> Stack:
    return Stack(
        home=Path(args.home), port=args.port, executor=args.executor, workers=args.workers,
        metadata_url=os.environ.get("PBM_AIRFLOW_DB_URL", DEFAULT_METADATA),
        pg_url=os.environ.get("PBM_POSTGRES_URL", DEFAULT_PG), redis_url=os.environ.get("PBM_REDIS_URL", DEFAULT_REDIS),
        broker_url=os.environ.get("PBM_CELERY_BROKER_URL", DEFAULT_BROKER),
        user=os.environ.get("PBM_AIRFLOW_USER", "admin"), password=os.environ.get("PBM_AIRFLOW_PASSWORD", "admin"),
        parallelism=int(os.environ.get("PBM_AIRFLOW_PARALLELISM", "2")), sample_rows=args.rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--home", default=os.environ.get("PBM_AIRFLOW_HOME", str(DEFAULT_HOME)))
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--executor", choices=["local", "celery"], default="local")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (EXECUTOR=celery)")
    parser.add_argument("--rows", type=int, default=20_000, help="size of the sample game database")
    args = parser.parse_args(argv)
    stack = stack_from_env(args)
    if args.action == "stop":
        stopped = stack.stop()
        print(f"stopped {', '.join(stopped)}" if stopped else f"nothing was running from {stack.home}")
        return 0
    try:
        print(f"Starting Airflow ({args.executor} executor) in {stack.home} ...", flush=True)
        info = stack.start()
    except StackError as exc:
        print(f"make airflow: {exc}", file=sys.stderr)
        return 1
    sample = Path(info["sample"])
    creds = json.loads((stack.sample_dir / "sample.json").read_text())["superuser"]
    print(f"""
Airflow UI     {info['url']}   (log in as {info['user']} / {info['password']})
Executor       {info['executor']}{f', {args.workers} Celery workers' if args.executor == 'celery' else ''}
Sample game    {sample}   <- type this into source_path when you trigger pocketbase_migration
               (its PocketBase superuser for API mode: {creds['email']} / {creds['password']})
Target         pbm_postgres = {_safe(stack.pg_url)}, pbm_redis = {_safe(stack.redis_url)}
Logs           {info['logs']}   (one file per process; task logs under tasks/)
Stop           make airflow-stop""")
    return 0


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=f"{quote(parts.username or '')}:***@{parts.hostname}:{parts.port}")
    return urlunsplit(parts)


if __name__ == "__main__":
    sys.exit(main())
