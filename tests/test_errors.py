"""I/O errors during a job: on-source-error / on-target-error, and a failed
final flush.

Faults come from real servers: nbdkit's error filter fails reads or writes
while a trigger file exists (so a test can heal the server by removing it),
and tests/plugins/flaky_flush.py fails flushes likewise (nbdkit 1.32's error
filter cannot).  Whatever the policy, an acknowledged guest write is on the
source, and a job that hit an error it reported never claims success.
"""

import pathlib

import pytest

from helpers import (EventLog, assert_holds, guest_write, job_status,
                     make_image, nbdkit_server, ok, qmp_execute, random_bytes,
                     sha256_uri, start_proxy)

MiB = 1 << 20
SIZE = 8 * MiB
FLAKY_FLUSH = pathlib.Path(__file__).parent / "plugins" / "flaky_flush.py"


class Rig:
    def __init__(self, workdir, procs, qmp):
        self.workdir, self.procs, self.qmp = workdir, procs, qmp
        self.trigger = workdir / "fail"           # faults while it exists
        self.src = make_image(workdir / "src.img", SIZE, seed=7)
        self.shadow = bytearray(random_bytes(7, SIZE))

    def failing_target(self, error="EIO", ops=("pwrite", "zero")):
        """A file target whose `ops` fail with `error` while the trigger
        exists."""
        img = make_image(self.workdir / "tgt.img", SIZE)
        keys = [f"error-{op}-{k}" for op in ops
                for k in (f"file={self.trigger}", "rate=100%")]
        return nbdkit_server(self.procs, self.workdir / "tgt.sock", "file",
                             img, f"error={error}", *keys, filters=["error"])

    def failing_source(self, op="pread"):
        """The source file behind nbdkit, `op` failing while triggered."""
        return nbdkit_server(self.procs, self.workdir / "src.sock", "file",
                             self.src, "error=EIO",
                             f"error-{op}-file={self.trigger}",
                             f"error-{op}-rate=100%", filters=["error"])

    def start(self, target, source=None, **job_options):
        """A proxy without a job, then drive-mirror: the client sees every
        event of the job from its start."""
        self.target = target
        self.proxy = start_proxy(self.procs, source or self.src,
                                 self.workdir / "g.sock",
                                 self.workdir / "qmp.sock")
        self.client = self.qmp(self.proxy.control)
        self.log = EventLog(self.client)
        args = {k.replace("_", "-"): v for k, v in job_options.items()}
        ok(qmp_execute(self.client, "drive-mirror", device="disk0",
                       target=target, sync="full", **{"job-id": "mirror0"},
                       **args))
        return self.log

    def job(self):
        jobs = ok(qmp_execute(self.client, "query-block-jobs"))
        return jobs[0] if jobs else None

    def complete_and_check(self):
        """Pivot, then the target holds what the guest wrote."""
        ok(qmp_execute(self.client, "block-job-complete", device="mirror0"))
        done = self.log.wait("BLOCK_JOB_COMPLETED")
        assert "error" not in done["data"], done
        self.log.wait_end()
        assert_holds(self.target, bytes(self.shadow), "target")

    def assert_guest_on_source(self):
        guest_write(self.proxy.uri, self.shadow, (MiB + 5, 3000, 0x5A))
        assert_holds(str(self.src), bytes(self.shadow), "source file")


@pytest.fixture
def rig(workdir, procs, qmp):
    return Rig(workdir, procs, qmp)


def test_failed_final_flush_fails_the_job_and_guest_stays_on_source(rig):
    target = nbdkit_server(rig.procs, rig.workdir / "tgt.sock", "python",
                           FLAKY_FLUSH, f"size={SIZE}",
                           f"fail-flush-file={rig.trigger}")
    log = rig.start(target)
    log.wait("BLOCK_JOB_READY")
    rig.trigger.touch()
    ok(qmp_execute(rig.client, "block-job-complete", device="mirror0"))
    err = log.wait("BLOCK_JOB_ERROR")
    assert err["data"] == {"device": "mirror0", "operation": "write",
                           "action": "report"}
    done = log.wait("BLOCK_JOB_COMPLETED")
    assert "error" in done["data"], "a failed final flush reported success"
    log.wait_end()
    assert "pending" not in log.tokens(), log.tokens()
    rig.assert_guest_on_source()


def test_target_write_error_with_policy_report_fails_the_job(rig):
    rig.trigger.touch()
    log = rig.start(rig.failing_target())
    err = log.wait("BLOCK_JOB_ERROR")
    assert err["data"] == {"device": "mirror0", "operation": "write",
                           "action": "report"}
    done = log.wait("BLOCK_JOB_COMPLETED")
    assert "error" in done["data"] and done["data"]["error"], done
    log.wait_end()
    assert not log.named("BLOCK_JOB_READY")
    assert rig.job() is None
    rig.trigger.unlink()
    target_sha = sha256_uri(rig.target)
    rig.assert_guest_on_source()
    assert sha256_uri(rig.target) == target_sha


@pytest.mark.parametrize("policy,error,action,io_status", [
    ("stop", "EIO", "stop", "failed"),
    ("enospc", "ENOSPC", "stop", "nospace"),
])
def test_target_write_error_stops_the_job_until_resumed(
        rig, policy, error, action, io_status):
    rig.trigger.touch()
    log = rig.start(rig.failing_target(error), on_target_error=policy)
    err = log.wait("BLOCK_JOB_ERROR")
    assert err["data"] == {"device": "mirror0", "operation": "write",
                           "action": action}
    log.wait("JOB_STATUS_CHANGE", "paused")
    job = rig.job()
    assert (job["status"], job["paused"], job["io-status"]) == \
        ("paused", True, io_status)
    offset = job["offset"]

    rig.trigger.unlink()                      # the target heals
    ok(qmp_execute(rig.client, "block-job-resume", device="mirror0"))
    log.wait("BLOCK_JOB_READY")
    assert rig.job()["io-status"] == "ok"
    assert rig.job()["offset"] > offset
    guest_write(rig.proxy.uri, rig.shadow, (2 * MiB + 1, 9000, 0x3C))
    rig.complete_and_check()


def test_enospc_policy_reports_other_errors(rig):
    rig.trigger.touch()
    log = rig.start(rig.failing_target("EIO"), on_target_error="enospc")
    assert log.wait("BLOCK_JOB_ERROR")["data"]["action"] == "report"
    assert "error" in log.wait("BLOCK_JOB_COMPLETED")["data"]


def test_target_write_error_with_policy_ignore_retries_until_healed(rig):
    rig.trigger.touch()
    log = rig.start(rig.failing_target(), on_target_error="ignore")
    err = log.wait("BLOCK_JOB_ERROR")
    assert err["data"]["action"] == "ignore"
    log.wait("BLOCK_JOB_ERROR")               # it retried, and failed again
    assert job_status(rig.client) == "running"
    rig.trigger.unlink()
    log.wait("BLOCK_JOB_READY")
    rig.complete_and_check()


def test_source_read_error_with_policy_stop_pauses_until_resumed(rig):
    rig.trigger.touch()
    source = rig.failing_source()
    log = rig.start(rig.failing_target(ops=()), source=source,
                    on_source_error="stop")
    err = log.wait("BLOCK_JOB_ERROR")
    assert err["data"] == {"device": "mirror0", "operation": "read",
                           "action": "stop"}
    log.wait("JOB_STATUS_CHANGE", "paused")
    rig.trigger.unlink()
    ok(qmp_execute(rig.client, "block-job-resume", device="mirror0"))
    log.wait("BLOCK_JOB_READY")
    rig.complete_and_check()


def test_source_block_status_error_after_ready_stops_the_job(rig):
    """Block status fails only once the job is ready: the guest's write
    needs a fresh look at the source, which fails; with `stop` the job
    moves to standby (and does not spin), then resumes and converges."""
    source = rig.failing_source("extents")
    log = rig.start(rig.failing_target(ops=()), source=source,
                    on_source_error="stop")
    log.wait("BLOCK_JOB_READY")
    rig.trigger.touch()
    guest_write(rig.proxy.uri, rig.shadow, (3 * MiB, 5000, 0x77))
    err = log.wait("BLOCK_JOB_ERROR")
    assert err["data"] == {"device": "mirror0", "operation": "read",
                           "action": "stop"}
    log.wait("JOB_STATUS_CHANGE", "standby")
    assert len(log.named("BLOCK_JOB_ERROR")) == 1
    rig.trigger.unlink()
    ok(qmp_execute(rig.client, "block-job-resume", device="mirror0"))
    log.wait("JOB_STATUS_CHANGE", "ready")
    rig.complete_and_check()
