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
QEMU's wording.  An accepted verb records a *request* (user_paused,
completing, cancelling); the copier reads `next_action()` and performs the
transition once the work it implies is done (e.g. `paused` only after the
in-flight copies have drained).

Departures from QEMU, on purpose:
  * no `waiting` state and no manual finalize/dismiss: one job, auto-finalize
    and auto-dismiss are always true.
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
    S.PENDING: {S.CONCLUDED},
    S.ABORTING: {S.CONCLUDED},
    S.CONCLUDED: {S.NULL},
    S.NULL: set(),
}

_LIVE = {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY}

VERBS = {
    "cancel": _LIVE,       # pending is left at once (no manual finalize)
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


class JobState:
    """One job's status plus the requests management made of it."""

    def __init__(self, job_id):
        self.job_id = job_id
        self.status = S.CREATED
        self.user_paused = False      # pause verb accepted, resume not yet
        self.error_paused = False     # paused by an error with policy `stop`
        self.ever_ready = False       # QEMU's `ready` field: sticks once set
        self.completing = False       # complete verb accepted
        self.soft_cancelling = False  # cancel after ready without force
        self.aborting_requested = False
        self.force_cancelled = False  # ended by a cancel, not by an error

    # -- verbs (from management) -------------------------------------------
    def check(self, verb):
        """Raise VerbError unless `verb` is allowed in the current status."""
        if self.status not in VERBS[verb]:
            raise VerbError(self.job_id, self.status, verb)

    def pause(self):
        self.check("pause")
        if self.user_paused:
            raise VerbError(self.job_id, self.status, "pause",
                            "Job is already paused")
        self.user_paused = True

    def resume(self):
        self.check("resume")
        if not (self.user_paused or self.error_paused):
            raise VerbError(self.job_id, self.status, "resume",
                            "Can't resume a job that was not paused")
        self.user_paused = self.error_paused = False

    def complete(self):
        self.check("complete")
        if self.completing or self.soft_cancelling:
            raise VerbError(self.job_id, self.status, "complete",
                            f"Job '{self.job_id}' is already completing")
        self.completing = True

    def cancel(self, force):
        """Cancel: soft after ready without force, otherwise abort."""
        self.check("cancel")
        if self.status in (S.READY, S.STANDBY) and not force \
                and not self.completing:
            self.soft_cancelling = True
        else:
            self.aborting_requested = True
            self.force_cancelled = True

    def fail(self):
        """An error with policy `report`: the job aborts."""
        self.aborting_requested = True

    def pause_on_error(self):
        """An error with policy `stop`: pause until resumed."""
        self.error_paused = True

    # -- what the copier should do ----------------------------------------
    def next_action(self):
        """Abort beats everything; an error pause beats completing (the job
        must not retry a failing final copy in a loop); completing beats a
        user pause."""
        if self.aborting_requested:
            return Action.ABORT
        if self.error_paused:
            return Action.PAUSE
        if self.completing:
            return Action.COMPLETE
        if self.soft_cancelling:
            return Action.SOFT_CANCEL
        if self.user_paused:
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
        return self.user_paused or self.error_paused or \
            self.status in (S.PAUSED, S.STANDBY)

    @property
    def finished(self):
        return self.status in (S.CONCLUDED, S.NULL)

    def paused_status(self):
        """The status a pause moves to from the current one, or None."""
        return {S.RUNNING: S.PAUSED, S.READY: S.STANDBY}.get(self.status)

    def resumed_status(self):
        return {S.PAUSED: S.RUNNING, S.STANDBY: S.READY}.get(self.status)
