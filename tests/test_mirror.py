"""The core mirror job (sync=full) against real servers.

Each test starts a real proxy (`nbdmirror serve --foreground`) over a raw
source file, with a real target (qemu-nbd on a raw image, or nbdkit with the
delay filter for a slow or hung target), drives the job over QMP, writes
through the guest socket with qemu-io, and checks real bytes: the guest view,
the target and the source file, against a model of what the guest wrote.

Scenarios: complete pivots the guest to the target; cancel before ready,
soft cancel after ready, force cancel after ready, force cancel with a hung
target; bad input refused by `serve` and by `drive-mirror`.
"""

import hashlib
import os
import subprocess
import sys
import time

import pytest

from helpers import (REPO, EventLog, assert_holds, guest_write, job_status,
                     make_image, nbd_unix_uri, nbdkit_server, nbdmirror_env,
                     ok, qemu_io, qemu_nbd, qmp_execute, random_bytes,
                     sha256_file, sha256_uri, start_proxy)

MiB = 1 << 20


# -- local helpers ---------------------------------------------------------------

class Setup:
    """A seeded raw source, a qemu-nbd target on a fresh image of the same
    size, and a proxy mirroring one to the other; `shadow` models what the
    guest sees."""

    def __init__(self, workdir, procs, size, seed=1, target=None, **opts):
        self.src = make_image(workdir / "src.img", size, seed=seed)
        self.shadow = bytearray(random_bytes(seed, size))
        if target is None:
            self.tgt_img = make_image(workdir / "tgt.img", size)
            target = qemu_nbd(procs, self.tgt_img, workdir / "tgt.sock")
        self.target = target
        self.proxy = start_proxy(procs, self.src, workdir / "g.sock",
                                 workdir / "qmp.sock", target=target, **opts)
        self.uri = self.proxy.uri


@pytest.fixture
def mirror(workdir, procs, qmp):
    """mirror(size, **serve options) -> (Setup, EventLog) with a connected
    QMP client; the job starts with the proxy."""
    def start(size, **kwargs):
        s = Setup(workdir, procs, size, **kwargs)
        return s, EventLog(qmp(s.proxy.control))
    return start


def assert_guest_on_source(s, target_image_sha=None):
    """A write through the guest lands in the source file (and, if the
    target's checksum is given, not on the target)."""
    write = (3 * MiB + 17, 70000, 0xC3)
    guest_write(s.uri, s.shadow, write)
    qemu_io(s.uri, "read -P 0xc3 %d %d" % write[:2])
    assert_holds(s.src, s.shadow, "source file after a write on the source")
    if target_image_sha is not None:
        assert sha256_uri(s.target) == target_image_sha, \
            "a guest write after the job reached the target"


# -- complete ------------------------------------------------------------------

def test_full_sync_with_guest_writes_then_complete_pivots_to_target(mirror):
    s, log = mirror(64 * MiB, speed="32M")
    client = log.client

    # Phase 1: guest writes while the background copy still runs.
    assert job_status(client) == "running"
    guest_write(s.uri, s.shadow, (5 * MiB + 3, 300000, 0x11),
                (63 * MiB + 4000, MiB - 4000, 0x22), (0, 513, 0x33))
    assert job_status(client) == "running", \
        "phase 1 ended before the guest writes landed: lower --speed"
    ready = log.wait("BLOCK_JOB_READY")
    assert ready["data"]["offset"] == ready["data"]["len"]

    # Ready: writes are still mirrored.
    guest_write(s.uri, s.shadow, (40 * MiB - 1, 2, 0x44),
                (5 * MiB, 4096, 0x55))
    mark = log.mark()
    ok(qmp_execute(client, "block-job-complete", device="mirror0"))
    completed = log.wait("BLOCK_JOB_COMPLETED")
    log.wait_end()
    assert "error" not in completed["data"], completed
    assert log.tokens(mark) == ["pending", "BLOCK_JOB_COMPLETED",
                                "concluded", "null"]
    assert job_status(client) is None

    # The whole sequence a client connected after start-up sees ("created"
    # and possibly "running" happen before it can connect).
    statuses = [t for t in log.tokens() if t not in
                ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED")]
    assert statuses in (["ready", "pending", "concluded", "null"],
                        ["running", "ready", "pending", "concluded", "null"])
    assert len(log.named("BLOCK_JOB_READY")) == 1
    assert not log.named("BLOCK_JOB_ERROR")

    # After the pivot the guest is on the target, and the source stays put.
    source_at_pivot = bytes(s.shadow)
    guest_write(s.uri, s.shadow, (7 * MiB + 5, 123457, 0x66))
    guest_sha = sha256_uri(s.uri)
    assert guest_sha == hashlib.sha256(s.shadow).hexdigest(), \
        "the guest does not see what it wrote"
    assert sha256_uri(s.target) == guest_sha, "target differs from guest view"
    assert_holds(s.src, source_at_pivot,
                 "source file after the pivot (it got the post-pivot write?)")


def test_guest_zeroes_and_trims_before_the_copy_reaches_them_are_mirrored(
        mirror):
    # The target starts sparse (reads as zero); the copier goes from offset
    # 0 at 4 MiB/s, so the last 2 MiB are still to copy when the guest
    # zeroes and trims them.
    s, log = mirror(8 * MiB, speed="4M")
    qemu_io(s.uri, f"write -z {6 * MiB} {MiB}", f"discard {7 * MiB} {MiB}")
    s.shadow[6 * MiB:] = bytes(2 * MiB)
    assert job_status(log.client) == "running"

    log.wait("BLOCK_JOB_READY")
    ok(qmp_execute(log.client, "block-job-complete", device="mirror0"))
    completed = log.wait("BLOCK_JOB_COMPLETED")
    log.wait_end()
    assert "error" not in completed["data"], completed
    assert_holds(s.target, bytes(s.shadow), "target after the pivot")


def test_guest_zeroes_after_ready_reach_the_target_as_zeroes(mirror):
    # After ready the target holds the source's random data, so zeroing a
    # range through the guest must send a zero request (or zero data) there.
    # (1 s of copying: the QMP client connects before READY is sent.)
    s, log = mirror(8 * MiB, speed="8M")
    log.wait("BLOCK_JOB_READY")
    qemu_io(s.uri, f"write -z {2 * MiB} {MiB}", f"discard {5 * MiB} {MiB}")
    s.shadow[2 * MiB:3 * MiB] = s.shadow[5 * MiB:6 * MiB] = bytes(MiB)

    ok(qmp_execute(log.client, "block-job-complete", device="mirror0"))
    completed = log.wait("BLOCK_JOB_COMPLETED")
    log.wait_end()
    assert "error" not in completed["data"], completed
    assert_holds(s.target, bytes(s.shadow), "target after the pivot")


# -- cancel ------------------------------------------------------------------------

def test_cancel_before_ready_aborts_and_guest_stays_on_source(
        mirror, workdir, procs):
    size = 16 * MiB
    # One 1 MiB request in flight, each write held 0.3 s: ~5 s to copy.
    slow = nbdkit_server(procs, workdir / "slow.sock", "memory", str(size),
                         "wdelay=300ms", filters=["delay"])
    s, log = mirror(size, target=slow, buf_size="1M")
    assert job_status(log.client) == "running"

    mark = log.mark()
    ok(qmp_execute(log.client, "block-job-cancel", device="mirror0"))
    log.wait_end(timeout=10)
    assert log.tokens(mark) == ["aborting", "BLOCK_JOB_CANCELLED",
                                "concluded", "null"]
    assert not log.named("BLOCK_JOB_READY")
    assert job_status(log.client) is None
    assert ok(qmp_execute(log.client, "query-jobs")) == []
    assert_guest_on_source(s)


def ready_then_write(s, log):
    """Wait for ready, then write through the guest (mirrored: the target
    must have it once the job ends consistently)."""
    log.wait("BLOCK_JOB_READY")
    guest_write(s.uri, s.shadow, (MiB - 100, 200, 0x5A))


def test_soft_cancel_after_ready_leaves_consistent_target_and_guest_on_source(
        mirror):
    s, log = mirror(16 * MiB)
    ready_then_write(s, log)

    mark = log.mark()
    ok(qmp_execute(log.client, "block-job-cancel", device="mirror0",
                   force=False))
    completed = log.wait("BLOCK_JOB_COMPLETED")
    log.wait_end()
    assert "error" not in completed["data"], completed
    assert log.tokens(mark) == ["pending", "BLOCK_JOB_COMPLETED",
                                "concluded", "null"]
    assert not log.named("BLOCK_JOB_CANCELLED")

    # The target is a consistent copy of the source as of the cancel.
    target_sha = sha256_uri(s.target)
    assert target_sha == sha256_file(s.src) == \
        hashlib.sha256(s.shadow).hexdigest()
    assert_guest_on_source(s, target_image_sha=target_sha)


def test_force_cancel_after_ready_cancels_and_guest_stays_on_source(mirror):
    s, log = mirror(16 * MiB)
    ready_then_write(s, log)

    mark = log.mark()
    ok(qmp_execute(log.client, "block-job-cancel", device="mirror0",
                   force=True))
    log.wait_end()
    assert log.tokens(mark) == ["aborting", "BLOCK_JOB_CANCELLED",
                                "concluded", "null"]
    assert not log.named("BLOCK_JOB_COMPLETED")
    assert job_status(log.client) is None
    assert_guest_on_source(s, target_image_sha=sha256_uri(s.target))


def test_force_cancel_with_hung_target_ends_job_within_5s(
        mirror, workdir, procs):
    size = 8 * MiB
    # Every write to the target hangs (1000 s).
    hung = nbdkit_server(procs, workdir / "hung.sock", "memory", str(size),
                         "wdelay=1000", filters=["delay"])
    s, log = mirror(size, target=hung)
    assert job_status(log.client) == "running"

    mark = log.mark()
    sent = time.monotonic()
    ok(qmp_execute(log.client, "block-job-cancel", device="mirror0",
                   force=True))
    log.wait_end(timeout=5 - (time.monotonic() - sent))
    assert log.tokens(mark) == ["aborting", "BLOCK_JOB_CANCELLED",
                                "concluded", "null"]
    assert job_status(log.client) is None
    assert_guest_on_source(s)


# -- bad input -------------------------------------------------------------------

SIZE = 4 * MiB


def _source(workdir):
    return make_image(workdir / "src.img", SIZE, seed=2)


GOOD = ["--source", "{src}", "--target", "{tgt}"]

# case -> (serve arguments, exit status, words the message must contain).
# {src}: a 4 MiB source; {tgt}: a qemu-nbd target of that size; {big}: one
# twice the size; {nowhere}: a unix socket that does not exist.
BAD_INPUT = {
    "missing-source": (["--source", "{src}.missing", "--target", "{tgt}"],
                       2, ["source", "src.img.missing", "no such file"]),
    "unreachable-target": (["--source", "{src}", "--target", "{nowhere}"],
                           1, ["target", "nowhere.sock", "No such file"]),
    "target-size-differs": (["--source", "{src}", "--target", "{big}"],
                            1, ["size", str(2 * SIZE), str(SIZE)]),
    "granularity-3K": (GOOD + ["--granularity", "3K"],
                       2, ["granularity", "3K"]),
    "granularity-128M": (GOOD + ["--granularity", "128M"],
                         2, ["granularity", "128M"]),
    "buf-size-12Q": (GOOD + ["--buf-size", "12Q"], 2, ["buf-size", "12Q"]),
    "sync-top-file-source": (GOOD + ["--sync", "top"],
                             1, ["sync=top", "qemu:allocation-depth"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_serve_refuses_bad_input_without_touching_target(case, workdir, procs):
    args, status, words = BAD_INPUT[case]
    tgt_img = make_image(workdir / "tgt.img", SIZE, seed=3)
    big_img = make_image(workdir / "big.img", 2 * SIZE, seed=4)
    where = {"src": _source(workdir),
             "tgt": qemu_nbd(procs, tgt_img, workdir / "tgt.sock"),
             "big": qemu_nbd(procs, big_img, workdir / "big.sock"),
             "nowhere": nbd_unix_uri(workdir / "nowhere.sock")}
    before = sha256_file(tgt_img), sha256_file(big_img)

    # --foreground: if the proxy wrongly starts, the registry still stops it.
    proc = procs.start([sys.executable, "-m", "nbdmirror", "serve",
                        "--foreground", "--socket", workdir / "g.sock",
                        "--control", workdir / "qmp.sock",
                        *(a.format(**where) for a in args)],
                       name="nbdmirror", env=nbdmirror_env(), cwd=REPO)
    try:
        rc = proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not refuse {case}: still running")
    lines = [l for l in procs.output(proc).splitlines() if l.strip()]
    assert rc == status, lines
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines
    assert not os.path.exists(workdir / "g.sock")
    assert (sha256_file(tgt_img), sha256_file(big_img)) == before


@pytest.mark.parametrize("case", ["unreachable", "size-differs"])
def test_drive_mirror_refuses_bad_target_and_proxy_keeps_serving(
        case, workdir, procs, qmp):
    src = _source(workdir)
    shadow = bytearray(random_bytes(2, SIZE))
    if case == "unreachable":
        target = nbd_unix_uri(workdir / "nowhere.sock")
    else:
        big_img = make_image(workdir / "big.img", 2 * SIZE, seed=4)
        target = qemu_nbd(procs, big_img, workdir / "big.sock")
        before = sha256_file(big_img)
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock")
    client = qmp(proxy.control)

    reply = qmp_execute(client, "drive-mirror", device="disk0",
                        target=target, sync="full")
    assert reply.get("error", {}).get("class") == "GenericError", reply
    assert job_status(client) is None

    # The proxy still serves the guest from the source, and QMP still works.
    guest_write(proxy.uri, shadow, (SIZE - 5000, 5000, 0x7E))
    qemu_io(proxy.uri, f"read -P 0x7e {SIZE - 5000} 5000")
    assert_holds(src, shadow, "source after a write")
    assert ok(qmp_execute(client, "query-status"))["running"] is True
    if case == "size-differs":
        assert sha256_file(big_img) == before
