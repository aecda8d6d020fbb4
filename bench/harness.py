"""The benchmark's machinery: servers, tools, fio, QEMU's mirror and job
control.  Every process goes through tests/helpers.py's Processes
registry (its own session, a log file, stopped by pid); bench/run.py
holds the measurements.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections import defaultdict

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
# This checkout's package for what imports it in-process (profile_copy.py,
# option defaults), ahead of any installed (editable) nbdmirror.
sys.path.insert(0, REPO)

from helpers import (EventLog, HarnessError, Processes,  # noqa: E402
                     make_image, nbdkit_server, nbdmirror_env, qemu_nbd, qmp_connect, qmp_execute, start_proxy,
                     wait_for_socket)
from servers import frozen  # noqa: E402,F401 - SIGSTOP for a while

# The helpers' failures (a server that does not start, a QMP timeout) are
# the bench's too: a row that hits one shows it as its error.
BenchError = HarnessError
WAIT = 30                   # seconds a server may take to start
ENDED = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


def log(msg):
    print(f"--> {msg}", file=sys.stderr, flush=True)


class Bench:
    """The temp dirs and every process and QMP client started in them.

    runs: samples per side; timeout: seconds one copy may take;
    other: the --compare checkout (None: this one only).
    """

    def __init__(self, runs, timeout=300, other=None):
        self.runs, self.timeout, self.other = runs, timeout, other
        self.dir = tempfile.mkdtemp(prefix="nbdm-bench-", dir="/tmp")
        self._shm = None            # made on first use
        self.procs = Processes(self.dir)
        self.clients = []           # QMP clients, closed before the servers
        self.shared = set()         # ids of processes no scope stops
        self.code = {}              # checkout -> the plugin its proxies run
        self._n = 0

    # -- paths ---------------------------------------------------------------

    def path(self, name):
        return os.path.join(self.dir, name)

    def shm_path(self, name):
        """A path in /dev/shm (tmpfs: sparse files past ext4's 16 TiB)."""
        if self._shm is None:
            self._shm = tempfile.mkdtemp(prefix="nbdm-bench-", dir="/dev/shm")
            log(f"working in {self._shm} too")
        return os.path.join(self._shm, name)

    def sock(self, name):
        self._n += 1
        return self.path(f"{name}{self._n}.sock")

    # -- lifetime -------------------------------------------------------------

    def stop(self, proc):
        """Stop one process now; close() will not look at its pid again."""
        self.procs.stop(proc, forget=True)

    def share(self, proc):
        """Keep `proc` running past the scope that started it (until
        close())."""
        self.shared.add(id(proc))
        return proc

    @contextlib.contextmanager
    def scope(self):
        """Stop every process and close every QMP client started in the
        block, when it ends (newest first, proxies first), except shared
        ones."""
        procs0 = set(map(id, self.procs.procs))
        clients0 = len(self.clients)
        try:
            yield
        finally:
            for client in self.clients[clients0:]:
                close_quietly(client)
            del self.clients[clients0:]
            mine = [p for p in self.procs.procs
                    if id(p) not in procs0 and id(p) not in self.shared]
            for p in sorted(reversed(mine),
                            key=lambda p: p.name != "nbdmirror"):
                self.stop(p)

    def close(self):
        try:
            for client in self.clients:
                close_quietly(client)
            self.procs.stop_all()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._shm:
                shutil.rmtree(self._shm, ignore_errors=True)

    # -- servers: each returns (uri, proc) ------------------------------------

    def qemu_nbd(self, image, *extra):
        uri = qemu_nbd(self.procs, image, self.sock("qnbd"), extra=extra,
                       timeout=WAIT)
        return uri, self.procs.procs[-1]

    def nbdkit(self, *args, filters=()):
        uri = nbdkit_server(self.procs, self.sock("nbdkit"), *args,
                            filters=filters, timeout=WAIT)
        return uri, self.procs.procs[-1]

    @contextlib.contextmanager
    def target(self, kind, size, shm=False):
        """An empty target for one run, stopped (and its file removed)
        after the block: "memory" (nbdkit memory) or "file" (qemu-nbd on a
        fresh sparse raw file; on tmpfs with `shm`).  Yields (uri, path)."""
        path = None
        if kind == "memory":
            uri, proc = self.nbdkit("memory", str(size))
        else:
            self._n += 1
            path = (self.shm_path if shm else self.path)(f"tgt{self._n}.img")
            with open(path, "wb") as f:
                f.truncate(size)
            uri, proc = self.qemu_nbd(path)
        try:
            yield uri, path
        finally:
            self.stop(proc)
            if path:
                os.unlink(path)

    def proxy(self, source, target=None, checkout=None, **opts):
        """`nbdmirror serve --foreground` (with --target: the job starts
        with it): a helpers.Proxy (.proc, .uri) with a connected QMP client
        in .qmp and an EventLog in .events.  It runs this checkout's
        package (or PYTHONPATH's, when set), or the `checkout` dir's."""
        proxy = start_proxy(self.procs, source, self.sock("guest"),
                            self.sock("qmp"), target=target, timeout=WAIT,
                            cwd=self.dir, env=proxy_env(checkout), **opts)
        proxy.qmp = qmp_connect(proxy.control, timeout=30)
        self.clients.append(proxy.qmp)
        proxy.events = EventLog(proxy.qmp)
        proxy.target_given = target is not None
        self._check_code(proxy, checkout)
        return proxy

    def _check_code(self, proxy, checkout):
        """Record which plugin file the proxy's nbdkit runs; with a
        `checkout`, it must be that checkout's."""
        plugin = proxy_plugin(proxy)
        self.code.setdefault(checkout, plugin)
        if checkout and not plugin.startswith(
                os.path.abspath(checkout) + os.sep):
            raise BenchError(f"the proxy for {checkout} runs {plugin}")

    def stop_proxy(self, proxy):
        self._forget_client(proxy.qmp)
        self.stop(proxy.proc)

    def stop_qsd(self, proc, qmp):
        self._forget_client(qmp)
        self.stop(proc)

    def _forget_client(self, client):
        close_quietly(client)
        if client in self.clients:
            self.clients.remove(client)

    def qsd(self, *args):
        """qemu-storage-daemon with `args` and a QMP monitor: (proc, qmp,
        events); QMP connects once the daemon runs its main loop."""
        qmp_sock = self.sock("qsd-qmp")
        proc = self.procs.start(
            ["qemu-storage-daemon", *args,
             "--chardev", f"socket,id=qmp0,path={qmp_sock},server=on,wait=off",
             "--monitor", "chardev=qmp0"], name="qemu-storage-daemon")
        wait_for_socket(qmp_sock, WAIT, proc)
        try:
            qmp = qmp_connect(qmp_sock, timeout=30)
        except Exception as e:      # noqa: BLE001 - e.g. the daemon died
            time.sleep(0.2)         # its last words into the log
            raise BenchError(f"qemu-storage-daemon: no QMP session ({e!r}),"
                             f" exit status {proc.poll()}; its log: "
                             f"{self.procs.output(proc)[-500:]}") from None
        self.clients.append(qmp)
        return proc, qmp, EventLog(qmp)

    # -- tools ----------------------------------------------------------------

    def run(self, args, timeout=None):
        """Run a tool to its end; return (seconds, its output)."""
        t0 = time.monotonic()
        proc = self.procs.start(args)
        try:
            rc = proc.wait(timeout or self.timeout)
        except Exception:
            self.stop(proc)
            raise BenchError(f"{' '.join(map(str, args))}: no end within "
                             f"{timeout or self.timeout} s") from None
        t = time.monotonic() - t0
        out = self.procs.output(proc)
        self.stop(proc)
        if rc != 0:
            raise BenchError(f"{' '.join(map(str, args))} exited {rc}: {out}")
        return t, out

    def tool(self, args, timeout=None):
        """Run a tool to its end; return its wall time in seconds."""
        return self.run(args, timeout)[0]

    def nbdcopy(self, src, dst):
        return self.tool(["nbdcopy", "--flush", src, dst])

    def fio(self, uri, rw, runtime, **opts):
        """Start fio's nbd engine against `uri` (see FioRun)."""
        return FioRun(self, uri, rw, runtime, **opts)


def close_quietly(client):
    try:
        client.close()
    except Exception:       # noqa: BLE001 - the server may be gone
        pass


def proxy_env(checkout):
    if checkout is None:
        return nbdmirror_env(repo_first=False)
    return dict(os.environ, PYTHONPATH=os.path.abspath(checkout))


def proxy_pids(proxy):
    """The pids of `serve --foreground` and of its children: the last is
    the nbdkit that serves (the process itself if `serve` execs it)."""
    pids = [proxy.proc.pid]
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == proxy.proc.pid:
            pids.append(int(name))
    return pids


def _nbdkit_args(proxy):
    """The proxy's nbdkit command line, split at `python`: (nbdkit's own
    arguments, [PLUGIN, key=value, ...])."""
    for pid in proxy_pids(proxy):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "python" in args:
            i = args.index("python")
            return args[:i], args[i + 1:]
    raise BenchError(f"no nbdkit python plugin under pid {proxy.proc.pid}")


def proxy_plugin(proxy):
    """The plugin file that the proxy's nbdkit runs."""
    return _nbdkit_args(proxy)[1][0]


def proxy_threads(proxy):
    """nbdkit's worker threads per connection (its -t) under the proxy;
    None when serve passed none (nbdkit's own default)."""
    head = _nbdkit_args(proxy)[0]
    for flag in ("-t", "--threads"):
        if flag in head:
            return int(head[head.index(flag) + 1])
    return None


def peak_rss(pid):
    """VmHWM (peak resident set) of `pid` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")


def socket_of(uri):
    """The socket path of an nbd+unix:// URI."""
    q = urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)
    return q["socket"][0]


# -- the sides taking turns --------------------------------------------------

PREFAULT = 512 * MiB


def prefault(size=PREFAULT):
    """Touch `size` bytes of fresh memory, then free them.  This VM hands
    memory that stayed free for ~10 s back to its host (free page
    reporting), and touching it again runs at a third of the speed: the
    first side of a run after a pause (a section's first, always the same)
    paid 0.3-0.5 s per GiB that the others did not."""
    buf = bytearray(size)
    buf[::4096] = b"\1" * len(range(0, size, 4096))
    del buf


def turns(runs, sides):
    """Run each side `runs` times, the order reversing every run (A B, B A,
    ...: a cold cache or a burst of load does not always hit the same
    side), memory touched before each run (prefault).  sides: {name: fn()
    -> {series: sample}}.  Returns {series: [samples]}."""
    out = defaultdict(list)
    names = list(sides)
    for i in range(runs):
        prefault()
        for name in (names if i % 2 == 0 else names[::-1]):
            for series, value in sides[name]().items():
                out[series].append(value)
    return out


# -- QMP and jobs ------------------------------------------------------------

def command(client, name, **args):
    """The `return` of QMP command `name`; BenchError on an error reply."""
    reply = qmp_execute(client, name, **args)
    if "error" in reply:
        raise BenchError(f"{name}: {reply['error'].get('desc')}")
    return reply["return"]


def stamp(ev):
    return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6


def wait_ready(bench, proxy, timeout):
    """The BLOCK_JOB_READY event of the proxy's job; a BenchError that
    says why (the job ended first, a timeout) with the log's last lines."""
    try:
        return proxy.events.wait("BLOCK_JOB_READY", timeout=timeout)
    except HarnessError as e:
        ended = [ev["data"] for ev in proxy.events.events
                 if ev["event"] in ENDED]
        why = f"job ended before ready: {ended[0]}" if ended else str(e)
        tail = bench.procs.output(proxy.proc).strip().splitlines()[-3:]
        raise BenchError(f"{why}; the proxy's log ends: "
                         f"{' | '.join(tail)}") from None


def ready_since_start(bench, proxy, t0, timeout):
    """Seconds from monotonic `t0` (before `serve --target` started) to
    the job's ready.  QMP connects after the job started: if it was ready
    already, the time is when the query said so (an upper bound)."""
    jobs = command(proxy.qmp, "query-block-jobs")
    if not (jobs and jobs[0]["ready"]):
        wait_ready(bench, proxy, timeout)
    return time.monotonic() - t0


def end_job(proxy, force=False):
    """Cancel the proxy's job (soft: it converges and completes) and wait
    until it is gone; a BenchError if it reports an error."""
    qmp, events = proxy.qmp, proxy.events
    jobs = command(qmp, "query-block-jobs")
    if not jobs:
        return
    command(qmp, "block-job-cancel", device=jobs[0]["device"], force=force)
    events.wait_end(60)
    errors = [e["data"]["error"] for e in events.events
              if e["event"] in ENDED and e["data"].get("error")]
    if errors and not force:
        raise BenchError(f"job failed after ready: {errors[0]}")
    deadline = time.monotonic() + 10
    while command(qmp, "query-block-jobs"):     # until the job is dismissed
        if time.monotonic() > deadline:
            raise BenchError("the job is still listed 10 s after it ended")
        time.sleep(0.01)


def start_mirror(proxy, target_uri, **args):
    """drive-mirror on a proxy without a job; new events only."""
    proxy.qmp.clear_events()        # the previous job's last events
    proxy.events = EventLog(proxy.qmp)
    command(proxy.qmp, "drive-mirror", device="disk0", target=target_uri,
            sync="full", **args)


def mirror_to_ready(bench, proxy, target_uri, **args):
    """drive-mirror on an idle proxy until BLOCK_JOB_READY; then the job
    is soft-cancelled and waited for.  Returns {"mirror": seconds,
    "mirror-own": the proxy's own view (event time stamps, `created` to
    READY, without QMP)}."""
    t0 = time.monotonic()
    start_mirror(proxy, target_uri, **args)
    ready = wait_ready(bench, proxy, bench.timeout)
    t = time.monotonic() - t0
    out = {"mirror": t}
    created = [e for e in proxy.events.named("JOB_STATUS_CHANGE")
               if e["data"]["status"] == "created"]
    if created:
        out["mirror-own"] = stamp(ready) - stamp(created[0])
    end_job(proxy)
    return out


def wait_job_ready(bench, proxy, timeout=None):
    """Poll until the proxy's job is ready (events may be gone by the
    time QMP connected)."""
    deadline = time.monotonic() + (timeout or bench.timeout)
    while True:
        jobs = command(proxy.qmp, "query-block-jobs")
        if jobs and jobs[0]["ready"]:
            return jobs[0]
        if not jobs:
            raise BenchError("the job ended before ready: "
                             f"{proxy.events.tokens()}")
        if time.monotonic() > deadline:
            raise BenchError(f"job not ready within {timeout} s")
        time.sleep(0.02)


# -- QEMU's own mirror -------------------------------------------------------

def blockdev(node, source, locking=True):
    """A --blockdev argument: a raw file path or an nbd+unix:// URI.
    locking=False: a file that another QEMU process has open too."""
    if "://" in source:
        return (f"driver=nbd,node-name={node},server.type=unix,"
                f"server.path={socket_of(source)}")
    return (f"driver=file,node-name={node},filename={os.path.abspath(source)}"
            + ("" if locking else ",locking=off"))


def qemu_mirror(bench, source, target_uri, export=None, locking=True):
    """qemu-storage-daemon 7.2 with `source` (node src) and `target_uri`
    (node tgt) as --blockdev nodes, and, with `export` (a socket path),
    src exported over NBD as "disk" (a guest's view: it follows the
    pivot).  Returns (proc, qmp, events, seconds to start)."""
    t0 = time.monotonic()
    args = ["--blockdev", blockdev("src", source, locking),
            "--blockdev", blockdev("tgt", target_uri)]
    if export:
        args += ["--nbd-server", f"addr.type=unix,addr.path={export}",
                 "--export", "type=nbd,id=exp0,node-name=src,name=disk,"
                             "writable=on"]
    proc, qmp, events = bench.qsd(*args)
    return proc, qmp, events, time.monotonic() - t0


def qemu_mirror_start(qmp, copy_mode="background"):
    command(qmp, "blockdev-mirror", **{"job-id": "m0", "device": "src",
                                       "target": "tgt", "sync": "full",
                                       "copy-mode": copy_mode})


def qemu_wait_ready(bench, proc, events, timeout=None):
    try:
        return events.wait("BLOCK_JOB_READY", timeout=timeout or bench.timeout)
    except HarnessError as e:
        raise BenchError(f"QEMU's mirror: {e}; its log: "
                         f"{bench.procs.output(proc)[-300:]}") from None


def qemu_mirror_to_ready(bench, source, target_uri):
    """{"qemu-start": seconds from starting the daemon to READY,
    "qemu-job": from blockdev-mirror to READY, "qemu-up": from starting
    the daemon to QMP answering}."""
    t0 = time.monotonic()
    proc, qmp, events, _ = qemu_mirror(bench, source, target_uri)
    t1 = time.monotonic()
    qemu_mirror_start(qmp)
    qemu_wait_ready(bench, proc, events)
    t2 = time.monotonic()
    bench.stop_qsd(proc, qmp)
    return {"qemu-start": t2 - t0, "qemu-job": t2 - t1, "qemu-up": t1 - t0}


# -- fio ----------------------------------------------------------------------

class FioRun:
    """fio's nbd engine against `uri`, started at once and time based:

        fio --ioengine=nbd --uri=URI --rw=RW --bs=BS --iodepth=N
            --runtime=R --time_based [--size=S] [options]

    With an IOPS log (log_unix_epoch: wall-clock time stamps) the rate
    within any wall-clock window can be read afterwards (iops_between).
    stop() interrupts it (SIGINT: fio still writes its report)."""

    LOG_MS = 20

    def __init__(self, bench, uri, rw, runtime, bs="4k", iodepth=16,
                 size=None, extra=()):
        bench._n += 1
        base = bench.path(f"fio{bench._n}")
        self.bench, self.out, self.logbase = bench, base + ".json", base
        args = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
                f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}",
                f"--runtime={int(runtime * 1000)}ms", "--time_based",
                "--output-format=json", f"--output={self.out}",
                f"--write_iops_log={base}", f"--log_avg_msec={self.LOG_MS}",
                "--log_unix_epoch=1", *extra]
        if size:
            args.append(f"--size={size}")
        self.runtime = runtime
        self.proc = bench.procs.start(args, name="fio")
        self.job = None
        self.interrupted = False

    def stop(self):
        """Interrupt fio (it exits 128 then, with its report)."""
        self.interrupted = True
        self.bench.procs.kill(self.proc, signal.SIGINT)
        return self.wait()

    def wait(self):
        """fio's report of the job (its json `jobs[0]`)."""
        if self.job is not None:
            return self.job
        try:
            rc = self.proc.wait(self.runtime + 60)
        except Exception:
            self.bench.stop(self.proc)
            raise BenchError("fio did not end") from None
        out = self.bench.procs.output(self.proc)
        self.bench.stop(self.proc)
        try:
            with open(self.out) as f:
                text = f.read()
            report = json.loads(text[text.index("{"):])
        except (OSError, ValueError):
            raise BenchError(f"fio exited {rc} without a report: "
                             f"{out[-500:]}") from None
        job = report["jobs"][0]
        if (rc != 0 and not (self.interrupted and rc == 128)) or \
                job.get("error"):
            raise BenchError(f"fio exited {rc}, error {job.get('error')}: "
                             f"{out[-500:]}")
        self.job = job
        return job

    def intervals(self, ddir):
        """[(end time in s, IOPS over the LOG_MS before it)] of direction
        0 (read) or 1 (write)."""
        out = []
        for name in os.listdir(self.bench.dir):
            if not (name.startswith(os.path.basename(self.logbase) + "_iops")):
                continue
            with open(os.path.join(self.bench.dir, name)) as f:
                for line in f:
                    t, v, d = (x.strip() for x in line.split(",")[:3])
                    if int(d) == ddir:
                        out.append((int(t) / 1000, int(v)))
        return sorted(out)

    def iops_between(self, t0, t1, ddir):
        """Mean IOPS of the log intervals that lie within wall-clock
        [t0, t1]; None when none does (a window shorter than LOG_MS)."""
        step = self.LOG_MS / 1000
        inside = [v for t, v in self.intervals(ddir)
                  if t - step >= t0 - 0.005 and t <= t1 + 0.005]
        return sum(inside) / len(inside) if inside else None

    def span(self):
        """Wall-clock (first, last) log time: when the I/O ran."""
        times = [t for d in (0, 1) for t, _ in self.intervals(d)]
        return (min(times), max(times)) if times else (None, None)


def fio_iops(job, ddir):
    return job["read" if ddir == 0 else "write"]["iops"]


def fio_max_latency_ms(job):
    """The longest request of the run (read or write), in ms."""
    return max(job[d]["lat_ns"]["max"] for d in ("read", "write")
               if job[d]["total_ios"]) / 1e6


def fio_percentile_ms(job, pct="99.990000"):
    vals = [job[d]["lat_ns"].get("percentile", {}).get(pct)
            for d in ("read", "write") if job[d]["total_ios"]]
    vals = [v for v in vals if v is not None]
    return max(vals) / 1e6 if vals else None


# -- images ------------------------------------------------------------------

def make_random(path, size):
    # fsync: no writeback during the measurements
    make_image(path, size, seed=1, fsync=True)


def make_sparse(path, size, data):
    """`data` bytes in 1 MiB pieces spread evenly over a sparse `size`;
    an existing file (e.g. from `qemu-img create -f raw`) is kept."""
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(size)
    rng = random.Random(2)
    pieces = max(1, data // MiB)
    step = size // pieces
    with open(path, "r+b") as f:
        for i in range(pieces):
            f.seek(i * step)
            f.write(rng.randbytes(MiB))
        f.flush()
        os.fsync(f.fileno())


def copy_prefix(src, dst, size):
    """The first `size` bytes of `src` as a new file `dst`."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = size
        while left:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), left)
            if n <= 0:
                raise BenchError(f"{src}: shorter than {size}")
            left -= n
        os.fsync(fo.fileno())


def allocated(path):
    return os.stat(path).st_blocks * 512

