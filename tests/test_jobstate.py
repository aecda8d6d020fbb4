"""The job state machine: QEMU's verb table, the transition table, and requests.

The tables are checked exhaustively (every status x every verb, every pair of
statuses); the request semantics (pause, resume, complete, cancel) and
next_action's priorities one by one.
"""

import itertools

import pytest

from nbdmirror.jobstate import (
    TRANSITIONS, VERBS, Action, End, JobState, JobStateError, Status,
    TransitionError, VerbError)

S = Status
ALL = list(Status)
LIVE = {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.PENDING}

# INTERFACE.md §4, written out independently of the module's table.
EXPECTED_TRANSITIONS = {
    (S.CREATED, S.RUNNING), (S.CREATED, S.ABORTING),
    (S.RUNNING, S.PAUSED), (S.PAUSED, S.RUNNING),
    (S.RUNNING, S.READY), (S.READY, S.STANDBY), (S.STANDBY, S.READY),
    (S.RUNNING, S.ABORTING), (S.PAUSED, S.ABORTING),
    (S.READY, S.PENDING), (S.STANDBY, S.PENDING),
    (S.READY, S.ABORTING), (S.STANDBY, S.ABORTING),
    (S.PENDING, S.CONCLUDED), (S.PENDING, S.ABORTING),
    (S.ABORTING, S.CONCLUDED),
    (S.CONCLUDED, S.NULL),
}

# QEMU's job.c verb table, restricted to the states nbdmirror has (no
# `waiting`).  `pending` lasts only with auto-finalize false.
EXPECTED_VERBS = {
    "cancel": LIVE,
    "pause": LIVE,
    "resume": LIVE,
    "set-speed": LIVE,
    "complete": {S.READY, S.STANDBY},
    "change": {S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    "finalize": {S.PENDING},
    "dismiss": {S.CONCLUDED},
}


def job_in(status, job_id="mirror0"):
    """A fresh JobState forced into `status` (no requests recorded)."""
    js = JobState(job_id)
    js.status = status
    return js


def walk(js, *statuses):
    for s in statuses:
        js.to(s)
    return js


# -- tables -------------------------------------------------------------------------

def test_status_values_and_str():
    assert [s.value for s in ALL] == [
        "created", "running", "paused", "ready", "standby", "aborting",
        "pending", "concluded", "null"]
    assert str(S.STANDBY) == "standby"
    assert f"{S.READY}" == "ready"
    assert S("ready") is S.READY


def test_new_job_is_created_and_idle():
    js = JobState("j")
    assert js.status is S.CREATED
    assert js.next_action() is Action.RUN
    assert not (js.paused or js.finished or js.ever_ready)


def test_verb_table_is_qemus():
    assert VERBS == EXPECTED_VERBS


def test_transition_table_is_the_interface():
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == EXPECTED_TRANSITIONS
    assert set(TRANSITIONS) == set(ALL)


@pytest.mark.parametrize("status,verb",
                         list(itertools.product(ALL, sorted(VERBS))))
def test_check_accepts_exactly_the_verbs_of_the_table(status, verb):
    js = job_in(status, "job-7")
    if status in EXPECTED_VERBS[verb]:
        js.check(verb)
    else:
        with pytest.raises(VerbError) as e:
            js.check(verb)
        assert str(e.value) == (f"Job 'job-7' in state '{status.value}' "
                                f"cannot accept command verb '{verb}'")
        assert (e.value.job_id, e.value.status, e.value.verb) == \
            ("job-7", status, verb)
        assert isinstance(e.value, JobStateError)


@pytest.mark.parametrize("old,new", list(itertools.product(ALL, ALL)))
def test_to_accepts_exactly_the_table(old, new):
    js = job_in(old, "m")
    if (old, new) in EXPECTED_TRANSITIONS:
        assert js.to(new) is old
        assert js.status is new
    else:
        with pytest.raises(TransitionError) as e:
            js.to(new)
        assert str(e.value) == f"Job 'm': illegal transition {old} -> {new}"
        assert js.status is old
        assert isinstance(e.value, JobStateError)


def test_to_takes_status_strings_and_refuses_unknown_ones():
    js = JobState("m")
    js.to("running")
    assert js.status is S.RUNNING
    with pytest.raises(ValueError):
        js.to("bogus")


def test_every_status_is_reachable_and_every_path_ends_in_null():
    seen, todo = {S.CREATED}, [S.CREATED]
    while todo:
        for n in TRANSITIONS[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    assert seen == set(ALL)
    # No cycle escapes the end: from every status, null is reachable.
    for s in ALL:
        reach, todo = {s}, [s]
        while todo:
            for n in TRANSITIONS[todo.pop()]:
                if n not in reach:
                    reach.add(n)
                    todo.append(n)
        assert S.NULL in reach


# -- derived properties -----------------------------------------------------------

def test_ever_ready_sticks_once_ready():
    js = walk(JobState("m"), S.RUNNING)
    assert not js.ever_ready
    js.to(S.READY)
    assert js.ever_ready
    walk(js, S.STANDBY, S.READY, S.PENDING, S.CONCLUDED, S.NULL)
    assert js.ever_ready


@pytest.mark.parametrize("status", ALL)
def test_finished_only_when_concluded_or_null(status):
    assert job_in(status).finished == (status in (S.CONCLUDED, S.NULL))


@pytest.mark.parametrize("status", ALL)
def test_paused_field_follows_status_and_requests(status):
    js = job_in(status)
    assert js.paused == (status in (S.PAUSED, S.STANDBY))
    js.paused_by = {"user"}
    assert js.paused
    js.paused_by = {"error"}
    assert js.paused


def test_paused_and_resumed_status():
    assert job_in(S.RUNNING).paused_status() is S.PAUSED
    assert job_in(S.READY).paused_status() is S.STANDBY
    assert job_in(S.PAUSED).resumed_status() is S.RUNNING
    assert job_in(S.STANDBY).resumed_status() is S.READY
    for s in set(ALL) - {S.RUNNING, S.READY}:
        assert job_in(s).paused_status() is None
    for s in set(ALL) - {S.PAUSED, S.STANDBY}:
        assert job_in(s).resumed_status() is None
    # and each is a legal transition
    for s in ALL:
        for new in (job_in(s).paused_status(), job_in(s).resumed_status()):
            if new is not None:
                assert new in TRANSITIONS[s]


# -- pause and resume -------------------------------------------------------------------

@pytest.mark.parametrize("status", sorted(LIVE))
def test_pause_then_resume(status):
    js = job_in(status)
    js.pause()
    assert ("user" in js.paused_by) and js.paused
    assert js.next_action() is Action.PAUSE
    js.resume()
    assert not ("user" in js.paused_by)
    assert js.next_action() is Action.RUN


def test_pause_twice_is_refused_with_qemus_message():
    js = job_in(S.RUNNING)
    js.pause()
    with pytest.raises(VerbError, match="^Job is already paused$"):
        js.pause()
    assert ("user" in js.paused_by)


@pytest.mark.parametrize("status", [S.RUNNING, S.READY])
def test_resume_without_pause_is_refused(status):
    with pytest.raises(VerbError,
                       match="^Can't resume a job that was not paused$"):
        job_in(status).resume()


@pytest.mark.parametrize("status", sorted(set(ALL) - LIVE))
def test_pause_and_resume_refused_once_the_job_ends(status):
    js = job_in(status)
    for verb in (js.pause, js.resume):
        with pytest.raises(VerbError, match="cannot accept command verb"):
            verb()
    assert not ("user" in js.paused_by)


def test_resume_clears_an_error_pause():
    js = job_in(S.RUNNING)
    js.pause_on_error()
    assert js.error_paused and js.paused
    assert js.next_action() is Action.PAUSE
    js.resume()
    assert not js.error_paused
    assert js.next_action() is Action.RUN


def test_resume_clears_both_pauses():
    js = job_in(S.RUNNING)
    js.pause()
    js.pause_on_error()
    js.resume()
    assert not (("user" in js.paused_by) or js.error_paused)


def test_paused_job_walks_running_paused_running():
    js = walk(JobState("m"), S.RUNNING)
    js.pause()
    js.to(js.paused_status())
    assert js.status is S.PAUSED
    js.resume()
    js.to(js.resumed_status())
    assert js.status is S.RUNNING


# -- complete ----------------------------------------------------------------------------

@pytest.mark.parametrize("status", [S.READY, S.STANDBY])
def test_complete_in_ready_or_standby(status):
    js = job_in(status)
    js.complete()
    assert (js.ending is End.COMPLETE)
    assert js.next_action() is Action.COMPLETE
    js.to(S.PENDING)
    js.to(S.CONCLUDED)
    js.to(S.NULL)
    assert js.finished


@pytest.mark.parametrize("status", sorted(set(ALL) - {S.READY, S.STANDBY}))
def test_complete_refused_before_ready_and_after_the_end(status):
    js = job_in(status, "mx")
    with pytest.raises(VerbError) as e:
        js.complete()
    assert str(e.value) == (f"Job 'mx' in state '{status}' "
                            "cannot accept command verb 'complete'")
    assert not (js.ending is End.COMPLETE)


def test_complete_twice_is_refused():
    js = job_in(S.READY, "m1")
    js.complete()
    with pytest.raises(VerbError, match="^Job 'm1' is already completing$"):
        js.complete()


def test_complete_after_soft_cancel_is_refused():
    js = job_in(S.READY, "m1")
    js.cancel(force=False)
    with pytest.raises(VerbError, match="already completing"):
        js.complete()
    assert not (js.ending is End.COMPLETE)
    assert js.next_action() is Action.SOFT_CANCEL


def test_complete_overrides_a_user_pause():
    js = job_in(S.STANDBY)
    js.paused_by.add("user")
    js.complete()
    assert js.next_action() is Action.COMPLETE


def test_error_pause_holds_a_completion_until_resumed():
    js = job_in(S.READY)
    js.complete()
    js.pause_on_error()
    assert js.next_action() is Action.PAUSE
    js.resume()
    assert (js.ending is End.COMPLETE)
    assert js.next_action() is Action.COMPLETE


# -- cancel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [S.CREATED, S.RUNNING, S.PAUSED])
@pytest.mark.parametrize("force", [False, True])
def test_cancel_before_ready_aborts(status, force):
    js = job_in(status)
    js.cancel(force=force)
    assert (js.ending is End.ABORT) and js.cancelled
    assert not (js.ending is End.SOFT_CANCEL)
    assert js.next_action() is Action.ABORT
    walk(js, S.ABORTING, S.CONCLUDED, S.NULL)


@pytest.mark.parametrize("status", [S.READY, S.STANDBY])
def test_cancel_after_ready_without_force_is_soft(status):
    js = job_in(status)
    js.cancel(force=False)
    assert (js.ending is End.SOFT_CANCEL)
    assert not ((js.ending is End.ABORT) or js.cancelled)
    assert js.next_action() is Action.SOFT_CANCEL
    walk(js, S.PENDING, S.CONCLUDED, S.NULL)


@pytest.mark.parametrize("status", [S.READY, S.STANDBY])
def test_force_cancel_after_ready_aborts(status):
    js = job_in(status)
    js.cancel(force=True)
    assert (js.ending is End.ABORT) and js.cancelled
    assert not (js.ending is End.SOFT_CANCEL)
    assert js.next_action() is Action.ABORT
    walk(js, S.ABORTING, S.CONCLUDED, S.NULL)


def test_soft_cancel_while_completing_aborts():
    """A cancel that arrives during completion cannot turn into a soft one."""
    js = job_in(S.READY)
    js.complete()
    js.cancel(force=False)
    assert (js.ending is End.ABORT) and not (js.ending is End.SOFT_CANCEL)
    assert js.next_action() is Action.ABORT


def test_soft_cancel_then_force_cancel_aborts():
    js = job_in(S.READY)
    js.cancel(force=False)
    js.cancel(force=True)
    assert js.next_action() is Action.ABORT


@pytest.mark.parametrize("force", [False, True])
def test_cancel_in_pending_aborts(force):
    """As QEMU: a job waiting for job-finalize can still be cancelled."""
    js = job_in(S.PENDING)
    js.cancel(force=force)
    assert js.next_action() is Action.ABORT and js.cancelled
    walk(js, S.ABORTING, S.CONCLUDED, S.NULL)


def test_finalize_only_in_pending_then_dismiss_only_when_concluded():
    js = JobState("m", auto_finalize=False, auto_dismiss=False)
    walk(js, S.RUNNING, S.READY)
    with pytest.raises(VerbError, match="cannot accept command verb "
                                        "'finalize'"):
        js.finalize()
    js.complete()
    js.to(S.PENDING)
    js.finalize()
    assert js.finalized
    with pytest.raises(VerbError, match="verb 'dismiss'"):
        js.dismiss()
    js.to(S.CONCLUDED)
    assert js.finished
    js.dismiss()
    assert js.status is S.NULL


@pytest.mark.parametrize("status", [S.ABORTING, S.CONCLUDED, S.NULL])
@pytest.mark.parametrize("force", [False, True])
def test_cancel_refused_once_aborting_or_ended(status, force):
    js = job_in(status, "m")
    with pytest.raises(VerbError) as e:
        js.cancel(force=force)
    assert str(e.value) == (f"Job 'm' in state '{status}' "
                            "cannot accept command verb 'cancel'")
    assert not ((js.ending is End.ABORT) or (js.ending is End.SOFT_CANCEL))


def test_fail_aborts_without_being_a_cancel():
    js = job_in(S.RUNNING)
    js.fail()
    assert (js.ending is End.ABORT) and not js.cancelled
    assert js.next_action() is Action.ABORT


# -- next_action priorities -------------------------------------------------------------

def test_next_action_priorities():
    """abort > error pause > complete > soft cancel > user pause > run.

    An error pause beats completing so that a failing final copy is not
    retried in a loop; completing beats a user pause.  Every combination.
    """
    for ending, user, err in itertools.product(
            (None, *End), (False, True), (False, True)):
        js = JobState("m")
        js.ending = ending
        js.paused_by = {who for who, on in (("user", user), ("error", err))
                        if on}
        if ending is End.ABORT:
            want = Action.ABORT
        elif err:
            want = Action.PAUSE
        elif ending is End.COMPLETE:
            want = Action.COMPLETE
        elif ending is End.SOFT_CANCEL:
            want = Action.SOFT_CANCEL
        elif user:
            want = Action.PAUSE
        else:
            want = Action.RUN
        assert js.next_action() is want, (ending, user, err)


def test_action_values():
    assert {a.value for a in Action} == {
        "run", "pause", "complete", "soft-cancel", "abort"}


def test_verb_error_with_custom_description_keeps_its_fields():
    e = VerbError("j", S.RUNNING, "pause", "custom")
    assert str(e) == "custom"
    assert (e.job_id, e.status, e.verb) == ("j", S.RUNNING, "pause")
