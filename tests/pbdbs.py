"""Builders of "every field type" PocketBase databases, made by a real server through its API.

Why: the catalog reader and the converters must be checked against what PocketBase itself
writes, per schema generation, never against a hand-written schema. `build_every_type_db`
returns the pb_data path plus a description of what was created (collection -> field ->
expected catalog attributes), so a test can compare `read_catalog` field by field.

Not a conftest: tests wrap `build_every_type_db` in their own (session-scoped) fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbdev.pbserver import PocketBaseServer, generation_of

VERSIONS = ("0.22.27", "0.23.12", "0.40.6")
SUPERUSER = ("root@example.com", "root-pass-12345")
MEMBER_PASSWORD = "member-pass-123"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2263ca30000000049454e44ae426082"
)


@dataclass
class Expected:
    """What the catalog should report for one field (relation targets are collection *names*)."""

    type: str
    required: bool = False
    system: bool = False
    hidden: bool = False
    multi: bool = False
    only_int: bool = False
    values: tuple[str, ...] = ()
    target: str | None = None
    cascade_delete: bool = False
    on_create: bool | None = None  # autodate only
    on_update: bool | None = None
    secret: bool = False


@dataclass
class ExpectedCollection:
    type: str  # base | auth | view
    fields: dict[str, Expected]
    system: bool = False
    unique_indexes: tuple[str, ...] = ()  # index names that must be UNIQUE


@dataclass
class EveryTypeDB:
    """A pb_data folder built by PocketBase `version`, and what was put into it."""

    pb_data: Path
    version: str
    generation: int
    collections: dict[str, ExpectedCollection]
    records: dict[str, dict[str, str]]  # collection -> label -> record id
    counts: dict[str, int]
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # everything label -> body sent
    superuser: tuple[str, str] = SUPERUSER
    member_password: str = MEMBER_PASSWORD
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_db(self) -> Path:
        return self.pb_data / "data.db"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def every_type_specs(version: str) -> list[dict]:
    """The neutral specs (pbserver format) of the every-type collections, in creation order."""
    gen = generation_of(version)
    tags = {
        "name": "tags",
        "fields": [{"name": "label", "type": "text", "required": True}],
        "indexes": ["CREATE UNIQUE INDEX idx_tags_label ON tags (label)"],
    }
    members = {
        "name": "members",
        "type": "auth",
        "fields": [
            {"name": "nickname", "type": "text", "max": 50},
            {"name": "score", "type": "number"},
            {"name": "favourite", "type": "relation", "collection": "tags"},
        ],
    }
    fields: list[dict] = [
        {"name": "title", "type": "text", "required": True, "min": 1, "max": 200},
        {"name": "body", "type": "editor"},
        {"name": "amount", "type": "number"},
        {"name": "count", "type": "number", "onlyInt": True},
        {"name": "flag", "type": "bool"},
        {"name": "contact", "type": "email"},
        {"name": "site", "type": "url"},
        {"name": "published", "type": "date"},
        {"name": "status", "type": "select", "values": ["draft", "published", "archived"]},
        {"name": "labels", "type": "select", "values": ["a", "b", "c", "d"], "maxSelect": 3},
        {"name": "cover", "type": "file"},
        {"name": "gallery", "type": "file", "maxSelect": 5},
        {"name": "author", "type": "relation", "collection": "members", "cascadeDelete": True},
        {"name": "tagrefs", "type": "relation", "collection": "tags", "maxSelect": 10},
        {"name": "meta", "type": "json"},
        {"name": "order", "type": "number", "onlyInt": True},  # an SQL keyword as a column name
        {"name": "group", "type": "text"},
    ]
    if gen >= 23:
        fields += [
            {"name": "secret", "type": "password"},
            {"name": "touched", "type": "autodate", "onCreate": False, "onUpdate": True},
        ]
    if _version_tuple(version) >= (0, 27, 0):
        fields.append({"name": "location", "type": "geoPoint"})
    everything = {
        "name": "everything",
        "fields": fields,
        "indexes": [
            "CREATE UNIQUE INDEX idx_everything_title ON everything (title)",
            "CREATE INDEX idx_everything_order ON everything (`order`, `group`)",
        ],
    }
    view = {
        "name": "everything_view",
        "type": "view",
        "viewQuery": "SELECT id, title, amount, status FROM everything",
    }
    specs = [tags, members, everything, view]
    if gen >= 23:
        specs.append({"name": "no_timestamps", "autodate": False,
                      "fields": [{"name": "note", "type": "text"}]})
    return specs


def _expected_field(spec: dict) -> Expected:
    ftype = spec["type"]
    max_select = spec.get("maxSelect", 1)
    exp = Expected(
        type=ftype,
        required=bool(spec.get("required")),
        multi=ftype in ("select", "file", "relation") and max_select > 1,
        only_int=bool(spec.get("onlyInt")),
        values=tuple(spec.get("values") or ()),
        target=spec.get("collection"),
        cascade_delete=bool(spec.get("cascadeDelete")),
        secret=ftype == "password",
    )
    if ftype == "autodate":
        exp.on_create = spec.get("onCreate", True)
        exp.on_update = spec.get("onUpdate", False)
    return exp


def _system_fields(gen: int, ctype: str, autodate: bool) -> dict[str, Expected]:
    out = {"id": Expected("text", required=True, system=True)}
    if ctype == "view":
        return out
    if gen == 22 or autodate:
        system = gen == 22
        out["created"] = Expected("autodate", system=system, on_create=True, on_update=False)
        out["updated"] = Expected("autodate", system=system, on_create=True, on_update=True)
    if ctype != "auth":
        return out
    if gen == 22:
        out.update({
            "username": Expected("text", required=True, system=True),
            "email": Expected("email", system=True),
            "emailVisibility": Expected("bool", system=True),
            "verified": Expected("bool", system=True),
            "tokenKey": Expected("text", required=True, system=True, hidden=True, secret=True),
            "passwordHash": Expected("password", required=True, system=True, hidden=True, secret=True),
            "lastResetSentAt": Expected("date", system=True),
            "lastVerificationSentAt": Expected("date", system=True),
            "lastLoginAlertSentAt": Expected("date", system=True),
        })
    else:
        out.update({
            "password": Expected("password", required=True, system=True, hidden=True, secret=True),
            "tokenKey": Expected("text", required=True, system=True, hidden=True, secret=True),
            "email": Expected("email", required=True, system=True),
            "emailVisibility": Expected("bool", system=True),
            "verified": Expected("bool", system=True),
        })
    return out


def describe(specs: list[dict], version: str) -> dict[str, ExpectedCollection]:
    """The catalog we expect from these specs on this version (views: the id only)."""
    gen = generation_of(version)
    out: dict[str, ExpectedCollection] = {}
    for spec in specs:
        ctype = spec.get("type", "base")
        fields = _system_fields(gen, ctype, spec.get("autodate", True))
        if ctype != "view":
            for f in spec.get("fields") or []:
                fields[f["name"]] = _expected_field(f)
        uniques = tuple(
            ix.split()[3] for ix in spec.get("indexes") or [] if ix.upper().startswith("CREATE UNIQUE")
        )
        out[spec["name"]] = ExpectedCollection(ctype, fields, unique_indexes=uniques)
    return out


def _auth_body(gen: int, email: str, **extra: Any) -> dict:
    body = {"email": email, "password": MEMBER_PASSWORD, "passwordConfirm": MEMBER_PASSWORD,
            "emailVisibility": True, **extra}
    if gen == 22:
        body.setdefault("username", email.split("@")[0].replace(".", "_"))
    return body


def _records(pb: PocketBaseServer, version: str, sent: dict[str, dict[str, Any]]
             ) -> dict[str, dict[str, str]]:
    """Create the records (filling `sent` with the bodies of the `everything` ones)."""
    gen = pb.generation
    ids: dict[str, dict[str, str]] = {"tags": {}, "members": {}, "everything": {}}
    for label in ("alpha", "beta", "γάμμα"):
        ids["tags"][label] = pb.create_record("tags", {"label": label})["id"]
    tag = ids["tags"]
    ids["members"]["ann"] = pb.create_record("members", _auth_body(
        gen, "ann@example.com", nickname="Ann ünïcødé", score=12.5, favourite=tag["beta"]))["id"]
    ids["members"]["bob"] = pb.create_record("members", _auth_body(gen, "bob@example.com"))["id"]
    full: dict[str, Any] = {
        "title": 'Hello "world" ünïcødé ✓',
        "body": "<p>Hi <b>there</b></p>",
        "amount": 3.14,
        "count": 42,
        "flag": True,
        "contact": "x@example.com",
        "site": "https://example.com/a?b=c",
        "published": "2024-01-02 03:04:05.123Z",
        "status": "published",
        "labels": ["a", "c"],
        "author": ids["members"]["ann"],
        "tagrefs": [tag["γάμμα"], tag["alpha"]],  # order matters and is not id order
        "meta": {"k": [1, 2, {"z": None}], "s": "x"},
        "order": 7,
        "group": "g1",
    }
    if gen >= 23:
        full["secret"] = "s3cret-pass"
    if _version_tuple(version) >= (0, 27, 0):
        full["location"] = {"lon": 23.32, "lat": 42.69}
    files = {
        "cover": [("my cover.png", PNG, "image/png")],
        "gallery": [("a.txt", b"first file\n", "text/plain"), ("b.txt", b"second\n", "text/plain")],
    }
    sent["full"] = full
    # Only the required field: every other column holds its "empty" sentinel; JSON null -> NULL.
    sent["empty"] = {"title": "empty", "meta": None}
    sent["number"] = {"title": "numbers", "amount": 42, "count": -5, "meta": 123, "order": 1,
                      "group": "g2", "author": ids["members"]["bob"], "tagrefs": [tag["beta"]],
                      "labels": ["d"]}
    sent["string_json"] = {"title": "json string", "meta": "hello", "amount": -0.5, "status": "draft"}
    for label, body in sent.items():
        ids["everything"][label] = pb.create_record(
            "everything", body, files=files if label == "full" else None)["id"]
    if gen >= 23:
        ids["no_timestamps"] = {"one": pb.create_record("no_timestamps", {"note": "n"})["id"]}
        # touched (onUpdate only) stays '' until the first update: update one record.
        pb.admin.patch(f"/api/collections/everything/records/{ids['everything']['number']}",
                       json={"group": "g3"}).raise_for_status()
    return ids


def build_every_type_db(dest_dir: Path, version: str) -> EveryTypeDB:
    """Build `<dest_dir>/pb_data` with PocketBase `version`; the server is stopped on return."""
    specs = every_type_specs(version)
    pb_data = Path(dest_dir) / "pb_data"
    with PocketBaseServer(pb_data, version=version) as pb:
        pb.create_superuser(*SUPERUSER)
        pb.session(*SUPERUSER)
        for spec in specs:
            pb.create_collection(spec)
        sent: dict[str, dict[str, Any]] = {}
        records = _records(pb, version, sent)
        counts = {spec["name"]: pb.total(spec["name"]) for spec in specs}
    return EveryTypeDB(
        pb_data=pb_data,
        version=version,
        generation=generation_of(version),
        collections=describe(specs, version),
        records=records,
        counts=counts,
        sent=sent,
    )
