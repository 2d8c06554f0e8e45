"""One collection inside the re-sync transaction: convert source chunks as the load does, compare
them with the target by row digest, write only the rows that differ, record rejects, and walk both
id sets for deletes and rows that never arrived.

Writes go through a temporary table: binary COPY in the load's encoding (`RowWriter`), then
`INSERT ... ON CONFLICT (id) DO UPDATE`, which also notes each written id for the cascade. A unique
index that refuses the set is retried row by row, and what still collides is rejected.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from hashlib import md5
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import errors as pgerrors

from pbmigrate import checksum
from pbmigrate.load import ledger
from pbmigrate.load.columnar.batch import Part, RowWriter, TableConverter, copy_junction, junction_copy_rows
from pbmigrate.load.columnar.read import Chunk
from pbmigrate.pgsql import qi
from pbmigrate.plan.model import DANGLING, Table, dangling_reason
from pbmigrate.resync import reads
from pbmigrate.resync.rows import Reasons, Rows, convert
from pbmigrate.source import Source

if TYPE_CHECKING:
    from pbmigrate.resync.cascade import Cascade

RANGE_ROWS = 20_000  # ids per compared range: what one step of the walk holds in memory
REJECT_STAGES = ("load", "finalize", "resync")  # rejects a re-sync may clear or replace


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


def range_where(col: str, after: str | None, upto: str | None) -> str:
    """(after, upto] in C order; None is open."""
    parts = []
    if after is not None:
        parts.append(f"{col} > (%(after)s::text COLLATE \"C\")")
    if upto is not None:
        parts.append(f"{col} <= (%(upto)s::text COLLATE \"C\")")
    return " AND ".join(parts) or "true"


def ids_digest(ids: pa.Array) -> str:
    """md5 of ids length-prefixed in order (`len:id`, no separator): what `_target_ids_hash`
    computes in SQL. Arrow joins them; the joined array's data buffer is the md5 input."""
    if not len(ids):
        return md5(b"").hexdigest()
    joined = pc.binary_join_element_wise(pc.cast(pc.utf8_length(ids), pa.string()), ids, ":")
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset:joined.offset + len(joined) + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    return md5(joined.buffers()[2].slice(start, end - start)).hexdigest()


class TableSync:
    """Converts, compares and writes the rows of one collection inside the re-sync transaction."""

    def __init__(self, run: Cascade, table: Table):
        self.run, self.conn, self.table = run, run.conn, table
        self.s = qi(run.schema)
        self.t = f"{self.s}.{qi(table.name)}"
        self.name = table.collection.name
        self.work = TableConverter(table, run.has_secrets)
        self.writer = RowWriter(self.conn, table)
        self.id_col = next(i for i, c in enumerate(table.columns) if c.field.name == "id")
        self.id_pos = table.columns[self.id_col].position  # where the id sits in a source row
        self.refs = [(i, fk, c.nullable) for fk in table.foreign_keys
                     for i, c in enumerate(table.columns) if c.name == fk.column]
        self.jrefs = [(k, j) for k, j in enumerate(table.junctions) if j.target_table]
        self.temp: str | None = None
        uf = table.collection.updated_field
        self.updated_pos: int | None = None  # where `updated` sits in a source row
        self.updated_col: str | None = None
        self.updated_field: str | None = None
        if uf is not None:
            col = next((c for c in table.columns if c.field.name == uf.name), None)
            if col is not None:
                self.updated_pos, self.updated_col, self.updated_field = col.position, col.name, uf.name
        mode = "updated" if self.updated_pos is not None else "checksum"
        self.result = CollectionResult(self.name, table.name, mode)
        self.rejected: dict[str, set[tuple[str, str]]] = {}
        for rid, fname, reason in self.conn.execute(
                "SELECT record_id, field, reason FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s "
                "AND stage = ANY(%s) AND record_id IS NOT NULL", (run.run_id, self.name, list(REJECT_STAGES))):
            self.rejected.setdefault(rid, set()).add((fname, reason))
        self.seen_rejected: set[str] = set()
        self.max_updated: str | None = None
        self.cols = ", ".join(qi(c) for c in table.column_names)

    # conversion and digests

    def convert(self, chunk: Chunk) -> tuple[Rows, dict[str, Reasons]]:
        return convert(self.work, chunk, self.id_col)

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
        where = range_where("{col}", after, upto)
        sql = self._digest_sql(where, where)
        return {rid: checksum.fold(int(d)) for rid, d in self.conn.execute(sql, {"after": after, "upto": upto})}

    def range_sum(self, after: str | None, upto: str | None) -> tuple[int, int]:
        where = range_where("{col}", after, upto)
        sql = f"SELECT count(*), coalesce(sum(d), 0) FROM ({self._digest_sql(where, where)}) q"
        n, total = self.conn.execute(sql, {"after": after, "upto": upto}).fetchone()
        return n, checksum.fold(int(total))

    # dangling relations, by the migration's orphans policy (as finalize decides them)

    def _existing(self, table_name: str, values: Iterable[str]) -> pa.Array:
        values = list(values)
        if not values:
            return pa.array([], pa.string())
        rows = self.conn.execute(f"SELECT id FROM {self.s}.{qi(table_name)} WHERE id = ANY(%s)", (values,))
        return pa.array([r[0] for r in rows], pa.string())

    def _known(self, target_table: str, values: pa.Array, batch_ids: set[str] | None) -> pa.Array:
        """Which of `values` the target holds (or this chunk brings, for a table's own relations)."""
        exist = self._existing(target_table, pc.unique(values.drop_null()).to_pylist())
        if batch_ids and target_table == self.table.name:
            exist = pa.concat_arrays([exist, pa.array(list(batch_ids), pa.string())])
        return pc.is_in(values, value_set=exist)

    def settle_dangling(self, rows: Rows, batch_ids: set[str] | None = None) -> tuple[Rows, list[Reasons]]:
        """What the target holds for these rows once dangling ids are nulled (orphans=null), and
        per row the reasons it would be rejected instead (orphans=reject)."""
        reasons: list[Reasons] = [[] for _ in rows.ids]
        if not len(rows) or not (self.refs or self.jrefs):
            return rows, reasons
        null_mode = self.run.orphans == "null"
        part = rows.part
        columns, junctions = list(part.columns), list(part.junctions)
        dirty = np.zeros(len(rows), dtype=bool)
        for ci, fk, nullable in self.refs:
            col = columns[ci]
            missing = pc.and_(pc.is_valid(col), pc.invert(self._known(fk.target_table, col, batch_ids)))
            missing = missing.to_numpy(zero_copy_only=False)
            if not missing.any():
                continue
            if null_mode and nullable:
                columns[ci] = pc.if_else(pa.array(missing), pa.scalar(None, col.type), col)
                dirty |= missing
            else:
                for n in np.flatnonzero(missing):
                    reasons[n].append((fk.field, dangling_reason(fk.field, fk.target_table)))
        for k, j in self.jrefs:
            targets, _ = junctions[k]
            flat = targets.flatten()
            ok = self._known(j.target_table or "", flat, batch_ids).to_numpy(zero_copy_only=False)
            if ok.all():
                continue
            parents = pc.list_parent_indices(targets).to_numpy(zero_copy_only=False)
            bad_rows = np.unique(parents[~ok])
            if null_mode:
                counts = np.bincount(parents[ok], minlength=len(targets))
                offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
                kept = pa.ListArray.from_arrays(offsets, flat.filter(pa.array(ok)))
                canon = pa.array([checksum.PY_CANON["text[]"](v) for v in kept.to_pylist()], pa.string())
                junctions[k] = (kept, canon)
                dirty[bad_rows] = True
            else:
                for n in bad_rows:
                    reasons[n].append((j.field.name, dangling_reason(j.field.name, j.target_table or "",
                                                                                  junction=True)))
        if not dirty.any():
            return rows, reasons
        return rows.with_part(Part(columns, part.canons, junctions), self.work), reasons

    # the write path

    def apply(self, chunks: Iterable[Chunk], *, track_updated: bool = False) -> None:
        for chunk in chunks:
            if track_updated and self.updated_pos is not None:
                top = pc.max(chunk.batch.column(f"c{self.updated_pos}")).as_py()
                if top and (self.max_updated is None or top > self.max_updated):
                    self.max_updated = top
            self.apply_rows(*self.convert(chunk))

    def apply_rows(self, rows: Rows, rejects: dict[str, Reasons]) -> None:
        """Write the rows the target does not hold as they are; record the rejects."""
        self.result.rows_read += len(rows) + len(rejects)
        current = self.target_digests(rows.ids + list(rejects))
        differing = [n for n, (rid, d) in enumerate(zip(rows.ids, rows.digests)) if current.get(rid) != d]
        if differing and (self.refs or self.jrefs):
            # Would the target hold exactly this once dangling ids are settled? Then nothing to write.
            probe, reasons = self.settle_dangling(rows.take(differing), set(rows.ids))
            keep = []
            for m, n in enumerate(differing):
                rid = rows.ids[n]
                if reasons[m] and set(reasons[m]) == self.rejected.get(rid) and rid not in current:
                    continue  # still rejected for the same reason
                if not reasons[m] and current.get(rid) == probe.digests[m]:
                    continue  # the target holds it with the dangling id settled
                keep.append(n)
            differing = keep
        self._write(rows.take(differing))
        if rejects:
            self.reject(rejects, present={rid for rid in rejects if rid in current})

    def _temp(self) -> str:
        if self.temp is None:
            self.temp = f"pbm_rows_{self.run.next_temp()}"
            self.conn.execute(f"CREATE TEMP TABLE {self.temp} (LIKE {self.t}) ON COMMIT DROP")
        return self.temp

    def _upsert_sql(self, where: str = "") -> str:
        """Upsert from the temp table; every written id is noted in pbm_written (first write wins)."""
        sets = ", ".join(f"{qi(c)} = EXCLUDED.{qi(c)}" for c in self.table.column_names if c != "id")
        action = f"DO UPDATE SET {sets}" if sets else "DO NOTHING"
        return (f"WITH done AS (INSERT INTO {self.t} ({self.cols}) SELECT {self.cols} FROM {self._temp()} {where} "
                f"ON CONFLICT (id) {action} RETURNING id, (xmax = 0) AS ins), "
                "noted AS (INSERT INTO pbm_written (tbl, id, inserted) SELECT %(tbl)s, id, ins FROM done "
                "ON CONFLICT (tbl, id) DO NOTHING) SELECT id, ins FROM done")

    def _write(self, rows: Rows) -> None:
        if not len(rows):
            return
        temp = self._temp()
        self.conn.execute(f"TRUNCATE {temp}")
        with self.conn.cursor() as cur, cur.copy(self.writer.sql(temp)) as copy:
            self.writer.begin(copy)
            self.writer.write(copy, rows.part)
            self.writer.end(copy)
        try:
            with self.conn.transaction():
                done = self.conn.execute(self._upsert_sql(), {"tbl": self.table.name}).fetchall()
        except pgerrors.UniqueViolation:
            done, dupes = self._write_one_by_one(rows.ids)
            if dupes:
                present = set(self.target_digests(list(dupes)))
                self.reject(dupes, present)
        index = {rid: n for n, rid in enumerate(rows.ids)}
        written = rows.take([index[rid] for rid, _ in done])
        inserted = sum(1 for _, ins in done if ins)
        self.result.inserted += inserted
        self.result.updated += len(done) - inserted
        self._replace_junctions(written)
        cleared = [rid for rid in written.ids if rid in self.rejected]
        if cleared:
            self.conn.execute(
                "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND record_id = ANY(%s) "
                "AND stage = ANY(%s)", (self.run.run_id, self.name, cleared, list(REJECT_STAGES)))
            for rid in cleared:
                del self.rejected[rid]
            self.run.revived.setdefault(self.table.name, []).extend(cleared)

    def _write_one_by_one(self, ids: list[str]) -> tuple[list[tuple[str, bool]], dict[str, Reasons]]:
        """A unique index refused the set: write row by row (a later row may free a value an
        earlier one needs), and reject what still collides, keeping the row already in the target."""
        sql = self._upsert_sql("WHERE id = %(id)s")
        pending = list(ids)
        done: list[tuple[str, bool]] = []
        failed: dict[str, str] = {}
        progress = True
        while pending and progress:
            progress, still = False, []
            for rid in pending:
                try:
                    with self.conn.transaction():
                        done.extend(self.conn.execute(sql, {"tbl": self.table.name, "id": rid}).fetchall())
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

    def _replace_junctions(self, written: Rows) -> None:
        if not len(written) or not self.table.junctions:
            return
        owners = written.part.columns[self.id_col]
        for j, (targets, _) in zip(self.table.junctions, written.part.junctions):
            self.conn.execute(f"DELETE FROM {self.s}.{qi(j.table)} WHERE {qi(j.owner)} = ANY(%s)", (written.ids,))
            n, data = junction_copy_rows(owners, targets)
            if n:
                spool = io.BytesIO()
                spool.write(data)
                with self.conn.cursor() as cur:
                    copy_junction(cur, self.run.schema, j, spool)

    def reject(self, rejects: dict[str, Reasons], present: set[str]) -> None:
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
        where = range_where("id", after, upto)
        (ids,) = self.conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {self.t} WHERE {where}",
                                   {"after": after, "upto": upto}, binary=True).fetchone()
        return ids or []

    def _target_ids_hash(self, after: str | None, upto: str | None) -> tuple[int, str]:
        """Count and md5 of a range's ids (length-prefixed, in C order): 40 bytes instead of the ids."""
        where = range_where("id", after, upto)
        # Sorted in a subquery, not by the aggregate's ORDER BY, which sorts again what the primary
        # key's index already gives in order (2.4x slower here). Should PostgreSQL ever feed the
        # aggregate out of order, the digests differ and the range is compared id by id: slower, as exact.
        n, digest = self.conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(length(id) || ':' || id, ''), '')) "
            f"FROM (SELECT id FROM {self.t} WHERE {where} ORDER BY id) q", {"after": after, "upto": upto}).fetchone()
        return n, digest

    def target_tail(self, after: str | None) -> Iterator[list[str]]:
        while True:
            where = range_where("id", after, None)
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
        retry = (DANGLING, "duplicate value") if retry_duplicates else (DANGLING,)
        return not all(r.startswith(retry) for _, r in reasons)

    def _note_rejected(self, ids: Iterable[str]) -> None:
        if self.rejected:
            self.seen_rejected.update(self.rejected.keys() & set(ids))

    def walk_ids(self, source: Source, range_rows: int) -> None:
        """Compare both id sets range by range: extra target ids are deletes, missing ones are copied."""
        walk = reads.id_chunks(source, self.table, range_rows)
        try:
            self._walk(source, walk)
        finally:
            reads.close(walk)

    def _walk(self, source: Source, walk: Iterable[pa.Array]) -> None:
        after = None
        for ids in walk:
            upto = ids[-1].as_py()
            self.result.ranges_compared += 1
            if self.rejected:
                self._note_rejected(ids.to_pylist())
            n, digest = self._target_ids_hash(after, upto)
            if n == len(ids) and digest == ids_digest(ids):
                after = upto
                continue
            target = pa.array(self._target_ids(after, upto), pa.string())
            extra = target.filter(pc.invert(pc.is_in(target, value_set=ids))).to_pylist()  # both in id order
            if extra:
                self.run.doom(self.table.name, extra, "deleted")
                self.result.deleted += len(extra)
            missing = [rid for rid in ids.filter(pc.invert(pc.is_in(ids, value_set=target))).to_pylist()
                       if not self.settled_reject(rid, retry_duplicates=True)]
            if missing:
                self.apply(reads.chunks_by_ids(source, self.table, missing))
            after = upto
        for extra in self.target_tail(after):
            self.run.doom(self.table.name, extra, "deleted")
            self.result.deleted += len(extra)

    def finish_rejects(self) -> None:
        """Rejects of records that are gone from the source: nothing is left to reject."""
        gone = sorted(self.rejected.keys() - self.seen_rejected)
        if gone:
            self.conn.execute(
                "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND record_id = ANY(%s) "
                "AND stage = ANY(%s)", (self.run.run_id, self.name, gone, list(REJECT_STAGES)))
            for rid in gone:
                del self.rejected[rid]
