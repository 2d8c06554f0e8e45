"""The catalog read from data.db matches, field by field, what a real PocketBase created.

Each generation's every-type database is built once per session by a real server (tests/pbdbs.py);
the repo's own 0.22 test data covers a database PocketBase wrote years ago.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbmigrate.errors import CatalogError, SourceError
from pbmigrate.source.catalog import Catalog, read_catalog
from pbmigrate.source.snapshot import open_readonly
from tests.pbdbs import VERSIONS, EveryTypeDB, build_every_type_db


@pytest.fixture(scope="session")
def every_type_dbs() -> dict[str, EveryTypeDB]:
    """Lazily built every-type databases, one per version, shared by the whole session."""
    return {}


def _db(version: str, built: dict[str, EveryTypeDB], factory: pytest.TempPathFactory) -> EveryTypeDB:
    if version not in built:
        built[version] = build_every_type_db(factory.mktemp(f"pb{version}"), version)
    return built[version]


@pytest.fixture(params=VERSIONS)
def built(request: pytest.FixtureRequest, every_type_dbs: dict[str, EveryTypeDB],
          tmp_path_factory: pytest.TempPathFactory) -> EveryTypeDB:
    return _db(request.param, every_type_dbs, tmp_path_factory)


@pytest.fixture
def catalog(built: EveryTypeDB) -> Iterator[Catalog]:
    conn = open_readonly(built.pb_data)
    try:
        yield read_catalog(conn)
    finally:
        conn.close()


def test_generation_is_detected(built: EveryTypeDB, catalog: Catalog) -> None:
    assert catalog.generation == built.generation


def test_every_field_matches_what_the_server_created(built: EveryTypeDB, catalog: Catalog) -> None:
    for cname, expected in built.collections.items():
        coll = catalog.get(cname)
        assert coll.type == expected.type, cname
        if expected.type == "view":
            continue
        assert {f.name for f in coll.fields} == set(expected.fields), cname
        for fname, exp in expected.fields.items():
            f = coll.field(fname)
            where = f"{built.version} {cname}.{fname}"
            assert f.type == exp.type, where
            assert f.required == exp.required, where
            assert f.system == exp.system, where
            assert f.hidden == exp.hidden, where
            assert f.multi == exp.multi, where
            assert f.only_int == exp.only_int, where
            assert f.values == exp.values, where
            assert f.cascade_delete == exp.cascade_delete, where
            assert f.secret == exp.secret, where
            assert f.primary_key == (fname == "id"), where
            if exp.target is None:
                assert f.target is None, where
            else:
                assert f.target is not None and catalog.get(f.target).name == exp.target, where
            if exp.on_create is not None:
                assert (f.on_create, f.on_update) == (exp.on_create, exp.on_update), where


def test_multi_relation_keeps_max_select(catalog: Catalog) -> None:
    tagrefs = catalog.get("everything").field("tagrefs")
    assert tagrefs.multi and tagrefs.max_select == 10
    assert catalog.get("everything").field("author").max_select == 1


def test_auth_collections_list_system_fields_and_flag_secrets(built: EveryTypeDB, catalog: Catalog
                                                              ) -> None:
    for name in ("members", "users"):
        coll = catalog.get(name)
        secrets = {f.name for f in coll.fields if f.secret}
        password = "passwordHash" if built.generation == 22 else "password"
        assert secrets == {password, "tokenKey"}, name
        assert coll.field(password).hidden and coll.field("tokenKey").hidden
        assert not coll.field("email").hidden
        assert coll.migrates
    if built.generation == 22:
        assert not catalog.get("members").field("username").hidden


def test_view_is_marked_view_and_does_not_migrate(built: EveryTypeDB, catalog: Catalog) -> None:
    view = catalog.get("everything_view")
    assert view.is_view and not view.migrates
    assert view.view_query == "SELECT id, title, amount, status FROM everything"
    assert [f.name for f in view.fields][:1] == ["id"]
    assert {"title", "amount", "status"} <= {f.name for f in view.fields}
    assert view not in catalog.migrating()


def test_internal_collections_are_known_but_do_not_migrate(built: EveryTypeDB, catalog: Catalog
                                                           ) -> None:
    internal = {c.name for c in catalog.collections if c.is_internal}
    if built.generation == 22:
        assert internal == set()  # 0.22 keeps _admins/_externalAuths as plain tables
    else:
        assert {"_superusers", "_externalAuths", "_mfas", "_otps", "_authOrigins"} <= internal
        assert all(catalog.get(n).system and not catalog.get(n).migrates for n in internal)
    assert {c.name for c in catalog.migrating()} == {
        n for n, c in built.collections.items() if c.type != "view"
    } | {"users"}


def test_non_collection_tables_are_skipped(built: EveryTypeDB, catalog: Catalog) -> None:
    skipped = set(catalog.skipped_tables)
    assert {"_collections", "_params", "_migrations"} <= skipped
    if built.generation == 22:
        assert {"_admins", "_externalAuths"} <= skipped
    else:
        assert any(t.startswith("sqlite_stat") for t in skipped)
    names = {c.name for c in catalog.collections}
    assert not skipped & names


def test_indexes_come_from_sqlite_including_unique_and_keyword_columns(built: EveryTypeDB,
                                                                       catalog: Catalog) -> None:
    for cname, expected in built.collections.items():
        indexes = catalog.get(cname).indexes
        for ix_name in expected.unique_indexes:
            assert any(ix.startswith("CREATE UNIQUE INDEX") and ix_name in ix for ix in indexes), cname
    order_ix = [ix for ix in catalog.get("everything").indexes if "idx_everything_order" in ix]
    assert len(order_ix) == 1 and "`order`" in order_ix[0] and "`group`" in order_ix[0]
    # auth indexes that 0.22 leaves out of the JSON are read from sqlite_master
    members = " ".join(catalog.get("members").indexes)
    assert "tokenKey" in members and "email" in members


def test_timestamps_and_resync_key(built: EveryTypeDB, catalog: Catalog) -> None:
    everything = catalog.get("everything")
    assert everything.updated_field is not None and everything.updated_field.name == "updated"
    if built.generation >= 23:
        touched = everything.field("touched")
        assert (touched.on_create, touched.on_update) == (False, True)
        no_ts = catalog.get("no_timestamps")
        assert not no_ts.has_field("created") and not no_ts.has_field("updated")
        assert no_ts.updated_field is None


def test_catalog_fields_exist_as_columns_with_the_created_rows(built: EveryTypeDB, catalog: Catalog
                                                               ) -> None:
    conn = open_readonly(built.pb_data)
    try:
        for cname, count in built.counts.items():
            coll = catalog.get(cname)
            cols = {r[1] for r in conn.execute(f'PRAGMA table_info("{cname}")')}
            assert {f.name for f in coll.fields} <= cols, cname
            assert conn.execute(f'SELECT count(*) FROM "{cname}"').fetchone()[0] == count
    finally:
        conn.close()


# -- PocketBase's own 0.22 test data --------------------------------------------------------

FIXTURE_022_ROWS = {"clients": 2, "demo1": 3, "demo2": 3, "demo3": 4, "demo4": 2, "demo5": 2,
                    "nologin": 3, "users": 3, "numeric_id_view": 2, "view1": 3, "view2": 3}


def test_repo_022_fixture_catalog(fixture_022: Path) -> None:
    conn = open_readonly(fixture_022)
    try:
        catalog = read_catalog(conn)
        counts = {c.name: conn.execute(f'SELECT count(*) FROM "{c.name}"').fetchone()[0]
                  for c in catalog.collections}
    finally:
        conn.close()
    assert catalog.generation == 22
    assert counts == FIXTURE_022_ROWS
    assert {c.name for c in catalog.collections if c.is_view} == {"numeric_id_view", "view1", "view2"}
    assert {"_admins", "_externalAuths", "_params", "_migrations"} <= set(catalog.skipped_tables)
    demo4 = catalog.get("demo4")
    assert demo4.field("self_rel_one").target == demo4.id and not demo4.field("self_rel_one").multi
    many = demo4.field("rel_many_no_cascade_required")
    assert many.multi and many.required and many.max_select is None  # 0.22: null means multi
    assert demo4.field("rel_one_cascade").cascade_delete
    demo1 = catalog.get("demo1")
    assert demo1.field("select_many").values == ("optionA", "optionB", "optionC")
    assert demo1.field("rel_many").target == "_pb_users_auth_"
    assert catalog.get("nologin").system and catalog.get("nologin").type == "auth"
    users = catalog.get("users")
    assert {f.name for f in users.fields if f.secret} == {"passwordHash", "tokenKey"}
    assert any("username" in ix for ix in users.indexes)
    assert catalog.get("view1").has_field("created")  # selected by the view's query


# -- bad input -------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "data.db"
    bad.write_text("this is not a database\n")
    with pytest.raises(SourceError) as err:
        open_readonly(bad)
    assert "not a SQLite database" in _one_line(err.value)


def test_a_folder_without_data_db_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_readonly(tmp_path)
    assert "data.db" in _one_line(err.value)


def test_sqlite_that_is_not_pocketbase_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE things (id TEXT PRIMARY KEY)")
    conn.close()
    ro = open_readonly(path)
    try:
        with pytest.raises(SourceError) as err:
            read_catalog(ro)
    finally:
        ro.close()
    assert "not a PocketBase database" in _one_line(err.value)


def _tampered_copy(built: EveryTypeDB, dest: Path) -> Path:
    """A private copy of a built pb_data (the original stays pristine for other tests)."""
    copy = dest / "pb_data"
    shutil.copytree(built.pb_data, copy)
    return copy


def _catalog_error(pb_data: Path) -> pytest.ExceptionInfo[CatalogError]:
    """Reading the catalog of a tampered copy must fail with a CatalogError."""
    ro = open_readonly(pb_data)
    try:
        with pytest.raises(CatalogError) as err:
            read_catalog(ro)
    finally:
        ro.close()
    return err


@pytest.mark.parametrize("version", ["0.40.6", "0.22.27"])
def test_a_future_field_type_is_named_in_the_error(version: str, every_type_dbs: dict[str, EveryTypeDB],
                                                   tmp_path_factory: pytest.TempPathFactory,
                                                   tmp_path: Path) -> None:
    built = _db(version, every_type_dbs, tmp_path_factory)
    copy = _tampered_copy(built, tmp_path)
    column = "schema" if built.generation == 22 else "fields"
    with sqlite3.connect(copy / "data.db") as conn:
        raw = conn.execute(f"SELECT {column} FROM _collections WHERE name='everything'").fetchone()[0]
        fields = json.loads(raw)
        next(f for f in fields if f["name"] == "amount")["type"] = "vector"
        conn.execute(f"UPDATE _collections SET {column}=? WHERE name='everything'", (json.dumps(fields),))
    conn.close()
    err = _catalog_error(copy)
    msg = _one_line(err.value)
    assert "'vector'" in msg and "'everything'" in msg and "'amount'" in msg


def test_malformed_collection_json_is_a_catalog_error(every_type_dbs: dict[str, EveryTypeDB],
                                                      tmp_path_factory: pytest.TempPathFactory,
                                                      tmp_path: Path) -> None:
    copy = _tampered_copy(_db("0.40.6", every_type_dbs, tmp_path_factory), tmp_path)
    with sqlite3.connect(copy / "data.db") as conn:
        conn.execute("UPDATE _collections SET fields='[{\"name\": ' WHERE name='tags'")
    conn.close()
    err = _catalog_error(copy)
    assert "tags" in _one_line(err.value) and "not valid JSON" in str(err.value)


def test_a_field_missing_from_the_table_is_a_catalog_error(every_type_dbs: dict[str, EveryTypeDB],
                                                           tmp_path_factory: pytest.TempPathFactory,
                                                           tmp_path: Path) -> None:
    copy = _tampered_copy(_db("0.40.6", every_type_dbs, tmp_path_factory), tmp_path)
    with sqlite3.connect(copy / "data.db") as conn:
        conn.execute("DROP INDEX idx_tags_label")
        conn.execute("ALTER TABLE tags DROP COLUMN label")
    conn.close()
    err = _catalog_error(copy)
    assert "'tags'" in _one_line(err.value) and "label" in str(err.value)
