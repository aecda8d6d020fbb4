"""Where guest read throughput goes: the proxy against reference hops.

    .venv/bin/python bench/profile_read.py [--size MiB] [--runs N]

Reads one random-data image with `nbdcopy URI null:` through each server
below, round-robin (so background load hits all alike), and prints the best
throughput, its ratio to the direct read, and CPU seconds per GiB spent in
each process (from /proc/PID/stat and the children's rusage):

  NBD source (qemu-nbd on the image):
    direct            nbdcopy reads qemu-nbd itself
    C hop             nbdkit's nbd plugin in front of it (no Python)
    Python hop        bench/plugins/forward_nbd.py: aio_pread into nbdkit's
                      buffer, a handle pool, nothing else
    Python hop, no init   the same with libnbd's pread_initialize off
    nbdmirror         the proxy, idle (no job)
  file source:
    direct            nbdkit's file plugin
    Python hop        bench/plugins/read_file.py: os.preadv into the buffer
    nbdmirror         the proxy on the file, idle

On a 2-core machine a read through any extra process is CPU-bound: the
CPU columns show what each hop costs per GiB.
"""

import argparse
import os
import resource
import sys

from harness import MiB, Bench, BenchError, make_random, proxy_pids

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK     # utime + stime


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Case:
    def __init__(self, group, name, uri, hop=None, source=None):
        self.group, self.name, self.uri = group, name, uri
        # the pids to account (a process or a pid)
        self.hop, self.source = (getattr(p, "pid", p) for p in (hop, source))
        self.rates, self.cpu = [], {"hop": [], "source": [], "nbdcopy": []}

    def measure(self, bench, size):
        before = {k: cpu_seconds(p) for k, p in
                  (("hop", self.hop), ("source", self.source)) if p}
        c0 = children_cpu()
        t = bench.tool(["nbdcopy", self.uri, "null:"])
        self.rates.append(size / 1e6 / t)
        per_gib = (1 << 30) / size
        self.cpu["nbdcopy"].append((children_cpu() - c0) * per_gib)
        for k, p in (("hop", self.hop), ("source", self.source)):
            if p:
                self.cpu[k].append((cpu_seconds(p) - before[k]) * per_gib)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB (1024)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    size = args.size * MiB
    bench = Bench(args.runs, timeout=300)
    try:
        img = bench.path("random.img")
        make_random(img, size)
        q_uri, q = bench.qemu_nbd(img)
        plug = os.path.join(HERE, "plugins")
        nbdkit = bench.nbdkit
        c_uri, c = nbdkit("nbd", f"uri={q_uri}")
        p_uri, p = nbdkit("python", os.path.join(plug, "forward_nbd.py"),
                          f"uri={q_uri}")
        pn_uri, pn = nbdkit("python", os.path.join(plug, "forward_nbd.py"),
                            f"uri={q_uri}", "initialize=false")
        m = bench.proxy(q_uri)
        f_uri, f = nbdkit("file", img)
        pf_uri, pf = nbdkit("python", os.path.join(plug, "read_file.py"),
                            f"file={img}")
        mf = bench.proxy(img)
        cases = [
            Case("nbd", "direct (qemu-nbd)", q_uri, source=q),
            Case("nbd", "C hop (nbdkit nbd plugin)", c_uri, c, q),
            Case("nbd", "Python hop (forward_nbd.py)", p_uri, p, q),
            Case("nbd", "Python hop, pread_initialize off", pn_uri, pn, q),
            # the proxy's nbdkit (`serve --foreground` is its parent)
            Case("nbd", "nbdmirror proxy", m.uri, proxy_pids(m)[-1], q),
            Case("file", "direct (nbdkit file)", f_uri, f),
            Case("file", "Python hop (read_file.py)", pf_uri, pf),
            Case("file", "nbdmirror proxy", mf.uri, proxy_pids(mf)[-1]),
        ]
        load0 = os.getloadavg()[0]
        for _ in range(args.runs):
            for case in cases:
                case.measure(bench, size)
        load1 = os.getloadavg()[0]
    except BenchError as e:
        print(f"profile: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()

    print(f"guest sequential read, {args.size} MiB, nbdcopy URI null:, "
          f"best of {args.runs}; load average {load0:.1f} -> {load1:.1f}")
    print(f"{'source':6} {'server':34} {'MB/s':>6} {'ratio':>6}   "
          f"CPU s/GiB: {'hop':>5} {'source':>6} {'nbdcopy':>7} {'total':>6}")
    for group in ("nbd", "file"):
        direct = max(cases[[c.group for c in cases].index(group)].rates)
        for c in (c for c in cases if c.group == group):
            best = max(c.rates)
            cpu = {k: (min(v) if v else 0.0) for k, v in c.cpu.items()}
            print(f"{c.group:6} {c.name:34} {best:6.0f} {best / direct:6.2f}"
                  f"   {'':10} {cpu['hop']:5.2f} {cpu['source']:6.2f}"
                  f" {cpu['nbdcopy']:7.2f} {sum(cpu.values()):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
