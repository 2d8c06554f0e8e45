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
