"""The local copy path of the files group: kernel copy plus a windowed sha256, and its fallbacks
(another filesystem the kernel will not copy across; a source that is no regular file)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import pytest

from pbmigrate.files import localcopy
from pbmigrate.files.store import FileStore


def _copy(src: Path, dst: Path) -> tuple[int, str]:
    with open(src, "rb") as fh, open(dst, "wb") as out:
        fd = localcopy.regular_fd(fh)
        assert fd is not None
        return localcopy.copy_regular(fd, out.fileno())


@pytest.mark.parametrize("size", [0, 1, localcopy.SMALL, localcopy.SMALL + 1, 2 * localcopy.WINDOW + 12_345])
def test_a_local_file_is_copied_byte_equal_with_its_sha256(tmp_path: Path, size: int):
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    got = _copy(tmp_path / "src", tmp_path / "dst")
    assert got == (size, hashlib.sha256(data).hexdigest())  # several hash windows for the largest
    assert (tmp_path / "dst").read_bytes() == data


def _refuse(errno_: int):
    def fail(*_a, **_k):
        raise OSError(errno_, os.strerror(errno_))
    return fail


def test_without_a_kernel_copy_sendfile_and_then_plain_reads_take_over(tmp_path: Path, monkeypatch):
    data = os.urandom(localcopy.WINDOW + 777)
    (tmp_path / "src").write_bytes(data)
    monkeypatch.setattr(os, "copy_file_range", _refuse(errno.EXDEV))  # across filesystems on an old kernel
    assert _copy(tmp_path / "src", tmp_path / "a") == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "a").read_bytes() == data
    monkeypatch.setattr(os, "sendfile", _refuse(errno.EINVAL))
    assert _copy(tmp_path / "src", tmp_path / "b") == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "b").read_bytes() == data


def test_a_kernel_copy_failing_midway_is_an_error_not_a_short_file(tmp_path: Path, monkeypatch):
    (tmp_path / "src").write_bytes(os.urandom(2 * localcopy.WINDOW))
    real = os.copy_file_range
    calls = []

    def flaky(*a):
        calls.append(a)
        if len(calls) > 1:
            raise OSError(errno.EIO, "I/O error")
        return real(*a)

    monkeypatch.setattr(os, "copy_file_range", flaky)
    with pytest.raises(OSError, match="I/O error"):
        _copy(tmp_path / "src", tmp_path / "dst")


def test_a_stream_or_a_file_not_at_its_start_goes_through_the_buffer(tmp_path: Path):
    store = FileStore(str(tmp_path / "store"))
    data = os.urandom(localcopy.SMALL * 3)
    assert localcopy.regular_fd(io.BytesIO(data)) is None
    size, sha = store.put("c/r/stream.bin", io.BytesIO(data), content_type=None, original_name=None, md5=None)
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as fh:
        fh.seek(10)
        assert localcopy.regular_fd(fh) is None  # the kernel copy would start at 0: the rest is streamed
        size, sha = store.put("c/r/tail.bin", fh, content_type=None, original_name=None, md5=None)
    assert (size, sha) == (len(data) - 10, hashlib.sha256(data[10:]).hexdigest())
    assert (tmp_path / "store/c/r/tail.bin").read_bytes() == data[10:]
    assert store.head("c/r/tail.bin").sha256 == sha  # the sidecar commits it like any other copy
