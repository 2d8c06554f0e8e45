"""Validation: one GX Core checkpoint per target table, plus the ledger's per-batch checksums.

Why both: GX checks what a table holds on its own terms (row count, keys, required values,
select sets, relations), and its Data Docs give a person something to click through; the
checksums prove that every value equals what the batch read from the source, which no
expectation can. Everything is recorded in `pbm_meta.checks`; the gate reads it from there.

What the finalized schema's catalog already proves (a primary key, NOT NULL, a validated foreign
key, a unique index) is not asked of GX again: those checks pass with the constraint's name in
`observed` (`catalog_proofs`), so the same checks are recorded and GX only scans for the rest.

GX is imported inside functions only: importing it takes seconds and fills logs, and the
scheduler parses the DAG files that import this module. The context is ephemeral (nothing but
the Data Docs and our own JSON touch the disk) and reaches PostgreSQL through an environment
variable, so no file ever holds the connection's password.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from pbmigrate import checksum
from pbmigrate.audit import metrics
from pbmigrate.audit.meta import Check
from pbmigrate.context import open_run_source, run_dir, run_plan
from pbmigrate.files import file_checks
from pbmigrate.load import ledger
from pbmigrate.pgsql import qi, ql_list
from pbmigrate.plan.model import Plan, Table
from pbmigrate.resync import compare_collection, last_resync
from pbmigrate.source import Source
from pbmigrate.validate import deferred

log = logging.getLogger("pbmigrate")

EXAMPLES = 5  # ids kept per failing check: enough to look one up, never a dump of the table
SUMMARY_FAILURES = 20  # failing checks listed in the XCom summary (all of them are in pbm_meta)
GX_URL_ENV = "PBM_GX_PG_URL"  # GX reads the URL from here, so its config holds only "${...}"
DOCS_SITE = "pbmigrate"
# Counts, not values: GX's partial lists scan the table once more per passing column check;
# the few ids of a failing check are fetched afterwards (`_examples`).
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 0}


@dataclass(frozen=True)
class Spec:
    """One expectation, described without GX so it can be built and tested cheaply."""

    name: str  # the check_name in pbm_meta.checks
    kind: str  # row_count | not_null | in_set | no_rows (SQL) | unique (GX's own; slower than no_rows)
    column: str | None = None
    value: Any = None  # row_count: the count; in_set: the values; no_rows: SQL, BATCH for the table
    # the catalog fact that proves it without a query (a key of `catalog_proofs`), if any
    proof: tuple[str, ...] | None = None


# --------------------------------------------------------------------------- what to expect


BATCH = "\x00batch\x00"  # stands for the table under test until the SQL is handed to GX


def gx_query(sql: str) -> str:
    """GX fills `{batch}` with str.format: double every other brace (array or JSON literals)."""
    return sql.replace("{", "{{").replace("}", "}}").replace(BATCH, "{batch}")


def table_specs(table: Table, schema: str, expected_rows: int) -> list[Spec]:
    """Every expectation for one target table and its junction tables."""
    s, t = qi(schema), table.name
    specs = [
        Spec("row_count", "row_count", value=expected_rows),
        # GROUP BY rather than GX's ExpectColumnValuesToBeUnique, whose window function over the
        # whole table (run twice) was the costliest expectation on large tables
        Spec("primary_key_unique", "no_rows", "id", f"SELECT id FROM {BATCH} GROUP BY id HAVING count(*) > 1",
             ("unique", t, "id")),
        Spec("primary_key_not_null", "not_null", "id", proof=("not_null", t, "id")),
    ]
    for c in table.columns:
        if c.name != "id" and not c.nullable:  # the plan's NOT NULL (a secret in API mode may be NULL)
            specs.append(Spec(f"not_null:{c.name}", "not_null", c.name, proof=("not_null", t, c.name)))
    for c in table.columns:
        if c.field.type != "select" or not c.field.values:
            continue
        if c.type.endswith("[]"):
            sql = f"SELECT id FROM {BATCH} WHERE NOT ({qi(c.name)} <@ ARRAY[{ql_list(c.field.values)}]::text[])"
            specs.append(Spec(f"in_set:{c.name}", "no_rows", c.name, sql))
        elif c.type == "text":
            specs.append(Spec(f"in_set:{c.name}", "in_set", c.name, list(c.field.values)))
    # GX leaves {batch} unaliased when the query joins, so every query that needs an alias joins.
    for fk in table.foreign_keys:
        col = qi(fk.column)
        sql = (f"SELECT x.id FROM {BATCH} x LEFT JOIN {s}.{qi(fk.target_table)} y ON y.id = x.{col} "
               f"WHERE x.{col} IS NOT NULL AND y.id IS NULL")
        specs.append(Spec(f"no_orphans:{fk.column}->{fk.target_table}", "no_rows", fk.column, sql,
                          ("references", t, fk.column, fk.target_table)))
    for j in table.junctions:
        jt, o, g = f"{s}.{qi(j.table)}", qi(j.owner), qi(j.target)
        owner_sql = f"SELECT j.{o} AS id FROM {jt} j LEFT JOIN {BATCH} x ON x.id = j.{o} WHERE x.id IS NULL"
        specs.append(Spec(f"no_orphans:{j.table}.{j.owner}->{t}", "no_rows", j.owner, owner_sql,
                          ("references", j.table, j.owner, t)))
        if j.target_table:
            target_sql = (f"SELECT j.{o} AS id FROM {jt} j LEFT JOIN {s}.{qi(j.target_table)} y "
                          f"ON y.id = j.{g} WHERE y.id IS NULL")
            # a junction row of this owner is a junction row: the whole table's key proves the subset
            specs.append(Spec(f"no_orphans:{j.table}.{j.target}->{j.target_table}", "no_rows", j.target,
                              target_sql + f" AND EXISTS (SELECT 1 FROM {BATCH} x WHERE x.id = j.{o})",
                              ("references", j.table, j.target, j.target_table)))
    return specs


# One pass over the schema's catalog: every fact a constraint or index guarantees for the rows
# committed now. Only what PostgreSQL enforces counts: a validated foreign key whose triggers are
# enabled (a NOT VALID one, or one with `DISABLE TRIGGER`, says nothing about the rows), a valid
# unique index without predicate or expressions on a NOT NULL column (GROUP BY would count two
# NULL ids as a duplicate, a unique index allows them; NULLS NOT DISTINCT is not read: PostgreSQL
# 12-14, which preflight accepts, lack the column), a column's NOT NULL (attnotnull).
_CATALOG_SQL = """
WITH rel AS (
    SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p'))
SELECT 'not_null', r.relname, a.attname, NULL::name, r.relname || '.' || a.attname || ' NOT NULL'
  FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid
 WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull
UNION ALL
SELECT 'unique', r.relname, a.attname, NULL, i.relname
  FROM rel r JOIN pg_index x ON x.indrelid = r.oid JOIN pg_class i ON i.oid = x.indexrelid
  JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum = x.indkey[0]
 WHERE x.indisunique AND x.indisvalid AND x.indnatts = 1 AND x.indpred IS NULL AND x.indexprs IS NULL
   AND a.attnotnull
UNION ALL
SELECT 'references', r.relname, a.attname, t.relname, k.conname
  FROM rel r JOIN pg_constraint k ON k.conrelid = r.oid JOIN rel t ON t.oid = k.confrelid
  JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum = k.conkey[1]
  JOIN pg_attribute ta ON ta.attrelid = t.oid AND ta.attnum = k.confkey[1]
 WHERE k.contype = 'f' AND k.convalidated AND cardinality(k.conkey) = 1 AND ta.attname = 'id'
   AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgconstraint = k.oid AND g.tgenabled = 'D')
"""


def catalog_proofs(conn: psycopg.Connection, schema: str) -> dict[tuple[str, ...], str]:
    """What `schema`'s constraints already prove, as `Spec.proof` keys -> the constraint (or
    index) that proves it: a check so proven needs no query of its own (`run_checkpoints`)."""
    proofs: dict[tuple[str, ...], str] = {}
    for kind, table, column, target, name in conn.execute(_CATALOG_SQL, {"schema": schema}):
        key = (kind, table, column) if target is None else (kind, table, column, target)
        proofs.setdefault(key, name)
    return proofs


def proven(spec: Spec, table: str, proofs: dict[tuple[str, ...], str]) -> Check | None:
    """The check as passed, when the catalog proves it; observed carries the zero GX would have
    counted (the report and the gate read the same fields either way)."""
    name = proofs.get(spec.proof) if spec.proof else None
    if name is None:
        return None
    zero = {"observed_value": 0} if spec.kind == "no_rows" else {"unexpected_count": 0}
    return Check(table, spec.name, True, {"proven_by_constraint": name, **zero})


def _gx_expectation(spec: Spec, table: str) -> Any:
    import great_expectations.expectations as gxe

    meta = {"check": spec.name, "table": table}
    if spec.kind == "row_count":
        return gxe.ExpectTableRowCountToEqual(value=spec.value, meta=meta)
    if spec.kind == "unique":
        return gxe.ExpectColumnValuesToBeUnique(column=spec.column, meta=meta)
    if spec.kind == "not_null":
        return gxe.ExpectColumnValuesToNotBeNull(column=spec.column, meta=meta)
    if spec.kind == "in_set":
        return gxe.ExpectColumnValuesToBeInSet(column=spec.column, value_set=spec.value, meta=meta)
    if spec.kind == "no_rows":
        return gxe.UnexpectedRowsExpectation(unexpected_rows_query=gx_query(spec.value), description=spec.name,
                                             meta=meta)
    raise ValueError(f"unknown expectation kind {spec.kind!r}")


# --------------------------------------------------------------------------- ledger figures


def ledger_counts(conn: psycopg.Connection, run_id: str) -> dict[str, dict[str, Any]]:
    """Per collection: rows read, distinct records rejected (load and finalize) and what must remain.

    A load reject writes one row per bad field, hence DISTINCT record_id.
    """
    rejected = dict(conn.execute(  # a record whose file is missing is loaded: its reject is not a row's
        "SELECT collection, count(DISTINCT record_id) FROM pbm_meta.rejects WHERE run_id = %s AND stage <> 'files' "
        "GROUP BY 1", (run_id,)).fetchall())
    out: dict[str, dict[str, Any]] = {}
    for coll, table, read, batches in conn.execute(
        """SELECT collection, min(target_table), sum(rows_read), count(*) FROM pbm_meta.batches
            WHERE run_id = %s AND status = 'done' GROUP BY collection ORDER BY collection""", (run_id,)):
        rej = int(rejected.get(coll, 0))
        out[coll] = {"table": table, "read": int(read), "rejected": rej, "expected": int(read) - rej,
                     "batches": int(batches)}
    return out


def expected_sums(conn: psycopg.Connection, table: Table, run_id: str) -> list[tuple[str, str, str]]:
    """The ledger's (lo, hi, checksum) of each batch of the table, in "C" order of lo."""
    return conn.execute(
        'SELECT lo, hi, checksum FROM pbm_meta.batches WHERE run_id = %s AND collection = %s ORDER BY lo COLLATE "C"',
        (run_id, table.collection.name)).fetchall()


def compare_sums(table: Table, expected: list[tuple[str, str, str]], actual: dict[str | None, int],
                 seconds: float) -> Check:
    mismatched = []
    if actual.get(None):
        mismatched.append({"lo": None, "hi": expected[0][0] if expected else None, "expected": checksum.as_hex(0),
                           "actual": checksum.as_hex(actual[None]), "note": "rows below the first batch"})
    total_expected = total_actual = 0
    for lo, hi, want in expected:
        got = checksum.as_hex(actual.get(lo, 0))
        total_expected += int(want, 16)
        total_actual += actual.get(lo, 0)
        if got != want:
            mismatched.append({"lo": lo, "hi": hi, "expected": want, "actual": got})
    return Check(table.name, "checksums", not mismatched, {
        "batches": len(expected),
        "mismatched": len(mismatched),
        "examples": mismatched[:EXAMPLES],
        "expected": checksum.as_hex(total_expected),
        "actual": checksum.as_hex(total_actual + actual.get(None, 0)),
        "seconds": round(seconds, 3),
    })


def source_check(table: Table, source_rows: int, counts: dict[str, Any] | None) -> Check:
    """The ledger read every record the snapshot holds: no batch was lost between plan and load."""
    read = counts["read"] if counts else 0
    return Check(table.name, "source_rows", read == source_rows,
                 {"source": source_rows, "read": read, "batches": counts["batches"] if counts else 0})


# --------------------------------------------------------------------------- GX


def sqlalchemy_url(pg_url: str, schema: str | None = None) -> str:
    """The libpq URL as a SQLAlchemy URL for psycopg 3 (GX's SQL datasource speaks SQLAlchemy),
    with `schema` as the search_path (GX 1.x deprecates a schema per table asset)."""
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import URL

    p = conninfo_to_dict(pg_url)
    query = {"options": f"-c search_path={schema}"} if schema else {}
    return URL.create("postgresql+psycopg", username=p.get("user"), password=p.get("password"),
                      host=p.get("host"), port=int(p["port"]) if p.get("port") else None,
                      database=p.get("dbname"), query=query).render_as_string(hide_password=False)


def column_types(pg_url: str, schema: str) -> set[str]:
    """The type names (as `format_type` prints them, without array brackets) of every column in
    `schema`: what SQLAlchemy will meet when GX reflects the tables."""
    sql = ("SELECT DISTINCT regexp_replace(format_type(a.atttypid, NULL), '(\\[\\])+$', '') "
           "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
           "JOIN pg_namespace n ON n.oid = c.relnamespace "
           "WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'm', 'p') AND a.attnum > 0 AND NOT a.attisdropped")
    with psycopg.connect(pg_url) as conn:
        return {name for (name,) in conn.execute(sql, (schema,))}


def teach_types(dialect: Any, type_names: set[str]) -> list[str]:
    """Give this engine's dialect a type for every column type SQLAlchemy does not know.

    GX reflects each table and compiles every column's type (`table.column_types`); a type
    SQLAlchemy cannot name (`point`, an extension's `citext`, a domain) reflects as NullType, which
    does not compile, and then every check of that table fails for a reason that has nothing to
    do with the data. The types taught here compile to their PostgreSQL name and are only ever
    read back, never used to write. The dialect instance gets its own copy of the lookup, so no
    other engine in the process changes. Returns the names it added."""
    known = dict(dialect.ischema_names)
    added = sorted(n for n in type_names if n.lower() not in known)
    base = _named_type_base()
    for name in added:
        ident = "".join(ch if ch.isalnum() else "_" for ch in name)
        known[name.lower()] = type(f"PG_{ident}", (base,), {"pg_name": name, "cache_ok": True})
    dialect.ischema_names = known
    return added


@functools.cache
def _named_type_base() -> type:
    from sqlalchemy.types import UserDefinedType

    class NamedType(UserDefinedType):
        """A PostgreSQL type known by name only (reflection passes arguments it does not need)."""

        pg_name = "unknown"
        cache_ok = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def get_col_spec(self, **kw: Any) -> str:
            return self.pg_name

    return NamedType


def _gx_context(docs_dir: Path) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={DOCS_SITE: {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _observed(result: Any) -> dict[str, Any]:
    r = result.result or {}
    out: dict[str, Any] = {}
    for key in ("observed_value", "element_count", "unexpected_count", "missing_count"):
        if key in r:
            out[key] = r[key]
    # exception_info is flat when the expectation raised, keyed by metric when a query failed
    info = result.exception_info or {}
    found = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [str(i.get("exception_message")) for i in found if i.get("exception_message")]
    if messages:
        out["exception"] = messages[0][:500]
    return out


def _examples(conn: psycopg.Connection, spec: Spec, batch: str) -> list[str]:
    """Ids (or values) behind a failing check, fetched only when it failed: asking GX for them
    costs one more scan of the table per passing column check."""
    if spec.kind == "no_rows":
        sql = spec.value.replace(BATCH, batch)
    elif spec.kind == "not_null":
        sql = f"SELECT id FROM {batch} WHERE {qi(spec.column)} IS NULL"
    elif spec.kind == "in_set":
        sql = (f"SELECT DISTINCT {qi(spec.column)} FROM {batch} WHERE {qi(spec.column)} NOT IN "
               f"({ql_list(spec.value)})")
    else:
        return []
    try:
        return [str(r[0]) for r in conn.execute(f"SELECT * FROM ({sql}) e LIMIT {EXAMPLES}")]
    except psycopg.Error:
        return []


def run_checkpoints(pg_url: str, schema: str, specs: dict[str, list[Spec]], run_name: str, docs_dir: Path,
                    proofs: dict[tuple[str, ...], str] | None = None,
                    ) -> tuple[list[Check], dict[str, Any], str, dict[str, float]]:
    """One checkpoint per table (a whole-table batch) for the specs `proofs` (`catalog_proofs`)
    does not prove, those passing with the constraint's name; returns the checks in spec order,
    full results, the Data Docs index and timings (GX import, each table, Data Docs)."""
    started = time.monotonic()
    import_gx()  # the rest of a head start (`gx_import`), or all of it
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    timings = {"gx_import": time.monotonic() - started}

    os.environ[GX_URL_ENV] = sqlalchemy_url(pg_url, schema)
    checks: list[Check] = []
    full: dict[str, Any] = {}
    try:
        ctx = _gx_context(docs_dir)
        ds = ctx.data_sources.add_postgres("pbmigrate", connection_string="${" + GX_URL_ENV + "}")
        unknown = column_types(pg_url, schema)
        for engine in (ds.get_engine(), ds.get_execution_engine().engine):  # the asset's, the checks'
            teach_types(engine.dialect, unknown)
        by_name = {}
        for tname, table_specs_ in specs.items():
            table_started = time.monotonic()
            by_name[tname] = {s.name: s for s in table_specs_}
            done = {c.name: c for c in (proven(s, tname, proofs or {}) for s in table_specs_) if c}
            todo = [s for s in table_specs_ if s.name not in done]
            if todo:
                asset = ds.add_table_asset(tname, table_name=qi(tname))
                batch = asset.add_batch_definition_whole_table("whole table")
                # the suite built whole: one store write, not one per expectation
                suite = ctx.suites.add(gx.ExpectationSuite(
                    name=tname, expectations=[_gx_expectation(spec, tname) for spec in todo]))
                vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=tname))
                cp = ctx.checkpoints.add(gx.Checkpoint(name=tname, validation_definitions=[vd], actions=[],
                                                       result_format=RESULT_FORMAT))
                result = cp.run(run_id=RunIdentifier(run_name=run_name))
                for vr in result.run_results.values():
                    full[tname] = vr.to_json_dict()
                    for er in vr.results:
                        name = er.expectation_config.meta["check"]
                        done[name] = Check(tname, name, bool(er.success), _observed(er))
            missing = {"exception": "GX returned no result for this expectation"}  # never a silent pass
            checks.extend(done.get(spec.name) or Check(tname, spec.name, False, dict(missing))
                          for spec in table_specs_)
            timings[f"gx:{tname}"] = time.monotonic() - table_started
        with psycopg.connect(pg_url) as conn:
            for c in checks:
                spec = by_name[c.table][c.name]
                if not c.success:
                    c.observed["examples"] = _examples(conn, spec, f"{qi(schema)}.{qi(c.table)}")
        docs_started = time.monotonic()
        index = ctx.build_data_docs(site_names=[DOCS_SITE])[DOCS_SITE]
        timings["data_docs"] = time.monotonic() - docs_started
        ds.get_engine().dispose()
    finally:
        os.environ.pop(GX_URL_ENV, None)
    return checks, full, index.removeprefix("file://"), timings


GX_UNUSED = ("scipy.stats", "altair")  # imported by GX for an expectation we never build: `deferred`


def import_gx() -> None:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before the import: it logs a lot
    if "great_expectations" not in sys.modules:
        for name in GX_UNUSED:
            deferred.defer(name)
    import great_expectations  # noqa: F401


def gx_import() -> threading.Event:
    """GX's import started in a thread, set when it ends (or fails: `run_checkpoints` then raises
    the error itself). It is 3-4 s of Python before GX can check anything, the longest part of
    validation on the critical path, so it starts first, beside the source counts."""
    done = threading.Event()

    def work() -> None:
        try:
            with contextlib.suppress(Exception):  # run_checkpoints' own import raises it again, in the task's thread
                import_gx()
        finally:
            done.set()

    threading.Thread(target=work, name="pbm-gx-import", daemon=True).start()
    return done


# --------------------------------------------------------------------------- the task


def validation_dir(run: dict) -> Path:
    return run_dir(run["target_schema"], run["run_id"]) / "validation"


def record_checks(conn: psycopg.Connection, run_id: str, checks: list[Check]) -> None:
    """Replace this run's checks (a re-validation supersedes the last one, gate included)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("DELETE FROM pbm_meta.checks WHERE run_id = %s", (run_id,))
        cur.executemany(
            "INSERT INTO pbm_meta.checks (run_id, target_table, check_name, success, observed) "
            "VALUES (%s, %s, %s, %s, %s)",
            [(run_id, c.table, c.name, c.success, json.dumps(c.observed, default=str)) for c in checks],
        )


def summarize(run_id: str, checks: list[Check], seconds: dict[str, float], paths: dict[str, str]) -> dict:
    """The compact summary for XCom: counts per table and the first failures."""
    tables: dict[str, dict[str, Any]] = {}
    for c in checks:
        t = tables.setdefault(c.table, {"passed": 0, "failed": 0})
        t["passed" if c.success else "failed"] += 1
    failures = [c.as_dict() for c in checks if not c.success]
    return {
        "run_id": run_id,
        "success": not failures,
        "checks": len(checks),
        "failed": len(failures),
        "tables": tables,
        "failures": failures[:SUMMARY_FAILURES],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        **paths,
    }


def ledger_checks(pg_url: str, schema: str, plan: Plan, run_id: str, source_counts: dict[str, int],
                  workers: int = 2, widen: threading.Event | None = None) -> list[Check]:
    """Source coverage and per-batch checksums of every table, on connections of their own
    (`workers` aggregates at a time, largest first; a table's junctions are aggregates of their own,
    so the table with a multi relation is not one long pole). With `widen`, all but one worker
    wait for it: GX's import, on the critical path, then has a core of its own instead of two
    thirds of one. A table's `seconds` is the sum of its aggregates'."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        counts = ledger_counts(conn, run_id)
        expected = {t.name: expected_sums(conn, t, run_id) for t in plan.tables}
        los = {name: [lo for lo, _, _ in batches] for name, batches in expected.items()}
        junction_rows = dict(conn.execute("SELECT collection, sum(junction_rows) FROM pbm_meta.batches "
                                          "WHERE run_id = %s GROUP BY 1", (run_id,)).fetchall())
    work = []  # (rows it aggregates, table, query): a junction row costs about what a table row does
    for t in plan.tables:
        rows, joined = counts.get(t.collection.name, {}).get("read", 0), junction_rows.get(t.collection.name) or 0
        work += [(joined if i else rows, t, part) for i, part in enumerate(ledger.target_sum_parts(schema, t))]
    todo: queue.SimpleQueue[tuple[Table, str]] = queue.SimpleQueue()
    for _, t, part in sorted(work, key=lambda w: -w[0]):
        todo.put((t, part))
    actual: dict[str, dict] = {t.name: {} for t in plan.tables}
    seconds = dict.fromkeys(actual, 0.0)
    lock = threading.Lock()

    def worker(wait: threading.Event | None) -> None:
        if wait is not None:
            wait.wait()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while True:
                try:
                    t, part = todo.get_nowait()
                except queue.Empty:
                    return
                started = time.monotonic()
                sums = ledger.run_part(conn, part, los[t.name])
                with lock:
                    actual[t.name] = ledger.merge_sums(actual[t.name], sums)
                    seconds[t.name] += time.monotonic() - started

    with ThreadPoolExecutor(workers, thread_name_prefix="pbm-checksum") as pool:
        for f in [pool.submit(worker, None if i == 0 else widen) for i in range(workers)]:
            f.result()
    checks = []
    for t in plan.tables:
        checks.append(source_check(t, source_counts[t.collection.name], counts.get(t.collection.name)))
        checks.append(compare_sums(t, expected[t.name], actual[t.name], seconds[t.name]))
    return checks


def resynced(conn: psycopg.Connection, run: dict) -> bool:
    """True once a re-sync wrote the staging schema: the ledger then describes the full load's
    snapshot, not the target, so the checksums must come from comparing with the source again."""
    if run.get("resynced"):
        return True
    if not conn.execute("SELECT to_regclass('pbm_meta.resyncs') IS NOT NULL").fetchone()[0]:
        return False
    return last_resync(conn, run["run_id"]) is not None


def resync_checks(conn: psycopg.Connection, source: Source, plan: Plan, schema: str, run_id: str,
                  source_counts: dict[str, int]) -> tuple[list[Check], dict[str, int]]:
    """After a re-sync: each table against the (re-sync's) snapshot, range by range
    (`resync.compare_collection`, the ledger's digests on both sides); returns the checks and the
    row count each table must hold (source rows less rejects)."""
    checks, expected = [], {}
    for t in plan.tables:
        c = compare_collection(conn, source, t, schema, run_id=run_id)
        expected[t.collection.name] = c["source_rows"] - c["rejected"]
        checks.append(Check(t.name, "source_rows", c["source_rows"] == source_counts[t.collection.name],
                            {"source": source_counts[t.collection.name], "read": c["source_rows"],
                             "mode": "compared after re-sync"}))
        checks.append(Check(t.name, "checksums", c["equal"], {
            "mode": "compared with the source after re-sync", "ranges": c["ranges"], "mismatched": c["mismatched"],
            "missing": c["missing"], "extra": c["extra"], "changed": c["changed"],
            "examples": c["examples"][:EXAMPLES], "seconds": c["seconds"]}))
    return checks, expected


def validate(conn: psycopg.Connection, pg_url: str, plan: Plan, run: dict, source_counts: dict[str, int],
             out_dir: Path, source: Source | None = None, files: dict | None = None,
             gx_imported: threading.Event | None = None) -> dict:
    """Checksums, source coverage and GX checkpoints for every table of `plan` in the staging schema.

    The checksums and the file checks (every object re-read) run in threads beside GX: they
    mostly wait for PostgreSQL and the store, and GX's import and bookkeeping are Python work they
    do not need, so side by side the three take little more than the longest; one checksum
    worker waits for GX's import (`gx_imported`, from `gx_import`). With `source` (after
    a re-sync) the tables are compared with it first instead, in this thread (a SQLite connection
    stays in its thread).
    """
    started = time.monotonic()
    gx_imported = gx_imported or gx_import()
    run_id, schema = run["run_id"], run["staging_schema"]
    out_dir.mkdir(parents=True, exist_ok=True)
    if source is not None:
        checks, expected = resync_checks(conn, source, plan, schema, run_id, source_counts)
        sums_seconds = time.monotonic() - started
    else:
        expected = {c: v["expected"] for c, v in ledger_counts(conn, run_id).items()}
    specs = {t.name: table_specs(t, schema, expected.get(t.collection.name, 0)) for t in plan.tables}
    proofs = catalog_proofs(conn, schema)
    with ThreadPoolExecutor(2, thread_name_prefix="pbm-checks") as pool:
        if source is None:
            ledger_future = pool.submit(_timed, ledger_checks, pg_url, schema, plan, run_id, source_counts, 2,
                                        gx_imported)
        files_future = pool.submit(_timed, _file_checks, pg_url, plan, run, files)
        gx_started = time.monotonic()
        gx_checks, full, index, timings = run_checkpoints(pg_url, schema, specs, run_id, out_dir / "data_docs",
                                                           proofs)
        gx_seconds = time.monotonic() - gx_started
        if source is None:
            sums_seconds, checks = ledger_future.result()
        files_seconds, objects = files_future.result()
    checks.extend(gx_checks)
    checks.extend(objects)
    record_checks(conn, run_id, checks)
    seconds = {"checksums": sums_seconds, "gx": gx_seconds, "gx_import": timings["gx_import"],
               "data_docs": timings["data_docs"], "files": files_seconds, "total": time.monotonic() - started}
    paths = {"results": str(out_dir / "results.json"), "data_docs": index}
    summary = summarize(run_id, checks, seconds, paths)
    for name, t in summary["tables"].items():
        t["gx_seconds"] = round(timings.get(f"gx:{name}", 0.0), 3)
    (out_dir / "results.json").write_text(json.dumps(
        {"run_id": run_id, "schema": schema, "checks": [c.as_dict() for c in checks], "gx": full},
        indent=1, default=str))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _file_checks(pg_url: str, plan: Plan, run: dict, files: dict | None) -> list[Check]:
    """Every object of the file store re-read (size, sha256, md5), on a connection of its own."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return file_checks(conn, plan, run, files)


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = fn(*args)
    return time.monotonic() - started, result


def validate_run(run: dict, pg_url: str, api: dict | None = None, files: dict | None = None) -> dict:
    """The DAG's validation task: every check of every table, recorded, with a summary for XCom."""
    gx_imported = gx_import()
    source = open_run_source(run, api)
    try:
        plan = run_plan(run, source)
        source_counts = {t.collection.name: source.count(t.collection) for t in plan.tables}
        with psycopg.connect(pg_url, autocommit=True) as conn:
            after_resync = resynced(conn, run)
            if after_resync:
                log.info("a re-sync wrote %s: comparing it with %s instead of the ledger's checksums",
                         run["staging_schema"], run.get("snapshot_path") or "the API")
            summary = validate(conn, pg_url, plan, run, source_counts, validation_dir(run),
                               source if after_resync else None, files, gx_imported)
    finally:
        source.close()
    for name, t in summary["tables"].items():
        metrics.push_checks(t["failed"], t["passed"], run["run_id"], name)
    metrics.push_checks(summary["failed"], summary["checks"] - summary["failed"], run["run_id"])
    lines = [f"validation of {run['staging_schema']}: {summary['checks'] - summary['failed']} of "
             f"{summary['checks']} checks passed in {summary['seconds']['total']:.1f} s "
             f"(checksums {summary['seconds']['checksums']:.1f} s beside GX {summary['seconds']['gx']:.1f} s)"]
    lines += [f"  FAILED {f['table']}: {f['check']} {json.dumps(f['observed'], default=str)}"
              for f in summary["failures"]]
    lines += [f"full results: {summary['results']}", f"GX Data Docs: {summary['data_docs']}"]
    log.info("%s", "\n".join(lines))
    return summary
