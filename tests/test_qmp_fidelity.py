"""QMP where a client written for QEMU 7.2 would notice a difference.

  * An unknown job: block-job-* answer as QEMU's find_block_job_locked
    (blockdev.c): class DeviceNotActive, "Block job 'ID' not found"; job-*
    as find_job_locked (job-qmp.c): GenericError, "Job not found".
  * `busy` is false while the job waits on its speed limit (QEMU reports
    busy only while the job coroutine runs, not while it sleeps).
  * drive-mirror takes the legacy target spelling nbd:unix:PATH
    [:exportname=NAME] besides NBD URIs.
  * auto-finalize=false keeps the job in `pending` until job-finalize (the
    pivot happens then), auto-dismiss=false keeps it `concluded` (listed by
    query-jobs and query-block-jobs) until job-dismiss.
"""

import time

import pytest

from helpers import (EventLog, first_difference, make_image, nbd_read_all,
                     ok, qmp_execute, random_bytes, start_proxy)
from servers import (AioClient, Request, apply, collect_events,
                     qemu_nbd_target, read_file)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SIZE = 8 * MiB
JOB = "mirror0"

BLOCK_JOB_VERBS = [
    ("block-job-complete", {}), ("block-job-cancel", {}),
    ("block-job-cancel", {"force": True}), ("block-job-pause", {}),
    ("block-job-resume", {}), ("block-job-set-speed", {"speed": 0}),
]
JOB_VERBS = ["job-complete", "job-cancel", "job-pause", "job-resume",
             "job-finalize", "job-dismiss"]


class Rig:
    """A seeded source, a qemu-nbd target (any number of clients), a proxy
    with no job, and a QMP client that sees the whole job."""

    def __init__(self, workdir, procs, qmp, seed=51, target_options=()):
        self.src = make_image(workdir / "src.img", SIZE, seed=seed)
        self.shadow = bytearray(random_bytes(seed, SIZE))
        self.tgt_img = make_image(workdir / "tgt.img", SIZE)
        self.target = qemu_nbd_target(procs, self.tgt_img,
                                      workdir / "tgt.sock", "-t", "-e", "0",
                                      *target_options)
        self.proxy = start_proxy(procs, self.src, workdir / "g.sock",
                                 workdir / "qmp.sock")
        self.client = qmp(self.proxy.control)
        self.log = EventLog(self.client)

    def execute(self, name, **args):
        return qmp_execute(self.client, name, **args)

    def mirror(self, target=None, **options):
        return self.execute("drive-mirror", device="disk0",
                            target=target or self.target.uri, sync="full",
                            **{"job-id": JOB}, **options)

    def block_job(self):
        jobs = ok(self.execute("query-block-jobs"))
        return jobs[0] if jobs else None

    def guest_write(self, offset, data):
        guest = AioClient(self.proxy.uri)
        write = guest.run([Request("write", offset, len(data), data)])
        guest.close()
        apply(self.shadow, write)


@pytest.fixture
def rig(workdir, procs, qmp):
    return lambda **kw: Rig(workdir, procs, qmp, **kw)


def assert_error(reply, cls, desc):
    assert "error" in reply, reply
    assert (reply["error"]["class"], reply["error"]["desc"]) == (cls, desc), \
        reply


def assert_unknown_jobs_refused_as_qemu_does(r, job_id):
    for verb, extra in BLOCK_JOB_VERBS:
        assert_error(r.execute(verb, device=job_id, **extra),
                     "DeviceNotActive", f"Block job '{job_id}' not found")
    assert_error(r.execute("block-job-change", id=job_id, type="mirror",
                           **{"copy-mode": "write-blocking"}),
                 "DeviceNotActive", f"Block job '{job_id}' not found")
    for verb in JOB_VERBS:
        assert_error(r.execute(verb, id=job_id), "GenericError",
                     "Job not found")


def test_unknown_job_is_refused_with_qemus_words(rig):
    r = rig()
    assert_unknown_jobs_refused_as_qemu_does(r, JOB)       # no job at all
    ok(r.mirror(speed=1 * MiB))
    r.log.wait("JOB_STATUS_CHANGE", "running")
    assert_unknown_jobs_refused_as_qemu_does(r, "nosuch")  # another id
    assert r.block_job()["status"] == "running"
    ok(r.execute("block-job-cancel", device=JOB, force=True))
    r.log.wait_end()
    assert_unknown_jobs_refused_as_qemu_does(r, JOB)       # gone


def test_job_is_not_busy_while_throttled_to_a_tiny_speed(rig):
    r = rig()
    # Under a speed limit the copier sends pieces of speed/20 bytes, 4 KiB
    # at least: at 1 byte/s, one 4 KiB piece and then nothing for an hour.
    # (At 4096 bytes/s a piece goes out every second, and a sample that
    # meets one in flight rightly says busy.)
    ok(r.mirror(speed=1))
    r.log.wait("JOB_STATUS_CHANGE", "running")
    # Past the first piece (or 2 s without one): the job now sleeps.
    deadline = time.monotonic() + 2
    while r.block_job()["offset"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    samples = []
    for _ in range(10):
        samples.append(r.block_job())
        time.sleep(0.1)               # sampling period, not a wait
    assert [(s["status"], s["busy"]) for s in samples] == \
        [("running", False)] * 10, samples
    assert samples[-1]["offset"] < SIZE


@pytest.mark.parametrize("spelling", ["nbd:unix:{sock}",
                                      "nbd:unix:{sock}:exportname=tgt"])
def test_drive_mirror_takes_legacy_nbd_unix_target(rig, spelling):
    named = "exportname" in spelling
    r = rig(target_options=("-x", "tgt") if named else ())
    target = spelling.format(sock=r.target.sock)
    ok(r.mirror(target=target))
    r.log.wait("BLOCK_JOB_READY")
    r.guest_write(MiB + 1, b"\x3e" * 9000)
    ok(r.execute("block-job-complete", device=JOB))
    done = r.log.wait("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"], done
    r.log.wait_end()
    uri = r.target.uri.replace(":///?", ":///tgt?") if named else \
        r.target.uri
    diff = first_difference(nbd_read_all(uri), bytes(r.shadow))
    assert diff is None, f"target reached as {target}: {diff}"


def test_manual_finalize_and_dismiss_hold_pending_and_concluded(rig):
    r = rig()
    ok(r.mirror(**{"auto-finalize": False, "auto-dismiss": False}))
    r.log.wait("BLOCK_JOB_READY")
    job = r.block_job()
    assert (job["auto-finalize"], job["auto-dismiss"]) == (False, False), job
    assert_error(r.execute("job-finalize", id=JOB), "GenericError",
                 f"Job '{JOB}' in state 'ready' cannot accept command "
                 f"verb 'finalize'")
    r.guest_write(2 * MiB + 7, b"\x5d" * 7000)

    mark = r.log.mark()
    ok(r.execute("block-job-complete", device=JOB))
    r.log.wait("JOB_STATUS_CHANGE", "pending")
    later = collect_events(r.log, 1.0)          # it stays pending
    assert not [e for e in later if e["event"] in (
        "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE")], later
    assert [j["status"] for j in ok(r.execute("query-jobs"))] == ["pending"]
    assert r.block_job()["status"] == "pending"
    assert_error(r.execute("job-dismiss", id=JOB), "GenericError",
                 f"Job '{JOB}' in state 'pending' cannot accept command "
                 f"verb 'dismiss'")

    ok(r.execute("job-finalize", id=JOB))
    done = r.log.wait("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"], done
    r.log.wait("JOB_STATUS_CHANGE", "concluded")
    later = collect_events(r.log, 1.0)          # it stays concluded
    assert not [e for e in later if e["event"] == "JOB_STATUS_CHANGE"], later
    assert [j["status"] for j in ok(r.execute("query-jobs"))] == \
        ["concluded"]
    assert r.block_job()["status"] == "concluded"

    ok(r.execute("job-dismiss", id=JOB))
    r.log.wait_end()
    assert ok(r.execute("query-jobs")) == []
    assert r.block_job() is None
    steps = [t for t in r.log.tokens(mark)
             if t not in ("waiting", "BLOCK_JOB_PENDING")]
    assert steps == ["pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]

    # Finalized: the guest is on the target now.
    source = read_file(r.src)
    r.guest_write(3 * MiB + 1, b"\x6f" * 5000)
    assert read_file(r.src) == source, "a write after finalize hit the source"
    diff = first_difference(nbd_read_all(r.target.uri), bytes(r.shadow))
    assert diff is None, f"target after finalize: {diff}"
