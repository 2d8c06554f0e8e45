"""One batch through the columnar path: chunks in, binary COPY out, the checksum and the rejects
alongside. `load.load_batch` wraps it in the batch's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc

from pbmigrate import checksum
from pbmigrate.load import pgcopy
from pbmigrate.load.columnar import digest, pgbinary, vector
from pbmigrate.load.columnar.read import Chunk, chunks, fields_read
from pbmigrate.pgsql import qi
from pbmigrate.plan.convert import Converter, Reject, multi
from pbmigrate.plan.model import Junction, Table, pg_type
from pbmigrate.source import Source


@dataclass
class Part:
    """Converted rows of one chunk: a column per table column, a list column per junction."""

    columns: list[pa.Array]
    canons: dict[int, pa.Array]  # column index -> text[] canonical text
    junctions: list[tuple[pa.Array, pa.Array]]  # (target lists, their canonical text) per junction
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    read: int = 0
    per_row: int = 0  # rows the column checks sent to the per-row converters

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0


def reject_all(row: tuple, table: Table, convs: list[Converter]) -> list[tuple[str, str]]:
    """Every bad field of a failing row with its reason, not just the first."""
    problems = []
    for col, conv in zip(table.columns, convs):
        try:
            conv(row[col.position])
        except Reject as r:
            problems.append((r.field, r.reason))
    for j in table.junctions:
        try:
            multi(j.field)(row[j.position])
        except Reject as r:
            problems.append((r.field, r.reason))
    return problems or [("?", "row failed to convert")]


class TableConverter:
    """The converters of one table, vector and per-row, built once per batch."""

    def __init__(self, table: Table, has_secrets: bool):
        self.table, self.has_secrets = table, has_secrets
        self.fields = fields_read(table)
        self.convs = table.converters(has_secrets)
        self.jconvs = [multi(j.field) for j in table.junctions]
        self.types = [vector.natural_type(c.field) for c in table.columns]

    def part(self, chunk: Chunk) -> Part:
        b = chunk.batch
        bad = b.column("odd").to_numpy(zero_copy_only=False).astype(bool)
        conv: dict[int, vector.Converted] = {}
        for pos, f in self.fields:
            conv[pos] = vector.convert_column(b.column(f"c{pos}"), f, self.has_secrets)
            bad |= conv[pos].bad
        if bad.any():
            good = pa.array(np.flatnonzero(~bad))

            def keep(a: pa.Array) -> pa.Array:
                return a.take(good)
        else:  # the common case: no copy of every column
            def keep(a: pa.Array) -> pa.Array:
                return a
        cols = [keep(conv[c.position].values) for c in self.table.columns]
        canons = {i: keep(conv[c.position].canon) for i, c in enumerate(self.table.columns)
                  if conv[c.position].canon is not None}
        juncs = [(keep(conv[j.position].values), keep(conv[j.position].canon)) for j in self.table.junctions]
        part = Part(cols, canons, juncs, read=b.num_rows)
        redo = np.flatnonzero(bad)
        part.per_row = len(redo)
        if len(redo):
            self._per_row(chunk.raw(redo.tolist()), part)
        return part

    def _per_row(self, rows: list[tuple], part: Part) -> None:
        """The few rows the column checks sent back: `convert`'s converters decide, row by row."""
        table, out, jout = self.table, [], []
        for row in rows:
            try:
                values = [conv(row[c.position]) for conv, c in zip(self.convs, table.columns)]
                lists = [m(row[j.position]) for m, j in zip(self.jconvs, table.junctions)]
            except Reject:
                part.rejects.extend((str(row[0]), f, r) for f, r in reject_all(row, table, self.convs))
                continue
            out.append(values)
            jout.append(lists)
        if not out:
            return
        for i, typ in enumerate(self.types):
            values = [r[i] for r in out]
            if typ == vector.POINT:
                values = [{"lon": v[0], "lat": v[1]} for v in values]
            part.columns[i] = pa.concat_arrays([part.columns[i], pa.array(values, typ)])
            if i in part.canons:
                extra = pa.array([checksum.PY_CANON["text[]"](v) for v in values], pa.string())
                part.canons[i] = pa.concat_arrays([part.canons[i], extra])
        for k in range(len(table.junctions)):
            lists = [r[k] for r in jout]
            canon = pa.array([checksum.PY_CANON["text[]"](v) for v in lists], pa.string())
            targets, canons = part.junctions[k]
            part.junctions[k] = (pa.concat_arrays([targets, pa.array(lists, vector.TEXT_LIST)]),
                                 pa.concat_arrays([canons, canon]))

    def _prepared(self, part: Part) -> list[tuple[pa.Array, str]]:
        return [digest.prepare(v, c.canon, pg_type(c.field), part.canons.get(i))
                for i, (v, c) in enumerate(zip(part.columns, self.table.columns))]

    def part_sum(self, part: Part) -> int:
        total = digest.rows_sum(self._prepared(part))
        owners = part.columns[0]
        for j, (targets, canon) in zip(self.table.junctions, part.junctions):
            total += digest.junction_sum(j.table, owners, canon, pc.list_value_length(targets))
        return total


    def row_digests(self, part: Part) -> np.ndarray:
        """Each row's digest, its junction rows' included (uint64): the re-sync compares them with
        the target's `ledger` digests row by row."""
        total = digest.row_digests(self._prepared(part))
        owners = part.columns[0]
        for j, (targets, canon) in zip(self.table.junctions, part.junctions):
            total = total + digest.junction_digests(j.table, owners, canon, pc.list_value_length(targets))
        return total


def vector_binary(table: Table) -> bool:
    """Arrow-built binary COPY when every column has its field's own type (no mapping override)."""
    return all(c.type == pg_type(c.field) and c.type in pgbinary.ENCODABLE for c in table.columns)


def _python_rows(part: Part) -> Iterator[list]:
    cols = [a.to_pylist() for a in part.columns]
    for row in zip(*cols):
        yield [(v["lon"], v["lat"]) if isinstance(v, dict) else v for v in row]


def junction_rows(owners: pa.Array, targets: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(owner, target, position) columns: the list column exploded."""
    parents = pc.list_parent_indices(targets)
    offsets = targets.offsets.to_numpy() - targets.offsets[0].as_py()
    starts = np.repeat(offsets[:-1], np.diff(offsets))
    position = np.arange(len(parents)) - starts
    return pc.take(owners, parents), targets.flatten(), pa.array(position.astype(np.int32))


class RowWriter:
    """How a table's converted rows go into COPY, for the load and the re-sync alike: binary rows
    built by Arrow when every column has its field's own type (`vector_binary`), else psycopg's
    binary dumpers (or text COPY, for overrides it has none for) row by row."""

    def __init__(self, conn: psycopg.Connection, table: Table):
        self.table = table
        self.types = [c.type for c in table.columns]
        self.vector = vector_binary(table)
        self.binary = self.vector or pgcopy.can_use_binary(table)
        if self.binary and not self.vector:
            pgcopy.register(conn)

    def sql(self, target: str) -> str:
        """COPY into `target` (a quoted table name with the table's columns)."""
        cols = ", ".join(qi(c) for c in self.table.column_names)
        return f"COPY {target} ({cols}) FROM STDIN" + (" (FORMAT BINARY)" if self.binary else "")

    def begin(self, copy: psycopg.Copy) -> None:
        if self.vector:
            copy.write(pgbinary.HEADER)
        elif self.binary:
            copy.set_types(self.types)

    def write(self, copy: psycopg.Copy, part: Part) -> None:
        if self.vector:
            copy.write(pgbinary.rows(part.columns, self.types))
        else:
            for row in _python_rows(part):
                copy.write_row(row)

    def end(self, copy: psycopg.Copy) -> None:
        if self.vector:
            copy.write(pgbinary.TRAILER)


def junction_copy_rows(owners: pa.Array, targets: pa.Array) -> tuple[int, bytes | pa.Buffer]:
    """(row count, binary COPY rows) of a junction table for these owners' target lists."""
    exploded = junction_rows(owners, targets)
    n = len(exploded[0])
    return n, (pgbinary.rows(list(exploded), ["text", "text", "integer"]) if n else b"")


def copy_batch(conn: psycopg.Connection, source: Source, table: Table, schema: str, lo: str, hi: str,
               has_secrets: bool) -> tuple[int, int, int, int, list]:
    """COPY the range's rows and its junction rows; (read, loaded, checksum sum, junction rows, rejects).

    A COPY per chunk, its junction rows' COPY right after it (one COPY at a time per connection):
    nothing waits in memory beyond the chunk. Holding a batch's junction rows for a COPY after the
    owners' (spooled, 32 MB in memory) raised a task's peak RSS by about 70 MB."""
    work = TableConverter(table, has_secrets)
    writer = RowWriter(conn, table)
    owner_sql = writer.sql(f"{qi(schema)}.{qi(table.name)}")
    read = loaded = total = junction_count = 0
    rejects: list[tuple[str, str, str]] = []
    with conn.cursor() as cur:
        for chunk in chunks(source, table, lo, hi):
            part = work.part(chunk)
            read += part.read
            rejects.extend(part.rejects)
            if not part.rows:
                continue
            loaded += part.rows
            total += work.part_sum(part)
            with cur.copy(owner_sql) as copy:
                writer.begin(copy)
                writer.write(copy, part)
                writer.end(copy)
            for j, (targets, _) in zip(table.junctions, part.junctions):
                n, data = junction_copy_rows(part.columns[0], targets)
                junction_count += n
                if n:
                    copy_junction_rows(cur, schema, j, [data])
    return read, loaded, total, junction_count, rejects


def copy_junction_rows(cur: psycopg.Cursor, schema: str, j: Junction, blocks: Iterable[bytes]) -> None:
    """One binary COPY of a junction table's rows, given as blocks of `junction_copy_rows` output."""
    sql = f"COPY {qi(schema)}.{qi(j.table)} ({qi(j.owner)}, {qi(j.target)}, position) FROM STDIN (FORMAT BINARY)"
    with cur.copy(sql) as copy:
        copy.write(pgbinary.HEADER)
        for block in blocks:
            copy.write(block)
        copy.write(pgbinary.TRAILER)


def copy_junction(cur: psycopg.Cursor, schema: str, j: Junction, spool: IO[bytes]) -> None:
    """A junction table's rows from a spool of binary COPY rows (the re-sync's, written while the
    owner table's COPY ran)."""
    if not spool.tell():
        return
    spool.seek(0)
    copy_junction_rows(cur, schema, j, iter(lambda: spool.read(1 << 20), b""))
