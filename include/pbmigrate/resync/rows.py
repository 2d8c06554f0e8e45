"""Converted source rows of one table as the re-sync handles them: the load's columnar part
(`columnar.batch.Part`) with each row's id and digest, so a chunk is compared with the target, and
the rows that differ written, without going back to Python values row by row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from pbmigrate.load.columnar.batch import Part, TableConverter
from pbmigrate.load.columnar.read import Chunk

Reasons = list[tuple[str, str]]  # (field, reason) of a rejected row


@dataclass
class Rows:
    """Rows that converted: what the target should hold for them."""

    part: Part
    ids: list[str]
    digests: list[int]  # each row's digest (junction rows included), as `ledger` computes it in SQL

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Sequence[int]) -> Rows:
        if len(indices) == len(self.ids) and list(indices) == list(range(len(self.ids))):
            return self
        i = pa.array(indices, pa.int64())
        p = self.part
        part = Part([c.take(i) for c in p.columns], {k: v.take(i) for k, v in p.canons.items()},
                    [(t.take(i), c.take(i)) for t, c in p.junctions])
        return Rows(part, [self.ids[n] for n in indices], [self.digests[n] for n in indices])

    def with_part(self, part: Part, work: TableConverter) -> Rows:
        """The same rows with some values replaced (a dangling id nulled), digests recomputed."""
        return Rows(part, self.ids, digests_of(part, work))


def digests_of(part: Part, work: TableConverter) -> list[int]:
    return work.row_digests(part).tolist() if part.rows else []


def convert(work: TableConverter, chunk: Chunk, id_col: int) -> tuple[Rows, dict[str, Reasons]]:
    """A chunk through the load's converters: the rows that convert, and every bad field of those
    that do not (by record id), with `convert`'s exact reasons."""
    part = work.part(chunk)
    rejects: dict[str, Reasons] = {}
    for rid, fname, reason in part.rejects:
        rejects.setdefault(rid, []).append((fname, reason))
    ids = part.columns[id_col].to_pylist() if part.rows else []
    return Rows(part, ids, digests_of(part, work)), rejects
