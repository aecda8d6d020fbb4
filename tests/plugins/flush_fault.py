"""nbdkit test plugin: a raw file whose flush hangs or fails on demand.

    nbdkit python tests/plugins/flush_fault.py file=IMAGE trigger=PATH \
        mode=hang|fail [marker=PATH]

While file `trigger` exists, a flush either hangs (mode=hang: it returns
once the trigger is removed, or after 120 s) or fails with EIO (mode=fail).
Each such flush appends a line to `marker`, so a test can see that one
happened.  Reads and writes always work, in parallel.

(nbdkit 1.32's delay and error filters do not act on flush.)
"""

import builtins
import errno
import os
import time

import nbdkit

API_VERSION = 2
HANG_LIMIT = 120

_file = _trigger = _marker = None
_mode = "hang"
_fd = -1


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _file, _trigger, _marker, _mode
    if key == "file":
        _file = os.path.abspath(value)
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
    if _file is None or _trigger is None:
        raise RuntimeError("file= and trigger= are required")


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


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    n = os.preadv(_fd, [buf], offset)
    if n < len(buf):
        buf[n:] = bytes(len(buf) - n)


def pwrite(h, buf, offset, flags):
    os.pwrite(_fd, buf, offset)


def flush(h, flags):
    if not os.path.exists(_trigger):
        os.fsync(_fd)
        return
    if _marker:
        with builtins.open(_marker, "a") as f:
            f.write(f"{_mode} {time.time()}\n")
    if _mode == "fail":
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("flush failed on purpose")
    deadline = time.monotonic() + HANG_LIMIT
    while os.path.exists(_trigger) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.fsync(_fd)
