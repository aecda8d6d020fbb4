"""Fakes for unit tests of the concurrent core (copier, job, guest path):
in-memory disks, no nbdkit, no qemu, no sockets.

FakeEndpoint is a disk in a bytearray behind the Endpoint interface
(nbdmirror/endpoints.py).  Its asynchronous requests do not complete by
themselves: each becomes a Request queued in a Scheduler, which the source
and the target share, so that one order covers both.  The test decides:

    sched = Scheduler(seed=1)
    src = FakeEndpoint(sched, data=..., name="src")
    tgt = FakeEndpoint(sched, size=..., name="tgt")
    ...                                  # the copier issues requests
    r = sched.wait_for("read")[0]        # or sched.pending("read")
    sched.complete(r)                    # or complete(r, err=errno.EIO)
    sched.complete_all("reverse")        # "fifo", "reverse", "random"

Completions may come from any thread: a Completer completes requests from
its own thread in a seeded random order, except those a `hold` predicate
keeps for the test.  Errors are injected per request, either when it
completes (complete(r, err=...)) or by a rule set up before it is issued
(ep.fail("write", errno.ENOSPC, times=1)).

Modes of an endpoint:
  * auto=True: every request completes at once, before aio_* returns
    (done() is called inside the call, as FileEndpoint does).
  * queue_sync=True: synchronous write-like requests and flushes (pwrite,
    zero, trim, flush: a write-through guest write on the target) queue like
    the asynchronous ones, and the calling thread waits for their completion
    (at most SYNC_TIMEOUT seconds, then ETIMEDOUT).  Otherwise they run at
    once.  Reads (pread) always run at once.
  * read_at="issue" (default): a read takes its data when it is issued and
    delivers it when it completes (a server whose reply is slow: the most
    stale answer possible); read_at="complete": when it completes.
  * A write or zero lands when it completes, taking the bytes from the
    caller's buffer then (so a buffer reused too early shows); a failed one
    leaves junk (0xEE) in its range, as nothing says what the disk holds
    after a failed write.
  * abort(), and close(): every request of this endpoint still pending
    completes now, with ENOTCONN (as a killed NBD connection), and later
    ones fail at once.

What the fakes record, for the tests' asserts:
  * ep.overlaps: (earlier, later) pairs of write-like requests (aio or sync
    write, zero, trim) to this endpoint whose ranges overlapped while both
    were in flight;
  * sched.max_data_in_flight: most bytes of copier data (asynchronous reads,
    and asynchronous writes from a read buffer) in flight at once;
  * sched.aliased: a request handed a buffer that a request still in flight
    was using;
  * ep.log: every completed request in completion order;
  * ep.durable: the disk as of the last successful flush (what the flush
    covers: the writes completed before it was issued); ep.flushes: the
    result (errno) of every flush.

Layout is the extent map of a disk (runs of data, zero, hole and allocation
depth); a FakeEndpoint answers extents() from it and keeps it up to date on
writes.  `ep.during_extents` runs a hook after an answer was computed and
before it is returned (a guest write racing a block-status request).

JobRig puts a real Job and GuestIO on two FakeEndpoints, with a Completer
answering what the test does not hold, and records events and what held at
READY and at the pivot (test_core_job.py shows its use).

Locking: every FakeEndpoint's state and the Scheduler's are guarded by
`sched.cond`; done() callbacks, before_done hooks and extents hooks run
without it, so the code under test may issue new requests from them.
"""

import dataclasses
import errno
import random
import threading
import time

from nbdmirror.endpoints import HOLE, ZERO, Extent
from nbdmirror.guest import GuestIO
from nbdmirror.job import Job
from nbdmirror.options import make_job_options

SYNC_TIMEOUT = 10.0      # a queued synchronous request waits at most this
JUNK = 0xEE              # what a failed write leaves behind
PILE_UP = 0.002          # a Completer lets requests pile up this long


class Layout:
    """Extent runs [start, end) with flags (HOLE, ZERO) and depth (1: the
    top layer allocates it; 0: unallocated; 2+: a backing layer), covering
    [0, size) without gaps.  `max_runs` caps the runs of one reply (a server
    may describe less than asked)."""

    def __init__(self, size, runs=None, max_runs=None):
        """runs: [(length, flags, depth)] in order, or None: all data."""
        self.size = size
        self.max_runs = max_runs
        self.runs = []
        pos = 0
        for length, flags, depth in runs or [(size, 0, 1)]:
            self.runs.append([pos, pos + length, flags, depth])
            pos += length
        assert pos == size, f"runs cover {pos} bytes, not {size}"

    @classmethod
    def from_data(cls, data, block=4096):
        """Zero blocks of `data` as holes, the rest as data (depth 1)."""
        runs, zero = [], bytes(block)
        for off in range(0, len(data), block):
            n = min(block, len(data) - off)
            flags = HOLE | ZERO if data[off:off + n] == zero[:n] else 0
            if runs and runs[-1][1] == flags:
                runs[-1][0] += n
            else:
                runs.append([n, flags, 1])
        return cls(len(data), [tuple(r) for r in runs])

    def set(self, start, end, flags=0, depth=1):
        """[start, end) is now one run with `flags` and `depth`."""
        end = min(end, self.size)
        if start >= end:
            return
        out = []
        for s, e, f, d in self.runs:
            if e <= start or s >= end:
                out.append([s, e, f, d])
                continue
            if s < start:
                out.append([s, start, f, d])
            if e > end:
                out.append([end, e, f, d])
        out.append([start, end, flags, depth])
        out.sort()
        merged = []
        for run in out:
            if merged and merged[-1][1] == run[0] and \
                    merged[-1][2:] == run[2:]:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        self.runs = merged

    def depth_at(self, offset):
        return next(d for s, e, f, d in self.runs if s <= offset < e)

    def ranges(self, pred):
        """[(start, end)] of the runs for which pred(flags, depth) holds."""
        return [(s, e) for s, e, f, d in self.runs if pred(f, d)]

    def extents(self, offset, count, depth=False):
        end = min(offset + count, self.size)
        out = []
        for s, e, f, d in self.runs:
            if e <= offset or s >= end:
                continue
            out.append(Extent(max(s, offset), min(e, end), f,
                              d if depth else 1))
            if self.max_runs and len(out) >= self.max_runs:
                break
        return out


class Request:
    """One request to a FakeEndpoint.  kind: read, write, zero, trim, flush.
    `err` is the errno it will complete with unless complete() says
    otherwise (set by a rule of ep.fail() when it was issued)."""

    def __init__(self, rid, ep, kind, offset, length, view, done, sync):
        self.id, self.ep, self.kind = rid, ep, kind
        self.offset, self.length, self.view = offset, length, view
        self.done, self.sync = done, sync
        self.err = 0
        self.result = None       # errno, once completed
        self.snapshot = None     # a read's data, taken at issue
        self.image = None        # a flush: the disk it covers
        self.fast = False
        self.counts_data = False
        self.event = threading.Event() if sync else None

    @property
    def end(self):
        return self.offset + self.length

    @property
    def writes(self):
        return self.kind in ("write", "zero", "trim")

    def overlaps(self, other):
        return self.offset < other.end and other.offset < self.end

    def __repr__(self):
        how = "sync " if self.sync else ""
        return (f"<{self.ep.name} {how}{self.kind} #{self.id} "
                f"[{self.offset}, {self.end})>")


def _matcher(match):
    """None: every request; a str: that kind; a FakeEndpoint: its requests;
    a tuple: all of them; else a predicate on a Request."""
    if match is None:
        return lambda r: True
    if isinstance(match, str):
        return lambda r: r.kind == match
    if isinstance(match, FakeEndpoint):
        return lambda r: r.ep is match
    if isinstance(match, tuple):
        preds = [_matcher(m) for m in match]
        return lambda r: all(p(r) for p in preds)
    return match


class Scheduler:
    """The requests of every FakeEndpoint made with it, and their order."""

    def __init__(self, seed=0):
        self.cond = threading.Condition()
        self.rng = random.Random(seed)
        self._pending = []               # in issue order
        self._ids = 0
        self.issued = 0
        self.data_in_flight = 0
        self.max_data_in_flight = 0
        self._buffers = {}               # id(buffer object) -> request
        self.aliased = []

    # -- what is pending ---------------------------------------------------
    def pending(self, match=None):
        pred = _matcher(match)
        with self.cond:
            return [r for r in self._pending if pred(r)]

    def wait_for(self, match=None, n=1, timeout=5.0):
        """Wait until at least n matching requests are pending; return the
        matching ones.  Raises AssertionError after `timeout` seconds."""
        pred = _matcher(match)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [r for r in self._pending if pred(r)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(got)} of {n} requests pending after "
                        f"{timeout}s: {self._pending}")
                self.cond.wait(left)

    # -- completing ----------------------------------------------------------
    def complete(self, req, err=None, before_done=None):
        """Complete `req` (a Request, or an index into pending()) with
        `err` (None: the errno it was issued with), from this thread.
        before_done() runs after the effect and before done() is called.
        Returns the errno it completed with."""
        with self.cond:
            if isinstance(req, int):
                req = self._pending[req]
            if req not in self._pending:
                raise AssertionError(f"{req} is not pending")
            self._pending.remove(req)
            result = req.err if err is None else err
            self._finish(req, result)
            self.cond.notify_all()
        if before_done is not None:
            before_done()
        self._call_done(req)
        return result

    def complete_all(self, order="fifo", match=None, err=None):
        """Complete the matching requests pending now: in issue order
        ("fifo"), newest first ("reverse") or shuffled ("random").
        Returns how many."""
        reqs = self.pending(match)
        if order == "reverse":
            reqs.reverse()
        elif order == "random":
            self.rng.shuffle(reqs)
        for r in reqs:
            self.complete(r, err)
        return len(reqs)

    def complete_some(self, match=None, k=None):
        """Complete a random subset (k of them, or a random number) of the
        matching pending requests, in random order.  Returns how many."""
        reqs = self.pending(match)
        if not reqs:
            return 0
        k = self.rng.randint(1, len(reqs)) if k is None else min(k, len(reqs))
        for r in self.rng.sample(reqs, k):
            self.complete(r)
        return k

    # -- for FakeEndpoint (self.cond held) -----------------------------------
    def _add(self, req):
        self._ids += 1
        req.id = self._ids
        self.issued += 1
        if req.counts_data:
            self.data_in_flight += req.length
            self.max_data_in_flight = max(self.max_data_in_flight,
                                          self.data_in_flight)
            key = id(req.view.obj)
            if key in self._buffers:
                self.aliased.append((self._buffers[key], req))
            self._buffers[key] = req
        self._pending.append(req)
        self.cond.notify_all()

    def _finish(self, req, result):
        req.result = result
        if req.counts_data:
            self.data_in_flight -= req.length
            if self._buffers.get(id(req.view.obj)) is req:
                del self._buffers[id(req.view.obj)]
        req.ep._effect(req, result)

    @staticmethod
    def _call_done(req):
        if req.sync:
            req.event.set()
        else:
            req.done(req.result)


class FakeEndpoint:
    """An in-memory disk with the Endpoint interface (module docstring)."""

    def __init__(self, sched, size=None, data=None, *, name="ep",
                 layout=None, auto=False, queue_sync=False, read_at="issue",
                 can_extents=True, zero_native=True, can_fast_zero=False,
                 has_depth=False, can_flush=True):
        self.sched = sched
        self.name = self.uri = name
        self.data = bytearray(data if data is not None else bytes(size))
        self.size = len(self.data)
        self.layout = layout or Layout(self.size)
        self.auto, self.queue_sync, self.read_at = auto, queue_sync, read_at
        self.can_write = True
        self.can_flush = can_flush
        self.can_trim = self.can_zero = True
        self.can_fua = self.can_multi_conn = False
        self.can_extents = can_extents
        self.can_fast_zero = can_fast_zero
        self.zero_native = zero_native
        self.has_depth = has_depth
        self.dead = None
        self.heal_delay = None           # heal(delay) was called
        self.closed = False
        self.durable = bytes(self.data)
        self.flushes = []                # errno of each flush, in order
        self.log = []                    # completed requests
        self.overlaps = []
        self.extents_calls = 0
        self.during_extents = None       # hook(offset, count), once
        self._rules = []                 # [pred, errno, times left or None]
        self._extent_errors = []
        self._writing = []               # write-like requests in flight

    def __repr__(self):
        return f"FakeEndpoint({self.name!r})"

    # -- set-up ----------------------------------------------------------
    def fail(self, match, err, times=1):
        """Requests issued from now on that match (see Scheduler.pending)
        complete with `err`, `times` of them (None: all)."""
        with self.sched.cond:
            self._rules.append([_matcher(match), err, times])

    def fail_extents(self, err, times=1):
        with self.sched.cond:
            self._extent_errors.extend([err] * times)

    def pending(self, match=None):
        return self.sched.pending((self, _matcher(match)))

    # -- asynchronous requests ------------------------------------------------
    def start_io(self):
        pass

    def heal(self, delay):
        """As NbdEndpoint.heal(): here only noted."""
        self.heal_delay = delay

    def aio_read(self, view, offset, done):
        self._submit("read", offset, len(view), view, done)

    def aio_write(self, view, offset, done):
        self._submit("write", offset, len(view), view, done)

    def aio_zero(self, count, offset, fast, done):
        if fast and not self.can_fast_zero:
            return done(errno.ENOTSUP)
        self._submit("zero", offset, count, None, done, fast=fast)

    def aio_flush(self, done):
        if not self.can_flush:
            return done(0)
        self._submit("flush", 0, 0, None, done)

    # -- synchronous requests -------------------------------------------------
    def pread(self, buf, offset):
        with self.sched.cond:
            self._check_alive()
            buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf, offset, fua=False):
        self.pwrite_during(None, buf, offset, fua)

    def pwrite_during(self, meanwhile, buf, offset, fua=False):
        self._sync("write", offset, len(buf), memoryview(bytes(buf)),
                   meanwhile)

    def zero(self, count, offset, may_trim=False, fua=False, fast=False):
        if fast and not self.can_fast_zero:
            raise OSError(errno.ENOTSUP, "fast zero not supported")
        self.zero_during(None, count, offset, may_trim, fua)

    def zero_during(self, meanwhile, count, offset, may_trim=False,
                    fua=False):
        self._sync("zero", offset, count, None, meanwhile)

    def trim(self, count, offset, fua=False):
        self._sync("trim", offset, count, None)

    def flush(self):
        self._sync("flush", 0, 0, None)

    def extents(self, offset, count, depth=False, give_up=None):
        with self.sched.cond:
            self._check_alive()
            self.extents_calls += 1
            if self._extent_errors:
                err = self._extent_errors.pop(0)
                raise OSError(err, f"{self.name}: block status failed")
            answer = self.layout.extents(offset, count, depth)
            hook, self.during_extents = self.during_extents, None
        if hook is not None:
            hook(offset, count)          # the answer above may be stale now
        return answer

    # -- the end --------------------------------------------------------------
    def abort(self, reason="aborted"):
        """As a killed connection: what is in flight fails now, with
        ENOTCONN, and so does every later request."""
        with self.sched.cond:
            self.dead = self.dead or reason
        for r in self.sched.pending(self):
            try:
                self.sched.complete(r, errno.ENOTCONN)
            except AssertionError:
                pass                 # completed meanwhile by another thread

    def close(self):
        """As NbdEndpoint.close(): what is still in flight is killed."""
        self.closed = True
        self.abort("closed")

    # -- internals ------------------------------------------------------------
    def _check_alive(self):
        if self.dead is not None:
            raise OSError(errno.ENOTCONN, f"{self.name}: {self.dead}")

    def _make(self, kind, offset, length, view, done, sync, now,
              fast=False):
        """A new request, issued (self.sched.cond held); completed at once
        (done() not yet called) if `now`."""
        r = Request(0, self, kind, offset, length, view, done, sync)
        r.fast = fast
        for rule in self._rules:
            pred, err, times = rule
            if (times is None or times > 0) and pred(r):
                r.err = err
                if times is not None:
                    rule[2] -= 1
                break
        r.counts_data = not sync and (
            kind == "read" or (kind == "write" and
                               isinstance(view.obj, bytearray)))
        if kind == "read" and self.read_at == "issue":
            r.snapshot = bytes(self.data[offset:offset + length])
        if kind == "flush":
            r.image = bytes(self.data)
        if r.writes:
            self.overlaps.extend((w, r) for w in self._writing
                                 if w.overlaps(r))
            self._writing.append(r)
        self.sched._add(r)
        if now:
            self.sched._pending.remove(r)
            self.sched._finish(r, r.err)
        return r

    def _submit(self, kind, offset, length, view, done, fast=False):
        with self.sched.cond:
            if self.dead is not None:
                r = None
            else:
                r = self._make(kind, offset, length, view, done, False,
                               self.auto, fast)
        if r is None:
            return done(errno.ENOTCONN)
        if self.auto:
            done(r.result)

    def _sync(self, kind, offset, length, view, meanwhile=None):
        """A synchronous request: completed at once, or (queue_sync) when
        the test completes it; meanwhile() runs once it is issued, before
        it is waited for, as NbdEndpoint's do (there too it runs when the
        request fails at once, the connection being dead)."""
        now = self.auto or not self.queue_sync
        try:
            with self.sched.cond:
                self._check_alive()
                r = self._make(kind, offset, length, view, None, True, now)
        except OSError:
            if meanwhile is not None:
                meanwhile()
            raise
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            if not now and not r.event.wait(SYNC_TIMEOUT):
                raise OSError(errno.ETIMEDOUT, f"{self.name}: {r} timed out")
        if r.result:
            raise OSError(r.result, f"{self.name}: {r} failed")

    def _effect(self, r, err):
        """What a completing request does to the disk (sched.cond held)."""
        if r.writes:
            self._writing.remove(r)
        self.log.append(r)
        end = r.offset + r.length
        if r.kind == "read":
            if err:
                r.view[:] = bytes([0xA5]) * r.length
            elif r.snapshot is not None:
                r.view[:] = r.snapshot
            else:
                r.view[:] = self.data[r.offset:end]
        elif r.kind == "flush":
            self.flushes.append(err)
            if not err:
                self.durable = r.image
        elif err:
            self.data[r.offset:end] = bytes([JUNK]) * r.length
            self.layout.set(r.offset, end, 0, 1)
        elif r.kind == "write":
            self.data[r.offset:end] = r.view
            self.layout.set(r.offset, end, 0, 1)
        else:                            # zero, trim
            self.data[r.offset:end] = bytes(r.length)
            self.layout.set(r.offset, end,
                            ZERO | (HOLE if r.kind == "trim" else 0), 1)


class Completer:
    """Completes requests from its own thread until stopped: each time a
    few are pending (or none came for a moment), it picks one, with `rng`,
    the oldest, the newest or any (`order`: "random", "fifo", "lifo" or
    "mixed", which switches between those at random).  Requests for which
    hold(r) is true are left to the test.  A context manager."""

    def __init__(self, sched, seed=0, order="mixed", hold=None, batch=4):
        self.sched = sched
        self.rng = random.Random(seed)
        self.order = order
        self.hold = hold or (lambda r: False)
        self.batch = batch
        self.completed = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="fake-completer")
        self.error = None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._thread.ident is None:
            return                       # never started
        with self.sched.cond:
            self._stop = True
            self.sched.cond.notify_all()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the completer did not stop"
        if self.error is not None:
            raise self.error

    def _pick(self, ready):
        order = self.order
        if order == "mixed":
            order = self.rng.choice(("random", "fifo", "lifo", "lifo"))
        if order == "fifo":
            return ready[0]
        if order == "lifo":
            return ready[-1]
        return self.rng.choice(ready)

    def _run(self):
        sched = self.sched
        try:
            while True:
                with sched.cond:
                    since = None
                    while True:
                        if self._stop:
                            return
                        ready = [r for r in sched._pending
                                 if not self.hold(r)]
                        if len(ready) >= self.batch:
                            break
                        # Let a few pile up for at most PILE_UP seconds, so
                        # that they can be reordered (pacing, not a
                        # synchronisation: any one would do).
                        now = time.monotonic()
                        if ready and since is None:
                            since = now
                        if since is not None and now - since >= PILE_UP:
                            break
                        # (The hold predicate may change: look again.)
                        sched.cond.wait(PILE_UP if since else 0.05)
                    r = self._pick(ready)
                try:
                    sched.complete(r)
                    self.completed += 1
                except AssertionError:
                    pass                 # completed by the test meanwhile
        except BaseException as e:      # noqa: BLE001 - reported by stop()
            self.error = e


_NO_ZERO = bytes([1]) + bytes(range(1, 256))


def noise(n, seed):
    """n bytes of seeded random data, none of them zero."""
    return random.Random(seed).randbytes(n).translate(_NO_ZERO)


class JobRig:
    """A Job between two fake endpoints, with a real GuestIO on the source,
    and a Completer that completes every request except those the test
    holds: kinds in `hold` (a set the test may change), and any request to
    the target while hold_target is set.

    Events are recorded in `events` [(name, data)]; at BLOCK_JOB_READY and
    at the pivot (the guest's backend switch) `ready_facts` / `pivot_facts`
    note what held then.  close() ends the job (force cancel) and the
    completer, bounded."""

    def __init__(self, size=1 << 20, seed=0, *, hold=(), order="mixed",
                 src_data=None, queue_sync=False, **opts):
        self.sched = Scheduler(seed)
        data = noise(size, seed) if src_data is None else src_data
        self.src = FakeEndpoint(self.sched, data=data, name="src")
        self.tgt = FakeEndpoint(self.sched, data=bytes([0x55]) * len(data),
                                name="tgt", queue_sync=queue_sync)
        self.guest = GuestIO(self.src)
        self.hold = set(hold)
        self.hold_target = False
        self.completer = Completer(
            self.sched, seed, order=order,
            hold=lambda r: r.kind in self.hold or
            (self.hold_target and r.ep is self.tgt))
        fields = dict(granularity=64 << 10, buf_size=1 << 20)
        fields.update(opts)
        self.opts = dataclasses.replace(
            make_job_options({"target": "nbd://fake"}), **fields)
        self.cond = threading.Condition()
        self.events = []
        self.ready_facts = []
        self.pivot_facts = []
        self.job = Job(self.opts, self.guest, self.src, self.tgt, self.emit)
        switch = self.guest.switch_backend

        def switch_backend(backend):
            self.pivot_facts.append(self._facts())
            return switch(backend)
        self.guest.switch_backend = switch_backend

    def _facts(self):
        c = self.job.copier
        return {"dirty": self.job.bitmap.dirty_chunks,
                "in_flight": c.progress()[1], "busy": c.busy,
                "durable": self.tgt.durable == self.src.data,
                "flushes": list(self.tgt.flushes),
                "gate_closed": self.guest.gate.closed}

    def emit(self, event, data):
        if event == "BLOCK_JOB_READY":
            self.ready_facts.append(self._facts())
        with self.cond:
            self.events.append((event, data))
            self.cond.notify_all()

    # -- the test's side ------------------------------------------------------
    def start(self):
        self.completer.__enter__()
        self.job.start()
        return self

    def names(self):
        with self.cond:
            return [e for e, _ in self.events]

    def statuses(self):
        with self.cond:
            return [d["status"] for e, d in self.events
                    if e == "JOB_STATUS_CHANGE"]

    def wait_event(self, name, timeout=5.0, pred=None):
        """The data of the first event `name` (for which pred(data))."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e, d in self.events:
                    if e == name and (pred is None or pred(d)):
                        return d
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {name} after {timeout}s: "
                                         f"{[e for e, _ in self.events]}")
                self.cond.wait(left)

    def wait_status(self, status, timeout=5.0):
        return self.wait_event("JOB_STATUS_CHANGE", timeout,
                               lambda d: d["status"] == status)

    def flush(self, timeout=5.0):
        """The next flush the job sends to the target (hold "flush")."""
        return self.sched.wait_for(("flush", self.tgt), timeout=timeout)[0]

    def ended(self, timeout=5.0):
        assert self.job.wait(timeout), "the job did not end"

    def close(self):
        try:
            if not self.job.wait(0) and self.job._thread.is_alive():
                self.hold.clear()
                self.hold_target = False
                try:
                    self.job.cancel(force=True)
                except Exception:       # noqa: BLE001 - ending anyway
                    pass
                assert self.job.wait(10), "the job did not end"
        finally:
            self.completer.stop()


def poll(cond, timeout=5.0, what="condition"):
    """Wait until cond() is true, checking every millisecond or so; raises
    AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)
