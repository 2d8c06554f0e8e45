"""Finalize on PocketBase's 0.22 fixture seeded with dangling relations and case duplicates: the
orphan policy, the rejects it records, and a ledger that still matches what the target holds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from pbmigrate import checksum, context, tasks
from pbmigrate.load import ledger
from pbmigrate.source.sqlite import SqliteSource


def _seed(db: Path) -> None:
    with sqlite3.connect(db) as raw:  # raw SQL writes, as a script outside PocketBase might do
        raw.execute("UPDATE demo5 SET rel_one = 'missing0000001' WHERE id = 'la4y2w4o98acwuj'")
        raw.execute("UPDATE demo4 SET self_rel_many = '[\"i9naidtvr6qsgb4\",\"nope00000000001\"]' "
                    "WHERE id = 'qzaqccwrmva4o1n'")
        # PocketBase declares a case-insensitive unique title that SQLite does not enforce (drift)
        raw.execute("UPDATE _collections SET indexes = json_insert(indexes, '$[#]', 'CREATE UNIQUE INDEX "
                    "`idx_title_nocase` ON `demo3` (`title` COLLATE NOCASE)') WHERE name = 'demo3'")
        raw.execute("UPDATE demo3 SET title = 'SameName' WHERE id = '1tmknxy2868d869'")
        raw.execute("UPDATE demo3 SET title = 'samename' WHERE id = 'mk5fmymtx4wsprk'")


def _migrate(pg_url: str, pb_data: Path, target: str, orphans: str) -> dict:
    params = tasks.run_params(source_path=str(pb_data), target_schema=target, mapping="", batch_size=2,
                                 collections=[], orphans=orphans)
    run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=f"test-{target}")
    tasks.create_schema(run, pg_url)
    batches = tasks.plan_batches(run)
    assert len(batches) == 2  # one load task per slot, both holding every range, largest first
    ranges = batches[0]["ranges"]
    assert all(b["ranges"] == ranges for b in batches) and len(ranges) > len(batches)
    sizes = [r["rows"] for r in ranges]
    assert sizes == sorted(sizes, reverse=True) and 1 in sizes
    loaded = [b for batch in batches for b in tasks.run_batch(run, batch, pg_url)["batches"]]
    assert sorted((b["collection"], b["lo"]) for b in loaded) == sorted((r["collection"], r["lo"]) for r in ranges)
    run["finalize"] = tasks.finalize_run(run, pg_url)
    return run


def _assert_ledger_matches_target(pg_url: str, run: dict) -> None:
    source = SqliteSource(run["snapshot_path"])
    plan = context.run_plan(run, source)
    source.close()
    with psycopg.connect(pg_url) as conn:
        for t in plan.tables:
            batches = conn.execute(
                "SELECT lo, checksum FROM pbm_meta.batches WHERE run_id = %s AND collection = %s "
                'ORDER BY lo COLLATE "C"', (run["run_id"], t.collection.name)).fetchall()
            held = ledger.target_sums(conn, run["staging_schema"], t, [lo for lo, _ in batches])
            assert None not in held, f"{t.name}: rows outside every batch"
            for lo, expected in batches:
                assert checksum.as_hex(held.get(lo, 0)) == expected, f"{t.name} batch {lo}"


@pytest.mark.parametrize("orphans", ["reject", "null"])
def test_orphans_and_duplicates_are_decided_recorded_and_the_ledger_still_matches(fresh_pg_url, fixture_022,
                                                                                orphans):
    _seed(fixture_022 / "data.db")
    run = _migrate(fresh_pg_url, fixture_022, f"fin_{orphans}", orphans)
    report = run["finalize"]
    assert report["duplicates"] == {"demo3.title": 1}  # the case-only twin, by the declared NOCASE index
    with psycopg.connect(fresh_pg_url) as conn:
        rejects = conn.execute("SELECT collection, record_id, reason FROM pbm_meta.rejects WHERE run_id = %s "
                               "AND stage = 'finalize'", (run["run_id"],)).fetchall()
        kept = conn.execute(f"SELECT title FROM {run['staging_schema']}.demo3").fetchall()
        junction = conn.execute(f"SELECT count(*) FROM {run['staging_schema']}.demo4_self_rel_many "
                                "WHERE target_id = 'nope00000000001'").fetchone()
    assert ("demo3", "mk5fmymtx4wsprk") in {(c, r) for c, r, _ in rejects}
    assert ("SameName",) in kept and ("samename",) not in kept
    assert junction == (0,)  # a dangling id never reaches the junction table
    if orphans == "null":
        assert report["orphans"]["demo5.rel_one"] >= 1 and report["orphan_rejects"] == 0
    else:
        assert {("demo5", "la4y2w4o98acwuj"), ("demo4", "qzaqccwrmva4o1n")} <= {(c, r) for c, r, _ in rejects}
    _assert_ledger_matches_target(fresh_pg_url, run)


def test_finalize_run_twice_changes_nothing(fresh_pg_url, fixture_022):
    _seed(fixture_022 / "data.db")
    run = _migrate(fresh_pg_url, fixture_022, "twice", "reject")
    again = tasks.finalize_run(run, fresh_pg_url)
    timings = ("seconds", "steps")
    first = {k: v for k, v in run["finalize"].items() if k not in timings}
    assert {k: v for k, v in again.items() if k not in timings} == first
    _assert_ledger_matches_target(fresh_pg_url, run)


def _seed_orphans_only(db: Path) -> None:
    """Dangling ids but no duplicate: `prebuild` adds and validates the foreign keys itself, and
    one of them meets the orphan."""
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE demo5 SET rel_one = 'missing0000001' WHERE id = 'la4y2w4o98acwuj'")
        raw.execute("UPDATE demo4 SET self_rel_many = '[\"i9naidtvr6qsgb4\",\"nope00000000001\"]' "
                    "WHERE id = 'qzaqccwrmva4o1n'")


def _foreign_keys(conn: psycopg.Connection, schema: str) -> dict[str, bool]:
    return dict(conn.execute(
        """SELECT c.conname, c.convalidated FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
            WHERE n.nspname = %s AND c.contype = 'f'""", (schema,)).fetchall())


@pytest.mark.parametrize("orphans", ["reject", "null"])
def test_orphans_without_duplicates_are_decided_with_no_key_acting_on_delete(fresh_pg_url, fixture_022, orphans):
    """The keys `prebuild` validated are dropped before any row is rejected: demo5's rows that point
    at a rejected demo4 row are decided and recorded too (a key's ON DELETE CASCADE / SET NULL would
    have changed them silently), and the ledger still matches what the target holds."""
    _seed_orphans_only(fixture_022 / "data.db")
    run = _migrate(fresh_pg_url, fixture_022, f"orph_{orphans}", orphans)
    with psycopg.connect(fresh_pg_url) as conn:
        rejected = {(c, r) for c, r in conn.execute(
            "SELECT collection, record_id FROM pbm_meta.rejects WHERE run_id = %s AND stage = 'finalize'",
            (run["run_id"],))}
        keys = _foreign_keys(conn, run["staging_schema"])
    assert run["finalize"]["duplicates"] == {}
    if orphans == "reject":  # the dangling rows, then each row that pointed at a rejected one
        assert rejected == {("demo5", "la4y2w4o98acwuj"), ("demo4", "qzaqccwrmva4o1n"),
                            ("demo4", "i9naidtvr6qsgb4"), ("demo5", "qjeql998mtp1azp")}
    else:
        assert rejected == set() and run["finalize"]["orphans"]["demo5.rel_one"] == 1
    assert len(keys) == run["finalize"]["foreign_keys"] and all(keys.values())
    _assert_ledger_matches_target(fresh_pg_url, run)


def test_clean_data_gets_valid_keys_from_prebuild_and_no_index_an_index_already_leads(fresh_pg_url, fixture_022):
    """With nothing to decide, every foreign key is valid; a foreign key column that a whole-table
    index leads gets no index of its own, one that only a partial index leads still does."""
    with sqlite3.connect(fixture_022 / "data.db") as raw:
        raw.execute("UPDATE _collections SET indexes = json_insert(indexes, '$[#]', 'CREATE INDEX "
                    "`idx_demo4_self` ON `demo4` (`self_rel_one`, `created`)') WHERE name = 'demo4'")
    run = _migrate(fresh_pg_url, fixture_022, "clean", "reject")
    schema = run["staging_schema"]
    with psycopg.connect(fresh_pg_url) as conn:
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))}
        keys = _foreign_keys(conn, schema)
    assert "idx_demo4_self" in indexes and "demo4_self_rel_one_fk_idx" not in indexes
    assert {"demo4_rel_one_unique_fk_idx", "demo4_rel_one_cascade_fk_idx", "demo5_rel_one_fk_idx"} <= indexes
    assert len(keys) == run["finalize"]["foreign_keys"] > 0 and all(keys.values())
    assert run["finalize"]["orphans"] == {} and run["finalize"]["orphan_rejects"] == 0
