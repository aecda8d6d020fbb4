"""nbdkit test plugin: a raw file behind a write cache that only a flush
empties, as a server with a write-back cache (qemu-nbd on qcow2 caches its
metadata; a host's RAM) keeps acknowledged writes.

    nbdkit python tests/plugins/volatile_cache.py file=IMAGE

Writes, zeroes and trims are acknowledged once in the cache and reads see
them; flush writes the cache to the file and syncs it.  Killed, the server
loses every write since its last flush, which NBD allows.
"""

import os
import threading

import nbdkit

API_VERSION = 2

_file = None
_fd = -1
_lock = threading.Lock()
_cache = []             # [(offset, bytes)], oldest first: not in the file


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _file
    if key != "file":
        raise RuntimeError(f"unknown key {key}")
    _file = os.path.abspath(value)


def config_complete():
    if _file is None:
        raise RuntimeError("file= is required")


def open(readonly):
    global _fd
    if _fd < 0:
        _fd = os.open(_file, os.O_RDWR)
    return 1


def get_size(h):
    return os.fstat(_fd).st_size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def pread(h, buf, offset, flags):
    n = os.preadv(_fd, [buf], offset)
    if n < len(buf):
        buf[n:] = bytes(len(buf) - n)
    end = offset + len(buf)
    with _lock:
        for off, data in _cache:            # later writes win
            lo, hi = max(off, offset), min(off + len(data), end)
            if lo < hi:
                buf[lo - offset:hi - offset] = data[lo - off:hi - off]


def pwrite(h, buf, offset, flags):
    with _lock:
        _cache.append((offset, bytes(buf)))


def trim(h, count, offset, flags):
    with _lock:
        _cache.append((offset, bytes(count)))


zero = trim


def flush(h, flags):
    with _lock:
        for off, data in _cache:
            os.pwrite(_fd, data, off)
        _cache.clear()
        os.fdatasync(_fd)
