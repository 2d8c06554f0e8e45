"""Load tasks: one per slot, all sharing the run's ranges, so that both slots stay busy to the end;
each range loaded exactly once, and a task that succeeds leaves every range done."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import psycopg

from pbmigrate import tasks
from pbmigrate.tasks import share_ranges


def _ranges() -> list[dict]:
    return [{"collection": "users", "lo": "a", "hi": "m", "rows": 900},
            {"collection": "users", "lo": "n", "hi": "z", "rows": 5},
            {"collection": "tags", "lo": "0", "hi": "9", "rows": 30}]


def test_each_task_holds_every_range_largest_first() -> None:
    units = share_ranges(_ranges(), 2)
    assert len(units) == 2
    for u in units:
        assert [r["lo"] for r in u["ranges"]] == ["a", "0", "n"]
        assert u["shared"] and u["rows"] == 935
    assert [u["label"] for u in units] == ["load 1 of 2: 3 batches, 935 rows, shared",
                                           "load 2 of 2: 3 batches, 935 rows, shared"]
    assert len(share_ranges(_ranges()[:1], 4)) == 1  # never a task without a range to take


def _run(fixture_022, pg_url: str, run_id: str, most: int | None = None, slots: int = 2) -> tuple[dict, list[dict]]:
    params = tasks.run_params(source_path=str(fixture_022), target_schema="shared", mapping="", batch_size=3,
                              collections=[], orphans="reject")
    run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=run_id)
    tasks.create_schema(run, pg_url)
    return run, tasks.plan_batches(run, max_batches=most, slots=slots)


def _ledger(pg_url: str, run_id: str) -> list[tuple[str, str]]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT collection, lo FROM pbm_meta.batches WHERE run_id = %s AND status = 'done'",
                            (run_id,)).fetchall()


def test_two_tasks_at_once_load_every_range_once_between_them(fixture_022, fresh_pg_url) -> None:
    run, units = _run(fixture_022, fresh_pg_url, "two")
    assert len(units) == 2 and len(units[0]["ranges"]) > 4
    assert len(_run(fixture_022, fresh_pg_url, "capped", most=1, slots=8)[1]) == 1  # max_map_length holds
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:  # as two task processes
        out = list(pool.map(tasks.run_batch, [run] * 2, units, [fresh_pg_url] * 2))
    mine = [(b["collection"], b["lo"]) for r in out for b in r["batches"]]
    every = [(r["collection"], r["lo"]) for r in units[0]["ranges"]]
    assert sorted(mine) == sorted(every)  # each range loaded by exactly one of the two
    assert sorted(_ledger(fresh_pg_url, run["run_id"])) == sorted(every)
    again = tasks.run_batch(run, units[0], fresh_pg_url)  # a re-run finds everything done
    assert again["batches"] == [] and again["rows_read"] == 0


def test_a_range_held_by_a_task_that_then_fails_is_loaded_by_the_other(fixture_022, fresh_pg_url) -> None:
    run, units = _run(fixture_022, fresh_pg_url, "peer")
    held = units[0]["ranges"][0]
    key = f"pbm-batch/{run['run_id']}/{held['collection']}/{held['lo']}"
    with psycopg.connect(fresh_pg_url) as peer:  # a peer task in the middle of that batch
        peer.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
        out: list[dict] = []
        task = threading.Thread(target=lambda: out.append(tasks.run_batch(run, units[1], fresh_pg_url)))
        task.start()
        deadline = time.monotonic() + 30
        while len(_ledger(fresh_pg_url, run["run_id"])) < len(units[0]["ranges"]) - 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)
        assert task.is_alive()  # every other range is done; it waits for the held one
        assert (held["collection"], held["lo"]) not in _ledger(fresh_pg_url, run["run_id"])
        peer.rollback()  # the peer fails: its transaction and its lock go
    task.join(30)
    assert not task.is_alive()
    assert (held["collection"], held["lo"]) in [(b["collection"], b["lo"]) for b in out[0]["batches"]]
    assert len(_ledger(fresh_pg_url, run["run_id"])) == len(units[0]["ranges"])
