"""A seeded random guest workload racing the mirror, then a pivot.

One thread writes through the guest socket with libnbd: unaligned writes of
seeded random data, write-zeroes and trims, while the job copies in phase 1,
again after ready, through block-job-complete and after the pivot.  A shadow
bytearray records what the guest wrote.  At the end the target (read through
its own server) and the guest view must both equal the shadow, byte for byte.

Trimmed ranges are modelled as zeroes: the source is a raw file (the proxy
punches holes, which read as zero) and the target is qemu-nbd with
--discard=unmap on a raw file (the same after the pivot).
"""

import contextlib
import random
import threading
import time

import nbd
import pytest

from helpers import (job_status, make_image, nbd_read_all, qemu_nbd,
                     qmp_execute, random_bytes, start_proxy, wait_event)

MiB = 1 << 20
SIZE = 32 * MiB
SPEED = "8M"             # phase 1 lasts ~4 s: the workload overlaps it
OPS_PER_PHASE = 100
MAX_WRITE = 64 << 10
MAX_ZERO = 256 << 10


class Workload:
    """Random guest requests from one seed; `shadow` is what the guest
    should read afterwards.  run() is the body of the writer thread."""

    def __init__(self, uri, seed, shadow):
        self.rng = random.Random(seed)
        self.shadow = shadow
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.ops = 0
        self.counts = {"write": 0, "zero": 0, "trim": 0}
        self.error = None

    def step(self):
        rng, size = self.rng, len(self.shadow)
        kind = rng.choices(("write", "zero", "trim"), (6, 2, 2))[0]
        off = rng.randrange(size)
        n = rng.randint(1, min(MAX_WRITE if kind == "write" else MAX_ZERO,
                               size - off))
        if kind == "write":
            data = rng.randbytes(n)
            self.h.pwrite(data, off)
            self.shadow[off:off + n] = data
        else:
            getattr(self.h, kind)(n, off)
            self.shadow[off:off + n] = bytes(n)
        self.ops += 1
        self.counts[kind] += 1

    def run(self, stop):
        try:
            while not stop.is_set():
                self.step()
        except Exception as e:     # reported by running()
            self.error = e

    def wait_ops(self, n, timeout=30):
        """Poll until at least `n` requests completed in all."""
        deadline = time.monotonic() + timeout
        while self.ops < n and self.error is None:
            assert time.monotonic() < deadline, \
                f"only {self.ops} of {n} guest requests in {timeout} s"
            time.sleep(0.01)
        assert self.error is None, f"guest request failed: {self.error!r}"

    @contextlib.contextmanager
    def running(self):
        """The workload runs in a thread for the duration of the block."""
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive(), "the guest writer is stuck"
        assert self.error is None, f"guest request failed: {self.error!r}"


def wait_ready(client, timeout=60):
    """Wait for BLOCK_JOB_READY; fail at once if the job ends instead."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            event = client.pull_event(wait=float(deadline - time.monotonic()))
        except TimeoutError:
            break
        if event is None:
            continue
        if event["event"] == "BLOCK_JOB_READY":
            return event
        seen.append((event["event"], event["data"]))
        if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            pytest.fail(f"the job ended before ready: {seen}")
    pytest.fail(f"no BLOCK_JOB_READY within {timeout} s; saw {seen}")


def assert_equal(actual, expected, what):
    if actual == expected:
        return
    assert len(actual) == len(expected), f"{what}: size differs"
    first = next(i for i in range(len(actual)) if actual[i] != expected[i])
    last = next(i for i in reversed(range(len(actual)))
                if actual[i] != expected[i])
    pytest.fail(f"{what} differs from what the guest wrote, first at offset "
                f"{first}, last at {last}")


@pytest.mark.parametrize("seed,granularity", [(11, "4K"), (22, None),
                                              (33, "4K"), (44, None)])
def test_random_workload_during_mirror_then_pivot_matches_shadow(
        seed, granularity, workdir, procs, qmp):
    src = make_image(workdir / "src.img", SIZE, seed=seed)
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    target = qemu_nbd(procs, tgt_img, workdir / "tgt.sock",
                      extra=["--discard=unmap"])
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock",
                        target=target, speed=SPEED, granularity=granularity)
    client = qmp(proxy.control)
    load = Workload(proxy.uri, seed, bytearray(random_bytes(seed, SIZE)))

    # Phase 1: the guest writes while the background copy runs.
    assert job_status(client) == "running"
    with load.running():
        load.wait_ops(OPS_PER_PHASE)
        assert job_status(client) == "running", \
            "phase 1 ended before the workload did: lower SPEED"
    wait_ready(client)

    # Ready, then complete and pivot while the guest keeps writing.
    with load.running():
        load.wait_ops(2 * OPS_PER_PHASE)
        reply = qmp_execute(client, "block-job-complete", device="mirror0")
        assert "error" not in reply, reply
        done = wait_event(client, "BLOCK_JOB_COMPLETED", timeout=60)
        wait_event(client, "JOB_STATUS_CHANGE", timeout=30,
                   predicate=lambda e: e["data"]["status"] == "null")
        pivoted_at = load.ops
        load.wait_ops(pivoted_at + OPS_PER_PHASE // 4)
    assert "error" not in done["data"], done
    assert all(load.counts.values()), load.counts

    expected = bytes(load.shadow)
    assert_equal(nbd_read_all(target), expected, "target")
    assert_equal(nbd_read_all(proxy.uri), expected, "guest view")
