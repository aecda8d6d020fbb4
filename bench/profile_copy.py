"""Where copy time goes: nbdmirror's Copier alone, in this process.

    .venv/bin/python bench/profile_copy.py [--runs N] [--request K ...]
                                           [--cases dense-file,dense-nbd,sparse]
                                           [--profile]

Runs the copier (scan, copy until converged, flush) outside nbdkit, with
copier.REQUEST_SIZE set to each --request size in turn (KiB; default 1024
512 256), against `nbdcopy --flush` between the same servers, the sides
taking turns.  Cases:

  dense-file   1 GiB random raw file        -> nbdkit memory
  dense-nbd    the same file behind qemu-nbd -> nbdkit memory
  sparse       64 GiB sparse, 256 MiB data behind qemu-nbd
               -> qemu-nbd on a fresh sparse raw file

Per run it prints the copy time and how full the pipeline was (mean
requests in flight); --profile adds cProfile's top functions for the last
copier run of each case, to tell Python work from waiting in poll().
"""

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

from harness import GiB, MiB, Bench, BenchError, make_random, make_sparse

import nbdmirror.copier as copier
from nbdmirror.bitmap import DirtyBitmap


def run_copier(src, tgt, size, profile):
    c = copier.Copier(DirtyBitmap(size, 64 << 10),
                      copier.open_reader(src, False), copier.NbdWriter(tgt))
    prof = cProfile.Profile() if profile else None
    depth = []
    t0 = time.monotonic()
    if prof:
        prof.enable()
    try:
        c.learn_target()
        c.scan()
        while not c.converged():
            c.pump(1.0)
            depth.append(c._requests)    # noqa: SLF001 - a probe, not an API
        c.flush()
    finally:
        if prof:
            prof.disable()
        c.close()
    return time.monotonic() - t0, statistics.mean(depth or [0]), prof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--request", type=int, nargs="+", default=[1024, 512, 256],
                    metavar="KIB")
    ap.add_argument("--cases", default="dense-file,dense-nbd,sparse")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    bench = Bench(args.runs, timeout=300)
    try:
        dense = bench.path("random.img")
        make_random(dense, GiB)
        dense_uri, _ = bench.qemu_nbd(dense)
        sparse = bench.path("sparse.img")
        make_sparse(sparse, 64 * GiB, 256 * MiB)
        sparse_uri, _ = bench.qemu_nbd(sparse)
        cases = {"dense-file": (dense, GiB), "dense-nbd": (dense_uri, GiB),
                 "sparse": (sparse_uri, 64 * GiB)}
        print(f"load average {os.getloadavg()[0]:.1f}")
        for name in args.cases.split(","):
            src, size = cases[name]
            sides = [("copier", k << 10) for k in args.request] + \
                [("nbdcopy", None)]
            times = {s: [] for s in sides}
            depth = {s: [] for s in sides}
            prof = None
            for i in range(args.runs):
                for side in (sides if i % 2 == 0 else sides[::-1]):
                    tgt, stop = fresh_target(bench, name, size, i)
                    try:
                        if side[0] == "nbdcopy":
                            t = bench.tool(["nbdcopy", "--flush", src, tgt])
                        else:
                            copier.REQUEST_SIZE = side[1]
                            t, d, p = run_copier(src, tgt, size, args.profile)
                            depth[side].append(d)
                            prof = p or prof
                    finally:
                        stop()
                    times[side].append(t)
            for side in sides:
                label = "nbdcopy" if side[0] == "nbdcopy" else \
                    f"copier, {side[1] >> 10} KiB requests"
                inflight = (f", mean in flight {statistics.mean(depth[side]):.1f}"
                            if depth[side] else "")
                print(f"{name:10} {label:28} best {min(times[side]):.2f} s; "
                      f"runs {' '.join(f'{t:.2f}' for t in times[side])}"
                      f"{inflight}")
            if prof:
                pstats.Stats(prof).sort_stats("tottime").print_stats(10)
    except BenchError as e:
        print(f"profile: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    return 0


def fresh_target(bench, case, size, i):
    """(uri, stop) of an empty target for one run."""
    if case != "sparse":
        uri, p = bench.nbdkit("memory", str(size))
        return uri, lambda: bench.stop(p)
    path = bench.path(f"target-{i}.img")
    with open(path, "wb") as f:
        f.truncate(size)
    uri, p = bench.qemu_nbd(path)

    def stop():
        bench.stop(p)
        os.unlink(path)
    return uri, stop


if __name__ == "__main__":
    sys.exit(main())
