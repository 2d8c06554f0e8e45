"""A local file into a local file at `cp -r`'s speed, with the sha256 of its bytes.

The bytes move in the kernel (`copy_file_range`, what cp 9 uses on ext4: page cache to page
cache, no GIL), the next window read ahead so a cold source keeps the disk busy. The sha256 (the
ledger's, required in the copy step) reads the source's pages again, now cached, through one
1 MB buffer per thread: sha256 with SHA-NI costs ~0.6 s of CPU per GB, as much as `cp`'s whole
copy, so the group's threads hash different files on both cores. Profiled with 4 threads on the
200 x 5 MB bench: `preadv` into the buffer took 1.02-1.40 s wall per GB where an 8 MB `mmap`
window took 1.17-1.69 s (each map and unmap of a threaded process costs page faults and TLB
shootdowns), and it keeps memory at one buffer per thread whatever the file's size. Small files,
where syscalls and not bytes are the cost, take one `pread` and one `write`.

The sha256 is of the source's bytes, read after the kernel copied them, and validation re-reads
the copy and compares. PocketBase writes a file once and never truncates it; one that shrinks
during its copy fails the task, and the retry copies it again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
from typing import BinaryIO

SMALL = 256 * 1024  # up to this size a file is one read and one write
WINDOW = 8 << 20  # bytes asked of copy_file_range per call, and read ahead
BUFFER = 1 << 20  # bytes per read while hashing (and streaming), one buffer per thread
_local = threading.local()
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


def regular_fd(src: BinaryIO) -> int | None:
    """The descriptor of a source that is a regular file at offset 0 (else None: stream it)."""
    try:
        fd = src.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or src.tell() != 0:
            return None
    except (OSError, ValueError):
        return None
    return fd


def write_fd(fd: int, data: bytes | memoryview) -> None:
    """All of `data` at fd's offset (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def buffer() -> memoryview:
    """This thread's reusable buffer of BUFFER bytes: memory per copy whatever the file's size."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(BUFFER))
    return buf


def sha256_of(fd: int, size: int) -> str:
    """The sha256 of the first `size` bytes of fd, read from the page cache a buffer at a time."""
    sha = hashlib.sha256()
    buf = buffer()
    offset = 0
    while offset < size:
        n = os.preadv(fd, [buf[:min(BUFFER, size - offset)]], offset)
        if n == 0:
            raise OSError(errno.EIO, f"the source shrank to {offset} bytes while {size} were copied")
        sha.update(buf[:n])  # hashlib releases the GIL for a buffer this large
        offset += n
    return sha.hexdigest()


def _read_ahead(fd: int, offset: int) -> None:
    """Ask the kernel for one window from `offset` without waiting (a cold source: several copies
    keep the disk busy; pages already cached cost nothing). Page cache only, never this process's."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, WINDOW, os.POSIX_FADV_WILLNEED)


def _kernel_copy(src: int, dst: int, size: int) -> int:
    """Bytes copied by copy_file_range (0 where the kernel or filesystem refuses at once)."""
    done = 0
    _read_ahead(src, 0)
    while done < size:
        _read_ahead(src, done + WINDOW)  # the next window is read from disk while this one is copied
        try:
            n = os.copy_file_range(src, dst, min(WINDOW, size - done), done, done)
        except OSError as exc:
            if done == 0 and exc.errno in _NO_KERNEL_COPY:
                return 0
            raise
        if n == 0:  # the source ended early (it shrank): what was copied is what there is
            break
        done += n
    return done


def copy_regular(src_fd: int, dst_fd: int) -> tuple[int, str]:
    """Copy a regular file's bytes to dst_fd (at offset 0); returns size and sha256."""
    size = os.fstat(src_fd).st_size
    if size <= SMALL:
        data = os.pread(src_fd, size, 0)  # a regular file: all of it, short only at its end
        write_fd(dst_fd, data)
        return len(data), hashlib.sha256(data).hexdigest()
    done = _kernel_copy(src_fd, dst_fd, size)
    if done == 0:  # another filesystem the kernel will not copy across: sendfile, then plain reads
        done = _sendfile(src_fd, dst_fd, size)
    return done, sha256_of(src_fd, done)


def _sendfile(src: int, dst: int, size: int) -> int:
    done = 0
    with contextlib.suppress(OSError):
        while done < size and (n := os.sendfile(dst, src, done, min(WINDOW, size - done))):
            done += n
    while done < size and (chunk := os.pread(src, min(WINDOW, size - done), done)):
        os.lseek(dst, done, os.SEEK_SET)
        write_fd(dst, chunk)
        done += len(chunk)
    return done
