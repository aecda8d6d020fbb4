"""The whole cycle against NBD servers as people run them.

For each target: copy while a guest writes with several requests in flight,
BLOCK_JOB_READY, complete (the pivot) with 16 requests in flight, then 16
requests of every kind in flight on the guest connection negotiated before
the pivot (with the source's capabilities) and on a new one.  The guest's
view and the target file (`qemu-img compare`, after the proxy stopped) must
equal a shadow of what the guest wrote, and the proxy must never hold more
than one connection to the target at a time, counted on the server's side.

Targets: qemu-nbd with no options (one client; it exits when that client
leaves), with -t, with -t -e 2 (a slot must stay free after the pivot);
nbdkit with limit=1, without write-zeroes (nozero), without FUA
(fuamode=none); qemu-storage-daemon exporting a raw file.
"""

import random

import pytest

from helpers import (EventLog, first_difference, job_status, make_image,
                     nbd_read_all, ok, qemu_img_compare, qmp_execute,
                     random_bytes, start_proxy)
from servers import (AioClient, ConnectionWatch, apply, can_connect,
                     plan_batch, start_target, write_file)

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
SIZE = 8 * MiB
SPEED = "4M"            # phase 1 lasts ~2 s: the first writes overlap it
JOB = "mirror0"
EVERY_KIND = ("write", "write+fua", "zero", "write", "zero+fua", "flush")


def whole_cycle(workdir, procs, qmp, kind, seed, start="serve"):
    """Run the cycle against a target of `kind`; return the Target."""
    rng = random.Random(seed)
    src = make_image(workdir / "src.img", SIZE, seed=seed)
    shadow = bytearray(random_bytes(seed, SIZE))
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    target = start_target(procs, kind, tgt_img, workdir / "tgt.sock")
    watch = ConnectionWatch(target.sock).start()

    if start == "serve":
        proxy = start_proxy(procs, src, workdir / "g.sock",
                            workdir / "qmp.sock", target=target.uri,
                            speed=SPEED)
        log = EventLog(qmp(proxy.control))
    else:
        proxy = start_proxy(procs, src, workdir / "g.sock",
                            workdir / "qmp.sock")
        log = EventLog(qmp(proxy.control))
        ok(qmp_execute(log.client, "drive-mirror", device="disk0",
                       target=target.uri, sync="full", speed=4 * MiB,
                       **{"job-id": JOB}))
    client = log.client
    guest = AioClient(proxy.uri)       # negotiated with the source side

    # Copying: writes, FUA writes and zeroes, 8 in flight.
    apply(shadow, guest.run(plan_batch(rng, SIZE, 8, EVERY_KIND)))
    status = job_status(client)
    if status != "running":
        log.mark()
        pytest.fail(f"job {status!r} after the first guest writes, not "
                    f"copying; last events: {log.events[-3:]}")
    log.wait("BLOCK_JOB_READY", timeout=30)

    # Ready: still mirrored.
    apply(shadow, guest.run(plan_batch(rng, SIZE, 8, EVERY_KIND)))

    # Complete with 16 writes in flight.
    during = guest.submit_all(plan_batch(rng, SIZE, 16))
    ok(qmp_execute(client, "block-job-complete", device=JOB))
    guest.wait(during, 20)
    assert not [r for r in during if r.error], during
    apply(shadow, during)
    done = log.wait("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done["data"], done
    log.wait_end()

    # After the pivot: 16 in flight of every kind the source offered, on
    # the connection negotiated before it ...
    apply(shadow, guest.run(plan_batch(rng, SIZE, 16, EVERY_KIND)))
    # ... and on a new one, with what it now offers.
    fresh = AioClient(proxy.uri)
    kinds = ["write", "flush"]
    kinds += ["write+fua"] if fresh.can("fua") else []
    kinds += ["zero"] if fresh.can("zero") else []
    apply(shadow, fresh.run(plan_batch(rng, SIZE, 16, kinds)))
    # Reads on the old connection see all of it.
    reads = guest.run(plan_batch(rng, SIZE, 16, ("read",)))
    for r in reads:
        assert r.result == shadow[r.offset:r.offset + r.length], r

    diff = first_difference(nbd_read_all(proxy.uri), bytes(shadow))
    assert diff is None, f"guest view after the pivot: {diff}"
    most = watch.stop()
    assert watch.samples > 10, "the connection watch did not run"
    assert most <= 1, \
        f"the proxy held {most} connections to {kind} at once"
    if target.log is not None:
        most, refused = target.connections()
        assert (most, refused) == (1, 0), \
            f"{kind} log: {most} connections at once, {refused} refused"

    if target.slots == 2:
        assert can_connect(target.uri, timeout=5), \
            "no free slot left on the -e 2 server after the pivot"

    guest.close()
    fresh.close()
    procs.stop(proxy.proc)
    procs.stop(target.proc)         # releases the image (qemu locks it)
    expected = write_file(workdir / "shadow.img", bytes(shadow))
    assert qemu_img_compare(tgt_img, expected) == 0, \
        "target file differs from what the guest wrote"
    return target


def test_pivot_to_qemu_nbd_with_default_options(workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "qemu-nbd-defaults", seed=101)


def test_drive_mirror_then_pivot_to_qemu_nbd_with_default_options(
        workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "qemu-nbd-defaults", seed=102,
                start="drive-mirror")


def test_pivot_to_persistent_qemu_nbd(workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "qemu-nbd-persistent", seed=103)


def test_pivot_to_qemu_nbd_with_two_client_slots_leaves_one_free(
        workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "qemu-nbd-two-clients", seed=104)


def test_pivot_to_nbdkit_limited_to_one_connection(workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "nbdkit-limit-1", seed=105)


def test_pivot_to_nbdkit_without_write_zeroes_still_zeroes(
        workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "nbdkit-nozero", seed=106)


def test_pivot_to_nbdkit_without_fua_still_takes_fua_writes(
        workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "nbdkit-fua-none", seed=107)


def test_pivot_to_qemu_storage_daemon_export(workdir, procs, qmp):
    whole_cycle(workdir, procs, qmp, "qemu-storage-daemon", seed=108)
