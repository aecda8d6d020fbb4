"""The `nbdmirror` command: start the proxy, drive its job, compare images.

Exit status: 0 success; 1 the operation failed (or `verify` found a
difference); 2 bad usage.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from . import endpoints
from .job import JobError
from .options import JOB_KEYS, OptionError, ProxyOptions
from .sizes import format_size, parse_size

# The plugin nbdkit runs: a file of this package, so it is there in every
# kind of install (a checkout, an editable or a plain `pip install`).
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "nbdkit_plugin.py")
START_TIMEOUT = 30.0
# nbdkit's default of 16 threads per connection makes Python's GIL the
# bottleneck of guest reads: 4 read 1 GiB 1.3-1.5x faster (README).
DEFAULT_THREADS = 4


class Failure(Exception):
    """The operation failed: exit 1 with this one-line message."""


class Usage(Exception):
    """Bad usage: exit 2 with this one-line message."""


# -- argument parsing ----------------------------------------------------------

def _job_args(p, with_target=True):
    if with_target:
        p.add_argument("--target", metavar="URI", help="NBD URI of the mirror target")
    p.add_argument("--sync", choices=("full", "top", "none"))
    p.add_argument("--job-id", metavar="ID")
    p.add_argument("--granularity", metavar="SIZE")
    p.add_argument("--buf-size", metavar="SIZE")
    p.add_argument("--speed", metavar="RATE")
    p.add_argument("--copy-mode", choices=("background", "write-blocking"))
    p.add_argument("--on-source-error", choices=("report", "ignore", "stop", "enospc"))
    p.add_argument("--on-target-error", choices=("report", "ignore", "stop", "enospc"))
    p.add_argument("--target-is-zero", action="store_true", default=None)


def _parser():
    ap = argparse.ArgumentParser(
        prog="nbdmirror", description="Live disk-mirroring NBD proxy.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve a disk and (optionally) mirror it")
    p.add_argument("--source", required=True, metavar="SRC",
                   help="raw image path or NBD URI")
    p.add_argument("--control", required=True, metavar="PATH",
                   help="QMP control socket")
    p.add_argument("--device", default="disk0")
    p.add_argument("--bitmap", metavar="PATH")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="guest unix socket")
    where.add_argument("--port", type=int, help="guest TCP port")
    p.add_argument("--bind", metavar="ADDR", help="guest TCP address")
    p.add_argument("--pidfile", metavar="PATH")
    p.add_argument("--foreground", action="store_true")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                   help="nbdkit worker threads per guest connection "
                        f"(default {DEFAULT_THREADS})")
    _job_args(p)

    def client(name, help):
        c = sub.add_parser(name, help=help)
        c.add_argument("--control", required=True, metavar="PATH")
        return c

    client("status", "job state and progress").add_argument("--json", action="store_true")
    client("watch", "live progress until ready or the end")
    client("events", "print events as JSON lines until the job ends")
    c = client("start", "start a mirror job (drive-mirror)")
    c.add_argument("--device", default="disk0")
    _job_args(c)
    c.add_argument("--wait-ready", action="store_true",
                   help="wait until the job is ready")
    client("complete", "pivot the guest to the target").add_argument(
        "--wait", action="store_true")
    c = client("cancel", "cancel the job")
    c.add_argument("--force", action="store_true")
    c.add_argument("--wait", action="store_true")
    client("pause", "pause the background copy")
    client("resume", "resume the background copy")
    client("set-speed", "limit the background copy").add_argument("rate")

    p = sub.add_parser("verify", help="compare two images")
    p.add_argument("a", metavar="A", help="file path or NBD URI")
    p.add_argument("b", metavar="B", help="file path or NBD URI")
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except Usage as e:
        print(f"nbdmirror: {e}", file=sys.stderr)
        return 2
    except (Failure, JobError, endpoints.EndpointError, OSError) as e:
        print(f"nbdmirror: error: {e}", file=sys.stderr)
        return 1
    except OptionError as e:
        print(f"nbdmirror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- serve -------------------------------------------------------------------------

def _job_keys(args):
    """{plugin key: value} for the job options given on the command line."""
    out = {}
    for key in JOB_KEYS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            out[key] = "true" if value is True else str(value)
    return out


def serve(args):
    if args.threads < 1:
        raise Usage("--threads: must be at least 1")
    opts = ProxyOptions()
    keys = {"source": args.source, "control": args.control,
            "device": args.device, **_job_keys(args)}
    if args.bitmap:
        keys["bitmap"] = args.bitmap
    for key, value in keys.items():
        opts.set(key, value)
    from .proxy import Proxy
    proxy = Proxy(opts)
    proxy.preflight()           # same checks the plugin makes, with clean errors
    proxy.source.close()

    cmd = ["nbdkit", "-t", str(args.threads)]
    if args.socket:
        cmd += ["-U", os.path.abspath(args.socket)]
    if args.port is not None:
        cmd += ["-p", str(args.port)]
    if args.bind:
        cmd += ["-i", args.bind]
    tmpdir = None
    pidfile = args.pidfile and os.path.abspath(args.pidfile)
    if args.foreground:
        cmd += ["-f"] + (["-P", pidfile] if pidfile else [])
    else:
        if not pidfile:
            tmpdir = tempfile.mkdtemp(prefix="nbdmirror-")
            pidfile = os.path.join(tmpdir, "pid")
        cmd += ["-P", pidfile]
    # Pass the parsed values so nbdkit sees absolute paths (it chdirs to /).
    plugin_keys = {"source": opts.source, "control": opts.control,
                   "device": opts.device, **_job_keys(args)}
    cmd += ["python", PLUGIN] + [f"{k}={v}" for k, v in plugin_keys.items()]
    for path in (args.control, args.socket):
        _remove_stale_socket(path)
    if args.foreground:
        os.execvp(cmd[0], cmd)
    try:
        _start_daemon(cmd, pidfile, [opts.control] +
                      ([os.path.abspath(args.socket)] if args.socket else []))
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


def _start_daemon(cmd, pidfile, sockets):
    with tempfile.TemporaryFile() as err:
        rc = subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.seek(0)
        lines = [l.strip() for l in err.read().decode(errors="replace").splitlines()
                 if l.strip()]
    if rc:
        raise Failure(lines[-1] if lines else f"nbdkit exited with status {rc}")
    deadline = time.monotonic() + START_TIMEOUT
    for path in sockets:
        while not _accepts(path):
            if time.monotonic() > deadline:
                raise Failure(f"{path}: not accepting connections after "
                              f"{START_TIMEOUT:.0f} s")
            if not _alive(pidfile):
                raise Failure("nbdkit exited during start-up")
            time.sleep(0.02)


def _remove_stale_socket(path):
    """Unlink a socket file nobody listens on (left by a killed proxy);
    a live one stays, and nbdkit reports it as in use."""
    if path and os.path.exists(path) and not _accepts(path):
        os.unlink(path)


def _accepts(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _alive(pidfile):
    try:
        pid = int(open(pidfile).read())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return not os.path.exists(pidfile)   # not written yet


# -- QMP clients ---------------------------------------------------------------

class Client:
    """A synchronous QMP session (the qemu.qmp library's legacy client)."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise Failure(f"{path}: no such control socket")
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.qmp = QEMUMonitorProtocol(path)
        try:
            self.qmp.connect(negotiate=True)
        except Exception as e:      # noqa: BLE001
            raise Failure(f"{path}: cannot connect: {e}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.qmp.close()

    def cmd(self, name, **args):
        from qemu.qmp import ExecuteError
        try:
            return self.qmp.cmd(name, **args)
        except ExecuteError as e:
            raise Failure(_error_desc(e)) from None

    def job(self):
        jobs = self.cmd("query-block-jobs")
        if not jobs:
            raise Failure("no active job")
        return jobs[0]

    def event(self, timeout=None):
        return self.qmp.pull_event(wait=True if timeout is None else timeout)



def _error_desc(e):
    """The `desc` of a qemu.qmp ExecuteError (its layout changed between
    releases)."""
    err = getattr(e, "error", None)
    for obj in (getattr(err, "error", None), err):
        desc = getattr(obj, "desc", None)
        if isinstance(desc, str):
            return desc
    return str(e)


def _client(args):
    return Client(args.control)


def _wait_end(c):
    """Wait for the job's final event; return 0 if it completed cleanly."""
    while True:
        ev = c.event()
        name, data = ev["event"], ev.get("data", {})
        if name == "BLOCK_JOB_COMPLETED":
            if "error" in data:
                raise Failure(f"job failed: {data['error']}")
            return 0
        if name == "BLOCK_JOB_CANCELLED":
            return 0


def status(args):
    with _client(args) as c:
        jobs = c.cmd("query-block-jobs")
        if args.json:
            print(json.dumps(jobs[0] if jobs else None))
            return 0
        if not jobs:
            print("no active job")
            return 0
        j = jobs[0]
        t0, off0 = time.monotonic(), j["offset"]
        if j["status"] in ("running", "ready") and not j["paused"]:
            time.sleep(0.5)
            j = c.job()
        rate = max(0.0, (j["offset"] - off0) / (time.monotonic() - t0))
        left = j["len"] - j["offset"]
        pct = 100.0 * j["offset"] / j["len"] if j["len"] else 100.0
        eta = f"{left / rate:.0f} s" if rate and left else "-"
        print(f"job {j['device']}: {j['status']}"
              f"{' (paused)' if j['paused'] and j['status'] not in ('paused', 'standby') else ''}, "
              f"{format_size(j['offset'])} of {format_size(j['len'])} ({pct:.1f} %), "
              f"rate {format_size(rate)}/s, ETA {eta}"
              + (f", speed limit {format_size(j['speed'])}/s" if j["speed"] else "")
              + (f", io-status {j['io-status']}" if j["io-status"] != "ok" else "")
              + (f", error: {j['error']}" if j.get("error") else ""))
        return 0


def watch(args):
    from tqdm import tqdm
    with _client(args) as c:
        j = c.job()
        quiet = not sys.stderr.isatty()
        bar = tqdm(total=j["len"], unit="B", unit_scale=True, unit_divisor=1024,
                   disable=quiet, desc=j["device"])
        try:
            while True:
                jobs = c.cmd("query-block-jobs")
                if not jobs:
                    bar.set_postfix_str("ended")
                    return 0
                j = jobs[0]
                bar.total = j["len"]
                bar.n = j["offset"]
                bar.set_postfix_str(j["status"])
                bar.refresh()
                if j["status"] == "ready" and j["offset"] == j["len"]:
                    return 0
                try:
                    c.event(0.5)
                except Exception:       # noqa: BLE001 - timeout: poll again
                    pass
        finally:
            bar.close()
            if quiet:
                print(f"{j['device']}: {j['status']}, {j['offset']} of {j['len']} bytes")


def events(args):
    with _client(args) as c:
        if not c.cmd("query-block-jobs"):
            return 0
        while True:
            ev = c.event()
            print(json.dumps(ev), flush=True)
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "null":
                return 0


def start(args):
    if not args.target:
        raise Usage("start: --target is required")
    with _client(args) as c:
        cmd = {"device": args.device, "target": args.target,
               "sync": args.sync or "full", "job-id": "mirror0"}
        for key, value in _job_keys(args).items():
            if key in ("target", "sync"):
                continue
            if key in ("speed", "granularity", "buf-size"):
                value = parse_size(value, key)
            elif key == "target-is-zero":
                value = True
            cmd[key] = value
        c.cmd("drive-mirror", **cmd)
        if args.wait_ready:
            while c.job()["status"] != "ready":
                try:
                    c.event(0.5)
                except Exception:       # noqa: BLE001
                    pass
        return 0


def complete(args):
    with _client(args) as c:
        c.cmd("block-job-complete", device=c.job()["device"])
        return _wait_end(c) if args.wait else 0


def cancel(args):
    with _client(args) as c:
        c.cmd("block-job-cancel", device=c.job()["device"], force=args.force)
        return _wait_end(c) if args.wait else 0


def pause(args):
    with _client(args) as c:
        c.cmd("block-job-pause", device=c.job()["device"])


def resume(args):
    with _client(args) as c:
        c.cmd("block-job-resume", device=c.job()["device"])


def set_speed(args):
    try:
        rate = parse_size(args.rate, "rate")
    except ValueError as e:
        raise Usage(str(e)) from None
    with _client(args) as c:
        c.cmd("block-job-set-speed", device=c.job()["device"], speed=rate)


# -- verify --------------------------------------------------------------------------

def verify(args):
    a = endpoints.open_endpoint(_spec(args.a), readonly=True)
    b = endpoints.open_endpoint(_spec(args.b), readonly=True)
    if a.size != b.size:
        print(f"sizes differ: {a.size} != {b.size}")
        return 1
    step = 4 << 20
    ba, bb = bytearray(step), bytearray(step)
    for off in range(0, a.size, step):
        n = min(step, a.size - off)
        va, vb = memoryview(ba)[:n], memoryview(bb)[:n]
        a.pread(va, off)
        b.pread(vb, off)
        if (ba != bb) if n == step else (va != vb):
            i = next(i for i in range(n) if va[i] != vb[i])
            print(f"images differ at offset {off + i}")
            return 1
    print(f"images are identical ({a.size} bytes)")
    return 0


def _spec(spec):
    if endpoints.is_nbd_uri(spec):
        return spec
    if not os.path.exists(spec):
        raise Failure(f"{spec}: no such file")
    return os.path.abspath(spec)


COMMANDS = {"serve": serve, "status": status, "watch": watch, "events": events,
            "start": start, "complete": complete, "cancel": cancel,
            "pause": pause, "resume": resume, "set-speed": set_speed,
            "verify": verify}
