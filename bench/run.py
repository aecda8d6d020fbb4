"""nbdmirror benchmark: the proxy against nbdcopy and direct reads.

    .venv/bin/python bench/run.py [--quick] [--runs N] [--strict]
    make bench

One invocation measures, on the same servers, each pair below (best of N
runs) and prints them with their ratio and the project's aim:

  a. time to ready for a random-data source with an idle guest:
     drive-mirror on a running proxy until BLOCK_JOB_READY, against
     `nbdcopy --flush` from the same source; the target is a fresh
     `nbdkit memory` for every run.  Two sources: the raw file served by
     the proxy itself (nbdcopy reads the same file), and that file behind
     qemu-nbd (both read the same qemu-nbd URI).       aim: ratio <= 1.2
  b. guest sequential read throughput, `nbdcopy --request-size=R URI
     null:` through the idle proxy (`serve`'s default 4 threads), against
     reading the source directly: for the file source qemu-nbd on the same
     file (aim: >= 0.8) and, for scale, nbdkit's C file plugin; for the
     NBD source the same qemu-nbd.  R = 1 MiB (b1-b3) and nbdcopy's default
     256 KiB (b4-b6): the proxy's cost is per request.
  c. a sparse source (64 GiB virtual, 256 MiB of data) behind qemu-nbd,
     target qemu-nbd on a fresh sparse raw file: nbdmirror's time to ready
     against nbdcopy's between the same servers (aim <= 1.0), and the
     target's allocated bytes against the source's (aim <= 1.05).
  d. the persistent bitmap (--bitmap), on a ready job (raw file source,
     `nbdkit memory` target): guest write throughput with it against
     without, d1 `nbdcopy --request-size=1M` of a quarter of the disk
     (sequential; aim >= 0.9), d2 4 KiB writes at random offsets, 16 in
     flight from one libnbd handle (aim >= 0.75); d3 SIGKILL of the proxy
     halfway through the copy of the random-data disk, then a restart:
     bytes copied again beyond what was still to copy, against the disk
     size (aim <= 0.05).

nbdcopy gets --flush because `ready` includes a target flush.  For the
time-to-ready rows the runs line also shows the proxy's own view (the
`created` and BLOCK_JOB_READY event time stamps), which excludes QMP.
The load average is printed: other work on the machine skews the figures,
hence best of N with the two sides taking turns to go first.

With --quick the sizes shrink (64 MiB; 4 GiB virtual with 16 MiB of data)
for a smoke test.  Exit status: 0 when every measurement ran (aims missed
or not; with --strict, 1 when an aim is missed), 1 when one failed.
"""

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

MiB, GiB = 1 << 20, 1 << 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from helpers import (EventLog, HarnessError, Processes,  # noqa: E402
                     make_image, nbdkit_server, nbdmirror_env, qemu_nbd,
                     qmp_connect, qmp_execute, run_tool, start_proxy)

# The helpers' failures (a server that does not start, a QMP timeout) are
# the bench's too: a row that hits one shows it as its error.
BenchError = HarnessError
WAIT = 30                   # seconds a server may take to start


@dataclass
class Sizes:
    data: int               # random-data source (a, b)
    sparse: int             # virtual size of the sparse source (c)
    sparse_data: int        # data in it, in 1 MiB pieces spread evenly
    timeout: float          # seconds one copy may take
    ops: int                # random 4K writes per run (d2)


FULL = Sizes(data=1 * GiB, sparse=64 * GiB, sparse_data=256 * MiB, timeout=300,
             ops=40000)
QUICK = Sizes(data=64 * MiB, sparse=4 * GiB, sparse_data=16 * MiB, timeout=60,
              ops=4000)


class Interrupted(BaseException):
    pass


# -- servers -----------------------------------------------------------------

class Bench:
    """The temp dir and every process and QMP client started in it.

    Processes are tests/helpers.py's registry: each child in its own
    session, logged here, stopped by pid by close() (SIGTERM, then SIGKILL).
    """

    def __init__(self, sizes, runs):
        self.sizes, self.runs = sizes, runs
        self.dir = tempfile.mkdtemp(prefix="nbdm-bench-", dir="/tmp")
        self.procs = Processes(self.dir)
        self.clients = []        # QMP clients, closed before the servers
        self._n = 0

    def path(self, name):
        return os.path.join(self.dir, name)

    def sock(self, name):
        self._n += 1
        return self.path(f"{name}{self._n}.sock")

    def stop(self, proc):
        """Stop one process now; close() will not look at its pid again."""
        self.procs.stop(proc, forget=True)

    def close(self):
        try:
            for client in self.clients:
                close_quietly(client)
            self.procs.stop_all()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # servers: each returns (uri, proc)
    def qemu_nbd(self, image):
        uri = qemu_nbd(self.procs, image, self.sock("qnbd"), timeout=WAIT)
        return uri, self.procs.procs[-1]

    def nbdkit(self, *args):
        uri = nbdkit_server(self.procs, self.sock("nbdkit"), *args,
                            timeout=WAIT)
        return uri, self.procs.procs[-1]

    def proxy(self, source):
        """`nbdmirror serve --foreground` without a target: a helpers.Proxy
        (.proc, .uri) with a connected QMP client in .qmp.  It runs this
        checkout's package, unless PYTHONPATH names another one."""
        proxy = start_proxy(self.procs, source, self.sock("guest"),
                            self.sock("qmp"), timeout=WAIT, cwd=self.dir,
                            env=nbdmirror_env(repo_first=False))
        proxy.qmp = qmp_connect(proxy.control, timeout=30)
        self.clients.append(proxy.qmp)
        return proxy

    def tool(self, args, timeout=None):
        """Run a tool to the end; return its wall time in seconds."""
        t0 = time.monotonic()
        r = run_tool(args, timeout or self.sizes.timeout)
        t = time.monotonic() - t0
        if r.returncode != 0:
            raise BenchError(f"{' '.join(args)} exited {r.returncode}: "
                             f"{r.stdout}{r.stderr}")
        return t


def close_quietly(client):
    try:
        client.close()
    except Exception:       # noqa: BLE001 - the server may be gone
        pass


def command(client, name, **args):
    """The `return` of QMP command `name`; BenchError on an error reply."""
    reply = qmp_execute(client, name, **args)
    if "error" in reply:
        raise BenchError(f"{name}: {reply['error'].get('desc')}")
    return reply["return"]


# -- measurements ------------------------------------------------------------

@dataclass
class Row:
    key: str
    what: str
    ours: list = field(default_factory=list)      # samples, nbdmirror
    base: list = field(default_factory=list)      # samples, baseline
    unit: str = "s"        # "s" (lower is better), "MB/s", "MiB"
    aim: tuple = None      # ("<=" | ">=", value)
    error: str = None
    note: str = ""
    server: list = field(default_factory=list)    # nbdmirror's own view

    def best(self, samples):
        if not samples:
            return None
        return min(samples) if self.unit in ("s", "MiB") else max(samples)

    @property
    def ratio(self):
        o, b = self.best(self.ours), self.best(self.base)
        return None if o is None or not b else o / b

    @property
    def verdict(self):
        if self.error:
            return "ERROR"
        r = self.ratio
        if r is None or self.aim is None:
            return ""
        op, v = self.aim
        return "ok" if (r <= v if op == "<=" else r >= v) else "MISS"


ENDED = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


def stamp(ev):
    return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6


def mirror_to_ready(bench, row, proxy, target_uri):
    """drive-mirror on an idle proxy; seconds until BLOCK_JOB_READY.  The
    proxy's own view (event time stamps, from `created` to READY) goes to
    row.server.  The job is then soft-cancelled (target left consistent)
    and waited for."""
    qmp = proxy.qmp
    qmp.clear_events()              # the previous job's last events
    events = EventLog(qmp)
    t0 = time.monotonic()
    command(qmp, "drive-mirror", device="disk0", target=target_uri,
            sync="full")
    try:
        ready = events.wait("BLOCK_JOB_READY", timeout=bench.sizes.timeout)
    except HarnessError as e:       # the job ended first, or a timeout
        ended = [ev["data"] for ev in events.events if ev["event"] in ENDED]
        why = f"job ended before ready: {ended[0]}" if ended else str(e)
        tail = bench.procs.output(proxy.proc).strip().splitlines()[-3:]
        raise BenchError(f"{why}; the proxy's log ends: "
                         f"{' | '.join(tail)}") from None
    t = time.monotonic() - t0
    created = [e for e in events.named("JOB_STATUS_CHANGE")
               if e["data"]["status"] == "created"]
    if created:
        row.server.append(stamp(ready) - stamp(created[0]))
    command(qmp, "block-job-cancel", device=ready["data"]["device"])  # job id
    events.wait_end(60)
    errors = [e["data"]["error"] for e in events.events
              if e["event"] in ENDED and e["data"].get("error")]
    if errors:
        raise BenchError(f"job failed after ready: {errors[0]}")
    deadline = time.monotonic() + 10
    while command(qmp, "query-block-jobs"):     # until the job is dismissed
        if time.monotonic() > deadline:
            raise BenchError("the job is still listed 10 s after it ended")
        time.sleep(0.01)
    return t


def interleaved(runs):
    """(run, side) pairs; the side that goes first alternates, so that a
    cold cache or a burst of load does not always hit the same side."""
    for i in range(runs):
        for side in (("ours", "base") if i % 2 == 0 else ("base", "ours")):
            yield i, side


def measure_time_to_ready(bench, row, proxy, source_for_nbdcopy, size):
    for _, side in interleaved(bench.runs):
        tgt, p = bench.nbdkit("memory", str(size))
        if side == "ours":
            row.ours.append(mirror_to_ready(bench, row, proxy, tgt))
        else:
            row.base.append(bench.tool(["nbdcopy", "--flush",
                                        source_for_nbdcopy, tgt]))
        bench.stop(p)


def measure_read(bench, row, proxy_uri, direct_uri, size, request):
    uris = {"ours": proxy_uri, "base": direct_uri}
    for _, side in interleaved(bench.runs):
        rate = size / 1e6 / bench.tool(["nbdcopy", f"--request-size={request}",
                                        uris[side], "null:"])
        getattr(row, side).append(rate)


def proxy_with_job(bench, source, target, *, bitmap=None, **opts):
    """A proxy with a start-up job (and --bitmap, if given), ready."""
    proxy = start_proxy(bench.procs, source, bench.sock("guest"),
                        bench.sock("qmp"), target=target, bitmap=bitmap,
                        timeout=WAIT, cwd=bench.dir,
                        env=nbdmirror_env(repo_first=False), **opts)
    proxy.qmp = qmp_connect(proxy.control, timeout=30)
    bench.clients.append(proxy.qmp)
    return proxy


def wait_status(bench, proxy, status, timeout):
    """The job's query-block-jobs entry once its status is `status`."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = command(proxy.qmp, "query-block-jobs")
        if jobs and jobs[0]["status"] == status:
            return jobs[0]
        if not jobs or jobs[0].get("error"):
            raise BenchError(f"job {jobs}: not {status}")
        if time.monotonic() > deadline:
            raise BenchError(f"job not {status} within {timeout} s")
        time.sleep(0.01)


def random_writes(uri, size, count, depth=16, block=4096, seed=3):
    """`count` writes of `block` bytes at random aligned offsets, `depth`
    in flight on one libnbd handle; returns MB/s."""
    import nbd
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(block)))
    blocks = size // block
    issued = 0
    t0 = time.monotonic()
    while issued < count or h.aio_in_flight():
        while issued < count and h.aio_in_flight() < depth:
            h.aio_pwrite(buf, rng.randrange(blocks) * block,
                         completion=lambda err: 1)
            issued += 1
        h.poll(-1)
    t = time.monotonic() - t0
    h.shutdown()
    return count * block / 1e6 / t


def measure_bitmap_writes(bench, row, source, size, kind):
    """d1/d2: a ready job's guest write rate with --bitmap (ours) and
    without (base), each on a fresh proxy and target."""
    seq = bench.path("seq-data.img")
    if kind == "seq" and not os.path.exists(seq):
        make_image(seq, size // 4, seed=4, fsync=True)
    for i, side in interleaved(bench.runs):
        tgt, p = bench.nbdkit("memory", str(size))
        bitmap = bench.path(f"bm-{kind}-{i}") if side == "ours" else None
        proxy = proxy_with_job(bench, source, tgt, bitmap=bitmap)
        try:
            wait_status(bench, proxy, "ready", bench.sizes.timeout)
            if kind == "seq":
                rate = size // 4 / 1e6 / bench.tool(
                    ["nbdcopy", f"--request-size={MiB}", seq, proxy.uri])
            else:
                rate = random_writes(proxy.uri, size, bench.sizes.ops)
            getattr(row, side).append(rate)
        finally:
            close_quietly(proxy.qmp)
            bench.stop(proxy.proc)
            bench.stop(p)


def measure_recopy(bench, row, source, size):
    """d3: SIGKILL halfway through the copy, restart, compare."""
    for i in range(bench.runs):
        tgt, p = bench.nbdkit("memory", str(size))
        bitmap = bench.path(f"bm-kill-{i}")
        # A speed limit keeps the copy going long enough to pick a moment.
        proxy = proxy_with_job(bench, source, tgt, bitmap=bitmap,
                               speed=f"{max(size // 4 // MiB, 1)}M")
        try:
            deadline = time.monotonic() + bench.sizes.timeout
            while True:
                job = command(proxy.qmp, "query-block-jobs")[0]
                if job["offset"] >= size // 2:
                    break
                if time.monotonic() > deadline:
                    raise BenchError("the copy did not reach half way")
                time.sleep(0.005)
            with open(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/"
                      f"children") as f:
                os.kill(int(f.read().split()[0]), signal.SIGKILL)
            left = job["len"] - job["offset"]
            proxy.proc.wait(10)
        finally:
            close_quietly(proxy.qmp)
            bench.stop(proxy.proc)
        proxy = proxy_with_job(bench, source, tgt, bitmap=bitmap)
        try:
            again = wait_status(bench, proxy, "ready",
                                bench.sizes.timeout)["offset"]
        finally:
            close_quietly(proxy.qmp)
            bench.stop(proxy.proc)
            bench.stop(p)
        row.ours.append(max(0, again - left) / MiB)
        row.base.append(size / MiB)
        row.note = (f"last run: {again / MiB:.0f} MiB copied again, "
                    f"{left / MiB:.0f} MiB were still to copy")


def allocated(path):
    return os.stat(path).st_blocks * 512


def measure_sparse(bench, row_t, row_a, src_uri, src_path, proxy):
    """c1 (time) and c2 (nbdmirror's target allocation vs the source's)."""
    size = bench.sizes.sparse
    nbdcopy_alloc = []
    for i, side in interleaved(bench.runs):
        tpath = bench.path(f"sparse-tgt-{side}-{i}.img")
        with open(tpath, "wb") as f:
            f.truncate(size)
        tgt, p = bench.qemu_nbd(tpath)
        if side == "ours":
            row_t.ours.append(mirror_to_ready(bench, row_t, proxy, tgt))
        else:
            row_t.base.append(bench.tool(["nbdcopy", "--flush", src_uri, tgt]))
        bench.stop(p)
        alloc = allocated(tpath) / MiB
        if side == "ours":
            row_a.ours.append(alloc)
            row_a.base.append(allocated(src_path) / MiB)
        else:
            nbdcopy_alloc.append(alloc)
        os.unlink(tpath)
    if nbdcopy_alloc:
        row_a.note = f"nbdcopy's target: {min(nbdcopy_alloc):.1f} MiB"


# -- images ------------------------------------------------------------------

def make_random(path, size):
    # fsync: no writeback during the measurements
    make_image(path, size, seed=1, fsync=True)


def make_sparse(path, size, data):
    """`data` bytes in 1 MiB pieces spread evenly over `size`."""
    rng = random.Random(2)
    pieces = data // MiB
    step = size // pieces
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(pieces):
            f.seek(i * step)
            f.write(rng.randbytes(MiB))
        f.flush()
        os.fsync(f.fileno())


# -- the run -----------------------------------------------------------------

def run_all(bench, rows):
    s = bench.sizes
    size_text = (f"{s.data / GiB:g} GiB" if s.data >= GiB
                 else f"{s.data // MiB} MiB")
    rnd = bench.path("random.img")
    log(f"creating {size_text} of random data")
    make_random(rnd, s.data)
    src_uri, _ = bench.qemu_nbd(rnd)
    direct_file_uri, _ = bench.nbdkit("file", rnd)
    proxy_file = bench.proxy(rnd)
    proxy_nbd = bench.proxy(src_uri)

    def row(key, what, **kw):
        r = Row(key, what, **kw)
        rows.append(r)
        return r

    steps = [       # (row, measure, its arguments after bench and row)
        (row("a1", f"time to ready, {size_text} random, file source",
             aim=("<=", 1.2)),
         measure_time_to_ready, (proxy_file, rnd, s.data)),
        (row("a2", f"time to ready, {size_text} random, qemu-nbd source",
             aim=("<=", 1.2)),
         measure_time_to_ready, (proxy_nbd, src_uri, s.data)),
    ]
    # The aim is against the server a user would otherwise attach the
    # image with (qemu-nbd); nbdkit's C file plugin and the NBD-source
    # rows are shown for scale (FIELD-NOTES: forwarding costs ~half).
    reads = [("file src vs qemu-nbd", proxy_file.uri, src_uri, (">=", 0.8)),
             ("file src vs nbdkit-file", proxy_file.uri, direct_file_uri,
              None),
             ("qemu-nbd src vs qemu-nbd", proxy_nbd.uri, src_uri, None)]
    keys = (f"b{i}" for i in range(1, 7))
    for request, text in ((MiB, "1M"), (256 << 10, "256K")):
        for what, ours, direct, aim in reads:
            steps.append((row(next(keys), f"guest seq. read {text}, {what}",
                              unit="MB/s", aim=aim),
                          measure_read, (ours, direct, s.data, request)))
    for r, measure, args in steps:
        log(f"{r.key}: {r.what}")
        try:
            measure(bench, r, *args)
        except BenchError as e:
            r.error = str(e)
    for proxy in (proxy_file, proxy_nbd):
        close_quietly(proxy.qmp)
        bench.stop(proxy.proc)

    # d: the persistent bitmap's cost, on a sparse copy of the disk (the
    # guest writes it), and what a crash costs, on the random data.
    blank = bench.path("blank.img")
    with open(blank, "wb") as f:
        f.truncate(s.data)
    for r, measure, args in [
            (row("d1", "guest seq. write 1M, --bitmap vs without",
                 unit="MB/s", aim=(">=", 0.9)),
             measure_bitmap_writes, (blank, s.data, "seq")),
            (row("d2", "guest random write 4K, --bitmap vs without",
                 unit="MB/s", aim=(">=", 0.75)),
             measure_bitmap_writes, (blank, s.data, "random")),
            (row("d3", f"SIGKILL mid-copy: copied again, vs disk",
                 unit="MiB", aim=("<=", 0.05)),
             measure_recopy, (rnd, s.data))]:
        log(f"{r.key}: {r.what}")
        try:
            measure(bench, r, *args)
        except BenchError as e:
            r.error = str(e)
    os.unlink(blank)
    os.unlink(rnd)

    virt = f"{s.sparse // GiB} GiB"
    rt = row("c1", f"time to ready, {virt} sparse, "
                   f"{s.sparse_data // MiB} MiB data", aim=("<=", 1.0))
    ra = row("c2", "allocation: target vs source", unit="MiB",
             aim=("<=", 1.05))
    log(f"c: creating a {virt} sparse source with "
        f"{s.sparse_data // MiB} MiB of data")
    sparse = bench.path("sparse.img")
    make_sparse(sparse, s.sparse, s.sparse_data)
    sparse_uri, _ = bench.qemu_nbd(sparse)
    proxy_sparse = bench.proxy(sparse_uri)
    log(f"{rt.key}/{ra.key}: {rt.what}")
    try:
        measure_sparse(bench, rt, ra, sparse_uri, sparse, proxy_sparse)
    except BenchError as e:
        rt.error = ra.error = str(e)
    close_quietly(proxy_sparse.qmp)


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "MB/s":
        return f"{v:.0f} MB/s"
    return f"{v:.1f} MiB"


def print_table(rows, bench):
    base_name = {"a": "nbdcopy", "b": "direct", "c": "nbdcopy",
                 "d": "without"}
    print()
    print(f"nbdmirror benchmark: best of {bench.runs}, {os.cpu_count()} cores,"
          f" load average {bench.load[0]:.1f} -> {bench.load[-1]:.1f}"
          f"{' (--quick sizes)' if bench.sizes is QUICK else ''}")
    head = (f"{'':3} {'measurement':47} {'nbdmirror':>11} {'baseline':>11}"
            f" {'vs':8} {'ratio':>6}  {'aim':8} {'':5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        base = {"c2": "source", "d3": "disk"}.get(r.key, base_name[r.key[0]])
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        aim = f"{r.aim[0]} {r.aim[1]}" if r.aim else ""
        print(f"{r.key:3} {r.what:47} {fmt_value(r.best(r.ours), r.unit):>11}"
              f" {fmt_value(r.best(r.base), r.unit):>11} {base:8}"
              f" {ratio:>6}  {aim:8} {r.verdict:5}")
    print()
    for r in rows:
        if r.error:
            print(f"{r.key} error: {r.error}")
        elif r.ours:
            samples = lambda xs: ", ".join(  # noqa: E731
                fmt_value(x, r.unit) for x in xs)
            print(f"{r.key} runs: nbdmirror [{samples(r.ours)}]; "
                  f"baseline [{samples(r.base)}]"
                  + (f"; {r.note}" if r.note else ""))
            if r.server:
                print(f"{'':3}nbdmirror's own event stamps, created -> "
                      f"READY: [{samples(r.server)}]")


def log(msg):
    print(f"--> {msg}", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, for a smoke test")
    ap.add_argument("--runs", type=int, default=None,
                    help="runs per measurement (default 3; 2 with --quick)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when an aim is missed")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    runs = args.runs or (2 if args.quick else 3)

    need = sizes.data + 2 * sizes.sparse_data + 512 * MiB
    free = shutil.disk_usage("/tmp").free
    if free < need:
        print(f"bench: need {need / GiB:.1f} GiB free in /tmp, "
              f"have {free / GiB:.1f} GiB", file=sys.stderr)
        return 1

    def on_term(signum, frame):
        raise Interrupted()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bench = Bench(sizes, runs)
    log(f"working in {bench.dir}")
    rows = []
    bench.load = [os.getloadavg()[0]]
    try:
        run_all(bench, rows)
    except (KeyboardInterrupt, Interrupted):
        print("bench: interrupted", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()
        bench.load.append(os.getloadavg()[0])
        if rows:
            print_table(rows, bench)
    if any(r.error for r in rows):
        return 1
    if args.strict and any(r.verdict == "MISS" for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
