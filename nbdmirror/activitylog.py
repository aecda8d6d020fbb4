"""The activity log: keeps the bitmap file's marks ahead of the guest, cheaply.

The rule (R) this module keeps, for what is durable in the file at every
moment (so after a crash or a power loss too):

    a chunk's mark is clear only if the target holds, flushed, what the
    source holds, flushed, there, and no guest write to it is in progress.

How (as DRBD's activity log, over REGION-byte regions):

  * Guest writes (before_write / after_write, guest threads).  Before a
    guest request changes the source, every region it touches must be
    *full*: all its chunks marked in the file, and synced.  A full region
    costs nothing more (no write, no sync); an unmarked one is marked (one
    pwrite) and synced.  Writers that need a sync at the same time share it
    (group commit): whoever syncs, syncs for every mark written before it
    began, and the others wait for it.  A writer that looks sequential (it
    enters a region after the one before it) gets MARK_AHEAD more regions
    marked in the same sync.  While a request is in progress its regions
    count it in `_active`.
  * Clearing (flush_started / flushed, the job thread, around a flush of
    the target and one of the source).  A target flush makes durable every
    copy that completed before it was sent, and the source flush what those
    copies read (a guest's unflushed write that a power loss of the
    source's host would take back, while the target kept it).  So a region
    is cleared in the file after both flushes succeeded if,
    from before the flush was sent until now, no guest request was in
    progress in it or began in it (`_touched` counts them), nothing in it
    was dirty in memory and no copy of it was in flight (its chunks held in
    `locks`), and it is cold: not written for COOL_AFTER seconds, or not
    among the MAX_HOT regions written last.  A warm region stays marked, so
    a guest that keeps writing there pays no sync.  A clear is written but
    not synced: losing one only costs a copy.  Nothing is cleared before
    the initial scan has marked what the job must copy (`scanned`).
  * Checkpoints: the job asks checkpoint_due() and then flushes target and
    source (job.Job._checkpoint), alongside the copy, every checkpoint_bytes
    copied (1/64 of the disk, 4M to 256M) or CHECKPOINT_INTERVAL seconds
    while something may be cleared (a region marked that is not warm, or
    one cooling), so that a crash re-copies little.
  * The end (job_ended): a pivot is recorded, synced, before the guest is
    switched (pivoting) and after (pivoted); a cancel or a failure leaves
    its state.  A clean shutdown (suspend, then the job's end) flushes the
    target and writes the exact in-memory bitmap, state still active; and
    since guests may write until the proxy closes, the log goes on marking
    their regions (the job stays the guest path's tracker: job.Job.run)
    until close().

Threads: `_lock` guards every field and orders every write to the file;
`_cond` (same lock) lets writers wait for a sync, which runs without it.
Lock order: `_lock`, then the bitmap's and the chunk locks' own.

A job without --bitmap gets NO_LOG, whose hooks do nothing.
"""

import collections
import itertools
import os
import threading
import time

from bitarray import bitarray

from . import bitmapfile
from .bitmapfile import (ACTIVE, CANCELLED, FAILED, PIVOTED, PIVOTING,
                         SWITCHED, BitmapFileError)
from .endpoints import display_uri
from .options import is_nbd_uri
from .sizes import to_bytes

REGION = 4 << 20            # bytes per region (DRBD's activity log extent)
MAX_HOT = 1024              # regions kept marked while written, at most...
COOL_AFTER = 5.0            # ... and only while written this recently
MARK_AHEAD = 8              # regions marked ahead of a sequential writer
CHECKPOINT_INTERVAL = 1.0   # s between checkpoint flushes, at least...
CHECKPOINT_MIN_BYTES = 4 << 20      # ... unless this many bytes were copied
CHECKPOINT_MAX_BYTES = 256 << 20
MAX_EXAMINE = 4096          # regions looked at per checkpoint, at most
LOOK_INTERVAL = 0.01        # s between looks for a checkpoint, at least
SAVE_FLUSH_TIMEOUT = 2.0    # s a clean shutdown waits for each flush

# A knob for tests and tuning, not an option: NBDMIRROR_ACTIVITY_LOG=
# "region=256K,hot=8,cool=0.2,interval=0.1,checkpoint=1M" overrides the
# values above in the proxy's process (the crash tests use small regions
# that cool fast, so that a short run clears and marks regions again).
_KNOBS = {"region": ("REGION", to_bytes), "hot": ("MAX_HOT", int),
          "cool": ("COOL_AFTER", float), "ahead": ("MARK_AHEAD", int),
          "interval": ("CHECKPOINT_INTERVAL", float),
          "checkpoint": ("CHECKPOINT_MIN_BYTES", to_bytes)}


def _tune(spec):
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in _KNOBS:
            raise ValueError(f"NBDMIRROR_ACTIVITY_LOG: unknown {key!r} "
                             f"(knows {', '.join(_KNOBS)})")
        name, parse = _KNOBS[key.strip()]
        globals()[name] = parse(value.strip())


_tune(os.environ.get("NBDMIRROR_ACTIVITY_LOG", ""))


def spec_name(spec):
    """How a source or target is named in the file: a real path, or a URI
    in display form (no secrets)."""
    return display_uri(spec) if is_nbd_uri(spec) else os.path.realpath(spec)


def endpoint_name(endpoint):
    path = getattr(endpoint, "path", None)
    return os.path.realpath(path) if path else endpoint.uri


def job_identity(job_opts, source, target_spec):
    """What the bitmap file of this job must match."""
    return bitmapfile.identity(
        source.size, job_opts.granularity, job_opts.sync,
        endpoint_name(source), spec_name(target_spec), job_opts.job_id)


def prepare(bfile, ident, discard=False, resume_ok=True):
    """The activity log of a job over the open, locked `bfile`: resumed from
    its marks when it is this job's (same identity, state active, intact),
    else refused with the reason, or with `discard` made anew (a full
    copy).  `resume_ok` False: a file to resume is refused too (the guest
    wrote while nothing tracked it).  A file that says the guest was
    switched to the target is never discarded here: the caller serves the
    target instead (Proxy.preflight)."""
    why = bfile.problem
    if why is None and bfile.header is not None:
        state = bfile.state
        if state in SWITCHED:
            raise bfile.error(f"the job in it pivoted to the target "
                              f"{bfile.header.get('target')}; the source is "
                              "stale (serve the target: start with this "
                              "bitmap and that target)")
        if state != ACTIVE:
            why = f"the job in it ended ({state}); the target is out of date"
        else:
            why = bfile.mismatch(ident)
        if why is None and not resume_ok:
            why = ("the guest wrote since this proxy started, untracked: "
                   "cannot resume")
        if why is None:
            try:
                return ActivityLog(bfile, bfile.load(), resumed=True)
            except BitmapFileError:
                if not discard:
                    raise
    if why is not None and not discard:
        raise bfile.error(why, hint=True)
    chunks = (ident["size"] + ident["granularity"] - 1) // ident["granularity"]
    image = bitmapfile.new_image(chunks, ident["sync"] != "none")
    bfile.create(ident, image)
    return ActivityLog(bfile, image, resumed=False)


class NoLog:
    """The hooks of a job without a persistent bitmap: nothing to do."""
    resumed = False
    persistent = False
    suspended = False

    def attach(self, bitmap, locks):
        pass

    def before_write(self, offset, length):
        pass

    def after_write(self, offset, length):
        pass

    def scanned(self):
        pass

    def checkpoint_due(self, done_bytes):
        return False

    def flush_started(self, done_bytes=None):
        return None

    def flushed(self, token):
        pass

    def pivoting(self):
        pass

    def pivoted(self):
        pass

    def suspend(self):
        pass

    def job_ended(self, outcome, target, source):
        pass

    def close(self):
        pass


NO_LOG = NoLog()


class ActivityLog(NoLog):
    """The persistent side of one job's dirty bitmap (module docstring)."""
    persistent = True

    def __init__(self, bfile, image, resumed):
        self.file = bfile
        self.path = bfile.path
        h = bfile.header
        self.size, self.granularity = h["size"], h["granularity"]
        self.shift = self.granularity.bit_length() - 1
        self.chunks = bfile.chunks
        self.region_shift = max(self.shift, REGION.bit_length() - 1)
        self.region_chunks = 1 << (self.region_shift - self.shift)
        self.regions = (self.chunks + self.region_chunks - 1) // \
            self.region_chunks
        self.resumed = resumed
        self.image = image                  # the marks as written
        self.marked = bitarray(self.regions)    # any mark in the region
        self.full = bitarray(self.regions)      # every chunk marked
        for r in range(self.regions):
            c0, c1 = self._chunks(r)
            n = image.count(1, c0, c1)
            self.marked[r] = n > 0
            self.full[r] = n == c1 - c0
        self.bitmap = self.locks = None
        self.checkpoint_bytes = min(CHECKPOINT_MAX_BYTES, max(
            CHECKPOINT_MIN_BYTES, self.size // 64))
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._active = {}           # region: guest requests in progress
        self._touched = {}          # region: _seq of the last one begun
        self._recent = collections.OrderedDict()   # region: when, oldest 1st
        self._pending = {}          # region: write generation not yet synced
        self._seq = 0               # guest requests begun
        self._written = 0           # write generations (marking pwrites)
        self._synced = 0            # generations known durable
        self._syncing = False
        self._sync_failed = None    # (generation, OSError) of a failed sync
        self._scanned = resumed     # a resumed job has no scan
        self._ended = False
        self._suspended = False
        self._cursor = 0            # where the next checkpoint looks first
        self._ck_time = time.monotonic()
        self._ck_done = 0
        self._ck_fresh = True       # nothing was ever cleared: look
        self._next_look = 0.0       # checkpoint_due looks again then
        self.syncs = 0              # for tests and the benchmark
        self.cleared = 0            # regions cleared

    def _chunks(self, r):
        c0 = r * self.region_chunks
        return c0, min(c0 + self.region_chunks, self.chunks)

    def _regions(self, offset, length):
        end = min(offset + length, self.size)
        if offset >= end:
            return 0, 0
        shift = self.region_shift
        return offset >> shift, ((end - 1) >> shift) + 1

    # -- the job's bitmap -----------------------------------------------------
    def attach(self, bitmap, locks):
        """The job's in-memory bitmap and chunk locks; a resumed job's
        bitmap starts as the file's marks."""
        self.bitmap, self.locks = bitmap, locks
        if self.resumed:
            bitmap.load(self.image[:self.chunks])

    def scanned(self):
        """The initial scan marked what the job must copy: clearing may
        start."""
        with self._lock:
            self._scanned = True

    # -- guest threads --------------------------------------------------------
    def before_write(self, offset, length):
        """Before a data-changing guest request reaches the source: returns
        once its regions are durably marked.  Raises OSError (and counts
        nothing) if they cannot be: the request must then fail."""
        r0, r1 = self._regions(offset, length)
        if r0 == r1:
            return
        now = time.monotonic()
        active, touched, recent = self._active, self._touched, self._recent
        with self._lock:
            if self._ended:
                return
            self._seq += 1
            seq = self._seq
            for r in range(r0, r1):
                active[r] = active.get(r, 0) + 1
                touched[r] = seq
                recent[r] = now
                recent.move_to_end(r)
            if not self._pending and not self.full.count(0, r0, r1):
                return                  # the common case: hot already
            try:
                self._wait_synced(self._mark(r0, r1))
            except BaseException:
                self._release(r0, r1)
                raise

    def after_write(self, offset, length):
        """After the request ended (also when it failed), its dirty bits
        set (job.Job.guest_wrote)."""
        r0, r1 = self._regions(offset, length)
        with self._lock:
            self._release(r0, r1)

    def _release(self, r0, r1):
        active = self._active
        for r in range(r0, r1):
            n = active.get(r, 0) - 1
            if n > 0:
                active[r] = n
            else:
                active.pop(r, None)

    def _mark(self, r0, r1):
        """With `_lock`: make regions [r0, r1) full in the file; return the
        write generation that must be synced first (0: none)."""
        need = 0
        for r in range(r0, r1):
            g = self._pending.get(r)
            if g is not None:
                if g <= self._synced:
                    del self._pending[r]
                else:
                    need = max(need, g)
        if not self.full.count(0, r0, r1):
            return need
        ahead = self._ahead(r0, r1)
        cold = [r for r in range(r0, ahead) if not self.full[r]]
        c0, c1 = self._chunks(cold[0])[0], self._chunks(cold[-1])[1]
        for r in cold:
            a, b = self._chunks(r)
            self.image[a:b] = 1
        self.file.write_chunks(self.image, c0, c1)     # may raise
        self._written += 1
        now = time.monotonic()
        for r in cold:
            self.full[r] = self.marked[r] = 1
            self._pending[r] = self._written
            if r >= r1:                 # marked ahead: warm, not written
                self._recent[r] = now
        return self._written

    def _ahead(self, r0, r1):
        """Where marking stops: past r1 by MARK_AHEAD regions when the
        writes look sequential (the region before r0 was written lately),
        so that a sequential writer pays one sync per MARK_AHEAD + 1
        regions, not one per region."""
        prev = self._recent.get(r0 - 1)
        if prev is None or time.monotonic() - prev >= COOL_AFTER:
            return r1
        return min(self.regions, r1 + MARK_AHEAD)

    def _wait_synced(self, need):
        """With `_lock`: until generation `need` is durable (group commit)."""
        while self._synced < need:
            failed = self._sync_failed
            if failed is not None and need <= failed[0]:
                raise failed[1]
            if self._syncing:
                self._cond.wait()
                continue
            self._syncing = True
            upto = self._written
            self._lock.release()
            error = None
            try:
                self.file.sync()
            except OSError as e:
                error = e
            finally:
                self._lock.acquire()
                self._syncing = False
                self._cond.notify_all()
            self.syncs += 1
            if error is not None:
                # What the failed sync covered is unknown on disk now: those
                # regions must be marked (and synced) again.
                self._sync_failed = (upto, error)
                for r, g in list(self._pending.items()):
                    if g <= upto:
                        self.full[r] = 0
                        del self._pending[r]
                raise error
            self._synced = max(self._synced, upto)

    # -- the job thread: checkpoints ------------------------------------------
    def checkpoint_due(self, done_bytes):
        """Time for a checkpoint flush (see the module docstring)?  Looked
        at most every LOOK_INTERVAL: the job thread asks at every turn of
        its loop, and guest requests wait for `_lock` meanwhile."""
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_INTERVAL
        with self._lock:
            if not self._scanned or self._ended or not self.marked.any():
                return False
            if self._ck_fresh:
                return True         # what the scan left unmarked
            # Copies help only where a region may be cleared: marked but
            # not warm (a guest writing hot regions gains nothing from a
            # flush now, and a source flush would cost it).
            progressed = done_bytes - self._ck_done > 0 and \
                self.marked.count() > len(self._recent)
            if progressed and done_bytes - self._ck_done >= \
                    self.checkpoint_bytes:
                return True
            if time.monotonic() - self._ck_time < CHECKPOINT_INTERVAL:
                return False
            return progressed or self._cooling()

    def _cooling(self):
        """With `_lock`: a region written once may be cold now."""
        if len(self._recent) > MAX_HOT:
            return True
        if not self._recent:
            return False
        oldest, when = next(iter(self._recent.items()))
        return time.monotonic() - when >= COOL_AFTER

    def flush_started(self, done_bytes=None):
        """Just before a target flush is sent: a token for flushed().
        The regions it names were clean when it was taken: not written
        since `seq`, not written then, nothing dirty, nothing in flight."""
        with self._lock:
            if not self._scanned or self._ended:
                return None
            self._ck_time = time.monotonic()
            if done_bytes is not None:
                self._ck_done = done_bytes
            self._ck_fresh = False
            seq = self._seq
            regions = [r for r in self._marked_regions()
                       if r not in self._active]
        # Looked at after `seq` was taken: a request begun since shows in
        # _touched; one that ended since left its bits dirty or a copy
        # that either is in flight now or completed before the flush.
        return seq, [r for r in regions if self._clean(r)]

    def _marked_regions(self):
        """Up to MAX_EXAMINE marked regions, from the cursor, wrapping."""
        out, start = [], self._cursor
        for lo, hi in ((start, self.regions), (0, start)):
            pos = lo
            while pos < hi and len(out) < MAX_EXAMINE:
                r = self.marked.find(1, pos, hi)
                if r < 0:
                    break
                out.append(r)
                pos = r + 1
            if len(out) >= MAX_EXAMINE:
                self._cursor = pos % self.regions
                return out
        return out

    def _clean(self, r):
        c0, c1 = self._chunks(r)
        return not self.bitmap.count_dirty(c0, c1) and \
            not self.locks.any_held(c0, c1)

    def flushed(self, token):
        """The flushes (target and source) sent after flush_started()
        returned `token` succeeded: clear what may be cleared (written, not
        synced)."""
        if token is None:
            return
        seq0, candidates = token
        now = time.monotonic()
        with self._lock:
            if self._ended:
                return
            excess = len(self._recent) - MAX_HOT
            crowded = set(itertools.islice(self._recent, excess)) \
                if excess > 0 else ()
            runs = []
            for r in candidates:
                if r in self._active or self._touched.get(r, 0) > seq0 or \
                        not self._clean(r):
                    continue
                when = self._recent.get(r)
                if when is not None and now - when < COOL_AFTER and \
                        r not in crowded:
                    continue                    # warm: keep it marked
                c0, c1 = self._chunks(r)
                self.image[c0:c1] = 0
                self.marked[r] = self.full[r] = 0
                self._pending.pop(r, None)
                self._recent.pop(r, None)
                self._touched.pop(r, None)
                self.cleared += 1
                if runs and runs[-1][1] == c0:
                    runs[-1][1] = c1
                else:
                    runs.append([c0, c1])
            for c0, c1 in runs:
                self.file.write_chunks(self.image, c0, c1)

    # -- the job's end --------------------------------------------------------
    def pivoting(self):
        """With the guest held, source and target equal and flushed: from
        now on a restart must serve the target.  Durable on return."""
        with self._lock:
            self.file.set_state(PIVOTING)

    def pivoted(self):
        """The guest is on the target.  A failure to record it changes
        nothing: "pivoting" already makes a restart serve the target."""
        with self._lock:
            try:
                self.file.set_state(PIVOTED)
            except OSError:
                pass

    def suspend(self):
        """A clean shutdown: the job's end is not final, the file stays
        resumable with the exact bitmap (job_ended)."""
        with self._lock:
            self._suspended = True

    @property
    def suspended(self):
        return self._suspended

    def job_ended(self, outcome, target, source):
        """The job thread, after the job's last copy, before it lets the
        target go.  outcome: "pivoted", "cancelled" or "failed"; after
        suspend() the file stays active instead, with the exact bitmap if
        target and source could be flushed (else the marks stay: a
        superset)."""
        with self._lock:
            if self._ended:
                return
            suspended = self._suspended and outcome != "pivoted"
            self._ended = not suspended     # suspended: guests still marked
        if outcome == "pivoted":
            return                          # recorded; kept until close()
        try:
            if suspended:
                if _flush(target, SAVE_FLUSH_TIMEOUT) and \
                        _flush(source, SAVE_FLUSH_TIMEOUT):
                    self._save_exact()
                return                      # marking until close()
            with self._lock:
                self.file.set_state(CANCELLED if outcome == "cancelled"
                                    else FAILED)
        except OSError:
            pass        # the marks in the file are still a superset
        if not suspended:
            self.close()

    def _save_exact(self):
        """The in-memory bitmap, chunks in flight and regions a guest
        request is still in, durably.  Then a region is full (a guest
        request there needs no mark) only if every chunk of it is marked."""
        with self._lock:
            image = bitmapfile.new_image(self.chunks)
            bits = self.bitmap.snapshot() | self.locks.snapshot()
            image[:self.chunks] = bits
            for r in self._active:
                c0, c1 = self._chunks(r)
                image[c0:c1] = 1
            self.image = image
            for r in range(self.regions):
                c0, c1 = self._chunks(r)
                n = image.count(1, c0, c1)
                self.marked[r] = n > 0
                self.full[r] = n == c1 - c0
            self.file.write_chunks(image, 0, self.chunks)
            self.file.sync()
            self._pending.clear()
            self._synced = self._written

    def dirty_marks(self):
        """Chunks marked in the file (for tests and diagnostics)."""
        with self._lock:
            return self.image.count(1, 0, self.chunks)

    def close(self):
        with self._lock:
            self._ended = True
            self.file.close()


def _flush(endpoint, timeout):
    """Flush `endpoint`, bounded: True if it succeeded."""
    done, result = threading.Event(), []

    def flushed(err):
        result.append(err)
        done.set()
    try:
        endpoint.aio_flush(flushed)
    except Exception:           # noqa: BLE001 - a dead endpoint: no flush
        return False
    return done.wait(timeout) and result[0] == 0
