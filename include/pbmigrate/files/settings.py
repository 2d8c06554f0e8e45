"""PocketBase's own settings (`_params`), read from the source's data.db for one reason: whether
its files live in an S3 bucket, and where. The row is `key='settings'` in 0.22 (TEXT JSON) and
`id='settings'` in 0.23+ (a BLOB); started with `--encryptionEnv VAR` PocketBase stores it as
base64 of AES-256-GCM (a 12-byte nonce, then the sealed JSON) under the 32-byte key VAR holds.

The settings hold every secret PocketBase has (SMTP password, OAuth2 secrets, the S3 secret): they
are parsed here, the S3 part is kept, the rest is dropped, and nothing of them is logged or
returned in a form that reaches XCom, the ledger, rejects or Redis (`S3Settings.__repr__` hides
the secret, in case a traceback prints it).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from pbmigrate.errors import ParamError

# the value of the variable PocketBase's --encryptionEnv names (PocketBase's docs call it
# PB_ENCRYPTION_KEY); PBM_PB_ENCRYPTION_ENV names another variable to read it from
KEY_ENV = "PB_ENCRYPTION_KEY"
NONCE = 12  # Go's cipher.NewGCM default nonce size, which PocketBase's security.Encrypt uses


@dataclass(frozen=True)
class S3Settings:
    """PocketBase's `s3` section: the bucket its record files live in."""

    bucket: str
    region: str
    endpoint: str
    access_key: str
    secret: str = field(repr=False)
    force_path_style: bool = False

    def endpoint_url(self) -> str | None:
        """PocketBase accepts an endpoint without a scheme and then uses https."""
        if not self.endpoint:
            return None
        return self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}"

    def describe(self) -> str:
        """Bucket and endpoint, no credentials: for logs and the ledger."""
        where = self.endpoint_url() or f"AWS {self.region}"
        return f"s3://{self.bucket} ({where})"

    def fs_options(self) -> dict[str, Any]:
        """s3fs options for this bucket."""
        client: dict[str, Any] = {"region_name": self.region or None}
        if self.endpoint_url():
            client["endpoint_url"] = self.endpoint_url()
        return {"key": self.access_key, "secret": self.secret, "client_kwargs": client,
                "config_kwargs": {"s3": {"addressing_style": "path" if self.force_path_style else "auto"}}}


def encryption_key() -> str | None:
    return os.environ.get(os.environ.get("PBM_PB_ENCRYPTION_ENV") or KEY_ENV) or None


def decrypt(value: str, key: str) -> bytes:
    """PocketBase's security.Decrypt: base64 -> nonce | AES-256-GCM ciphertext+tag."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(key.encode()) != 32:
        raise ParamError(f"{KEY_ENV} must be the 32-character key PocketBase was started with "
                         f"(--encryptionEnv); it has {len(key.encode())} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
        return AESGCM(key.encode()).decrypt(raw[:NONCE], raw[NONCE:], None)
    except (binascii.Error, ValueError, InvalidTag) as exc:
        raise ParamError(f"PocketBase's settings do not decrypt with {KEY_ENV}: not the key PocketBase "
                         "was started with (--encryptionEnv)") from exc


def parse_settings(value: str | bytes | None) -> dict[str, Any]:
    """The settings JSON of a `_params` value, plain or encrypted."""
    if value is None:
        return {}
    text = value.decode() if isinstance(value, bytes | bytearray | memoryview) else str(value)
    text = text.strip()
    if not text:
        return {}
    if not text.startswith("{"):  # --encryptionEnv: base64 ciphertext
        key = encryption_key()
        if not key:
            raise ParamError(f"PocketBase's settings are encrypted (--encryptionEnv): set {KEY_ENV} to the key "
                             "PocketBase was started with, so the pipeline can find the S3 bucket of its files")
        text = decrypt(text, key).decode()
    try:
        got = json.loads(text)
    except ValueError as exc:
        raise ParamError("PocketBase's settings (_params) are not JSON") from exc
    return got if isinstance(got, dict) else {}


def read_settings(query: Any) -> dict[str, Any]:
    """The settings row of a data.db, through `query(sql) -> rows` (SqliteSource.query)."""
    try:
        cols = {r[1] for r in query("PRAGMA table_info(_params)")}
    except sqlite3.Error:
        return {}
    if not cols:
        return {}
    where = "key = 'settings'" if "key" in cols else "id = 'settings'"  # 0.22 has a key column
    rows = query(f"SELECT value FROM _params WHERE {where}")
    return parse_settings(rows[0][0]) if rows else {}


def s3_settings(settings: dict[str, Any]) -> S3Settings | None:
    """The bucket PocketBase stores record files in, when its `s3.enabled` is set."""
    s3 = settings.get("s3") or {}
    if not isinstance(s3, dict) or not s3.get("enabled"):
        return None
    if not s3.get("bucket"):
        raise ParamError("PocketBase's settings enable S3 storage without a bucket")
    return S3Settings(bucket=str(s3["bucket"]), region=str(s3.get("region") or ""),
                      endpoint=str(s3.get("endpoint") or ""), access_key=str(s3.get("accessKey") or ""),
                      secret=str(s3.get("secret") or ""), force_path_style=bool(s3.get("forcePathStyle")))
