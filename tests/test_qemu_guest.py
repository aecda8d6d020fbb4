"""A real QEMU as the guest, through copy, ready, pivot and after.

qemu-system-x86_64 with no machine opens the proxy's socket as a
`-blockdev driver=nbd` node (one NBD connection, negotiated before the job
ends); I/O runs in QEMU through HMP `qemu-io` over QMP, with several
aio_write requests in flight, also while the pivot happens.  The target file
must end equal to a shadow of everything QEMU wrote.  Targets: qemu-nbd
serving any number of clients, and qemu-nbd with its defaults (one client).
"""

import signal

import pytest

from helpers import (EventLog, job_status, make_image, ok, qemu_img_compare,
                     qmp_execute, random_bytes, start_proxy)
from servers import (QemuGuest, in_thread, read_file, start_target,
                     wait_closed, wait_in_log, write_file)

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
SIZE = 16 * MiB
JOB = "mirror0"


class Writes:
    """qemu-io write commands with a pattern byte; `shadow` follows them."""

    def __init__(self, shadow):
        self.shadow = shadow

    def __call__(self, offset, length, pattern, verb="write"):
        self.shadow[offset:offset + length] = bytes([pattern]) * length
        return f"{verb} -P {pattern:#x} {offset} {length}"


def quit_and_compare(workdir, procs, vm, proxy, target, shadow):
    """QEMU quits, then the proxy and the target stop: the target file
    holds what QEMU wrote (`shadow`)."""
    assert vm.quit() == 0
    procs.stop(proxy.proc)
    wait_closed(target.sock)
    procs.stop(target.proc)
    expected = write_file(workdir / "shadow.img", bytes(shadow))
    assert qemu_img_compare(target.image, expected) == 0, \
        "target file differs from what QEMU wrote"


@pytest.mark.parametrize("kind", ["qemu-nbd-shared", "qemu-nbd-defaults"])
def test_qemu_guest_writes_through_copy_ready_pivot_and_after(
        workdir, procs, qmp, kind):
    src = make_image(workdir / "src.img", SIZE, seed=41)
    shadow = bytearray(random_bytes(41, SIZE))
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    target = start_target(procs, kind, tgt_img, workdir / "tgt.sock")
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock",
                        target=target.uri, speed="4M")
    log = EventLog(qmp(proxy.control))
    vm = QemuGuest(procs, qmp, proxy.socket, workdir / "vm.sock")
    w = Writes(shadow)

    # Copying: four aio writes in flight at once, then reads.
    vm.io(w(5 * MiB + 3, 300000, 0x11, "aio_write"),
          w(15 * MiB + 512, 65536, 0x12, "aio_write"),
          w(0, 513, 0x13, "aio_write"),
          w(9 * MiB, MiB, 0x14, "aio_write"), "aio_flush")
    assert job_status(log.client) == "running", "the copy ended too soon"
    vm.io(f"read -P 0x11 {5 * MiB + 3} 300000", f"read -P 0x14 {9 * MiB} {MiB}")
    log.wait("BLOCK_JOB_READY", timeout=30)

    # Ready: mirrored.
    vm.io(w(40000, 4096, 0x21), w(12 * MiB - 1, 2, 0x22))

    # Complete while QEMU has writes in flight.
    ticket = vm.submit(*(w(i * MiB + 400000, 131072, 0x30 + i, "aio_write")
                         for i in range(0, 16, 2)))
    ok(qmp_execute(log.client, "block-job-complete", device=JOB))
    vm.collect(ticket)
    done = log.wait("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done["data"], done
    log.wait_end()

    # After the pivot, on the connection QEMU opened before it.
    after = (7 * MiB + 5, 123457, 0x66)
    vm.io(w(*after, "aio_write"), w(2 * MiB, 65536, 0x67, "aio_write"),
          "aio_flush", f"read -P 0x66 {after[0]} {after[1]}",
          f"read -P 0x12 {15 * MiB + 512} 65536")
    assert read_file(src, after[0], after[1]) != bytes([0x66]) * after[1], \
        "a write after the pivot reached the source"

    quit_and_compare(workdir, procs, vm, proxy, target, shadow)


def test_qemu_guest_keeps_its_disk_when_the_target_restarts_after_the_pivot(
        workdir, procs, qmp):
    """After the pivot the target is QEMU's disk.  It dies (SIGKILL) and is
    started again as people run it (qemu-nbd, its defaults): QEMU's writes
    sent meanwhile wait for the proxy to reconnect, then land."""
    src = make_image(workdir / "src.img", SIZE, seed=43)
    shadow = bytearray(random_bytes(43, SIZE))
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    sock = workdir / "tgt.sock"
    target = start_target(procs, "qemu-nbd-defaults", tgt_img, sock)
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock",
                        target=target.uri, reconnect_delay=30)
    log = EventLog(qmp(proxy.control))
    vm = QemuGuest(procs, qmp, proxy.socket, workdir / "vm.sock")
    w = Writes(shadow)
    log.wait("BLOCK_JOB_READY", timeout=30)
    ok(qmp_execute(log.client, "block-job-complete", device=JOB))
    done = log.wait("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done["data"], done
    vm.io(w(MiB + 7, 70000, 0x41, "aio_write"), "aio_flush")

    procs.kill(target.proc, signal.SIGKILL)
    target.proc.wait(10)
    procs.procs.remove(target.proc)
    sock.unlink()
    # Sent while the target is away, the write waits for the reconnect.
    # (HMP's qemu-io on a node drains its requests before it returns: the
    # monitor waits with it, so it runs in a thread.)
    writes = [w(3 * MiB, 131072, 0x42), w(11 * MiB + 1, 4096, 0x43)]
    waiting, outcome = in_thread(lambda: vm.io(*writes))
    wait_in_log(proxy.proc, "connection lost")
    assert waiting.is_alive()
    target = start_target(procs, "qemu-nbd-defaults", tgt_img, sock)
    waiting.join(30)
    assert [how for how, _ in outcome] == ["ok"], outcome
    vm.io("aio_flush", f"read -P 0x42 {3 * MiB} 131072",
          f"read -P 0x43 {11 * MiB + 1} 4096",
          f"read -P 0x41 {MiB + 7} 70000")

    quit_and_compare(workdir, procs, vm, proxy, target, shadow)
