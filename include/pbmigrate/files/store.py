"""The target's file store: a directory or an S3 bucket (anything fsspec opens), keyed
`<collection>/<record id>/<name>` under its root, with each object's metadata beside it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pbmigrate.context import work_dir
from pbmigrate.errors import ParamError
from pbmigrate.files.localcopy import BUFFER, buffer, copy_regular, regular_fd, write_fd

CHUNK = BUFFER  # bytes per read: memory per copy stays at one chunk whatever the file's size
S3_PART = 5 * 1024 * 1024  # s3fs buffers one part (the S3 minimum) per upload, not its default 50 MB
ATTRS = ".attrs"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def write_all(path: str, data: bytes) -> None:
    """`data` as the whole of the file at `path` (created or truncated), in one write."""
    fd = os.open(path, _CREATE, 0o644)
    try:
        write_fd(fd, data)
    finally:
        os.close(fd)


def read_all(path: str) -> bytes:
    """The whole of a small file (an `.attrs`) through one descriptor, no io objects."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def store_config(files: dict | str | None, target_schema: str) -> dict[str, Any]:
    """`{"url", "options"}` of the target's store: the connection's, else PBM_FILES_URL (with
    PBM_FILES_OPTIONS as JSON), else a directory under the work dir. Options may hold secrets."""
    if isinstance(files, str) and files:
        return {"url": files, "options": {}}
    if isinstance(files, dict) and files.get("url"):
        return {"url": files["url"], "options": dict(files.get("options") or {})}
    if os.environ.get("PBM_FILES_URL"):
        return {"url": os.environ["PBM_FILES_URL"], "options": json.loads(os.environ.get("PBM_FILES_OPTIONS") or "{}")}
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


def md5_b64(digest: bytes) -> str:
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

    def describe(self) -> str:
        return safe_store_url(self.url)

    @staticmethod
    def key(collection: str, record_id: str, name: str) -> str:
        return f"{collection}/{record_id}/{name}"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

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
        # os-level calls, not io objects: for 10,000 small files the per-file Python work is what
        # separates the copy from `cp -r` (which makes the same mkdir and creat calls)
        path = self.path(key)
        attrs = path + ATTRS
        try:
            fd = os.open(path, _CREATE, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, _CREATE, 0o644)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(attrs)  # a re-copy: the old commit mark goes first
        try:
            src_fd = regular_fd(src)
            if src_fd is not None:  # a local file: copied in the kernel, hashed from the page cache
                size, digest = copy_regular(src_fd, fd)
            else:  # a download: one chunk at a time through a buffer of this thread's
                size, digest = self._stream(src, fd)
        finally:
            os.close(fd)
        meta = {"user.content_type": content_type or "application/octet-stream",
                "user.metadata": {"original-filename": original_name} if original_name else None,
                "md5": md5, "sha256": digest, "size": size}
        write_all(attrs, json.dumps(meta, ensure_ascii=False).encode())  # the commit mark, written last
        return size, digest

    def _stream(self, src: BinaryIO, fd: int) -> tuple[int, str]:
        sha = hashlib.sha256()
        size = 0
        readinto = getattr(src, "readinto", None)
        if readinto is not None:
            buf = buffer()
            while n := readinto(buf):
                view = buf[:n]
                sha.update(view)
                write_fd(fd, view)
                size += n
        else:
            while chunk := src.read(CHUNK):
                sha.update(chunk)
                write_fd(fd, chunk)
                size += len(chunk)
        return size, sha.hexdigest()

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
                meta = json.loads(read_all(path + ATTRS))
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
        return size, sha.hexdigest(), md5_b64(md.digest())

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

