"""nbdmirror benchmark: the proxy against nbdcopy, QEMU's own mirror and
qemu-nbd.

    .venv/bin/python bench/run.py [--quick] [--runs N] [--strict]
                                  [--compare OTHER_CHECKOUT] [--only A,B]
    make bench

Every row is the MEDIAN of N runs (--runs, default 3; 2 with --quick)
with its spread [min-max];
the sides of a row take turns, the order reversing every run (A B, B A,
...), and a ratio is one of medians.  The load average is printed: other
work on the machine skews the figures.  Sections (--only picks some):

  A  time to ready, random data, an idle guest, a fresh target per run:
     `nbdmirror serve --target` from its start to BLOCK_JOB_READY (what a
     user sees) and drive-mirror on a running proxy to READY, against
     `nbdcopy --flush` and against QEMU's mirror (qemu-storage-daemon 7.2,
     source and target as --blockdev nodes, QMP blockdev-mirror sync=full
     to BLOCK_JOB_READY; from starting the daemon and from
     blockdev-mirror).  Sources: the raw file, and the file behind
     qemu-nbd; targets: `nbdkit memory`, qemu-nbd on a fresh raw file.
     At 2 GiB every source and target; at 8 GiB (a minute per GiB allowed
     per copy) file -> nbdkit memory, file -> qemu-nbd file and NBD ->
     qemu-nbd file only (NBD -> memory would add ~2 minutes and the least
     news).  One target lives at a time (at 8 GiB: at most one 8 GiB
     `nbdkit memory`), and the 8 GiB source file goes after its rows.
                                              aim: ratio <= 1.0
  B  guest I/O with fio's nbd engine (4 KiB random, iodepth 16, 512 MiB
     file) through the proxy against qemu-nbd serving the same file: no job
     (aim >= 0.8), a ready background job (>= 0.7), a ready write-blocking
     job (>= 0.5); the proxies run serve's default nbdkit thread count (1
     for a file source), and one row reads through `--threads 4` beside
     the default, in the same turns (no aim: the trade-off); sequential
     reads (nbdcopy URI null:, 256 KiB requests).  The ready rows also
     take QEMU's own mirror in their turns (qemu-storage-daemon exporting
     its source node, blockdev-mirror ready in the same copy mode), noted
     as a fraction of qemu-nbd and against nbdmirror: what a user would
     get instead;
     and 4 KiB random reads while the copy of section A's file runs against
     the same reads with no job (>= 0.5), from fio's IOPS log within the
     copy's wall-clock window.
  C  the longest guest request across a pivot: fio 4 KiB randrw, iodepth
     4, while block-job-complete runs, against the same through QEMU's
     mirror (qemu-storage-daemon exporting its mirror source node over NBD
     to fio; job-complete).                     aim: <= 50 ms
  D  convergence under a saturating writer (fio 64 KiB random writes,
     iodepth 16) per copy mode (background, write-blocking, auto): time to
     ready (capped at 60 s: DNC = did not converge) against the same job
     with an idle guest, and the guest's write throughput during the job
     against no job.  auto runs at the proxy's default auto-switch-after,
     except with --quick (cap 5 s): 1 s there; the row says which.
                         aim: write-blocking and auto converge
  E  scale: sparse raw sources (qemu-img create, on tmpfs: ext4 stops at
     16 TiB) of 1 TiB and 16 TiB with some data, 64 KiB granularity:
     the proxy's peak RSS (VmHWM of its nbdkit process; aim <= 200 MiB at
     16 TiB) and time to ready from `serve --target` (file source, and the
     file behind qemu-nbd) against nbdcopy from qemu-nbd (aim <= 1.0 at
     16 TiB; nbdcopy from the file path spends ~50 s in mincore() over the
     holes), target qemu-nbd on a sparse file; its allocation against the
     source's (aim <= 1.05).
  F  remote targets: time to ready through a target with 10 ms per request
     (nbdkit memory with the delay filter, rdelay=10ms wdelay=10ms, and
     enough threads (-t 128) that the delay models the link, not a busy
     server) against nbdcopy over the same target (aim <= 1.0); bytes
     re-copied after one 3-second cut of the target (qemu-nbd SIGSTOPped
     mid-copy, proxy --io-timeout 1: the job reconnects), as BLOCK_JOB_READY
     offset minus the disk size, beyond what was copied before the cut,
     against the disk (aim <= 5 %).  The job copies again all that the
     target had not flushed (nbdmirror/unflushed.py): at the cut, everything
     copied since its start, as the job flushes 10 s after the oldest
     unflushed write; what goes beyond that was in flight or queued.

  G  the persistent bitmap (--bitmap), on a ready background job (the fio
     file, `nbdkit memory` target): guest 4 KiB random write IOPS (fio,
     iodepth 16) and 1 MiB sequential write MB/s with it against the same
     job without (aims >= 0.75 and >= 0.9); and after SIGKILL of the proxy
     halfway through a job's copy (--speed: about 2 s for the disk) and a
     restart, the bytes it copies again beyond what was still to copy,
     against the disk (aim <= 5 %).

--compare DIR runs the nbdmirror side of sections A and B for DIR's
checkout too (PYTHONPATH=DIR), taking turns with this one, and prints
both ("before" = DIR); the other sections are not run then.

With --quick the sizes shrink (64 MiB, and 128 MiB for section A's
bigger size; fio 1 s) for a smoke test.  Exit
status: 0 when every measurement ran (aims missed or not; with --strict, 1
when an aim is missed), 1 when one failed.
"""

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (GiB, KiB, MiB, TiB, Bench, BenchError,  # noqa: E402
                     HarnessError, allocated, command, copy_prefix, end_job,
                     fio_iops, fio_max_latency_ms, fio_percentile_ms, frozen,
                     log, make_random, make_sparse, mirror_to_ready, peak_rss,
                     proxy_pids, proxy_threads, qemu_mirror, qemu_mirror_start,
                     qemu_mirror_to_ready, qemu_wait_ready, ready_since_start,
                     stamp, start_mirror, turns, wait_job_ready, wait_ready)
from stats import (Aim, Row, fmt, fmt_ratio, median,  # noqa: E402
                   print_table, ratio, summary)


@dataclass
class Sizes:
    data: int               # random-data source (A, B reads during copy, F)
    copy: tuple             # disk sizes of section A (the first: `data`)
    fio_file: int           # the guest's disk for fio (B, C, D)
    fio_runtime: float      # seconds per fio IOPS run (B)
    pivot_runtime: float    # seconds of fio around a pivot (C)
    cap: float              # seconds a job may take to converge (D)
    auto_switch: float      # copy-mode auto's auto-switch-after (D; None:
                            # the proxy's default)
    window: float           # seconds of fio with no job (B reads, D)
    scale: tuple            # ((virtual size, data), ...) (E)
    cut_disk: int           # disk of the target-cut job (F)
    timeout: float          # seconds one copy may take


FULL = Sizes(data=2 * GiB, copy=(2 * GiB, 8 * GiB), fio_file=512 * MiB,
             fio_runtime=5, pivot_runtime=4, cap=60, auto_switch=None,
             window=3,
             scale=((TiB, 64 * MiB), (16 * TiB, GiB)), cut_disk=GiB,
             timeout=300)
QUICK = Sizes(data=64 * MiB, copy=(64 * MiB, 128 * MiB), fio_file=64 * MiB,
              fio_runtime=1, pivot_runtime=2, cap=5, auto_switch=1.0,
              window=1,
              scale=((TiB, 16 * MiB), (16 * TiB, 64 * MiB)), cut_disk=64 * MiB,
              timeout=60)

LEAD = 0.5          # seconds fio runs before the measured window starts
BEFORE = "@before"  # suffix of the --compare checkout's series


def size_text(n):
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB")):
        if n >= unit:
            return f"{n / unit:g} {name}"
    return f"{n} B"


class Context:
    """What the sections share: the bench, sizes, rows and images."""

    def __init__(self, bench, sizes):
        self.bench, self.sizes = bench, sizes
        self.rows = []
        self.loads = []
        self._images = {}

    @property
    def compare(self):
        return self.bench.other is not None

    def checkouts(self):
        """None (this checkout) and, with --compare, the other one."""
        return [None] + ([self.bench.other] if self.compare else [])

    def row(self, key, what, compared=False, **kw):
        r = Row(key, what, **kw)
        if compared and self.compare:
            r.before = []
        self.rows.append(r)
        return r

    def random_file(self, size=None):
        """A random-data raw file of `size` (default: section A's first,
        `data`), made once; forget() removes it."""
        size = size or self.sizes.data
        key = ("random", size)
        if key not in self._images:
            path = self.bench.path(f"random-{size >> 20}M.img")
            log(f"creating {size_text(size)} of random data")
            make_random(path, size)
            self._images[key] = path
        return self._images[key]

    def random_uri(self, size=None):
        """The same file behind qemu-nbd (kept until forget())."""
        size = size or self.sizes.data
        key = ("random-nbd", size)
        if key not in self._images:
            uri, proc = self.bench.qemu_nbd(self.random_file(size))
            self.bench.share(proc)
            self._images[key] = (uri, proc)
        return self._images[key][0]

    def forget(self, size):
        """Stop the qemu-nbd of the random file of `size` and remove it
        (the big ones of section A: their rows are done)."""
        served = self._images.pop(("random-nbd", size), None)
        if served:
            self.bench.stop(served[1])
        path = self._images.pop(("random", size), None)
        if path:
            os.unlink(path)
            log(f"removed the {size_text(size)} random-data file")

    def fio_file(self):
        if "fio" not in self._images:
            path = self.bench.path("guest.img")
            make_random(path, self.sizes.fio_file)
            self._images["fio"] = path
        return self._images["fio"]


def series(name, checkout):
    return name + (BEFORE if checkout else "")


def fill(row, data, ours, base=None):
    """Samples into a row: `ours` (and its --compare twin) and `base`."""
    row.ours = data.get(ours, [])
    if row.before is not None:
        row.before = data.get(ours + BEFORE, [])
    if base:
        row.base = data.get(base, [])


@contextlib.contextmanager
def section(ctx, rows):
    """The processes started in the block stop when it ends; a failure
    marks every row of the block that has no figures yet."""
    ctx.loads.append(os.getloadavg()[0])
    log(f"{', '.join(r.key for r in rows)}: {rows[0].what} ...")
    with ctx.bench.scope():
        try:
            yield
        except Exception as e:      # noqa: BLE001 - the next section runs
            if not isinstance(e, BenchError):
                traceback.print_exc()
                e = f"{type(e).__name__}: {e}"
            for r in rows:
                if not r.ours and not r.error:
                    r.error = str(e)
            log(f"error: {e}")


# -- A: time to ready ---------------------------------------------------------

TARGETS = {"memory": "nbdkit memory", "file": "qemu-nbd file"}


# (source, target) kinds of section A: every pair at its first size, these
# at the bigger ones (the NBD source -> nbdkit memory pair adds the least:
# an NBD source's cost shows on a file target, the memory target's with a
# file source), each run making a disk-sized target.
ALL_PAIRS = (("file", "memory"), ("file", "file"), ("nbd", "memory"),
             ("nbd", "file"))
BIG_PAIRS = (("file", "memory"), ("file", "file"), ("nbd", "file"))


def copy_rows(ctx, first, size, src_kind, tgt_kind):
    """Four rows for one disk size, source and target: ready from `serve`
    and from drive-mirror, each against nbdcopy and QEMU's mirror.  One
    target lives at a time (each run's is stopped, its file removed,
    before the next run's starts)."""
    b = ctx.bench
    where = (f"{size_text(size)} {src_kind} src -> "
             f"{TARGETS[tgt_kind]}")
    k = iter(range(first, first + 4))
    aim = Aim("<=", 1.0)
    rows = {
        ("serve", "nbdcopy"): ctx.row(
            f"A{next(k)}", f"ready from serve, {where}", compared=True,
            base_name="nbdcopy", aim=aim),
        ("serve", "qemu-start"): ctx.row(
            f"A{next(k)}", f"ready from serve, {where}", compared=True,
            base_name="QEMU start", aim=aim),
        ("mirror", "nbdcopy"): ctx.row(
            f"A{next(k)}", f"ready from drive-mirror, {where}", compared=True,
            base_name="nbdcopy", aim=aim),
        ("mirror", "qemu-job"): ctx.row(
            f"A{next(k)}", f"ready from drive-mirror, {where}", compared=True,
            base_name="QEMU job", aim=aim),
    }
    with section(ctx, list(rows.values())), copy_timeout(b, size):
        source = ctx.random_file(size) if src_kind == "file" else \
            ctx.random_uri(size)
        proxies = {c: b.proxy(source, checkout=c) for c in ctx.checkouts()}

        def serve(c):
            def run():
                with b.target(tgt_kind, size) as (tgt, _):
                    t0 = time.monotonic()
                    p = b.proxy(source, target=tgt, checkout=c)
                    up = time.monotonic() - t0
                    t = ready_since_start(b, p, t0, b.timeout)
                    b.stop_proxy(p)
                return {series("serve", c): t, series("serve-up", c): up}
            return run

        def mirror(c):
            def run():
                with b.target(tgt_kind, size) as (tgt, _):
                    out = mirror_to_ready(b, proxies[c], tgt)
                return {series(name, c): v for name, v in out.items()}
            return run

        def nbdcopy():
            with b.target(tgt_kind, size) as (tgt, _):
                return {"nbdcopy": b.nbdcopy(source, tgt)}

        def qemu():
            with b.target(tgt_kind, size) as (tgt, _):
                return qemu_mirror_to_ready(b, source, tgt)

        sides = {}
        for c in ctx.checkouts():
            sides[series("serve", c)] = serve(c)
            sides[series("mirror", c)] = mirror(c)
        sides["nbdcopy"], sides["qemu"] = nbdcopy, qemu
        data = turns(b.runs, sides)
        for (ours, base), row in rows.items():
            fill(row, data, ours, base)
        rows[("serve", "nbdcopy")].note(
            f"of which start-up (serve to its sockets and QMP answering): "
            f"median {median(data['serve-up']):.2f} s")
        rows[("serve", "qemu-start")].note(
            f"QEMU: the daemon's start to QMP answering: median "
            f"{median(data['qemu-up']):.2f} s")
        own = data.get("mirror-own")
        if own:
            rows[("mirror", "nbdcopy")].note(
                f"the proxy's own view (event stamps, created -> READY): "
                f"median {median(own):.2f} s")


def time_to_ready(ctx):
    first = 1
    for size in ctx.sizes.copy:
        big = size != ctx.sizes.data    # other sections use `data` only
        try:
            for src_kind, tgt_kind in (BIG_PAIRS if big else ALL_PAIRS):
                copy_rows(ctx, first, size, src_kind, tgt_kind)
                first += 4
        finally:
            if big:
                ctx.forget(size)


@contextlib.contextmanager
def copy_timeout(bench, size):
    """One copy of `size` may take a minute per GiB (a file target's
    write-back at 8 GiB), at least the sizes' timeout."""
    saved = bench.timeout
    bench.timeout = max(saved, size / GiB * 60)
    try:
        yield
    finally:
        bench.timeout = saved


# -- B: guest I/O -------------------------------------------------------------

STATES = (("no job", None, 0.8), ("ready background", "background", 0.7),
          ("ready write-blocking", "write-blocking", 0.5))
THREADS = "no job, --threads 4"     # serve's default for a file source: 1


def guest_proxies(ctx, checkout):
    """{state: proxy} on the fio file: no job, and ready jobs (to nbdkit
    memory) in each copy mode."""
    b, s = ctx.bench, ctx.sizes
    out = {}
    for state, mode, _ in STATES:
        if mode is None:
            out[state] = b.proxy(ctx.fio_file(), checkout=checkout)
            if checkout is None:        # beside the default thread count
                out[THREADS] = b.proxy(ctx.fio_file(), threads=4)
        else:
            tgt, _ = b.nbdkit("memory", str(s.fio_file))
            out[state] = b.proxy(ctx.fio_file(), target=tgt,
                                 checkout=checkout, copy_mode=mode)
    for p in out.values():
        if p.target_given:
            wait_job_ready(b, p)
    return out


def qemu_guests(ctx):
    """{state: export URI} for the ready states: qemu-storage-daemon with
    a ready blockdev-mirror in the same copy mode (to its own nbdkit
    memory), exporting the fio file: the tool a user would use instead."""
    b, s = ctx.bench, ctx.sizes
    out = {}
    for state, mode, _ in STATES:
        if mode is None:
            continue
        tgt, _ = b.nbdkit("memory", str(s.fio_file))
        sock = b.sock(f"qsd-{mode}")
        # locking off: qemu-nbd (the direct side) has the file open too
        proc, qmp, events, _ = qemu_mirror(b, ctx.fio_file(), tgt,
                                           export=sock, locking=False)
        qemu_mirror_start(qmp, copy_mode=mode)
        qemu_wait_ready(b, proc, events)
        out[state] = f"nbd+unix:///disk?socket={sock}"
    return out


def guest_io(ctx):
    b, s = ctx.bench, ctx.sizes
    rows = {}
    n = 1
    for state, _, aim in STATES:
        for rw in ("randread", "randwrite"):
            rows[(state, rw)] = ctx.row(
                f"B{n}", f"guest 4K {rw[4:]} IOPS, {state}", compared=True,
                unit="IOPS", base_name="qemu-nbd", aim=Aim(">=", aim))
            n += 1
            if (state, rw) == ("no job", "randread"):
                # the trade-off of serve's default thread count (file
                # source: 1), measured in the same turns as the default
                threads = ctx.row(f"B{n}", f"guest 4K read IOPS, {THREADS}",
                                  unit="IOPS", base_name="qemu-nbd")
                n += 1
    seq = ctx.row(f"B{n}", "guest seq. read 256K, no job", compared=True,
                  unit="MB/s", base_name="qemu-nbd", aim=Aim(">=", 0.8))
    with section(ctx, sorted([*rows.values(), threads, seq],
                             key=lambda r: int(r.key[1:]))):
        direct, _ = b.qemu_nbd(ctx.fio_file())
        proxies = {c: guest_proxies(ctx, c) for c in ctx.checkouts()}
        qemu = qemu_guests(ctx)

        def fio_side(uri, rw):
            ddir = 0 if rw == "randread" else 1
            return lambda: fio_iops(b.fio(uri, rw, s.fio_runtime).wait(), ddir)

        for (state, rw), row in rows.items():
            sides = {series("ours", c): fio_side(proxies[c][state].uri, rw)
                     for c in ctx.checkouts()}
            if row is rows[("no job", "randread")]:
                sides["threads"] = fio_side(proxies[None][THREADS].uri, rw)
            if state in qemu:
                sides["qemu"] = fio_side(qemu[state], rw)
            sides["direct"] = fio_side(direct, rw)
            data = turns(b.runs, {k: (lambda k=k, f=f: {k: f()})
                                  for k, f in sides.items()})
            fill(row, data, "ours", "direct")
            if "qemu" in sides:
                row.note(
                    f"QEMU's mirror, ready, same copy mode "
                    f"(qemu-storage-daemon's export): "
                    f"{summary(data['qemu'], 'IOPS')}, "
                    f"{fmt_ratio(ratio(data['qemu'], row.base))} of qemu-nbd;"
                    f" nbdmirror / QEMU's mirror "
                    f"{fmt_ratio(ratio(row.ours, data['qemu']))}")
            if "threads" in sides:
                fill(threads, data, "threads", "direct")
                threads.note(
                    f"against the default thread count ({row.key}: nbdkit "
                    f"-t {proxy_threads(proxies[None][state])}; here -t "
                    f"{proxy_threads(proxies[None][THREADS])}): "
                    f"{fmt_ratio(ratio(threads.ours, row.ours))}")

        def seq_read(uri):
            return lambda: s.fio_file / 1e6 / b.tool(["nbdcopy", uri, "null:"])
        sides = {series("ours", c): seq_read(proxies[c]["no job"].uri)
                 for c in ctx.checkouts()}
        sides["direct"] = seq_read(direct)
        data = turns(b.runs, {k: (lambda k=k, f=f: {k: f()})
                              for k, f in sides.items()})
        fill(seq, data, "ours", "direct")


def reads_during_copy(ctx):
    """4K random reads while the copy runs against the same with no job:
    fio runs on, its IOPS log read within the copy's window."""
    b, s = ctx.bench, ctx.sizes
    row = ctx.row("B9", f"guest 4K read IOPS during the copy "
                        f"({size_text(s.data)} file -> nbdkit memory)",
                  compared=True, unit="IOPS", base_name="no job",
                  aim=Aim(">=", 0.5))
    windows = []
    with section(ctx, [row]):
        proxies = {c: b.proxy(ctx.random_file(), checkout=c)
                   for c in ctx.checkouts()}

        def during(c):
            def run():
                p = proxies[c]
                with b.target("memory", s.data) as (tgt, _):
                    fio = b.fio(p.uri, "randread", b.timeout)
                    time.sleep(LEAD)
                    t0 = time.time()
                    start_mirror(p, tgt)
                    t1 = stamp(wait_ready(b, p, b.timeout))
                    fio.stop()
                    end_job(p)
                windows.append(t1 - t0)
                return {series("during", c): window_iops(fio, t0, t1, 0)}
            return run

        def no_job():
            fio = b.fio(proxies[None].uri, "randread", b.timeout)
            time.sleep(LEAD)
            t0 = time.time()
            time.sleep(median(windows) if windows else s.window)
            t1 = time.time()
            fio.stop()
            return {"no job": window_iops(fio, t0, t1, 0)}

        sides = {series("during", c): during(c) for c in ctx.checkouts()}
        sides["no job"] = no_job
        fill(row, turns(b.runs, sides), "during", "no job")
        row.note(f"copy windows: median {median(windows):.2f} s")


def window_iops(fio, t0, t1, ddir):
    iops = fio.iops_between(t0, t1, ddir)
    if iops is None:
        raise BenchError(f"the window ({t1 - t0:.3f} s) is shorter than "
                         f"fio's log interval ({fio.LOG_MS} ms)")
    return iops


# -- C: pivot -----------------------------------------------------------------

def across_pivot(ctx, uri, complete):
    """fio 4K randrw iodepth 4 on `uri`; complete() a third into the run.
    Returns fio's report; a BenchError unless the pivot fell within it."""
    b, s = ctx.bench, ctx.sizes
    fio = b.fio(uri, "randrw", s.pivot_runtime, iodepth=4,
                extra=["--lat_percentiles=1"])
    time.sleep(s.pivot_runtime / 3)
    t0 = time.time()
    complete()
    t1 = time.time()
    job = fio.wait()
    first, last = fio.span()
    if first is None or not (first < t0 and t1 < last):
        raise BenchError("the pivot did not fall within fio's run")
    return job, t1 - t0


def pivot(ctx):
    b, s = ctx.bench, ctx.sizes
    row = ctx.row("C1", "longest guest request across a pivot (4K randrw)",
                  unit="ms", base_name="QEMU", aim=Aim("<=", 50, of="value"))
    with section(ctx, [row]):
        def ours():
            with b.target("memory", s.fio_file) as (tgt, _):
                p = b.proxy(ctx.fio_file(), target=tgt)
                wait_job_ready(b, p)

                def complete():
                    command(p.qmp, "block-job-complete", device="mirror0")
                    p.events.wait("BLOCK_JOB_COMPLETED", timeout=60)
                job, took = across_pivot(ctx, p.uri, complete)
                b.stop_proxy(p)
            return {"ours": fio_max_latency_ms(job),
                    "ours p99.99": fio_percentile_ms(job), "ours took": took}

        def qemu():
            with b.target("memory", s.fio_file) as (tgt, _):
                sock = b.sock("qsd-export")
                proc, qmp, events, _ = qemu_mirror(b, ctx.fio_file(), tgt,
                                                   export=sock)
                qemu_mirror_start(qmp)
                qemu_wait_ready(b, proc, events)

                def complete():
                    command(qmp, "block-job-complete", device="m0")
                    events.wait("BLOCK_JOB_COMPLETED", timeout=60)
                job, took = across_pivot(
                    ctx, f"nbd+unix:///disk?socket={sock}", complete)
                b.stop_qsd(proc, qmp)
            return {"qemu": fio_max_latency_ms(job),
                    "qemu p99.99": fio_percentile_ms(job), "qemu took": took}

        data = turns(b.runs, {"ours": ours, "qemu": qemu})
        fill(row, data, "ours", "qemu")
        for who in ("ours", "qemu"):
            p9999 = [x for x in data[f"{who} p99.99"] if x is not None]
            row.note(f"{'nbdmirror' if who == 'ours' else 'QEMU'}: p99.99 "
                     f"median {median(p9999) or 0:.1f} ms; complete took "
                     f"median {median(data[f'{who} took']) * 1000:.0f} ms")


# -- D: convergence under a saturating writer ---------------------------------

def convergence(ctx):
    b, s = ctx.bench, ctx.sizes
    modes = ("background", "write-blocking", "auto")
    # copy-mode auto at the proxy's default auto-switch-after, except where
    # the cap leaves too little time to switch and converge (--quick)
    switch = s.auto_switch
    auto_args = {} if switch is None else {"auto-switch-after": switch}
    labels = {m: m for m in modes}
    labels["auto"] = (f"auto (auto-switch-after {switch:g} s)" if switch
                      else f"auto (auto-switch-after {default_switch()})")
    rows = {}
    n = 1
    for mode in modes:
        rows[("time", mode)] = ctx.row(
            f"D{n}", f"ready under a 64K random writer, {labels[mode]}",
            base_name="idle guest",
            aim=Aim("<=", s.cap, of="value") if mode != "background"
            else None)
        rows[("mbps", mode)] = ctx.row(
            f"D{n + 1}", f"guest 64K write MB/s during the job, "
                         f"{labels[mode]}",
            unit="MB/s", base_name="no job")
        n += 2
    switched = []           # copy-mode auto: seconds to its switch
    with section(ctx, list(rows.values())):
        proxy = b.proxy(ctx.fio_file())

        def writer(runtime):
            return b.fio(proxy.uri, "randwrite", runtime, bs="64k",
                         iodepth=16)

        def under_writer(mode):
            def run():
                args = {"copy-mode": mode,
                        **(auto_args if mode == "auto" else {})}
                with b.target("memory", s.fio_file) as (tgt, _):
                    fio = writer(s.cap + 30)
                    time.sleep(LEAD)
                    t0 = time.time()
                    start_mirror(proxy, tgt, **args)
                    took, t1 = ready_or_cap(b, proxy, t0, s.cap)
                    fio.stop()
                    end_job(proxy, force=math.isinf(took))
                if mode == "auto":
                    changed = proxy.events.named("JOB_COPY_MODE_CHANGED")
                    switched.append(stamp(changed[0]) - t0 if changed
                                    else math.inf)
                mbps = window_iops(fio, t0, t1, 1) * 64 * KiB / 1e6
                return {("time", mode): took, ("mbps", mode): mbps}
            return run

        def idle():
            with b.target("memory", s.fio_file) as (tgt, _):
                return {"idle": mirror_to_ready(b, proxy, tgt)["mirror"]}

        def no_job():
            fio = writer(s.window + 30)
            time.sleep(LEAD)
            t0 = time.time()
            time.sleep(s.window)
            t1 = time.time()
            fio.stop()
            return {"no job": window_iops(fio, t0, t1, 1) * 64 * KiB / 1e6}

        sides = {mode: under_writer(mode) for mode in modes}
        sides["idle"], sides["no job"] = idle, no_job
        data = turns(b.runs, sides)
        for (kind, mode), row in rows.items():
            fill(row, data, (kind, mode), "idle" if kind == "time" else
                 "no job")
        for mode in modes:
            if any(math.isinf(x) for x in rows[("time", mode)].ours):
                rows[("time", mode)].note(
                    f"DNC: not ready within {s.cap:g} s (the job was then "
                    f"force-cancelled)")
        when = [fmt(x, "s") if x < math.inf else "no switch"
                for x in switched]
        rows[("time", "auto")].note(
            f"switched to write-blocking (JOB_COPY_MODE_CHANGED) after "
            f"[{', '.join(when)}]")


def default_switch():
    """copy-mode auto's default auto-switch-after, as `serve --help`
    shows it (this checkout's)."""
    from nbdmirror.options import OPTIONS
    return f"{OPTIONS['auto-switch-after'].default:g} s, the default"


def ready_or_cap(bench, proxy, t0, cap):
    """(seconds to ready or inf, wall-clock end of the window)."""
    try:
        ready = proxy.events.wait("BLOCK_JOB_READY", timeout=cap)
        return stamp(ready) - t0, stamp(ready)
    except HarnessError:
        if not command(proxy.qmp, "query-block-jobs"):
            raise BenchError(f"the job ended before ready: "
                             f"{proxy.events.tokens()}") from None
        return math.inf, time.time()


# -- E: scale -----------------------------------------------------------------

def scale_rows(ctx, first, virt, data_size):
    b = ctx.bench
    big = virt >= 16 * TiB
    name = f"{size_text(virt)} sparse, {size_text(data_size)} data"
    k = iter(f"E{i}" for i in range(first, first + 4))
    rss = ctx.row(next(k), f"proxy peak RSS, {name}", unit="MiB",
                  aim=Aim("<=", 200, of="value") if big else None)
    t_file = ctx.row(next(k), f"ready from serve, {name}, file src",
                     base_name="nbdcopy", aim=Aim("<=", 1.0) if big else None)
    t_nbd = ctx.row(next(k), f"ready from serve, {name}, nbd src",
                    base_name="nbdcopy", aim=Aim("<=", 1.0) if big else None)
    alloc = ctx.row(next(k), f"target allocation, {name}", unit="MiB",
                    base_name="source", aim=Aim("<=", 1.05))
    with section(ctx, [rss, t_file, t_nbd, alloc]):
        src = b.shm_path("sparse.img")
        b.run(["qemu-img", "create", "-q", "-f", "raw", src, str(virt)])
        make_sparse(src, virt, data_size)
        src_uri, src_proc = b.qemu_nbd(src)

        def serve(kind):
            def run():
                source = src if kind == "file" else src_uri
                with b.target("file", virt, shm=True) as (tgt, path):
                    t0 = time.monotonic()
                    p = b.proxy(source, target=tgt, granularity="64K")
                    t = ready_since_start(b, p, t0, b.timeout)
                    pids = proxy_pids(p)
                    peak = peak_rss(pids[-1])       # nbdkit, the proxy
                    launcher = peak_rss(pids[0])
                    b.stop_proxy(p)
                    used = allocated(path) / MiB
                return {f"serve-{kind}": t, f"rss-{kind}": peak,
                        f"launcher-{kind}": launcher, f"alloc-{kind}": used}
            return run

        def nbdcopy():
            with b.target("file", virt, shm=True) as (tgt, path):
                t = b.nbdcopy(src_uri, tgt)
                return {"nbdcopy": t, "alloc-nbdcopy": allocated(path) / MiB}

        data = turns(b.runs, {"file": serve("file"), "nbd": serve("nbd"),
                              "nbdcopy": nbdcopy})
        fill(rss, data, "rss-file")
        fill(t_file, data, "serve-file", "nbdcopy")
        fill(t_nbd, data, "serve-nbd", "nbdcopy")
        fill(alloc, data, "alloc-file")
        alloc.base = [allocated(src) / MiB]
        rss.note(f"nbd source: median {median(data['rss-nbd']):.1f} MiB; "
                 f"the `serve` launcher: {median(data['launcher-file']):.1f}"
                 f" MiB")
        alloc.note(f"nbd source: {median(data['alloc-nbd']):.1f} MiB; "
                   f"nbdcopy's target: {median(data['alloc-nbdcopy']):.1f}"
                   f" MiB")
        b.stop(src_proc)
        os.unlink(src)              # tmpfs: it is memory


def scale(ctx):
    first = 1
    for virt, data_size in ctx.sizes.scale:
        scale_rows(ctx, first, virt, data_size)
        first += 4


# -- F: remote targets --------------------------------------------------------

def slow_target(ctx):
    b, s = ctx.bench, ctx.sizes
    row = ctx.row("F1", f"ready from drive-mirror, {size_text(s.data)} file "
                        f"src -> 10 ms/request target", base_name="nbdcopy",
                  aim=Aim("<=", 1.0))
    with section(ctx, [row]):
        proxy = b.proxy(ctx.random_file())

        @contextlib.contextmanager
        def target():
            uri, proc = b.nbdkit("-t", "128", "memory", str(s.data),
                                 "rdelay=10ms", "wdelay=10ms",
                                 filters=["delay"])
            try:
                yield uri
            finally:
                b.stop(proc)

        def ours():
            with target() as tgt:
                return mirror_to_ready(b, proxy, tgt)

        def nbdcopy():
            with target() as tgt:
                return {"nbdcopy": b.nbdcopy(ctx.random_file(), tgt)}
        fill(row, turns(b.runs, {"ours": ours, "nbdcopy": nbdcopy}),
             "mirror", "nbdcopy")


def target_cut(ctx):
    """Freeze the target (SIGSTOP) 3 s once a quarter is copied; the
    proxy's --io-timeout 1 drops the connection and the job reconnects.
    Re-copied: READY's offset minus the disk size, beyond what was copied
    before the cut (the target had flushed none of it)."""
    b, s = ctx.bench, ctx.sizes
    row = ctx.row("F2", f"re-copied after a 3 s target cut beyond the "
                        f"unflushed, {size_text(s.cut_disk)} job", unit="%",
                  aim=Aim("<=", 5, of="value"))
    with section(ctx, [row]):
        disk = b.path("cut.img")
        copy_prefix(ctx.random_file(), disk, s.cut_disk)
        proxy = b.proxy(disk, io_timeout=1)
        failed = []

        def run():
            try:
                return cut_once()
            except BenchError as e:     # the next run may still work
                failed.append(str(e))
                log(f"F2: {e}")
                return {}

        def cut_once():
            with b.target("file", s.cut_disk) as (tgt, _):
                target_proc = b.procs.procs[-1]
                t0 = time.monotonic()
                start_mirror(proxy, tgt, **{"reconnect-delay": 30})
                done = wait_offset(proxy, s.cut_disk // 4, b.timeout)
                with frozen(target_proc):
                    time.sleep(3)
                ready = wait_ready(b, proxy, b.timeout)
                took = time.monotonic() - t0
                end_job(proxy)
            back = proxy.events.named("TARGET_RECONNECTED")
            extra = ready["data"]["offset"] - s.cut_disk
            return {"recopy": max(0, extra - done) / s.cut_disk * 100,
                    "took": took,
                    "cut at": done / s.cut_disk * 100,
                    "reconnects": len(back),
                    "down": sum(e["data"]["downtime"] for e in back)}
        data = turns(b.runs, {"cut": run})
        if failed:
            row.error = (f"{len(failed)} of {b.runs} runs failed; the "
                         f"first: {failed[0]}")
        if not data:
            return
        fill(row, data, "recopy")
        row.note(f"cut at {median(data['cut at']):.0f} % copied; ready "
                 f"after median {median(data['took']):.2f} s; reconnects "
                 f"per run {data['reconnects']}, down median "
                 f"{median(data['down']):.2f} s")


# -- G: the persistent bitmap ---------------------------------------------------

def persistent_bitmap(ctx):
    """G1/G2: a ready job's guest writes with --bitmap against without,
    the two proxies on the fio file, fio taking turns."""
    b, s = ctx.bench, ctx.sizes
    rows = {("randwrite", "4k"): ctx.row(
                "G1", "guest 4K random write IOPS, ready job, --bitmap",
                unit="IOPS", base_name="without", aim=Aim(">=", 0.75)),
            ("write", "1m"): ctx.row(
                "G2", "guest 1M seq. write MB/s, ready job, --bitmap",
                unit="MB/s", base_name="without", aim=Aim(">=", 0.9))}
    with section(ctx, list(rows.values())):
        proxies = {}
        for side in ("bitmap", "without"):
            tgt, _ = b.nbdkit("memory", str(s.fio_file))
            opts = {"bitmap": b.path("g.bitmap")} if side == "bitmap" \
                else {}
            proxies[side] = b.proxy(ctx.fio_file(), target=tgt, **opts)
        for p in proxies.values():
            wait_job_ready(b, p)

        def fio_side(side, rw, bs):
            def run():
                job = b.fio(proxies[side].uri, rw, s.fio_runtime,
                            bs=bs).wait()
                return {side: fio_iops(job, 1) if bs == "4k"
                        else job["write"]["bw_bytes"] / 1e6}
            return run
        for (rw, bs), row in rows.items():
            data = turns(b.runs, {side: fio_side(side, rw, bs)
                                  for side in proxies})
            fill(row, data, "bitmap", "without")
    recopy_after_kill(ctx)


def recopy_after_kill(ctx):
    """G3: SIGKILL nbdkit halfway through the copy, restart with the same
    bitmap; READY's offset (this run's copy) minus what was left."""
    b, s = ctx.bench, ctx.sizes
    row = ctx.row("G3", f"copied again after SIGKILL mid-copy, "
                        f"{size_text(s.cut_disk)} job, --bitmap", unit="%",
                  aim=Aim("<=", 5, of="value"))
    with section(ctx, [row]):
        disk = b.path("kill.img")
        copy_prefix(ctx.random_file(), disk, s.cut_disk)
        speed = f"{max(1, s.cut_disk // 2 // MiB)}M"

        runs = []

        def once():
            runs.append(None)
            bitmap = b.path(f"kill{len(runs)}.bitmap")
            with b.target("file", s.cut_disk) as (tgt, _):
                proxy = b.proxy(disk, target=tgt, bitmap=bitmap, speed=speed)
                done = wait_offset(proxy, s.cut_disk // 2, b.timeout)
                os.kill(proxy_pids(proxy)[-1], signal.SIGKILL)
                proxy.proc.wait(10)
                b.stop_proxy(proxy)
                proxy = b.proxy(disk, target=tgt, bitmap=bitmap)
                again = wait_job_ready(b, proxy)["offset"]
                b.stop_proxy(proxy)
            left = s.cut_disk - done
            return {"recopy": max(0, again - left) / s.cut_disk * 100,
                    "left": left / MiB, "again": again / MiB}
        data = turns(b.runs, {"kill": once})
        fill(row, data, "recopy")
        row.note(f"copied again median {median(data['again']):.0f} MiB, "
                 f"of which {median(data['left']):.0f} MiB were still to "
                 f"copy at the kill")


def wait_offset(proxy, offset, timeout):
    """Poll until the job's offset reaches `offset`; return the offset."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = command(proxy.qmp, "query-block-jobs")
        if not jobs or jobs[0]["ready"]:
            raise BenchError("the job was done before the cut")
        if jobs[0]["offset"] >= offset:
            return jobs[0]["offset"]
        if time.monotonic() > deadline:
            raise BenchError(f"offset {offset} not reached in {timeout} s")
        time.sleep(0.005)


# -- the run ------------------------------------------------------------------

SECTIONS = {"A": [time_to_ready], "B": [guest_io, reads_during_copy],
            "C": [pivot], "D": [convergence], "E": [scale],
            "F": [slow_target, target_cut], "G": [persistent_bitmap]}
COMPARED = "AB"         # the sections --compare runs for both checkouts


def need_space(sizes, sections):
    """(bytes in /tmp, bytes in /dev/shm, bytes of memory) the run needs
    at most."""
    tmp = sizes.data + sizes.fio_file + 512 * MiB
    mem = 0
    if "A" in sections:
        # a bigger random file beside `data`, and a target file of its size
        big = max(sizes.copy)
        tmp += big + (big if big != sizes.data else 0)
        mem = big + 512 * MiB                   # an `nbdkit memory` target
    if "F" in sections or "G" in sections:
        tmp += 2 * sizes.cut_disk
    shm = 2 * max(d for _, d in sizes.scale) + 256 * MiB \
        if "E" in sections else 0
    return tmp, shm, mem


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    return math.inf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, for a smoke test")
    ap.add_argument("--runs", type=int, default=None, metavar="N",
                    help="runs per side of each measurement (default 3; "
                         "2 with --quick)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when an aim is missed")
    ap.add_argument("--compare", metavar="CHECKOUT",
                    help="also run another checkout's nbdmirror (sections "
                         f"{', '.join(COMPARED)})")
    ap.add_argument("--only", metavar="SECTIONS",
                    help=f"comma-separated sections of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    runs = args.runs if args.runs is not None else (2 if args.quick else 3)
    if runs < 1:
        ap.error("--runs: at least 1")
    sizes = QUICK if args.quick else FULL
    chosen = (args.only or ",".join(COMPARED if args.compare else SECTIONS))
    chosen = [x.strip().upper() for x in chosen.split(",") if x.strip()]
    if any(x not in SECTIONS for x in chosen):
        ap.error(f"--only: sections are {','.join(SECTIONS)}")
    if args.compare:
        other = os.path.abspath(args.compare)
        if not os.path.isfile(os.path.join(other, "nbdmirror", "cli.py")):
            ap.error(f"--compare: {other} is not an nbdmirror checkout")
        chosen = [x for x in chosen if x in COMPARED]

    tmp, shm, mem = need_space(sizes, chosen)
    for where, need in (("/tmp", tmp), ("/dev/shm", shm), ("memory", mem)):
        free = mem_available() if where == "memory" else \
            shutil.disk_usage(where).free
        if need and free < need:
            print(f"bench: need {need / GiB:.1f} GiB free in {where}, "
                  f"have {free / GiB:.1f} GiB", file=sys.stderr)
            return 1

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bench = Bench(runs, timeout=sizes.timeout,
                  other=os.path.abspath(args.compare) if args.compare
                  else None)
    log(f"working in {bench.dir}")
    ctx = Context(bench, sizes)
    t0 = time.monotonic()
    status = 0
    try:
        for key in chosen:
            for measure in SECTIONS[key]:
                measure(ctx)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        status = 130
    finally:
        bench.close()
        ctx.loads.append(os.getloadavg()[0])
        if ctx.rows:
            print_table(ctx.rows, title(ctx, args, time.monotonic() - t0),
                        compare=ctx.compare)
    if status:
        return status
    if any(r.error for r in ctx.rows):
        return 1
    if args.strict and any(r.verdict == "MISS" for r in ctx.rows):
        return 1
    return 0


def title(ctx, args, seconds):
    loads = ctx.loads
    text = (f"nbdmirror benchmark: median [min-max] of {ctx.bench.runs} "
            f"runs, {os.cpu_count()} cores, load average {loads[0]:.1f} at "
            f"start, {min(loads):.1f}-{max(loads):.1f} over the sections, "
            f"{loads[-1]:.1f} at the end; {seconds / 60:.1f} min"
            f"{'; --quick sizes' if args.quick else ''}")
    for checkout, plugin in ctx.bench.code.items():
        text += (f"\n{'before' if checkout else 'nbdmirror'}: "
                 f"{plugin}")
    return text


if __name__ == "__main__":
    sys.exit(main())
