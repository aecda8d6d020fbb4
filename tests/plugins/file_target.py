"""nbdkit test plugin: a raw file as a target that misbehaves on demand.

    nbdkit python tests/plugins/file_target.py file=IMAGE
        [flush-delay-ms=N] [volatile=1] [trigger=PATH mode=hang|fail
        [marker=PATH]]

  flush-delay-ms  every flush sleeps N ms first, so that what a job does
                  around a target flush (a checkpoint, a pivot) lasts long
                  enough for a test to land in the middle of it;
  volatile        writes, zeroes and trims are acknowledged once in a write
                  cache that reads see and only a flush empties into the
                  file, as a server with a write-back cache (qemu-nbd on
                  qcow2 caches metadata; a host's RAM): killed, the server
                  loses every write since its last flush, which NBD allows;
  trigger, mode   while file `trigger` exists, a flush hangs (mode=hang:
                  until the trigger is removed, or 120 s) or fails with EIO
                  (mode=fail), and appends a line to `marker`.

Reads and writes always work, in parallel.  Trim and zero write zeroes, so
trimmed ranges read as zero as a guest's model of the disk expects.
(nbdkit 1.32's delay and error filters do not act on flush.)
"""

import builtins
import errno
import os
import threading
import time

import nbdkit

API_VERSION = 2
HANG_LIMIT = 120
ZEROES = bytes(1 << 20)

_file = _trigger = _marker = None
_mode = "hang"
_delay = 0.0
_volatile = False
_fd = -1
_lock = threading.Lock()
_cache = []             # volatile: [(offset, bytes)], oldest first


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _file, _trigger, _marker, _mode, _delay, _volatile
    if key == "file":
        _file = os.path.abspath(value)
    elif key == "flush-delay-ms":
        _delay = int(value) / 1000
    elif key == "volatile":
        _volatile = value.lower() in ("1", "true", "yes", "on")
    elif key == "trigger":
        _trigger = os.path.abspath(value)
    elif key == "marker":
        _marker = os.path.abspath(value)
    elif key == "mode":
        if value not in ("hang", "fail"):
            raise RuntimeError(f"mode: {value!r} is not hang or fail")
        _mode = value
    else:
        raise RuntimeError(f"unknown key {key}")


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


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    n = os.preadv(_fd, [buf], offset)
    if n < len(buf):
        buf[n:] = bytes(len(buf) - n)
    if not _volatile:
        return
    end = offset + len(buf)
    with _lock:
        for off, data in _cache:            # later writes win
            lo, hi = max(off, offset), min(off + len(data), end)
            if lo < hi:
                buf[lo - offset:hi - offset] = data[lo - off:hi - off]


def pwrite(h, buf, offset, flags):
    if _volatile:
        with _lock:
            _cache.append((offset, bytes(buf)))
    else:
        os.pwrite(_fd, buf, offset)


def trim(h, count, offset, flags):
    while count:
        n = min(count, len(ZEROES))
        pwrite(h, memoryview(ZEROES)[:n], offset, 0)
        count, offset = count - n, offset + n


zero = trim


def flush(h, flags):
    if _trigger and os.path.exists(_trigger):
        _fault()
    time.sleep(_delay)
    with _lock:
        for off, data in _cache:
            os.pwrite(_fd, data, off)
        _cache.clear()
        os.fdatasync(_fd)


def _fault():
    if _marker:
        with builtins.open(_marker, "a") as f:
            f.write(f"{_mode} {time.time()}\n")
    if _mode == "fail":
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("flush failed on purpose")
    deadline = time.monotonic() + HANG_LIMIT
    while os.path.exists(_trigger) and time.monotonic() < deadline:
        time.sleep(0.05)
