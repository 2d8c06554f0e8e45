"""`make loadtest`: PocketBase against the game service on the migrated PostgreSQL + Redis, same command.

1. A real PocketBase builds the sample game (``ROWS`` rows, 5 % of them players); the engine's task
   functions migrate it into PostgreSQL and warm Redis, so both backends hold the same data.
2. PocketBase serves that data; the service (``python -m pbgame``, flag ``postgres``) serves the
   migrated copy.
3. Per backend, with the same Locust journeys and mix (`locustfile.py`):
   - ``USERS`` players (default 10000) with think time (``THINK``, default 20-40 s between two
     calls: the game's own server runs the matches, players call this API between them), spawned
     at ``SPAWN_RATE``/s, then held for ``DURATION`` s: p50/p95/p99 and error rate per endpoint
     and overall, and the servers' CPU per request;
   - capacity: steps of ``CAPACITY_STEPS`` requests/s, ``DURATION`` s each, until p95 > 100 ms or
     errors >= 0.1 % (or the load generator cannot reach the step's rate); the last good step's
     measured rate is the capacity. The backends take turns at each step (see `capacity`).
4. An HTML and a JSON report; the JSON's path is the last line printed.

With ``LT_PG_URL`` set, steps 1 and 2 use data that is already migrated instead of a sample (the
pipeline's ``loadtest`` step, `pbmigrate.cutover.loadgate`): the service serves ``LT_SCHEMA`` (a staging
schema) of that database, a private Redis warmed from it, and PocketBase serves a copy of
``LT_PB_DATA`` (the run's source snapshot; empty: no PocketBase reference). The database is
never dropped in this mode.

The database is dropped at the end unless ``KEEP_DB`` is set. Everything runs on 127.0.0.1,
every child process is stopped by its pid, and every Locust run has a time limit. On a small
machine the servers and the load generator share the CPU: the figures are comparable with each
other (same command, same machine), not absolute.
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import psycopg.conninfo
import redis
from psycopg import sql

from pbdev.pbserver import PocketBaseServer
from pbdev.sample import build_sample
from pbgame.cache import SessionStore
from pbgame.schema import ROLES, load_schema
from pbgame.testbed import GameServer, free_port, migrate
from pbmigrate.cache.warmup import warm_run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
P95_LIMIT_MS = 100.0
ERROR_LIMIT = 0.001


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def config() -> dict[str, Any]:
    users = env_int("USERS", 10000)
    return {
        "users": users,
        "duration": env_int("DURATION", 30),
        "spawn_rate": float(os.environ.get("SPAWN_RATE") or 100),
        "rows": env_int("ROWS", max(20_000, users * 20)),
        "processes": env_int("PROCESSES", 1),
        "cooldown": env_int("COOLDOWN", 10),
        "service_workers": env_int("SERVICE_WORKERS", 2),
        "think": os.environ.get("THINK", "20,40"),
        "login_share": float(os.environ.get("LOGIN_SHARE") or 0.05),
        "per_user_rate": float(os.environ.get("PER_USER_RATE") or 5),
        "capacity_steps": [int(x) for x in (os.environ.get("CAPACITY_STEPS")
                                            or "100,200,300,400,500,600,800,1000,1500,2000,3000").split(",") if x],
        "mix": os.environ.get("MIX", "profile_me=3,profile_other=2,leaderboard=3,history=1,inventory=1,"
                                      "match_result=1"),
        "pg_admin_url": os.environ.get("LT_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        "database": os.environ.get("LT_DATABASE", "pbm_loadtest"),
        "redis_url": os.environ.get("LT_REDIS_URL", ""),  # empty: a private redis-server on a free port
        "out": Path(os.environ.get("OUT") or ROOT / "bench" / "out" / "loadtest"),
        "backends": (os.environ.get("BACKENDS") or "pocketbase,postgres").split(","),
        # existing data (see the module docstring): the migrated database, schema and source snapshot
        "pg_url": os.environ.get("LT_PG_URL", ""),
        "schema": os.environ.get("LT_SCHEMA", ""),
        "pb_data": os.environ.get("LT_PB_DATA", ""),
        "mapping": os.environ.get("LT_MAPPING") or "game.yaml",
        # The service reaches the co-located PostgreSQL and Redis through Unix sockets when they are
        # on this machine (see `local_url`): PocketBase reads SQLite in its own process.
        "unix_sockets": os.environ.get("LT_UNIX_SOCKETS", "1").lower() not in ("0", "false", "no", ""),
    }


def log(msg: str) -> None:
    print(f"[loadtest {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------- Locust runs and their numbers


def _ms(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def read_stats(prefix: Path) -> dict[str, Any]:
    """Per endpoint and overall figures from Locust's ``_stats.csv``."""
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))  # noqa: SIM115
    out: dict[str, Any] = {"endpoints": {}}
    for row in rows:
        n, fails = int(row["Request Count"]), int(row["Failure Count"])
        fig = {"requests": n, "failures": fails, "rps": round(float(row["Requests/s"]), 1),
               "p50_ms": _ms(row["50%"]), "p95_ms": _ms(row["95%"]), "p99_ms": _ms(row["99%"]),
               "error_rate": round(fails / n, 5) if n else 0.0}
        if row["Name"] == "Aggregated":
            out.update(fig)
        else:
            out["endpoints"][row["Name"]] = fig
    # Journeys, not HTTP requests: PocketBase's match result is two requests (the stats lookup,
    # then the batch), the service's one; counting requests would credit PocketBase ~9 % more rate.
    helpers = sum(e["rps"] for name, e in out["endpoints"].items() if name.endswith("_lookup"))
    out["requests_rps"] = out.get("rps", 0.0)
    out["rps"] = round(out.get("rps", 0.0) - helpers, 1)
    return out


def steady_rps(prefix: Path, users: int) -> float | None:
    """Requests/s once every player is in (from ``_stats_history.csv``), the ramp left out."""
    path = Path(f"{prefix}_stats_history.csv")
    if not path.exists():
        return None
    rows = [r for r in csv.DictReader(open(path)) if r["Name"] == "Aggregated"  # noqa: SIM115
            and int(r["User Count"] or 0) >= users]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    dt = int(last["Timestamp"]) - int(first["Timestamp"])
    dn = int(last["Total Request Count"]) - int(first["Total Request Count"])
    return round(dn / dt, 1) if dt > 0 else None  # requests (the history has no per-journey split)


def locust(cfg: dict, *, target: str, host: str, seed: Path, users: int, spawn_rate: float, seconds: int,
           prefix: Path, rate: float = 0.0, reset_stats: bool = False, cpu: ServerCpu | None = None) -> dict[str, Any]:
    """One headless Locust run, bounded by ``-t`` and by a hard timeout on the process."""
    env = {**os.environ, "LT_SEED": str(seed), "LT_TARGET": target, "LT_MIX": cfg["mix"],
           "LT_THINK": cfg["think"], "LT_RATE": str(rate), "LT_LOGIN_SHARE": str(cfg["login_share"])}
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", host,
           "-u", str(users), "-r", str(spawn_rate), "-t", f"{seconds}s", "--stop-timeout", "5",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary", "--exit-code-on-error", "0",
           "--loglevel", "WARNING"]
    if cfg["processes"] > 1:
        cmd += ["--processes", str(cfg["processes"])]
    if reset_stats:
        cmd.append("--reset-stats")
    cpu0 = cpu.seconds() if cpu else {}
    gen0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy(), time.monotonic()
    with open(f"{prefix}.log", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(seconds + 120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
            raise RuntimeError(f"Locust did not stop in time (log {prefix}.log)") from None
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"Locust exited with {proc.returncode} (log {prefix}.log)")
    stats = read_stats(prefix)
    # Where the 2 cores went: Locust itself (its processes, reaped by now), and the whole machine
    # (the servers, the generator, and whatever else runs beside them).
    gen1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - t0
    stats["loadgen_cores"] = round((gen1.ru_utime + gen1.ru_stime - gen0.ru_utime - gen0.ru_stime) / wall, 2)
    stats["machine_busy_cores"] = round((machine_busy() - busy0) / wall, 2)
    stats["machine_cores"] = psutil.cpu_count()
    if cpu and not reset_stats and stats.get("requests"):
        used = {k: v - cpu0.get(k, 0.0) for k, v in cpu.seconds().items()}
        stats["server_cpu_ms_per_request"] = round(1000 * sum(used.values()) / stats["requests"], 3)
        stats["server_cpu_ms_by_process"] = {k: round(1000 * v / stats["requests"], 3) for k, v in used.items()}
    return stats


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def players_run(cfg: dict, target: str, host: str, seed: Path, out: Path, cpu: ServerCpu) -> dict[str, Any]:
    users, rate = cfg["users"], cfg["spawn_rate"]
    ramp = math.ceil(users / rate)
    log(f"{target}: {users} players, ramp {ramp} s + {cfg['duration']} s")
    stats = locust(cfg, target=target, host=host, seed=seed, users=users, spawn_rate=rate,
                   seconds=ramp + cfg["duration"], prefix=out / f"{target}_players", cpu=cpu)
    steady = steady_rps(out / f"{target}_players", users)
    stats["rps_whole_run"] = stats["rps"]
    if steady is not None:  # in journeys, as read_stats counts them
        share = stats["rps"] / stats["requests_rps"] if stats.get("requests_rps") else 1.0
        stats["rps"] = round(steady * share, 1)
    stats["users"], stats["ramp_s"], stats["steady_s"] = users, ramp, cfg["duration"]
    return stats


def capacity_step(cfg: dict, target: str, host: str, seed: Path, out: Path, offered: int) -> dict[str, Any]:
    """One step: `offered` requests/s for DURATION s; passed = p95 <= 100 ms, errors < 0.1 %, rate reached."""
    time.sleep(cfg["cooldown"])  # let the previous run's backlog drain first
    users = max(1, math.ceil(offered / cfg["per_user_rate"]))
    st = locust(cfg, target=target, host=host, seed=seed, users=users, spawn_rate=max(users / 2, 1),
                seconds=2 + cfg["duration"], prefix=out / f"{target}_step_{offered}",
                rate=cfg["per_user_rate"], reset_stats=True)
    ok = st.get("p95_ms", 1e9) <= P95_LIMIT_MS and st.get("error_rate", 1) < ERROR_LIMIT
    reached = st.get("rps", 0) >= 0.8 * offered
    log(f"{target}: step {offered}/s -> {st.get('rps')}/s, p95 {st.get('p95_ms')} ms, "
        f"errors {st.get('error_rate')}, Locust {st['loadgen_cores']} cores, machine {st['machine_busy_cores']}")
    return {"offered_rps": offered, "rps": st.get("rps", 0), "p95_ms": st.get("p95_ms"),
            "p99_ms": st.get("p99_ms"), "error_rate": st.get("error_rate"), "passed": ok and reached,
            "loadgen_cores": st["loadgen_cores"], "machine_busy_cores": st["machine_busy_cores"]}


def capacity(cfg: dict, hosts: dict[str, tuple[str, str]], seed: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Step the offered rate up until a step breaks, for every backend, the backends taking turns.

    Each step runs on both backends one after the other (alternating which goes first), so the
    machine's other work, which changes from minute to minute, weighs on both alike; a backend
    stops at its first failed step and its capacity is the best rate it passed."""
    result = {b: {"capacity_rps": 0.0, "steps": []} for b in hosts}
    alive = list(hosts)
    for i, offered in enumerate(cfg["capacity_steps"]):
        for backend in (alive if i % 2 == 0 else alive[::-1]):
            target, host = hosts[backend]
            step = capacity_step(cfg, target, host, seed, out, offered)
            result[backend]["steps"].append(step)
            if step["passed"]:
                result[backend]["capacity_rps"] = max(result[backend]["capacity_rps"], step["rps"])
        alive = [b for b in alive if result[b]["steps"][-1]["passed"]]
        if not alive:
            break
    return result


class ServerCpu:
    """CPU seconds the servers of one backend spend: a cost per request that CPU noise from other
    work on the machine does not change much (latency does). PocketBase: its process. The new
    stack: the service's processes, the PostgreSQL backends of the load test's database and
    the load test's own redis-server (a shared one, if LT_REDIS_URL names it, is an upper bound)."""

    def __init__(self, name: str, pids: list[int], database: str | None = None, redis_pid: int | None = None) -> None:
        self.name = name
        self.pids = pids
        self.database = database
        self.redis_pid = redis_pid

    def _procs(self) -> dict[str, list[psutil.Process]]:
        procs: dict[str, list[psutil.Process]] = {self.name: []}
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                procs[self.name] += [p, *p.children(recursive=True)]
        if self.database:
            procs["postgres"], procs["redis"] = [], []
            for p in psutil.process_iter(["cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if (p.pid == self.redis_pid) if self.redis_pid else cmd.startswith("redis-server"):
                    procs["redis"].append(p)
                elif cmd.startswith("postgres:") and f" {self.database} " in cmd:
                    procs["postgres"].append(p)
        return procs

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, procs in self._procs().items():
            out[part] = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    ct = p.cpu_times()
                    out[part] += ct.user + ct.system
        return out


# ---------------------------------------------------------------------- the stack


PG_SOCKET_DIRS = ("/var/run/postgresql", "/run/postgresql", "/tmp")


def local_url(pg_url: str, enabled: bool) -> str:
    """`pg_url` through PostgreSQL's Unix socket when it names this machine and the socket exists.

    A TCP round trip on loopback costs the sender the receiver's TCP processing too; through a
    Unix socket the same query measured ~20 % less of the new stack's CPU per journey. This is
    the deployment of a service beside its database; across a network the TCP figure applies
    (``LT_UNIX_SOCKETS=0`` measures it)."""
    info = psycopg.conninfo.conninfo_to_dict(pg_url)
    if not enabled or str(info.get("host", "localhost")) not in ("127.0.0.1", "localhost", "::1"):
        return pg_url
    port = str(info.get("port") or 5432)
    for folder in PG_SOCKET_DIRS:
        if Path(folder, f".s.PGSQL.{port}").exists():
            return psycopg.conninfo.make_conninfo(**{**info, "host": folder})
    return pg_url


@contextlib.contextmanager
def private_redis(work: Path, unix_socket: bool = False) -> Iterator[tuple[str, int, str]]:
    """A redis-server of our own on 127.0.0.1:<free port>, no persistence, stopped by its pid.

    The shared Redis is flushed by other test runs now and then (sessions vanished mid-run once),
    and its CPU is shared: a private one holds the load test's keys and nothing else's CPU. With
    `unix_socket` it also listens on a Unix socket (in a short temporary folder: a socket path
    has ~100 characters at most), whose URL is the third value (else the TCP one)."""
    port = free_port()
    sock_dir = Path(tempfile.mkdtemp(prefix="pbm-lt-")) if unix_socket else None
    extra = ["--unixsocket", str(sock_dir / "redis.sock"), "--unixsocketperm", "700"] if sock_dir else []
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work), "--logfile", str(work / "redis.log"), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        url = f"redis://127.0.0.1:{port}/0"
        yield url, proc.pid, f"unix://{sock_dir / 'redis.sock'}?db=0" if sock_dir else url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if sock_dir:
            shutil.rmtree(sock_dir, ignore_errors=True)


def fresh_database(cfg: dict) -> str:
    with psycopg.connect(cfg["pg_admin_url"], autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{cfg["database"]}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{cfg["database"]}"')
    return cfg["pg_admin_url"].rsplit("/", 1)[0] + "/" + cfg["database"]


def write_seed(path: Path, pg_url: str, schema: str, redis_url: str, pb_token: str, password: str,
               mapping: str = "game.yaml", pb_collections: dict[str, set[str]] | None = None) -> int:
    """Players, seasons, the PocketBase token and a live session per returning player.

    Table and column names come from the mapping, as the service's do."""
    n = load_schema(mapping).names
    users, stats = n.table("users"), n.table("user_stats")
    q = sql.SQL("SELECT {}, {} FROM {}.{} WHERE {} <> '' ORDER BY 1").format(
        sql.Identifier(n.col("users", "id")), sql.Identifier(n.col("users", "email")), sql.Identifier(schema),
        sql.Identifier(users), sql.Identifier(n.col("users", "email")))
    q_ranked = sql.SQL("SELECT {}, {} FROM {}.{} ORDER BY 1, 2").format(
        sql.Identifier(n.col("user_stats", "season")), sql.Identifier(n.col("user_stats", "user")),
        sql.Identifier(schema), sql.Identifier(stats))
    with psycopg.connect(pg_url) as conn:
        players = [{"id": i, "email": e} for i, e in conn.execute(q)]
        ranked: dict[str, list[str]] = {}
        for season, player in conn.execute(q_ranked):
            ranked.setdefault(season, []).append(player)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = SessionStore(client)
    sessions = {}
    pipe = client.pipeline(transaction=False)
    for p in players:
        token = os.urandom(24).hex()
        pipe.set(f"session:{{{token}}}", json.dumps({"player_id": p["id"]}), ex=store.ttl)
        sessions[p["id"]] = token
    pipe.execute()
    client.close()
    path.write_text(json.dumps({"players": players, "seasons": sorted(ranked), "ranked": ranked, "pb_token": pb_token,
                                "password": password, "sessions": sessions, "pb": pb_names(mapping, pb_collections)}))
    return len(players)


def pb_names(mapping: str, collections: dict[str, set[str]] | None) -> dict[str, Any]:
    """The PocketBase names the Locust journeys use, from the mapping's roles (see pbgame.schema).

    The leaderboard is the game's own ``leaderboard`` collection when PocketBase has one ranked
    by season (the sample's, its best case), else the stats role sorted as the service's
    forwarder sorts it."""
    game = load_schema(mapping)
    n = game.names
    src = {role: {f: n.src(role, f) for f in fields} for role, fields in ROLES.items()}
    board = {"collection": n.coll("user_stats"), "season": n.field_of("user_stats", game.leaderboard.season),
             "sort": f"-{n.field_of('user_stats', game.leaderboard.score)},-{n.src('user_stats', 'user')}",
             "fields": f"{n.src('user_stats', 'user')},{n.field_of('user_stats', game.leaderboard.score)}"}
    if collections and {"season", "rank", "user"} <= collections.get("leaderboard", set()):
        board = {"collection": "leaderboard", "season": "season", "sort": "rank", "fields": "user,rank,rating"}
    return {"coll": {role: n.coll(role) for role in ROLES}, "src": src, "leaderboard": board,
            "profile_fields": ",".join(("id", *game.profile_fields_pb))}


def pb_collections(admin: Any) -> dict[str, set[str]]:
    """Collection name -> field names of a running PocketBase (a superuser session)."""
    items = admin.get("/api/collections", params={"perPage": 500}).json()["items"]
    return {c["name"]: {f["name"] for f in c.get("fields") or c.get("schema") or []} for c in items}


def report_html(path: Path, result: dict) -> None:
    rows = []
    for backend in ("pocketbase", "postgres"):
        b = result.get(backend)
        if not b:
            continue
        run = b["players"]
        rows.append(f"<tr><th>{backend}</th><td>{b['capacity_rps']}</td><td>{run['rps']}</td>"
                    f"<td>{run['p50_ms']}</td><td>{run['p95_ms']}</td><td>{run['p99_ms']}</td>"
                    f"<td>{run['error_rate']}</td></tr>")
        for name, e in sorted(run["endpoints"].items()):
            rows.append(f"<tr><td>&nbsp;&nbsp;{html.escape(name)}</td><td></td><td>{e['rps']}</td><td>{e['p50_ms']}"
                        f"</td><td>{e['p95_ms']}</td><td>{e['p99_ms']}</td><td>{e['error_rate']}</td></tr>")
    links = "".join(f'<li><a href="{p.name}">{p.name}</a></li>' for p in sorted(path.parent.glob("*.html"))
                    if p.name != path.name)
    path.write_text(
        "<html><head><meta charset='utf-8'><title>pbmigrate load test</title></head><body>"
        f"<h1>Load test {html.escape(result['started'])}</h1><p>improvement (capacity postgres / pocketbase): "
        f"<b>{result.get('improvement')}</b></p><table border=1 cellpadding=4><tr><th>backend / endpoint</th>"
        "<th>capacity rps</th><th>rps</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>error rate</th></tr>"
        + "".join(rows) + f"</table><pre>{html.escape(json.dumps(result['config'], indent=1))}</pre>"
        f"<h2>Locust reports</h2><ul>{links}</ul></body></html>")


def main() -> int:
    cfg = config()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = cfg["out"] / stamp
    work = out / "work"
    work.mkdir(parents=True)
    secret = ("pg_admin_url", "pg_url")  # URLs may carry passwords; the report is stored in pbm_meta
    result: dict[str, Any] = {"started": stamp, "config": {k: (str(v) if isinstance(v, Path) else v)
                                                           for k, v in cfg.items() if k not in secret}}
    info: dict[str, Any] = {}
    if not cfg["pg_url"]:
        t = time.monotonic()
        info = build_sample(work / "sample", rows=cfg["rows"], api_users=4)
        log(f"sample: {info['rows']} rows, {info['counts']['users']} players ({time.monotonic() - t:.0f} s)")
    with contextlib.ExitStack() as stack:
        redis_pid = None
        cfg["service_redis_url"] = cfg["redis_url"]
        if not cfg["redis_url"]:
            cfg["redis_url"], redis_pid, cfg["service_redis_url"] = stack.enter_context(
                private_redis(work, cfg["unix_sockets"]))
        try:
            if cfg["pg_url"]:
                run_existing(cfg, out, work, result, redis_pid)
            else:
                run_backends(cfg, info, out, work, result, redis_pid)
        finally:
            if not os.environ.get("KEEP_DB") and not cfg["pg_url"]:
                with psycopg.connect(cfg["pg_admin_url"], autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{cfg["database"]}" WITH (FORCE)')
    pbc = result.get("pocketbase", {}).get("capacity_rps")
    pgc = result.get("postgres", {}).get("capacity_rps")
    result["improvement"] = round(pgc / pbc, 2) if pbc and pgc else None
    shutil.rmtree(work / "sample", ignore_errors=True)
    shutil.rmtree(work / "migrate", ignore_errors=True)
    report_html(out / "report.html", result)
    path = out / "loadtest.json"
    path.write_text(json.dumps(result, indent=2))
    log(f"improvement {result['improvement']}; HTML {out / 'report.html'}")
    print(path)
    return 0


def run_backends(cfg: dict, info: dict, out: Path, work: Path, result: dict, redis_pid: int | None) -> None:
    """Migrate, start PocketBase and the service, and measure each backend in turn."""
    pg_url = fresh_database(cfg)
    redis.Redis.from_url(cfg["redis_url"]).flushdb()
    t = time.monotonic()
    run = migrate(info["pb_data"], pg_url, cfg["redis_url"], work_dir=work / "migrate")
    schema = run["staging_schema"]
    log(f"migrated into {schema} and warmed Redis ({time.monotonic() - t:.0f} s)")
    redis.Redis.from_url(cfg["redis_url"]).set("pbm:backend", "postgres")
    su = info["superuser"]
    with PocketBaseServer(info["pb_data"]) as pb:
        admin = pb.session(su["email"], su["password"])
        admin.patch("/api/settings", json={"batch": {"enabled": True, "maxRequests": 100, "timeout": 10}})
        seed = work / "seed.json"
        n = write_seed(seed, pg_url, schema, cfg["redis_url"], admin.headers["Authorization"],
                       info["player_password"], pb_collections=pb_collections(admin))
        log(f"seed: {n} players, a session each for the returning ones")
        env = {"PBG_PG_URL": local_url(pg_url, cfg["unix_sockets"]), "PBG_REDIS_URL": cfg["service_redis_url"],
               "PBG_SCHEMA": run["target_schema"], "PBG_TRUST_PROXY": "1", "PBG_POOL_MAX": "10"}
        with GameServer(env, workers=cfg["service_workers"], log_path=out / "service.log") as svc:
            measure(cfg, pb, svc, pg_url.rsplit("/", 1)[1], seed, out, result, redis_pid)


def run_existing(cfg: dict, out: Path, work: Path, result: dict, redis_pid: int | None) -> None:
    """Already migrated data (`LT_PG_URL`, `LT_SCHEMA`), PocketBase on a copy of `LT_PB_DATA`."""
    pg_url, schema, mapping = cfg["pg_url"], cfg["schema"], cfg["mapping"]
    if not schema:
        raise SystemExit("LT_SCHEMA is required with LT_PG_URL")
    t = time.monotonic()
    for section in ("profiles", "leaderboards"):  # what the DAG's cache group warms, into the private Redis
        warm_run({"params": {"mapping": mapping}, "staging_schema": schema}, section, pg_url=pg_url,
                 redis_url=cfg["redis_url"])
    redis.Redis.from_url(cfg["redis_url"]).set("pbm:backend", "postgres")
    log(f"warmed a private Redis from {schema} ({time.monotonic() - t:.0f} s)")
    with contextlib.ExitStack() as stack:
        pb: PocketBaseServer | None = None
        token = ""
        if cfg["pb_data"] and "pocketbase" in cfg["backends"]:
            src = Path(cfg["pb_data"])
            copy = work / "pb_data"
            copy.mkdir()
            shutil.copyfile(src / "data.db" if src.is_dir() else src, copy / "data.db")  # never the source itself
            pb = PocketBaseServer(copy)
            email, password = "loadtest@pbmigrate.invalid", os.urandom(12).hex()
            pb.create_superuser(email, password)
            stack.enter_context(pb)
            admin = pb.session(email, password)
            admin.patch("/api/settings", json={"batch": {"enabled": True, "maxRequests": 100, "timeout": 10}})
            token = admin.headers["Authorization"]
            known = pb_collections(admin)
        else:
            known = None
            cfg["backends"] = [b for b in cfg["backends"] if b != "pocketbase"]
        seed = work / "seed.json"
        n = write_seed(seed, pg_url, schema, cfg["redis_url"], token, "", mapping, known)
        log(f"seed: {n} players from {schema}")
        env = {"PBG_PG_URL": local_url(pg_url, cfg["unix_sockets"]), "PBG_REDIS_URL": cfg["service_redis_url"],
               "PBG_SCHEMA": schema,
               "PBG_MAPPING": mapping, "PBG_TRUST_PROXY": "1", "PBG_POOL_MAX": "10"}
        svc = stack.enter_context(GameServer(env, workers=cfg["service_workers"], log_path=out / "service.log"))
        database = psycopg.conninfo.conninfo_to_dict(pg_url).get("dbname") or "postgres"
        measure(cfg, pb, svc, str(database), seed, out, result, redis_pid)


def measure(cfg: dict, pb: PocketBaseServer | None, svc: GameServer, database: str, seed: Path, out: Path,
            result: dict, redis_pid: int | None) -> None:
    """The players run and the capacity steps of each backend in turn, into `result`."""
    assert svc.proc is not None
    hosts = {"postgres": ("service", svc.url, ServerCpu("service", [svc.proc.pid], database, redis_pid))}
    if pb is not None:
        assert pb.pid is not None
        hosts["pocketbase"] = ("pocketbase", pb.url, ServerCpu("pocketbase", [pb.pid]))
    runs = {}
    for backend in cfg["backends"]:
        target, host, cpu = hosts[backend]
        time.sleep(cfg["cooldown"])
        runs[backend] = players = players_run(cfg, target, host, seed, out, cpu)
        log(f"{backend}: {players['users']} players at {players['rps']} rps, p95 {players['p95_ms']} ms, "
            f"errors {players['error_rate']}, server CPU {players.get('server_cpu_ms_per_request')} ms/req; "
            f"Locust {players['loadgen_cores']} cores, machine {players['machine_busy_cores']} of "
            f"{players['machine_cores']}")
    caps = capacity(cfg, {b: hosts[b][:2] for b in cfg["backends"]}, seed, out)
    for backend, players in runs.items():
        cap = caps[backend]
        result[backend] = {"capacity_rps": cap["capacity_rps"], "capacity_steps": cap["steps"],
                           "players": players, **{k: players[k] for k in (
                               "rps", "p50_ms", "p95_ms", "p99_ms", "error_rate")},
                           "server_cpu_ms_per_request": players.get("server_cpu_ms_per_request"),
                           "server_cpu_ms_by_process": players.get("server_cpu_ms_by_process"),
                           "endpoints": players["endpoints"]}
        log(f"{backend}: capacity {cap['capacity_rps']} rps")


if __name__ == "__main__":
    sys.exit(main())
