"""Sources of PocketBase records: a SQLite snapshot or a running server's REST API.

Both yield rows of one collection for an inclusive id range, in id order (byte order, which is
PostgreSQL's COLLATE "C" order) unless asked otherwise, as tuples in the order of the collection's fields and in
PocketBase's *storage* form: what SQLite holds (JSON arrays as text, bools as 0/1, json fields as
text or numbers). The API source converts its decoded JSON back to that form, so one converter
serves both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from pbmigrate.errors import ParamError
from pbmigrate.source.catalog import Catalog, Collection


@dataclass(frozen=True)
class IdRange:
    """An inclusive id range [lo, hi] holding `rows` records when it was planned."""

    lo: str
    hi: str
    rows: int


class Source(Protocol):
    kind: str  # "sqlite" or "api"
    has_secrets: bool  # False in API mode: PocketBase never returns password hashes

    def catalog(self) -> Catalog: ...

    def count(self, coll: Collection) -> int: ...

    def ids(self, coll: Collection, lo: str | None = None, hi: str | None = None) -> Iterator[str]: ...

    def rows(self, coll: Collection, lo: str | None = None, hi: str | None = None,
             ordered: bool = True) -> Iterator[tuple]:
        """Rows with ids in [lo, hi]; in id order unless `ordered=False` (the loader's COPY and
        checksum do not care, and an unordered read can be much faster)."""
        ...

    def rows_since(self, coll: Collection, field: str, since: str) -> Iterator[tuple]:
        """Rows whose `field` (an autodate, PocketBase's text form) is >= `since`, in no set order:
        what a re-sync reads as changed."""
        ...

    def rows_by_ids(self, coll: Collection, ids: Iterable[str]) -> Iterator[tuple]:
        """The rows with these ids (missing ones are absent), in no set order."""
        ...

    def rows_referencing(self, coll: Collection, field: str, ids: Iterable[str]) -> Iterator[tuple]:
        """Rows whose relation `field` holds one of `ids` (any item of a multiple relation)."""
        ...

    def close(self) -> None: ...


def plan_ranges(source: Source, coll: Collection, batch_size: int) -> list[IdRange]:
    """Split a collection into id ranges of `batch_size` rows: by keyset where the source can seek
    its id index (`SqliteSource.plan_ranges`), else streaming the ids once."""
    if batch_size < 1:
        raise ParamError("batch_size must be at least 1")
    keyset = getattr(source, "plan_ranges", None)
    if keyset is not None:
        return keyset(coll, batch_size)
    return split_ids(source.ids(coll), batch_size)


def split_ids(ids: Iterable[str], batch_size: int) -> list[IdRange]:
    """Ids in id order cut every `batch_size`, streamed once: inclusive ranges with their counts."""
    ranges: list[IdRange] = []
    lo = last = None
    n = 0
    for rid in ids:
        if lo is None:
            lo = rid
        last = rid
        n += 1
        if n == batch_size:
            ranges.append(IdRange(lo, last, n))
            lo, n = None, 0
    if lo is not None and last is not None:
        ranges.append(IdRange(lo, last, n))
    return ranges


def open_source(source_path: str | None = None, **api: object) -> Source:
    """A SQLite source for a path, else an API source for url/email/password. (The readers import
    this module's `Source` and range helpers, so they are imported here, when one is opened.)"""
    if source_path:
        from pbmigrate.source.sqlite import SqliteSource

        return SqliteSource(source_path)
    from pbmigrate.source.api import ApiSource

    return ApiSource(**api)  # type: ignore[arg-type]
