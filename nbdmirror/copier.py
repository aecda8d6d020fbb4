"""The copier: moves dirty chunks from the source to the target.

It runs in the job's thread with handles of its own (never the guest's), and
drives them with libnbd aio from one poll loop, so requests overlap without
Python threads.

Work comes in *ops*: a run of dirty chunks [c0, c1) taken from the bitmap.
An op is split into *pieces*, each one NBD request: a read then a write
(data), a zero request, or nothing (a range the target already reads as
zero, or, in `top` mode, a range the source's top layer does not allocate).

Invariants (see also bitmap.py and extents.py):
  * Dirty bits of an op are cleared *before* its extents are looked up and
    its data is read.  A guest write that lands meanwhile sets them again
    after its source write completed, so the chunk is copied again.
  * An op holds its chunks in `locks` (chunklocks.py) until all its pieces
    completed; no other op, and no write-through guest write, writes them on
    the target meanwhile.
  * If any piece of an op fails, the whole op's chunks are marked dirty
    again when the op ends.  Progress (`done_bytes`) grows only when an op
    ends without error: it counts work done, not work issued.
  * Bytes of data in flight never exceed buf-size (or one 4K piece when it
    is smaller): each read takes a buffer from a fixed pool of buf-size /
    piece-size buffers, reused, never reallocated.
"""

import collections
import errno
import os
import select
import threading
import time

import nbd
from bitarray import bitarray

from . import endpoints
from .endpoints import ALLOCATION_DEPTH, BASE_ALLOCATION, nbd_block_status
from .chunklocks import ChunkLocks
from .extents import ExtentCache
from .ratelimit import RateLimit

REQUEST_SIZE = 1 << 20      # data pieces and coalesced data ops, at most
ZERO_REQUEST = 1 << 30      # a zero request, at most
MAX_REQUESTS = 64           # requests in flight, at most


class CopyError(Exception):
    def __init__(self, operation, err, offset):
        self.operation, self.errno, self.offset = operation, err, offset
        super().__init__(f"{operation} error at offset {offset}: "
                         f"{os.strerror(err)}")


def close_handle(h):
    """Drop a libnbd handle at once, abandoning whatever is in flight."""
    if hasattr(h, "_o"):
        nbd.NBD.__del__(h)
        del h._o


# -- endpoints of the copy ---------------------------------------------------

class NbdReader:
    """The source as an NBD server: aio reads on a private handle."""

    def __init__(self, uri, want_depth):
        contexts = (BASE_ALLOCATION, ALLOCATION_DEPTH) if want_depth \
            else (BASE_ALLOCATION,)
        self.h = endpoints.connect(uri, contexts, "nbdmirror-copy-src")
        self.want_depth = want_depth
        self.handles = [self.h]

    def extents(self, offset, count):
        return nbd_block_status(self.h, offset, count, self.want_depth)

    def read(self, view, offset, done):
        self.h.aio_pread(nbd.Buffer.from_buffer(view), offset,
                         completion=lambda err: done(err.value) or 1)

    def close(self):
        close_handle(self.h)


class FileReader:
    """The source as a raw file: reads are synchronous (page cache or disk
    speed), so they complete before read() returns."""

    handles = ()

    def __init__(self, path):
        self.file = endpoints.FileEndpoint(path, readonly=True)

    def extents(self, offset, count):
        return self.file.extents(offset, count)

    def read(self, view, offset, done):
        try:
            self.file.pread(view, offset)
        except OSError as e:
            done(endpoints.errno_of(e))
        else:
            done(0)

    def close(self):
        self.file.close()


class NbdWriter:
    """The target: aio writes and zeroes on a private handle."""

    def __init__(self, uri):
        self.h = endpoints.connect(uri, (BASE_ALLOCATION,), "nbdmirror-copy-dst")
        self.handles = [self.h]
        self.can_zero = self.h.can_zero()
        self.fast_zero = self.h.can_fast_zero()
        self.has_extents = self.h.can_meta_context(BASE_ALLOCATION)

    def extents(self, offset, count):
        return nbd_block_status(self.h, offset, count)

    def write(self, view, offset, done):
        self.h.aio_pwrite(nbd.Buffer.from_buffer(view), offset,
                          completion=lambda err: done(err.value) or 1)

    def zero(self, count, offset, fast, done):
        flags = nbd.CMD_FLAG_FAST_ZERO if fast else 0
        self.h.aio_zero(count, offset, flags=flags,
                        completion=lambda err: done(err.value) or 1)

    def flush(self):
        self.h.flush()

    def close(self):
        close_handle(self.h)


def open_reader(source, want_depth):
    if endpoints.is_nbd_uri(source):
        return NbdReader(source, want_depth)
    return FileReader(source)


# -- the copy loop -----------------------------------------------------------

class Op:
    __slots__ = ("c0", "c1", "start", "end", "pending", "error")

    def __init__(self, c0, c1, start, end):
        self.c0, self.c1, self.start, self.end = c0, c1, start, end
        self.pending = 0
        self.error = None        # first CopyError of its pieces


class Piece:
    """One request.  kind: 'read' (then 'write', or 'zero' for all-zero
    data, or nothing when the target already reads zero), or 'zero'."""
    __slots__ = ("kind", "offset", "length", "op", "buf", "fast")

    def __init__(self, kind, offset, length, op):
        self.kind, self.offset, self.length, self.op = kind, offset, length, op
        self.buf = None
        self.fast = False        # a zero sent with NBD_CMD_FLAG_FAST_ZERO


class Copier:
    """Copies what the bitmap marks dirty.  Only the job's thread calls it.

    on_error(CopyError) is called (in this thread) for every failed request;
    the job applies its error policy.
    """

    def __init__(self, bitmap, reader, writer, *, sync="full", buf_size=16 << 20,
                 speed=0, target_is_zero=False, on_error=None, locks=None):
        self.bitmap = bitmap
        self.reader, self.writer = reader, writer
        self.sync = sync
        self.size = bitmap.size
        self.shift = bitmap.shift
        self.target_is_zero = target_is_zero
        self.on_error = on_error or (lambda e: None)
        self.cache = ExtentCache(reader.extents)
        self.ratelimit = RateLimit(speed)
        # Data pieces fit buf-size: a pool of buf-size / piece bytes buffers.
        self._max_piece = max(4096, min(REQUEST_SIZE, buf_size) & ~4095)
        self._piece_size = self._max_piece
        self.set_speed(speed)
        nbuf = max(1, buf_size // self._max_piece)
        self._free = [bytearray(self._max_piece) for _ in range(nbuf)]
        self._zeroes = bytes(REQUEST_SIZE)
        self._zero_view = memoryview(self._zeroes)
        self.locks = locks or ChunkLocks(bitmap.chunks)
        self._target_zero = bitarray(bitmap.chunks)  # target reads 0 there
        self._target_zero.setall(bool(target_is_zero))
        self._queue = collections.deque()          # pieces not yet issued
        self._done = collections.deque()           # (piece, errno) completed
        self._ops = 0                              # live ops
        self._op_bytes = 0                         # bytes of live ops
        self._requests = 0                         # requests in flight
        self._cursor = 0
        self.done_bytes = 0      # progress: bytes copied or known done
        self.copied_bytes = 0    # data bytes written to the target
        self.zeroed_bytes = 0    # bytes zeroed on the target
        self.issuing = True      # False: let in-flight work drain, start none
        self.retry_at = 0.0      # after an ignored error, back off until then
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._handles = list(reader.handles) + list(writer.handles)

    # -- control ---------------------------------------------------------
    def set_speed(self, speed):
        self.ratelimit.set_speed(speed)
        # Small requests under a limit keep the rate smooth: ~20 per second.
        self._piece_size = self._max_piece if not speed else \
            max(4096, min(self._max_piece, (speed // 20) & ~4095))

    def wake(self):
        """Called from any thread: make pump() return soon.  A guest thread
        may call it after close() (it read the tracker just before the job
        ended): the lock makes that a no-op, never a write to a reused fd."""
        with self._wake_lock:
            if self._wake_w is None:
                return
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass

    @property
    def busy(self):
        """Requests in flight or queued."""
        return self._ops > 0

    @property
    def in_flight_bytes(self):
        return self._op_bytes

    def converged(self):
        return not self._ops and not self.bitmap.dirty_chunks

    def close(self):
        for end in (self.reader, self.writer):
            try:
                end.close()
            except Exception:
                pass
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None

    # -- the initial scan ------------------------------------------------
    def learn_target(self):
        """Note where the target reads as zero (full sync only).  Must run
        before anything but this copier writes the target (write-blocking
        guest writes): a write-through landing after the target's block
        status was read would otherwise be taken for zeroes."""
        if self.sync == "full" and self.size and not self.target_is_zero \
                and self.writer.has_extents:
            self._scan_extents(self.writer.extents, self._learn_target_zero,
                               lambda: False)

    def scan(self, should_stop=lambda: False):
        """Mark what this sync mode must copy.  Dirty tracking is already on,
        so a guest write during the scan is marked by the guest path; the scan
        only ever sets bits, never clears them."""
        if self.sync == "none" or not self.size:
            return
        self._scan_extents(self.reader.extents, self._mark_from_source,
                           should_stop)

    def _scan_extents(self, fetch, apply, should_stop):
        pos = 0
        while pos < self.size and not should_stop():
            extents = fetch(pos, self.size - pos)
            if not extents:
                raise IOError(f"no block status at offset {pos}")
            for e in extents:
                apply(e)
            pos = extents[-1].end

    def _learn_target_zero(self, e):
        if e.zero:
            c0 = (e.start + self.bitmap.granularity - 1) >> self.shift
            c1 = self.bitmap.chunks if e.end >= self.size else e.end >> self.shift
            if c0 < c1:
                self._target_zero[c0:c1] = 1

    def _mark_from_source(self, e):
        c0, c1 = self.bitmap.chunk_range(e.start, e.end - e.start)
        if self.sync == "top":
            if e.depth == 1:
                self.bitmap.mark_chunks(c0, c1)
            return
        if e.zero:
            # Chunks wholly inside a zero extent, already zero on the
            # target: nothing to do, and they count as done.
            z0 = (e.start + self.bitmap.granularity - 1) >> self.shift
            z1 = self.bitmap.chunks if e.end >= self.size else e.end >> self.shift
            c = z0
            while c < z1:
                nz = self._target_zero.find(0, c, z1)
                nz = z1 if nz < 0 else nz
                self.done_bytes += self.bitmap.chunk_bytes(c, nz)
                if nz >= z1:
                    break
                nzz = self._target_zero.find(1, nz, z1)
                nzz = z1 if nzz < 0 else nzz
                self.bitmap.mark_chunks(nz, nzz)
                c = nzz
            self.bitmap.mark_chunks(c0, max(c0, z0))
            self.bitmap.mark_chunks(max(z1, c0), c1)
        else:
            self.bitmap.mark_chunks(c0, c1)

    # -- the loop ----------------------------------------------------------
    def pump(self, timeout):
        """Reap completions, issue what may be issued, wait for I/O.

        Returns after at most `timeout` seconds (None: until something
        happens).  Raises nothing for I/O errors: they go to on_error.
        """
        self._reap()
        self._issue()
        self._reap()
        self._poll(self._next_timeout(timeout))
        self._reap()

    def _next_timeout(self, timeout):
        if self.issuing and (self._queue or self.bitmap.dirty_chunks):
            wait = max(self.ratelimit.delay(), self.retry_at - time.monotonic())
            if wait > 0 and (timeout is None or wait < timeout):
                return wait
        return timeout

    def _poll(self, timeout):
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fds = {}
        for h in self._handles:
            d = h.aio_get_direction()
            ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            if ev:
                fd = h.aio_get_fd()
                fds[fd] = h
                poller.register(fd, ev)
        if self._done:
            timeout = 0
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        for fd, ev in poller.poll(ms):
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            h = fds[fd]
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            elif ev & select.POLLOUT:
                h.aio_notify_write()

    # -- issuing -----------------------------------------------------------
    def _issue(self):
        while self.issuing and self._requests < MAX_REQUESTS:
            if time.monotonic() < self.retry_at:
                return
            if not self._queue:
                # Under a speed limit, wait before taking an op, not while
                # holding its chunks (write-throughs may wait for them).
                if self.ratelimit.delay() > 0 or not self._new_op():
                    return
                continue         # the op may have needed no request at all
            piece = self._queue[0]
            if piece.kind == "read":
                if not self._free or self.ratelimit.delay() > 0:
                    return
                self._queue.popleft()
                piece.buf = self._free.pop()
                self.ratelimit.consume(piece.length)
                self._requests += 1
                self._start(piece, self.reader.read,
                            memoryview(piece.buf)[:piece.length], piece.offset)
            else:
                self._queue.popleft()
                self._zero(piece)

    def _start(self, piece, fn, *args):
        done = lambda err: self._done.append((piece, err))  # noqa: E731
        try:
            fn(*args, done)
        except nbd.Error as e:      # refused before sending (handle dead)
            done(endpoints.errno_of(e))

    def _zero(self, piece):
        """Make [offset, offset+length) read as zeroes on the target."""
        piece.kind = "zero"
        self._clear_target_zero(piece.offset, piece.length)
        self._requests += 1
        if self.writer.can_zero:
            piece.fast = self.writer.fast_zero
            self._start(piece, self.writer.zero, piece.length, piece.offset,
                        piece.fast)
        else:   # no WRITE_ZEROES: write zero buffers
            piece.kind = "write"
            self._start(piece, self.writer.write,
                        self._zero_view[:piece.length], piece.offset)

    def forget_target_zero(self, c0, c1):
        """Chunks [c0, c1) may not read as zero on the target any more.
        Called by the holder of those chunks (a write-through guest write):
        no op of ours touches them meanwhile."""
        self._target_zero[c0:c1] = 0

    def _clear_target_zero(self, offset, length):
        c0, c1 = self.bitmap.chunk_range(offset, length)
        self._target_zero[c0:c1] = 0

    def _target_reads_zero(self, offset, length):
        c0, c1 = self.bitmap.chunk_range(offset, length)
        return self._target_zero.count(0, c0, c1) == 0

    def _find_work(self):
        """First dirty chunk nobody holds, from the cursor, wrapping once."""
        for start in (self._cursor, 0):
            c = self.bitmap.next_dirty(start)
            while c >= 0 and self.locks.is_held(c):
                free = self.locks.next_free(c)
                c = -1 if free < 0 else self.bitmap.next_dirty(free)
            if c >= 0:
                return c
            if start == 0:
                break
        return -1

    def _new_op(self):
        """Take the next run of dirty chunks and queue its pieces.  False
        when there is nothing to take (or looking at it failed)."""
        bm = self.bitmap
        c0 = self._find_work()
        if c0 < 0:
            return False
        start = c0 << self.shift
        try:
            first = self.cache.at(start)
        except (nbd.Error, OSError):
            first = None         # sized as data; the lookup below reports it
        if first is not None and (self._skippable(first) or first.zero):
            stop = bm.chunks if first.end >= self.size else first.end >> self.shift
            stop = min(max(stop, c0 + 1), c0 + max(1, ZERO_REQUEST >> self.shift))
        else:
            stop = c0 + max(1, self._piece_size >> self.shift)
        c1 = self.locks.try_take(c0, bm.dirty_run_end(c0, stop))
        if c1 == c0:
            return False         # a guest write took it meanwhile
        self._cursor = c1
        # Clear, then look: see the module docstring.
        bm.clear_chunks(c0, c1)
        end = min(c1 << self.shift, self.size)
        op = Op(c0, c1, start, end)
        self._ops += 1
        self._op_bytes += end - start
        try:
            extents = self.cache.get(start, end)
        except (nbd.Error, OSError) as e:
            op.error = CopyError("read", endpoints.errno_of(e), start)
            self._end_op(op)
            self.on_error(op.error)
            return False         # let the job apply the policy first
        for e in extents:
            if self._skippable(e):
                continue
            if e.zero:
                self._queue_zero(op, e.start, e.end)
            else:
                for off in range(e.start, e.end, self._piece_size):
                    self._add(Piece("read", off,
                                    min(self._piece_size, e.end - off), op))
        if not op.pending:
            self._end_op(op)
        return True

    def _skippable(self, e):
        """Ranges the target must not be written in: in `top` mode, what
        the source's top layer does not allocate."""
        return self.sync == "top" and e.depth != 1

    def _queue_zero(self, op, start, end):
        """Zero pieces for [start, end), skipping chunks the target already
        reads as zero."""
        pos = start
        while pos < end:
            nxt = min(end, ((pos >> self.shift) + 1) << self.shift)
            if self._target_reads_zero(pos, nxt - pos):
                pos = nxt
                continue
            limit = ZERO_REQUEST if self.writer.can_zero else REQUEST_SIZE
            stop = pos
            while stop < end and stop - pos < limit:
                nxt = min(end, ((stop >> self.shift) + 1) << self.shift)
                if self._target_reads_zero(stop, nxt - stop):
                    break
                stop = nxt
            stop = min(stop, pos + limit)
            self._add(Piece("zero", pos, stop - pos, op))
            pos = stop

    def _add(self, piece):
        piece.op.pending += 1
        self._queue.append(piece)

    # -- completions ---------------------------------------------------------
    def _reap(self):
        while self._done:
            piece, err = self._done.popleft()
            self._requests -= 1
            if piece.kind == "read" and not err:
                self._read_done(piece)
                continue
            if err in (errno.ENOTSUP, errno.EOPNOTSUPP) and piece.fast:
                self.writer.fast_zero = False      # retry as a plain zero
                self._zero(piece)
                continue
            if piece.buf is not None:
                self._free.append(piece.buf)
                piece.buf = None
            if err:
                self._piece_failed(piece, err)
            elif piece.kind == "zero":
                self.zeroed_bytes += piece.length
            elif piece.kind == "write":
                self.copied_bytes += piece.length
            self._piece_finished(piece)

    def _piece_finished(self, piece):
        """One piece less for its op; the op ends with its last piece."""
        op = piece.op
        op.pending -= 1
        if not op.pending:
            self._end_op(op)

    def _read_done(self, piece):
        """Data arrived: write it, or a zero request if it is all zeroes."""
        n = piece.length
        if piece.buf.startswith(self._zero_view[:n]):
            self._free.append(piece.buf)
            piece.buf = None
            if self._target_reads_zero(piece.offset, n):
                self._piece_finished(piece)      # nothing to write
                return
            self._zero(piece)
            return
        piece.kind = "write"
        self._clear_target_zero(piece.offset, n)
        self._requests += 1
        self._start(piece, self.writer.write, memoryview(piece.buf)[:n],
                    piece.offset)

    def _piece_failed(self, piece, err):
        operation = "read" if piece.kind == "read" else "write"
        e = CopyError(operation, err, piece.offset)
        if piece.op.error is None:
            piece.op.error = e
        if operation == "write":
            # What the target holds there is unknown now.
            self._clear_target_zero(piece.offset, piece.length)
        self.on_error(e)

    def _end_op(self, op):
        self._ops -= 1
        self._op_bytes -= op.end - op.start
        if op.error is not None:
            self.bitmap.mark_chunks(op.c0, op.c1)
        else:
            self.done_bytes += op.end - op.start
        self.locks.release(op.c0, op.c1)

    # -- ending ----------------------------------------------------------
    def drain(self, deadline):
        """Stop issuing and wait for in-flight requests, until `deadline`
        (time.monotonic()).  Returns True if nothing is left in flight."""
        self.issuing = False
        self._queue_back()
        while self._requests and time.monotonic() < deadline:
            self.pump(max(0.0, deadline - time.monotonic()))
        return not self._requests

    def _queue_back(self):
        """Give queued, unissued pieces back to the bitmap as dirty."""
        while self._queue:
            piece = self._queue.popleft()
            if piece.op.error is None:
                piece.op.error = CopyError("read", errno.ECANCELED, piece.offset)
            self._piece_finished(piece)

    def flush(self):
        """Flush the target.  Raises CopyError on failure."""
        try:
            self.writer.flush()
        except nbd.Error as e:
            raise CopyError("write", endpoints.errno_of(e), 0) from None
