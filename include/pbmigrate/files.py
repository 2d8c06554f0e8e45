"""The bytes behind PocketBase's `file` fields: copied to the target's file store, ledgered, proven.

A `file` field holds only names; the bytes live in `pb_data/storage/<collectionId>/<recordId>/<name>`
beside a `<name>.attrs` JSON sidecar (content type, original name, md5 in base64), or behind
`GET /api/files/<collection>/<record>/<name>` (protected files need `?token=` from
`POST /api/files/token`). Without them every avatar and upload is lost when PocketBase retires.

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
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg

from pbmigrate.audit.meta import ensure_meta
from pbmigrate.errors import ParamError, SourceError
from pbmigrate.pgsql import qi
from pbmigrate.plan.model import Column, Plan, Table
from pbmigrate.source.catalog import Collection

log = logging.getLogger("pbmigrate.files")

CHUNK = 1 << 20  # bytes per read: memory per copy stays at one chunk whatever the file's size
S3_PART = 5 * 1024 * 1024  # s3fs buffers one part (the S3 minimum) per upload, not its default 50 MB
LEDGER_ROWS = 1000  # outcomes written to pbm_meta.files per transaction
# concurrent copies per task: file creation, I/O and hashing release the GIL (creating many small
# files is filesystem metadata work, which overlaps well); PBM_FILES_WORKERS to tune
WORKERS = int(os.environ.get("PBM_FILES_WORKERS", "4"))
EXAMPLES = 5
STAGE = "files"  # pbm_meta.rejects.stage of a file that could not be copied
ATTRS = ".attrs"



def has_ledger(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('pbm_meta.files') IS NOT NULL").fetchone()[0]


# --------------------------------------------------------------------------- the store


def store_config(files: dict | str | None, target_schema: str) -> dict[str, Any]:
    """`{"url", "options"}` of the target's store: the connection's, else PBM_FILES_URL (with
    PBM_FILES_OPTIONS as JSON), else a directory under the work dir. Options may hold secrets."""
    if isinstance(files, str) and files:
        return {"url": files, "options": {}}
    if isinstance(files, dict) and files.get("url"):
        return {"url": files["url"], "options": dict(files.get("options") or {})}
    if os.environ.get("PBM_FILES_URL"):
        return {"url": os.environ["PBM_FILES_URL"], "options": json.loads(os.environ.get("PBM_FILES_OPTIONS") or "{}")}
    from pbmigrate.context import work_dir

    return {"url": (work_dir() / "files" / target_schema).resolve().as_uri(), "options": {}}


def safe_store_url(url: str) -> str:
    """The URL without credentials, for logs and reports."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    return urlunsplit(parts._replace(query=""))


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None = None
    md5: str | None = None
    content_type: str | None = None
    original_name: str | None = None


def _md5_b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class FileStore:
    """A directory or S3 bucket (anything fsspec opens) holding `<collection>/<record>/<name>`.

    A local directory is written with plain file calls (the copy is judged against `cp -r`);
    every other protocol goes through fsspec (s3fs for `s3://`, options as s3fs takes them:
    `key`, `secret`, `client_kwargs={"endpoint_url": ...}`).
    """

    def __init__(self, url: str, options: dict | None = None):
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = protocol in ("file", "local")
        self.root = root.rstrip("/") if root != "/" else ""
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        self._buffers = threading.local()

    def describe(self) -> str:
        return safe_store_url(self.url)

    @staticmethod
    def key(collection: str, record_id: str, name: str) -> str:
        return f"{collection}/{record_id}/{name}"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _buffer(self) -> memoryview:
        buf = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = memoryview(bytearray(CHUNK))
        return buf

    # writing

    def put(self, key: str, src: BinaryIO, *, content_type: str | None, original_name: str | None,
            md5: str | None) -> tuple[int, str]:
        """Stream `src` into the object `key` (one chunk in memory); returns size and sha256."""
        if self.local:
            return self._put_local(key, src, content_type, original_name, md5)
        sha = hashlib.sha256()
        size = 0
        meta = {"original-filename": quote(original_name or key.rsplit("/", 1)[-1], safe="")}
        if md5:
            meta["md5"] = md5
        # the sha256 is known only at the end: S3 metadata is written with the object, so it goes
        # in the ledger (and is proven by re-reading); the object's own metadata keeps the rest
        with self.fs.open(self.path(key), "wb", block_size=S3_PART, ContentType=content_type or
                          "application/octet-stream", Metadata=meta) as out:
            while chunk := src.read(CHUNK):
                sha.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return size, sha.hexdigest()

    def _put_local(self, key: str, src: BinaryIO, content_type: str | None, original_name: str | None,
                   md5: str | None) -> tuple[int, str]:
        path = self.path(key)
        attrs = path + ATTRS
        try:
            out = open(path, "wb")  # noqa: SIM115 - closed below, after the mkdir retry
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            out = open(path, "wb")  # noqa: SIM115
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(attrs)  # a re-copy: the old commit mark goes first
        sha = hashlib.sha256()
        size = 0
        buf = self._buffer()
        readinto = getattr(src, "readinto", None)
        with out:
            if readinto is not None:
                while n := readinto(buf):
                    view = buf[:n]
                    sha.update(view)
                    out.write(view)
                    size += n
            else:
                while chunk := src.read(CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        meta = {"user.content_type": content_type or "application/octet-stream",
                "user.metadata": {"original-filename": original_name} if original_name else None,
                "md5": md5, "sha256": sha.hexdigest(), "size": size}
        with open(attrs, "w") as fh:
            fh.write(json.dumps(meta, ensure_ascii=False))
        return size, meta["sha256"]

    def delete(self, key: str) -> None:
        if self.local:
            for p in (self.path(key), self.path(key) + ATTRS):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(key))

    # reading

    def head(self, key: str) -> ObjectInfo | None:
        """What the store says of a complete object (None: absent or not committed)."""
        if self.local:
            path = self.path(key)
            try:
                size = os.stat(path).st_size
                with open(path + ATTRS) as fh:
                    meta = json.load(fh)
            except (FileNotFoundError, NotADirectoryError, ValueError):
                return None
            if meta.get("size") != size or not meta.get("sha256"):
                return None
            user = meta.get("user.metadata") or {}
            return ObjectInfo(size, meta["sha256"], meta.get("md5"), meta.get("user.content_type"),
                              user.get("original-filename"))
        try:
            info = self.fs.info(self.path(key))
        except FileNotFoundError:
            return None
        meta = self.fs.metadata(self.path(key)) if hasattr(self.fs, "metadata") else {}
        name = meta.get("original-filename")
        return ObjectInfo(int(info["size"]), None, meta.get("md5"), info.get("ContentType"),
                          unquote(name) if name else None)

    def digest(self, key: str) -> tuple[int, str, str] | None:
        """Size, sha256 and md5 (base64) of the object's bytes as stored, re-read in chunks."""
        sha, md = hashlib.sha256(), hashlib.md5()
        size = 0
        try:
            fh = (open(self.path(key), "rb") if self.local  # noqa: SIM115
                  else self.fs.open(self.path(key), "rb", block_size=S3_PART))
        except FileNotFoundError:
            return None
        with fh:
            while chunk := fh.read(CHUNK):
                sha.update(chunk)
                md.update(chunk)
                size += len(chunk)
        return size, sha.hexdigest(), _md5_b64(md.digest())

    def write_index(self, collections: dict[str, str]) -> None:
        """`_collections.json` at the root: collection id -> name, so URLs built with PocketBase's
        collection ids (the JS SDK's `getURL` does) still find `<name>/...`."""
        path = self.path("_collections.json")
        current: dict[str, str] = {}
        try:
            with (open(path) if self.local else self.fs.open(path, "r")) as fh:
                current = json.load(fh)
        except (FileNotFoundError, ValueError):
            pass
        if all(current.get(k) == v for k, v in collections.items()):
            return
        body = json.dumps({**current, **collections}, indent=1, sort_keys=True)
        if self.local:
            tmp = path + ".partial"
            with open(tmp, "w") as fh:
                fh.write(body)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as fh:
                fh.write(body)


def open_store(cfg: dict) -> FileStore:
    try:
        return FileStore(cfg["url"], cfg.get("options"))
    except (ValueError, ImportError) as exc:
        raise ParamError(f"file store {safe_store_url(cfg['url'])!r} cannot be opened: {exc}") from exc


# --------------------------------------------------------------------------- the source's files


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
        path = self.root / coll.id / record_id / name
        try:
            fh = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise MissingFile(f"missing file: {name} is not in PocketBase's storage ({coll.id}/{record_id}/)") from exc
        try:
            with open(str(path) + ATTRS, "rb") as a:
                attrs = json.loads(a.read())
        except (FileNotFoundError, ValueError):
            attrs = {}
        user = attrs.get("user.metadata") or {}
        return fh, {"content_type": attrs.get("user.content_type") or None,
                    "original_name": user.get("original-filename") if isinstance(user, dict) else None,
                    "md5": attrs.get("md5") or None}


def _local_fingerprint(root: Path, coll: Collection, record_id: str, name: str) -> tuple[int, str | None] | None:
    path = root / coll.id / record_id / name
    try:
        size = os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        with open(str(path) + ATTRS, "rb") as a:
            md5 = json.loads(a.read()).get("md5") or None
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


def open_storage(run: dict, source: Any) -> LocalStorage | ApiStorage:
    if run["source_kind"] == "sqlite":
        return LocalStorage(storage_dir(run))
    return ApiStorage(source)


# --------------------------------------------------------------------------- names in the target


def file_columns(table: Table) -> list[Column]:
    return [c for c in table.columns if c.field.type == "file"]


@dataclass(frozen=True)
class Ref:
    record_id: str
    field: str  # the PocketBase field name
    name: str


def _refs_sql(schema: str, table: Table, where: str) -> str:
    parts = []
    for c in file_columns(table):
        value = f"unnest(x.{qi(c.name)})" if c.type.endswith("[]") else f"x.{qi(c.name)}"
        parts.append(f"SELECT x.id, {_lit(c.field.name)} AS field, {value} AS name "
                     f"FROM {qi(schema)}.{qi(table.name)} x WHERE {where}")
    return "SELECT id, field, name FROM (" + " UNION ALL ".join(parts) + ") r WHERE name IS NOT NULL AND name <> ''"


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _range(col: str, lo: str | None, hi: str | None) -> tuple[str, tuple]:
    clauses, args = [], []
    if lo is not None:
        clauses.append(f'{col} >= (%s::text COLLATE "C")')
        args.append(lo)
    if hi is not None:
        clauses.append(f'{col} <= (%s::text COLLATE "C")')
        args.append(hi)
    return " AND ".join(clauses) or "true", tuple(args)


def target_refs(conn: psycopg.Connection, schema: str, table: Table, lo: str | None = None,
                hi: str | None = None) -> list[Ref]:
    """Every file name the migrated table holds for ids in [lo, hi], one per (record, field, name)."""
    if not file_columns(table):
        return []
    where, args = _range("x.id", lo, hi)
    n = len(file_columns(table))
    sql = _refs_sql(schema, table, where)
    return [Ref(r, f, name) for r, f, name in conn.execute(sql, args * n)]


# --------------------------------------------------------------------------- copying


@dataclass
class Outcome:
    ref: Ref
    key: str
    status: str  # done | missing
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    content_type: str | None = None
    reason: str | None = None
    adopted: bool = False  # found complete in the store (an earlier attempt copied it)


@dataclass
class CopyResult:
    collection: str
    lo: str | None
    hi: str | None
    files: int = 0
    copied: int = 0
    bytes_copied: int = 0
    skipped: int = 0  # already in the ledger
    adopted: int = 0
    missing: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("collection", "lo", "hi", "files", "copied", "bytes_copied", "skipped",
                                              "adopted", "missing", "seconds", "examples")}

    def log_line(self) -> str:
        rate = self.bytes_copied / self.seconds / 1e6 if self.seconds else 0.0
        return (f"files {self.collection} [{self.lo}..{self.hi}]: {self.files:,} names, copied {self.copied:,} "
                f"({self.bytes_copied:,} bytes, {rate:.1f} MB/s), already done {self.skipped:,}, adopted "
                f"{self.adopted:,}, missing {self.missing:,} in {self.seconds:.2f} s")


def copy_one(storage: LocalStorage | ApiStorage, store: FileStore, coll: Collection, ref: Ref) -> Outcome:
    """One file from the source into the store, unless the store holds it complete already."""
    key = store.key(coll.name, ref.record_id, ref.name)
    bad = unsafe_name(ref.record_id, ref.name)
    if bad:
        return Outcome(ref, key, "missing", reason=f"bad file name: {bad}")
    have = store.head(key) if store.local else None  # S3 keeps no sha256 to adopt: copy again
    if have is not None:  # an earlier attempt's complete copy: adopted if the source agrees
        source = storage.fingerprint(coll, ref.record_id, ref.name)
        if source is None or (source[0] == have.size and source[1] == have.md5):
            return Outcome(ref, key, "done", have.size, have.sha256, have.md5, have.content_type, adopted=True)
    try:
        src, attrs = storage.open(coll, ref.record_id, ref.name)
    except MissingFile as exc:
        return Outcome(ref, key, "missing", reason=str(exc))
    with src:
        size, sha = store.put(key, src, content_type=attrs["content_type"], original_name=attrs["original_name"],
                              md5=attrs["md5"])
    return Outcome(ref, key, "done", size, sha, attrs["md5"], attrs["content_type"])


def _ledger_rows(run_id: str, coll: str, store: str, outcomes: list[Outcome]) -> list[tuple]:
    return [(run_id, coll, o.ref.record_id, o.ref.field, o.ref.name, store, o.key, o.size, o.sha256, o.md5,
             o.content_type, o.status, o.reason) for o in outcomes]


LEDGER_UPSERT = """
INSERT INTO pbm_meta.files (run_id, collection, record_id, field, name, store, key, size, sha256, md5,
                            content_type, status, reason)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (run_id, collection, record_id, field, name) DO UPDATE SET store = EXCLUDED.store, key = EXCLUDED.key,
    size = EXCLUDED.size,
    sha256 = EXCLUDED.sha256, md5 = EXCLUDED.md5, content_type = EXCLUDED.content_type, status = EXCLUDED.status,
    reason = EXCLUDED.reason, copied_at = now()
"""


def record_outcomes(conn: psycopg.Connection, run_id: str, coll: str, store: str, outcomes: list[Outcome],
                    batch_lo: str | None = None) -> None:
    """Ledger rows, and a reject per file the source lacks (never a secret: names and ids only)."""
    if not outcomes:
        return
    with conn.cursor() as cur:
        cur.executemany(LEDGER_UPSERT, _ledger_rows(run_id, coll, store, outcomes))
        missing = [o for o in outcomes if o.status != "done"]
        if missing:
            cur.executemany(
                "INSERT INTO pbm_meta.rejects (run_id, collection, record_id, field, reason, stage, batch_lo) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(run_id, coll, o.ref.record_id, o.ref.field, o.reason, STAGE, batch_lo) for o in missing])


def copy_refs(conn: psycopg.Connection, storage: LocalStorage | ApiStorage, store: FileStore, coll: Collection,
              refs: Iterable[Ref], run_id: str, result: CopyResult, batch_lo: str | None = None,
              workers: int = WORKERS) -> None:
    """Copy `refs`, writing their ledger rows (and rejects) every LEDGER_ROWS files, in order."""
    pending: list[Outcome] = []

    def flush() -> None:
        with conn.transaction():
            record_outcomes(conn, run_id, coll.name, store.describe(), pending, batch_lo)
        pending.clear()

    def account(o: Outcome) -> None:
        if o.status != "done":
            result.missing += 1
            if len(result.examples) < EXAMPLES:
                result.examples.append(f"{o.ref.record_id}.{o.ref.field}: {o.reason}")
        elif o.adopted:
            result.adopted += 1
        else:
            result.copied += 1
            result.bytes_copied += o.size or 0
        pending.append(o)
        if len(pending) >= LEDGER_ROWS:
            flush()

    refs = list(refs)
    if workers <= 1 or len(refs) < 2:
        for ref in refs:
            account(copy_one(storage, store, coll, ref))
    else:  # a window of LEDGER_ROWS in flight at a time: memory does not grow with the range
        with ThreadPoolExecutor(workers, thread_name_prefix="pbm-files") as pool:
            for start in range(0, len(refs), LEDGER_ROWS):
                for o in pool.map(lambda r: copy_one(storage, store, coll, r), refs[start:start + LEDGER_ROWS]):
                    account(o)
    if pending:
        flush()


def copy_range(conn: psycopg.Connection, storage: LocalStorage | ApiStorage, store: FileStore, table: Table, *,
               run_id: str, schema: str, lo: str | None, hi: str | None, workers: int = WORKERS) -> CopyResult:
    """The files of one id range of one migrated table. A retry skips what the ledger holds and
    settles again what an earlier attempt found missing (the file may have come back)."""
    started = time.monotonic()
    coll = table.collection
    result = CopyResult(coll.name, lo, hi)
    refs = target_refs(conn, schema, table, lo, hi)
    result.files = len(refs)
    where, args = _range("record_id", lo, hi)
    with conn.transaction():
        conn.execute(f"DELETE FROM pbm_meta.files WHERE run_id = %s AND collection = %s AND status <> 'done' "
                     f"AND {where}", (run_id, coll.name, *args))
        conn.execute(f"DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND stage = %s AND {where}",
                     (run_id, coll.name, STAGE, *args))
    done = {Ref(r, f, n) for r, f, n in conn.execute(
        f"SELECT record_id, field, name FROM pbm_meta.files WHERE run_id = %s AND collection = %s AND {where}",
        (run_id, coll.name, *args))}
    todo = [r for r in refs if r not in done]
    result.skipped = len(refs) - len(todo)
    copy_refs(conn, storage, store, coll, todo, run_id, result, lo, workers)
    result.seconds = round(time.monotonic() - started, 3)
    return result


# --------------------------------------------------------------------------- DAG task entry points


def file_tables(plan: Plan) -> list[Table]:
    return [t for t in plan.tables if file_columns(t)]


def plan_file_batches(run: dict, pg_url: str, api: dict | None = None, max_batches: int | None = None,
                      files: dict | str | None = None) -> list[dict]:
    """The data phase's id ranges of every collection with file fields (largest first), one
    mapped task each: the ranges the ledger proves loaded, so the names come from the target.
    Also writes the store's id -> name index, here, once, before the copies run in parallel."""
    from pbmigrate.context import open_run_source, run_plan

    source = open_run_source(run, api)
    try:
        plan = run_plan(run, source)
    finally:
        source.close()
    wanted = {t.collection.name: t for t in file_tables(plan)}
    if not wanted:
        log.info("no collection of this migration has a file field: nothing to copy")
        return []
    open_store(store_config(files, run["target_schema"])).write_index(
        {t.collection.id: t.collection.name for t in wanted.values()})
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_meta(conn)
        rows = conn.execute(
            "SELECT collection, lo, hi, rows_loaded FROM pbm_meta.batches WHERE run_id = %s AND collection = ANY(%s) "
            "ORDER BY collection, lo COLLATE \"C\"", (run["run_id"], list(wanted))).fetchall()
    batches = [{"collection": c, "lo": lo, "hi": hi, "rows": int(n), "label": f"{c} [{lo}..{hi}]"}
               for c, lo, hi, n in rows]
    if max_batches and len(batches) > max_batches:
        raise ParamError(f"{len(batches)} file batches exceed Airflow's max_map_length ({max_batches}); "
                         "raise batch_size")
    for name, t in wanted.items():
        cols = ", ".join(c.field.name for c in file_columns(t))
        log.info("%s: file fields %s in %d ranges", name, cols, sum(1 for b in batches if b["collection"] == name))
    batches.sort(key=lambda b: -b["rows"])
    return batches


def copy_batch(run: dict, batch: dict, pg_url: str, files: dict | str | None = None,
               api: dict | None = None) -> dict:
    """One mapped task of the `files` group: the files of one id range, into the store."""
    from pbmigrate.audit.guard import target_lock
    from pbmigrate.context import open_run_source, run_plan

    store = open_store(store_config(files, run["target_schema"]))
    source = open_run_source(run, api)
    try:
        plan = run_plan(run, source)
        table = plan.table_for(batch["collection"])
        storage = open_storage(run, source)
        with target_lock(pg_url, run["target_schema"], shared=True, holder="pbmigrate migration"), \
                psycopg.connect(pg_url, autocommit=True) as conn:
            ensure_meta(conn)
            result = copy_range(conn, storage, store, table, run_id=run["run_id"], schema=run["staging_schema"],
                                lo=batch["lo"], hi=batch["hi"], workers=WORKERS if store.local else 2)
    finally:
        source.close()
    log.info("%s (from %s to %s)", result.log_line(), storage.describe(), store.describe())
    return result.as_dict()


# --------------------------------------------------------------------------- proof


def _ledger(conn: psycopg.Connection, run_id: str, coll: str) -> dict[Ref, tuple]:
    return {Ref(r, f, n): (status, size, sha, md5, key) for r, f, n, status, size, sha, md5, key in conn.execute(
        "SELECT record_id, field, name, status, size, sha256, md5, key FROM pbm_meta.files "
        "WHERE run_id = %s AND collection = %s", (run_id, coll))}


def check_table_files(conn: psycopg.Connection, store: FileStore, table: Table, run_id: str, schema: str,
                      workers: int = WORKERS) -> dict[str, Any]:
    """Every file name the table holds: its object re-read, size and sha256 equal to the ledger's
    (what was read from the source), and PocketBase's md5 where `.attrs` had one. A name the
    ledger records as missing is a reject (the gate counts it); a name with no ledger row at all,
    or an object that is absent or differs, fails the check."""
    started = time.monotonic()
    coll = table.collection.name
    refs = target_refs(conn, schema, table)
    ledger = _ledger(conn, run_id, coll)
    counts = {"files": len(refs), "bytes": 0, "verified": 0, "rejected": 0, "unrecorded": 0, "missing_objects": 0,
              "size_mismatch": 0, "sha256_mismatch": 0, "md5_mismatch": 0, "md5_checked": 0}
    examples: list[str] = []
    to_read = []
    for ref in refs:
        row = ledger.get(ref)
        if row is None:
            counts["unrecorded"] += 1
            examples.append(f"{ref.record_id}.{ref.field} {ref.name}: no ledger row")
        elif row[0] != "done":
            counts["rejected"] += 1
        else:
            to_read.append((ref, row))

    def read(item: tuple[Ref, tuple]) -> tuple[Ref, tuple, tuple | None]:
        ref, row = item
        return ref, row, store.digest(row[4])

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="pbm-files-check") as pool:
        for ref, (_, size, sha, md5, key), got in pool.map(read, to_read):
            label = f"{ref.record_id}.{ref.field} {ref.name}"
            if got is None:
                counts["missing_objects"] += 1
                examples.append(f"{label}: no object {key}")
                continue
            bad = False
            if got[0] != size:
                counts["size_mismatch"] += 1
                examples.append(f"{label}: {got[0]} bytes, ledger {size}")
                bad = True
            if got[1] != sha:
                counts["sha256_mismatch"] += 1
                examples.append(f"{label}: sha256 differs from the source's")
                bad = True
            if md5:
                counts["md5_checked"] += 1
                if got[2] != md5:
                    counts["md5_mismatch"] += 1
                    examples.append(f"{label}: md5 {got[2]} but PocketBase's .attrs says {md5}")
                    bad = True
            if not bad:
                counts["verified"] += 1
                counts["bytes"] += got[0]
    referenced = set(refs)
    counts["stale_ledger_rows"] = sum(1 for r in ledger if r not in referenced)
    failures = counts["unrecorded"] + counts["missing_objects"] + counts["size_mismatch"] + \
        counts["sha256_mismatch"] + counts["md5_mismatch"]
    return {"ok": failures == 0, **counts, "examples": examples[:EXAMPLES], "store": store.describe(),
            "seconds": round(time.monotonic() - started, 3)}


def file_checks(conn: psycopg.Connection, plan: Plan, run: dict, files: dict | str | None = None) -> list[Any]:
    """Validation's `files` check per table with file fields (recorded with the others in pbm_meta.checks)."""
    from pbmigrate.audit.meta import Check

    tables = file_tables(plan)
    if not tables:
        return []
    ensure_meta(conn)
    store = open_store(store_config(files, run["target_schema"]))
    checks = []
    for t in tables:
        obs = check_table_files(conn, store, t, run["run_id"], run["staging_schema"])
        ok = obs.pop("ok")
        checks.append(Check(t.name, "files", ok, obs))
        log.info("files of %s: %d names, %d verified (%d bytes), %d rejected, %s", t.name, obs["files"],
                 obs["verified"], obs["bytes"], obs["rejected"], "ok" if ok else f"FAILED {obs['examples']}")
    return checks


def files_report(conn: psycopg.Connection, run_id: str) -> dict[str, dict[str, int]]:
    """Per collection: files copied and their bytes, and files missing from the source."""
    if not has_ledger(conn):
        return {}
    return {c: {"files": int(n), "bytes": int(b or 0), "missing": int(m)} for c, n, b, m in conn.execute(
        "SELECT collection, count(*) FILTER (WHERE status = 'done'), sum(size) FILTER (WHERE status = 'done'), "
        "count(*) FILTER (WHERE status <> 'done') FROM pbm_meta.files WHERE run_id = %s GROUP BY 1 ORDER BY 1",
        (run_id,))}


# --------------------------------------------------------------------------- re-sync


def resync_files(conn: psycopg.Connection, source: Any, plan: Plan, run: dict, schema: str,
                 files: dict | str | None = None) -> list[str]:
    """Inside the re-sync's transaction, after its rows: copy the files the target names and the
    ledger lacks (new or changed records), forget those it no longer names (deleted records,
    replaced files). Returns the keys to delete once the transaction has committed: deleting
    before would leave rows of a rolled-back re-sync pointing at nothing."""
    tables = file_tables(plan)
    if not tables:
        return []
    ensure_meta(conn)
    store = open_store(store_config(files, run["target_schema"]))
    storage = open_storage(run, source)
    run_id = run["run_id"]
    doomed: list[str] = []
    store.write_index({t.collection.id: t.collection.name for t in tables})
    for t in tables:
        coll = t.collection
        refs = set(target_refs(conn, schema, t))
        ledger = _ledger(conn, run_id, coll.name)
        gone = [r for r in ledger if r not in refs]
        new = sorted((r for r in refs if ledger.get(r, ("missing",))[0] != "done"),
                     key=lambda r: (r.record_id, r.field, r.name))
        touched = sorted({r.record_id for r in gone} | {r.record_id for r in new})
        if touched:
            conn.execute("DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND stage = %s "
                         "AND record_id = ANY(%s)", (run_id, coll.name, STAGE, touched))
        if gone:
            with conn.cursor() as cur:
                cur.executemany("DELETE FROM pbm_meta.files WHERE run_id = %s AND collection = %s AND record_id = %s "
                                "AND field = %s AND name = %s",
                                [(run_id, coll.name, r.record_id, r.field, r.name) for r in gone])
            doomed += [ledger[r][4] for r in gone if ledger[r][0] == "done"]
        result = CopyResult(coll.name, None, None, files=len(refs))
        if new:
            copy_refs(conn, storage, store, coll, new, run_id, result, workers=WORKERS if store.local else 2)
        if new or gone:
            log.info("re-sync files of %s: copied %d (%d bytes), removed %d, missing %d", coll.name, result.copied,
                     result.bytes_copied, len(gone), result.missing)
    return doomed


def delete_objects(keys: list[str], run: dict, files: dict | str | None = None) -> int:
    """Remove objects no record names any more (after the re-sync committed)."""
    if not keys:
        return 0
    store = open_store(store_config(files, run["target_schema"]))
    for key in keys:
        store.delete(key)
    return len(keys)


# --------------------------------------------------------------------------- backups


def manifest(conn: psycopg.Connection, run: dict, dest: Path) -> dict | None:
    """The pre-cut-over backup's list of the files it covers (key, size, sha256), as JSON lines.
    The store itself is never deleted, by a roll-back or anything else: the list says what it held."""
    if not has_ledger(conn):
        return None
    rows = conn.execute("SELECT collection, record_id, field, name, key, size, sha256, md5, content_type, store "
                        "FROM pbm_meta.files WHERE run_id = %s AND status = 'done' ORDER BY key",
                        (run["run_id"],)).fetchall()
    if not rows:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    stores = sorted({r[9] for r in rows})
    with open(dest, "w") as fh:
        fh.write(json.dumps({"store": stores[0] if len(stores) == 1 else stores, "files": len(rows)}) + "\n")
        for c, r, f, n, key, size, sha, md5, ctype, _ in rows:
            total += size or 0
            fh.write(json.dumps({"collection": c, "record": r, "field": f, "name": n, "key": key, "size": size,
                                 "sha256": sha, "md5": md5, "content_type": ctype}, ensure_ascii=False) + "\n")
    return {"path": str(dest), "bytes": total, "files": len(rows), "store": ", ".join(stores)}

