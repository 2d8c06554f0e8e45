"""What a re-sync reads from the source, as the load reads it: Arrow chunks in storage form
(`columnar.read`), so the same column converters, digests and COPY encoding serve both.

The source decides how to select (SQL on a snapshot, filters on the REST API). The two reads that
cover whole tables, the changed rows and the ids of the walk, come from `columnar.read` (ADBC on a
snapshot); the few rows fetched by id are classified from tuples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from pbmigrate.load.columnar.read import CHUNK_ROWS, Chunk, changed_chunks, id_chunks, tuple_chunks
from pbmigrate.plan.model import Table
from pbmigrate.source import Source


def pb_timestamp(dt: datetime) -> str:
    """PocketBase's own text form, `YYYY-MM-DD HH:MM:SS.sssZ`, which compares correctly as text."""
    dt = dt.astimezone(UTC)
    return f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond // 1000:03d}Z"


__all__ = ["changed_chunks", "chunks_by_ids", "chunks_referencing", "close", "id_chunks", "ordered_chunks",
           "pb_timestamp"]


def close(it: Iterable | None) -> None:
    """Stop a read early (a background read's thread and connection included)."""
    stop = getattr(it, "close", None)
    if stop is not None:
        stop()


def ordered_chunks(source: Source, table: Table, n: int) -> Iterator[Chunk]:
    """Every row in id order, `n` to a chunk: each chunk is one compared range."""
    return tuple_chunks(source.rows(table.collection), table, n)


def chunks_by_ids(source: Source, table: Table, ids: Iterable[str]) -> Iterator[Chunk]:
    return tuple_chunks(source.rows_by_ids(table.collection, ids), table, CHUNK_ROWS)


def chunks_referencing(source: Source, table: Table, field: str, ids: Iterable[str]) -> Iterator[Chunk]:
    return tuple_chunks(source.rows_referencing(table.collection, field, ids), table, CHUNK_ROWS)
