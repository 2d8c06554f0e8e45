"""Incremental re-sync: keep the migrated schema current with a live PocketBase until cut-over.

PocketBase keeps no change log, so every run starts from a fresh read-only snapshot and asks it
three questions per collection: what changed since the watermark (less an overlap window), what
disappeared (both id sets walked a range at a time), and, for collections without `updated`,
which id ranges hash differently (`rangediff`). Rows go through the load's own columnar path
(`columnar`: converters, rejects, digests, binary COPY), are compared with the target by row
digest, and only rows that differ are written, all in one transaction (`run`).

A re-sync and a migration never write the same target at once (`target_lock`), and after a
cut-over PostgreSQL is the source of truth, so the re-sync refuses unless forced (`target`).

    reads      what is read from the source, as Arrow chunks
    rows       converted rows with their ids and digests
    table      one collection: compare, write, reject, walk the ids
    cascade    the transaction's doomed/written ids; deletes, rejects and the orphans policy
    rangediff  per-range checksums (the checksum mode, and validation after a re-sync)
    target     where a run may write: SyncTarget, refusals, params, pbm_meta.resyncs
    run        the entry points: resync, run_resync, final_sync, last_resync
"""

from pbmigrate.audit.guard import TargetBusy, target_lock
from pbmigrate.resync.rangediff import RangeDiff, compare_collection, compare_ranges
from pbmigrate.resync.reads import pb_timestamp
from pbmigrate.resync.run import DEFAULT_OVERLAP_SECONDS, final_sync, last_resync, resync, resync_dir, run_resync
from pbmigrate.resync.table import RANGE_ROWS, CollectionResult
from pbmigrate.resync.target import (
    ResyncRefused,
    SyncTarget,
    TargetCutOver,
    check_params,
    check_schema,
    recorded_params,
    resolve_target,
)

__all__ = [
    "DEFAULT_OVERLAP_SECONDS", "RANGE_ROWS", "CollectionResult", "RangeDiff", "ResyncRefused",
    "SyncTarget", "TargetBusy", "TargetCutOver", "check_params", "check_schema", "compare_collection",
    "compare_ranges", "final_sync", "last_resync", "pb_timestamp", "recorded_params",
    "resolve_target", "resync", "resync_dir", "run_resync", "target_lock",
]
