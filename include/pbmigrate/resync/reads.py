"""What a re-sync reads from the source, as the load reads it: Arrow chunks in storage form
(`columnar.read`), so the same column converters, digests and COPY encoding serve both.

The source decides how to select (SQL on a snapshot, filters on the REST API); only the ids of the
walk come as plain lists, a range at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from itertools import islice

from pbmigrate.columnar.read import CHUNK_ROWS, Chunk, tuple_chunks
from pbmigrate.plan import Table
from pbmigrate.sources import Source


def pb_timestamp(dt: datetime) -> str:
    """PocketBase's own text form, `YYYY-MM-DD HH:MM:SS.sssZ`, which compares correctly as text."""
    dt = dt.astimezone(UTC)
    return f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def id_chunks(source: Source, table: Table, n: int) -> Iterator[list[str]]:
    """Every id of the collection in byte order, `n` at a time: one step of the walk."""
    it = source.ids(table.collection)
    while chunk := list(islice(it, n)):
        yield chunk


def ordered_chunks(source: Source, table: Table, n: int) -> Iterator[Chunk]:
    """Every row in id order, `n` to a chunk: each chunk is one compared range."""
    return tuple_chunks(source.rows(table.collection), table, n)


def changed_chunks(source: Source, table: Table, field: str, since: str) -> Iterator[Chunk]:
    """Rows whose `updated` is at or after `since` (every row when `since` is '')."""
    return tuple_chunks(source.rows_since(table.collection, field, since), table, CHUNK_ROWS)


def chunks_by_ids(source: Source, table: Table, ids: Iterable[str]) -> Iterator[Chunk]:
    return tuple_chunks(source.rows_by_ids(table.collection, ids), table, CHUNK_ROWS)


def chunks_referencing(source: Source, table: Table, field: str, ids: Iterable[str]) -> Iterator[Chunk]:
    return tuple_chunks(source.rows_referencing(table.collection, field, ids), table, CHUNK_ROWS)
