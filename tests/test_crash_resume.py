"""SIGKILL the proxy at seeded random moments; restart it with the same
bitmap; the guest's acknowledged writes all end up on the target.

Each seed picks a phase (the initial scan, the copy, ready, a pivot), a
granularity and a moment.  A seeded guest writer (libnbd, one request at a
time) runs meanwhile; a shadow records every write the proxy acknowledged,
and the one request in flight when the proxy died is `pending`: its bytes
may be old or new.  The proxy (nbdkit itself, not the `serve` wrapper) is
killed with SIGKILL, then started again with the same options:

  * if the file says the job pivoted, it serves the target: that must hold
    the shadow;
  * else the job resumes; at ready, with the writer stopped, the target
    must equal the source byte for byte (so it copied every chunk that could
    differ); then the writer writes some more, the job completes (pivot),
    and what the guest reads, on the target, must hold the shadow.

`make test` runs SEEDS; the soak (`make test-all`, marked slow) runs
SOAK_SEEDS and prints its figures (phases hit, pivots seen, bytes copied
again against the disk size).
"""

import collections
import os
import random
import signal
import sys
import threading
import time

import nbd
import pytest

from helpers import (HarnessError, make_image, nbd_read_all, nbdkit_server,
                     nbdmirror_env, ok, qemu_nbd, qmp_connect, qmp_execute,
                     random_bytes, start_proxy)
from nbdmirror import bitmapfile

pytestmark = pytest.mark.timeout(120)

K, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
PHASES = ("scan", "copying", "ready", "pivot")
SEEDS = list(range(1, 13))       # three per phase
SOAK_SEEDS = range(1000, 1200)
MAX_WRITE, MAX_ZERO = 64 * K, 256 * K
SPOT, SPOT_MOVES = 256 * K, 0.002
# Small regions that cool fast (activitylog.py's knob): in a short run,
# regions are cleared and marked again many times.
ACTIVITY_LOG = "region=256K,hot=4,cool=0.2,interval=0.05,checkpoint=512K"
FILE_TARGET = os.path.join(os.path.dirname(__file__), "plugins",
                           "file_target.py")
FLUSH_DELAY_MS = 40


class Writer:
    """One guest, one request at a time, from a seed.  `shadow` holds what
    every acknowledged request wrote; `pending` is (offset, new bytes) of
    the request in flight, if any."""

    def __init__(self, uri, seed, shadow):
        self.rng = random.Random(seed)
        self.shadow = shadow
        self.spot = self.rng.randrange(len(shadow))
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.pending = None
        self.ops = 0
        self.error = None
        self._stop = threading.Event()
        self._thread = None

    def step(self):
        rng, size = self.rng, len(self.shadow)
        kind = rng.choices(("write", "zero", "trim"), (6, 2, 2))[0]
        # Locality, as guests have it: near a spot that moves now and then.
        if rng.random() < SPOT_MOVES:
            self.spot = rng.randrange(size)
        off = min(size - 1, max(0, self.spot + rng.randint(-SPOT, SPOT)))
        n = rng.randint(1, min(MAX_WRITE if kind == "write" else MAX_ZERO,
                               size - off))
        data = rng.randbytes(n) if kind == "write" else bytes(n)
        self.pending = (off, data)
        if kind == "write":
            self.h.pwrite(data, off)
        else:
            getattr(self.h, kind)(n, off)
        self.shadow[off:off + n] = data
        self.pending = None
        self.ops += 1

    def _run(self):
        try:
            while not self._stop.is_set():
                self.step()
        except Exception as e:     # noqa: BLE001 - the proxy was killed
            self.error = e

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self, died=False):
        """Stop and wait; an error is expected only if the proxy died."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the guest writer is stuck"
        if not died:
            assert self.error is None, f"guest request failed: {self.error!r}"
        try:
            self.h.shutdown()
        except nbd.Error:
            pass

    def run_ops(self, n, timeout=30):
        """n requests in this thread."""
        deadline = time.monotonic() + timeout
        for _ in range(n):
            assert time.monotonic() < deadline
            self.step()


def plugin_pid(proxy):
    """nbdkit's pid: the child of the `serve --foreground` wrapper."""
    pid = proxy.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = f.read().split()
    assert len(kids) == 1, kids
    return int(kids[0])


def kill_hard(proxy):
    """SIGKILL nbdkit (the proxy itself), then wait for the wrapper."""
    os.kill(plugin_pid(proxy), signal.SIGKILL)
    proxy.proc.wait(10)


def job(client):
    jobs = ok(qmp_execute(client, "query-block-jobs"))
    return jobs[0] if jobs else None


def wait_job(client, statuses, timeout=60):
    """Poll until the job's status is one of `statuses` (None: no job);
    events of a restarted proxy may come before a client can connect."""
    deadline = time.monotonic() + timeout
    while True:
        j = job(client)
        status = j and j["status"]
        if status in statuses:
            return j
        if j and j.get("error"):
            raise HarnessError(f"the job failed: {j}")
        if time.monotonic() > deadline:
            raise HarnessError(f"job {status}, not {statuses} within "
                               f"{timeout} s")
        time.sleep(0.02)


def matches(actual, shadow, pending):
    """None if `actual` holds the shadow, the pending request's bytes being
    either old or new; else where it does not."""
    if pending is None:
        if actual == bytes(shadow):
            return None
        lo, hi = 0, len(shadow)
    else:
        off, data = pending
        lo, hi = off, off + len(data)
        if actual[:lo] == shadow[:lo] and actual[hi:] == shadow[hi:]:
            bad = [i for i in range(lo, hi) if actual[i] not in
                   (shadow[i], data[i - lo])]
            return None if not bad else f"pending byte {bad[0]} is neither"
    first = next(i for i in range(len(shadow)) if actual[i] != shadow[i])
    return f"differs from the shadow at offset {first} (pending {lo}-{hi})"


class Crash:
    """One seed's run (see the module docstring)."""

    def __init__(self, workdir, procs, qmp, seed):
        self.workdir, self.procs, self.qmp = workdir, procs, qmp
        self.seed = seed
        self.rng = random.Random(seed)
        self.phase = PHASES[seed % len(PHASES)]
        self.granularity = self.rng.choice(["4K", "64K", "1M"])
        self.src_img = make_image(workdir / "src.img", SIZE, seed=seed)
        self.tgt_img = make_image(workdir / "tgt.img", SIZE)
        self.shadow = bytearray(random_bytes(seed, SIZE))
        if self.phase == "pivot":
            # Each target flush takes FLUSH_DELAY: a pivot (two flushes
            # and a durable "pivoting") lasts long enough to be hit.  One
            # worker thread: a client killed with several replies due makes
            # nbdkit 1.32 abort (raw_send_socket: Assertion sock >= 0,
            # lifecycle.py), and the restart then finds no target.
            self.target = nbdkit_server(
                procs, workdir / "tgt.sock", "--threads=1", "python",
                FILE_TARGET, f"file={self.tgt_img}",
                f"flush-delay-ms={FLUSH_DELAY_MS}")
        else:
            self.target = qemu_nbd(procs, self.tgt_img, workdir / "tgt.sock",
                                   extra=["--discard=unmap"])
        if self.phase == "scan":
            # Block status takes a while: the scan lasts that long.
            self.source = nbdkit_server(
                procs, workdir / "src.sock", "file", self.src_img,
                "delay-extents=300ms", filters=["delay"])
        else:
            self.source = self.src_img
        self.bitmap = workdir / "dirty.bitmap"
        self.figures = {"phase": self.phase}

    def start(self, **opts):
        proxy = start_proxy(self.procs, self.source, self.workdir / "g.sock",
                            self.workdir / "qmp.sock", target=self.target,
                            bitmap=self.bitmap, granularity=self.granularity,
                            env=dict(nbdmirror_env(),
                                     NBDMIRROR_ACTIVITY_LOG=ACTIVITY_LOG),
                            **opts)
        return proxy, self.qmp(proxy.control)

    def first_run(self):
        """Run until killed at a seeded moment of the seed's phase."""
        rng, phase = self.rng, self.phase
        speed = "4M" if phase in ("scan", "copying") else None
        proxy, client = self.start(speed=speed)
        if phase in ("ready", "pivot"):
            # Ready first: while a guest writes all the time, a flush
            # that takes a while may never be followed by ready (job.py).
            wait_job(client, ("ready",))
        writer = Writer(proxy.uri, self.seed, self.shadow).start()
        if phase == "scan":
            time.sleep(rng.uniform(0, 0.3))     # the moment, not a sync
        elif phase == "copying":
            time.sleep(rng.uniform(0.05, 1.2))
        else:
            while writer.ops < 20 and writer.error is None:
                time.sleep(0.005)
            if phase == "ready":
                time.sleep(rng.uniform(0, 0.5))
            else:
                ok(qmp_execute(client, "block-job-complete",
                               device="mirror0"))
                time.sleep(rng.uniform(0, 5 * FLUSH_DELAY_MS / 1000))
        j = job(client)
        self.figures["killed-in"] = j and j["status"]
        kill_hard(proxy)
        writer.stop(died=True)
        self.pending = writer.pending
        self.figures["ops-before"] = writer.ops

    def restart(self):
        bf = bitmapfile.BitmapFile.open(str(self.bitmap))
        state, marks = bf.state, bf.load().count(1)
        bf.close()
        self.figures["state"] = state
        self.figures["marked"] = marks
        proxy, client = self.start()
        if state in bitmapfile.SWITCHED:
            assert job(client) is None
            self.check(nbd_read_all(proxy.uri), "the target, served")
            assert nbd_read_all(self.target) == nbd_read_all(proxy.uri)
            self.figures["recopied"] = 0
            return
        j = wait_job(client, ("ready",))
        self.figures["recopied"] = j["offset"]
        with open(self.src_img, "rb") as f:
            source = f.read()
        with open(self.tgt_img, "rb") as f:
            assert f.read() == source, "ready, but the target differs"
        self.check(source, "the source")
        if self.pending is not None:        # now known: as the source has it
            off, data = self.pending
            self.shadow[off:off + len(data)] = source[off:off + len(data)]
            self.pending = None
        writer = Writer(proxy.uri, self.seed + 10 ** 6, self.shadow)
        writer.run_ops(20)
        ok(qmp_execute(client, "block-job-complete", device="mirror0"))
        wait_job(client, (None,))
        writer.run_ops(10)                          # on the target now
        writer.stop()
        self.check(nbd_read_all(proxy.uri), "the guest's view")
        self.check(nbd_read_all(self.target), "the target")

    def check(self, actual, what):
        where = matches(actual, self.shadow, self.pending)
        assert where is None, \
            f"seed {self.seed} ({self.figures}): {what} {where}"


def run_seed(workdir, procs, qmp, seed):
    c = Crash(workdir, procs, qmp, seed)
    c.first_run()
    c.restart()
    return c.figures


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_then_restart_keeps_every_acknowledged_write(
        seed, workdir, procs, qmp):
    run_seed(workdir, procs, qmp, seed)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_soak(tmp_path_factory, capsys):
    """SOAK_SEEDS seeds, each in its own directory and processes."""
    import helpers
    import pathlib
    import shutil
    figures = []
    started = time.monotonic()
    for seed in SOAK_SEEDS:
        workdir = pathlib.Path(helpers.short_tempdir())
        procs = helpers.Processes(workdir)
        clients = []

        def qmp(control):
            c = qmp_connect(control)
            clients.append(c)
            return c
        try:
            figures.append(run_seed(workdir, procs, qmp, seed))
        except BaseException:
            print(procs.report(), file=sys.stderr)
            raise
        finally:
            for c in clients:
                try:
                    c.close()
                except Exception:       # noqa: BLE001
                    pass
            procs.stop_all()
            shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    by = collections.Counter((f["phase"], f["killed-in"], f["state"])
                             for f in figures)
    recopied = [f["recopied"] / SIZE for f in figures]
    with capsys.disabled():
        print(f"\nsoak: {len(figures)} seeds in {took:.0f} s, all passed")
        for key, n in sorted(by.items(), key=str):
            print(f"  phase {key[0]:8} killed in {str(key[1]):9} "
                  f"file {key[2]:8}: {n}")
        mean = sum(recopied) / len(recopied)
        print(f"  re-copied / disk size: mean {mean:.2f}, "
              f"max {max(recopied):.2f}")
