"""nbdkit plugin: serve a disk while nbdmirror mirrors it to an NBD target.

    nbdkit python /path/to/nbdmirror/nbdkit_plugin.py source=SRC control=SOCK ...

(`nbdmirror serve` runs exactly that; from a checkout, plugin/nbdmirror.py
is the same plugin.)  A thin adapter: each callback hands the request to
nbdmirror.proxy.Proxy and its GuestIO.  See INTERFACE.md (or README.md) for
the keys, and options.py for their table.

nbdkit runs this file by its path, as the module __main__, in an embedded
interpreter that knows neither the venv nor the checkout it lives in; so it
first loads the package it belongs to from its own folder (by location, not
through sys.path: no other nbdmirror on the path can be picked up instead).
"""

import errno
import importlib.util
import os
import sys

import nbdkit

API_VERSION = 2


def _load_package(folder):
    """Import the package in `folder` as `nbdmirror`, unless it is loaded
    (as it is when this file is imported as nbdmirror.nbdkit_plugin)."""
    if "nbdmirror" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "nbdmirror", os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nbdmirror"] = module
    spec.loader.exec_module(module)


_load_package(os.path.dirname(os.path.abspath(__file__)))

from nbdmirror.bitmapfile import BitmapFileError  # noqa: E402
from nbdmirror.endpoints import EndpointError  # noqa: E402
from nbdmirror.job import JobError  # noqa: E402
from nbdmirror.lifecycle import GuestSocket, Signals  # noqa: E402
from nbdmirror.options import OptionError, ProxyOptions  # noqa: E402
from nbdmirror.paths import PidFile  # noqa: E402
from nbdmirror.proxy import Proxy  # noqa: E402

_options = ProxyOptions()
_proxy = None
_pidfile = None
_guest_socket = GuestSocket()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def _say(e):
    """The one line about a refusal that `nbdmirror serve` picks out of
    nbdkit's output (nbdkit adds the traceback after it)."""
    print("nbdmirror: " + " ".join(str(e).split()), file=sys.stderr,
          flush=True)


def config(key, value):
    try:
        _options.set(key, value)
    except OptionError as e:
        _say(e)
        raise


def config_complete():
    global _proxy
    try:
        _proxy = Proxy(_options, shutdown=_exit_now)
        _proxy.preflight()
    except (OptionError, EndpointError, JobError, BitmapFileError) as e:
        _say(e)
        raise


def after_fork():
    global _pidfile
    _guest_socket.note()        # before the proxy makes its own
    if _options.pidfile:
        _pidfile = PidFile(_options.pidfile)
        _pidfile.create()
    Signals(lambda sig: _proxy.request_shutdown()).install()
    _proxy.start()


def _exit_now():
    """quit / a signal, once the job ended: clean up, then end the process
    without waiting for guests to hang up (lifecycle.py says why)."""
    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cleanup():
    if _proxy is not None:
        _proxy.close()
    _guest_socket.remove()
    if _pidfile is not None:
        _pidfile.remove()


def open(readonly):
    return _proxy.guest


def get_size(g):
    return g.backend.size


def _capability(name):
    """can_NAME(g): what the guest's backend offers now (after a pivot,
    the target: new guest connections see its capabilities)."""
    def callback(g):
        return getattr(g.backend, name)
    callback.__name__ = name
    return callback


can_write = _capability("can_write")
can_flush = _capability("can_flush")
can_trim = _capability("can_trim")
can_zero = _capability("can_zero")
can_fast_zero = _capability("can_fast_zero")
can_extents = _capability("can_extents")
can_multi_conn = _capability("can_multi_conn")


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
