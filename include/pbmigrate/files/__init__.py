"""The bytes behind PocketBase's `file` fields: copied to the target's file store, ledgered, proven.

A `file` field holds only names; the bytes live in `pb_data/storage/<collectionId>/<recordId>/<name>`
beside a `<name>.attrs` JSON sidecar (content type, original name, md5 in base64), or behind
`GET /api/files/<collection>/<record>/<name>` (protected files need `?token=` from
`POST /api/files/token`), or, when PocketBase's own settings enable S3 storage, in that bucket
under `<collectionId>/<recordId>/<name>` (read from the snapshot's `_params`). Without them every
avatar and upload is lost when PocketBase retires.

The store (connection `pbm_files`, env `PBM_FILES_URL`, default `file://<PBM_WORK_DIR>/files/<target>`)
is a directory or an S3 bucket, both through fsspec. Keys are `<collection name>/<record id>/<name>`
under the store's root, the layout the game API serves `GET /api/files/<collection>/<record>/<name>`
from. Metadata travels with each object: S3 object metadata (ContentType; `original-filename`
percent-encoded, since S3 metadata is ASCII; `sha256`; `md5`), and in a directory a `<name>.attrs`
sidecar in PocketBase's own format plus `sha256` and `size`. The sidecar is written after the bytes
and is the object's commit mark: an object without a valid sidecar of its size is copied again.
Thumbnails (`thumbs_<name>/`) are not copied: they are derived, and a server makes them on demand.

Every name a migrated record holds ends in `pbm_meta.files` (size, sha256, the `.attrs` md5) or,
when the source has no such file, as a reject (stage `files`) with record id, field and reason. A
retried task skips what the ledger holds and adopts what the store already holds complete, so a
kill in the middle of a collection copies nothing twice. Validation re-reads every object.

Modules: `store` (the target's store), `source` (reading the source's files: storage folder, API,
PocketBase's own S3 bucket), `refs` (names in the target), `ledger` (pbm_meta.files), `copy` (the
task group's copy), `checks` (validation), `resync` (re-sync of files), `backup` (the manifest).
"""

from pbmigrate.files.backup import manifest
from pbmigrate.files.checks import check_table_files, file_checks
from pbmigrate.files.copy import (
    EXAMPLES,
    LEDGER_ROWS,
    WORKERS,
    CopyResult,
    copy_batch,
    copy_one,
    copy_range,
    copy_refs,
    plan_file_batches,
)
from pbmigrate.files.ledger import (
    STAGE,
    Outcome,
    files_report,
    has_ledger,
    read_ledger,
    record_outcomes,
)
from pbmigrate.files.refs import Ref, file_columns, file_tables, target_refs
from pbmigrate.files.resync import delete_objects, resync_files
from pbmigrate.files.settings import S3Settings, read_settings, s3_settings
from pbmigrate.files.source import (
    ApiStorage,
    LocalStorage,
    MissingFile,
    S3Storage,
    Storage,
    open_storage,
    storage_dir,
    unsafe_name,
)
from pbmigrate.files.store import ATTRS, CHUNK, S3_PART, FileStore, ObjectInfo, open_store, safe_store_url, store_config

__all__ = [
    "ATTRS", "CHUNK", "EXAMPLES", "LEDGER_ROWS", "S3_PART", "STAGE", "WORKERS", "ApiStorage", "CopyResult",
    "FileStore", "LocalStorage", "MissingFile", "ObjectInfo", "Outcome", "Ref", "S3Settings", "S3Storage", "Storage",
    "check_table_files", "copy_batch", "copy_one", "copy_range", "copy_refs", "delete_objects", "file_checks",
    "file_columns", "file_tables", "files_report", "has_ledger", "manifest", "open_storage", "open_store",
    "plan_file_batches", "read_ledger", "read_settings", "record_outcomes", "resync_files", "s3_settings",
    "safe_store_url", "storage_dir", "store_config", "target_refs", "unsafe_name",
]
