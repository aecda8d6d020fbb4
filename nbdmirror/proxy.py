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
"""

import threading

from . import endpoints
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
        self._startup = None            # (job options, target endpoint)
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
        self.source = self._open(self.options.source, want_depth=True)
        self.guest = GuestIO(self.source)
        job_opts = self.options.job_options()
        if job_opts is not None:
            self._startup = (job_opts, self._open_target(self.source,
                                                         job_opts))

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
            job_opts, target = self._startup
            self._startup = None
            self._start_job(job_opts, target)

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
        try:
            target = self._open_target(self.guest.backend, job_opts)
        except endpoints.EndpointError as e:
            raise JobError(str(e)) from None
        self._start_job(job_opts, target)

    def _check_idle(self):
        job = self.job
        if job is None or job.status == "null":
            return
        if job.state.finished:
            raise JobError(f"Job '{job.id}' is concluded and waits for "
                           f"job-dismiss")
        raise JobError(f"Job '{job.id}' is still active on device "
                       f"'{self.device}'")

    def _start_job(self, job_opts, target):
        with self._lock:
            try:
                self._check_idle()
            except JobError:
                target.close()
                raise
            self.job = Job(job_opts, self.guest, self.guest.backend, target,
                           self.emit,
                           connect_timeout=getattr(self.options,
                                                   "connect_timeout",
                                                   DEFAULT_CONNECT_TIMEOUT))
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
        if self.guest is not None:
            self.guest.backend.close()
