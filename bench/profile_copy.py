"""Where copy time goes: nbdmirror's Copier alone, in this process.

    .venv/bin/python bench/profile_copy.py [--runs N] [--request K ...]
                                           [--cases dense-file,dense-nbd,sparse]
                                           [--size MiB] [--profile]

Runs the copier (nbdmirror.copier.Copier between endpoints.open_endpoint()
endpoints, as a job builds it: learn the target, scan, pump until
converged, flush the target) outside nbdkit, with copier.REQUEST_SIZE set
to each --request size in turn (KiB; default 1024 512 256), against
`nbdcopy --flush` between the same servers, the sides taking turns.
Cases:

  dense-file   1 GiB (--size) random raw file -> nbdkit memory
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

# harness puts this checkout first on sys.path (before an installed
# nbdmirror): import it before nbdmirror
from harness import GiB, MiB, Bench, BenchError, make_random, make_sparse

import nbdmirror.copier as copier  # noqa: E402
from nbdmirror.bitmap import DirtyBitmap  # noqa: E402
from nbdmirror.endpoints import open_endpoint  # noqa: E402

GRANULARITY = 64 << 10      # the job's default


def run_copier(src, tgt, profile):
    """Copy `src` to `tgt` (a path or NBD URI each) with a Copier in this
    process.  Returns (seconds, mean requests in flight, cProfile or
    None); the time includes opening the endpoints, as a job's does."""
    prof = cProfile.Profile() if profile else None
    depth = []
    errors = []
    t0 = time.monotonic()
    if prof:
        prof.enable()
    source = open_endpoint(src, readonly=True, want_depth=True)
    try:
        target = open_endpoint(tgt)
        try:
            c = copier.Copier(DirtyBitmap(source.size, GRANULARITY), source,
                              target, on_error=errors.append)
            c.learn_target()
            c.scan()
            while not c.converged():
                c.pump(1.0)
                if errors:      # the job would retry or fail; a probe stops
                    raise BenchError(f"copier: {errors[0]}")
                depth.append(c._requests)  # noqa: SLF001 - a probe, not an API
            flushed = []
            c.start_flush(flushed.append)
            while not flushed:
                c.pump(1.0)
            if flushed[0]:
                raise BenchError(f"target flush: {os.strerror(flushed[0])}")
        finally:
            target.close()
    finally:
        source.close()
        if prof:
            prof.disable()
    return time.monotonic() - t0, statistics.mean(depth or [0]), prof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--request", type=int, nargs="+", default=[1024, 512, 256],
                    metavar="KIB")
    ap.add_argument("--cases", default="dense-file,dense-nbd,sparse")
    ap.add_argument("--size", type=int, default=1024, metavar="MiB",
                    help="the dense cases' file (1024)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    names = args.cases.split(",")
    unknown = set(names) - {"dense-file", "dense-nbd", "sparse"}
    if unknown:
        ap.error(f"--cases: unknown {', '.join(sorted(unknown))}")
    bench = Bench(args.runs, timeout=300)
    try:
        cases = {}
        if {"dense-file", "dense-nbd"} & set(names):
            dense_size = args.size * MiB
            dense = bench.path("random.img")
            make_random(dense, dense_size)
            dense_uri, _ = bench.qemu_nbd(dense)
            cases["dense-file"] = (dense, dense_size)
            cases["dense-nbd"] = (dense_uri, dense_size)
        if "sparse" in names:
            sparse = bench.path("sparse.img")
            make_sparse(sparse, 64 * GiB, 256 * MiB)
            sparse_uri, _ = bench.qemu_nbd(sparse)
            cases["sparse"] = (sparse_uri, 64 * GiB)
        print(f"load average {os.getloadavg()[0]:.1f}")
        for name in names:
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
                            t, d, p = run_copier(src, tgt, args.profile)
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
