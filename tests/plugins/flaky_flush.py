"""nbdkit test plugin: a RAM disk whose flush fails while a file exists.

    nbdkit python tests/plugins/flaky_flush.py size=SIZE fail-flush-file=PATH

(nbdkit 1.32's error filter cannot fail flushes.)
"""

import errno
import os

import nbdkit

API_VERSION = 2
_size = 0
_fail_file = None
_disk = None


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def config(key, value):
    global _size, _fail_file
    if key == "size":
        _size = nbdkit.parse_size(value)
    elif key == "fail-flush-file":
        _fail_file = os.path.abspath(value)
    else:
        raise RuntimeError(f"unknown key {key}")


def config_complete():
    global _disk
    _disk = bytearray(_size)


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_flush(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = _disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _disk[offset:offset + len(buf)] = buf


def flush(h, flags):
    if _fail_file and os.path.exists(_fail_file):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("flush failed on purpose")
