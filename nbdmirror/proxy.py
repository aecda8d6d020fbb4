"""One served disk: the guest path, at most one job, and the control socket.

The plugin creates a Proxy in config_complete() (before nbdkit forks), calls
preflight() there so that bad input stops nbdkit before anything is served,
and start() in after_fork(), where threads may be started.

Endpoints and their connections: preflight() opens the source and, when a
target was given, the target, once each, and checks the job's
preconditions on those very connections; the job then uses them for its
whole life (a server that serves one client at a time, or exits when its
client leaves, sees one client: us).  A connection made before nbdkit forks
is inherited by the child, whose first request starts its I/O thread.

Persistent bitmap (--bitmap, activitylog.py, bitmapfile.py), at a few
hooks marked so:
  * preflight() opens and locks the file first.  A file that says the
    guest was switched to the target (pivoting, pivoted) makes the proxy
    serve that target, with no job, and never the stale source.  Else,
    once the endpoints are checked, the start-up job resumes from the file
    or makes it anew (activitylog.prepare refuses what does not fit).
  * drive-mirror with `bitmap` does the same; it resumes only if no guest
    request changed the disk since the proxy started (nothing tracked it),
    which it decides with guest I/O held until the job tracks writes.
  * Shutdown (quit, signals) stops a job with a persistent bitmap as a
    suspension: the file stays resumable, with the exact bitmap, and goes
    on marking what guests write until close() (activitylog.py).  The
    files are held (locked) until close().
"""

import sys
import threading

from . import activitylog, bitmapfile, endpoints, paths
from .control import Control
from .guest import GuestIO
from .job import Job, JobError
from .jobstate import JobStateError, Status
from .qmp import QMPServer

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IO_TIMEOUT = 30.0
SOFT_STOP = 2.5         # seconds a soft cancel may take at quit
ABORT_STOP = 2.5        # seconds a force cancel may take (job.py: ~2)
GUEST_DRAIN = 1.0       # seconds guest requests inside may take at quit
RESUME_HOLD = 5.0       # seconds drive-mirror with a bitmap may hold guests


class Proxy:
    def __init__(self, options, shutdown=lambda: None):
        self.options = options
        self.device = options.device
        self._shutdown = shutdown       # ends the process, cleanup first
        self._lock = threading.Lock()   # guards self.job
        self.job = None
        self.qmp = None
        self.source = None
        self.guest = None
        self._startup = None            # (job options, target, log)
        self._held = []                 # persistent bitmaps, closed at exit
        self._quitting = False

    def _open(self, spec, **kwargs):
        return endpoints.open_endpoint(
            spec, connect_timeout=getattr(self.options, "connect_timeout",
                                          DEFAULT_CONNECT_TIMEOUT),
            io_timeout=getattr(self.options, "io_timeout",
                               DEFAULT_IO_TIMEOUT), **kwargs)

    def preflight(self):
        """Open the source (and the start-up job's target) and check the
        job's preconditions.  Raises EndpointError / OptionError with a
        one-line reason; nothing is written anywhere."""
        self.options.check()
        job_opts = self.options.job_options()
        bfile = self._open_bitmap_file(job_opts)        # persistent bitmap
        try:
            if bfile is not None and bfile.state in bitmapfile.SWITCHED:
                self._serve_pivoted(job_opts, bfile)    # persistent bitmap
                return
            self.source = self._open(self.options.source, want_depth=True)
            self.guest = GuestIO(self.source)
            if job_opts is not None:
                target = self._open_target(self.source, job_opts)
                try:
                    log = self._prepare_log(job_opts, bfile, self.source)
                except BaseException:
                    target.close()
                    raise
                self._startup = (job_opts, target, log)
        except BaseException:
            if bfile is not None:
                bfile.abandon()
            raise

    # -- persistent bitmap ----------------------------------------------------
    def _open_bitmap_file(self, job_opts):
        """The job's bitmap file, open and locked, or None."""
        if job_opts is None or not job_opts.bitmap:
            return None
        bfile = bitmapfile.BitmapFile.open(job_opts.bitmap)
        self._held.append(bfile)
        return bfile

    def _prepare_log(self, job_opts, bfile, source, resume_ok=True):
        """The job's activity log over `bfile` (None: no persistent
        bitmap): resumed or new, or BitmapFileError."""
        if bfile is None:
            return None
        ident = activitylog.job_identity(job_opts, source, job_opts.target)
        log = activitylog.prepare(bfile, ident, job_opts.bitmap_discard,
                                  resume_ok)
        self._held.append(log)
        return log

    def _serve_pivoted(self, job_opts, bfile):
        """The file says the guest was switched to the target: serve that
        target (no job), if it is the file's, and never the source."""
        ident = bitmapfile.identity(
            None, None, None, activitylog.spec_name(self.options.source),
            activitylog.spec_name(job_opts.target))
        why = bfile.mismatch(ident)
        if why is not None:
            raise bfile.error(f"the job in it pivoted to its target, so the "
                              f"source is stale; but the file was {why}")
        try:
            target = self._open(job_opts.target)
        except endpoints.EndpointError as e:
            raise endpoints.EndpointError(f"target: {e}") from None
        if target.size != bfile.header["size"]:
            target.close()
            raise bfile.error(f"the job in it pivoted to a target of "
                              f"{bfile.header['size']} bytes, this one has "
                              f"{target.size}")
        if bfile.state != bitmapfile.PIVOTED:
            bfile.set_state(bitmapfile.PIVOTED)
        target.heal(job_opts.reconnect_delay)
        self.guest = GuestIO(target)
        print(f"nbdmirror: bitmap {bfile.path}: the job pivoted; serving "
              f"its target {target.uri} (no job)", file=sys.stderr,
              flush=True)

    def _check_bitmap_path(self, job_opts):
        """drive-mirror: the bitmap must not be a file the proxy uses."""
        if not job_opts.bitmap:
            return
        o = self.options
        inputs = [("source", paths.local_path(o.source)),
                  ("control", o.control), ("pidfile", o.pidfile),
                  ("target", paths.local_path(job_opts.target)),
                  ("bitmap", job_opts.bitmap)]
        try:
            paths.check([], [p for p in inputs if p[1]])
        except paths.PathError as e:
            raise JobError(str(e)) from None

    def _open_target(self, source, job_opts):
        try:
            target = self._open(job_opts.target)
        except endpoints.EndpointError as e:
            raise endpoints.EndpointError(f"target: {e}") from None
        try:
            endpoints.check_job(source, target, job_opts.sync)
        except BaseException:
            target.close()
            raise
        return target

    def start(self):
        """After nbdkit's fork: the control socket, then the start-up job."""
        self.qmp = QMPServer(self.options.control, Control(self).dispatch)
        self.qmp.start()
        if self._startup is not None:
            job_opts, target, log = self._startup
            self._startup = None
            self._start_job(job_opts, target, log)

    def emit(self, event, data):
        if self.qmp is not None:
            self.qmp.broadcast(event, data)

    def start_job(self, job_opts):
        """drive-mirror: connect, check, then start.  The job copies from
        whatever the guest is served from now (the old target after a
        pivot).  Runs in the calling QMP client's thread; connecting is
        bounded by the connect timeout."""
        with self._lock:
            self._check_idle()
        self._check_bitmap_path(job_opts)
        try:
            target = self._open_target(self.guest.backend, job_opts)
        except endpoints.EndpointError as e:
            raise JobError(str(e)) from None
        if not job_opts.bitmap:
            self._start_job(job_opts, target)
            return
        # persistent bitmap: resume only if no guest request changed the
        # disk untracked.  Guest I/O is held meanwhile, so that none can
        # slip in between that check and the job's tracking (Job.start).
        gate, bfile = self.guest.gate, None
        gate.close()
        try:
            try:
                if not gate.wait_empty(RESUME_HOLD):
                    raise JobError(f"bitmap: guest requests did not pause "
                                   f"within {RESUME_HOLD:.0f} s")
                bfile = self._open_bitmap_file(job_opts)
                log = self._prepare_log(job_opts, bfile, self.guest.backend,
                                        resume_ok=not self.guest.changed)
            except (JobError, bitmapfile.BitmapFileError) as e:
                target.close()
                if bfile is not None:
                    bfile.abandon()
                raise JobError(str(e)) from None
            self._start_job(job_opts, target, log)
        finally:
            gate.open()

    def _check_idle(self):
        job = self.job
        if job is None or job.status == "null":
            return
        if job.state.finished:
            raise JobError(f"Job '{job.id}' is concluded and waits for "
                           f"job-dismiss")
        raise JobError(f"Job '{job.id}' is still active on device "
                       f"'{self.device}'")

    def _start_job(self, job_opts, target, log=None):
        with self._lock:
            try:
                self._check_idle()
            except JobError:
                target.close()
                if log is not None:
                    log.close()
                raise
            self.job = Job(job_opts, self.guest, self.guest.backend, target,
                           self.emit,
                           connect_timeout=getattr(self.options,
                                                   "connect_timeout",
                                                   DEFAULT_CONNECT_TIMEOUT),
                           persist=log)
            self.job.start()

    def request_shutdown(self):
        """QMP quit or a signal (any thread): end the job (bounded: at most
        SOFT_STOP + ABORT_STOP seconds), let the guest requests inside
        finish and keep new ones out, then end the process through the
        plugin's exit, which cleans up first.  (nbdkit's own shutdown
        waits for every guest to hang up, and shutting their sockets
        down under requests in flight trips an assertion in nbdkit 1.32:
        see lifecycle.py.)"""
        with self._lock:
            if self._quitting:
                return
            self._quitting = True
        self.stop_job()
        if self.guest is not None:
            self.guest.gate.close()     # for good: the process ends
            self.guest.gate.wait_empty(GUEST_DRAIN)
        self._shutdown()

    def stop_job(self):
        """Before ready, as a force cancel; after, as a soft cancel that
        leaves the target consistent, forced if it takes too long."""
        job = self.job
        if job is None or job.state.finished:
            return
        soft = job.status in (Status.READY, Status.STANDBY)
        if job.persist.persistent:
            # persistent bitmap: not an end but a pause across a restart:
            # stop now; the file keeps the exact bitmap, state active.
            job.persist.suspend()
            soft = False
        try:
            job.cancel(force=not soft)
        except JobStateError:
            pass                        # ending already
        if job.wait(SOFT_STOP if soft else ABORT_STOP):
            return
        try:
            job.cancel(force=True)
        except JobStateError:
            pass
        job.wait(ABORT_STOP)

    def close(self):
        self.stop_job()
        if self.qmp is not None:
            self.qmp.stop()
        if self._startup is not None:
            self._startup[1].close()
        for held in self._held:         # persistent bitmap: unlock
            held.close()
        if self.guest is not None:
            self.guest.backend.close()
