"""Where the source's files are read from: PocketBase's storage folder beside data.db, its API
(`/api/files/...` with a file token), or the S3 bucket PocketBase's own settings name."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

from pbmigrate.errors import SourceError
from pbmigrate.files.settings import S3Settings, read_settings, s3_settings
from pbmigrate.files.store import ATTRS, S3_PART, read_all
from pbmigrate.source.catalog import Collection


class MissingFile(Exception):
    """The source has no file of that name for that record."""


def unsafe_name(record_id: str, name: str) -> str | None:
    """Why a name cannot be a path component (raw SQL may have written anything), else None."""
    for what, v in (("record id", record_id), ("file name", name)):
        if not v or v in (".", "..") or "/" in v or "\\" in v or "\x00" in v:
            return f"unsafe {what} {v!r}: not a single path component"
    return None


class LocalStorage:
    """`pb_data/storage` beside the source's data.db: the live folder (the snapshot holds only the
    database), so a file deleted or replaced after the snapshot is missing, and re-sync settles it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def fingerprint(self, coll: Collection, record_id: str, name: str) -> tuple[int, str | None] | None:
        """Size and `.attrs` md5 of the source file, without reading it (None: no such file)."""
        return _local_fingerprint(self.root, coll, record_id, name)

    def open(self, coll: Collection, record_id: str, name: str) -> tuple[BinaryIO, dict[str, Any]]:
        path = f"{self.root}/{coll.id}/{record_id}/{name}"
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it; read by descriptor
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise MissingFile(f"missing file: {name} is not in PocketBase's storage ({coll.id}/{record_id}/)") from exc
        try:
            attrs = json.loads(read_all(path + ATTRS))
        except (FileNotFoundError, ValueError):
            attrs = {}
        user = attrs.get("user.metadata") or {}
        return fh, {"content_type": attrs.get("user.content_type") or None,
                    "original_name": user.get("original-filename") if isinstance(user, dict) else None,
                    "md5": attrs.get("md5") or None}


def _local_fingerprint(root: Path, coll: Collection, record_id: str, name: str) -> tuple[int, str | None] | None:
    path = f"{root}/{coll.id}/{record_id}/{name}"
    try:
        size = os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        md5 = json.loads(read_all(path + ATTRS)).get("md5") or None
    except (FileNotFoundError, ValueError):
        md5 = None
    return size, md5


class _Body:
    """A streamed HTTP body as a file object that checks Content-Length at its end."""

    def __init__(self, resp: Any):
        self.resp = resp
        self.raw = resp.raw
        self.raw.decode_content = True
        self.expected = resp.headers.get("Content-Length")
        self.got = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.got += len(chunk)
        if not chunk and self.expected is not None and self.got != int(self.expected):
            raise SourceError(f"file download ended after {self.got} of {self.expected} bytes")
        return chunk

    def close(self) -> None:
        self.resp.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ApiStorage:
    """`GET /api/files/<collectionId>/<record>/<name>` with a superuser file token (protected files
    need it; the others ignore it). The API exposes no `.attrs` md5 and no original name."""

    def __init__(self, api: Any):
        self.api = api

    def describe(self) -> str:
        return f"{self.api.url}/api/files"

    def fingerprint(self, coll: Collection, record_id: str, name: str) -> None:
        """Nothing cheaper than a download: PocketBase never reuses a file name, so a complete
        object under this name is adopted as it is."""
        return None

    def open(self, coll: Collection, record_id: str, name: str) -> tuple[BinaryIO, dict[str, Any]]:
        resp = self.api.open_file(coll.id, record_id, name)
        if resp is None:
            raise MissingFile(f"missing file: PocketBase answered 404 for {name} ({coll.name}/{record_id})")
        ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip() or None
        return _Body(resp), {"content_type": ctype, "original_name": None, "md5": None}  # type: ignore[return-value]


def storage_dir(run: dict) -> Path:
    """PocketBase's storage folder for a SQLite-mode run: beside the source data.db."""
    if run.get("storage_path"):
        return Path(run["storage_path"])
    return Path(run["params"]["source_path"]).parent / "storage"


class S3Storage:
    """The bucket PocketBase's own `s3` settings name (its files are then nowhere else: PocketBase
    reads only the bucket once S3 is enabled), keys `<collectionId>/<recordId>/<name>` at the
    bucket's root. Content type and original name come from the object (ContentType, metadata
    `original-filename`, percent-encoded as PocketBase writes it); the md5 from the ETag where it
    is one (a single-part upload: PocketBase's are), so the copy is proven against the bucket's own
    checksum as the `.attrs` md5 proves a local one. The credentials stay inside the s3fs client."""

    def __init__(self, cfg: S3Settings):
        import s3fs

        self.cfg = cfg
        # a private client: the secret is in no cache another store could hand out
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **cfg.fs_options())

    def describe(self) -> str:
        return self.cfg.describe()

    def _key(self, coll: Collection, record_id: str, name: str) -> str:
        return f"{coll.id}/{record_id}/{name}"

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.fs.call_s3("head_object", Bucket=self.cfg.bucket, Key=key)
        except FileNotFoundError:
            return None
        except OSError as exc:  # access denied, no such bucket, endpoint down: the task fails, retryable
            raise SourceError(f"PocketBase's S3 storage {self.describe()}: cannot read {key}: "
                              f"{type(exc).__name__}: {exc}") from None

    def fingerprint(self, coll: Collection, record_id: str, name: str) -> tuple[int, str | None] | None:
        head = self._head(self._key(coll, record_id, name))
        return None if head is None else (int(head["ContentLength"]), etag_md5(head.get("ETag")))

    def open(self, coll: Collection, record_id: str, name: str) -> tuple[BinaryIO, dict[str, Any]]:
        key = self._key(coll, record_id, name)
        head = self._head(key)
        if head is None:
            raise MissingFile(f"missing file: {name} is not in PocketBase's S3 bucket {self.cfg.bucket} "
                              f"({coll.id}/{record_id}/)")
        meta = head.get("Metadata") or {}
        original = meta.get("original-filename")
        fh = self.fs.open(f"{self.cfg.bucket}/{key}", "rb", block_size=S3_PART, size=int(head["ContentLength"]))
        return fh, {"content_type": (head.get("ContentType") or "").split(";")[0].strip() or None,
                    "original_name": unquote(original) if original else None, "md5": etag_md5(head.get("ETag"))}


def etag_md5(etag: str | None) -> str | None:
    """The md5 (base64, as `.attrs` holds it) an ETag is, or None (multipart: `<hex>-<parts>`)."""
    value = (etag or "").strip('"')
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value.lower()):
        return None
    return base64.b64encode(bytes.fromhex(value)).decode()


Storage = LocalStorage | ApiStorage | S3Storage


def open_storage(run: dict, source: Any) -> Storage:
    """Where this run's source keeps its files: the API in API mode; in SQLite mode the bucket
    PocketBase's settings enable, else the storage folder beside data.db."""
    if source.kind != "sqlite":  # the source read now: a re-sync may read through the API a run loaded from SQLite
        return ApiStorage(source)
    s3 = s3_settings(read_settings(source.query))
    if s3 is not None:
        return S3Storage(s3)
    return LocalStorage(storage_dir(run))
