"""Mapping files and the plan, on the catalog of PocketBase's own 0.22 test database."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbmigrate.errors import MappingError
from pbmigrate.pgsql import qi
from pbmigrate.plan.mapping import load_mapping, parse_mapping
from pbmigrate.plan.model import build_plan
from pbmigrate.source.sqlite import SqliteSource


@pytest.fixture
def catalog(fixture_022: Path):
    src = SqliteSource(fixture_022)
    yield src.catalog()
    src.close()


def test_identity_plan_copies_every_record_collection_and_reports_views(catalog):
    plan = build_plan(catalog, load_mapping(None))
    assert {t.name for t in plan.tables} == {"clients", "demo1", "demo2", "demo3", "demo4", "demo5", "nologin",
                                             "users"}
    skipped = dict(plan.skipped)
    assert skipped["view1"].startswith("view collection")
    assert skipped["numeric_id_view"].startswith("view collection")


def test_types_follow_pocketbase_field_types(catalog):
    demo1 = build_plan(catalog, load_mapping(None)).table_for("demo1")
    types = {c.field.name: c.type for c in demo1.columns}
    assert types["created"] == "timestamptz"
    assert types["bool"] == "boolean"
    assert types["number"] == "double precision"
    assert types["json"] == "jsonb"
    assert types["select_many"] == "text[]" and types["file_many"] == "text[]"
    assert types["rel_one"] == "text"
    assert "rel_many" not in types  # a junction table instead
    assert [j.table for j in demo1.junctions] == ["demo1_rel_many"]


def test_relations_become_foreign_keys_with_pocketbase_cascade_rules(catalog):
    demo4 = build_plan(catalog, load_mapping(None)).table_for("demo4")
    fks = {fk.field: fk for fk in demo4.foreign_keys}
    assert fks["rel_one_cascade"].on_delete == "CASCADE"
    assert fks["rel_one_no_cascade"].on_delete == "SET NULL"
    assert fks["rel_one_no_cascade_required"].on_delete == "RESTRICT"
    assert fks["self_rel_one"].target_table == "demo4"


def test_indexes_translate_partial_and_nocase_and_refuse_what_they_cannot(catalog):
    plan = build_plan(catalog, load_mapping(None))
    users = plan.table_for("users")
    email = next(i for i in users.indexes if i.name.endswith("email_idx"))
    assert email.unique and email.where == "\"email\" != ''"
    assert any("rel_many_unique" in w for w in plan.warnings)


def test_nocase_index_becomes_lower(catalog):
    from pbmigrate.plan.model import _translate

    idx = _translate("CREATE UNIQUE INDEX `idx_u` ON `users` (`username` COLLATE NOCASE)", "players",
                     {"username": "user name"})
    assert idx.sql == 'CREATE UNIQUE INDEX IF NOT EXISTS "idx_u" ON {schema}."players" (lower("user name"))'


def test_expression_index_is_reported_not_guessed():
    from pbmigrate.plan.model import _translate

    assert isinstance(_translate("CREATE INDEX i ON t (json_extract(x, '$.a'))", "t", {"x": "x"}), str)


def test_mapping_renames_tables_columns_and_junctions(catalog):
    m = parse_mapping({"collections": {"demo1": {
        "table": "order", "rename": {"text": 'the "text"', "rel_one": "group"},
        "junctions": {"rel_many": {"table": "user", "owner": "order_id", "target": "user_id"}}}}}, "inline")
    t = build_plan(catalog, m).table_for("demo1")
    assert t.name == "order"
    assert 'the "text"' in t.column_names and "group" in t.column_names
    assert (t.junctions[0].table, t.junctions[0].owner, t.junctions[0].target) == ("user", "order_id", "user_id")
    assert qi('the "text"') == '"the ""text"""'


@pytest.mark.parametrize(("doc", "message"), [
    ({"collections": {"nope": {}}}, "unknown collection 'nope'"),
    ({"collections": {"demo1": {"rename": {"missing": "x"}}}}, "collection 'demo1' has no field 'missing'"),
    ({"collections": {"demo1": {"colour": "red"}}}, "unknown key 'colour'"),
    ({"tables": {}}, "unknown key 'tables'"),
    ({"collections": {"demo1": {"junctions": {"rel_one": {}}}}}, "only multi relations"),
])
def test_bad_mapping_is_an_error_that_names_the_problem(catalog, doc, message):
    with pytest.raises(MappingError, match=message):
        build_plan(catalog, parse_mapping(doc, "bad.yaml"))


def test_default_game_mapping_names_the_users_tables():
    m = load_mapping("game.yaml")
    assert m.collections["users"].table == "players"
    assert m.collections["participants"].rename == {"match": "game_id", "user": "player_id"}
    assert "rank()" in m.derive["leaderboard"] and "leaderboard" not in m.collections
    assert m.cache["profiles"]["table"] == "players"


def test_unknown_mapping_file_is_an_error():
    with pytest.raises(MappingError, match="not found"):
        load_mapping("no-such-mapping.yaml")
