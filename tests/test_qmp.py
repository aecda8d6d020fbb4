"""QMP control of the mirror job, through the real qemu.qmp client library.

Every command of INTERFACE.md §5 on a live proxy: the queries and their
fields, drive-mirror and its job options, the verbs (complete, cancel,
pause, resume, set-speed, change) in the block-job-* and job-* spellings,
the verb table per state with QEMU's wording, the event sequence of each way
a job ends, and two properties measured on the wire: a pause freezes
progress, and `speed` limits the copy rate.

Proxies start without a target and the job is started with drive-mirror, so
the QMP client is connected before the job's first event.
"""

import time

import pytest

from helpers import (make_image, nbdkit_server, qemu_io, qemu_nbd,
                     qmp_execute, sha256_file, sha256_uri, start_proxy,
                     wait_event)

K, M = 1 << 10, 1 << 20
JOB = "mirror0"
DEVICE = "disk0"
EVENT_TIMEOUT = 30


# -- local helpers ---------------------------------------------------------------

class Rig:
    """A proxy serving `src` with no job, an empty target, a QMP client."""

    def __init__(self, workdir, procs, qmp, size, seed, source=None):
        self.workdir, self.procs, self.size = workdir, procs, size
        self.src = source or make_image(workdir / "src.img", size, seed=seed)
        self.tgt = self.new_target("tgt")
        self.proxy = start_proxy(procs, self.src, workdir / "guest.sock",
                                 workdir / "qmp.sock")
        self.client = qmp(self.proxy.control)

    def new_target(self, name):
        return nbdkit_server(self.procs, self.workdir / f"{name}.sock",
                             "memory", str(self.size))

    def execute(self, name, **args):
        return qmp_execute(self.client, name, **args)

    def ok(self, name, **args):
        reply = self.execute(name, **args)
        assert "return" in reply, f"{name} {args}: {reply}"
        return reply["return"]

    def mirror(self, target=None, **opts):
        """drive-mirror (sync full, job id mirror0) with `opts` as given
        (dashed names through a dict); returns the raw reply."""
        args = {"device": DEVICE, "target": target or self.tgt,
                "sync": "full", "job-id": JOB, **opts}
        return self.execute("drive-mirror", **args)

    def start(self, target=None, **opts):
        assert self.mirror(target, **opts) == {"return": {}}

    def job(self):
        jobs = self.ok("query-block-jobs")
        assert len(jobs) == 1, jobs
        return jobs[0]

    def events_until(self, done, timeout=EVENT_TIMEOUT):
        return collect_events(self.client, done, timeout)

    def events_until_status(self, status, timeout=EVENT_TIMEOUT):
        return self.events_until(lambda e: is_status(e, status), timeout)

    def wait_status(self, status, timeout=EVENT_TIMEOUT):
        return self.events_until_status(status, timeout)[-1]

    def wait_copying(self):
        """Wait until the job copied something: its scan is over, so `len`
        counts the whole dirty set."""
        return poll(lambda: (j := self.job())["offset"] > 0 and j)

    def guest_write(self, pattern, offset, length):
        qemu_io(self.proxy.uri, f"write -P {pattern} {offset} {length}")


def collect_events(client, done, timeout):
    """Events up to and including the first for which done(e); fails at
    once if the job ends (status null) before that."""
    deadline = time.monotonic() + timeout
    events = []
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"event not seen within {timeout} s; " \
                              f"got {summary(events)}"
        try:
            event = client.pull_event(wait=float(remaining))
        except TimeoutError:
            continue
        if event is None:
            continue
        events.append(event)
        if done(event):
            return events
        assert not is_status(event, "null"), \
            f"the job ended first: {summary(events)} " \
            f"{[e['data'] for e in events if 'error' in e['data']]}"


def is_status(event, status):
    return event["event"] == "JOB_STATUS_CHANGE" \
        and event["data"]["status"] == status


def summary(events):
    """Events as short names: a JOB_STATUS_CHANGE by its status, the
    others by their event name."""
    return [e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE"
            else e["event"] for e in events]


def only(events, name):
    found = [e for e in events if e["event"] == name]
    assert len(found) == 1, summary(events)
    return found[0]


def assert_error(reply, cls, desc=None):
    assert "error" in reply, reply
    assert reply["error"]["class"] == cls, reply
    if desc is not None:
        assert reply["error"]["desc"] == desc, reply
    return reply["error"]["desc"]


def poll(fn, timeout=10, interval=0.05):
    """Call fn() until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met in {timeout} s"
        time.sleep(interval)


def reads_pattern(uri, pattern, offset, length):
    """True if [offset, offset+length) at `uri` is all byte `pattern`."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    data = h.pread(length, offset)
    h.shutdown()
    return data == bytes([pattern]) * length


def make_filled(path, size, byte):
    """A raw image of `size` bytes, every one `byte` (quick to write)."""
    block = bytes([byte]) * M
    with open(path, "wb") as f:
        for _ in range(size // M):
            f.write(block)
    return path


def read_file(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def rig(workdir, procs, qmp):
    """rig(size=8M, seed=1) -> a Rig."""
    def make(size=8 * M, seed=1, source=None):
        return Rig(workdir, procs, qmp, size, seed, source)
    return make


COMPLETED = ["created", "running", "ready", "BLOCK_JOB_READY", "pending",
             "BLOCK_JOB_COMPLETED", "concluded", "null"]


# -- queries ---------------------------------------------------------------------

def test_query_status_reports_a_running_vm(rig):
    r = rig()
    status = r.ok("query-status")
    assert status["running"] is True
    assert status["status"] == "running"


def test_job_queries_are_empty_without_a_job(rig):
    r = rig()
    assert r.ok("query-block-jobs") == []
    assert r.ok("query-jobs") == []


def test_query_block_jobs_reports_every_field_with_its_type(rig):
    r = rig()
    r.start(speed=1 * M)
    job = r.wait_copying()
    types = {"type": str, "device": str, "len": int, "offset": int,
             "busy": bool, "paused": bool, "speed": int, "io-status": str,
             "ready": bool, "status": str, "auto-finalize": bool,
             "auto-dismiss": bool, "actively-synced": bool,
             "copy-mode": str}
    assert set(types) <= set(job), job
    for field, typ in types.items():
        assert type(job[field]) is typ, (field, job)
    assert set(job) - set(types) <= {"error"}, job
    assert job["type"] == "mirror" and job["device"] == JOB
    assert job["status"] == "running" and job["ready"] is False
    assert job["paused"] is False and job["io-status"] == "ok"
    assert job["speed"] == 1 * M
    assert 0 < job["offset"] < job["len"] == r.size


def test_query_jobs_reports_status_and_progress(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_copying()
    (job,) = r.ok("query-jobs")
    assert set(job) - {"error"} == {"id", "type", "status",
                                    "current-progress", "total-progress"}
    assert job["id"] == JOB and job["type"] == "mirror"
    assert job["status"] == "running"
    assert 0 < job["current-progress"] < job["total-progress"] == r.size


# -- drive-mirror, complete, cancel: event sequences and bytes ------------------

@pytest.mark.parametrize("verb,args", [("block-job-complete", {"device": JOB}),
                                       ("job-complete", {"id": JOB})])
def test_complete_pivots_guest_to_target_after_ready(rig, verb, args):
    r = rig()
    r.start()
    events = r.events_until(lambda e: e["event"] == "BLOCK_JOB_READY")
    assert r.ok(verb, **args) == {}
    events += r.events_until_status("null")
    assert summary(events) == COMPLETED
    for e in events:
        assert set(e["timestamp"]) == {"seconds", "microseconds"}
    ready = only(events, "BLOCK_JOB_READY")["data"]
    assert ready == {"type": "mirror", "device": JOB, "len": r.size,
                     "offset": r.size, "speed": 0}
    done = only(events, "BLOCK_JOB_COMPLETED")["data"]
    assert "error" not in done and done["offset"] == done["len"] == r.size
    assert r.ok("query-block-jobs") == []
    # The target holds the source's bytes, and the guest now writes there.
    assert sha256_uri(r.tgt) == sha256_file(r.src)
    r.guest_write(0xA5, 0, 64 * K)
    assert reads_pattern(r.tgt, 0xA5, 0, 64 * K)
    assert read_file(r.src, 0, 64 * K) != b"\xa5" * (64 * K)


def test_second_drive_mirror_after_the_first_job_ended_starts_a_new_job(rig):
    r = rig()
    r.start()
    r.wait_status("ready")
    r.ok("block-job-complete", device=JOB)
    r.wait_status("null")
    tgt2 = r.new_target("tgt2")
    r.start(tgt2, **{"job-id": "mirror1"})
    events = r.events_until(lambda e: e["event"] == "BLOCK_JOB_READY")
    assert summary(events) == ["created", "running", "ready",
                               "BLOCK_JOB_READY"]
    assert {e["data"].get("id", e["data"].get("device")) for e in events} \
        == {"mirror1"}
    assert r.job()["device"] == "mirror1"
    # The second job copied from where the guest lives now: the first target.
    assert sha256_uri(tgt2) == sha256_uri(r.tgt) == sha256_file(r.src)
    r.ok("block-job-cancel", device="mirror1")     # let go of tgt2
    r.wait_status("null")


def test_soft_cancel_after_ready_completes_without_pivot(rig):
    r = rig()
    r.start()
    events = r.events_until(lambda e: e["event"] == "BLOCK_JOB_READY")
    assert r.ok("block-job-cancel", device=JOB) == {}
    events += r.events_until_status("null")
    assert summary(events) == COMPLETED
    assert "error" not in only(events, "BLOCK_JOB_COMPLETED")["data"]
    assert sha256_uri(r.tgt) == sha256_file(r.src)
    # The guest stays on the source: a new write is not on the target.
    r.guest_write(0x5A, 0, 64 * K)
    assert read_file(r.src, 0, 64 * K) == b"\x5a" * (64 * K)
    assert not reads_pattern(r.tgt, 0x5A, 0, 64 * K)


ABORTED = ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


@pytest.mark.parametrize("when,verb,args", [
    ("running", "block-job-cancel", {"device": JOB, "force": True}),
    ("running", "block-job-cancel", {"device": JOB}),
    ("running", "job-cancel", {"id": JOB}),
    ("ready", "block-job-cancel", {"device": JOB, "force": True}),
    ("ready", "job-cancel", {"id": JOB}),
])
def test_hard_cancel_ends_with_block_job_cancelled(rig, when, verb, args):
    r = rig()
    # Slow while running, so the job is surely not ready when cancelled.
    r.start(speed=1 * M if when == "running" else 0)
    events = r.events_until_status(when)
    assert r.ok(verb, **args) == {}
    events += r.events_until_status("null", timeout=5)
    before = ["created", "running"] if when == "running" else \
        ["created", "running", "ready", "BLOCK_JOB_READY"]
    assert summary(events) == before + ABORTED
    cancelled = only(events, "BLOCK_JOB_CANCELLED")["data"]
    assert set(cancelled) == {"type", "device", "len", "offset", "speed"}
    assert cancelled["device"] == JOB and cancelled["type"] == "mirror"
    assert r.ok("query-block-jobs") == []
    # The guest still reads and writes its disk on the source.
    r.guest_write(0x3C, 4 * M, 64 * K)
    assert read_file(r.src, 4 * M, 64 * K) == b"\x3c" * (64 * K)


# -- pause and resume -----------------------------------------------------------

PAUSE_VERBS = [
    ("block-job-pause", "block-job-resume", {"device": JOB}),
    ("job-pause", "job-resume", {"id": JOB}),
]


@pytest.mark.parametrize("pause,resume,args", PAUSE_VERBS)
def test_pause_and_resume_move_running_to_paused_and_back(rig, pause, resume,
                                                          args):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    assert r.ok(pause, **args) == {}
    r.wait_status("paused", timeout=10)
    job = r.job()
    assert job["paused"] is True and job["status"] == "paused"
    assert r.ok(resume, **args) == {}
    r.wait_status("running", timeout=10)
    job = r.job()
    assert job["paused"] is False and job["status"] == "running"


@pytest.mark.parametrize("pause,resume,args", PAUSE_VERBS)
def test_pause_and_resume_move_ready_to_standby_and_back(rig, pause, resume,
                                                         args):
    r = rig()
    r.start()
    r.wait_status("ready")
    assert r.ok(pause, **args) == {}
    r.wait_status("standby", timeout=10)
    assert r.job()["paused"] is True
    assert r.ok(resume, **args) == {}
    events = r.events_until_status("ready", timeout=10)
    assert summary(events) == ["ready"]
    # Mirroring goes on after standby: complete still gives a copy.
    r.guest_write(0x77, 1 * M, 64 * K)
    r.ok("block-job-complete", device=JOB)
    r.wait_status("null")
    assert reads_pattern(r.tgt, 0x77, 1 * M, 64 * K)


def test_pause_freezes_progress_while_guest_writes_are_served(rig):
    r = rig(size=64 * M)
    r.start(speed=4 * M)
    r.wait_status("running")
    poll(lambda: r.job()["offset"] >= 1 * M)
    r.ok("block-job-pause", device=JOB)
    r.wait_status("paused", timeout=10)
    first = r.job()
    time.sleep(1.0)       # a measurement window, not a synchronisation
    second = r.job()
    assert second["offset"] == first["offset"], (first, second)
    assert second["len"] == first["len"]
    # The first chunk was copied already: a guest write there makes it dirty
    # again, so len grows, while offset stays put.
    r.guest_write(0xC3, 0, 64 * K)
    third = r.job()
    assert third["offset"] == first["offset"]
    assert third["len"] > first["len"], (first, third)
    assert read_file(r.src, 0, 64 * K) == b"\xc3" * (64 * K)
    r.ok("block-job-resume", device=JOB)
    r.wait_status("running", timeout=10)
    poll(lambda: r.job()["offset"] > first["offset"], timeout=10)


# -- speed ---------------------------------------------------------------------------

def test_speed_limit_holds_the_copy_rate_then_unlimited_reaches_ready(
        workdir, procs, rig):
    # A source the copier reads far faster than the limit (all data, no
    # zero ranges to skip).
    size = 256 * M
    r = rig(size=size, source=make_filled(workdir / "big.img", size, 0x01))
    limit = 8 * M
    r.start(speed=limit)
    r.wait_copying()
    t0, off0 = time.monotonic(), r.job()["offset"]
    time.sleep(4.0)       # the measurement window
    t1, off1 = time.monotonic(), r.job()["offset"]
    rate = (off1 - off0) / (t1 - t0)
    assert 0.85 * limit <= rate <= 1.15 * limit, f"{rate / M:.2f} MiB/s"
    assert r.job()["status"] == "running"
    r.ok("block-job-set-speed", device=JOB, speed=0)
    assert r.job()["speed"] == 0
    r.wait_status("ready", timeout=30)


def test_set_speed_refuses_a_negative_rate_and_reports_a_new_one(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    desc = assert_error(r.execute("block-job-set-speed", device=JOB,
                                  speed=-1), "GenericError")
    assert "speed" in desc
    assert r.job()["speed"] == 1 * M
    assert r.ok("block-job-set-speed", device=JOB, speed=2 * M) == {}
    assert r.job()["speed"] == 2 * M


# -- block-job-change ------------------------------------------------------------

def test_block_job_change_to_write_blocking_and_not_back(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    assert r.ok("block-job-change", id=JOB, type="mirror",
                **{"copy-mode": "write-blocking"}) == {}
    desc = assert_error(r.execute("block-job-change", id=JOB, type="mirror",
                                  **{"copy-mode": "background"}),
                        "GenericError")
    assert "write-blocking" in desc and "background" in desc
    desc = assert_error(r.execute("block-job-change", id=JOB, type="mirror",
                                  **{"copy-mode": "sideways"}),
                        "GenericError")
    assert "sideways" in desc
    # The job goes on unharmed.
    r.ok("block-job-set-speed", device=JOB, speed=0)
    r.wait_status("ready")


def test_block_job_change_to_background_is_accepted(rig):
    r = rig()
    r.start()
    r.wait_status("ready")
    assert r.ok("block-job-change", id=JOB, type="mirror",
                **{"copy-mode": "background"}) == {}
    assert r.job()["status"] == "ready"


# -- the verb table ------------------------------------------------------------

def test_complete_while_running_is_refused_with_qemu_wording(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    for verb, args in [("block-job-complete", {"device": JOB}),
                       ("job-complete", {"id": JOB})]:
        assert_error(r.execute(verb, **args), "GenericError",
                     "Job 'mirror0' in state 'running' cannot accept "
                     "command verb 'complete'")
    assert r.job()["status"] == "running"


def test_complete_while_paused_is_refused_with_qemu_wording(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    r.ok("block-job-pause", device=JOB)
    r.wait_status("paused", timeout=10)
    assert_error(r.execute("block-job-complete", device=JOB), "GenericError",
                 "Job 'mirror0' in state 'paused' cannot accept "
                 "command verb 'complete'")


def test_drive_mirror_is_refused_while_a_job_is_active(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    tgt2 = r.new_target("tgt2")
    desc = assert_error(r.mirror(tgt2, **{"job-id": "other"}), "GenericError")
    assert JOB in desc
    assert r.job()["device"] == JOB


BLOCK_JOB_VERBS = [
    ("block-job-complete", {}), ("block-job-cancel", {}),
    ("block-job-cancel", {"force": True}), ("block-job-pause", {}),
    ("block-job-resume", {}), ("block-job-set-speed", {"speed": 0}),
]
JOB_VERBS = ["job-complete", "job-cancel", "job-pause", "job-resume"]


def assert_no_job_commands_fail(r):
    for verb, extra in BLOCK_JOB_VERBS:
        assert_error(r.execute(verb, device=JOB, **extra), "DeviceNotActive",
                     f"Block job '{JOB}' not found")
    for verb in JOB_VERBS:
        assert_error(r.execute(verb, id=JOB), "GenericError",
                     "Job not found")           # QEMU's words
    assert_error(r.execute("block-job-change", id=JOB, type="mirror",
                           **{"copy-mode": "background"}), "DeviceNotActive")


def test_job_commands_without_a_job_fail_with_device_not_active(rig):
    assert_no_job_commands_fail(rig())


def test_job_commands_after_the_job_ended_fail_with_device_not_active(rig):
    r = rig()
    r.start()
    r.wait_status("ready")
    r.ok("block-job-complete", device=JOB)
    r.wait_status("null")
    assert_no_job_commands_fail(r)


def test_job_commands_on_another_job_id_fail(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    assert_error(r.execute("block-job-pause", device="nosuch"),
                 "DeviceNotActive")
    assert_error(r.execute("job-pause", id="nosuch"), "GenericError")
    assert r.job()["paused"] is False


# -- drive-mirror arguments ------------------------------------------------------

def test_drive_mirror_granularity_sets_the_recopied_unit(rig):
    """One 4 KiB guest write after ready re-copies exactly one chunk of
    `granularity` bytes, which BLOCK_JOB_COMPLETED's offset shows."""
    r = rig()
    r.start(granularity=1 * M, **{"buf-size": 1 * M})
    r.wait_status("ready")
    r.guest_write(0x11, 3 * M + 8 * K, 4 * K)
    r.ok("block-job-complete", device=JOB)
    done = wait_event(r.client, "BLOCK_JOB_COMPLETED")["data"]
    assert done["offset"] == done["len"] == r.size + 1 * M
    assert sha256_uri(r.tgt) == sha256_file(r.src)


def test_drive_mirror_target_is_zero_skips_zero_ranges(workdir, procs, rig):
    """The option is a promise: with it, ranges the source reads as zero are
    not written.  A target that holds data proves it was taken at its word."""
    size = 8 * M
    src = make_image(workdir / "sparse.img", size)          # all zero ...
    with open(src, "r+b") as f:                              # ... but 1 MiB
        f.seek(2 * M)
        f.write(b"\x42" * M)
    r = rig(size=size, source=src)
    junk = make_image(workdir / "junk.img", size, seed=9)
    tgt = qemu_nbd(procs, junk, workdir / "junk.sock")
    r.start(tgt, **{"target-is-zero": True})
    r.wait_status("ready")
    r.ok("block-job-cancel", device=JOB)
    r.wait_status("null")
    assert reads_pattern(tgt, 0x42, 2 * M, M)               # data copied
    assert not reads_pattern(tgt, 0, 0, 64 * K)              # zeroes skipped


def test_drive_mirror_without_target_is_zero_writes_zero_ranges(workdir, procs,
                                                                rig):
    size = 8 * M
    src = make_image(workdir / "sparse.img", size)
    r = rig(size=size, source=src)
    junk = make_image(workdir / "junk.img", size, seed=9)
    tgt = qemu_nbd(procs, junk, workdir / "junk.sock")
    r.start(tgt)
    r.wait_status("ready")
    r.ok("block-job-cancel", device=JOB)
    r.wait_status("null")
    assert sha256_file(junk) == sha256_file(src)


def test_drive_mirror_speed_and_job_id_default(rig):
    r = rig()
    args = {"device": DEVICE, "target": r.tgt, "sync": "full",
            "speed": 1 * M}
    assert r.ok("drive-mirror", **args) == {}
    first = wait_event(r.client, "JOB_STATUS_CHANGE")["data"]
    # As in QEMU, the job is named after the device when no job-id is given.
    assert first == {"id": DEVICE, "status": "created"}
    job = r.job()
    assert job["device"] == DEVICE and job["speed"] == 1 * M


@pytest.mark.parametrize("args,cls,words", [
    ({"granularity": 3000}, "GenericError", "granularity"),
    ({"granularity": 128 * M}, "GenericError", "granularity"),
    ({"buf-size": 100}, "GenericError", "buf-size"),
    ({"speed": -1}, "GenericError", "speed"),
    ({"sync": "most"}, "GenericError", "sync"),
    ({"copy-mode": "sideways"}, "GenericError", "copy-mode"),
    ({"on-target-error": "explode"}, "GenericError", "on-target-error"),
    ({"target": "/tmp/not-a-uri"}, "GenericError", "target"),
    ({"target": "nbd+unix:///?socket=/nonexistent/x.sock"}, "GenericError",
     "/nonexistent/x.sock"),
    ({"device": "disk9"}, "DeviceNotFound", "disk9"),
    ({"granularity": "64K"}, "GenericError", "granularity"),
])
def test_drive_mirror_refuses_bad_arguments_and_starts_nothing(rig, args, cls,
                                                               words):
    r = rig()
    desc = assert_error(r.mirror(**args), cls)
    assert words in desc, desc
    assert r.ok("query-block-jobs") == []
    r.start()                        # the proxy is still fine
    r.wait_status("ready")


def test_drive_mirror_refuses_a_target_of_another_size(workdir, procs, rig):
    r = rig()
    small = nbdkit_server(procs, workdir / "small.sock", "memory", "4M")
    desc = assert_error(r.mirror(small), "GenericError")
    assert "size" in desc
    assert r.ok("query-block-jobs") == []


# -- quit ---------------------------------------------------------------------------

def test_quit_stops_the_proxy_with_status_0(rig):
    r = rig()
    r.start(speed=1 * M)
    r.wait_status("running")
    assert r.ok("quit") == {}
    assert r.proxy.proc.wait(timeout=10) == 0
