"""Load tasks: neighbouring ranges of a collection packed so that slots stay busy to the end,
each range loaded once, each task named `collection [first..last]` for the UI."""

from __future__ import annotations

import random
import re

import pytest

from pbmigrate import tasks
from pbmigrate.errors import ParamError
from pbmigrate.tasks import pack_ranges

LABEL = re.compile(r"^(\w+) \[(\w+)\.\.(\w+)\]$")


def _ranges(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for c in range(5):  # plan order: a collection's ranges in id order, collection after collection
        for i in range(n):
            out.append({"collection": f"c{c}", "lo": f"{i:05d}", "hi": f"{i:05d}z",
                        "rows": rng.choice([250_000, 200_000, 150_000, 50_000, 3])})
    return out


def test_neighbouring_ranges_are_joined_up_to_a_share_of_all_rows_largest_first() -> None:
    ranges = _ranges(5)
    units = pack_ranges(ranges, 4)
    packed = [r for u in units for r in u["ranges"]]
    assert sorted((r["collection"], r["lo"]) for r in packed) == sorted((r["collection"], r["lo"]) for r in ranges)
    limit = -(-sum(r["rows"] for r in ranges) // 4)
    sizes = [u["rows"] for u in units]
    assert sizes == sorted(sizes, reverse=True) and sizes == [sum(r["rows"] for r in u["ranges"]) for u in units]
    assert all(s <= limit or len(u["ranges"]) == 1 for s, u in zip(sizes, units))
    assert len(units) < len(ranges)
    for u in units:
        collection, lo, hi = LABEL.match(u["label"]).groups()
        assert {r["collection"] for r in u["ranges"]} == {collection}
        assert (lo, hi) == (u["ranges"][0]["lo"], u["ranges"][-1]["hi"])
        los = [r["lo"] for r in u["ranges"]]
        assert los == sorted(los)  # neighbours, in id order


def test_a_range_larger_than_the_share_stays_alone_and_small_collections_keep_their_own_task() -> None:
    ranges = [{"collection": "users", "lo": "a", "hi": "m", "rows": 900},
              {"collection": "users", "lo": "n", "hi": "z", "rows": 5},
              {"collection": "tags", "lo": "0", "hi": "9", "rows": 3}]
    units = pack_ranges(ranges, 4)
    assert [u["label"] for u in units] == ["users [a..m]", "users [n..z]", "tags [0..9]"]


def test_more_load_tasks_than_airflow_can_map_fail_with_a_batch_size_that_fits(fixture_022, fresh_pg_url) -> None:
    def planned(batch_size: int, run_id: str, most: int) -> list[dict]:
        params = tasks.run_params(source_path=str(fixture_022), target_schema="mapped", mapping="",
                                  batch_size=batch_size, collections=[], orphans="reject")
        run = tasks.prepare(params=params, pg_url=fresh_pg_url, dag_run_id=run_id)
        return tasks.plan_batches(run, max_batches=most, slots=8)

    with pytest.raises(ParamError, match=r"exceed Airflow's max_map_length \(10\); raise batch_size to (\d+)") as exc:
        planned(1, "small", 10)
    fits = int(re.search(r"batch_size to (\d+)", str(exc.value)).group(1))
    assert fits > 1 and len(planned(fits, "fits", 10)) <= 10
    with pytest.raises(ParamError, match=r"max_map_length \(3\); 8 collections have rows and each needs a task"):
        planned(fits, "few", 3)  # no batch_size helps
