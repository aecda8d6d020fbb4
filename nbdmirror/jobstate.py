"""The mirror job's state machine: states, transitions and QEMU's verb table.

Everything that decides *whether* something may happen to a job lives here;
nothing here does I/O or takes locks.  The copier and the QMP server ask this
module; they do not re-decide.  (The caller, job.Job, serialises access.)

Theory of operation
-------------------
A job's `status` moves only along TRANSITIONS (INTERFACE.md §4):

    created → running ⇄ paused
    running → ready ⇄ standby
    running|paused|created → aborting        cancel before ready / force / error
    ready|standby → pending → concluded → null    complete, or soft cancel
    ready|standby → aborting                 force cancel, or completion failed
    aborting → concluded → null

Management does not move the status directly: it issues *verbs* (cancel,
pause, resume, set-speed, complete, change).  VERBS says in which states each
verb is accepted, as QEMU's job.c does; a refused verb raises VerbError with
QEMU's wording.  An accepted verb records a *request* (`ending`,
`paused_by`); the job thread reads `next_action()` and performs the
transition once the work it implies is done (e.g. `paused` only after the
in-flight copies have drained).

What management has asked for is two named things, not a bag of flags:
  * `ending`: how the job was asked to end, None while it was not: COMPLETE
    (pivot), SOFT_CANCEL (converge, no pivot) or ABORT (cancel, or an error
    with policy `report`).  ABORT overrides the other two; nothing
    overrides ABORT.
  * `paused_by`: who holds the job paused: "user" (pause verb) and/or
    "error" (an error with policy `stop`).  resume clears both.
next_action() turns these into what the job thread should do now.

With auto-finalize false, a completed job waits in `pending` for the
finalize verb (the pivot happens then; guest I/O stays held meanwhile, as
QEMU keeps the source drained); with auto-dismiss false, a concluded job
waits for the dismiss verb before `null`.

Departures from QEMU, on purpose:
  * no `waiting` state: one job, no transactions.
  * `complete` is accepted in `standby` too (INTERFACE.md §5); completing
    overrides a user pause, since the final copy happens with guest I/O held.
"""

import enum


class Status(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    ABORTING = "aborting"
    PENDING = "pending"
    CONCLUDED = "concluded"
    NULL = "null"

    def __str__(self):
        return self.value


S = Status

TRANSITIONS = {
    S.CREATED: {S.RUNNING, S.ABORTING},
    S.RUNNING: {S.PAUSED, S.READY, S.ABORTING},
    S.PAUSED: {S.RUNNING, S.ABORTING},
    S.READY: {S.STANDBY, S.PENDING, S.ABORTING},
    S.STANDBY: {S.READY, S.PENDING, S.ABORTING},
    S.PENDING: {S.CONCLUDED, S.ABORTING},
    S.ABORTING: {S.CONCLUDED},
    S.CONCLUDED: {S.NULL},
    S.NULL: set(),
}

_LIVE = {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.PENDING}

VERBS = {
    "cancel": _LIVE,
    "pause": _LIVE,
    "resume": _LIVE,
    "set-speed": _LIVE,
    "complete": {S.READY, S.STANDBY},
    "change": {S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    "finalize": {S.PENDING},
    "dismiss": {S.CONCLUDED},
}


class JobStateError(Exception):
    """A verb or transition the job's state does not allow."""


class VerbError(JobStateError):
    def __init__(self, job_id, status, verb, desc=None):
        self.job_id, self.status, self.verb = job_id, status, verb
        super().__init__(desc or f"Job '{job_id}' in state '{status}' "
                                 f"cannot accept command verb '{verb}'")


class TransitionError(JobStateError):
    def __init__(self, job_id, old, new):
        super().__init__(f"Job '{job_id}': illegal transition {old} -> {new}")


class Action(str, enum.Enum):
    """What the copier should be doing now (see JobState.next_action)."""
    RUN = "run"               # copy dirty chunks
    PAUSE = "pause"           # drain in-flight copies, then sit still
    COMPLETE = "complete"     # hold guest I/O, drain, flush, pivot
    SOFT_CANCEL = "soft-cancel"  # hold guest I/O, drain, flush, no pivot
    ABORT = "abort"           # stop at once


class End(str, enum.Enum):
    """How the job was asked to end."""
    COMPLETE = "complete"
    SOFT_CANCEL = "soft-cancel"
    ABORT = "abort"


class JobState:
    """One job's status plus what management asked of it."""

    def __init__(self, job_id, auto_finalize=True, auto_dismiss=True):
        self.job_id = job_id
        self.status = S.CREATED
        self.ending = None            # an End, once asked to end
        self.paused_by = set()        # {"user", "error"}
        self.ever_ready = False       # QEMU's `ready` field: sticks once set
        self.cancelled = False        # ABORT came from cancel, not an error
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.finalized = False        # finalize verb accepted (or automatic)

    # -- verbs (from management) -------------------------------------------
    def check(self, verb):
        """Raise VerbError unless `verb` is allowed in the current status."""
        if self.status not in VERBS[verb]:
            raise VerbError(self.job_id, self.status, verb)

    def pause(self):
        self.check("pause")
        if "user" in self.paused_by:
            raise VerbError(self.job_id, self.status, "pause",
                            "Job is already paused")
        self.paused_by.add("user")

    def resume(self):
        self.check("resume")
        if not self.paused_by:
            raise VerbError(self.job_id, self.status, "resume",
                            "Can't resume a job that was not paused")
        self.paused_by.clear()

    def complete(self):
        self.check("complete")
        if self.ending is not None:
            raise VerbError(self.job_id, self.status, "complete",
                            f"Job '{self.job_id}' is already completing")
        self.ending = End.COMPLETE

    def cancel(self, force):
        """Cancel: soft after ready without force, otherwise abort."""
        self.check("cancel")
        if self.status in (S.READY, S.STANDBY) and not force \
                and self.ending is None:
            self.ending = End.SOFT_CANCEL
        else:
            self.ending = End.ABORT
            self.cancelled = True

    def finalize(self):
        self.check("finalize")
        self.finalized = True

    def dismiss(self):
        self.check("dismiss")
        self.to(S.NULL)

    def fail(self):
        """An error with policy `report`: the job aborts."""
        self.ending = End.ABORT

    def pause_on_error(self):
        """An error with policy `stop`: pause until resumed."""
        self.paused_by.add("error")

    # -- what the copier should do ----------------------------------------
    def next_action(self):
        """Abort beats everything; an error pause beats completing (the job
        must not retry a failing final copy in a loop); completing beats a
        user pause."""
        if self.ending is End.ABORT:
            return Action.ABORT
        if "error" in self.paused_by:
            return Action.PAUSE
        if self.ending is End.COMPLETE:
            return Action.COMPLETE
        if self.ending is End.SOFT_CANCEL:
            return Action.SOFT_CANCEL
        if "user" in self.paused_by:
            return Action.PAUSE
        return Action.RUN

    # -- transitions (from the copier) -------------------------------------
    def to(self, new):
        """Move to `new`; return the old status.  Raises TransitionError."""
        new = Status(new)
        old = self.status
        if new not in TRANSITIONS[old]:
            raise TransitionError(self.job_id, old, new)
        self.status = new
        if new is S.READY:
            self.ever_ready = True
        return old

    # -- derived ------------------------------------------------------------
    @property
    def paused(self):
        """QEMU's `paused` field: a pause is requested or in effect."""
        return bool(self.paused_by) or self.status in (S.PAUSED, S.STANDBY)

    @property
    def error_paused(self):
        return "error" in self.paused_by

    @property
    def finished(self):
        """The job does nothing more (it may still wait to be dismissed)."""
        return self.status in (S.CONCLUDED, S.NULL)

    def paused_status(self):
        """The status a pause moves to from the current one, or None."""
        return {S.RUNNING: S.PAUSED, S.READY: S.STANDBY}.get(self.status)

    def resumed_status(self):
        return {S.PAUSED: S.RUNNING, S.STANDBY: S.READY}.get(self.status)
