"""Warm Redis from the migrated tables before cut-over (DESIGN step 5): profiles, leaderboards, live games.

Driven by the mapping file's ``cache:`` section (every key optional except the tables' columns)::

    cache:
      chunk_size: 5000          # rows per PostgreSQL fetch and per Redis round trip
      retries: 3                # per chunk, on Redis connection errors; then TargetError
      retry_backoff: 0.5        # seconds, doubled per attempt
      profiles: {table: players, id: id, fields: [display_name, level, xp, country, avatar],
                 ttl: 3600, jitter: 0.1, allow_email: false, where: null}
      leaderboards: {table: player_stats, season: season, member: player_id, score: rating,
                     top: 100, ttl: 300, where: null}
      game_state: {table: games, id: id, state: state, where: "status = 'in_progress'", ttl: null}

Rows are streamed with a server-side cursor (memory holds one chunk) and written in pipelined
chunks. Every step is idempotent: a profile is rewritten whole (DEL, HSET, EXPIRE in one script;
only the configured fields, NULLs left out), a leaderboard is built in a temp key with the
season's hash tag and RENAMEd over the old one, a game state is a plain SET. A re-run, or a
chunk replayed after a lost connection, ends in the same keys. Secret-looking profile fields
are refused before anything is read.

Speed: Python, not Redis's network, is what limits a warm-up, so the writer skips redis-py's
pipeline objects: one raw connection per Redis node, commands packed by hiredis, a chunk sent
before the previous chunk's replies are read (Redis works while Python reads PostgreSQL), and
profiles go 250 to a script call. bench/cache_warmup.py measures it (>= 100,000 keys/s on a
single Redis). On a cluster a chunk is split by slot owner and the masters work in parallel.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from itertools import chain
from typing import Any

import psycopg
import redis
from psycopg import sql
from redis.exceptions import AskError, ClusterDownError, MasterDownError, MovedError, NoScriptError, TryAgainError

from pbmigrate.audit import metrics
from pbmigrate.cache.client import RedisClient, connect, describe, is_cluster
from pbmigrate.cache.keys import (
    PATTERNS,
    SWAP_LEADERBOARD,
    GameStateSpec,
    LeaderboardSpec,
    ProfileSpec,
    check_columns,
    colocated_key,
    game_state_key,
    game_state_query,
    key_slot,
    leaderboard_key,
    leaderboard_query,
    profile_query,
)
from pbmigrate.errors import MappingError, ParamError, TargetError
from pbmigrate.plan.mapping import load_mapping

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is pinned in requirements.txt
    _hiredis_pack = None

log = logging.getLogger("pbmigrate")

SECTIONS = ("profiles", "leaderboards", "game_state")
PATTERN = {"profiles": PATTERNS["profile"], "leaderboards": PATTERNS["leaderboard"],
           "game_state": PATTERNS["game_state"]}  # section -> the key schema's pattern
KEYS_PER_SCRIPT_CALL = 250  # profiles per EVALSHA: big enough to amortise the call, small for latency
MEMBERS_PER_ZADD = 1000
RETRYABLE = (
    redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, MasterDownError, MovedError, AskError
)

# KEYS: profile keys (one slot). ARGV per key: ttl, n, then n field/value pairs. Rewrites each
# key whole; one DEL for all keys saves Redis a call per key (Redis's CPU is the bottleneck).
_PUT_PROFILES = """
redis.call('DEL', unpack(KEYS))
local i = 1
for k = 1, #KEYS do
  local ttl, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  redis.call('HSET', KEYS[k], unpack(ARGV, i, i + 2 * n - 1))
  redis.call('EXPIRE', KEYS[k], ttl)
  i = i + 2 * n
end
return #KEYS
"""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CacheConfig:
    """The mapping's ``cache:`` section, checked. A section left out is not warmed."""

    profiles: ProfileSpec | None = None
    leaderboards: LeaderboardSpec | None = None
    game_state: GameStateSpec | None = None
    chunk_size: int = 5000
    retries: int = 3
    retry_backoff: float = 0.5


def _section(doc: Any, cls: type, where: str) -> Any:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise MappingError(f"{where}: expected a mapping, got {type(doc).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise MappingError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    values = dict(doc)
    if "fields" in values:
        if isinstance(values["fields"], str) or not isinstance(values["fields"], Sequence):
            raise MappingError(f"{where}.fields: expected a list of column names")
        values["fields"] = tuple(values["fields"])
    for key in ("ttl", "top"):
        value = values.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MappingError(f"{where}.{key}: expected a positive whole number, got {value!r}")
    return cls(**values)


def parse_cache_config(doc: Mapping[str, Any] | CacheConfig | None) -> CacheConfig:
    """Check the mapping's ``cache:`` dict (errors name the key); secrets are refused here."""
    if isinstance(doc, CacheConfig):
        return doc
    doc = dict(doc or {})
    allowed = {*SECTIONS, "chunk_size", "retries", "retry_backoff"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise MappingError(f"cache: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    cfg = CacheConfig(
        profiles=_section(doc.get("profiles"), ProfileSpec, "cache.profiles"),
        leaderboards=_section(doc.get("leaderboards"), LeaderboardSpec, "cache.leaderboards"),
        game_state=_section(doc.get("game_state"), GameStateSpec, "cache.game_state"),
        chunk_size=int(doc.get("chunk_size", 5000)),
        retries=int(doc.get("retries", 3)),
        retry_backoff=float(doc.get("retry_backoff", 0.5)),
    )
    if cfg.chunk_size < 1 or cfg.retries < 0 or cfg.retry_backoff < 0:
        raise MappingError("cache: chunk_size must be >= 1, retries and retry_backoff >= 0")
    return cfg


def _section_columns(section: str, spec: Any) -> list[tuple[str, str]]:
    """(mapping key, column) pairs a section reads."""
    if section == "profiles":
        return [("id", spec.id), *(("fields", f) for f in spec.fields)]
    if section == "leaderboards":
        return [("season", spec.season), ("member", spec.member), ("score", spec.score)]
    return [("id", spec.id), ("state", spec.state)]


def check_config(conn: psycopg.Connection, schema: str, cfg: CacheConfig, mapping_source: str) -> None:
    """Every table, column and `where` the cache section names, checked against `schema` (the
    first task passes a scratch copy of the planned tables and views): a typo fails the run before
    anything loads, not in the warm-up after the load."""
    for section in SECTIONS:
        spec = getattr(cfg, section)
        if spec is None:
            continue
        where = f"mapping {mapping_source}: cache.{section}"
        check_columns(conn, schema, spec.table, _section_columns(section, spec), where)
        if spec.where:
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("SELECT 1 FROM {}.{} WHERE {} LIMIT 0").format(
                        sql.Identifier(schema), sql.Identifier(spec.table), sql.SQL(spec.where)))
            except psycopg.Error as exc:
                raise MappingError(f"{where}.where: {str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------- results


@dataclass
class WarmResult:
    """What one pattern's warm-up wrote: `keys` per the report, `items` = rows or board entries."""

    section: str
    pattern: str
    keys: int = 0
    items: int = 0
    skipped: int = 0
    seconds: float = 0.0
    configured: bool = True

    @property
    def keys_per_second(self) -> float:
        return self.keys / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "keys_per_second": round(self.keys_per_second, 1)}


def keys_by_pattern(results: Mapping[str, WarmResult]) -> dict[str, int]:
    """``{"user:{id}:profile": n, ...}``: the per-pattern report for the task log and XCom."""
    return {r.pattern: r.keys for r in results.values() if r.configured}


# --------------------------------------------------------------------------- the writer


class _Writer:
    """Sends chunks of commands with bounded retries; replays unanswered chunks (all idempotent).

    Each Redis node gets one raw connection ("lane"); a chunk is sent before the previous
    chunk's replies are read, so Redis works while Python reads PostgreSQL and builds the next
    chunk, and replies cost one C-parsed read each. On a cluster a chunk is split by the node
    that owns each command's slot, and the nodes work in parallel; after a MOVED or ASK (slots
    migrating) the slot map is reloaded and the unanswered chunks are replayed.
    """

    def __init__(self, client: RedisClient, *, retries: int, backoff: float, scripts: Sequence[str] = ()) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self.retries = retries
        self.backoff = backoff
        self.scripts = list(scripts)
        self.where = describe(client)
        self._lanes: dict[str, tuple[Any, Any]] = {}  # node name -> (its client, connection)
        self._owners: dict[int, str] = {}  # slot -> node name, from the client's slot map
        self._inflight: list[list[Any]] = []  # [commands, slots, {node name: (payload, count)} or None]
        self._retrying(lambda: None)  # loads the scripts, with the same retries as the writes

    # -- failures ----------------------------------------------------------------------------

    def _retrying(self, op: Callable[[], Any]) -> Any:
        reload = bool(self.scripts)
        for attempt in range(self.retries + 1):
            try:
                if reload:
                    for src in self.scripts:
                        self.client.script_load(src)  # on a cluster: every master
                    reload = False
                return op()
            except NoScriptError as exc:  # Redis restarted (or SCRIPT FLUSH): load again, then replay
                self._drop()
                reload = True
                if attempt == self.retries:
                    raise TargetError(f"{self.where}: scripts keep disappearing: {exc}") from exc
            except RETRYABLE as exc:
                self._drop(topology=isinstance(exc, (MovedError, AskError, ClusterDownError)))
                if attempt == self.retries:
                    raise TargetError(f"{self.where}: write failed after {attempt + 1} attempt(s): {exc}") from exc
                delay = min(self.backoff * (2**attempt), 10.0)
                log.warning("%s: %s; retry %d/%d in %.1fs", self.where, exc, attempt + 1, self.retries, delay)
                time.sleep(delay)
            except redis.ResponseError as exc:
                self._drop()
                raise TargetError(f"{self.where} refused a warm-up write: {exc}") from exc
        raise AssertionError("unreachable")

    def _drop(self, topology: bool = False) -> None:
        """Close every lane (their replies are out of step); unanswered chunks will be resent."""
        for node_client, conn in self._lanes.values():
            conn.disconnect()
            node_client.connection_pool.release(conn)
        self._lanes.clear()
        for entry in self._inflight:
            entry[2] = None
        if topology and self.cluster:
            self.client.nodes_manager.initialize()
            self._owners.clear()

    # -- sending -----------------------------------------------------------------------------

    def _lane(self, name: str) -> Any:
        if name not in self._lanes:
            node_client = self.client.get_node(node_name=name).redis_connection if self.cluster else self.client
            self._lanes[name] = (node_client, node_client.connection_pool.get_connection())
        return self._lanes[name][1]

    def _split(self, commands: list[tuple], slots: list[int] | None) -> dict[str, list[tuple]]:
        """Commands per node: the node owning the slot of each command's first key."""
        if not self.cluster:
            return {"": commands}
        if slots is None:
            slots = [key_slot(cmd[3] if cmd[0] == "EVALSHA" else cmd[1]) for cmd in commands]
        parts: dict[str, list[tuple]] = {}
        owners = self._owners
        for cmd, slot in zip(commands, slots):
            if slot not in owners:
                owners[slot] = self.client.nodes_manager.get_node_from_slot(slot).name
            parts.setdefault(owners[slot], []).append(cmd)
        return parts

    def _pack(self, name: str, commands: list[tuple]) -> bytes:
        if _hiredis_pack is not None:
            return b"".join([_hiredis_pack(c) for c in commands])
        return b"".join(self._lane(name).pack_commands(commands))

    def _pump(self, keep: int) -> None:
        for entry in self._inflight:
            if entry[2] is None:  # not sent on the current connections yet
                split = self._split(entry[0], entry[1])
                parts = {name: (self._pack(name, cmds), len(cmds)) for name, cmds in split.items()}
                for name, (payload, _) in parts.items():
                    self._lane(name).send_packed_command([payload])
                entry[2] = parts
        while len(self._inflight) > keep:
            for name, (_, count) in self._inflight[0][2].items():
                conn = self._lane(name)
                for _ in range(count):
                    conn.read_response()  # raises on an error reply
            self._inflight.pop(0)

    def send(self, commands: list[tuple], slots: list[int] | None = None) -> None:
        """Queue one chunk (`slots`: each command's slot, if the caller knows them); returns
        once all but the newest chunk are acknowledged."""
        if commands:
            self._inflight.append([commands, slots, None])
            self._retrying(lambda: self._pump(keep=1))

    def flush(self) -> None:
        """Wait until every chunk sent so far is acknowledged."""
        self._retrying(lambda: self._pump(keep=0))

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        """On success wait for the last replies; on failure drop the lanes (replies out of step)."""
        if exc_type is None:
            self.flush()
            for node_client, conn in self._lanes.values():
                node_client.connection_pool.release(conn)
            self._lanes.clear()
        else:
            self._inflight.clear()
            self._drop()

    def slot(self, key: str) -> int:
        return key_slot(key) if self.cluster else 0


# --------------------------------------------------------------------------- PostgreSQL side


@contextmanager
def _pg(pg: psycopg.Connection | str) -> Iterator[psycopg.Connection]:
    if isinstance(pg, str):
        with psycopg.connect(pg, autocommit=True) as conn:
            yield conn
    else:
        yield pg


def _stream(conn: psycopg.Connection, query: Any, chunk: int) -> Iterator[list[tuple]]:
    """Rows in chunks from a server-side cursor: memory holds one chunk whatever the table size."""
    with conn.transaction(), conn.cursor(name=f"pbm_warm_{uuid.uuid4().hex[:12]}") as cur:
        cur.itersize = chunk
        cur.execute(query, ())
        while rows := cur.fetchmany(chunk):
            yield rows


def _run(section: str, pg: psycopg.Connection | str, cfg: CacheConfig, body: Callable[..., WarmResult]) -> WarmResult:
    """Time one pattern; a URL gets a connection of its own and whole-pattern retries (idempotent)."""
    start = time.perf_counter()
    attempts = cfg.retries + 1 if isinstance(pg, str) else 1
    for attempt in range(attempts):
        try:
            with _pg(pg) as conn:
                result = body(conn)
            break
        except psycopg.OperationalError as exc:
            if attempt == attempts - 1:
                raise TargetError(f"PostgreSQL failed during the {section} warm-up: {exc}") from exc
            log.warning("PostgreSQL: %s; retrying the %s warm-up", exc, section)
            time.sleep(min(cfg.retry_backoff * (2**attempt), 10.0))
    result.seconds = round(time.perf_counter() - start, 3)
    log.info(
        "warm-up %s: %d keys (%s), %d items, %d skipped in %.2fs (%.0f keys/s)",
        section, result.keys, result.pattern, result.items, result.skipped, result.seconds, result.keys_per_second,
    )  # fmt: skip
    return result


# --------------------------------------------------------------------------- the three patterns


def warm_profiles(
    pg: psycopg.Connection | str, schema: str, config: Mapping[str, Any] | CacheConfig | None, client: RedisClient
) -> WarmResult:
    """``user:{id}:profile`` hashes of the configured public fields, TTL 1 h minus jitter.

    NULL fields are left out; a player with no public field set gets no key (counted skipped).
    """
    cfg = parse_cache_config(config)
    spec = cfg.profiles
    if spec is None:
        return WarmResult("profiles", PATTERN["profiles"], configured=False)

    def body(conn: psycopg.Connection) -> WarmResult:
        types = check_columns(conn, schema, spec.table, _section_columns("profiles", spec), "cache.profiles")
        result = WarmResult("profiles", PATTERN["profiles"])
        sha = _sha(_PUT_PROFILES)
        fields = spec.fields
        n_all, top, span, rnd = str(len(fields)), spec.ttl, spec.ttl * spec.jitter, random.random
        with _Writer(client, retries=cfg.retries, backoff=cfg.retry_backoff, scripts=[_PUT_PROFILES]) as writer:
            for rows in _stream(conn, profile_query(schema, spec, types), cfg.chunk_size):
                groups: dict[int, tuple[list[str], list[str]]] = {}
                commands: list[tuple] = []
                slots: list[int] = []
                for row in rows:
                    pid, values = row[0], row[1:]
                    if not pid:
                        result.skipped += 1
                        continue
                    key = f"user:{{{pid}}}:profile"  # profile_key(), inlined: this loop is the hot path
                    if None in values:  # NULL fields are left out of the hash
                        pairs = [x for pair in zip(fields, values) if pair[1] is not None for x in pair]
                        if not pairs:  # no public field set: no hash (Redis has no empty hash)
                            result.skipped += 1
                            continue
                        count = str(len(pairs) // 2)
                    else:
                        pairs, count = chain.from_iterable(zip(fields, values)), n_all
                    slot = writer.slot(key)
                    keys, args = groups.setdefault(slot, ([], []))
                    keys.append(key)
                    args += (str(int(top - span * rnd())), count, *pairs)  # jittered(), inlined
                    if len(keys) >= KEYS_PER_SCRIPT_CALL:
                        commands.append(("EVALSHA", sha, str(len(keys)), *keys, *args))
                        slots.append(slot)
                        keys.clear()
                        args.clear()
                for slot, (keys, args) in groups.items():
                    if keys:
                        commands.append(("EVALSHA", sha, str(len(keys)), *keys, *args))
                        slots.append(slot)
                writer.send(commands, slots)
                result.items += len(rows)
        result.keys = result.items - result.skipped
        return result

    return _run("profiles", pg, cfg, body)


def warm_leaderboards(
    pg: psycopg.Connection | str, schema: str, config: Mapping[str, Any] | CacheConfig | None, client: RedisClient
) -> WarmResult:
    """One ``leaderboard:{season}:top`` sorted set per season (top N), swapped in atomically, 5 min."""
    cfg = parse_cache_config(config)
    spec = cfg.leaderboards
    if spec is None:
        return WarmResult("leaderboards", PATTERN["leaderboards"], configured=False)

    def body(conn: psycopg.Connection) -> WarmResult:
        check_columns(conn, schema, spec.table, _section_columns("leaderboards", spec), "cache.leaderboards")
        result = WarmResult("leaderboards", PATTERN["leaderboards"])
        swap = _sha(SWAP_LEADERBOARD)
        season: str | None = None
        temp = ""
        pending: list[Any] = []
        with _Writer(client, retries=cfg.retries, backoff=cfg.retry_backoff, scripts=[SWAP_LEADERBOARD]) as writer:

            def add_chunk() -> None:
                if pending:
                    writer.send([("ZADD", temp, *pending), ("EXPIRE", temp, str(spec.ttl + 600))])
                    pending.clear()

            def finish() -> None:
                # The swap goes alone after a flush: a replayed chunk can then never rebuild a
                # temp key after its swap, so a lost reply cannot leave a partial board behind.
                add_chunk()
                writer.flush()
                writer.send([("EVALSHA", swap, "2", temp, leaderboard_key(season), str(spec.ttl))])
                writer.flush()
                result.keys += 1

            for rows in _stream(conn, leaderboard_query(schema, spec), cfg.chunk_size):
                for s, member, score in rows:
                    if s != season:
                        if season is not None:
                            finish()
                        season = s
                        temp = colocated_key(leaderboard_key(s), f"tmp:{uuid.uuid4().hex}")
                    pending += (repr(score), member)
                    result.items += 1
                    if len(pending) >= 2 * MEMBERS_PER_ZADD:
                        add_chunk()
            if season is not None:
                finish()
        return result

    return _run("leaderboards", pg, cfg, body)


def warm_game_states(
    pg: psycopg.Connection | str, schema: str, config: Mapping[str, Any] | CacheConfig | None, client: RedisClient
) -> WarmResult:
    """``game:{id}:state`` JSON of the games the `where` selects (in progress), kept until they end."""
    cfg = parse_cache_config(config)
    spec = cfg.game_state
    if spec is None:
        return WarmResult("game_state", PATTERN["game_state"], configured=False)

    def body(conn: psycopg.Connection) -> WarmResult:
        check_columns(conn, schema, spec.table, _section_columns("game_state", spec), "cache.game_state")
        result = WarmResult("game_state", PATTERN["game_state"])
        expiry = ("EX", str(spec.ttl)) if spec.ttl else ()
        with _Writer(client, retries=cfg.retries, backoff=cfg.retry_backoff) as writer:
            for rows in _stream(conn, game_state_query(schema, spec), cfg.chunk_size):
                writer.send([("SET", game_state_key(gid), state, *expiry) for gid, state in rows])
                result.items += len(rows)
        result.keys = result.items
        return result

    return _run("game_state", pg, cfg, body)


WARMERS: dict[str, Callable[..., WarmResult]] = {
    "profiles": warm_profiles,
    "leaderboards": warm_leaderboards,
    "game_state": warm_game_states,
}


def warm_all(
    pg: psycopg.Connection | str,
    schema: str,
    config: Mapping[str, Any] | CacheConfig | None,
    client: RedisClient,
    sections: Sequence[str] = SECTIONS,
) -> dict[str, WarmResult]:
    """Every configured section, in order; the config is checked once, before any write."""
    cfg = parse_cache_config(config)
    bad = [s for s in sections if s not in WARMERS]
    if bad:
        raise ParamError(f"unknown cache section(s) {bad}; known: {list(SECTIONS)}")
    return {s: WARMERS[s](pg, schema, cfg, client) for s in sections}


def warm_run(run: Mapping[str, Any], section: str, *, pg_url: str, redis_url: str) -> dict[str, Any]:
    """One task of the DAG's ``cache`` group: warm `section` from the run's staging schema.

    The config is the run's mapping file ``cache:`` section. Returns a JSON-ready report
    (counts and timings, never values) for XCom; raises TargetError once retries are spent,
    which fails the task and so blocks the cut-over.
    """
    if section not in WARMERS:
        raise ParamError(f"unknown cache section {section!r}; known: {list(SECTIONS)}")
    cache = load_mapping(run["params"]["mapping"]).cache
    cfg = parse_cache_config(cache)
    client = connect(redis_url, retries=cfg.retries)
    try:
        result = WARMERS[section](pg_url, run["staging_schema"], cfg, client)
    finally:
        client.close()
    if result.configured and run.get("run_id"):
        metrics.push_cache({result.pattern: result.keys}, run["run_id"])
    return result.as_dict()


def warm_sections(run: Mapping[str, Any], *, pg_url: str, redis_url: str, workers: int = 2) -> dict[str, Any]:
    """Every section (`warm_run` each, on its own connections), `workers` at a time in SECTIONS
    order: {section: report}. One task for all of them: as two tasks the second often waited for
    the slot the assessment still held. They mostly wait for PostgreSQL and Redis, so two threads
    take little more than the longest. The first failure is raised once every section has ended,
    so a retry never starts beside a section still writing."""
    with ThreadPoolExecutor(workers, thread_name_prefix="pbm-warm") as pool:
        futures = {s: pool.submit(warm_run, run, s, pg_url=pg_url, redis_url=redis_url) for s in SECTIONS}
    return {s: f.result() for s, f in futures.items()}


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()
