"""Incremental re-sync: keep the migrated schema current with a live PocketBase until cut-over.

PocketBase keeps no change log, so every run starts from a fresh read-only snapshot and asks it
three questions per collection:

- what changed: rows whose `updated` is at or after the stored watermark minus an overlap window
  (the window covers transactions still in flight when the last snapshot was taken);
- what disappeared: both id sets walked side by side, one id range at a time (bounded memory),
  which also finds rows that never arrived;
- for collections without an `updated` field: which id ranges hash differently on both sides
  (`compare_ranges`); only those ranges are read again, row by row.

Rows are converted exactly as the full load converts them (`Table.converters`, the same rejects),
compared with the target by row digest (the ledger's digest, junction rows included), and only
rows that differ are written: `COPY` into a temporary table, then `INSERT ... ON CONFLICT (id) DO
UPDATE`. Deletes go children first, then PocketBase's own cascade and unset semantics come from the
foreign keys. Dangling relations and duplicates follow the migration's `orphans` policy, as in
`finalize`. Everything, watermarks and the figures in `pbm_meta.resyncs` included, is one
transaction with deferred constraints: a run lands whole or not at all.

A re-sync and a migration never write the same target at once (`target_lock`), and after a
cut-over PostgreSQL is the source of truth, so the re-sync refuses unless forced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from hashlib import md5
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from pbmigrate import checksum
from pbmigrate import files as files_sync
from pbmigrate.audit import meta, metrics
from pbmigrate.audit.guard import TargetBusy, target_lock  # noqa: F401 - part of this module's API
from pbmigrate.audit.meta import cut_over_in_effect
from pbmigrate.context import safe_name
from pbmigrate.errors import ParamError, PbmError, Refused
from pbmigrate.load import ledger, pgcopy
from pbmigrate.load.columnar.batch import reject_all
from pbmigrate.pgsql import qi
from pbmigrate.plan.convert import Reject, multi, parse_datetime
from pbmigrate.plan.mapping import load_mapping
from pbmigrate.plan.model import Junction, Plan, Table, build_plan
from pbmigrate.source import Source, open_source
from pbmigrate.source.snapshot import resolve_data_db, take_snapshot
from pbmigrate.source.sqlite import SqliteSource, select_sql
from pbmigrate.source.sqlite import qi as qi_sqlite

log = logging.getLogger("pbmigrate.sync")

DEFAULT_OVERLAP_SECONDS = 300
RANGE_ROWS = 20_000  # ids per compared range: what one step of the walk holds in memory
WRITE_ROWS = 5_000  # rows converted, compared and written at a time
UNLOADED_STATUSES = frozenset({"running", "failed", "rolled_back", "rolledback"})
REJECT_STAGES = ("load", "finalize", "resync")  # rejects a re-sync may clear or replace



class ResyncRefused(Refused):
    """The re-sync must not run against this target now (cut over, nothing loaded, params differ)."""


class TargetCutOver(ResyncRefused):
    """The target was cut over: PostgreSQL is the source of truth, there is nothing to re-sync.

    Its own class so a scheduled run can end as skipped (a state, not a fault) while every other
    refusal still fails."""


# --- meta, lock and target --------------------------------------------------------------------


@dataclass(frozen=True)
class SyncTarget:
    """Where a re-sync writes: the latest migration run of a target and the schema it loaded."""

    run_id: str
    target_schema: str
    schema: str  # the schema written: staging before cut-over, the live one when forced after
    staging_schema: str
    status: str
    cut_over: bool
    params: dict
    run: dict  # the migration's run dict (pipeline), for the tasks after a final re-sync


def _schema_exists(conn: psycopg.Connection, schema: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def resolve_target(conn: psycopg.Connection, target_schema: str, *, force: bool = False) -> SyncTarget:
    """The schema a re-sync may write, or ResyncRefused saying why not."""
    row = conn.execute(
        """SELECT run_id, dag_run_id, staging_schema, status, params, source, source_kind, snapshot_path, started_at
             FROM pbm_meta.runs WHERE target_schema = %s ORDER BY started_at DESC LIMIT 1""",
        (target_schema,),
    ).fetchone()
    if row is None:
        raise ResyncRefused(f"no migration has loaded target {target_schema!r} yet: run pocketbase_migration "
                            "first (a re-sync keeps a loaded schema current, it does not create one)")
    run_id, dag_run_id, staging, status, params, source, kind, snapshot, started_at = row
    cut = cut_over_in_effect(conn, target_schema)
    # A migration started after the cut-over loaded a new staging schema: re-syncing that one
    # leaves the live schema alone, so the earlier cut-over does not stand in its way.
    newer_load = cut is not None and status != "promoted" and started_at > cut["at"]
    cut_over = status == "promoted" or (cut is not None and not newer_load)
    run = {"run_id": run_id, "dag_run_id": dag_run_id, "target_schema": target_schema, "staging_schema": staging,
           "source": source, "source_kind": kind, "snapshot_path": snapshot, "params": params, "resumed": True}
    if cut_over:
        when = f" at {cut['at']:%Y-%m-%d %H:%M:%S %Z} (run {cut['run_id']})" if cut is not None else ""
        if not force:
            raise TargetCutOver(
                f"target {target_schema!r} was cut over to PostgreSQL{when}: PocketBase is no longer "
                "the source of truth, and a re-sync would overwrite newer PostgreSQL data with PocketBase's. "
                "Pause pocketbase_resync; set the param force=true only if PocketBase is still the system "
                "being written (for example after the flag was flipped back)")
        schema = target_schema
        log.warning("target %s is cut over, re-sync forced: writing the live schema %s", target_schema, schema)
    else:
        if status in UNLOADED_STATUSES:
            raise ResyncRefused(f"the latest migration run {run_id} of target {target_schema!r} has status "
                                f"{status!r}: its load is not complete, so there is nothing to re-sync yet")
        schema = staging
    if not _schema_exists(conn, schema):
        raise ResyncRefused(f"schema {schema!r} of run {run_id} (status {status!r}) does not exist: "
                            "it was dropped or rolled back; run a new full migration")
    return SyncTarget(run_id, target_schema, schema, staging, status, cut_over, params, run)


def recorded_params(target: SyncTarget, *, source_path: str | None, mapping: str | None,
                    collections: list[str] | None) -> tuple[str, str, list[str]]:
    """Each param left None takes the value the migration that built the target ran with.

    A scheduled run has no conf: this is how it re-syncs the right source with the right mapping.
    """
    p = target.params
    chosen = (p.get("source_path", "") if source_path is None else source_path,
              p.get("mapping", "") if mapping is None else mapping,
              list(p.get("collections") or []) if collections is None else list(collections))
    taken = [name for name, given in (("source_path", source_path), ("mapping", mapping),
                                      ("collections", collections)) if given is None]
    if taken:
        log.info("as migration run %s ran: %s", target.run_id,
                 ", ".join(f"{k}={v!r}" for k, v in zip(("source_path", "mapping", "collections"), chosen)
                           if k in taken))
    return chosen


def check_params(target: SyncTarget, *, mapping: str, collections: list[str] | None) -> None:
    """The re-sync must shape rows as the migration that built the schema did."""
    want = {"mapping": mapping or "", "collections": sorted(collections or [])}
    have = {"mapping": target.params.get("mapping", ""), "collections": sorted(target.params.get("collections") or [])}
    for key, value in want.items():
        if value != have[key]:
            raise ResyncRefused(f"param {key}={value!r} differs from the migration run {target.run_id} that built "
                                f"{target.schema!r} ({key}={have[key]!r}); use the same value")


def check_schema(conn: psycopg.Connection, schema: str, plan: Plan) -> None:
    """Refuse when the PocketBase schema moved since the full load (new fields or collections)."""
    cols: dict[str, list[str]] = {}
    for table, column in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s "
            "ORDER BY table_name, ordinal_position", (schema,)):
        cols.setdefault(table, []).append(column)
    for t in plan.tables:
        expected = {t.name: t.column_names, **{j.table: [j.owner, j.target, "position"] for j in t.junctions}}
        for name, columns in expected.items():
            have = cols.get(name)
            if have is None:
                raise ResyncRefused(f"{t.collection.name}: table {schema}.{name} does not exist; the PocketBase "
                                    "schema changed since the full load: run a new full migration")
            if sorted(have) != sorted(columns):
                raise ResyncRefused(
                    f"{t.collection.name}: {schema}.{name} has columns {sorted(have)} but the PocketBase schema now "
                    f"maps to {sorted(columns)}; the schema changed since the full load: run a new full migration")


# --- results ----------------------------------------------------------------------------------


@dataclass
class CollectionResult:
    """What one re-sync did to one collection; the same figures go to pbm_meta.resyncs."""

    collection: str
    table: str
    mode: str  # "updated" (watermark) or "checksum" (per-range checksums)
    rows_read: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    rejected: int = 0
    ranges_compared: int = 0
    ranges_recopied: int = 0
    since: str | None = None
    watermark: str | None = None
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.inserted + self.updated + self.deleted

    def log_line(self) -> str:
        how = (f"rows updated since {self.since or 'the beginning'}" if self.mode == "updated"
               else f"{self.ranges_recopied} of {self.ranges_compared} ranges differed")
        return (f"{self.collection} -> {self.table}: inserted {self.inserted:,}, updated {self.updated:,}, "
                f"deleted {self.deleted:,}, rejected {self.rejected:,} (read {self.rows_read:,}; {how}; "
                f"{self.seconds:.2f} s)")


@dataclass
class RangeDiff:
    """One id range (after, upto] compared on both sides; `equal` after dangling ids are explained."""

    after: str | None
    upto: str | None
    source_rows: int  # every record the source holds in the range
    target_rows: int
    source_sum: str  # of the rows the target should hold (source rows less rejects)
    target_sum: str
    rejected: int = 0  # source rows recorded as rejects of the run: the target must not hold them
    missing: int = 0  # in the source (and not rejected), not in the target
    extra: int = 0  # in the target, not in the source
    changed: int = 0  # in both, different values
    examples: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.missing == self.extra == self.changed == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "equal": self.equal}


# --- reading the source -----------------------------------------------------------------------


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def _id_chunks(source: Source, table: Table, n: int) -> Iterator[list[str]]:
    if isinstance(source, SqliteSource):  # the covering index, no row lookups
        cur = source.conn.execute(f"SELECT id FROM {qi_sqlite(table.collection.name)} ORDER BY id")
        while chunk := cur.fetchmany(n):
            yield [r[0] for r in chunk]
    else:
        yield from _chunks(source.ids(table.collection), n)


def _row_chunks(source: Source, table: Table, n: int) -> Iterator[list[tuple]]:
    if isinstance(source, SqliteSource):
        cur = source.conn.execute(select_sql(table.collection) + " ORDER BY id")
        while chunk := cur.fetchmany(n):
            yield chunk
    else:
        yield from _chunks(source.rows(table.collection), n)


def _changed_rows(source: Source, table: Table, pos: int, since: str) -> Iterator[tuple]:
    """Rows whose `updated` >= since, in no particular order (a sort would cost a lookup per row)."""
    name = table.collection.fields[pos].name
    if isinstance(source, SqliteSource):
        cur = source.conn.execute(f"{select_sql(table.collection)} WHERE {qi_sqlite(name)} >= ?", (since,))
        while chunk := cur.fetchmany(WRITE_ROWS):
            yield from chunk
    else:
        for row in source.rows(table.collection):
            if row[pos] is not None and str(row[pos]) >= since:
                yield row


def _rows_referencing(source: Source, table: Table, field_name: str, multi: bool, ids: list[str]
                      ) -> Iterator[tuple]:
    """Rows whose relation `field_name` holds one of `ids` (a JSON array when `multi`)."""
    pos = next(i for i, f in enumerate(table.collection.fields) if f.name == field_name)
    if isinstance(source, SqliteSource):
        col = qi_sqlite(field_name)
        for part in _chunks(ids, 500):
            marks = ",".join("?" * len(part))
            where = (f"EXISTS (SELECT 1 FROM json_each(CASE WHEN json_valid({col}) THEN {col} ELSE '[]' END) "
                     f"WHERE value IN ({marks}))" if multi else f"{col} IN ({marks})")
            yield from source.conn.execute(f"{select_sql(table.collection)} WHERE {where}", part)
        return
    wanted = set(ids)
    for row in source.rows(table.collection):
        value = row[pos]
        if multi and isinstance(value, str) and value.startswith("["):
            if wanted.intersection(json.loads(value)):
                yield row
        elif value in wanted:
            yield row


def _rows_by_ids(source: Source, table: Table, ids: list[str]) -> Iterator[tuple]:
    if isinstance(source, SqliteSource):
        for part in _chunks(ids, 500):
            marks = ",".join("?" * len(part))
            yield from source.conn.execute(f"{select_sql(table.collection)} WHERE id IN ({marks})", part)
    else:
        for rid in ids:
            yield from source.rows(table.collection, rid, rid)


def pb_timestamp(dt: datetime) -> str:
    """PocketBase's own text form, `YYYY-MM-DD HH:MM:SS.sssZ`, which compares correctly as text."""
    dt = dt.astimezone(UTC)
    return f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond // 1000:03d}Z"


# --- one table ------------------------------------------------------------------------------


@dataclass
class _Item:
    id: str
    row: tuple
    out: list
    jrows: list[list[tuple[int, str]]]  # per junction: (position, target id)
    digest: int = 0
    reasons: list[tuple[str, str]] = field(default_factory=list)  # dangling relations found


def _range_where(col: str, after: str | None, upto: str | None) -> str:
    parts = []
    if after is not None:
        parts.append(f"{col} > (%(after)s::text COLLATE \"C\")")
    if upto is not None:
        parts.append(f"{col} <= (%(upto)s::text COLLATE \"C\")")
    return " AND ".join(parts) or "true"


class _TableSync:
    """Converts, compares and writes the rows of one collection inside the re-sync transaction."""

    def __init__(self, run: _Run, table: Table):
        self.run, self.conn, self.table = run, run.conn, table
        self.s = qi(run.schema)
        self.t = f"{self.s}.{qi(table.name)}"
        self.name = table.collection.name
        self.convs = table.converters(run.has_secrets)
        self.canons = [checksum.PY_CANON[c.canon] for c in table.columns]
        self.jconvs = [multi(j.field) for j in table.junctions]
        self.pairs = list(zip(self.convs, [c.position for c in table.columns]))
        self.id_pos = next(c.position for c in table.columns if c.field.name == "id")
        self.id_col = next(i for i, c in enumerate(table.columns) if c.field.name == "id")
        self.refs = [(i, fk, c.nullable) for fk in table.foreign_keys
                     for i, c in enumerate(table.columns) if c.name == fk.column]
        self.jrefs = [(k, j) for k, j in enumerate(table.junctions) if j.target_table]
        self.temp: str | None = None
        uf = table.collection.updated_field
        self.updated_pos: int | None = None  # where `updated` sits in a source row
        self.updated_col: str | None = None
        if uf is not None:
            col = next((c for c in table.columns if c.field.name == uf.name), None)
            if col is not None:
                self.updated_pos = col.position
                self.updated_col = col.name
        mode = "updated" if self.updated_pos is not None else "checksum"
        self.result = CollectionResult(self.name, table.name, mode)
        self.rejected: dict[str, set[tuple[str, str]]] = {}
        for rid, fname, reason in self.conn.execute(
                "SELECT record_id, field, reason FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s "
                "AND stage = ANY(%s) AND record_id IS NOT NULL", (run.run_id, self.name, list(REJECT_STAGES))):
            self.rejected.setdefault(rid, set()).add((fname, reason))
        self.seen_rejected: set[str] = set()
        self.max_updated: str | None = None
        cols = ", ".join(qi(c) for c in table.column_names)
        self.cols = cols

    # conversion and digests

    def convert(self, row: tuple) -> _Item | list[tuple[str, str]]:
        try:
            out = [conv(row[pos]) for conv, pos in self.pairs]
            jrows = [list(enumerate(m(row[j.position]))) for j, m in zip(self.table.junctions, self.jconvs)]
        except Reject:
            return reject_all(row, self.table, self.convs)
        item = _Item(str(row[self.id_pos]), row, out, jrows)
        item.digest = self.digest(item)
        return item

    def digest(self, item: _Item) -> int:
        total = checksum.digest(checksum.row_canon(self.canons, item.out))
        for j, rows in zip(self.table.junctions, item.jrows):
            if rows:  # one digest per owner over its targets in position order
                total += checksum.junction_digest(j.table, item.id, [target for _, target in rows])
        return checksum.fold(total)

    def _digest_sql(self, row_where: str, j_where: str) -> str:
        parts = [f"({ledger.row_digest_sql(self.table, 'x')})::numeric"]
        joins = []
        for k, j in enumerate(self.table.junctions):
            owner = f"x.{qi(j.owner)}"
            joins.append(
                f"LEFT JOIN (SELECT {owner} AS o, {ledger.junction_digest_sql(j, 'x')} AS s "
                f"FROM {self.s}.{qi(j.table)} x WHERE {j_where.format(col=owner)} GROUP BY 1) j{k} ON j{k}.o = x.id")
            parts.append(f"coalesce(j{k}.s, 0)")
        return (f"SELECT x.id, {' + '.join(parts)} AS d FROM {self.t} x {' '.join(joins)} "
                f"WHERE {row_where.format(col='x.id')}")

    def target_digests(self, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        sql = self._digest_sql("{col} = ANY(%(ids)s)", "{col} = ANY(%(ids)s)")
        return {rid: checksum.fold(int(d)) for rid, d in self.conn.execute(sql, {"ids": ids})}

    def range_digests(self, after: str | None, upto: str | None) -> dict[str, int]:
        where = _range_where("{col}", after, upto)
        sql = self._digest_sql(where, where)
        return {rid: checksum.fold(int(d)) for rid, d in self.conn.execute(sql, {"after": after, "upto": upto})}

    def range_sum(self, after: str | None, upto: str | None) -> tuple[int, int]:
        where = _range_where("{col}", after, upto)
        sql = f"SELECT count(*), coalesce(sum(d), 0) FROM ({self._digest_sql(where, where)}) q"
        n, total = self.conn.execute(sql, {"after": after, "upto": upto}).fetchone()
        return n, checksum.fold(int(total))

    # dangling relations, by the migration's orphans policy (as finalize decides them)

    def _existing(self, table_name: str, values: set[str]) -> set[str]:
        if not values:
            return set()
        rows = self.conn.execute(f"SELECT id FROM {self.s}.{qi(table_name)} WHERE id = ANY(%s)", (list(values),))
        return {r[0] for r in rows}

    def explain_dangling(self, items: list[_Item], batch_ids: set[str] | None = None) -> None:
        """What the target holds for these rows once dangling ids are nulled or the row rejected."""
        if not items or not (self.refs or self.jrefs):
            return
        null_mode = self.run.orphans == "null"
        dirty: set[int] = set()
        for ci, fk, nullable in self.refs:
            values = {it.out[ci] for it in items if it.out[ci] is not None}
            exist = self._existing(fk.target_table, values)
            if batch_ids and fk.target_table == self.table.name:
                exist |= batch_ids
            for n, it in enumerate(items):
                v = it.out[ci]
                if v is None or v in exist:
                    continue
                if null_mode and nullable:
                    it.out[ci] = None
                    dirty.add(n)
                else:
                    it.reasons.append((fk.field, f"dangling relation: {fk.field} points at a missing "
                                                 f"{fk.target_table} record"))
        for k, j in self.jrefs:
            values = {tgt for it in items for _, tgt in it.jrows[k]}
            exist = self._existing(j.target_table or "", values)
            if batch_ids and j.target_table == self.table.name:
                exist |= batch_ids
            for n, it in enumerate(items):
                kept = [(p, tgt) for p, tgt in it.jrows[k] if tgt in exist]
                if len(kept) == len(it.jrows[k]):
                    continue
                if null_mode:
                    it.jrows[k] = kept
                    dirty.add(n)
                else:
                    it.reasons.append((j.field.name, f"dangling relation: {j.field.name} holds an id missing "
                                                      f"from {j.target_table}"))
        for n in dirty:
            items[n].digest = self.digest(items[n])

    # the write path

    def apply(self, rows: Iterable[tuple], *, track_updated: bool = False) -> None:
        for chunk in _chunks(rows, WRITE_ROWS):
            self._apply_chunk(chunk, track_updated)

    def _apply_chunk(self, rows: list[tuple], track_updated: bool) -> None:
        items: list[_Item] = []
        rejects: dict[str, list[tuple[str, str]]] = {}
        up = self.updated_pos
        for row in rows:
            self.result.rows_read += 1
            if track_updated and up is not None and row[up] and (
                    self.max_updated is None or str(row[up]) > self.max_updated):
                self.max_updated = str(row[up])
            got = self.convert(row)
            if isinstance(got, _Item):
                items.append(got)
            else:
                rejects[str(row[self.id_pos])] = got
        current = self.target_digests([it.id for it in items] + list(rejects))
        differing = [it for it in items if current.get(it.id) != it.digest]
        if differing and (self.refs or self.jrefs):
            # Would the target hold exactly this once dangling ids are settled? Then nothing to write.
            probe = [_Item(it.id, it.row, list(it.out), [list(r) for r in it.jrows]) for it in differing]
            self.explain_dangling(probe, {it.id for it in items})
            unchanged = set()
            for it, p in zip(differing, probe):
                if p.reasons and set(p.reasons) == self.rejected.get(it.id) and it.id not in current:
                    unchanged.add(it.id)  # still rejected for the same reason
                elif not p.reasons and current.get(it.id) == p.digest:
                    unchanged.add(it.id)  # the target holds it with the dangling id settled
            differing = [it for it in differing if it.id not in unchanged]
        self._write(differing)
        if rejects:
            self._reject(rejects, present={rid for rid in rejects if rid in current})

    def _temp(self) -> str:
        if self.temp is None:
            self.temp = f"pbm_rows_{self.run.next_temp()}"
            self.conn.execute(f"CREATE TEMP TABLE {self.temp} (LIKE {self.t}) ON COMMIT DROP")
        return self.temp

    def _upsert_sql(self, where: str = "") -> str:
        sets = ", ".join(f"{qi(c)} = EXCLUDED.{qi(c)}" for c in self.table.column_names if c != "id")
        action = f"DO UPDATE SET {sets}" if sets else "DO NOTHING"
        return (f"INSERT INTO {self.t} ({self.cols}) SELECT {self.cols} FROM {self._temp()} {where} "
                f"ON CONFLICT (id) {action} RETURNING id, (xmax = 0)")

    def _write(self, items: list[_Item]) -> None:
        if not items:
            return
        temp = self._temp()
        self.conn.execute(f"TRUNCATE {temp}")
        binary = pgcopy.can_use_binary(self.table)  # as the loader: typed, nothing parsed
        if binary:
            pgcopy.register(self.conn)
        sql = f"COPY {temp} ({self.cols}) FROM STDIN" + (" (FORMAT BINARY)" if binary else "")
        points = [] if binary else [i for i, c in enumerate(self.table.columns) if c.type == "point"]
        with self.conn.cursor() as cur, cur.copy(sql) as copy:
            if binary:
                copy.set_types([c.type for c in self.table.columns])
            for it in items:
                out = it.out
                if points:
                    out = list(out)
                    for i in points:
                        out[i] = f"({out[i][0]!r},{out[i][1]!r})"
                copy.write_row(out)
        try:
            with self.conn.transaction():
                done = self.conn.execute(self._upsert_sql()).fetchall()
        except pgerrors.UniqueViolation:
            done, dupes = self._write_one_by_one(items)
            if dupes:
                present = set(self.target_digests(list(dupes)))
                self._reject(dupes, present)
        by_id = {it.id: it for it in items}
        written = [by_id[rid] for rid, _ in done]
        inserted = sum(1 for _, ins in done if ins)
        self.result.inserted += inserted
        self.result.updated += len(done) - inserted
        self._replace_junctions(written)
        self.run.record_written(self.table.name, done)
        cleared = [it.id for it in written if it.id in self.rejected]
        if cleared:
            self.conn.execute(
                "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND record_id = ANY(%s) "
                "AND stage = ANY(%s)", (self.run.run_id, self.name, cleared, list(REJECT_STAGES)))
            for rid in cleared:
                del self.rejected[rid]
            self.run.revived.setdefault(self.table.name, []).extend(cleared)

    def _write_one_by_one(self, items: list[_Item]) -> tuple[list[tuple[str, bool]], dict[str, list]]:
        """A unique index refused the batch: write row by row (a later row may free a value an
        earlier one needs), and reject what still collides, keeping the row already in the target."""
        sql = self._upsert_sql("WHERE id = %s")
        pending = [it.id for it in items]
        done: list[tuple[str, bool]] = []
        failed: dict[str, str] = {}
        progress = True
        while pending and progress:
            progress, still = False, []
            for rid in pending:
                try:
                    with self.conn.transaction():
                        done.extend(self.conn.execute(sql, (rid,)).fetchall())
                    progress = True
                except pgerrors.UniqueViolation as exc:
                    failed[rid] = exc.diag.constraint_name or "?"
                    still.append(rid)
            pending = still
        indexes = {i.name: i for i in self.table.indexes}
        dupes = {}
        for rid in pending:
            name = failed[rid]
            idx = indexes.get(name)
            fname = ",".join(idx.columns) if idx else "id"
            dupes[rid] = [(fname, f"duplicate value under unique index {name} (the row already in the target "
                                  "was kept)")]
        return done, dupes

    def _replace_junctions(self, written: list[_Item]) -> None:
        if not written or not self.table.junctions:
            return
        ids = [it.id for it in written]
        for k, j in enumerate(self.table.junctions):
            self.conn.execute(f"DELETE FROM {self.s}.{qi(j.table)} WHERE {qi(j.owner)} = ANY(%s)", (ids,))
            sql = f"COPY {self.s}.{qi(j.table)} ({qi(j.owner)}, {qi(j.target)}, position) FROM STDIN"
            with self.conn.cursor() as cur, cur.copy(sql) as copy:
                for it in written:
                    for pos, target in it.jrows[k]:
                        copy.write_row((it.id, target, pos))

    def _reject(self, rejects: dict[str, list[tuple[str, str]]], present: set[str]) -> None:
        """Record rejects (stage 'resync'); a rejected row's old version leaves the target."""
        changed = {rid: rs for rid, rs in rejects.items() if set(rs) != self.rejected.get(rid)}
        if changed:
            self.conn.execute(
                "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND record_id = ANY(%s) "
                "AND stage = ANY(%s)", (self.run.run_id, self.name, list(changed), list(REJECT_STAGES)))
            with self.conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO pbm_meta.rejects (run_id, collection, record_id, field, reason, stage) "
                    "VALUES (%s, %s, %s, %s, %s, 'resync')",
                    [(self.run.run_id, self.name, rid, f, r) for rid, rs in changed.items() for f, r in rs])
            self.result.rejected += len(changed)
            for rid, rs in changed.items():
                self.rejected[rid] = set(rs)
        if present:
            self.run.doom(self.table.name, sorted(present), "rejected")
            self.result.rejected += len(present - set(changed))

    # walking both id sets

    def _target_ids(self, after: str | None, upto: str | None) -> list[str]:
        where = _range_where("id", after, upto)
        return [r[0] for r in self.conn.execute(f"SELECT id FROM {self.t} WHERE {where} ORDER BY id",
                                                {"after": after, "upto": upto})]

    def _target_ids_hash(self, after: str | None, upto: str | None) -> tuple[int, str]:
        """Count and md5 of a range's ids (length-prefixed, in C order): 40 bytes instead of the ids."""
        where = _range_where("id", after, upto)
        n, digest = self.conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(length(id) || ':' || id, '' ORDER BY id), '')) "
            f"FROM {self.t} WHERE {where}", {"after": after, "upto": upto}).fetchone()
        return n, digest

    def _target_tail(self, after: str | None) -> Iterator[list[str]]:
        while True:
            where = _range_where("id", after, None)
            ids = [r[0] for r in self.conn.execute(
                f"SELECT id FROM {self.t} WHERE {where} ORDER BY id LIMIT {RANGE_ROWS}", {"after": after})]
            if not ids:
                return
            yield ids
            after = ids[-1]

    def settled_reject(self, rid: str, *, retry_duplicates: bool = False) -> bool:
        """A reject only a change to the row itself can lift (a bad value). Rows rejected for a
        dangling relation are looked at again (their parent may arrive), and so, in the id walk,
        are duplicates (two records that swapped unique values land one run later)."""
        reasons = self.rejected.get(rid)
        if reasons is None:
            return False
        retry = ("dangling relation", "duplicate value") if retry_duplicates else ("dangling relation",)
        return not all(r.startswith(retry) for _, r in reasons)

    def _note_rejected(self, ids: Iterable[str]) -> None:
        if self.rejected:
            self.seen_rejected.update(self.rejected.keys() & set(ids))

    def walk_ids(self, source: Source, range_rows: int) -> None:
        """Compare both id sets range by range: extra target ids are deletes, missing ones are copied."""
        after = None
        for chunk in _id_chunks(source, self.table, range_rows):
            upto = chunk[-1]
            self.result.ranges_compared += 1
            self._note_rejected(chunk)
            n, digest = self._target_ids_hash(after, upto)
            if n == len(chunk) and digest == md5("".join(f"{len(i)}:{i}" for i in chunk).encode()).hexdigest():
                after = upto
                continue
            target = self._target_ids(after, upto)
            if target != chunk:
                src, tgt = set(chunk), set(target)
                extra = sorted(tgt - src)
                if extra:
                    self.run.doom(self.table.name, extra, "deleted")
                    self.result.deleted += len(extra)
                missing = sorted(rid for rid in src - tgt if not self.settled_reject(rid, retry_duplicates=True))
                if missing:
                    self.apply(_rows_by_ids(source, self.table, missing))
            after = upto
        for extra in self._target_tail(after):
            self.run.doom(self.table.name, extra, "deleted")
            self.result.deleted += len(extra)

    def compare(self, source: Source, range_rows: int, *, repair: bool) -> Iterator[RangeDiff]:
        """Per-range checksums of source and target; with `repair`, copy the ranges that differ."""
        after = None
        for rows in _row_chunks(source, self.table, range_rows):
            upto = str(rows[-1][self.id_pos])
            yield self._compare_range(source, rows, after, upto, repair)
            after = upto
        n, target_sum = self.range_sum(after, None)  # target ids past the last source id: all extra
        if n:
            self.result.ranges_compared += 1
            diff = RangeDiff(after, None, 0, n, checksum.as_hex(0), checksum.as_hex(target_sum), extra=n)
            for part in self._target_tail(after):
                diff.examples = (diff.examples + part)[:5]
                if repair:
                    self.run.doom(self.table.name, part, "deleted")
                    self.result.deleted += len(part)
            if repair:
                self.result.ranges_recopied += 1
            yield diff

    def _compare_range(self, source: Source, rows: list[tuple], after: str | None, upto: str, repair: bool
                       ) -> RangeDiff:
        self.result.ranges_compared += 1
        entries: list[tuple[str, _Item | None, tuple]] = []
        retry: list[_Item] = []  # rejected for a dangling relation: has the parent arrived?
        unrecorded: list[tuple[str, tuple]] = []  # no longer converts, and no reject says so yet
        total = expected = rejected = 0
        for row in rows:
            rid = str(row[self.id_pos])
            if rid in self.rejected:
                self.seen_rejected.add(rid)
                rejected += 1
                if not self.settled_reject(rid):
                    got = self.convert(row)
                    if isinstance(got, _Item):
                        retry.append(got)
                entries.append((rid, None, row))
                continue
            got = self.convert(row)
            if isinstance(got, _Item):
                total += got.digest
                expected += 1
                entries.append((rid, got, row))
            else:
                unrecorded.append((rid, row))
                entries.append((rid, None, row))
        n, target_sum = self.range_sum(after, upto)
        diff = RangeDiff(after, upto, len(rows), n, checksum.as_hex(total), checksum.as_hex(target_sum),
                         rejected=rejected)
        todo: list[tuple] = []
        if retry:
            probe = [_Item(it.id, it.row, list(it.out), [list(r) for r in it.jrows]) for it in retry]
            self.explain_dangling(probe, {rid for rid, it, _ in entries if it is not None})
            for it, p in zip(retry, probe):
                if not p.reasons:  # loadable now
                    diff.missing += 1
                    todo.append(it.row)
                    diff.examples.append(it.id)
        for rid, row in unrecorded:
            diff.missing += 1
            todo.append(row)
            diff.examples.append(rid)
        extra: list[str] = []
        if n != expected or target_sum != checksum.fold(total):
            current = self.range_digests(after, upto)
            differing = [it for _, it, _ in entries if it is not None and current.get(it.id) != it.digest]
            probe = [_Item(it.id, it.row, list(it.out), [list(r) for r in it.jrows]) for it in differing]
            self.explain_dangling(probe, {rid for rid, it, _ in entries if it is not None})
            for it, p in zip(differing, probe):
                if not p.reasons and current.get(it.id) == p.digest:
                    continue  # the target holds it with the dangling id settled by the orphans policy
                if it.id in current and not p.reasons:
                    diff.changed += 1
                else:
                    diff.missing += 1
                todo.append(it.row)
                diff.examples.append(it.id)
            extra = sorted(set(current) - {rid for rid, _, _ in entries})
            diff.extra = len(extra)
        diff.examples = (diff.examples + extra)[:5]
        if repair and not diff.equal:
            self.result.ranges_recopied += 1
            if extra:
                self.run.doom(self.table.name, extra, "deleted")
                self.result.deleted += len(extra)
            self.apply(todo)
        return diff

    def finish_rejects(self) -> None:
        """Rejects of records that are gone from the source: nothing is left to reject."""
        gone = sorted(self.rejected.keys() - self.seen_rejected)
        if gone:
            self.conn.execute(
                "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND record_id = ANY(%s) "
                "AND stage = ANY(%s)", (self.run.run_id, self.name, gone, list(REJECT_STAGES)))
            for rid in gone:
                del self.rejected[rid]


# --- the run ---------------------------------------------------------------------------------


def _order(plan: Plan) -> list[Table]:
    """Parents before children (foreign keys and junction targets); cycles broken by name."""
    deps = {t.name: {fk.target_table for fk in t.foreign_keys} | {j.target_table for j in t.junctions
                                                                   if j.target_table} for t in plan.tables}
    names = set(deps)
    for name in names:
        deps[name] = (deps[name] & names) - {name}
    ordered: list[str] = []
    while deps:
        ready = sorted(n for n, d in deps.items() if not d) or [sorted(deps)[0]]
        for n in ready:
            ordered.append(n)
            del deps[n]
        for d in deps.values():
            d.difference_update(ready)
    return [plan.table_named(n) for n in ordered]


@dataclass
class _Ref:
    """A reference into a table: a single relation column, or a junction's target column."""

    child: Table
    column: str
    nullable: bool
    on_delete: str
    field: str
    junction: Junction | None = None


class _Run:
    """State of one re-sync transaction: the doomed and written ids, in temporary tables."""

    def __init__(self, conn: psycopg.Connection, schema: str, run_id: str, orphans: str, has_secrets: bool,
                 plan: Plan):
        self.conn, self.schema, self.run_id, self.orphans = conn, schema, run_id, orphans
        self.has_secrets, self.plan = has_secrets, plan
        self.s = qi(schema)
        self._temps = 0
        self.incoming: dict[str, list[_Ref]] = {t.name: [] for t in plan.tables}
        for t in plan.tables:
            for fk in t.foreign_keys:
                col = next(c for c in t.columns if c.name == fk.column)
                if fk.target_table in self.incoming:
                    self.incoming[fk.target_table].append(_Ref(t, fk.column, col.nullable, fk.on_delete, fk.field))
            for j in t.junctions:
                if j.target_table in self.incoming:
                    self.incoming[j.target_table].append(_Ref(t, j.target, True, "CASCADE", j.field.name, j))
        conn.execute('CREATE TEMP TABLE pbm_doomed (tbl text, id text COLLATE "C", why text, done boolean '
                     'NOT NULL DEFAULT false, PRIMARY KEY (tbl, id)) ON COMMIT DROP')
        conn.execute('CREATE TEMP TABLE pbm_written (tbl text, id text COLLATE "C", inserted boolean, '
                     'PRIMARY KEY (tbl, id)) ON COMMIT DROP')
        self.syncs: dict[str, _TableSync] = {}
        self.revived: dict[str, list[str]] = {}  # table -> ids whose reject was lifted in this run

    def next_temp(self) -> int:
        self._temps += 1
        return self._temps

    def doom(self, table: str, ids: list[str], why: str) -> None:
        with self.conn.cursor() as cur, cur.copy("COPY pbm_doomed (tbl, id, why) FROM STDIN") as copy:
            for rid in ids:
                copy.write_row((table, rid, why))

    def record_written(self, table: str, done: list[tuple[str, bool]]) -> None:
        if not done:
            return
        with self.conn.cursor() as cur:
            cur.executemany("INSERT INTO pbm_written VALUES (%s, %s, %s) ON CONFLICT (tbl, id) DO NOTHING",
                            [(table, rid, ins) for rid, ins in done])

    def _reject_rows(self, t: Table, rows: list[tuple[str, str, str]]) -> None:
        """Rows of `t` that a removed parent or a dangling id makes rejects: record, then remove."""
        sync = self.syncs[t.name]
        by_id: dict[str, list[tuple[str, str]]] = {}
        for rid, fname, reason in rows:
            by_id.setdefault(rid, []).append((fname, reason))
        written = dict(self.conn.execute("SELECT id, inserted FROM pbm_written WHERE tbl = %s AND id = ANY(%s)",
                                         (t.name, list(by_id))).fetchall())
        for ins in written.values():  # written earlier in this run: it did not land after all
            if ins:
                sync.result.inserted -= 1
            else:
                sync.result.updated -= 1
        sync._reject(by_id, present=set(by_id))

    def drain(self) -> None:
        """Delete doomed rows, children first; references into them follow PocketBase's semantics
        for deleted records (the foreign keys' cascade / set null) and the orphans policy for
        rejected ones. Repeats until no new row is doomed."""
        order = list(reversed(_order(self.plan)))
        while True:
            pending = {r[0] for r in self.conn.execute("SELECT DISTINCT tbl FROM pbm_doomed WHERE NOT done")}
            if not pending:
                return
            for t in order:
                if t.name in pending:
                    self._drain_table(t)

    def _drain_table(self, t: Table) -> None:
        null_mode = self.orphans == "null"
        for ref in self.incoming[t.name]:
            c = ref.child
            ct = f"{self.s}.{qi(c.name if ref.junction is None else ref.junction.table)}"
            owner = "id" if ref.junction is None else qi(ref.junction.owner)
            args = {"t": t.name, "c": c.name}
            restrict = ref.junction is None and ref.on_delete == "RESTRICT"
            # Deleted parents: the foreign key's own action is PocketBase's cascade or unset, and
            # PocketBase refuses to delete a record a required relation still points at, so only
            # RESTRICT needs a decision. Rejected parents: the orphans policy, as the full load.
            why = "" if restrict else "AND d.why = 'rejected'"
            hits = (f"FROM {ct} x JOIN pbm_doomed d ON d.tbl = %(t)s AND NOT d.done {why} "
                    f"AND d.id = x.{qi(ref.column)} WHERE NOT EXISTS "
                    f"(SELECT 1 FROM pbm_doomed e WHERE e.tbl = %(c)s AND e.id = x.{owner})")
            if null_mode and ref.nullable and not restrict:
                if ref.junction is None:
                    self.conn.execute(f"UPDATE {ct} y SET {qi(ref.column)} = NULL WHERE y.id IN "
                                      f"(SELECT x.id {hits})", args)
                continue  # junction rows go with their target (ON DELETE CASCADE)
            rows = self.conn.execute(f"SELECT DISTINCT x.{owner} {hits}", args).fetchall()
            if not rows:
                continue
            reason = (f"dangling relation: {ref.field} points at a missing {t.name} record" if ref.junction is None
                      else f"dangling relation: {ref.field} holds an id missing from {t.name}")
            self._reject_rows(c, [(r[0], ref.field, reason) for r in rows])
            if c.name != t.name:
                self._drain_table(c)  # gone before their parent, which a RESTRICT key requires
        self.conn.execute(f"DELETE FROM {self.s}.{qi(t.name)} WHERE id IN "
                          "(SELECT id FROM pbm_doomed WHERE tbl = %s AND NOT done)", (t.name,))
        gone = [r[0] for r in self.conn.execute(
            "UPDATE pbm_doomed SET done = true WHERE tbl = %s AND NOT done RETURNING id, why", (t.name,))
            if r[1] == "deleted"]
        sync = self.syncs[t.name]
        stale = [rid for rid in gone if rid in sync.rejected]
        if stale:
            self.conn.execute(
                "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND record_id = ANY(%s) "
                "AND stage = ANY(%s)", (self.run_id, sync.name, stale, list(REJECT_STAGES)))
            for rid in stale:
                del sync.rejected[rid]

    def revive_children(self, source: Source) -> None:
        """orphans=null: rows whose relation was nulled because its record was rejected get the
        relation back once that record lands (reject mode retries them through the id walk)."""
        if self.orphans != "null":
            return
        for parent, ids in self.revived.items():
            for ref in self.incoming.get(parent, []):
                child = self.syncs.get(ref.child.name)
                if child is not None and ref.nullable:
                    child.apply(_rows_referencing(source, ref.child, ref.field, ref.junction is not None, ids))

    def settle_written(self) -> None:
        """Rows written in this run that point at ids the target does not hold: nulled or rejected
        by the orphans policy (a parent may have been rejected, or never existed)."""
        null_mode = self.orphans == "null"
        for t in self.plan.tables:
            tt = f"{self.s}.{qi(t.name)}"
            written = "JOIN pbm_written w ON w.tbl = %(t)s AND w.id = x.id"
            for fk in t.foreign_keys:
                col = next(c for c in t.columns if c.name == fk.column)
                c = qi(fk.column)
                dangling = (f"SELECT x.id FROM {tt} x {written} LEFT JOIN {self.s}.{qi(fk.target_table)} y "
                            f"ON y.id = x.{c} WHERE x.{c} IS NOT NULL AND y.id IS NULL")
                if null_mode and col.nullable:
                    self.conn.execute(f"UPDATE {tt} SET {c} = NULL WHERE id IN ({dangling})", {"t": t.name})
                    continue
                rows = self.conn.execute(dangling, {"t": t.name}).fetchall()
                if rows:
                    self._reject_rows(t, [(r[0], fk.field, f"dangling relation: {fk.field} points at a missing "
                                                           f"{fk.target_table} record") for r in rows])
            for j in t.junctions:
                if not j.target_table:
                    continue
                jt, o, g = f"{self.s}.{qi(j.table)}", qi(j.owner), qi(j.target)
                missing = f"NOT EXISTS (SELECT 1 FROM {self.s}.{qi(j.target_table)} y WHERE y.id = x.{g})"
                mine = f"x.{o} IN (SELECT id FROM pbm_written WHERE tbl = %(t)s)"
                if null_mode:
                    self.conn.execute(f"DELETE FROM {jt} x WHERE {mine} AND {missing}", {"t": t.name})
                    continue
                rows = self.conn.execute(f"SELECT DISTINCT x.{o} FROM {jt} x WHERE {mine} AND {missing}",
                                         {"t": t.name}).fetchall()
                if rows:
                    self._reject_rows(t, [(r[0], j.field.name, f"dangling relation: {j.field.name} holds an id "
                                                               f"missing from {j.target_table}") for r in rows])
        self.drain()


def _initial_since(conn: psycopg.Connection, sync: _TableSync, target: SyncTarget, overlap: timedelta
                   ) -> tuple[datetime | None, str]:
    """The stored watermark of this run, else the newest `updated` the target holds."""
    row = conn.execute(
        "SELECT updated_at, run_id FROM pbm_meta.watermarks WHERE target_schema = %s AND collection = %s",
        (target.target_schema, sync.name),
    ).fetchone()
    mark = row[0] if row is not None and row[1] == target.run_id else None
    if mark is None:
        mark = conn.execute(f"SELECT max({qi(sync.updated_col or 'updated')}) FROM {sync.t}").fetchone()[0]
    if mark is None:
        return None, ""  # an empty target: every row is new
    return mark, pb_timestamp(mark - overlap)


def resync(conn: psycopg.Connection, source: Source, plan: Plan, target: SyncTarget, *, resync_id: str,
           overlap_seconds: float = DEFAULT_OVERLAP_SECONDS, range_rows: int = RANGE_ROWS,
           files: dict | None = None) -> list[CollectionResult]:
    """Bring `target.schema` to what `source` holds, in one transaction; figures per collection."""
    overlap = timedelta(seconds=float(overlap_seconds))
    orphans = target.params.get("orphans", "reject")
    started = time.monotonic()
    with conn.transaction():
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        run = _Run(conn, target.schema, target.run_id, orphans, source.has_secrets, plan)
        marks: dict[str, datetime | None] = {}
        for t in _order(plan):
            t0 = time.monotonic()
            sync = _TableSync(run, t)
            run.syncs[t.name] = sync
            if sync.result.mode == "updated":
                mark, since = _initial_since(conn, sync, target, overlap)
                sync.result.since = since or None
                sync.apply(_changed_rows(source, t, sync.updated_pos, since), track_updated=True)
                sync.walk_ids(source, range_rows)
                new = parse_datetime(sync.max_updated) if sync.max_updated else None
                marks[sync.name] = max(d for d in (mark, new) if d is not None) if (mark or new) else None
            else:
                for _ in sync.compare(source, range_rows, repair=True):
                    pass
                marks[sync.name] = None
            sync.finish_rejects()
            sync.result.seconds = time.monotonic() - t0
        t0 = time.monotonic()
        run.revive_children(source)
        run.drain()
        run.settle_written()
        try:
            conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        except pgerrors.ForeignKeyViolation as exc:
            raise PbmError(f"re-sync of {target.schema!r} would leave a dangling reference, nothing was "
                           f"written: {exc.diag.message_primary} {exc.diag.message_detail or ''}") from exc
        settle = time.monotonic() - t0
        # the bytes behind file fields follow the rows, in the same transaction (objects of
        # removed names are deleted once it has committed)
        doomed_files = files_sync.resync_files(conn, source, plan, target.run, target.schema, files)
        results = [run.syncs[t.name].result for t in plan.tables]
        for r in results:
            r.seconds += settle / max(1, len(results))
            r.watermark = pb_timestamp(marks[r.collection]) if marks.get(r.collection) else None
            conn.execute(
                """INSERT INTO pbm_meta.watermarks (target_schema, collection, updated_at, synced_at, run_id)
                   VALUES (%s, %s, %s, now(), %s)
                   ON CONFLICT (target_schema, collection) DO UPDATE SET updated_at = EXCLUDED.updated_at,
                       synced_at = EXCLUDED.synced_at, run_id = EXCLUDED.run_id""",
                (target.target_schema, r.collection, marks.get(r.collection), target.run_id))
            conn.execute(
                """INSERT INTO pbm_meta.resyncs (resync_id, run_id, target_schema, synced_schema, collection,
                       target_table, mode, rows_read, inserted, updated, deleted, rejected, ranges_compared,
                       ranges_recopied, watermark, seconds)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (resync_id, collection) DO UPDATE SET rows_read = EXCLUDED.rows_read,
                       inserted = EXCLUDED.inserted, updated = EXCLUDED.updated, deleted = EXCLUDED.deleted,
                       rejected = EXCLUDED.rejected, ranges_compared = EXCLUDED.ranges_compared,
                       ranges_recopied = EXCLUDED.ranges_recopied, watermark = EXCLUDED.watermark,
                       seconds = EXCLUDED.seconds, at = now()""",
                (resync_id, target.run_id, target.target_schema, target.schema, r.collection, r.table, r.mode,
                 r.rows_read, r.inserted, r.updated, r.deleted, r.rejected, r.ranges_compared, r.ranges_recopied,
                 marks.get(r.collection), r.seconds))
    files_sync.delete_objects(doomed_files, target.run, files)
    log.info("re-sync %s of %s: %.2f s", resync_id, target.schema, time.monotonic() - started)
    return results


def _run_orphans(conn: psycopg.Connection, run_id: str) -> str:
    row = conn.execute("SELECT params->>'orphans' FROM pbm_meta.runs WHERE run_id = %s", (run_id,)).fetchone()
    return (row[0] if row else None) or "reject"


def compare_ranges(conn: psycopg.Connection, source: Source, table: Table, schema: str, *, run_id: str,
                   orphans: str | None = None, range_rows: int = RANGE_ROWS) -> list[RangeDiff]:
    """Fresh per-range checksums of one collection on both sides: Python over the source (a
    snapshot), SQL over `schema`. Rows recorded as rejects of `run_id` are left out of the source
    side; dangling ids the `orphans` policy nulled are explained, not reported. Writes nothing.

    This is what validation should use once a re-sync has run: the ledger's per-batch checksums
    describe the full load's snapshot, not the re-synced target.
    """
    orphans = orphans or _run_orphans(conn, run_id)  # the policy the run's load applied
    with conn.transaction():
        run = _Run(conn, schema, run_id, orphans, source.has_secrets, Plan([table], {}, [], [], source.has_secrets))
        sync = _TableSync(run, table)
        diffs = list(sync.compare(source, range_rows, repair=False))
        conn.execute("DROP TABLE pbm_doomed, pbm_written")
    return diffs


def compare_collection(conn: psycopg.Connection, source: Source, table: Table, schema: str, *, run_id: str,
                       orphans: str | None = None, range_rows: int = RANGE_ROWS) -> dict[str, Any]:
    """`compare_ranges` summed up for one table, for validation's checks after a re-sync: row
    counts (source, rejected, target) and the ranges that differ, with example ids."""
    started = time.monotonic()
    diffs = compare_ranges(conn, source, table, schema, run_id=run_id, orphans=orphans, range_rows=range_rows)
    bad = [d for d in diffs if not d.equal]
    return {
        "table": table.name,
        "collection": table.collection.name,
        "equal": not bad,
        "ranges": len(diffs),
        "mismatched": len(bad),
        "source_rows": sum(d.source_rows for d in diffs),
        "rejected": sum(d.rejected for d in diffs),
        "target_rows": sum(d.target_rows for d in diffs),
        "missing": sum(d.missing for d in bad),
        "extra": sum(d.extra for d in bad),
        "changed": sum(d.changed for d in bad),
        "examples": [d.as_dict() for d in bad[:5]],
        "seconds": round(time.monotonic() - started, 3),
    }


# --- entry points for the DAG tasks ----------------------------------------------------------


def resync_dir(target_schema: str) -> Path:
    """Where the re-sync keeps its snapshot: one per target, replaced by every run."""
    from pbmigrate.context import work_dir

    return work_dir() / target_schema / "resync"


def run_resync(*, source_path: str | None, target_schema: str, mapping: str | None, collections: list[str] | None,
               pg_url: str,
               resync_id: str, overlap_seconds: float = DEFAULT_OVERLAP_SECONDS, force: bool = False,
               api: dict | None = None, lock_wait_seconds: float = 60.0, range_rows: int = RANGE_ROWS,
               snapshot_name: str = "data.db", files: dict | None = None) -> dict:
    """One re-sync (the `pocketbase_resync` task): snapshot, compare, write, record; a summary.

    `source_path`, `mapping` or `collections` left None take the migration run's values
    (`recorded_params`). Raises TargetCutOver after a cut-over (unless `force`), ResyncRefused
    before any completed load or when the params differ from the migration's; TargetBusy when a
    migration holds the target.
    """
    if float(overlap_seconds) < 0:
        raise ParamError("param overlap_seconds must not be negative")
    started = time.monotonic()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta.ensure_meta(conn)
    with target_lock(pg_url, target_schema, wait_seconds=lock_wait_seconds, holder="pbmigrate re-sync"), \
            psycopg.connect(pg_url, autocommit=True,
                            application_name=f"pbmigrate re-sync {target_schema}"[:63]) as conn:
        target = resolve_target(conn, target_schema, force=force)
        source_path, mapping, collections = recorded_params(target, source_path=source_path, mapping=mapping,
                                                            collections=collections)
        check_params(target, mapping=mapping, collections=collections)
        if source_path:  # files are read from the storage beside the data.db this re-sync reads
            target.run["storage_path"] = str(resolve_data_db(source_path).parent / "storage")
        snapshot_path, snapshot_at = None, None
        if source_path:
            snap = take_snapshot(source_path, resync_dir(target_schema) / snapshot_name)
            snapshot_path, snapshot_at = snap.path, datetime.now(UTC)
            log.info("snapshot of %s: %s (%s bytes, %.2f s)", snap.source, snap.path, snap.bytes, snap.seconds)
            source = open_source(snap.path)
        else:
            if not api:
                raise ParamError("API mode needs the pbm_pocketbase connection (url, email, password)")
            source = open_source(None, **api)
            snapshot_at = datetime.now(UTC)
            log.warning("API mode: every id and changed row is paged through the REST API (slower than a "
                        "snapshot); point source_path at the data.db when the files are reachable")
        try:
            plan = build_plan(source.catalog(), load_mapping(mapping), collections=collections,
                              has_secrets=source.has_secrets)
            check_schema(conn, target.schema, plan)
            results = resync(conn, source, plan, target, resync_id=resync_id, overlap_seconds=overlap_seconds,
                             range_rows=range_rows, files=files)
        finally:
            with contextlib.suppress(sqlite3.Error, OSError):
                source.close()
    for r in results:
        log.info("%s", r.log_line())
    totals = {k: sum(getattr(r, k) for r in results) for k in ("inserted", "updated", "deleted", "rejected")}
    summary = {
        "resync_id": resync_id,
        "run_id": target.run_id,
        "target_schema": target_schema,
        "schema": target.schema,
        "forced": bool(target.cut_over),
        "snapshot_path": snapshot_path,
        "snapshot_at": snapshot_at.isoformat() if snapshot_at else None,
        "finished_at": datetime.now(UTC).isoformat(),
        "seconds": round(time.monotonic() - started, 3),
        "totals": totals,
        "collections": {r.collection: {k: v for k, v in asdict(r).items() if k != "collection"} for r in results},
    }
    log.info("re-sync of %s into %s: inserted %d, updated %d, deleted %d, rejected %d in %.2f s", target_schema,
             target.schema, totals["inserted"], totals["updated"], totals["deleted"], totals["rejected"],
             summary["seconds"])
    # PostgreSQL now holds PocketBase as of the snapshot: the lag is the snapshot's age.
    lag = (datetime.now(UTC) - snapshot_at).total_seconds() if snapshot_at else 0.0
    for r in results:
        metrics.push_resync(r.collection, r.inserted, r.updated, r.deleted, lag, target.run_id)
    return summary


def final_sync(*, source_path: str | None, target_schema: str, mapping: str | None, collections: list[str] | None,
               pg_url: str,
               dag_run_id: str, overlap_seconds: float = DEFAULT_OVERLAP_SECONDS, api: dict | None = None,
               lock_wait_seconds: float = 600.0, files: dict | None = None) -> dict:
    """The last re-sync before cut-over (`pocketbase_migration` with mode=final), with PocketBase
    frozen: returns the migration's run dict, pointed at this re-sync's snapshot, for the gates.

    `resynced` tells validation that the ledger's batch checksums are stale: compare the target
    with `snapshot_path` through `compare_ranges` instead.
    """
    summary = run_resync(source_path=source_path, target_schema=target_schema, mapping=mapping,
                         collections=collections, pg_url=pg_url, resync_id=f"final:{dag_run_id}",
                         overlap_seconds=overlap_seconds, force=False, api=api, lock_wait_seconds=lock_wait_seconds,
                         snapshot_name=f"final-{safe_name(dag_run_id)}.db",  # its own file: the gates read it
                         files=files)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        target = resolve_target(conn, target_schema)
    run = dict(target.run)
    run.update({"dag_run_id": dag_run_id, "snapshot_path": summary["snapshot_path"] or run["snapshot_path"],
                "resynced": True, "resync": {"resync_id": summary["resync_id"], "totals": summary["totals"]}})
    return run


def last_resync(conn: psycopg.Connection, run_id: str) -> dict | None:
    """The latest re-sync of a migration run (None if none): validation's cue to use compare_ranges."""
    row = conn.execute(
        """SELECT resync_id, max(at), sum(inserted), sum(updated), sum(deleted), sum(rejected)
             FROM pbm_meta.resyncs WHERE run_id = %s GROUP BY resync_id ORDER BY max(at) DESC LIMIT 1""",
        (run_id,),
    ).fetchone()
    if row is None:
        return None
    return {"resync_id": row[0], "at": row[1].isoformat(), "inserted": int(row[2]), "updated": int(row[3]),
            "deleted": int(row[4]), "rejected": int(row[5])}
