"""Snapshots of a live data.db while a real PocketBase keeps writing through its API.

What this protects: the copy is consistent (one read transaction), passes quick_check, and
taking it never disturbs the server. On PocketBase <= 0.39, after the server made a backup,
closing a *read-write* connection deletes the server's WAL and breaks it (POCKETBASE.md §6), so
the 0.22/0.23 cases make a backup first: the -wal surviving proves we opened read-only.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbdev.pbserver import PBSession, PocketBaseServer, check
from pbmigrate.errors import SourceError
from pbmigrate.source.catalog import read_catalog
from pbmigrate.source.snapshot import open_readonly, take_snapshot

BATCH = 5


class Writer(threading.Thread):
    """Creates records numbered 1, 2, 3... (in transactional batches where the API has them)."""

    def __init__(self, pb: PocketBaseServer, session: PBSession):
        super().__init__(daemon=True)
        self.pb, self.session = pb, session
        self.batch = pb.generation >= 23
        self.done = 0  # records the server confirmed
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        url = "/api/collections/events/records"
        try:
            while not self.stop.is_set():
                if self.batch:
                    reqs = [{"method": "POST", "url": url, "body": {"seq": self.done + i + 1}}
                            for i in range(BATCH)]
                    check(self.session.post("/api/batch", json={"requests": reqs}))
                    self.done += BATCH
                else:
                    check(self.session.post(url, json={"seq": self.done + 1}))
                    self.done += 1
        except BaseException as exc:
            self.error = exc

    def wait_for(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.done < n:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"writer reached only {self.done} records"
            time.sleep(0.01)


@pytest.fixture(params=["0.40.6", "0.23.12", "0.22.27"])
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[PocketBaseServer, PBSession]]:
    with PocketBaseServer(tmp_path / "pb_data", version=request.param) as pb:
        pb.create_superuser("snap@example.com", "snap-pass-12345")
        session = pb.session("snap@example.com", "snap-pass-12345")
        pb.create_collection({"name": "events", "fields": [{"name": "seq", "type": "number",
                                                             "onlyInt": True}]})
        if pb.generation >= 23:
            check(session.patch("/api/settings", json={"batch": {"enabled": True, "maxRequests": 100}}))
        if pb.version != "0.40.6":
            # The trigger of the WAL-deletion bug of <= 0.39 (see the module docstring).
            check(session.post("/api/backups", json={"name": "before_snapshot.zip"}))
        yield pb, session


def test_snapshot_of_a_live_db_is_consistent_and_leaves_the_server_working(
        live: tuple[PocketBaseServer, PBSession], tmp_path: Path) -> None:
    pb, session = live
    data_db = pb.data_dir / "data.db"
    writer = Writer(pb, session)
    writer.start()
    try:
        writer.wait_for(20)
        before = writer.done
        snap = take_snapshot(pb.data_dir, tmp_path / "snap" / "data.db")
        after = writer.done
        writer.wait_for(after + 10)  # the server keeps accepting writes after the snapshot
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    assert writer.error is None, writer.error
    assert Path(data_db.with_name("data.db-wal")).exists(), "the server's WAL was deleted"
    assert snap.bytes > 0 and Path(snap.path).exists()
    assert not Path(snap.path + ".partial").exists()

    conn = sqlite3.connect(f"file:{snap.path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # self-contained
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
    finally:
        conn.close()
    # One read transaction: a gap-free prefix of what the writer created, whole batches only.
    assert before <= len(seqs) <= after + (BATCH if writer.batch else 1)
    assert seqs == list(range(1, len(seqs) + 1))
    if writer.batch:
        assert len(seqs) % BATCH == 0

    # The server still works: reads, writes, and its own superuser auth.
    check(session.post("/api/collections/events/records", json={"seq": -1}))
    assert pb.total("events") == writer.done + 1
    pb.session("snap@example.com", "snap-pass-12345")


def test_snapshot_is_readable_by_the_catalog_and_replaces_an_old_copy(
        live: tuple[PocketBaseServer, PBSession], tmp_path: Path) -> None:
    pb, session = live
    dest = tmp_path / "snap.db"
    dest.write_bytes(b"stale copy from an earlier attempt")
    check(session.post("/api/collections/events/records", json={"seq": 1}))
    take_snapshot(pb.data_dir / "data.db", dest)
    conn = open_readonly(dest)
    try:
        catalog = read_catalog(conn)
        assert catalog.get("events").field("seq").only_int
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    finally:
        conn.close()


def test_snapshot_of_something_that_is_not_sqlite_fails_cleanly(tmp_path: Path) -> None:
    src = tmp_path / "data.db"
    src.write_text("not sqlite")
    with pytest.raises(SourceError):
        take_snapshot(src, tmp_path / "out" / "data.db")
    assert not (tmp_path / "out" / "data.db").exists()
