"""nbdkit test plugin: a raw file whose every flush takes a while.

    nbdkit python tests/plugins/slow_flush.py file=IMAGE delay-ms=N

Each flush sleeps N ms, then syncs the file, so that what a job does
around a target flush (a checkpoint, a pivot) lasts long enough for a test
to land in the middle of it.  Trim and zero write zeroes, so trimmed
ranges read as zero as a guest's model of the disk expects.
(nbdkit 1.32's delay filter does not act on flush.)
"""

import os
import time

import nbdkit

API_VERSION = 2
ZEROES = bytes(1 << 20)

_file = None
_delay = 0.0
_fd = -1


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _file, _delay
    if key == "file":
        _file = os.path.abspath(value)
    elif key == "delay-ms":
        _delay = int(value) / 1000
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


def pwrite(h, buf, offset, flags):
    os.pwrite(_fd, buf, offset)


def _zeroes(count, offset):
    while count:
        n = min(count, len(ZEROES))
        os.pwrite(_fd, memoryview(ZEROES)[:n], offset)
        count, offset = count - n, offset + n


def trim(h, count, offset, flags):
    _zeroes(count, offset)


def zero(h, count, offset, flags):
    _zeroes(count, offset)


def flush(h, flags):
    time.sleep(_delay)
    os.fdatasync(_fd)
