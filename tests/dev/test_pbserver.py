"""The PocketBase test server: one spec format for both schema generations, clean restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbdev.pbserver import PocketBaseServer, check, generation_of, pocketbase_binary


def test_versions_map_to_generations() -> None:
    assert [generation_of(v) for v in ("0.22.27", "0.23.12", "0.40.6")] == [22, 23, 23]
    assert pocketbase_binary("0.40.6") == pocketbase_binary(None)  # the venv's, no download
    with pytest.raises(ValueError):
        pocketbase_binary("latest")


def test_spec_translates_to_022_nested_options(tmp_path: Path) -> None:
    pb = PocketBaseServer(tmp_path / "pb_data", version="0.22.27")  # not started: no API calls
    field = pb._field({"name": "n", "type": "number", "onlyInt": True, "min": 0}, "t")
    assert field == {"name": "n", "type": "number", "options": {"noDecimal": True, "min": 0}}
    assert pb._field({"name": "created", "type": "autodate"}, "t") is None  # implicit in 0.22
    with pytest.raises(ValueError, match="secret"):
        pb._field({"name": "secret", "type": "password"}, "t")
    assert pb._field({"name": "f", "type": "file"}, "t")["options"]["maxSelect"] == 1


def test_self_relation_indexes_and_restart(tmp_path: Path) -> None:
    with PocketBaseServer(tmp_path / "pb_data") as pb:
        made = pb.create_collection({
            "name": "nodes",
            "fields": [{"name": "label", "type": "text"},
                       {"name": "parent", "type": "relation", "collection": "nodes"}],
            "indexes": ["CREATE INDEX idx_nodes_parent ON nodes (parent)"],
        })
        assert {f["name"] for f in made["fields"]} >= {"label", "parent", "created", "updated"}
        parent = next(f for f in made["fields"] if f["name"] == "parent")
        assert parent["collectionId"] == made["id"] and made["indexes"]
        root = pb.create_record("nodes", {"label": "root"})
        url = pb.url
        pb.restart()
        assert pb.url == url
        child = pb.create_record("nodes", {"label": "child", "parent": root["id"]})
        got = check(pb.admin.get(f"/api/collections/nodes/records/{child['id']}",
                                 params={"expand": "parent"}))
        assert got["expand"]["parent"]["label"] == "root"
    assert not pb.running
    assert pb.log_path.exists()
