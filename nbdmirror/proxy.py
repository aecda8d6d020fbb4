"""One served disk: the guest path, at most one job, and the control socket.

The plugin creates a Proxy in config_complete() (before nbdkit forks), calls
preflight() there so that bad input stops nbdkit before anything is served,
and start() in after_fork(), where threads may be started.
"""

import threading

from . import endpoints
from .control import Control
from .guest import GuestIO
from .job import Job, JobError, check_preconditions
from .qmp import QMPServer


class Proxy:
    def __init__(self, options, shutdown=lambda: None):
        self.options = options
        self.device = options.device
        self._shutdown = shutdown       # asks nbdkit to exit
        self._lock = threading.Lock()   # guards self.job
        self.job = None
        self.qmp = None
        self.source = None
        self.guest = None

    def preflight(self):
        """Open the source and check the start-up job's preconditions.
        Raises EndpointError / JobError / OptionError with a one-line reason."""
        self.options.check()
        self.source = endpoints.open_endpoint(self.options.source)
        self.guest = GuestIO(self.source)
        job_opts = self.options.job_options()
        if job_opts is not None:
            check_preconditions(self.source, job_opts)

    def start(self):
        """After nbdkit's fork: the control socket, then the start-up job."""
        self.qmp = QMPServer(self.options.control, Control(self).dispatch)
        self.qmp.start()
        job_opts = self.options.job_options()
        if job_opts is not None:
            self._start_job(job_opts)

    def emit(self, event, data):
        if self.qmp is not None:
            self.qmp.broadcast(event, data)

    def start_job(self, job_opts):
        """drive-mirror: check, then start.  The job copies from whatever
        the guest is served from now (the old target after a pivot)."""
        with self._lock:
            self._check_idle()
        check_preconditions(self.guest.backend, job_opts)
        self._start_job(job_opts)

    def _check_idle(self):
        if self.job is not None and not self.job.state.finished:
            raise JobError(f"Job '{self.job.id}' is still active on device "
                           f"'{self.device}'")

    def _start_job(self, job_opts):
        with self._lock:
            self._check_idle()
            self.job = Job(job_opts, self.device, self.guest,
                           self.guest.backend, self.emit)
            self.job.start()

    def request_shutdown(self):
        """QMP quit: nbdkit exits, which calls close() via cleanup."""
        self._shutdown()

    def close(self):
        job = self.job
        if job is not None and not job.state.finished:
            try:
                job.cancel(force=True)
            except Exception:
                pass
            job.wait(5)
        if self.qmp is not None:
            self.qmp.stop()
