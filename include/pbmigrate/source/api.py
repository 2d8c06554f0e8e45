"""Read records from a running PocketBase over its REST API, as a superuser.

Rows come out exactly like `SqliteSource` gives them: in id byte order, as tuples in the order of
the collection's fields, in PocketBase's SQLite *storage* form (POCKETBASE.md section 2.4), so one
converter serves both sources. Paging is keyset (`sort=id`, `filter=id>'last'`), which stays
O(1) per page and resumes exactly after a failure. The API never returns password hashes or
token keys (section 0.2 #16): those columns come out as None and `warnings()` says so.

What the API cannot tell: JSON is re-encoded compactly, so JSON text PocketBase stored with
whitespace (multipart input, old databases) or as the text 'null' comes out equal in meaning but
not byte for byte; compare JSON values parsed, never as text.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from json.encoder import encode_basestring
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import requests

from pbmigrate.errors import SourceError
from pbmigrate.source.catalog import Catalog, Collection, Field, catalog_from_api
from pbmigrate.source.pbclient import PocketBaseClient, Retryable, short

PER_PAGE = 1000  # what we ask for; 0.22 clamps to 500 and 0.23+ to 1000, silently
BACKUP_NAME = re.compile(r"^[a-z0-9_-]+\.zip$")
IDS_PER_REQUEST = 100  # ids asked for in one filter (well under a page, even 0.22's 500)
# URL-encoded bytes for such a filter: 0.22 answers "Query string is too large." from about 2,000
# bytes of query string, and 0.40 refuses filters over 3,500 characters.
FILTER_BUDGET = 1800
FILE_TOKEN_SECONDS = 60  # file tokens live 120 s (0.22) to 180 s (0.23+): renew well before

# Auth columns of 0.22 that the API never returns (secrets, and internal timestamps).
LEGACY_UNEXPORTED = frozenset(
    {"passwordHash", "tokenKey", "lastResetSentAt", "lastVerificationSentAt", "lastLoginAlertSentAt"}
)
SECRETS_WARNING = (
    "API mode cannot export password hashes or token keys: PocketBase never returns them, not even "
    "to a superuser. Migrated auth records will have no password hash (users must reset their "
    "passwords) and no token key; read the data.db (or a backup of it) to keep them."
)

# Go's encoding/json escapes these inside strings. 0.22.27 and 0.23.12 store JSON that way,
# 0.40.6 does not; `_detects_html_escaping` tells which per server.
_GO_HTML_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


class ApiSource:
    """A `Source` over a live PocketBase's REST API (0.22 admins or 0.23+ superusers).

    Its `PocketBaseClient` logs in at construction, so a wrong password, an unreachable URL or a
    server that is not PocketBase fails at once with a one-line SourceError, and retries every
    request (`retries`, with backoff: enough to ride out a PocketBase restart). `prefetch` asks
    for the next page while the caller consumes the current one, so server and client work
    overlap on a machine with a core for each. An unordered read (the loader's) runs `cursors`
    keyset cursors over disjoint parts of the range at once: PocketBase spends most of a page's
    time in its own code and uses more than one core for concurrent requests.
    """

    kind = "api"
    has_secrets = False

    def __init__(self, url: str, email: str, password: str, timeout: float = 30, retries: int = 5,
                 prefetch: bool = True, cursors: int = 2):
        self.http = PocketBaseClient(url, email, password, timeout=timeout, retries=retries)
        self.url = self.http.url
        self.prefetch = prefetch
        self.cursors = max(1, cursors) if prefetch else 1
        self._file_lock = threading.Lock()
        self._file_token: tuple[str | None, float] = (None, 0.0)
        self._catalog: Catalog | None = None
        self._html_escape: bool | None = None
        self._filter_backslashes: bool | None = None

    @property
    def generation(self) -> int:
        """22 (admins, `_collections.schema`) or 23 (superusers, `fields`): the login tells."""
        return self.http.generation

    @property
    def logins(self) -> int:
        return self.http.logins

    @property
    def retried(self) -> int:
        return self.http.retried

    # -- Source protocol -------------------------------------------------------------------

    def catalog(self) -> Catalog:
        """All collections (offset paging is fine here: a catalog is small)."""
        if self._catalog is None:
            items: list[dict[str, Any]] = []
            page = 1
            while True:
                resp, data = self.http.send("GET", "/api/collections", params={"page": page, "perPage": 200},
                                        parse=True)
                if self._html_escape is None:
                    self._html_escape = _detects_html_escaping(resp.content, self.generation)
                items.extend(data.get("items") or [])
                if page >= int(data.get("totalPages") or 0) or not data.get("items"):
                    break
                page += 1
            items.sort(key=lambda i: i["name"])  # read_catalog orders by name (BINARY)
            self._catalog = catalog_from_api(items, self.generation)
        return self._catalog

    def count(self, coll: Collection) -> int:
        data = self.http.get(self._records_path(coll), {"perPage": 1, "fields": "id"}, what=f"collection {coll.name!r}")
        return int(data["totalItems"])

    def ids(self, coll: Collection, lo: str | None = None, hi: str | None = None) -> Iterator[str]:
        for items in self._pages(coll, lo, hi):
            for item in items:
                yield item["id"]

    def rows(self, coll: Collection, lo: str | None = None, hi: str | None = None,
             ordered: bool = True) -> Iterator[tuple]:
        """Rows with ids in [lo, hi], in id order unless `ordered=False`.

        Unordered, the range is cut at ids between lo and hi and each part is read by its own keyset
        cursor, concurrently; pages come out as they arrive. Every part is still keyset paged
        (offset paging would skip rows deleted during the read), so a retry stays exact.
        """
        convert = self._row_converter(coll, set(self.unexported_fields(coll)))
        cuts = [] if ordered else _split_points(lo, hi, self.cursors)
        if cuts:  # part k holds ids from its start up to (not including) cuts[k]; the last, up to hi
            parts = [self._pages(coll, start, None, lambda lit, cut=cut: f"id<{lit(cut)}")
                     for start, cut in zip([lo, *cuts], cuts)]
            pages = _interleave([*parts, self._pages(coll, cuts[-1], hi)])
        else:
            pages = self._pages(coll, lo, hi)
        for items in pages:
            yield from map(convert, items)

    def rows_since(self, coll: Collection, field: str, since: str) -> Iterator[tuple]:
        """Rows whose `field` (an autodate, text in PocketBase's own format) is >= `since`, in id
        order: the re-sync's changed rows, filtered by the server instead of a full read."""
        name = coll.field(field).name  # CatalogError for a field the collection lacks
        convert = self._row_converter(coll, set(self.unexported_fields(coll)))
        for items in self._pages(coll, None, None, lambda lit: f"{name}>={lit(since)}"):
            yield from map(convert, items)

    def rows_by_ids(self, coll: Collection, ids: Iterable[str]) -> Iterator[tuple]:
        """The rows with these ids (missing ones are simply absent), in id order, in as few
        requests as the servers' limits allow (0.22 refuses a query string over 2 KB; about 50
        PocketBase ids fit)."""
        convert = self._row_converter(coll, set(self.unexported_fields(coll)))
        wanted = sorted(set(ids))

        def cost(rid: str) -> int:  # URL-encoded size of `id='rid'||`, escaped the longer way
            return len(quote_plus(f"id={_filter_literal(rid, True)}||"))

        i = 0
        while i < len(wanted):
            part, size = [wanted[i]], cost(wanted[i])
            i += 1
            while i < len(wanted) and len(part) < IDS_PER_REQUEST and size + cost(wanted[i]) <= FILTER_BUDGET:
                size += cost(wanted[i])
                part.append(wanted[i])
                i += 1
            for items in self._pages(coll, None, None,
                                     lambda lit, part=part: "||".join(f"id={lit(r)}" for r in part)):
                yield from map(convert, items)

    def rows_referencing(self, coll: Collection, field: str, ids: Iterable[str]) -> Iterator[tuple]:
        """Read in full and filtered here: filter syntax for multiple relations differs across versions."""
        f = coll.field(field)
        pos = coll.fields.index(f)
        wanted = set(ids)
        for row in self.rows(coll, ordered=False):
            value = row[pos]
            if f.multi and isinstance(value, str) and value.startswith("["):
                if wanted.intersection(json.loads(value)):
                    yield row
            elif value in wanted:
                yield row

    def close(self) -> None:
        self.http.close()

    # -- what API mode cannot do ---------------------------------------------------------------

    def unexported_fields(self, coll: Collection) -> tuple[str, ...]:
        """Columns the API never returns: they come out of `rows` as None."""
        names = []
        for f in coll.fields:
            if f.type == "password" or f.name == "tokenKey" or (
                self.generation == 22 and coll.type == "auth" and f.name in LEGACY_UNEXPORTED
            ):
                names.append(f.name)
        return tuple(names)

    def warnings(self) -> list[str]:
        """Plain statements for the assessment: what an API-mode migration will lose."""
        out = [SECRETS_WARNING]
        for coll in self.catalog().migrating():
            missing = self.unexported_fields(coll)
            if missing:
                out.append(f"{coll.name}: the API does not return {', '.join(missing)}; "
                           "these columns will be empty")
        return out

    # -- backups -------------------------------------------------------------------------------

    def list_backups(self) -> list[dict[str, Any]]:
        """`[{"key", "size", "modified"}]` as the server reports them."""
        return list(self.http.get("/api/backups", {}) or [])

    def create_backup(self, name: str | None = None, timeout: float | None = None) -> str:
        """Ask the server for a backup zip and return its key.

        PocketBase <= 0.39 zips pb_data inside a write lock, which can take minutes on a large
        instance, hence the long default timeout. The request is not idempotent, so it is only
        retried when the server cannot have seen it; after any other failure the backup list
        decides whether it was made.
        """
        key = name or "pbmigrate_{}_{}.zip".format(
            datetime.now(UTC).strftime("%Y%m%d%H%M%S"), uuid.uuid4().hex[:6]
        )
        if not BACKUP_NAME.match(key):
            raise SourceError(f"{self.url}: backup name {key!r} must match {BACKUP_NAME.pattern}")
        try:
            self.http.request("POST", "/api/backups", json_body={"name": key}, idempotent=False,
                          timeout=max(self.http.timeout, timeout or 1800))
        except SourceError:
            if any(b.get("key") == key for b in self._safe_list_backups()):
                return key
            raise
        return key

    def download_backup(self, key: str, dest: str | Path) -> Path:
        """Download backup `key` to `dest` (a file path, or a folder to put `key` in).

        0.40 refuses the Authorization header here and wants a superuser file token as `?token=`;
        older versions accept it too. A broken transfer is restarted from the first byte.
        """
        target = Path(dest)
        if target.is_dir():
            target = target / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        path = f"/api/backups/{quote(key, safe='')}"

        def attempt() -> None:
            token = self.http.send("POST", "/api/files/token", parse=True)[1]["token"]
            try:
                resp = self.http.request("GET", path, params={"token": token}, stream=True, what=f"backup {key!r}")
                with resp, tmp.open("wb") as fh:
                    shutil.copyfileobj(resp.raw, fh, 1 << 20)
                    expected = resp.headers.get("Content-Length")
                if expected is not None and tmp.stat().st_size != int(expected):
                    raise Retryable(f"got {tmp.stat().st_size} of {expected} bytes")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        try:
            self.http.retrying(Retryable, requests.RequestException, OSError)(attempt)
        except (Retryable, requests.RequestException, OSError) as exc:
            raise SourceError(f"{self.url}: downloading backup {key!r} failed: {short(exc)}") from exc
        if not zipfile.is_zipfile(tmp):
            tmp.unlink(missing_ok=True)
            raise SourceError(f"{self.url}: backup {key!r} is not a zip file")
        tmp.replace(target)
        return target

    # -- files -------------------------------------------------------------------------------

    def file_token(self, refresh: bool = False) -> str:
        """A superuser file token for protected files (short-lived: renewed after 60 s). Never logged."""
        with self._file_lock:
            token, at = self._file_token
            if refresh or token is None or time.monotonic() - at > FILE_TOKEN_SECONDS:
                token = self.http.send("POST", "/api/files/token", parse=True)[1]["token"]
                self._file_token = (token, time.monotonic())
            return token

    def open_file(self, collection_id: str, record_id: str, name: str) -> requests.Response | None:
        """`GET /api/files/<collection>/<record>/<name>` streamed (None: 404, no such file).

        The file token goes in the query string, so errors name the path only."""
        path = "/api/files/" + "/".join(quote(p, safe="") for p in (collection_id, record_id, name))
        for attempt in range(2):
            try:
                resp = self.http.request("GET", path, params={"token": self.file_token(refresh=attempt > 0)},
                                     stream=True, check=False)
            except SourceError as exc:  # a network error's text may quote the URL, token included
                raise SourceError(re.sub(r"token=[^&\s'\")]+", "token=***", str(exc))) from None
            if resp.status_code == 200:
                return resp
            resp.close()
            if resp.status_code == 404:
                return None
            if resp.status_code not in (401, 403):
                break
        raise SourceError(f"{self.url}: GET {path} answered {resp.status_code}")

    def delete_backup(self, key: str) -> None:
        self.http.request("DELETE", f"/api/backups/{quote(key, safe='')}", idempotent=True,
                      what=f"backup {key!r}")

    # -- paging --------------------------------------------------------------------------------

    def _pages(self, coll: Collection, lo: str | None, hi: str | None,
               where: Callable[[Callable[[str], str]], str] | None = None
               ) -> Iterator[list[dict[str, Any]]]:
        """Keyset pages of `coll` in id order, each fetched while the previous one is consumed.

        The next page depends only on the last id seen, so a failed request is simply repeated:
        no row is skipped or read twice, even across a server restart. No `fields=`, not even for
        ids: PocketBase applies it by re-encoding each page, which cost 30% more server CPU
        (9.1 s against 7.0 s per 200,000 records) for a saving of only collectionId/collectionName.
        `where(lit)` adds a filter clause; `lit` quotes a value as a filter string literal.
        """
        path = self._records_path(coll)

        def lit(value: str) -> str:
            escapes = "\\" in value and self._backslash_escapes(coll)
            try:
                return _filter_literal(value, escapes)
            except SourceError as exc:
                raise SourceError(f"{self.url}: collection {coll.name!r}: {exc}") from None

        extra = where(lit) if where is not None else ""

        def fetch(last: str | None) -> dict[str, Any]:
            clauses = [f"({extra})"] if extra else []
            if last is not None:
                clauses.append(f"id>{lit(last)}")
            elif lo is not None:
                clauses.append(f"id>={lit(lo)}")
            if hi is not None:
                clauses.append(f"id<={lit(hi)}")
            params = {"perPage": PER_PAGE, "sort": "id", "skipTotal": 1, "filter": " && ".join(clauses)}
            return self.http.get(path, params, what=f"collection {coll.name!r}")

        if not self.prefetch:
            def start(last: str | None) -> Future[dict[str, Any]]:
                fut: Future[dict[str, Any]] = Future()
                try:
                    fut.set_result(fetch(last))
                except BaseException as exc:
                    fut.set_exception(exc)
                return fut
            pool = None
        else:
            pool = ThreadPoolExecutor(1, thread_name_prefix="pbm-api-page")

            def start(last: str | None) -> Future[dict[str, Any]]:
                return pool.submit(fetch, last)

        pending: Future[dict[str, Any]] | None = start(None)
        previous: str | None = None
        try:
            while pending is not None:
                data = pending.result()
                items = data.get("items") or []
                page_size = int(data.get("perPage") or PER_PAGE)
                _check_order(items, previous, coll, self.url)
                if items:
                    previous = items[-1]["id"]
                pending = start(previous) if items and len(items) >= page_size else None
                if items:
                    yield items
        finally:
            if pending is not None:
                pending.cancel()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _backslash_escapes(self, coll: Collection) -> bool:
        """Whether this server's filter syntax reads `\\\\` as a backslash (asked once, only
        when an id holds one: `'x\\\\'` is a complete literal there and unterminated before)."""
        if self._filter_backslashes is None:
            resp = self.http.request("GET", self._records_path(coll), check=False,
                                 params={"perPage": 1, "skipTotal": 1, "fields": "id",
                                         "filter": "id='x\\\\'"})
            self._filter_backslashes = resp.status_code == 200
        return self._filter_backslashes

    def _records_path(self, coll: Collection) -> str:
        return f"/api/collections/{quote(coll.name, safe='')}/records"

    # -- conversion to storage form --------------------------------------------------------------

    def _row_converter(self, coll: Collection, unexported: set[str]) -> Callable[[Mapping], tuple]:
        """item dict -> storage-form tuple; one itemgetter call does most of the work per row."""
        if self._html_escape is None:
            self.catalog()
        dumps = _json_dumps(bool(self._html_escape))
        names = [f.name for f in coll.fields if f.name not in unexported]
        fixes = [(i, fix) for i, f in enumerate(coll.fields)
                 if f.name not in unexported and (fix := _value_fixer(f, dumps)) is not None]
        blanks = [i for i, f in enumerate(coll.fields) if f.name in unexported]
        picked = itemgetter(*names) if len(names) > 1 else (lambda item: (item[names[0]],))

        def convert(item: Mapping) -> tuple:
            try:
                values = picked(item)
            except KeyError:  # a field the server did not send (e.g. added after this catalog)
                values = tuple(item.get(n) for n in names)
            if not blanks and not fixes:
                return values
            out = list(values)
            for i in blanks:  # ascending, so later positions shift into place
                out.insert(i, None)
            for i, fix in fixes:
                out[i] = fix(out[i])
            return tuple(out)

        return convert

    # -- HTTP ------------------------------------------------------------------------------------

    def _safe_list_backups(self) -> list[dict[str, Any]]:
        try:
            return self.list_backups()
        except SourceError:
            return []


# -- helpers ---------------------------------------------------------------------------------------


def _value_fixer(f: Field, dumps: Callable[[Any], str]) -> Callable[[Any], Any] | None:
    """How one decoded API value becomes what SQLite holds for that field (None: as it is)."""
    if f.type == "bool":
        return _bool
    if f.type in ("select", "file", "relation") and f.multi:
        return lambda v: _multi(v, dumps)
    if f.type == "json":
        return lambda v: _json_storage(v, dumps)
    if f.type == "geoPoint":
        return lambda v: _geo_point(v, dumps)
    return None


def _bool(value: Any) -> int | None:
    return None if value is None else (1 if value else 0)


def _multi(value: Any, dumps: Callable[[Any], str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):  # a single value where a list was expected: keep as a list
        value = [value] if value else []
    return dumps(value)


def _geo_point(value: Any, dumps: Callable[[Any], str]) -> str | None:
    """PocketBase writes `{"lon":..,"lat":..}` (its Go struct order); the API may list lat first."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) <= {"lon", "lat"}:
        value = {"lon": value.get("lon", 0), "lat": value.get("lat", 0)}
    return dumps(value)


def _json_storage(value: Any, dumps: Callable[[Any], str]) -> Any:
    """SQLite's NUMERIC affinity keeps JSON numbers as numbers and everything else as text."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return value
    return dumps(value)


def _json_dumps(html_escape: bool) -> Callable[[Any], str]:
    """Compact JSON as PocketBase writes it (Go escapes <, > and & up to 0.39).

    Lists of strings (multi select/file/relation, the bulk of the work) skip the generic encoder.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def dumps(value: Any) -> str:
        if type(value) is list:
            try:
                text = "[" + ",".join(map(encode_basestring, value)) + "]"
            except TypeError:  # not all strings
                text = encoder.encode(value)
        else:
            text = encoder.encode(value)
        return text.translate(_GO_HTML_ESCAPES) if html_escape else text

    return dumps


def _detects_html_escaping(raw: bytes, generation: int) -> bool:
    """Whether this server's JSON escapes HTML characters (so its stored JSON does too).

    Measured: 0.22.27 and 0.23.12 store `\\u003c`, 0.40.6 stores `<`. Every 0.23+ auth collection
    carries HTML e-mail templates, so `GET /api/collections` shows which.
    """
    if generation == 22 or b"\\u003c" in raw or b"\\u003e" in raw:
        return True
    return b"<" not in raw  # no evidence: assume Go's default


def _filter_literal(value: str, backslash_escapes: bool) -> str:
    """A PocketBase filter string literal.

    Up to at least 0.23 the filter scanner only knows `\\'` (a backslash before the closing quote
    always escapes it); 0.40's also reads `\\\\` as one backslash. Without a backslash in the
    value both agree.
    """
    if backslash_escapes:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value.endswith("\\"):
        raise SourceError(f"id {value!r} ends with a backslash, which this PocketBase's filter "
                          "syntax cannot quote")
    return "'" + value.replace("'", "\\'") + "'"


_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"  # PocketBase's default id characters
_ID_DIGITS = 15  # the length of PocketBase's ids: cuts fall between any two of them


def _id_number(rid: str) -> int:
    """An id read as a base-36 number (other characters clamped), to spread cut points the way
    PocketBase's random ids spread."""
    n = 0
    for ch in rid[:_ID_DIGITS].ljust(_ID_DIGITS, "0"):
        i = _ID_ALPHABET.find(ch)
        n = n * 36 + (i if i >= 0 else 0 if ch < "0" else 35)
    return n


def _split_points(lo: str | None, hi: str | None, parts: int) -> list[str]:
    """Up to parts-1 ascending ids strictly above lo and at most hi that cut [lo, hi] into parts
    of about equal row counts for random ids. Any ids at all are covered exactly: the cuts only
    decide which cursor reads a row, never whether it is read."""
    a = _id_number(lo) if lo is not None else 0
    b = _id_number(hi) if hi is not None else 36**_ID_DIGITS - 1
    cuts: list[str] = []
    for k in range(1, parts):
        n, digits = a + (b - a) * k // parts, []
        for _ in range(_ID_DIGITS):
            n, r = divmod(n, 36)
            digits.append(_ID_ALPHABET[r])
        cut = "".join(reversed(digits))
        if (lo is None or cut > lo) and (hi is None or cut <= hi) and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    return cuts


def _interleave(generators: list[Iterator[list[dict[str, Any]]]]) -> Iterator[list[dict[str, Any]]]:
    """Pages from several cursors, one from each in turn, as long as any has more."""
    active = list(generators)
    try:
        while active:
            for gen in list(active):
                page = next(gen, None)
                if page is None:
                    active.remove(gen)
                else:
                    yield page
    finally:
        for gen in generators:
            gen.close()


def _check_order(items: list[dict[str, Any]], previous: str | None, coll: Collection, url: str) -> None:
    """Keyset paging is only exact if ids strictly increase in byte (code point) order."""
    prev = previous
    for item in items:
        rid = item.get("id")
        if not isinstance(rid, str) or (prev is not None and rid <= prev):
            raise SourceError(f"{url}: collection {coll.name!r} returned ids out of order "
                              f"({prev!r} then {rid!r}); keyset paging needs text ids")
        prev = rid
