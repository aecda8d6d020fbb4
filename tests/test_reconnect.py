"""A target that goes away and comes back: the job reconnects and copies
again what was dirty or in flight, and what the target had not flushed
(INTERFACE §4b; nbdmirror/unflushed.py).

After a pivot the target is the guest's disk: a lost connection is made
again, and a guest request waits for it up to reconnect-delay.

The target is killed (SIGKILL) and started again on the same socket and
file.  A qemu-nbd on a raw file keeps what it acknowledged (the page cache
outlives the process); tests/plugins/file_target.py with volatile=1 loses every write
since its last flush, as NBD allows a server to.
"""

import contextlib
import signal
import subprocess
import time

import nbd
import pytest

from helpers import (EventLog, assert_holds, guest_write, job_status,
                     make_image, nbdkit_server, ok, qemu_nbd, qmp_execute,
                     random_bytes, start_proxy)
from servers import PLUGINS, frozen, in_thread, wait_in_log

MiB = 1 << 20
SIZE = 64 * MiB
BUF = 4 * MiB


class Rig:
    """Source, a killable target (`kind`: qemu-nbd, or volatile: a write
    cache only flushes empty), a proxy mirroring between them."""

    def __init__(self, workdir, procs, qmp, kind="qemu-nbd", **opts):
        self.workdir, self.procs, self.kind = workdir, procs, kind
        self.src = make_image(workdir / "src.img", SIZE, seed=7)
        self.shadow = bytearray(random_bytes(7, SIZE))
        self.tgt_img = make_image(workdir / "tgt.img", SIZE)
        self.tgt_sock = workdir / "tgt.sock"
        self.target = self.restart_target()
        self.proxy = start_proxy(procs, self.src, workdir / "g.sock",
                                 workdir / "qmp.sock", target=self.target,
                                 buf_size="4M", **opts)
        self.log = EventLog(qmp(self.proxy.control))

    def kill_target(self):
        proc = next(p for p in self.procs.procs if p.name == self.server)
        self.procs.kill(proc, signal.SIGKILL)
        proc.wait(10)
        self.procs.procs.remove(proc)
        self.tgt_sock.unlink()

    def restart_target(self):
        if self.kind == "qemu-nbd":
            self.server = "qemu-nbd"
            return qemu_nbd(self.procs, self.tgt_img, self.tgt_sock)
        self.server = "nbdkit"
        return nbdkit_server(self.procs, self.tgt_sock, "python",
                             str(PLUGINS / "file_target.py"),
                             f"file={self.tgt_img}", "volatile=1")

    def job(self):
        jobs = ok(qmp_execute(self.log.client, "query-block-jobs"))
        return jobs[0] if jobs else None

    def force_cancel_within(self, seconds):
        t0 = time.monotonic()
        ok(qmp_execute(self.log.client, "block-job-cancel",
                       device="mirror0", force=True))
        self.log.wait("BLOCK_JOB_CANCELLED", timeout=seconds)
        assert time.monotonic() - t0 < seconds

    def complete_and_check(self):
        ok(qmp_execute(self.log.client, "block-job-complete",
                       device="mirror0"))
        done = self.log.wait("BLOCK_JOB_COMPLETED")
        assert "error" not in done["data"], done
        self.check()
        return done

    def check(self):
        """The guest's view and the target hold what the guest wrote."""
        assert_holds(self.proxy.uri, bytes(self.shadow), "guest view")
        assert_holds(self.target, bytes(self.shadow), "target")


def wait_copied(rig, least):
    """Poll until the job copied at least `least` bytes (bounded)."""
    deadline = time.monotonic() + 20
    while rig.job()["offset"] < least:
        assert time.monotonic() < deadline, rig.job()
        time.sleep(0.02)


@pytest.mark.parametrize("kind", ["qemu-nbd", "volatile"])
def test_target_restarted_mid_copy_recopies_what_it_had_not_flushed(
        workdir, procs, qmp, kind):
    rig = Rig(workdir, procs, qmp, kind, speed="32M", reconnect_delay=20)
    wait_copied(rig, 16 * MiB)
    copied = rig.job()["offset"]
    rig.kill_target()
    lost = rig.log.wait("TARGET_DISCONNECTED", timeout=15)
    assert lost["data"]["device"] == "mirror0"
    assert "target-disconnected" in rig.job()
    assert rig.job()["status"] == "running"
    rig.restart_target()
    back = rig.log.wait("TARGET_RECONNECTED", timeout=15)
    assert back["data"]["downtime"] > 0
    ready = rig.log.wait("BLOCK_JOB_READY", timeout=30)
    # What this job wrote in all: the disk once, plus, again, what it had
    # written since its last flush (none yet: all of it, in whole 1 MiB
    # regions) and what was in flight (at most buf-size) or queued when
    # the connection went.
    recopied = ready["data"]["offset"] - SIZE
    assert copied <= recopied <= copied + 3 * BUF, (copied, ready["data"])
    assert "target-disconnected" not in rig.job()
    rig.complete_and_check()


def test_unflushed_guest_writes_lost_by_the_target_are_copied_again(
        workdir, procs, qmp):
    """Ready (the target flushed), the guest writes, the job copies the
    writes into the target's cache; the target dies before it flushes
    them.  Back, the target has lost them: the job copies them again."""
    rig = Rig(workdir, procs, qmp, "volatile", reconnect_delay=20)
    rig.log.wait("BLOCK_JOB_READY", timeout=30)
    guest_write(rig.proxy.uri, rig.shadow, (7 * MiB + 5, 200000, 0x3C),
                (40 * MiB, 65536, 0xC3))
    wait_copied(rig, SIZE + 2 * 65536)      # ... into the target's cache
    rig.kill_target()                       # within FLUSH_AGE: not flushed
    rig.log.wait("TARGET_DISCONNECTED", timeout=15)
    rig.restart_target()
    rig.log.wait("TARGET_RECONNECTED", timeout=15)
    rig.complete_and_check()


def test_target_lost_after_ready_stays_ready_and_copies_guest_writes_later(
        workdir, procs, qmp):
    rig = Rig(workdir, procs, qmp, reconnect_delay=20)
    rig.log.wait("BLOCK_JOB_READY", timeout=30)
    rig.kill_target()
    rig.log.wait("TARGET_DISCONNECTED", timeout=15)
    # The guest goes on, on the source, while the target is away.
    guest_write(rig.proxy.uri, rig.shadow, (5 * MiB + 3, 300000, 0x5A),
                (SIZE - 4096, 4096, 0xA5))
    assert job_status(rig.log.client) == "ready"
    rig.restart_target()
    rig.log.wait("TARGET_RECONNECTED", timeout=15)
    rig.complete_and_check()


@pytest.mark.parametrize("policy,ends", [("stop", False), ("report", True)])
def test_target_gone_past_the_delay_applies_on_target_error(
        workdir, procs, qmp, policy, ends):
    rig = Rig(workdir, procs, qmp, speed="16M", reconnect_delay=1,
              on_target_error=policy)
    wait_copied(rig, 4 * MiB)
    rig.kill_target()
    rig.log.wait("TARGET_DISCONNECTED", timeout=15)
    err = rig.log.wait("BLOCK_JOB_ERROR", timeout=15)
    assert err["data"] == {"device": "mirror0", "operation": "write",
                           "action": policy}
    if ends:
        done = rig.log.wait("BLOCK_JOB_COMPLETED", timeout=15)
        assert "error" in done["data"], done
        assert_holds(rig.proxy.uri, bytes(rig.shadow), "guest on source")
        return
    rig.log.wait("JOB_STATUS_CHANGE", "paused", timeout=10)
    assert rig.job()["io-status"] == "failed"
    # Back, and resumed: the job reconnects and goes on from its bitmap.
    rig.restart_target()
    ok(qmp_execute(rig.log.client, "block-job-resume", device="mirror0"))
    rig.log.wait("TARGET_RECONNECTED", timeout=15)
    ok(qmp_execute(rig.log.client, "block-job-set-speed", device="mirror0",
                   speed=0))
    rig.log.wait("BLOCK_JOB_READY", timeout=30)
    rig.complete_and_check()


def test_force_cancel_while_reconnecting_ends_within_5s(workdir, procs, qmp):
    rig = Rig(workdir, procs, qmp, speed="16M", reconnect_delay=60)
    wait_copied(rig, 4 * MiB)
    rig.kill_target()
    rig.log.wait("TARGET_DISCONNECTED", timeout=15)
    rig.force_cancel_within(5)
    assert_holds(rig.proxy.uri, bytes(rig.shadow), "guest on source")


def test_force_cancel_during_a_stalled_reconnect_ends_within_5s(
        workdir, procs, qmp):
    """The target stops (SIGSTOP): requests time out, the connection is
    dropped, and reconnecting hangs in the handshake (connect-timeout 30 s)
    until a force cancel abandons it."""
    rig = Rig(workdir, procs, qmp, speed="16M", io_timeout=1,
              connect_timeout=30, reconnect_delay=60)
    wait_copied(rig, 4 * MiB)
    proc = next(p for p in procs.procs if p.name == "qemu-nbd")
    procs.kill(proc, signal.SIGSTOP)
    try:
        rig.log.wait("TARGET_DISCONNECTED", timeout=15)
        rig.force_cancel_within(5)
    finally:
        procs.kill(proc, signal.SIGCONT)
    assert_holds(rig.proxy.uri, bytes(rig.shadow), "guest on source")


# -- after a pivot: the guest's disk -------------------------------------------

@contextlib.contextmanager
def pivoted(rig):
    """Ready, completed: the proxy serves the guest from the target.  Yields
    a guest connection that stays open (shut down at the end, if the proxy
    still answers)."""
    rig.log.wait("BLOCK_JOB_READY", timeout=30)
    rig.complete_and_check()
    h = nbd.NBD()
    h.connect_uri(rig.proxy.uri)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def written(rig, h, offset, payload):
    """The guest wrote `payload` at `offset` (answered): flushed, it is in
    the guest's view and on the target."""
    rig.shadow[offset:offset + len(payload)] = payload
    h.flush()
    rig.check()


def test_after_a_pivot_a_guest_write_waits_for_a_restarted_target(
        workdir, procs, qmp):
    rig = Rig(workdir, procs, qmp, reconnect_delay=20)
    with pivoted(rig) as h:
        rig.kill_target()
        payload = b"\x6b" * 65536
        t, outcome = in_thread(lambda: h.pwrite(payload, 9 * MiB + 512))
        # The write found the connection lost and waits (not failed).
        wait_in_log(rig.proxy.proc, "connection lost")
        assert outcome == []
        rig.restart_target()
        t.join(20)
        assert outcome == [("ok", None)]
        wait_in_log(rig.proxy.proc, "reconnected after")
        written(rig, h, 9 * MiB + 512, payload)


def test_after_a_pivot_a_stopped_target_is_dropped_then_reconnected(
        workdir, procs, qmp):
    """SIGSTOP: the guest's write times out (io-timeout), the connection
    is dropped, and the write waits for a new one; SIGCONT: the server
    answers the healer's handshake and the write goes through."""
    rig = Rig(workdir, procs, qmp, io_timeout=1, reconnect_delay=20)
    server = next(p for p in procs.procs if p.name == "qemu-nbd")
    with pivoted(rig) as h:
        payload = b"\x5e" * 4096
        with frozen(server):
            t, outcome = in_thread(lambda: h.pwrite(payload, 21 * MiB))
            wait_in_log(rig.proxy.proc, "connection lost")
            assert outcome == []
        t.join(20)
        assert outcome == [("ok", None)]
        written(rig, h, 21 * MiB, payload)


def test_after_a_pivot_a_target_away_past_the_delay_fails_requests_till_back(
        workdir, procs, qmp):
    rig = Rig(workdir, procs, qmp, reconnect_delay=1)
    with pivoted(rig) as h:
        rig.kill_target()
        with pytest.raises(nbd.Error):
            h.pwrite(b"\x11" * 4096, 0)         # past the 1 s: an error
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)                    # and the next at once
        wait_in_log(rig.proxy.proc, "cannot reconnect yet: ")   # says why
        rig.restart_target()
        # The proxy reconnected by itself: requests work again.
        wait_in_log(rig.proxy.proc, "reconnected after")
        h.pwrite(b"\x22" * 4096, 0)
        written(rig, h, 0, b"\x22" * 4096)


def test_after_a_pivot_sigterm_while_a_guest_waits_for_the_target_exits_in_5s(
        workdir, procs, qmp):
    """A guest write waits for a target that does not come back (delay 60
    s): SIGTERM still ends the proxy within 5 s (the write is never
    answered: the guest sees the server go, as after a crash)."""
    rig = Rig(workdir, procs, qmp, reconnect_delay=60)
    with pivoted(rig) as h:
        rig.kill_target()
        t, outcome = in_thread(lambda: h.pwrite(b"\x33" * 4096, 0))
        wait_in_log(rig.proxy.proc, "connection lost")
        procs.kill(rig.proxy.proc, signal.SIGTERM)
        try:
            rc = rig.proxy.proc.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("the proxy still runs 5 s after SIGTERM")
        assert rc == 0, rig.proxy.proc.log
        t.join(5)
        assert [how for how, _ in outcome] == ["raised"], outcome
