"""Per-range checksums of a collection on both sides: the re-sync's mode for collections without
an `updated` field (only ranges that hash differently are written again), and validation's check
after a re-sync, when the ledger's batch checksums describe the full load's snapshot instead.

The source side is the load's columnar conversion and digest; the target side is `ledger`'s SQL
digest. Rows recorded as rejects are left out of the source side, and dangling ids the `orphans`
policy nulled are explained, not reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from pbmigrate import checksum
from pbmigrate.load.columnar.read import Chunk
from pbmigrate.plan.model import Plan, Table
from pbmigrate.resync import reads
from pbmigrate.resync.cascade import Cascade
from pbmigrate.resync.rows import Reasons
from pbmigrate.resync.table import RANGE_ROWS, TableSync
from pbmigrate.source import Source


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


def compare(sync: TableSync, source: Source, range_rows: int, *, repair: bool) -> Iterator[RangeDiff]:
    """Per-range checksums of source and target; with `repair`, copy the ranges that differ."""
    after = None
    for chunk in reads.ordered_chunks(source, sync.table, range_rows):
        ids = chunk.batch.column(f"c{sync.id_pos}").to_pylist()
        yield _compare_range(sync, chunk, ids, after, ids[-1], repair)
        after = ids[-1]
    n, target_sum = sync.range_sum(after, None)  # target ids past the last source id: all extra
    if n:
        sync.result.ranges_compared += 1
        diff = RangeDiff(after, None, 0, n, checksum.as_hex(0), checksum.as_hex(target_sum), extra=n)
        for part in sync.target_tail(after):
            diff.examples = (diff.examples + part)[:5]
            if repair:
                sync.run.doom(sync.table.name, part, "deleted")
                sync.result.deleted += len(part)
        if repair:
            sync.result.ranges_recopied += 1
        yield diff


def _compare_range(sync: TableSync, chunk: Chunk, ids: list[str], after: str | None, upto: str,
                   repair: bool) -> RangeDiff:
    sync.result.ranges_compared += 1
    rows, rejects = sync.convert(chunk)
    index = {rid: n for n, rid in enumerate(rows.ids)}
    expected: list[int] = []  # rows the target should hold
    retry: list[int] = []  # rejected for a dangling relation: has the parent arrived?
    unrecorded: dict[str, Reasons] = {}  # no longer converts, and no reject says so yet
    total = rejected = 0
    for rid in ids:
        n = index.get(rid)
        if rid in sync.rejected:
            sync.seen_rejected.add(rid)
            rejected += 1
            if n is not None and not sync.settled_reject(rid):
                retry.append(n)
        elif n is not None:
            total += rows.digests[n]
            expected.append(n)
        else:
            unrecorded[rid] = rejects.get(rid, [("?", "row failed to convert")])
    n_target, target_sum = sync.range_sum(after, upto)
    diff = RangeDiff(after, upto, len(ids), n_target, checksum.as_hex(total), checksum.as_hex(target_sum),
                     rejected=rejected)
    batch_ids = {rows.ids[n] for n in expected}
    todo: list[int] = []
    if retry:
        _, reasons = sync.settle_dangling(rows.take(retry), batch_ids)
        for m, n in enumerate(retry):
            if not reasons[m]:  # loadable now
                diff.missing += 1
                todo.append(n)
                diff.examples.append(rows.ids[n])
    for rid in unrecorded:
        diff.missing += 1
        diff.examples.append(rid)
    extra: list[str] = []
    if n_target != len(expected) or target_sum != checksum.fold(total):
        current = sync.range_digests(after, upto)
        differing = [n for n in expected if current.get(rows.ids[n]) != rows.digests[n]]
        probe, reasons = sync.settle_dangling(rows.take(differing), batch_ids)
        for m, n in enumerate(differing):
            rid = rows.ids[n]
            if not reasons[m] and current.get(rid) == probe.digests[m]:
                continue  # the target holds it with the dangling id settled by the orphans policy
            if rid in current and not reasons[m]:
                diff.changed += 1
            else:
                diff.missing += 1
            todo.append(n)
            diff.examples.append(rid)
        extra = sorted(set(current) - set(ids))
        diff.extra = len(extra)
    diff.examples = (diff.examples + extra)[:5]
    if repair and not diff.equal:
        sync.result.ranges_recopied += 1
        if extra:
            sync.run.doom(sync.table.name, extra, "deleted")
            sync.result.deleted += len(extra)
        sync.apply_rows(rows.take(todo), unrecorded)
    return diff


def _run_orphans(conn: psycopg.Connection, run_id: str) -> str:
    row = conn.execute("SELECT params->>'orphans' FROM pbm_meta.runs WHERE run_id = %s", (run_id,)).fetchone()
    return (row[0] if row else None) or "reject"


def compare_ranges(conn: psycopg.Connection, source: Source, table: Table, schema: str, *, run_id: str,
                   orphans: str | None = None, range_rows: int = RANGE_ROWS) -> list[RangeDiff]:
    """Fresh per-range checksums of one collection on both sides: the load's columnar digests over
    the source (a snapshot), SQL over `schema`. Rows recorded as rejects of `run_id` are left out
    of the source side; dangling ids the `orphans` policy nulled are explained, not reported.
    Writes nothing.

    This is what validation should use once a re-sync has run: the ledger's per-batch checksums
    describe the full load's snapshot, not the re-synced target.
    """
    orphans = orphans or _run_orphans(conn, run_id)  # the policy the run's load applied
    with conn.transaction():
        run = Cascade(conn, schema, run_id, orphans, source.has_secrets,
                      Plan([table], {}, [], [], source.has_secrets))
        sync = TableSync(run, table)
        diffs = list(compare(sync, source, range_rows, repair=False))
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
