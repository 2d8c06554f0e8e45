"""Load tasks: ranges packed so that every slot stays busy to the end, each range loaded once."""

from __future__ import annotations

import random

from pbmigrate.pipeline import pack_ranges


def test_ranges_are_packed_into_balanced_tasks_largest_first() -> None:
    rng = random.Random(7)
    ranges = [{"collection": f"c{i % 5}", "lo": f"{i:05d}", "hi": f"{i:05d}z", "rows": rng.choice([250_000, 200_000,
              150_000, 50_000, 3])} for i in range(23)]
    units = pack_ranges(ranges, 4)
    assert len(units) == 4
    packed = [r for u in units for r in u["ranges"]]
    assert sorted(r["lo"] for r in packed) == sorted(r["lo"] for r in ranges)  # each range once
    sizes = [u["rows"] for u in units]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes == [sum(r["rows"] for r in u["ranges"]) for u in units]
    assert max(sizes) - min(sizes) <= 250_000  # no task longer than another by more than one range
    assert all(u["label"] for u in units)


def test_fewer_ranges_than_tasks_gives_one_task_per_range() -> None:
    ranges = [{"collection": "users", "lo": "a", "hi": "m", "rows": 10, "label": "users [a..m]"},
              {"collection": "users", "lo": "n", "hi": "z", "rows": 5, "label": "users [n..z]"}]
    units = pack_ranges(ranges, 4)
    assert [u["label"] for u in units] == ["users [a..m]", "users [n..z]"]
