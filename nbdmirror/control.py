"""The QMP commands: each one a small function over the proxy and its job.

A command is registered with @command(name, arg=type, ...); `?arg` marks an
optional argument.  Argument checking (missing, unexpected, wrong type) is
done once, here, with QEMU's wording; the functions only do their job.
"""

from .job import JobError
from .jobstate import JobStateError
from .options import (FIELDS, JOB, REQUIRED, OptionError, make_job_options,
                      rows)
from .qmp import AfterReply, QMPError

_TYPES = {str: "string", int: "integer", bool: "boolean", dict: "object",
          float: "number"}
COMMANDS = {}


def command(name, **params):
    def register(fn):
        COMMANDS[name] = (fn, params)
        return fn
    return register


def _check_args(args, params):
    spec = {k.lstrip("_"): (t, not k.startswith("_")) for k, t in params.items()}
    for key in args:
        if key.replace("-", "_") not in spec:
            raise QMPError("GenericError", f"Parameter '{key}' is unexpected")
    out = {}
    for name, (typ, required) in spec.items():
        key = name.replace("_", "-")
        if key not in args:
            if required:
                raise QMPError("GenericError", f"Parameter '{key}' is missing")
            continue
        value = args[key]
        # A JSON number (QEMU's 'number') may be written as an integer.
        ok = isinstance(value, (int, float) if typ is float else typ) and \
            not (typ in (int, float) and isinstance(value, bool))
        # Integers are QEMU's int64: QEMU parses a number outside it as a
        # double, which an integer parameter refuses with the same words.
        if ok and typ is int and not -(1 << 63) <= value < (1 << 63):
            ok = False
        if not ok:
            raise QMPError("GenericError", f"Invalid parameter type for "
                                           f"'{key}', expected: {_TYPES[typ]}")
        out[name] = value
    return out


class Control:
    """dispatch() is what the QMP server calls, in a worker thread."""

    def __init__(self, proxy):
        self.proxy = proxy

    def dispatch(self, name, args):
        if name not in COMMANDS:
            raise QMPError("CommandNotFound", f"The command {name} has not "
                                              "been found")
        fn, params = COMMANDS[name]
        kwargs = _check_args(args, params)
        try:
            return fn(self.proxy, **kwargs)
        except (JobStateError, JobError, OptionError) as e:
            raise QMPError("GenericError", str(e)) from None

    # -- lookups (QEMU's wording) -----------------------------------------
    @staticmethod
    def block_job(proxy, device):
        job = _listed(proxy)
        if job is None or job.id != device:
            raise QMPError("DeviceNotActive",
                           f"Block job '{device}' not found")
        return job

    @staticmethod
    def job(proxy, job_id):
        job = _listed(proxy)
        if job is None or job.id != job_id:
            raise QMPError("GenericError", "Job not found")
        return job


def _listed(proxy):
    """The proxy's job while QMP lists it: until `null` (a concluded job
    that waits for job-dismiss is listed)."""
    job = proxy.job
    return None if job is None or job.status == "null" else job


# -- what the queries show ------------------------------------------------------

def block_job_info(job):
    """One entry of query-block-jobs (QEMU's BlockJobInfo)."""
    offset, length = job.progress()
    info = {
        "type": "mirror", "device": job.id, "len": length, "offset": offset,
        "busy": job.busy, "paused": job.state.paused, "speed": job.speed,
        "io-status": job.io_status, "ready": job.state.ever_ready,
        "status": str(job.status),
        "auto-finalize": job.state.auto_finalize,
        "auto-dismiss": job.state.auto_dismiss,
        "actively-synced": job.actively_synced,
        "copy-mode": job.copy_mode,     # nbdmirror's: auto shows its switch
    }
    if job.error:
        info["error"] = job.error
    lost = job.disconnected_for()
    if lost is not None:
        # nbdmirror's own: seconds since the target connection was lost
        info["target-disconnected"] = round(lost, 3)
    return info


def job_info(job):
    """One entry of query-jobs (QEMU's JobInfo)."""
    offset, length = job.progress()
    info = {"id": job.id, "type": "mirror", "status": str(job.status),
            "current-progress": offset, "total-progress": length}
    if job.error:
        info["error"] = job.error
    return info


# -- commands -----------------------------------------------------------------

@command("query-status")
def query_status(proxy):
    return {"running": True, "status": "running", "singlestep": False}


@command("query-version")
def query_version(proxy):
    from .qmp import VERSION
    return VERSION


@command("query-commands")
def query_commands(proxy):
    return [{"name": n} for n in sorted(COMMANDS) + ["qmp_capabilities"]]


@command("query-block-jobs")
def query_block_jobs(proxy):
    job = _listed(proxy)
    return [] if job is None else [block_job_info(job)]


@command("query-jobs")
def query_jobs(proxy):
    job = _listed(proxy)
    return [] if job is None else [job_info(job)]


# drive-mirror's parameters are the job rows of the option table, each
# with its JSON type (target and sync required, as in QEMU), plus QEMU's
# device, format and mode.
@command("drive-mirror", device=str, _format=str, _mode=str,
         **{("" if r.qmp == REQUIRED else "_") + r.field: r.kind.qmp
            for r in rows(JOB) if r.qmp})
def drive_mirror(proxy, device, format="raw", mode=None, **job_args):
    if device != proxy.device:
        raise QMPError("DeviceNotFound", f"Cannot find device='{device}' nor "
                                         f"node-name='{device}'")
    if format != "raw":
        raise QMPError("GenericError", f"format: only 'raw' targets are "
                                       f"supported, not {format!r}")
    args = {FIELDS[field].name: value for field, value in job_args.items()}
    args.setdefault("job-id", device)       # QEMU's default job id
    proxy.start_job(make_job_options(args))
    return {}


@command("block-job-complete", device=str)
def block_job_complete(proxy, device):
    Control.block_job(proxy, device).complete()
    return {}


@command("job-complete", id=str)
def job_complete(proxy, id):
    Control.job(proxy, id).complete()
    return {}


@command("block-job-cancel", device=str, _force=bool)
def block_job_cancel(proxy, device, force=False):
    Control.block_job(proxy, device).cancel(force)
    return {}


@command("job-cancel", id=str)
def job_cancel(proxy, id):
    Control.job(proxy, id).cancel(force=True)
    return {}


@command("block-job-pause", device=str)
def block_job_pause(proxy, device):
    Control.block_job(proxy, device).pause()
    return {}


@command("job-pause", id=str)
def job_pause(proxy, id):
    Control.job(proxy, id).pause()
    return {}


@command("block-job-resume", device=str)
def block_job_resume(proxy, device):
    Control.block_job(proxy, device).resume()
    return {}


@command("job-resume", id=str)
def job_resume(proxy, id):
    Control.job(proxy, id).resume()
    return {}


@command("block-job-set-speed", device=str, speed=int)
def block_job_set_speed(proxy, device, speed):
    Control.block_job(proxy, device).set_speed(speed)
    return {}


@command("block-job-change", id=str, type=str, copy_mode=str)
def block_job_change(proxy, id, type, copy_mode):
    if type != "mirror":
        raise QMPError("GenericError", f"type: {type!r} is not 'mirror'")
    Control.block_job(proxy, id).change(copy_mode)
    return {}


@command("job-finalize", id=str)
def job_finalize(proxy, id):
    Control.job(proxy, id).finalize()
    return {}


@command("job-dismiss", id=str)
def job_dismiss(proxy, id):
    Control.job(proxy, id).dismiss()
    return {}


@command("quit")
def quit_(proxy):
    return AfterReply({}, proxy.request_shutdown)
