"""Endpoints: a raw image file or an NBD server, behind one small interface.

The guest path (guest.py) calls an endpoint's synchronous methods from many
nbdkit worker threads at once; each method is safe to call concurrently.
The copier never uses these methods for its bulk I/O: it opens its own
handles (copier.open_reader / open_writer) so that guest I/O and background
copying never queue behind one another.

Extent flags follow NBD base:allocation (and nbdkit's EXTENT_*): HOLE = 1,
ZERO = 2.
"""

import ctypes
import ctypes.util
import errno
import os
import threading
from dataclasses import dataclass

import nbd

from .options import is_nbd_uri

HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
MAX_REQUEST = 32 << 20          # largest read/write libnbd sends in one go
MAX_STATUS = 1 << 30            # block status window per request


class EndpointError(Exception):
    """An endpoint cannot be opened or used; str() is a one-line reason."""


@dataclass(frozen=True)
class Extent:
    """Bytes [start, end) with one state.  flags: base:allocation bits
    (HOLE, ZERO).  depth: 1 = the top layer allocates it, 0 = unallocated,
    2+ = a backing layer (always 1 for raw files)."""
    start: int
    end: int
    flags: int
    depth: int = 1

    @property
    def zero(self):
        return bool(self.flags & ZERO)


def errno_of(exc):
    """The errno number of an nbd.Error or OSError (EIO if none).  (An
    nbd.Error's `errno` is a name such as 'EINVAL'; `errnum` the number.)"""
    if isinstance(exc, nbd.Error):
        return exc.errnum or errno.EIO
    return getattr(exc, "errno", None) or errno.EIO


def connect(uri, contexts=(BASE_ALLOCATION,), name="nbdmirror"):
    """Open a libnbd handle on `uri`, asking for the given meta contexts."""
    h = nbd.NBD()
    h.set_handle_name(name)
    for ctx in contexts:
        h.add_meta_context(ctx)
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        raise EndpointError(f"cannot connect to {uri}: {e.string}") from None
    return h


def nbd_block_status(h, offset, count, want_depth=False):
    """Extents of [offset, offset+count) (the server may return less)."""
    count = min(count, MAX_STATUS, h.get_size() - offset)
    got = {}

    def cb(metacontext, off, entries, err):
        got.setdefault(metacontext, list(entries))
        return 0

    h.block_status(count, offset, cb)
    base = _runs(offset, got.get(BASE_ALLOCATION, [count, 0]))
    if not want_depth:
        return [Extent(s, e, f) for s, e, f in base]
    depth = _runs(offset, got[ALLOCATION_DEPTH])
    return _merge(base, depth)


def _runs(offset, entries):
    """[(start, end, flags)] from libnbd's flat [length, flags, ...] list."""
    out, pos = [], offset
    for i in range(0, len(entries), 2):
        length, flags = entries[i], entries[i + 1]
        if length:
            out.append((pos, pos + length, flags))
            pos += length
    return out


def _merge(base, depth):
    """Intersect two extent lists into Extent(start, end, zero, depth)."""
    out, i, j = [], 0, 0
    while i < len(base) and j < len(depth):
        s = max(base[i][0], depth[j][0])
        e = min(base[i][1], depth[j][1])
        if s < e:
            out.append(Extent(s, e, base[i][2], depth[j][2]))
        if base[i][1] <= depth[j][1]:
            i += 1
        else:
            j += 1
    return out


class NbdEndpoint:
    """An NBD server.  Guest requests borrow a handle from a pool, so no two
    threads ever share a synchronous libnbd handle, and the pool never holds
    more handles than there were concurrent requests."""

    def __init__(self, uri, readonly=False):
        self.uri = uri
        self._pool = []
        self._pool_lock = threading.Lock()
        h = connect(uri)
        self.size = h.get_size()
        self.can_write = not h.is_read_only() and not readonly
        self.can_flush = h.can_flush()
        self.can_trim = h.can_trim()
        self.can_zero = h.can_zero()
        self.can_fast_zero = h.can_fast_zero()
        self.can_fua = h.can_fua()
        self.can_multi_conn = h.can_multi_conn()
        self.can_extents = h.can_meta_context(BASE_ALLOCATION)
        self._pool.append(h)

    def __repr__(self):
        return f"NbdEndpoint({self.uri!r})"

    def _get(self):
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        return connect(self.uri)

    def _put(self, h):
        with self._pool_lock:
            self._pool.append(h)

    def _call(self, fn):
        h = self._get()
        try:
            return fn(h)
        finally:
            self._put(h)

    def pread(self, buf, offset):
        def fn(h):
            cookie = h.aio_pread(nbd.Buffer.from_buffer(buf), offset)
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        self._call(fn)

    def pwrite(self, buf, offset, fua=False):
        flags = nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        self._call(lambda h: h.pwrite(buf, offset, flags))
        if fua and not self.can_fua:
            self.flush()

    def flush(self):
        if self.can_flush:
            self._call(lambda h: h.flush())

    def trim(self, count, offset, fua=False):
        flags = nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        self._call(lambda h: h.trim(count, offset, flags))

    def zero(self, count, offset, may_trim=False, fua=False, fast=False):
        if fast and not self.can_fast_zero:
            raise OSError(errno.ENOTSUP, "fast zero not supported")
        flags = (0 if may_trim else nbd.CMD_FLAG_NO_HOLE) | \
            (nbd.CMD_FLAG_FUA if fua and self.can_fua else 0) | \
            (nbd.CMD_FLAG_FAST_ZERO if fast else 0)
        self._call(lambda h: h.zero(count, offset, flags))

    def extents(self, offset, count):
        return self._call(lambda h: nbd_block_status(h, offset, count))

    def close(self):
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for h in pool:
            try:
                h.shutdown()
            except nbd.Error:
                pass


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd, mode, offset, length):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FileEndpoint:
    """A raw image file (or block device).  os.preadv/os.pwritev move data
    straight between the file and nbdkit's buffer; a file descriptor is safe
    to share between threads for positional I/O."""

    can_flush = can_trim = can_zero = can_extents = True
    can_fast_zero = False
    can_fua = False            # emulated with a flush
    can_multi_conn = True

    def __init__(self, path, readonly=False):
        self.uri = self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
            self.can_write = not readonly
        except PermissionError:
            self.fd = os.open(path, os.O_RDONLY)
            self.can_write = False
        except OSError as e:
            raise EndpointError(f"cannot open {path}: {e.strerror}") from None
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def __repr__(self):
        return f"FileEndpoint({self.path!r})"

    def pread(self, buf, offset):
        view = memoryview(buf)
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n == 0:           # past EOF reads as zero
                view[:] = bytes(len(view))
                return
            view, offset = view[n:], offset + n

    def pwrite(self, buf, offset, fua=False):
        view = memoryview(buf)
        while view:
            n = os.pwritev(self.fd, [view], offset)
            view, offset = view[n:], offset + n
        if fua:
            self.flush()

    def flush(self):
        os.fdatasync(self.fd)

    def trim(self, count, offset, fua=False):
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      offset, count)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if fua:
            self.flush()

    def zero(self, count, offset, may_trim=False, fua=False, fast=False):
        modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if may_trim else []) \
            + [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, count)
                break
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        else:
            if fast:
                raise OSError(errno.ENOTSUP, "fast zero not supported")
            zeroes = bytes(min(count, 1 << 20))
            while count:
                n = min(count, len(zeroes))
                self.pwrite(memoryview(zeroes)[:n], offset)
                offset, count = offset + n, count - n
        if fua:
            self.flush()

    def extents(self, offset, count):
        """Data and holes from SEEK_DATA/SEEK_HOLE; holes read as zero."""
        end = min(offset + count, self.size)
        out, pos = [], offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:     # ENXIO: only a hole remains
                    return out + [Extent(pos, end, 0)]
                data = end
            if data > pos:
                out.append(Extent(pos, min(data, end), HOLE | ZERO))
                pos = min(data, end)
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append(Extent(pos, hole, 0))
            pos = hole
        return out

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_endpoint(spec, readonly=False):
    """A FileEndpoint for a path, an NbdEndpoint for an NBD URI."""
    if is_nbd_uri(spec):
        return NbdEndpoint(spec, readonly)
    return FileEndpoint(spec, readonly)
