"""The copier: moves dirty chunks from the source to the target.

It runs in the job's thread and talks to both endpoints through their aio
interface (endpoints.py): over an NBD connection the requests overlap, and
completions arrive from the thread polling that connection (nbdconn.py)
into `_done`, which the job thread reaps in pump().

Work comes in *ops*: a run of dirty chunks [c0, c1) taken from the bitmap.
An op is split into *pieces*, each one request: a read then a write
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
  * Every target write or zero that completed is recorded in `unflushed`
    (unflushed.py) until a target flush covers it; a lost connection marks
    those regions dirty again (target_lost()).
  * Bytes of data in flight never exceed buf-size (or one 4K piece when it
    is smaller): each read takes a buffer from a pool of at most buf-size /
    piece-size buffers, made when first needed and then reused.

Who calls what:
  * the job thread: scan, learn_target, pump, start/stop issuing, drain,
    abandon, start_flush, target_lost, set_speed, back_off, converged,
    busy, throttled;
  * any thread: wake, guest_wrote, progress;
  * a write-through guest write, for the chunks it holds:
    writing_through (before its target write is sent), written_through
    (once its source write succeeded), and unflushed.wrote() once its
    target write completed.
"""

import collections
import errno
import os
import threading
import time

from .chunklocks import ChunkLocks
from .endpoints import errno_of
from .extents import ExtentCache
from .ratelimit import RateLimit
from .targetzero import TargetZeroMap
from .unflushed import UnflushedMap

# Data pieces and coalesced data ops, at most.  nbdcopy's default too: a
# qemu-nbd target on a file takes 2 GiB in 256 KiB writes 1.2-1.4x faster
# than in 1 MiB writes (as many bytes in flight), and `nbdkit memory` the
# same within noise (2026-11-29, interleaved runs).
REQUEST_SIZE = 256 << 10
ZERO_REQUEST = 1 << 30      # a zero request, at most
MAX_REQUESTS = 64           # requests in flight, at most
ABANDON_GRACE = 1.0         # seconds abandon() waits for killed requests


class CopyError(Exception):
    """A failed request.  operation: "read" (the source) or "write" (the
    target), as BLOCK_JOB_ERROR names them."""

    def __init__(self, operation, err, offset, what=None):
        self.operation, self.errno, self.offset = operation, err, offset
        what = what or f"{operation} error at offset {offset}"
        super().__init__(f"{what}: {os.strerror(err)}")


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
    """Copies what the bitmap marks dirty (thread rules: module docstring).

    on_error(CopyError) is called in the job thread for every failed
    request; the job applies its error policy.  give_up() is asked while
    the job thread waits for block status: True abandons the wait.
    """

    def __init__(self, bitmap, source, target, *, sync="full",
                 buf_size=16 << 20, speed=0, target_is_zero=False,
                 on_error=None, locks=None, give_up=lambda: False):
        self.bitmap = bitmap
        self.source, self.target = source, target
        self.sync = sync
        self.size = bitmap.size
        self.shift = bitmap.shift
        self.target_is_zero = target_is_zero
        self.on_error = on_error or (lambda e: None)
        self._give_up = give_up
        depth = sync == "top"
        self._source_extents = \
            lambda off, n: source.extents(off, n, depth, give_up)
        self.cache = ExtentCache(self._source_extents)
        self.ratelimit = RateLimit(speed)
        # Data pieces fit buf-size: a pool of buf-size / piece bytes buffers.
        self._max_piece = max(4096, min(REQUEST_SIZE, buf_size) & ~4095)
        self._piece_size = self._max_piece
        self.set_speed(speed)
        self._buffers_left = max(1, buf_size // self._max_piece)
        self._free = []
        self._zero_view = memoryview(bytes(REQUEST_SIZE))
        self.locks = locks or ChunkLocks(bitmap.chunks)
        self.target_zero = TargetZeroMap(bitmap, target_is_zero)
        self.unflushed = UnflushedMap(bitmap)
        self._fast_zero = target.can_fast_zero
        self._queue = collections.deque()          # pieces not yet issued
        self._done = collections.deque()           # (piece, errno) completed
        self._event = threading.Event()            # set: something to reap
        self._ops = 0                              # live ops
        self._op_bytes = 0                         # bytes of live ops
        self._requests = 0                         # requests in flight
        self._cursor = 0
        self.done_bytes = 0      # progress: bytes copied or known done
        self.copied_bytes = 0    # data bytes written to the target
        self.zeroed_bytes = 0    # bytes zeroed on the target
        self._issuing = True     # False: let in-flight work drain, start none
        self._retry_at = 0.0     # after an ignored error, back off until then
        self._hurry = False      # ignore the speed limit

    # -- control (job thread) --------------------------------------------
    def set_speed(self, speed):
        self.ratelimit.set_speed(speed)
        # Small requests under a limit keep the rate smooth: ~20 per second.
        self._piece_size = self._max_piece if not speed else \
            max(4096, min(self._max_piece, (speed // 20) & ~4095))

    def start(self):
        """Issue new work again (after stop())."""
        self._issuing = True

    def stop(self):
        """Issue nothing new; what is in flight goes on and ends."""
        self._issuing = False

    def hurry(self, on):
        """Ignore the speed limit while `on` (guest I/O is held)."""
        self._hurry = on

    def _throttle(self):
        """Seconds to wait for the speed limit before the next request."""
        return 0.0 if self._hurry else self.ratelimit.delay()

    def back_off(self, seconds):
        """Issue nothing new for `seconds` (after an ignored error)."""
        self._retry_at = time.monotonic() + seconds

    @property
    def busy(self):
        """Ops in flight or queued."""
        return self._ops > 0

    @property
    def throttled(self):
        """Waiting for the speed limit, with nothing in flight."""
        return not self._requests and self._throttle() > 0

    def converged(self):
        return not self._ops and not self.bitmap.dirty_chunks

    # -- any thread ----------------------------------------------------------
    def wake(self):
        """Make pump() return soon."""
        self._event.set()

    def guest_wrote(self, offset, length):
        """A guest write to the source completed (or failed): the order
        matters, see extents.py."""
        self.cache.invalidate(offset, length)
        self.bitmap.mark(offset, length)

    def writing_through(self, offset, length):
        """A write-through guest write, holding the chunks of [offset,
        offset+length) in `locks`, is about to write the target: what the
        target held there is no longer known."""
        self.target_zero.forget(*self.bitmap.chunk_range(offset, length))

    def written_through(self, offset, length):
        """That write's source half succeeded: the source's extents there
        changed (a failed one goes through guest_wrote)."""
        self.cache.invalidate(offset, length)

    def progress(self):
        """(bytes done, bytes in flight)."""
        return self.done_bytes, self._op_bytes

    # -- the initial scan ------------------------------------------------
    def learn_target(self):
        """Note where the target reads as zero (full sync only).  Must run
        before anything but this copier writes the target (targetzero.py)."""
        if self.sync == "full" and self.size and not self.target_is_zero \
                and self.target.can_extents:
            self._scan_extents(
                lambda off, n: self.target.extents(off, n,
                                                   give_up=self._give_up),
                self.target_zero.learn)

    def scan(self):
        """Mark what this sync mode must copy.  Dirty tracking is already on,
        so a guest write during the scan is marked by the guest path; the scan
        only ever sets bits, never clears them."""
        if self.sync == "none" or not self.size:
            return
        self._scan_extents(self._source_extents, self._mark_from_source)

    def _scan_extents(self, fetch, apply):
        pos = 0
        while pos < self.size and not self._give_up():
            extents = fetch(pos, self.size - pos)
            if not extents:
                raise OSError(errno.EIO, f"no block status at offset {pos}")
            for e in extents:
                apply(e)
            pos = extents[-1].end

    def _mark_from_source(self, e):
        bm = self.bitmap
        c0, c1 = bm.chunk_range(e.start, e.end - e.start)
        if self.sync == "top":
            if e.depth == 1:
                bm.mark_chunks(c0, c1)
            return
        if not e.zero:
            bm.mark_chunks(c0, c1)
            return
        # Chunks wholly inside a zero extent that the target already reads
        # as zero: nothing to do, and they count as done.
        z0, z1 = self.target_zero.whole_chunks(e.start, e.end)
        for r0, r1, zero in self.target_zero.runs(z0, z1):
            if zero:
                self.done_bytes += bm.chunk_bytes(r0, r1)
            else:
                bm.mark_chunks(r0, r1)
        bm.mark_chunks(c0, max(c0, z0))
        bm.mark_chunks(max(z1, c0), c1)

    # -- the loop ----------------------------------------------------------
    def pump(self, timeout):
        """Reap completions, issue what may be issued, wait for something
        to happen.

        Returns after at most `timeout` seconds (None: until something
        happens).  Raises nothing for I/O errors: they go to on_error.
        """
        self._reap()
        self._issue()
        self._reap()
        if not self._done:
            self._event.wait(self._next_timeout(timeout))
        self._event.clear()      # before reaping: a later completion sets it
        self._reap()

    def _next_timeout(self, timeout):
        if self._issuing and (self._queue or self.bitmap.dirty_chunks):
            wait = max(self._throttle(), self._retry_at - time.monotonic())
            if wait > 0 and (timeout is None or wait < timeout):
                return wait
        return timeout

    # -- issuing -----------------------------------------------------------
    def _issue(self):
        while self._issuing and self._requests < MAX_REQUESTS:
            if time.monotonic() < self._retry_at:
                return
            if not self._queue:
                # Under a speed limit, wait before taking an op, not while
                # holding its chunks (write-throughs may wait for them).
                if self._throttle() > 0 or not self._new_op():
                    return
                continue         # the op may have needed no request at all
            piece = self._queue[0]
            if piece.kind == "read":
                buf = self._buffer()
                if buf is None or self._throttle() > 0:
                    if buf is not None:
                        self._free.append(buf)
                    return
                self._queue.popleft()
                piece.buf = buf
                self.ratelimit.consume(piece.length)
                self._requests += 1
                self._start(piece, self.source.aio_read,
                            memoryview(piece.buf)[:piece.length], piece.offset)
            else:
                self._queue.popleft()
                self._zero(piece)

    def _buffer(self):
        """A free data buffer, made on first need; None when buf-size
        bytes of them are all in flight."""
        if self._free:
            return self._free.pop()
        if self._buffers_left:
            self._buffers_left -= 1
            return bytearray(self._max_piece)
        return None

    def _start(self, piece, fn, *args):
        """Send one request; its completion lands in _done (any thread)."""
        def done(err):
            self._done.append((piece, err))
            self._event.set()
        fn(*args, done)

    def _zero(self, piece):
        """Make [offset, offset+length) read as zeroes on the target."""
        piece.kind = "zero"
        self._forget_target_zero(piece.offset, piece.length)
        self._requests += 1
        if self.target.zero_native:
            piece.fast = self._fast_zero
            self._start(piece, self.target.aio_zero, piece.length,
                        piece.offset, piece.fast)
        else:   # no WRITE_ZEROES: write zero buffers
            piece.kind = "write"
            self._start(piece, self.target.aio_write,
                        self._zero_view[:piece.length], piece.offset)

    def _forget_target_zero(self, offset, length):
        self.target_zero.forget(*self.bitmap.chunk_range(offset, length))

    def _target_reads_zero(self, offset, length):
        return self.target_zero.reads_zero(
            *self.bitmap.chunk_range(offset, length))

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
        except OSError:
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
        except OSError as e:
            op.error = CopyError("read", errno_of(e), start,
                                 f"block status at offset {start}")
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
            limit = ZERO_REQUEST if self.target.zero_native else REQUEST_SIZE
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
                self._fast_zero = False      # retry as a plain zero
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
            if not err and piece.kind in ("zero", "write"):
                # before the op releases its chunks (unflushed.py)
                self.unflushed.wrote(piece.offset, piece.length)
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
        self._forget_target_zero(piece.offset, n)
        self._requests += 1
        self._start(piece, self.target.aio_write, memoryview(piece.buf)[:n],
                    piece.offset)

    def _piece_failed(self, piece, err):
        operation = "read" if piece.kind == "read" else "write"
        e = CopyError(operation, err, piece.offset)
        if piece.op.error is None:
            piece.op.error = e
        if operation == "write":
            # What the target holds there is unknown now.
            self._forget_target_zero(piece.offset, piece.length)
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
        self._issuing = False
        self._queue_back()
        while self._requests and time.monotonic() < deadline:
            self.pump(max(0.0, deadline - time.monotonic()))
        return not self._requests

    def abandon(self):
        """For an abort, after drain(): end the target's requests in flight
        now (the target connection is killed), reap them, and leave any
        source read still in flight to finish on its own (its buffer is
        ours and stays alive).  Returns True if nothing is left."""
        self._issuing = False
        self._queue_back()
        if self._requests:
            self.target.abort()
            deadline = time.monotonic() + ABANDON_GRACE
            while self._requests and time.monotonic() < deadline:
                self.pump(max(0.0, deadline - time.monotonic()))
        return not self._requests

    def _queue_back(self):
        """Give queued, unissued pieces back to the bitmap as dirty."""
        while self._queue:
            piece = self._queue.popleft()
            if piece.op.error is None:
                piece.op.error = CopyError("read", errno.ECANCELED,
                                           piece.offset)
            self._piece_finished(piece)

    def start_flush(self, done):
        """Flush the target; done(errno) follows from any thread, and
        pump() returns once it did.  A flush that worked makes every target
        write completed before it durable (unflushed.py)."""
        gen = self.unflushed.flush_started()

        def flushed(err):
            self.unflushed.flush_done(gen, not err)
            done(err)
            self._event.set()
        self.target.aio_flush(flushed)

    def target_lost(self):
        """The target connection was lost: mark dirty again what the
        target may have lost with it (everything written since its last
        flush).  Returns the bytes marked."""
        marked = 0
        for c0, c1 in self.unflushed.lost():
            self.bitmap.mark_chunks(c0, c1)
            marked += self.bitmap.chunk_bytes(c0, c1)
        return marked
