"""Endpoints: where the guest's disk lives (the source) and where it is
mirrored to (the target), behind one interface.

Kinds: a raw image file (FileEndpoint) and an NBD server (NbdEndpoint, one
connection for the endpoint's whole life).  open_endpoint() is the one place
that chooses a kind; adding one is a class here plus a line in KINDS.

The interface (Endpoint):
  * size and capabilities: can_write, can_flush, can_trim, can_fua,
    can_fast_zero, can_multi_conn, can_extents (what a guest may be offered;
    can_zero is always true: an endpoint without native zeroing writes
    zeroes, and `zero_native` says which), has_depth (qemu:allocation-depth).
  * synchronous requests, safe from any number of threads at once: pread,
    pwrite, flush, trim, zero, extents.  They raise OSError with the errno a
    guest should see (ENOSPC stays ENOSPC).
  * pwrite_during, zero_during: pwrite and zero with meanwhile() run while
    the request is in flight (a write-blocking guest write's source half,
    beside its target half), and waited for even if meanwhile() raises.
    Where a request cannot be left in flight, meanwhile() runs first.
  * asynchronous requests, for the copier: aio_read, aio_write, aio_zero,
    aio_flush.  Each calls done(errno) exactly once (0: success), maybe in
    another thread, maybe before it returns; they never raise.
  * abort(): requests in flight end now, with an error; close().
  * reconnect() (the job, after `dead`) and heal() (the guest's disk after
    a pivot: a lost connection is made again by itself); a file has no
    connection to lose.

check_job() holds a job's preconditions, checked on the endpoints the job
will use (no throw-away connection).

Extent flags follow NBD base:allocation (and nbdkit's EXTENT_*): HOLE = 1,
ZERO = 2.
"""

import ctypes
import ctypes.util
import errno
import os
import sys
import threading
import time
from dataclasses import dataclass

import nbd

from .errors import EndpointError  # noqa: F401 - raised here, named by callers
from .nbdconn import LOST, ConnectError, NbdConnection, errno_of  # noqa: F401
from .options import is_nbd_uri

HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
MAX_STATUS = 1 << 30            # block status window per request
ZEROES = bytes(1 << 20)         # source of zero writes
# Seconds between reconnect attempts, doubling: the job's and a healer's.
RECONNECT_MIN, RECONNECT_MAX = 0.1, 2.0


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


def display_uri(uri):
    """`uri` safe to show in replies, events and logs: the values of its
    query parameters are masked, except the socket path."""
    base, sep, query = uri.partition("?")
    if not sep:
        return uri
    return base + "?" + "&".join(
        p if p.startswith("socket=") or "=" not in p
        else p.split("=", 1)[0] + "=***"
        for p in query.split("&"))


class Endpoint:
    """What every kind provides (see the module docstring)."""
    uri = None
    size = 0
    can_write = can_flush = can_trim = can_fua = can_fast_zero = False
    can_zero = True
    zero_native = True
    can_multi_conn = can_extents = False
    has_depth = False
    dead = None                 # why the endpoint stopped working, or None
    # nbdkit worker threads per guest connection that serve this kind best
    # as a source (serve's default for --threads).  Every guest request
    # takes Python's GIL, and on the 2-core machine a second thread taking
    # turns with the first halves 4 KiB throughput; threads pay off only
    # where a request mostly waits with the GIL released.
    guest_threads = 4

    def pwrite_during(self, meanwhile, buf, offset, fua=False):
        meanwhile()
        self.pwrite(buf, offset, fua)

    def zero_during(self, meanwhile, count, offset, may_trim=False,
                    fua=False):
        meanwhile()
        self.zero(count, offset, may_trim, fua)

    def abort(self):
        """Nothing is ever left in flight."""

    def reconnect(self, timeout, give_up=None, start_io=None):
        raise EndpointError(f"{self.uri}: cannot reconnect")

    def heal(self, delay):
        """Make a lost connection again by itself from now on (a file has
        none to lose)."""

    def start_io(self):
        """Start serving requests from a thread of this thread's priority
        (an NBD connection's I/O thread); nothing to do for a file."""

    def __repr__(self):
        return f"{type(self).__name__}({self.uri!r})"


def _here(fn):
    return fn()


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


class NbdEndpoint(Endpoint):
    """An NBD server, over one connection (nbdconn.NbdConnection) shared by
    every thread: guest requests, the copier and the job.

    It hides what the server lacks, so that every request a guest may send
    on a connection negotiated with another endpoint (the source, before a
    pivot) works here: zero without WRITE_ZEROES becomes writes of zeroes,
    trim without TRIM does nothing (valid: trim is advisory), FUA without
    FUA becomes a write then a flush, flush without FLUSH does nothing, and
    fast zero without FAST_ZERO is refused with ENOTSUP, as NBD asks."""

    def __init__(self, uri, readonly=False, *, want_depth=False,
                 connect_timeout=10.0, io_timeout=30.0):
        self.uri = display_uri(uri)
        self._spec = uri
        self._contexts = (BASE_ALLOCATION, ALLOCATION_DEPTH) if want_depth \
            else (BASE_ALLOCATION,)
        self._readonly = readonly
        self._io_timeout = io_timeout
        self._connect_timeout = connect_timeout
        # heal(): all under _heal_cond.
        self._heal_cond = threading.Condition()
        self._heal_delay = None          # seconds; None: do not heal
        self._lost_at = None             # when a request found it lost
        self._healer = None              # the thread that reconnects
        self._closing = False
        self.conn = self._connect(connect_timeout)
        self.size = self.conn.h.get_size()
        self._learn()

    def _connect(self, timeout, give_up=None):
        try:
            return NbdConnection(
                self._spec, self._contexts, name="nbdmirror",
                display=self.uri, connect_timeout=timeout,
                io_timeout=self._io_timeout, give_up=give_up)
        except ConnectError as e:
            raise EndpointError(str(e)) from None

    def reconnect(self, timeout, give_up=None, start_io=None):
        """Replace a lost connection with a new one to the same server
        (the job thread, after `dead`; after a pivot, the healer).
        Requests sent meanwhile fail on the old one; later ones use the new
        one.  EndpointError if the server cannot be reached or no longer
        serves the same size.

        start_io(fn) runs fn in a thread whose CPU priority the new
        connection's I/O thread is to inherit (priority.Starter.call); by
        default it is started from this thread."""
        conn = self._connect(timeout, give_up)
        size = conn.h.get_size()
        if size != self.size:
            conn.close()
            raise EndpointError(f"{self.uri}: size changed from {self.size} "
                                f"to {size}")
        (start_io or _here)(conn.start)
        old, self.conn = self.conn, conn
        self._learn()
        old.close()

    def _learn(self):
        """What the server offers, as this connection negotiated it."""
        h = self.conn.h
        self.can_write = not h.is_read_only() and not self._readonly
        self.can_flush = h.can_flush()
        self.can_trim = h.can_trim()
        self.can_fast_zero = h.can_fast_zero()
        self.can_fua = h.can_fua()
        self.zero_native = h.can_zero()
        self.can_extents = h.can_meta_context(BASE_ALLOCATION)
        self.has_depth = h.can_meta_context(ALLOCATION_DEPTH)
        # One connection carries every guest connection's requests, so a
        # flush on it covers every write completed before it.
        self.can_multi_conn = True

    def _submit(self, done, send):
        """send(h, completion) on the connection of now (a reconnect may
        replace it later: the request stays with its own)."""
        conn = self.conn
        conn.submit(lambda cb: send(conn.h, cb), done)

    def _call(self, send, give_up=None, meanwhile=None):
        while True:
            conn = self.conn
            try:
                return conn.call(lambda cb: send(conn.h, cb), give_up,
                                 meanwhile)
            except OSError as e:
                # A request with a meanwhile() (a write-through's, before
                # a pivot) is never sent twice: meanwhile() ran already.
                lost = conn.dead is not None or e.errno in LOST
                if not lost or meanwhile is not None or \
                        not self._healed(conn, conn.dead or e.strerror):
                    raise

    # -- heal (the guest's backend after a pivot) ---------------------------
    def heal(self, delay):
        """From now on, a lost connection is made again, as QEMU's NBD
        client does with its reconnect-delay: a healer thread reconnects,
        with back-off, for as long as the endpoint is open.  A synchronous
        request that finds the connection lost waits for the new one for up
        to `delay` seconds after the loss, then is sent again on it; past
        that, requests fail at once (with the loss's error) until it is
        back.  A request is sent again only if it failed because its
        connection was lost: it was not answered, and NBD requests may be
        repeated.  delay 0: never heal."""
        with self._heal_cond:
            self._heal_delay = delay or None

    def _healed(self, lost, why):
        """The connection `lost` was found lost (`why`): True once another
        one replaced it, False if none did in time (or heal is off, or the
        endpoint closes)."""
        with self._heal_cond:
            if self._heal_delay is None or self._closing:
                return False
            if self.conn is not lost:
                return True          # replaced already: send it again
            if self._lost_at is None:
                self._lost_at = time.monotonic()
                print(f"nbdmirror: {self.uri}: connection lost ({why}); "
                      f"reconnecting", file=sys.stderr, flush=True)
            if self._healer is None:
                self._healer = threading.Thread(
                    target=self._heal_loop, daemon=True,
                    name=f"nbdmirror-heal-{self.uri}")
                self._healer.start()
            deadline = self._lost_at + self._heal_delay
            while self.conn is lost and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._heal_cond.wait(left)
            return self.conn is not lost and not self._closing

    def _heal_loop(self):
        """The healer: reconnect until it worked or the endpoint closes.
        Why an attempt failed is said once, until the reason changes."""
        wait, said = RECONNECT_MIN, None
        while True:
            try:
                self.reconnect(self._connect_timeout,
                               give_up=lambda: self._closing)
            except (EndpointError, OSError, nbd.Error) as e:
                if str(e) != said and not self._closing:
                    said = str(e)
                    print(f"nbdmirror: {self.uri}: cannot reconnect yet: "
                          f"{said}", file=sys.stderr, flush=True)
                with self._heal_cond:
                    if self._closing or self._heal_cond.wait_for(
                            lambda: self._closing, wait):
                        self._healer = None
                        return
                wait = min(2 * wait, RECONNECT_MAX)
                continue
            with self._heal_cond:
                down = time.monotonic() - self._lost_at
                self._lost_at = None
                self._healer = None
                self._heal_cond.notify_all()
            print(f"nbdmirror: {self.uri}: reconnected after {down:.1f} s",
                  file=sys.stderr, flush=True)
            return

    # -- async (the copier) ---------------------------------------------
    def aio_read(self, view, offset, done):
        self._submit(done, lambda h, cb: h.aio_pread(
            nbd.Buffer.from_buffer(view), offset, completion=cb))

    def aio_write(self, view, offset, done):
        self._submit(done, lambda h, cb: h.aio_pwrite(
            nbd.Buffer.from_buffer(view), offset, completion=cb))

    def aio_zero(self, count, offset, fast, done):
        flags = nbd.CMD_FLAG_FAST_ZERO if fast else 0
        self._submit(done, lambda h, cb: h.aio_zero(
            count, offset, completion=cb, flags=flags))

    def aio_flush(self, done):
        if not self.can_flush:
            return done(0)
        self._submit(done, lambda h, cb: h.aio_flush(completion=cb))

    # -- sync (guest threads, the job) -------------------------------------
    def pread(self, buf, offset):
        self._call(lambda h, cb: h.aio_pread(
            nbd.Buffer.from_buffer(buf), offset, completion=cb))

    def pwrite(self, buf, offset, fua=False):
        self.pwrite_during(None, buf, offset, fua)

    def pwrite_during(self, meanwhile, buf, offset, fua=False):
        native = fua and self.can_fua
        flags = nbd.CMD_FLAG_FUA if native else 0
        self._call(lambda h, cb: h.aio_pwrite(
            nbd.Buffer.from_buffer(buf), offset, completion=cb, flags=flags),
            meanwhile=meanwhile)
        if fua and not native:
            self.flush()

    def flush(self):
        if self.can_flush:
            self._call(lambda h, cb: h.aio_flush(completion=cb))

    def trim(self, count, offset, fua=False):
        if self.can_trim:
            flags = nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
            self._call(lambda h, cb: h.aio_trim(
                count, offset, completion=cb, flags=flags))
            if not fua or self.can_fua:
                return
        if fua:
            self.flush()

    def zero(self, count, offset, may_trim=False, fua=False, fast=False):
        if fast and not self.can_fast_zero:
            raise OSError(errno.ENOTSUP, "fast zero not supported")
        self._zero(None, count, offset, may_trim, fua, fast)

    def zero_during(self, meanwhile, count, offset, may_trim=False,
                    fua=False):
        self._zero(meanwhile, count, offset, may_trim, fua, False)

    def _zero(self, meanwhile, count, offset, may_trim, fua, fast):
        if not self.zero_native:
            zeroes = memoryview(ZEROES)
            while count:
                n = min(count, len(zeroes))
                self.pwrite_during(meanwhile, zeroes[:n], offset)
                meanwhile = None            # beside the first write only
                offset, count = offset + n, count - n
            if meanwhile is not None:       # count 0: no write at all
                meanwhile()
            if fua:
                self.flush()
            return
        native_fua = fua and self.can_fua
        flags = (0 if may_trim else nbd.CMD_FLAG_NO_HOLE) | \
            (nbd.CMD_FLAG_FUA if native_fua else 0) | \
            (nbd.CMD_FLAG_FAST_ZERO if fast else 0)
        self._call(lambda h, cb: h.aio_zero(
            count, offset, completion=cb, flags=flags), meanwhile=meanwhile)
        if fua and not native_fua:
            self.flush()

    def extents(self, offset, count, depth=False, give_up=None):
        """Extents from offset (the server may describe less than count).
        depth: also qemu:allocation-depth (has_depth must be true)."""
        count = min(count, MAX_STATUS, self.size - offset)
        got = {}

        def collect(metacontext, off, entries, err):
            got.setdefault(metacontext, list(entries))
            return 0

        self._call(lambda h, cb: h.aio_block_status(
            count, offset, collect, completion=cb), give_up)
        base = _runs(offset, got.get(BASE_ALLOCATION, [count, 0]))
        if not depth:
            return [Extent(s, e, f) for s, e, f in base]
        return _merge(base, _runs(offset, got[ALLOCATION_DEPTH]))

    def start_io(self):
        self.conn.start()

    @property
    def dead(self):
        return self.conn.dead

    def abort(self):
        self.conn.kill("abandoned")

    def close(self):
        with self._heal_cond:
            self._closing = True
            self._heal_cond.notify_all()
            healer = self._healer
        if healer is not None:
            healer.join()            # its attempt gives up within 0.1 s
        self.conn.close()


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


class FileEndpoint(Endpoint):
    """A raw image file (or block device).  os.preadv/os.pwritev move data
    straight between the file and nbdkit's buffer; a file descriptor is safe
    to share between threads for positional I/O.  Its aio_* methods do the
    work at once and call done() before returning (page-cache speed)."""

    can_flush = can_trim = can_zero = can_extents = True
    can_fast_zero = False
    can_fua = False            # emulated with a flush
    can_multi_conn = True
    # A page-cache hit takes microseconds: one thread serves 4 KiB reads
    # and writes 1.8-2x faster than 4 (README, "Guest I/O").
    guest_threads = 1

    def __init__(self, path, readonly=False, **_timeouts):
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

    def pread(self, buf, offset):
        n = os.preadv(self.fd, [buf], offset)
        if n == len(buf):
            return              # the usual case: all of it at once
        view, offset = memoryview(buf)[n:], offset + n
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n == 0:           # past EOF reads as zero
                view[:] = bytes(len(view))
                return
            view, offset = view[n:], offset + n

    def pwrite(self, buf, offset, fua=False):
        n = os.pwritev(self.fd, [buf], offset)
        if n != len(buf):       # the usual case wrote all of it at once
            view = memoryview(buf)[n:]
            offset += n
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

    # -- async (the copier): done at once ---------------------------------
    def aio_read(self, view, offset, done):
        self._now(done, self.pread, view, offset)

    def aio_write(self, view, offset, done):
        self._now(done, self.pwrite, view, offset)

    def aio_zero(self, count, offset, fast, done):
        self._now(done, self.zero, count, offset, fast=fast)

    def aio_flush(self, done):
        self._now(done, self.flush)

    @staticmethod
    def _now(done, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except OSError as e:
            return done(errno_of(e))
        done(0)

    def extents(self, offset, count, depth=False, give_up=None):
        """Data and holes from SEEK_DATA/SEEK_HOLE; holes read as zero.
        Every byte of a raw file is its top layer (depth 1)."""
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


# Endpoint kinds, tried in order: (accepts(spec), class).
KINDS = [
    (lambda spec: is_nbd_uri(spec), NbdEndpoint),
    (lambda spec: True, FileEndpoint),
]


def endpoint_kind(spec):
    return next(cls for accepts, cls in KINDS if accepts(spec))


def open_endpoint(spec, readonly=False, *, want_depth=False,
                  connect_timeout=10.0, io_timeout=30.0):
    """Open the endpoint `spec` names (a file path or an NBD URI).  Raises
    EndpointError with a one-line reason."""
    cls = endpoint_kind(spec)
    kwargs = dict(connect_timeout=connect_timeout, io_timeout=io_timeout)
    if cls is NbdEndpoint:
        kwargs["want_depth"] = want_depth
    return cls(spec, readonly, **kwargs)


def check_job(source, target, sync):
    """Raise EndpointError unless a mirror job from `source` to `target`
    (open endpoints) can start.  Asks nothing of the servers: what it needs
    was learnt while connecting."""
    if not target.can_write:
        raise EndpointError(f"target {target.uri} is read-only")
    if target.size != source.size:
        raise EndpointError(f"target size {target.size} differs from source "
                            f"size {source.size}")
    if sync == "top" and not source.has_depth:
        if isinstance(source, NbdEndpoint):
            raise EndpointError(
                f"sync=top: source {source.uri} does not offer "
                f"{ALLOCATION_DEPTH} (serve it with qemu-nbd -A)")
        raise EndpointError(
            f"sync=top needs an NBD source that offers {ALLOCATION_DEPTH} "
            f"(qemu-nbd -A); {source.uri} is a file")
