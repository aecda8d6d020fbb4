"""copy-mode auto: background until a guest outpaces the copier, then
write-blocking by itself, so that the job converges under a busy writer."""

from helpers import (EventLog, assert_holds, make_image, ok, qemu_nbd,
                     qmp_execute, random_bytes, start_proxy)
from test_workload import Workload

MiB = 1 << 20
SIZE = 4 * MiB


def test_auto_switches_to_write_blocking_when_the_backlog_stops_shrinking(
        workdir, procs, qmp):
    src = make_image(workdir / "src.img", SIZE, seed=5)
    # --discard=unmap: after the pivot the guest's trims read back as zero.
    target = qemu_nbd(procs, make_image(workdir / "tgt.img", SIZE),
                      workdir / "tgt.sock", extra=["--discard=unmap"])
    # 128 KiB/s of copying cannot keep up with the writer below.
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock",
                        target=target, copy_mode="auto",
                        auto_switch_after=1, speed="128K",
                        granularity="4K")
    log = EventLog(qmp(proxy.control))
    load = Workload(proxy.uri, 5, bytearray(random_bytes(5, SIZE)))

    def job():
        return ok(qmp_execute(log.client, "query-block-jobs"))[0]

    assert job()["copy-mode"] == "auto"
    with load.running():
        switched = log.wait("JOB_COPY_MODE_CHANGED", timeout=30)
        assert switched["data"]["copy-mode"] == "write-blocking"
        assert job()["copy-mode"] == "write-blocking"
        # Now every guest write lands on the target too: with the limit
        # lifted, the rest drains and the job converges while the guest
        # keeps writing.
        ok(qmp_execute(log.client, "block-job-set-speed", device="mirror0",
                       speed=0))
        log.wait("BLOCK_JOB_READY", timeout=60)
        ok(qmp_execute(log.client, "block-job-complete", device="mirror0"))
        done = log.wait("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done["data"], done
    assert load.error is None, load.error
    assert_holds(target, bytes(load.shadow), "target after the pivot")


def test_auto_stays_background_while_the_copier_keeps_up(workdir, procs,
                                                         qmp):
    src = make_image(workdir / "src.img", SIZE, seed=6)
    target = qemu_nbd(procs, make_image(workdir / "tgt.img", SIZE),
                      workdir / "tgt.sock")
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock",
                        target=target, copy_mode="auto", speed="2M",
                        auto_switch_after=1)
    log = EventLog(qmp(proxy.control))
    log.wait("BLOCK_JOB_READY", timeout=30)
    assert ok(qmp_execute(log.client, "query-block-jobs"))[0]["copy-mode"] \
        == "auto"
    assert not log.named("JOB_COPY_MODE_CHANGED"), log.tokens()
