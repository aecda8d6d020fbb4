"""A target that stalls or fails, in every phase of a job.

Stalls are real: SIGSTOP on the server process, or a flush that hangs
(tests/plugins/file_target.py).  What must hold whatever the target does:
the guest is answered (its requests are never held without a bound), a
force cancel ends the job within 5 s and the job never pivots after it,
connecting has a bound and a slow drive-mirror does not block other QMP
clients, every error goes through the on-target-error policy (with
BLOCK_JOB_ERROR, rate-limited under `ignore`).

The targets accept any number of clients (qemu-nbd -t -e 0, nbdkit), so
that these tests are about stalls, not about connection limits.
"""

import os
import pathlib
import select
import subprocess
import sys
import time

import pytest

from helpers import (REPO, EventLog, assert_holds, first_difference,
                     make_image, nbd_read_all, nbdmirror_env, ok,
                     qmp_execute, random_bytes, serve_args, start_proxy)
from servers import (CONNECT_TIMEOUT, IO_TIMEOUT, AioClient, GuestLoad,
                     RawQMP, Request, apply, can_connect, collect_events,
                     deadline_poll, execute_within, flush_fault_target,
                     frozen, marked_flushes, nbdkit_target, pwrite_file,
                     qemu_nbd_target, read_file)

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
SIZE = 8 * MiB
JOB = "mirror0"


class Rig:
    """A seeded source, a target (default: qemu-nbd -t -e 0 on a sparse
    image), and a proxy with no job whose QMP client sees the whole job:
    mirror() starts it."""

    def __init__(self, workdir, procs, qmp, target=None, seed=21,
                 **serve_options):
        self.workdir, self.procs = workdir, procs
        self.src = make_image(workdir / "src.img", SIZE, seed=seed)
        self.shadow = bytearray(random_bytes(seed, SIZE))
        if target is None:
            img = make_image(workdir / "tgt.img", SIZE)
            target = qemu_nbd_target(procs, img, workdir / "tgt.sock",
                                     "-t", "-e", "0")
        self.target = target
        self.proxy = start_proxy(procs, self.src, workdir / "g.sock",
                                 workdir / "qmp.sock", **serve_options)
        self.client = qmp(self.proxy.control)
        self.log = EventLog(self.client)

    def mirror(self, **options):
        args = {k.replace("_", "-"): v for k, v in options.items()}
        ok(qmp_execute(self.client, "drive-mirror", device="disk0",
                       target=self.target.uri, sync="full",
                       **{"job-id": JOB}, **args))

    def jobs(self):
        return ok(qmp_execute(self.client, "query-block-jobs"))

    def force_cancel_ends_job_within(self, seconds=5):
        """block-job-cancel force=true; BLOCK_JOB_CANCELLED and the end
        of the job within `seconds` of sending it."""
        sent = time.monotonic()
        ok(execute_within(self.client, seconds, "block-job-cancel",
                          device=JOB, force=True))
        self.log.wait("BLOCK_JOB_CANCELLED",
                      timeout=max(0.1, seconds - (time.monotonic() - sent)))
        self.log.wait_end(
            timeout=max(0.1, seconds - (time.monotonic() - sent)))
        assert not self.log.named("BLOCK_JOB_COMPLETED"), self.log.tokens()

    def assert_guest_on_source(self, guest):
        """Data put straight into the source file reads back through the
        proxy (on `guest`, a connection opened earlier, and on a new one),
        and a guest write lands in the source file."""
        pattern = b"\xe7" * 65536
        pwrite_file(self.src, pattern, 6 * MiB + 512)
        self.shadow[6 * MiB + 512:6 * MiB + 512 + len(pattern)] = pattern
        fresh = AioClient(self.proxy.uri)
        for c in (guest, fresh):
            read = c.run([Request("read", 6 * MiB + 512, len(pattern))])[0]
            assert read.result == pattern, \
                "a read through the proxy did not come from the source"
        write = Request("write", MiB + 3, 5000, b"\x4d" * 5000)
        fresh.run([write])
        apply(self.shadow, [write])
        fresh.close()
        assert_holds(str(self.src), bytes(self.shadow), "source file")

    def assert_never_pivots(self, guest):
        """After the target woke up: it serves again, the job stays gone
        (no late pivot), and the guest is still on the source."""
        assert can_connect(self.target.uri, timeout=10), \
            "the target did not serve again after SIGCONT"
        late = collect_events(self.log, 1.0)
        assert not [e for e in late if e["event"] in (
            "BLOCK_JOB_COMPLETED", "BLOCK_JOB_READY")], late
        assert self.jobs() == []
        self.assert_guest_on_source(guest)


@pytest.fixture
def rig(workdir, procs, qmp):
    return lambda **kw: Rig(workdir, procs, qmp, **kw)


def read_and_write(shadow):
    """A guest read and a guest write, on ranges apart from each other."""
    read = Request("read", 3 * MiB + 5, 65536)
    write = Request("write", 5 * MiB + 7, 70000, b"\xa5" * 70000)
    return read, write


def assert_answered(reqs, shadow):
    failed = [r for r in reqs if r.error]
    assert not failed, failed
    for r in reqs:
        if r.kind == "read":
            assert r.result == shadow[r.offset:r.offset + r.length], r
    apply(shadow, reqs)


# -- complete while the target is stopped -------------------------------------------

def test_complete_with_stopped_target_answers_guest_then_force_cancel_ends_job(
        rig):
    """The final flush of the pivot cannot finish: within a bounded hold
    the guest is answered (the pivot abandoned, the guest on the source);
    `stop` keeps the job, and a force cancel then ends it within 5 s."""
    r = rig(io_timeout=IO_TIMEOUT)
    r.mirror(on_target_error="stop")
    r.log.wait("BLOCK_JOB_READY")
    guest = AioClient(r.proxy.uri)
    with frozen(r.target.proc):
        ok(execute_within(r.client, 5, "block-job-complete", device=JOB))
        reqs = guest.submit_all(read_and_write(r.shadow))
        guest.wait(reqs, 10)
        assert_answered(reqs, r.shadow)
        assert r.jobs(), "the job ended on its own, despite on-target-error=stop"
        r.force_cancel_ends_job_within(5)
    r.assert_never_pivots(guest)


def test_force_cancel_during_stalled_complete_ends_job_and_never_pivots(rig):
    """Cancel while the pivot waits on the stopped target: the job ends
    within 5 s, the guest requests held meanwhile are answered, and when
    the target wakes up the job does not pivot after all."""
    r = rig()
    r.mirror()
    r.log.wait("BLOCK_JOB_READY")
    guest = AioClient(r.proxy.uri)
    with frozen(r.target.proc):
        ok(execute_within(r.client, 5, "block-job-complete", device=JOB))
        reqs = guest.submit_all(read_and_write(r.shadow))
        r.force_cancel_ends_job_within(5)
        guest.wait(reqs, 10 - (time.monotonic() - reqs[0].submitted))
        assert_answered(reqs, r.shadow)
    r.assert_never_pivots(guest)


# -- a flush that hangs ----------------------------------------------------------------

@pytest.mark.parametrize("phase", ["before-ready", "during-complete"])
def test_force_cancel_while_target_flush_hangs_ends_job_within_5s(
        workdir, procs, rig, phase):
    trigger, marker = workdir / "hang", workdir / "flushes"
    img = make_image(workdir / "tgt.img", SIZE)
    target = flush_fault_target(procs, img, workdir / "tgt.sock", trigger,
                                "hang", marker)
    try:
        r = rig(target=target)
        if phase == "before-ready":
            trigger.touch()
            r.mirror(on_target_error="stop")
            deadline_poll(lambda: marked_flushes(marker), 30,
                          "the job's flush to the target")
        else:
            r.mirror(on_target_error="stop")
            r.log.wait("BLOCK_JOB_READY")
            trigger.touch()
            ok(execute_within(r.client, 5, "block-job-complete", device=JOB))
            deadline_poll(lambda: marked_flushes(marker), 10,
                          "the pivot's flush to the target")
        r.force_cancel_ends_job_within(5)
        if phase == "before-ready":
            assert not r.log.named("BLOCK_JOB_READY")
        guest = AioClient(r.proxy.uri)
        r.assert_guest_on_source(guest)
    finally:
        trigger.unlink(missing_ok=True)     # the hung flush returns


# -- write-blocking ----------------------------------------------------------------------

def test_write_blocking_writes_held_by_stopped_target_are_released_by_force_cancel(
        rig):
    """Write-through writes wait for the stopped target once they reached
    the source; a force cancel answers all of them within 5 s, with
    success, and each is on the source."""
    r = rig()
    r.mirror(copy_mode="write-blocking")
    r.log.wait("BLOCK_JOB_READY")
    guest = AioClient(r.proxy.uri)
    writes = [Request("write", i * MiB + 4097 * i + 1, 65536,
                      bytes([0x30 + i]) * 65536) for i in range(8)]
    with frozen(r.target.proc):
        guest.submit_all(writes)
        # Write-throughs under way: the first ones are on the source.
        deadline_poll(lambda: any(read_file(r.src, w.offset, w.length)
                                  == w.data for w in writes), 10,
                      "a guest write reaching the source file")
        sent = time.monotonic()
        ok(execute_within(r.client, 5, "block-job-cancel", device=JOB,
                          force=True))
        guest.wait(writes, max(0.1, 5 - (time.monotonic() - sent)))
        failed = [w for w in writes if w.error]
        assert not failed, f"writes on the source were not acknowledged: " \
                           f"{failed}"
        r.log.wait("BLOCK_JOB_CANCELLED",
                   timeout=max(0.1, 5 - (time.monotonic() - sent)))
        r.log.wait_end(timeout=max(0.1, 5 - (time.monotonic() - sent)))
    apply(r.shadow, writes)
    assert_holds(str(r.src), bytes(r.shadow), "source file")


# -- connecting to a stopped server ------------------------------------------------------

def test_serve_with_target_on_stopped_server_times_out_with_one_line(
        workdir, procs):
    img = make_image(workdir / "tgt.img", SIZE)
    target = qemu_nbd_target(procs, img, workdir / "tgt.sock", "-t", "-e", "0")
    src = make_image(workdir / "src.img", SIZE, seed=22)
    with frozen(target.proc):
        started = time.monotonic()
        proc = procs.start(
            [sys.executable, "-m", "nbdmirror",
             *serve_args(src, workdir / "g.sock", workdir / "qmp.sock",
                         target.uri, connect_timeout=CONNECT_TIMEOUT)],
            name="nbdmirror", env=nbdmirror_env(), cwd=REPO)
        try:
            rc = proc.wait(CONNECT_TIMEOUT + 3)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still runs {CONNECT_TIMEOUT + 3} s after "
                        f"start, with --connect-timeout {CONNECT_TIMEOUT}")
        took = time.monotonic() - started
    lines = [l for l in procs.output(proc).splitlines() if l.strip()]
    assert rc != 0, lines
    assert len(lines) == 1, lines
    assert str(target.sock) in lines[0], lines
    assert "timed out" in lines[0].lower(), lines
    assert took >= CONNECT_TIMEOUT - 0.5, f"gave up after {took:.1f} s"
    assert not os.path.exists(workdir / "g.sock")


def test_drive_mirror_to_stopped_server_fails_in_time_and_other_clients_are_answered(
        workdir, procs):
    """8 clients each send drive-mirror to a stopped server: each gets an
    error within connect-timeout + 2 s, and meanwhile another client's
    query-block-jobs is answered within 1 s, every time."""
    img = make_image(workdir / "tgt.img", SIZE)
    target = qemu_nbd_target(procs, img, workdir / "tgt.sock", "-t", "-e", "0")
    src = make_image(workdir / "src.img", SIZE, seed=23)
    shadow = bytearray(random_bytes(23, SIZE))
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock",
                        connect_timeout=CONNECT_TIMEOUT)
    watcher = RawQMP(proxy.control).negotiate()
    movers = [RawQMP(proxy.control).negotiate() for _ in range(8)]
    limit = CONNECT_TIMEOUT + 2
    try:
        with frozen(target.proc):
            sent = {}
            for i, m in enumerate(movers):
                m.send("drive-mirror", {"device": "disk0",
                                        "target": target.uri,
                                        "sync": "full", "job-id": f"m{i}"})
                sent[i] = time.monotonic()
            replies, queries = {}, []
            end = time.monotonic() + limit + 1
            while len(replies) < len(movers) and time.monotonic() < end:
                asked = time.monotonic()
                watcher.send("query-block-jobs")
                answer = watcher.reply(1.0)
                queries.append(time.monotonic() - asked)
                assert answer is not None and "return" in answer, \
                    f"query-block-jobs not answered within 1 s ({answer}) " \
                    f"while drive-mirrors wait on a stopped server"
                waiting = [m for i, m in enumerate(movers) if i not in replies]
                select.select(waiting, [], [], 0.2)
                for i, m in enumerate(movers):
                    if i not in replies and (msg := m.reply(0)) is not None:
                        replies[i] = (msg, time.monotonic() - sent[i])
        missing = sorted(set(range(len(movers))) - set(replies))
        assert not missing, f"drive-mirror of clients {missing} got no " \
                            f"reply within {limit + 1} s"
        for i, (msg, took) in sorted(replies.items()):
            assert "error" in msg, f"client {i}: {msg}"
            assert took <= limit, f"client {i} waited {took:.1f} s"
        assert max(queries) < 1.0
        assert watcher.execute("query-block-jobs") == {"return": []}
    finally:
        for c in (watcher, *movers):
            c.close()
    # The guest is still served from the source.
    guest = AioClient(proxy.uri)
    write = Request("write", 2 * MiB + 9, 3000, b"\x61" * 3000)
    guest.run([write])
    apply(shadow, [write])
    guest.close()
    assert_holds(str(src), bytes(shadow), "source file")


# -- errors under a policy ------------------------------------------------------------

def test_ignore_policy_with_failing_final_flush_rate_limits_errors_and_serves_guest(
        workdir, procs, rig):
    """on-target-error=ignore, and the pivot's flush fails every time: the
    job retries with back-off (fewer than 50 BLOCK_JOB_ERROR a second),
    the guest keeps being answered, and once the target heals the pivot
    succeeds."""
    trigger, marker = workdir / "fail", workdir / "flushes"
    img = make_image(workdir / "tgt.img", SIZE)
    target = flush_fault_target(procs, img, workdir / "tgt.sock", trigger,
                                "fail", marker)
    r = rig(target=target)
    r.mirror(on_target_error="ignore")
    r.log.wait("BLOCK_JOB_READY")
    load = GuestLoad(r.proxy.uri, depth=4, region=(0, MiB),
                     shadow=r.shadow).start()
    load.wait_ops(20)

    trigger.touch()
    ok(execute_within(r.client, 5, "block-job-complete", device=JOB))
    first = r.log.wait("BLOCK_JOB_ERROR", timeout=10)
    assert first["data"] == {"device": JOB, "operation": "write",
                             "action": "ignore"}, first
    ops = load.ops
    window = collect_events(r.log, 3.0)
    served = load.ops - ops
    errors = [e for e in window if e["event"] == "BLOCK_JOB_ERROR"]
    assert len(errors) < 3 * 50, \
        f"{len(errors)} BLOCK_JOB_ERROR in 3 s: no back-off"
    assert load.error is None, load.error
    assert served >= 30, f"the guest got {served} requests answered in 3 s"
    deadline_poll(lambda: marked_flushes(marker) >= 2, 15,
                  "a retry of the failed flush (ignore)")

    trigger.unlink()
    done = r.log.wait("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done["data"], done
    r.log.wait_end()
    load.wait_ops(load.ops + 20)            # on the target now
    load.stop()
    expected = bytes(r.shadow)
    diff = first_difference(nbd_read_all(target.uri), expected)
    assert diff is None, f"target: {diff}"
    diff = first_difference(nbd_read_all(r.proxy.uri), expected)
    assert diff is None, f"guest view: {diff}"


@pytest.mark.parametrize("run", range(5))
def test_target_killed_mid_copy_with_stop_policy_pauses_job(
        workdir, procs, rig, run):
    """SIGKILL the target while copies are in flight: after the reconnect
    delay, on-target-error=stop applies, every time: BLOCK_JOB_ERROR with
    action stop, the job paused with io-status failed, never a failed
    job."""
    img = make_image(workdir / "tgt.img", SIZE)
    # 2 Mbit/s: the copy would take half a minute; writes stay in flight.
    target = nbdkit_target(procs, img, workdir / "tgt.sock", "rate=2M",
                           filters=["rate"], kind="nbdkit-rate")
    r = rig(target=target)
    r.mirror(on_target_error="stop", reconnect_delay=1)
    deadline_poll(lambda: " Write " in pathlib.Path(target.log).read_text(),
                  10, "a copy write reaching the target")
    procs.kill(target.proc)                     # SIGKILL
    err = r.log.wait("BLOCK_JOB_ERROR", timeout=15)
    assert err["data"] == {"device": JOB, "operation": "write",
                           "action": "stop"}, err
    r.log.wait("JOB_STATUS_CHANGE", "paused", timeout=5)
    job = r.jobs()[0]
    assert (job["status"], job["paused"], job["io-status"]) == \
        ("paused", True, "failed"), job
    assert not r.log.named("BLOCK_JOB_COMPLETED"), r.log.tokens()
    diff = first_difference(nbd_read_all(r.proxy.uri), bytes(r.shadow))
    assert diff is None, f"guest view: {diff}"
