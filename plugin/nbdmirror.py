"""nbdkit plugin: serve a disk while nbdmirror mirrors it to an NBD target.

    nbdkit python plugin/nbdmirror.py source=SRC control=SOCK [target=URI ...]

A thin adapter: each callback hands the request to nbdmirror.proxy.Proxy and
its GuestIO.  See ../shared/INTERFACE.md (or README.md) for the keys.
"""

import errno
import os
import sys

import nbdkit

API_VERSION = 2

# The embedded interpreter puts neither this folder nor the cwd on sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

from nbdmirror.options import ProxyOptions  # noqa: E402
from nbdmirror.proxy import Proxy  # noqa: E402

_options = ProxyOptions()
_proxy = None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    _options.set(key, value)


def config_complete():
    global _proxy
    _proxy = Proxy(_options, shutdown=nbdkit.shutdown)
    _proxy.preflight()


def after_fork():
    _proxy.start()


def cleanup():
    if _proxy is not None:
        _proxy.close()


def open(readonly):
    return _proxy.guest


def get_size(g):
    return g.backend.size


def can_write(g):
    return g.backend.can_write


def can_flush(g):
    return g.backend.can_flush


def can_trim(g):
    return g.backend.can_trim


def can_zero(g):
    return g.backend.can_zero


def can_fast_zero(g):
    return g.backend.can_fast_zero


def can_extents(g):
    return g.backend.can_extents


def can_multi_conn(g):
    return g.backend.can_multi_conn


def can_fua(g):
    return nbdkit.FUA_NATIVE if g.backend.can_fua else nbdkit.FUA_EMULATE


def _errno(fn):
    """The guest gets the errno of the OSError (ENOSPC stays ENOSPC),
    not nbdkit's default EIO."""
    def callback(*args):
        try:
            return fn(*args)
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
            raise
    callback.__name__ = fn.__name__
    return callback


@_errno
def pread(g, buf, offset, flags):
    g.pread(buf, offset)


@_errno
def pwrite(g, buf, offset, flags):
    g.pwrite(buf, offset, bool(flags & nbdkit.FLAG_FUA))


@_errno
def flush(g, flags):
    g.flush()


@_errno
def trim(g, count, offset, flags):
    g.trim(count, offset, bool(flags & nbdkit.FLAG_FUA))


@_errno
def zero(g, count, offset, flags):
    g.zero(count, offset, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
           fua=bool(flags & nbdkit.FLAG_FUA),
           fast=bool(flags & nbdkit.FLAG_FAST_ZERO))


@_errno
def extents(g, count, offset, flags):
    return [(e.start, e.end - e.start, e.flags)
            for e in g.extents(offset, count)]
