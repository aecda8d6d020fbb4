"""--bitmap end to end: restart, refusals, pivots, drive-mirror, sync modes.

Real servers and the real proxy (INTERFACE.md §4a).  A restarted proxy's
job may reach ready before a QMP client can connect, so progress is read
from query-block-jobs (whose `offset`, like BLOCK_JOB_READY's, counts what
this run copied).  Refusals are one line from `serve`, and the target's
image is byte-for-byte unchanged (sha256 before and after).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import (REPO, EventLog, guest_write, make_image, nbd_read_all,
                     nbdkit_server, nbdmirror_env, ok, qemu_img_compare,
                     qemu_nbd, qmp_execute, random_bytes,
                     sha256_file, start_proxy)
from nbdmirror import activitylog, bitmapfile
from servers import wait_in_log
from test_crash_resume import Writer, kill_hard, matches, wait_job
import test_quit
from test_sync_modes import top_chain, top_clusters  # noqa: F401

pytestmark = pytest.mark.timeout(90)

K, M = 1 << 10, 1 << 20
SIZE = 8 * M
GRAN = 64 * K
JOB = "mirror0"


def read(path):
    with open(path, "rb") as f:
        return f.read()


def marks(path):
    """(state, chunks marked) of the bitmap file at `path`."""
    bf = bitmapfile.BitmapFile.open(str(path))
    try:
        return bf.state, bf.load().count(1)
    finally:
        bf.close()


class Rig:
    def __init__(self, workdir, procs, qmp, seed=3):
        self.workdir, self.procs, self.qmp = workdir, procs, qmp
        self.src = make_image(workdir / "src.img", SIZE, seed=seed)
        self.tgt = make_image(workdir / "tgt.img", SIZE)
        self.shadow = bytearray(random_bytes(seed, SIZE))
        self.target = qemu_nbd(procs, self.tgt, workdir / "tgt.sock")
        self.bitmap = workdir / "dirty.bitmap"
        self.proxy = self.client = None

    def start(self, target=True, **opts):
        opts.setdefault("bitmap", self.bitmap)
        self.proxy = start_proxy(
            self.procs, self.src, self.workdir / "g.sock",
            self.workdir / "qmp.sock",
            target=self.target if target is True else target or None,
            **opts)
        self.client = self.qmp(self.proxy.control)
        return self.proxy

    def ready(self):
        return wait_job(self.client, ("ready",))

    def stop(self, how="quit"):
        """quit, SIGTERM (each: exit 0 within 5 s) or SIGKILL."""
        proc = self.proxy.proc
        if how == "quit":
            ok(qmp_execute(self.client, "quit"))
        elif how == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            kill_hard(self.proxy)
            return
        assert proc.wait(5) == 0, self.procs.output(proc)

    def complete(self):
        ok(qmp_execute(self.client, "block-job-complete", device=JOB))
        wait_job(self.client, (None,))

    def refused(self, *extra, status=1):
        """serve with the bitmap (and `extra`) exits `status` with one
        line; the target was not written.  Returns the line."""
        before = sha256_file(self.tgt)
        proc = self.procs.start(
            [sys.executable, "-m", "nbdmirror", "serve", "--foreground",
             "--source", self.src, "--socket", self.workdir / "g2.sock",
             "--control", self.workdir / "qmp2.sock", "--target",
             self.target, "--bitmap", self.bitmap, *extra],
            name="nbdmirror", env=nbdmirror_env(), cwd=REPO)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not refuse: still running")
        lines = [l for l in self.procs.output(proc).splitlines() if l.strip()]
        assert rc == status and len(lines) == 1, lines
        assert lines[0].startswith(f"nbdmirror: error: bitmap: "
                                   f"{self.bitmap}: "), lines
        assert sha256_file(self.tgt) == before, "the target was written"
        assert not os.path.exists(self.workdir / "g2.sock")
        return lines[0]

    def file_for(self, **changes):
        """A bitmap file as this rig's job would make it, with `changes`."""
        ident = dict(size=SIZE, granularity=GRAN, sync="full",
                     source=activitylog.spec_name(self.src),
                     target=activitylog.spec_name(self.target))
        ident.update(changes)
        bf = bitmapfile.BitmapFile.open(str(self.bitmap))
        activitylog.prepare(bf, bitmapfile.identity(**ident)).close()


# -- clean restarts -----------------------------------------------------------

@pytest.mark.parametrize("how", ["quit", "sigterm"])
def test_clean_restart_of_an_idle_ready_job_copies_nothing(
        how, workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.start()
    assert r.ready()["offset"] == SIZE
    r.stop(how)
    assert marks(r.bitmap) == ("active", 0)
    before = sha256_file(r.tgt)
    r.start()
    j = r.ready()
    assert (j["offset"], j["len"]) == (0, 0)
    assert sha256_file(r.tgt) == before
    r.complete()
    assert read(r.tgt) == bytes(r.shadow)


def test_clean_restart_copies_exactly_the_dirty_bytes(workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.start()
    r.ready()
    ok(qmp_execute(r.client, "block-job-pause", device=JOB))
    wait_job(r.client, ("standby",))
    guest_write(r.proxy.uri, r.shadow, (100 * K, 10, 0x61),
                (3 * M, 200 * K, 0x62), (SIZE - 1, 1, 0x63))
    j = ok(qmp_execute(r.client, "query-block-jobs"))[0]
    dirty = j["len"] - j["offset"]
    assert dirty == (1 + 4 + 1) * GRAN     # 200K from 3M: chunks 48-51
    r.stop("quit")
    assert marks(r.bitmap) == ("active", dirty // GRAN)
    r.start()
    assert r.ready()["offset"] == dirty
    r.complete()
    assert read(r.tgt) == bytes(r.shadow)


@pytest.mark.parametrize("phase", ["copying", "ready"])
def test_quit_while_a_guest_writes_loses_no_write(phase, workdir, procs, qmp):
    """Guests write until the proxy is gone: after the suspension's exact
    save too, their writes are marked before they reach the source."""
    r = Rig(workdir, procs, qmp)
    r.start(speed="4M" if phase == "copying" else None)
    wait_job(r.client, ("running" if phase == "copying" else "ready",))
    writer = Writer(r.proxy.uri, 5, r.shadow).start()
    while writer.ops < 200:
        time.sleep(0.01)
    ok(qmp_execute(r.client, "quit"))
    assert r.proxy.proc.wait(5) == 0
    writer.stop(died=True)
    r.start()
    r.ready()
    source = read(r.src)
    assert read(r.tgt) == source
    pending = writer.pending
    assert matches(source, r.shadow, pending) is None


def test_a_copy_stopped_midway_resumes_where_it_was(workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.start(speed="4M")
    wait_job(r.client, ("running",))
    while ok(qmp_execute(r.client, "query-block-jobs"))[0]["offset"] < 2 * M:
        time.sleep(0.02)
    r.stop("quit")
    state, marked = marks(r.bitmap)
    assert state == "active" and 0 < marked < SIZE // GRAN
    r.start()
    assert r.ready()["offset"] == marked * GRAN
    r.complete()
    assert read(r.tgt) == bytes(r.shadow)


# -- refusals -----------------------------------------------------------------

def corrupt(path):
    with open(path, "r+b") as f:
        f.seek(bitmapfile.HEADER + 17)
        f.write(b"\xa5")


def truncate(path):
    os.truncate(path, bitmapfile.HEADER + 100)


REFUSED = {
    "corrupt": (lambda r: (r.file_for(), corrupt(r.bitmap)),
                "corrupt marks: checksum mismatch in sector 0"),
    "truncated": (lambda r: (r.file_for(), truncate(r.bitmap)),
                  "truncated: 4196 bytes"),
    "granularity": (lambda r: r.file_for(granularity=4 * K),
                    "made for another granularity (4096, not 65536)"),
    "size": (lambda r: r.file_for(size=2 * SIZE),
             "made for another disk size"),
    "target": (lambda r: r.file_for(target="nbd://elsewhere/disk"),
               "made for another target (nbd://elsewhere/disk, not"),
    "source": (lambda r: r.file_for(source="/images/other.img"),
               "made for another source (/images/other.img, not"),
    "sync": (lambda r: r.file_for(sync="none"), "made for another sync mode"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bitmap_file_that_does_not_fit_is_refused_then_discarded(
        case, workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    damage, words = REFUSED[case]
    damage(r)
    line = r.refused()
    assert words in line and "bitmap-discard starts over" in line, line
    r.start(bitmap_discard=True)            # a full copy
    assert r.ready()["offset"] == SIZE
    r.complete()
    assert read(r.tgt) == bytes(r.shadow)


def test_a_refused_start_leaves_no_bitmap_file(workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.target = r.target.replace("tgt.sock", "nowhere.sock")
    proc = procs.start(
        [sys.executable, "-m", "nbdmirror", "serve", "--foreground",
         "--source", r.src, "--socket", workdir / "g.sock", "--control",
         workdir / "qmp.sock", "--target", r.target, "--bitmap", r.bitmap],
        name="nbdmirror", env=nbdmirror_env(), cwd=REPO)
    assert proc.wait(20) == 1
    assert "nowhere.sock" in procs.output(proc)
    assert not r.bitmap.exists()


def test_a_bitmap_file_in_use_by_another_proxy_is_refused(workdir, procs,
                                                           qmp):
    r = Rig(workdir, procs, qmp)
    r.start(sync="none")                    # writes nothing to the target
    r.ready()
    line = r.refused("--sync", "none")
    assert "in use: locked by another process" in line
    r.refused("--sync", "none", "--bitmap-discard")     # no matter what


def test_a_file_that_is_not_a_bitmap_is_never_replaced(workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.bitmap = workdir / "precious.img"
    make_image(r.bitmap, 1 * M, seed=9)
    before = sha256_file(r.bitmap)
    line = r.refused("--bitmap-discard")
    assert "not an nbdmirror bitmap file; not using it" in line
    assert sha256_file(r.bitmap) == before


@pytest.mark.parametrize("force", [False, True])
def test_a_cancelled_job_leaves_a_file_that_says_so(force, workdir, procs,
                                                    qmp):
    r = Rig(workdir, procs, qmp)
    r.start()
    r.ready()
    ok(qmp_execute(r.client, "block-job-cancel", device=JOB, force=force))
    wait_job(r.client, (None,))
    r.stop("quit")
    assert marks(r.bitmap)[0] == "cancelled"
    line = r.refused()
    assert "the job in it ended (cancelled); the target is out of date" \
        in line


# -- pivots -------------------------------------------------------------------

def test_after_a_pivot_a_restart_serves_the_target(workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.start()
    r.ready()
    r.complete()
    guest_write(r.proxy.uri, r.shadow, (1 * M, 4 * K, 0x71))   # on target
    r.stop("sigkill")
    assert marks(r.bitmap)[0] == "pivoted"
    with open(r.src, "r+b") as f:           # what a stale source may hold
        f.write(b"\xee" * 4096)
    for extra in ({}, {"bitmap_discard": True}):
        r.start(**extra)
        assert ok(qmp_execute(r.client, "query-block-jobs")) == []
        assert nbd_read_all(r.proxy.uri) == bytes(r.shadow)
        assert "the job pivoted; serving its target" in \
            procs.output(r.proxy.proc)
        guest_write(r.proxy.uri, r.shadow, (2 * M, 4 * K, 0x72))
        r.stop("quit")
    assert read(r.tgt) == bytes(r.shadow)


def test_after_a_pivot_a_restart_serves_the_target_and_reconnects_to_it(
        workdir, procs, qmp):
    """Served after a restart, the target is the guest's disk as after
    the pivot itself: a lost connection is made again (reconnect-delay)."""
    r = Rig(workdir, procs, qmp)
    r.start(reconnect_delay=20)
    r.ready()
    r.complete()
    r.stop("sigkill")
    r.start(reconnect_delay=20)
    wait_in_log(r.proxy.proc, "the job pivoted; serving its target")
    server = next(p for p in procs.procs if p.name == "qemu-nbd")
    procs.kill(server, signal.SIGKILL)
    server.wait(10)
    procs.procs.remove(server)
    (workdir / "tgt.sock").unlink()
    qemu_nbd(procs, r.tgt, workdir / "tgt.sock")
    guest_write(r.proxy.uri, r.shadow, (3 * M, 4 * K, 0x73))
    wait_in_log(r.proxy.proc, "reconnected after")
    r.stop("quit")
    assert read(r.tgt) == bytes(r.shadow)


def test_after_a_pivot_another_target_is_refused(workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.start()
    r.ready()
    r.complete()
    r.stop("quit")
    other = make_image(workdir / "other.img", SIZE)
    r.target = qemu_nbd(procs, other, workdir / "other.sock")
    before = sha256_file(other)
    r.tgt = other
    line = r.refused()
    assert "pivoted to its target, so the source is stale" in line and \
        "made for another target" in line, line
    assert sha256_file(other) == before


# -- drive-mirror -------------------------------------------------------------

def test_drive_mirror_with_a_bitmap_resumes_only_if_nothing_went_untracked(
        workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    args = {"device": "disk0", "target": r.target, "sync": "full",
            "job-id": JOB, "bitmap": str(r.bitmap)}
    r.start(target=False, bitmap=None)
    ok(qmp_execute(r.client, "drive-mirror", speed=4 * M, **args))
    while ok(qmp_execute(r.client, "query-block-jobs"))[0]["offset"] < 2 * M:
        time.sleep(0.02)
    r.stop("quit")
    marked = marks(r.bitmap)[1]
    assert 0 < marked < SIZE // GRAN
    # A proxy that served nothing yet: drive-mirror resumes.
    r.start(target=False, bitmap=None)
    ok(qmp_execute(r.client, "drive-mirror", **args))
    assert r.ready()["offset"] == marked * GRAN
    r.stop("quit")
    # A guest wrote before the job: that write was not tracked.
    r.start(target=False, bitmap=None)
    guest_write(r.proxy.uri, r.shadow, (5 * M, 4 * K, 0x81))
    reply = qmp_execute(r.client, "drive-mirror", **args)
    assert "the guest wrote since this proxy started" in \
        reply["error"]["desc"], reply
    ok(qmp_execute(r.client, "drive-mirror", **args,
                   **{"bitmap-discard": True}))
    assert r.ready()["offset"] == SIZE
    r.complete()
    assert read(r.tgt) == bytes(r.shadow)


def test_drive_mirror_refuses_a_bitmap_that_is_another_file_of_the_proxy(
        workdir, procs, qmp):
    r = Rig(workdir, procs, qmp)
    r.start(target=False, bitmap=None)
    reply = qmp_execute(r.client, "drive-mirror", device="disk0",
                        target=r.target, sync="full", bitmap=str(r.src))
    assert "bitmap: " in reply["error"]["desc"] and \
        "the same file as source" in reply["error"]["desc"], reply


# -- sync modes ---------------------------------------------------------------

def test_sync_none_resumes_after_sigkill(workdir, procs, qmp):
    """After a crash the job copies again whole hot regions (4 MiB, in
    the first half of the disk here), and nothing else."""
    r = Rig(workdir, procs, qmp)
    r.start(sync="none")
    r.ready()
    ok(qmp_execute(r.client, "block-job-pause", device=JOB))
    wait_job(r.client, ("standby",))
    writes = [(1 * M + 5, 70 * K, 0x91), (3 * M, 4 * K, 0x92)]
    guest_write(r.proxy.uri, r.shadow, *writes)
    r.stop("sigkill")
    r.start(sync="none")
    assert r.ready()["offset"] == activitylog.REGION
    r.complete()
    got = read(r.tgt)
    for off, n, p in writes:
        assert got[off:off + n] == bytes([p]) * n
    assert got[:4 * M] == read(r.src)[:4 * M]
    assert got[4 * M:] == bytes(4 * M)      # never written: not copied


def test_sync_top_resumes_after_sigkill(workdir, procs, qmp, top_chain):
    top, tgt, _ = top_chain
    src = qemu_nbd(procs, top, workdir / "src.sock", fmt="qcow2",
                   allocation_depth=True)
    target = qemu_nbd(procs, tgt, workdir / "tgt.sock", fmt="qcow2")
    bitmap = workdir / "top.bitmap"

    def start():
        proxy = start_proxy(procs, src, workdir / "g.sock",
                            workdir / "qmp.sock", target=target, sync="top",
                            bitmap=bitmap, speed="256K")
        return proxy, qmp(proxy.control)
    proxy, client = start()
    while ok(qmp_execute(client, "query-block-jobs"))[0]["offset"] == 0:
        time.sleep(0.02)
    kill_hard(proxy)
    assert marks(bitmap)[0] == "active"
    proxy, client = start()
    ok(qmp_execute(client, "block-job-set-speed", device=JOB, speed=0))
    wait_job(client, ("ready",))
    ok(qmp_execute(client, "block-job-complete", device=JOB))
    wait_job(client, (None,))
    ok(qmp_execute(client, "quit"))
    proxy.proc.wait(5)
    for p in list(procs.procs):
        if p.name == "qemu-nbd":
            procs.stop(p)
    assert qemu_img_compare(top, tgt, "qcow2", "qcow2") == 0
    assert top_clusters(tgt) <= top_clusters(top)


# -- issue 11, point 5: the scan's errors go through the policy ---------------

@pytest.mark.parametrize("policy", ["report", "ignore"])
def test_a_block_status_error_in_the_scan_goes_through_on_source_error(
        policy, workdir, procs, qmp):
    trigger = workdir / "fail"
    trigger.write_text("")
    src_img = make_image(workdir / "src.img", SIZE, seed=5)
    source = nbdkit_server(procs, workdir / "src.sock", "file", src_img,
                           "error=EIO", f"error-extents-file={trigger}",
                           "error-extents-rate=100%", filters=["error"])
    tgt = make_image(workdir / "tgt.img", SIZE)
    target = qemu_nbd(procs, tgt, workdir / "tgt.sock")
    proxy = start_proxy(procs, source, workdir / "g.sock",
                        workdir / "qmp.sock")
    client = qmp(proxy.control)
    log = EventLog(client)
    ok(qmp_execute(client, "drive-mirror", device="disk0", target=target,
                   sync="full", **{"job-id": JOB, "on-source-error": policy}))
    error = log.wait("BLOCK_JOB_ERROR")
    assert error["data"] == {"device": JOB, "operation": "read",
                             "action": policy}
    if policy == "report":
        done = log.wait("BLOCK_JOB_COMPLETED")
        assert "block status" in done["data"]["error"], done
        return
    trigger.unlink()                    # healed: the job goes on
    log.wait("BLOCK_JOB_READY")
    assert read(tgt) == read(src_img)


# -- quit stays bounded -------------------------------------------------------

class QuitRig(test_quit.Rig):
    """test_quit's rig, its job with a persistent bitmap (drive-mirror)."""

    def job_args(self):
        return {**super().job_args(), "bitmap": str(self.bitmap)}


@pytest.mark.parametrize("phase", [p for p in test_quit.PHASES
                                   if p != "no-job"])
def test_quit_with_a_persistent_bitmap_exits_within_5s(workdir, procs, qmp,
                                                       phase):
    """As test_quit's, guests connected; the file stays resumable.  (The
    guests are idle at the quit: with requests in flight, nbdkit 1.32
    sometimes aborts on its way out, `raw_send_socket: Assertion sock >=
    0`, persistent bitmap or not; test_quit.py shows it too.)"""
    r = QuitRig(workdir, procs, qmp, phase)
    r.bitmap = workdir / "dirty.bitmap"
    r.start_job()
    idle = test_quit.AioClient(r.proxy.uri)
    load = test_quit.GuestLoad(r.proxy.uri, depth=8,
                               kinds=("write", "read")).start()
    load.wait_ops(16)
    with r.stalled():
        if phase == "target-stopped":
            load.wait_ops(load.ops + 16)
        load.stop()
        r.quit_exits_within(5)
    idle.close()
    assert marks(r.bitmap)[0] == "active"
