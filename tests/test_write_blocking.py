"""copy-mode write-blocking: a guest write reaches the target before the
guest is answered, and still never races the background copy.

As QEMU's active mirror: the write waits for copies in flight on its chunks,
goes to the source, then (from a private copy) to the target.
"""

import subprocess

import nbd
import pytest

from helpers import (EventLog, make_image, nbd_read_all, nbdkit_server, ok,
                     qemu_io, qemu_nbd, qmp_execute, random_bytes,
                     start_proxy)
from test_workload import Workload, assert_equal

MiB = 1 << 20
HOT = 256 << 10


class Rig:
    """A proxy without a job, a target, and a QMP client that sees the
    whole job: drive-mirror starts it."""

    def __init__(self, workdir, procs, qmp, size, seed=5, target_filter=None):
        """target_filter: (filter, key=value) for an nbdkit file target; by
        default the target is qemu-nbd."""
        self.size = size
        self.src = make_image(workdir / "src.img", size, seed=seed)
        self.shadow = bytearray(random_bytes(seed, size))
        img = make_image(workdir / "tgt.img", size)
        if target_filter:
            name, arg = target_filter
            self.target = nbdkit_server(procs, workdir / "tgt.sock", "file",
                                        img, arg, filters=[name])
        else:
            self.target = qemu_nbd(procs, img, workdir / "tgt.sock")
        self.proxy = start_proxy(procs, self.src, workdir / "g.sock",
                                 workdir / "qmp.sock")
        self.client = qmp(self.proxy.control)
        self.log = EventLog(self.client)

    def mirror(self, **options):
        args = {k.replace("_", "-"): v for k, v in options.items()}
        ok(qmp_execute(self.client, "drive-mirror", device="disk0",
                       target=self.target, sync="full",
                       **{"job-id": "mirror0"}, **args))

    def job(self):
        return ok(qmp_execute(self.client, "query-block-jobs"))[0]

    def complete(self):
        ok(qmp_execute(self.client, "block-job-complete", device="mirror0"))
        done = self.log.wait("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in done["data"], done
        self.log.wait_end()


def target_holds(rig, offset, data):
    return nbd_read_all(rig.target)[offset:offset + len(data)] == data


@pytest.mark.parametrize("how", ["at-start", "changed", "background"])
def test_acknowledged_write_is_already_on_the_target(workdir, procs, qmp, how):
    """Far ahead of a slow background copy, a write is on the target as
    soon as the guest has its answer -- unless the mode is background."""
    rig = Rig(workdir, procs, qmp, 64 * MiB)
    mode = "write-blocking" if how == "at-start" else "background"
    rig.mirror(speed=1 * MiB, copy_mode=mode)
    rig.log.wait("JOB_STATUS_CHANGE", "running")
    if how == "changed":
        ok(qmp_execute(rig.client, "block-job-change", id="mirror0",
                       type="mirror", **{"copy-mode": "write-blocking"}))
    offset, length = 60 * MiB + 4096, 100000
    qemu_io(rig.proxy.uri, f"write -P 0x6b {offset} {length}")
    assert rig.job()["status"] == "running"
    assert rig.job()["offset"] < 32 * MiB, "the copy got there first"
    on_target = target_holds(rig, offset, b"\x6b" * length)
    assert on_target == (how != "background")


@pytest.mark.parametrize("seed,granularity", [(3, 4096), (4, 65536)])
def test_write_blocking_workload_racing_slow_copies_matches_shadow(
        workdir, procs, qmp, seed, granularity):
    """Write-throughs and background copies on the same chunks, copies held
    long in flight by a slow target: the target still ends equal to what
    the guest wrote, before and after the pivot."""
    # Each target connection gets 8 Mbit/s: the copier's 64K writes take
    # ~64 ms, a small write-through a few: without chunk locks a
    # write-through issued after a copy's read would land first.
    rig = Rig(workdir, procs, qmp, 4 * MiB, seed=seed,
              target_filter=("rate", "connection-rate=8M"))
    load = Workload(rig.proxy.uri, seed, rig.shadow)
    # Write-throughs wait for the slow target.  The speed limit keeps
    # phase 1 at ~4 s, so they overlap it.
    rig.mirror(copy_mode="write-blocking", granularity=granularity,
               speed=1 * MiB, **{"buf-size": 64 << 10})
    # From `running` on, guest writes go through (before it, under load,
    # the 30 ops could all be over).
    rig.log.wait("JOB_STATUS_CHANGE", "running")
    with load.running():
        load.wait_ops(30)
        assert rig.job()["status"] == "running", "phase 1 ended too soon"
    ok(qmp_execute(rig.client, "block-job-set-speed", device="mirror0",
                   speed=0))
    rig.log.wait("BLOCK_JOB_READY", timeout=60)
    # Then hammer a small region, where trims (dirty again: copies) and
    # write-throughs keep meeting on the same chunks.
    region = Workload(rig.proxy.uri, seed, rig.shadow[:HOT])
    with region.running():
        region.wait_ops(200)
    load.shadow[:HOT] = region.shadow
    with load.running():
        load.wait_ops(load.ops + 30)
        rig.complete()
        load.wait_ops(load.ops + 10)
    expected = bytes(load.shadow)
    assert_equal(nbd_read_all(rig.target), expected, "target")
    assert_equal(nbd_read_all(rig.proxy.uri), expected, "guest view")


def test_trim_after_a_write_through_reaches_the_target_as_zeroes(
        workdir, procs, qmp):
    """The job knows where the fresh target reads as zero.  A write-through
    puts data there; when the guest then trims that range (not written
    through: a trim's result is undefined), the copier must not skip the
    range as "already zero on the target"."""
    rig = Rig(workdir, procs, qmp, 4 * MiB)
    offset, length = 1 * MiB, 64 << 10
    # A hole on the source over a zero target: the copy skips it.
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset),
                    "--length", str(length), rig.src], check=True, timeout=30)
    rig.mirror(copy_mode="write-blocking")
    rig.log.wait("BLOCK_JOB_READY")
    h = nbd.NBD()
    h.connect_uri(rig.proxy.uri)
    h.pwrite(b"\x5c" * length, offset)       # a write-through
    h.trim(length, offset)                    # the source reads zero here
    h.shutdown()
    rig.complete()
    with open(rig.src, "rb") as f:
        source = f.read()
    assert source[offset:offset + length] == bytes(length)
    assert_equal(nbd_read_all(rig.target), source, "target")
