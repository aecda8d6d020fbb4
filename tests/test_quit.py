"""QMP `quit` quits: with guests connected, in every phase of a job.

One guest connection is open and idle, another keeps 8 requests in flight.
Whatever the job does (none, copying to a slow target, ready, ready in
write-blocking mode, copying while the target is stopped), `quit` is
answered, and the proxy exits within 5 s with status 0, having removed
the guest socket, the control socket and its pid file.  After ready, quit
ends the job as a soft cancel: the target is left equal to the source.
SIGTERM does the same as quit.
"""

import contextlib
import os
import random
import signal
import subprocess
import time

import pytest

from helpers import (EventLog, first_difference, make_image, nbd_read_all,
                     ok, qmp_execute, random_bytes, start_proxy)
from servers import (AioClient, GuestLoad, apply, execute_within, frozen,
                     nbdkit_target, plan_batch, qemu_nbd_target, read_file)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SIZE = 8 * MiB
JOB = "mirror0"
PHASES = ["no-job", "running-slow-target", "ready", "write-blocking-ready",
          "target-stopped"]


class Rig:
    def __init__(self, workdir, procs, qmp, phase, seed=31):
        self.phase = phase
        self.src = make_image(workdir / "src.img", SIZE, seed=seed)
        self.shadow = bytearray(random_bytes(seed, SIZE))
        self.target = None
        img = make_image(workdir / "tgt.img", SIZE)
        if phase == "running-slow-target":
            # 8 Mbit/s: the copy takes ~8 s, quit comes in the middle of it.
            self.target = nbdkit_target(procs, img, workdir / "tgt.sock",
                                        "rate=8M", filters=["rate"],
                                        kind="nbdkit-rate")
        elif phase != "no-job":
            self.target = qemu_nbd_target(procs, img, workdir / "tgt.sock",
                                          "-t", "-e", "0")
        self.pidfile = workdir / "nbdmirror.pid"
        self.proxy = start_proxy(procs, self.src, workdir / "g.sock",
                                 workdir / "qmp.sock", pidfile=self.pidfile)
        self.client = qmp(self.proxy.control)
        self.log = EventLog(self.client)

    def job_args(self):
        """drive-mirror's arguments beyond the phase's own."""
        return {"job-id": JOB}

    def start_job(self):
        """Bring the job to the rig's phase."""
        if self.phase == "no-job":
            return
        args = self.job_args()
        if self.phase == "write-blocking-ready":
            args["copy-mode"] = "write-blocking"
        if self.phase == "target-stopped":
            args["speed"] = 1 * MiB         # still copying when stopped
        ok(qmp_execute(self.client, "drive-mirror", device="disk0",
                       target=self.target.uri, sync="full", **args))
        if self.phase.endswith("ready"):
            self.log.wait("BLOCK_JOB_READY")
        else:
            self.log.wait("JOB_STATUS_CHANGE", "running")

    def stalled(self):
        """Context: the target stopped (phase target-stopped), or nothing."""
        if self.phase == "target-stopped":
            return frozen(self.target.proc)
        return contextlib.nullcontext()

    def quit_exits_within(self, seconds=5):
        """quit is answered; the proxy exits within `seconds`, status 0,
        and leaves neither socket nor pid file behind."""
        proc = self.proxy.proc
        pid = int(read_file(self.pidfile))
        os.kill(pid, 0)                 # the pid file names a live process
        sent = time.monotonic()
        reply = execute_within(self.client, seconds, "quit")
        assert reply == {"return": {}}, reply
        try:
            rc = proc.wait(max(0.1, seconds - (time.monotonic() - sent)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the proxy still runs {seconds} s after quit "
                        f"({self.phase})")
        assert rc == 0, f"exit status {rc}"
        left = [p for p in (self.proxy.socket, self.proxy.control,
                            self.pidfile) if os.path.exists(p)]
        assert not left, f"left behind: {left}"


@pytest.mark.parametrize("phase", PHASES)
def test_quit_with_connected_guests_exits_within_5s_and_cleans_up(
        workdir, procs, qmp, phase):
    r = Rig(workdir, procs, qmp, phase)
    r.start_job()
    idle = AioClient(r.proxy.uri)
    load = GuestLoad(r.proxy.uri, depth=8, kinds=("write", "read")).start()
    load.wait_ops(16)
    with r.stalled():
        if phase == "target-stopped":
            load.wait_ops(load.ops + 16)    # still served from the source
        r.quit_exits_within(5)
    load.stop()
    idle.close()


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_quit_when_ready_leaves_target_equal_to_source(
        workdir, procs, qmp, mode):
    """After ready, quit is a soft cancel: whatever the guest wrote before
    it is on the target too, while reads are in flight."""
    r = Rig(workdir, procs, qmp, "ready" if mode == "background"
            else "write-blocking-ready")
    r.start_job()
    guest = AioClient(r.proxy.uri)
    apply(r.shadow, guest.run(plan_batch(random.Random(5), SIZE, 16,
                                         ("write", "zero", "write+fua"))))
    load = GuestLoad(r.proxy.uri, depth=8, kinds=("read",)).start()
    load.wait_ops(16)
    r.quit_exits_within(5)
    load.stop()
    expected = bytes(r.shadow)
    assert first_difference(read_file(r.src), expected) is None, \
        "source file differs from what the guest wrote"
    diff = first_difference(nbd_read_all(r.target.uri), expected)
    assert diff is None, f"target after quit in ready: {diff}"


def test_sigterm_with_busy_guest_when_ready_exits_within_5s_and_cleans_up(
        workdir, procs, qmp):
    """SIGTERM stops the proxy as quit does."""
    r = Rig(workdir, procs, qmp, "ready")
    r.start_job()
    load = GuestLoad(r.proxy.uri, depth=8, kinds=("write", "read")).start()
    load.wait_ops(16)
    proc = r.proxy.proc
    sent = time.monotonic()
    procs.kill(proc, signal.SIGTERM)
    try:
        rc = proc.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail("the proxy still runs 5 s after SIGTERM")
    took = time.monotonic() - sent
    load.stop()
    assert rc == 0, f"exit status {rc} after SIGTERM ({took:.1f} s)"
    left = [p for p in (r.proxy.socket, r.proxy.control, r.pidfile)
            if os.path.exists(p)]
    assert not left, f"left behind: {left}"
