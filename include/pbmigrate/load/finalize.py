"""After every batch is in: keys, duplicates, orphans, indexes, foreign keys, views, statistics.

SQLite never enforced what PocketBase's relations promise, so dangling ids and duplicates under
case-insensitive unique indexes do occur. Each one is decided here by the `orphans` policy and
recorded (pbm_meta.rejects or pbm_meta.orphans) before the constraint that would refuse it is
built: nothing is dropped silently, and the constraints end up VALID. Every step is idempotent.

Work that decides nothing (statistics, the primary keys, plain indexes, unique indexes and,
when no duplicate is pending, foreign keys that hold) is done first over two connections, so
PostgreSQL builds on both cores; every decision (rejecting duplicates and orphans, the foreign
keys that meet orphans, after dropping every key) then happens in one transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import make_conninfo

from pbmigrate.errors import ParamError
from pbmigrate.load import ledger
from pbmigrate.pgsql import qi, with_schema
from pbmigrate.plan.model import DANGLING, Junction, Plan, Table, dangling_reason

log = logging.getLogger(__name__)
ORPHAN_MODES = ("reject", "null")
EXAMPLES = 5
WORKERS = 2  # connections building at once in the first phase
SESSION = ("SET maintenance_work_mem = '512MB'", "SET work_mem = '256MB'")  # sort and hash in memory


@dataclass
class FinalizeReport:
    duplicates: dict[str, int] = field(default_factory=dict)  # "table.index" -> rows rejected
    orphans: dict[str, int] = field(default_factory=dict)  # "collection.field" -> dangling ids
    orphan_rejects: int = 0
    indexes: int = 0
    foreign_keys: int = 0
    views: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step, for the log and the report

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.steps[step] = round(time.monotonic() - started, 3)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _constraint_exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    return conn.execute(
        """SELECT 1 FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
            WHERE n.nspname = %s AND c.conname = %s""",
        (schema, name),
    ).fetchone() is not None


def add_primary_keys(conn: psycopg.Connection, schema: str, plan: Plan) -> None:
    """Each table's id key and the junction tables' (owner, position), where `prebuild` has not
    built them yet (the tables are created without keys: ddl)."""
    for sql in _primary_keys(conn, schema, plan):
        conn.execute(sql)


def _primary_keys(conn: psycopg.Connection, schema: str, plan: Plan) -> list[str]:
    s, out = qi(schema), []
    for t in plan.tables:
        name = f"{t.name}_pkey"[:63]
        if not _constraint_exists(conn, schema, name):
            out.append(f"ALTER TABLE {s}.{qi(t.name)} ADD CONSTRAINT {qi(name)} PRIMARY KEY (id)")
        for j in t.junctions:
            jname = f"{j.table}_pkey"[:63]
            if not _constraint_exists(conn, schema, jname):
                out.append(f"ALTER TABLE {s}.{qi(j.table)} ADD CONSTRAINT {qi(jname)} "
                           f"PRIMARY KEY ({qi(j.owner)}, position)")
    return out


def prebuild(conn: psycopg.Connection, schema: str, plan: Plan) -> bool:
    """Statistics, junction keys and every index, over WORKERS connections of their own, each
    statement committed alone: none of it decides anything, and all of it is idempotent. A unique
    index that meets a duplicate is left for `create_unique_indexes`, which decides.

    Then, when no duplicate is pending (a rejected row would fire the keys' ON DELETE), the foreign
    keys: added NOT VALID one by one (no scan), validated in parallel (VALIDATE takes only SHARE
    UPDATE EXCLUSIVE). One that meets an orphan stays NOT VALID for `finalize`, which drops them
    all before deciding. Returns whether every foreign key was left valid."""
    s = qi(schema)
    work = [f"ANALYZE {s}.{qi(name)}" for t in plan.tables for name in (t.name, *(j.table for j in t.junctions))]
    work += _primary_keys(conn, schema, plan) + _plain_indexes(schema, plan)
    work += [with_schema(i.sql, schema) for t in plan.tables for i in t.indexes if i.unique]
    conninfo = make_conninfo(conn.info.dsn, password=conn.info.password)
    if _in_parallel(conninfo, work, psycopg.errors.UniqueViolation):
        return False
    adds, validations = [], []
    for table, name, column, target, on_delete in _foreign_key_specs(plan):
        if not _constraint_exists(conn, schema, name):
            adds.append(_add_foreign_key_sql(schema, table, name, column, target, on_delete))
        validations.append(f"ALTER TABLE {s}.{qi(table)} VALIDATE CONSTRAINT {qi(name)}")
    _in_parallel(conninfo, adds, psycopg.errors.ForeignKeyViolation, workers=1)  # each locks two tables
    return not _in_parallel(conninfo, validations, psycopg.errors.ForeignKeyViolation)


def _in_parallel(conninfo: str, work: list[str], decided_later: type[Exception], workers: int = WORKERS) -> list[str]:
    """Run the statements over `workers` autocommit connections of their own; returns those that
    failed with `decided_later` (left for finalize's transaction, which decides what they met)."""
    queue, lock, errors, failed = iter(work), threading.Lock(), [], []

    def worker() -> None:
        try:
            with psycopg.connect(conninfo, autocommit=True) as own:
                for sql in SESSION:
                    own.execute(sql)
                while True:
                    with lock:
                        sql = next(queue, None)
                    if sql is None:
                        return
                    try:
                        own.execute(sql)
                    except decided_later:
                        failed.append(sql)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"pbm-finalize-{i}") for i in range(min(workers, len(work)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return failed


def _reject_ids(conn: psycopg.Connection, schema: str, table: Table, run_id: str, select_ids: str,
                args: tuple, field_name: str, reason: str) -> int:
    """Move the rows whose ids `select_ids` returns into pbm_meta.rejects."""
    s, t = qi(schema), qi(table.name)
    removed = ledger.owner_sums(conn, schema, table, run_id, select_ids, args)
    n = conn.execute(
        f"""WITH bad AS ({select_ids})
            INSERT INTO pbm_meta.rejects (run_id, collection, record_id, field, reason, stage)
            SELECT %s, %s, b.id, %s, %s, 'finalize' FROM (SELECT DISTINCT id FROM bad) b""",
        (*args, run_id, table.collection.name, field_name, reason),
    ).rowcount
    if n:
        conn.execute(f"DELETE FROM {s}.{t} WHERE id IN ({select_ids})", args)
        for j in table.junctions:
            conn.execute(f"DELETE FROM {s}.{qi(j.table)} WHERE {qi(j.owner)} NOT IN (SELECT id FROM {s}.{t})")
        ledger.adjust(conn, run_id, table.collection.name, ledger.negate(removed))
    return n


def create_unique_indexes(conn: psycopg.Connection, schema: str, plan: Plan, run_id: str,
                          report: FinalizeReport) -> None:
    """Each unique index is built optimistically in a savepoint: the build is the duplicate check.
    Only when it fails are the rows that break it rejected (the first by id stays), then it is
    built again. Runs before orphan resolution, because rejecting a row can orphan others."""
    for t in plan.tables:
        for idx in (i for i in t.indexes if i.unique):
            sql = with_schema(idx.sql, schema)
            try:
                with conn.transaction():
                    conn.execute(sql)
            except psycopg.errors.UniqueViolation:
                _reject_duplicates(conn, schema, t, idx, run_id)
                conn.execute(sql)
            report.indexes += 1


def _reject_duplicates(conn: psycopg.Connection, schema: str, t: Table, idx, run_id: str) -> None:
    exprs = idx.exprs
    not_null = " AND ".join(f"({e}) IS NOT NULL" for e in exprs)
    where = f"({idx.where}) AND {not_null}" if idx.where else not_null
    select = (f"SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY {', '.join(exprs)} "
              f"ORDER BY id) AS rn FROM {qi(schema)}.{qi(t.name)} WHERE {where}) d WHERE rn > 1")
    _reject_ids(conn, schema, t, run_id, select, (), ",".join(idx.columns),
                f"duplicate value under unique index {idx.name} (the row with the lowest id was kept)")


def resolve_orphans(conn: psycopg.Connection, schema: str, plan: Plan, run_id: str, mode: str) -> None:
    """Dangling relation ids, by policy: `reject` the row, or `null` the value (drop the junction
    row). Repeats until stable, because rejecting a row can orphan the rows pointing at it."""
    if mode not in ORPHAN_MODES:
        raise ParamError(f"param orphans must be one of {ORPHAN_MODES}, not {mode!r}")
    tables = {t.name: t for t in plan.tables}
    counts: dict[tuple[str, str, str], tuple[int, list[str]]] = {}
    changed = True
    while changed:
        changed = False
        for t in plan.tables:
            for fk in t.foreign_keys:
                col = next(c for c in t.columns if c.name == fk.column)
                n = _single_orphans(conn, schema, t, fk.column, fk.target_table, fk.field, run_id,
                                    "null" if mode == "null" and col.nullable else "reject", counts)
                changed |= n > 0
            for j in t.junctions:
                if j.target_table in tables:
                    n = _junction_orphans(conn, schema, t, j, run_id, mode, counts)
                    changed |= n > 0
    for (coll, fname, target), (n, examples) in counts.items():
        conn.execute(
            """INSERT INTO pbm_meta.orphans (run_id, collection, field, target, mode, count, examples)
               VALUES (%s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (run_id, collection, field) DO UPDATE SET count = EXCLUDED.count,
                   examples = EXCLUDED.examples, mode = EXCLUDED.mode""",
            (run_id, coll, fname, target, mode, n, examples),
        )


def _any(conn: psycopg.Connection, select: str) -> bool:
    """A whole-table anti-join, counted: a hash join the planner picks reliably (a LIMIT invites
    millions of index probes instead). The common answer is "none", so this is the hot path."""
    return conn.execute(f"SELECT count(*) FROM ({select}) d").fetchone()[0] > 0


def _affected(conn: psycopg.Connection, select: str) -> str:
    """Pin the ids a change will touch, so their digests can be taken before and after it."""
    conn.execute('CREATE TEMP TABLE IF NOT EXISTS pbm_affected (id text COLLATE "C") ON COMMIT DROP')
    conn.execute("TRUNCATE pbm_affected")
    conn.execute(f"INSERT INTO pbm_affected {select}")
    return "SELECT id FROM pbm_affected"


def _tally(counts: dict, key: tuple[str, str, str], n: int, ids: list[str]) -> None:
    prev, examples = counts.get(key, (0, []))
    counts[key] = (prev + n, (examples + ids)[:EXAMPLES])


def _single_orphans(conn: psycopg.Connection, schema: str, t: Table, column: str, target: str, fname: str,
                    run_id: str, mode: str, counts: dict) -> int:
    s, c = qi(schema), qi(column)
    select = (f"SELECT x.id FROM {s}.{qi(t.name)} x WHERE x.{c} IS NOT NULL "
              f"AND NOT EXISTS (SELECT 1 FROM {s}.{qi(target)} y WHERE y.id = x.{c})")
    if not _any(conn, select):
        return 0
    ids = [r[0] for r in conn.execute(select + " ORDER BY x.id LIMIT %s", (EXAMPLES,))]
    if mode == "null":
        affected = _affected(conn, select)
        before = ledger.row_sums(conn, schema, t, run_id, affected)
        n = conn.execute(f"UPDATE {s}.{qi(t.name)} SET {c} = NULL WHERE id IN ({affected})").rowcount
        ledger.adjust(conn, run_id, t.collection.name,
                      ledger.difference(ledger.row_sums(conn, schema, t, run_id, affected), before))
    else:
        n = _reject_ids(conn, schema, t, run_id, select, (), fname,
                        dangling_reason(fname, target))
    _tally(counts, (t.collection.name, fname, target), n, ids)
    return n


def _junction_orphans(conn: psycopg.Connection, schema: str, t: Table, j: Junction, run_id: str, mode: str,
                      counts: dict) -> int:
    s, jt, o, g = qi(schema), qi(j.table), qi(j.owner), qi(j.target)
    dangling = (f"SELECT x.{o} AS id FROM {s}.{jt} x "
                f"WHERE NOT EXISTS (SELECT 1 FROM {s}.{qi(j.target_table)} y WHERE y.id = x.{g})")
    if not _any(conn, dangling):
        return 0
    ids = [r[0] for r in conn.execute(f"SELECT DISTINCT id FROM ({dangling}) d ORDER BY id LIMIT %s",
                                      (EXAMPLES,))]
    key = (t.collection.name, j.field.name, j.target_table or "")
    if mode == "null":
        missing = f"NOT EXISTS (SELECT 1 FROM {s}.{qi(j.target_table)} y WHERE y.id = x.{g})"
        affected = _affected(conn, f"SELECT DISTINCT x.{o} FROM {s}.{jt} x WHERE {missing}")
        before = ledger.junction_sums(conn, schema, t, run_id, affected, only=j)
        n = conn.execute(f"DELETE FROM {s}.{jt} x WHERE {missing}").rowcount
        after = ledger.junction_sums(conn, schema, t, run_id, affected, only=j)
        ledger.adjust(conn, run_id, t.collection.name, ledger.difference(after, before))
    else:
        n = _reject_ids(conn, schema, t, run_id, dangling, (), j.field.name,
                        dangling_reason(j.field.name, j.target_table, junction=True))
    _tally(counts, key, n, ids)
    return n


def create_indexes(conn: psycopg.Connection, schema: str, plan: Plan, report: FinalizeReport) -> None:
    for sql in _plain_indexes(schema, plan):
        conn.execute(sql)
        report.indexes += 1


def _plain_indexes(schema: str, plan: Plan) -> list[str]:
    """The non-unique indexes: PocketBase's own, each junction's target, each foreign key column."""
    s, out = qi(schema), []
    for t in plan.tables:
        out += [with_schema(idx.sql, schema) for idx in t.indexes if not idx.unique]
        for j in t.junctions:
            name = f"{j.table}_{j.target}_idx"[:63]
            out.append(f"CREATE INDEX IF NOT EXISTS {qi(name)} ON {s}.{qi(j.table)} ({qi(j.target)})")
        for fk in t.foreign_keys:
            if _leads_an_index(t, fk.column):
                continue
            name = f"{t.name}_{fk.column}_fk_idx"[:63]
            out.append(f"CREATE INDEX IF NOT EXISTS {qi(name)} ON {s}.{qi(t.name)} ({qi(fk.column)})")
    return out


def _leads_an_index(t: Table, column: str) -> bool:
    """The key (id) or a whole-table index of the plan leads with the plain column: it serves the
    foreign key's lookups (ON DELETE, the anti-joins), so a second index would only cost its build."""
    return column == "id" or any(i.exprs and i.exprs[0] == qi(column) and not i.where for i in t.indexes)


def _foreign_key_specs(plan: Plan) -> list[tuple[str, str, str, str, str]]:
    """(table, constraint, column, target table, ON DELETE) of every foreign key, junctions' too."""
    out = []
    for t in plan.tables:
        for fk in t.foreign_keys:
            out.append((t.name, fk.name, fk.column, fk.target_table, fk.on_delete))
        for j in t.junctions:
            out.append((j.table, f"{j.table}_{j.owner}_fk"[:63], j.owner, t.name, "CASCADE"))
            if j.target_table:
                out.append((j.table, f"{j.table}_{j.target}_fk"[:63], j.target, j.target_table, "CASCADE"))
    return out


def _add_foreign_key_sql(schema: str, table: str, name: str, column: str, target: str, on_delete: str) -> str:
    s = qi(schema)
    return (f"ALTER TABLE {s}.{qi(table)} ADD CONSTRAINT {qi(name)} FOREIGN KEY ({qi(column)}) "
            f"REFERENCES {s}.{qi(target)} (id) ON DELETE {on_delete} DEFERRABLE INITIALLY IMMEDIATE NOT VALID")


def add_foreign_keys(conn: psycopg.Connection, schema: str, plan: Plan, report: FinalizeReport) -> None:
    """NOT VALID first (no long lock), then VALIDATE (a no-op for a key `prebuild` validated);
    DEFERRABLE for self-references and cycles. A dangling id makes VALIDATE fail with
    ForeignKeyViolation."""
    s = qi(schema)
    for table, name, column, target, on_delete in _foreign_key_specs(plan):
        if not _constraint_exists(conn, schema, name):
            conn.execute(_add_foreign_key_sql(schema, table, name, column, target, on_delete))
        conn.execute(f"ALTER TABLE {s}.{qi(table)} VALIDATE CONSTRAINT {qi(name)}")
        report.foreign_keys += 1


def drop_foreign_keys(conn: psycopg.Connection, schema: str, plan: Plan) -> None:
    """Before rows are rejected or nulled: no key (one `prebuild` committed) may act ON DELETE."""
    s = qi(schema)
    for table, name, *_ in _foreign_key_specs(plan):
        conn.execute(f"ALTER TABLE {s}.{qi(table)} DROP CONSTRAINT IF EXISTS {qi(name)}")


def create_views(conn: psycopg.Connection, schema: str, plan: Plan, report: FinalizeReport) -> None:
    s = qi(schema)
    for name, select in plan.derived.items():
        conn.execute(f"CREATE OR REPLACE VIEW {s}.{qi(name)} AS {with_schema(select, schema)}")
        report.views.append(name)


def _read_back(conn: psycopg.Connection, run_id: str, report: FinalizeReport) -> None:
    """Counts from pbm_meta, so a re-run (which finds nothing new) reports the same figures."""
    report.orphans = {f"{c}.{f}": n for c, f, n in conn.execute(
        "SELECT collection, field, count FROM pbm_meta.orphans WHERE run_id = %s ORDER BY 1, 2", (run_id,))}
    report.duplicates = {f"{c}.{f}": n for c, f, n in conn.execute(
        """SELECT collection, field, count(*) FROM pbm_meta.rejects WHERE run_id = %s AND stage = 'finalize'
              AND reason LIKE 'duplicate value%%' GROUP BY 1, 2 ORDER BY 1, 2""", (run_id,))}
    report.orphan_rejects = conn.execute(
        "SELECT count(*) FROM pbm_meta.rejects WHERE run_id = %s AND stage = 'finalize' AND reason LIKE %s",
        (run_id, DANGLING + "%")).fetchone()[0]


def finalize(conn: psycopg.Connection, schema: str, plan: Plan, run_id: str, orphans: str = "reject") -> dict:
    """Everything after the load: `prebuild`, then every decision in one transaction (all of it holds
    or none of it does)."""
    if orphans not in ORPHAN_MODES:
        raise ParamError(f"param orphans must be one of {ORPHAN_MODES}, not {orphans!r}")
    report = FinalizeReport()
    # A re-run finds nothing new (rejected rows are gone, nulled values are NULL), so the
    # rejects and orphan counts of an earlier committed finalize stay as they are.
    with report.timed("prebuild"):  # statistics first, or the anti-joins' plans are guesses
        prebuild(conn, schema, plan)
    with conn.transaction():
        for sql in SESSION:
            conn.execute(sql.replace("SET ", "SET LOCAL ", 1))
        with report.timed("primary_keys"):
            add_primary_keys(conn, schema, plan)
        with report.timed("unique_indexes"):
            create_unique_indexes(conn, schema, plan, run_id, report)
        with report.timed("indexes"):
            create_indexes(conn, schema, plan, report)
        with report.timed("foreign_keys"):
            _foreign_keys_then_orphans(conn, schema, plan, run_id, orphans, report)
        _read_back(conn, run_id, report)
        create_views(conn, schema, plan, report)
    return report.as_dict()


def _foreign_keys_then_orphans(conn: psycopg.Connection, schema: str, plan: Plan, run_id: str, orphans: str,
                               report: FinalizeReport) -> None:
    """Optimistic, like the unique indexes: validating the foreign keys is the orphan check. Only
    when one fails are they all undone (before any ON DELETE action could fire), the orphans
    resolved by policy, and the keys added again."""
    try:
        with conn.transaction():
            add_foreign_keys(conn, schema, plan, report)
        return
    except psycopg.errors.ForeignKeyViolation:
        report.foreign_keys = 0
    drop_foreign_keys(conn, schema, plan)
    with report.timed("orphans"):
        resolve_orphans(conn, schema, plan, run_id, orphans)
    add_foreign_keys(conn, schema, plan, report)
