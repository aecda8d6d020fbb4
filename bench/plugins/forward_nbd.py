"""Reference nbdkit Python plugin: forward reads to an NBD server, nothing
else (no gate, no tracking).  The floor for any Python proxy's read path.

    nbdkit python bench/plugins/forward_nbd.py uri=NBD_URI [initialize=false]

A libnbd handle per concurrent request (a pool), aio_pread straight into
nbdkit's buffer, as nbdmirror's NbdEndpoint.pread does.
"""

import threading

import nbd
import nbdkit

API_VERSION = 2
_uri = None
_initialize = True
_pool, _lock = [], threading.Lock()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _uri, _initialize
    if key == "uri":
        _uri = value
    elif key == "initialize":
        _initialize = value.lower() not in ("0", "false", "no", "off")
    else:
        raise RuntimeError(f"unknown key {key}")


def _get():
    with _lock:
        if _pool:
            return _pool.pop()
    h = nbd.NBD()
    h.set_pread_initialize(_initialize)
    h.connect_uri(_uri)
    return h


def _put(h):
    with _lock:
        _pool.append(h)


def open(readonly):
    return 1


def get_size(_):
    h = _get()
    try:
        return h.get_size()
    finally:
        _put(h)


def can_multi_conn(_):
    return True


def pread(_, buf, offset, flags):
    h = _get()
    try:
        cookie = h.aio_pread(nbd.Buffer.from_buffer(buf), offset)
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    finally:
        _put(h)
