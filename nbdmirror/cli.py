"""The `nbdmirror` command: start the proxy, drive its job, compare images.

Exit status: 0 success; 1 the operation failed (or `verify` found a
difference); 2 bad usage.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

from . import paths, tls
# Not endpoints or job themselves: every command would pay their imports
# (the job machinery; endpoints' ctypes look-up runs `ldconfig -p`).
from .errors import EndpointError, JobError
from .options import (JOB, NBDKIT, OPTIONS, PROXY, OptionError, ProxyOptions,
                      make_job_options, qmp_arguments, rows)
from .sizes import format_size

# The plugin nbdkit runs: a file of this package, so it is there in every
# kind of install (a checkout, an editable or a plain `pip install`).
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "nbdkit_plugin.py")
START_TIMEOUT = 30.0
# Seconds between looks at a starting nbdkit.  A daemon's control socket
# opens a few ms after nbdkit's parent exits, and `serve` returns at the
# next look.
START_POLL = 0.005
# What the plugin prints before a refusal (nbdkit_plugin._say).
PLUGIN_SAYS = "nbdmirror: "


class Failure(Exception):
    """The operation failed: exit 1 with this one-line message."""


class Usage(Exception):
    """Bad usage: exit 2 with this one-line message."""


# -- argument parsing ----------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (and exit status 2)."""

    def error(self, message):
        raise Usage(message)


def _add_options(p, option_rows, required=()):
    """One argument per option row; values stay strings (None when not
    given) until the row parses them."""
    for row in option_rows:
        help = row.help + ("" if row.default is None
                           else f" (default: {row.default_text})")
        if row.kind.flag:
            # A flag that is on by default is turned off with --no-NAME.
            action = argparse.BooleanOptionalAction if row.default \
                else "store_true"
            p.add_argument(row.flag, dest=row.field, action=action,
                           default=None, help=help)
        else:
            p.add_argument(row.flag, dest=row.field, metavar=row.kind.metavar,
                           required=row.name in required, help=help)


class _Help(argparse.HelpFormatter):
    """Help text wrapped at spaces only: `job-dismiss` stays whole."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width,
                             break_on_hyphens=False)


def _parser():
    ap = _Parser(prog="nbdmirror", description="Live disk-mirroring NBD proxy.",
                 formatter_class=_Help)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve a disk and (optionally) mirror it",
                       formatter_class=_Help)
    _add_options(p, rows(PROXY, NBDKIT, JOB),
                 required=[r.name for r in rows(PROXY) if r.required])
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground, logging to stderr "
                        "(default: start a daemon and return once it serves)")

    def client(name, help):
        c = sub.add_parser(name, help=help, formatter_class=_Help)
        c.add_argument("--control", required=True, metavar="PATH",
                       help=OPTIONS["control"].help)
        return c

    client("status", "job state and progress").add_argument("--json", action="store_true")
    client("watch", "live progress until ready or the end")
    client("events", "print events as JSON lines until the job ends")
    c = client("start", "start a mirror job (drive-mirror)")
    _add_options(c, [OPTIONS["device"]] + rows(JOB), required=["target"])
    c.add_argument("--wait-ready", action="store_true",
                   help="wait until the job is ready")
    client("complete", "pivot the guest to the target").add_argument(
        "--wait", action="store_true")
    c = client("cancel", "cancel the job")
    c.add_argument("--force", action="store_true")
    c.add_argument("--wait", action="store_true")
    client("pause", "pause the background copy")
    client("resume", "resume the background copy")
    client("set-speed", "limit the background copy").add_argument(
        "rate", help=OPTIONS["speed"].help)

    p = sub.add_parser("verify", help="compare two images",
                       formatter_class=_Help)
    p.add_argument("a", metavar="A", help="file path or NBD URI")
    p.add_argument("b", metavar="B", help="file path or NBD URI")
    return ap


def main(argv=None):
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args) or 0
    except (Usage, OptionError) as e:
        print(f"nbdmirror: {e}", file=sys.stderr)
        return 2
    except (Failure, JobError, EndpointError, OSError) as e:
        print(f"nbdmirror: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _given(args, option_rows):
    """{row: the string (or True) given on the command line}."""
    return {r: getattr(args, r.field) for r in option_rows
            if getattr(args, r.field) is not None}


# -- serve -------------------------------------------------------------------------
#
# serve parses and checks the options and the paths, and starts nbdkit with
# the plugin; it opens neither the source nor the target (qemu-nbd serves
# one client by default: a probe of ours would end it).  The plugin's
# config_complete() checks the endpoints and the job, and prints a refusal
# as one line (PLUGIN_SAYS ...) that serve reports.

def serve(args):
    opts = ProxyOptions()
    server = {}                         # nbdkit rows: name -> parsed value
    for row, value in _given(args, rows(PROXY, NBDKIT, JOB)).items():
        if row.scope == NBDKIT:
            server[row.name] = row.parse(value)
        else:
            opts.set(row.key, value)
    if ("socket" in server) == ("port" in server):
        raise Usage("socket, port: give one of them" + (
            ", not both" if "socket" in server else
            " (nbdkit would listen on TCP port 10809 on every address)"))
    if "bind" in server and "port" not in server:
        raise Usage("bind: needs --port")
    try:
        tls.check_guest(server.get("tls", "off"),
                        server.get("tls-certificates"), server.get("tls-psk"),
                        server.get("tls-verify-peer", False))
    except ValueError as e:
        raise Usage(str(e)) from None
    opts.check(guest_socket=server.get("socket"))
    for path in (server.get("socket"), opts.control):
        if path:
            paths.remove_stale_socket(path)

    if server.get("threads") is None:
        from . import endpoints
        server["threads"] = endpoints.endpoint_kind(opts.source).guest_threads
    cmd = ["nbdkit"]
    for row in rows(NBDKIT):
        value = server.get(row.name, row.default)
        if value is True:               # a flag: nbdkit takes it bare
            cmd.append(row.nbdkit)
        elif value is not None and value is not False:
            cmd += [row.nbdkit, row.format(value)]
    serving = _Serving(server.get("socket"), opts.control)
    if args.foreground:
        cmd += ["-f", "--exit-with-parent", "python", PLUGIN,
                *opts.plugin_args()]
        return _run_foreground(cmd, serving)
    tmpdir = None
    if not opts.pidfile:                # to know whether the daemon lives
        tmpdir = tempfile.mkdtemp(prefix="nbdmirror-")
        opts.pidfile = os.path.join(tmpdir, "pid")
    stale = _pid_in(opts.pidfile)       # the plugin replaces a stale one
    cmd += ["python", PLUGIN, *opts.plugin_args()]
    try:
        _start_daemon(cmd, lambda: _alive(opts.pidfile, stale), serving)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


def _startup_error(lines, rc):
    """The one line that says why nbdkit did not start: the plugin's own,
    else nbdkit's last."""
    said = [l[len(PLUGIN_SAYS):] for l in lines if l.startswith(PLUGIN_SAYS)]
    if said:
        return said[-1]
    lines = [l.strip() for l in lines if l.strip()]
    return lines[-1] if lines else f"nbdkit exited with status {rc}"


class _Serving:
    """Calling it tells whether the proxy serves: its control socket
    accepts (it opens after nbdkit's fork, so after nbdkit bound its guest
    socket) and the guest socket is there (not connected to: nbdkit would
    log every such probe)."""

    def __init__(self, guest_socket, control):
        self.guest_socket, self.control = guest_socket, control

    def __call__(self):
        return paths.probe(self.control) is True and (
            self.guest_socket is None or os.path.exists(self.guest_socket))

    def __str__(self):
        return ", ".join(p for p in (self.guest_socket, self.control) if p)


def _start_daemon(cmd, alive, serving):
    with tempfile.TemporaryFile() as err:
        rc = subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.seek(0)
        lines = err.read().decode(errors="replace").splitlines()
    if rc:
        raise Failure(_startup_error(lines, rc))
    deadline = time.monotonic() + START_TIMEOUT
    while not serving():
        if time.monotonic() > deadline:
            raise Failure(f"{serving}: not accepting connections "
                          f"after {START_TIMEOUT:.0f} s")
        if not alive():
            raise Failure("nbdkit exited during start-up")
        time.sleep(START_POLL)


def _pid_in(pidfile):
    try:
        with open(pidfile, "rb") as f:
            return int(f.read(paths.PIDFILE_MAX + 1))
    except (OSError, ValueError):
        return None


def _alive(pidfile, stale):
    """Whether the daemon that writes `pidfile` may still be starting: its
    pid is there and alive, or (still `stale` or no pid) not written yet."""
    pid = _pid_in(pidfile)
    if pid is None or pid == stale:
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class _Relay(threading.Thread):
    """Copies nbdkit's stderr to ours, line by line; until release() it
    keeps the lines instead (to report one line if nbdkit does not start)."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []
        self._held = True
        self._lock = threading.Lock()

    def run(self):
        for raw in self.stream:
            line = raw.decode(errors="replace")
            with self._lock:
                if self._held:
                    self.lines.append(line.rstrip("\n"))
                    continue
            sys.stderr.write(line)
            sys.stderr.flush()

    def release(self):
        with self._lock:
            self._held = False
            for line in self.lines:
                print(line, file=sys.stderr)
            sys.stderr.flush()


def _run_foreground(cmd, serving):
    """Run nbdkit in the foreground as our child: its log goes to our
    stderr once it serves; if it stops before, one line says why.
    Signals that end us are passed to it; its exit status is ours."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    relay = _Relay(proc.stderr)
    relay.start()
    ended_by = []

    def forward(sig, frame):
        ended_by.append(sig)
        proc.send_signal(sig)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    deadline = time.monotonic() + START_TIMEOUT
    while proc.poll() is None and not ended_by and \
            time.monotonic() < deadline and not serving():
        time.sleep(START_POLL)
    serving = proc.poll() is None
    if serving or ended_by:
        relay.release()
    rc = proc.wait()
    relay.join()
    if not serving and not ended_by:
        raise Failure(_startup_error(relay.lines, rc))
    return rc if rc >= 0 else 128 - rc


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
              + (f", target disconnected for {j['target-disconnected']:.0f} s"
                 if "target-disconnected" in j else "")
              + (f", copy-mode {j['copy-mode']}"
                 + (" (actively synced)" if j.get("actively-synced") else "")
                 if j.get("copy-mode", "background") != "background" else "")
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
    given = {r.name: v for r, v in _given(args, rows(JOB)).items()}
    job = make_job_options(given)
    device = OPTIONS["device"].parse(args.device or OPTIONS["device"].default)
    with _client(args) as c:
        c.cmd("drive-mirror", device=device, **qmp_arguments(job))
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
    rate = OPTIONS["speed"].parse(args.rate)
    with _client(args) as c:
        c.cmd("block-job-set-speed", device=c.job()["device"], speed=rate)


# -- verify --------------------------------------------------------------------------

def verify(args):
    from . import endpoints
    a = endpoints.open_endpoint(_spec(args.a), readonly=True)
    try:
        b = endpoints.open_endpoint(_spec(args.b), readonly=True)
    except BaseException:
        a.close()
        raise
    try:
        return _compare(a, b)
    finally:
        a.close()
        b.close()


def _compare(a, b):
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
    """A file path (made absolute) or an NBD URI, as --source takes it."""
    try:
        return OPTIONS["source"].kind.parse(spec)
    except ValueError as e:
        raise Failure(str(e)) from None


COMMANDS = {"serve": serve, "status": status, "watch": watch, "events": events,
            "start": start, "complete": complete, "cancel": cancel,
            "pause": pause, "resume": resume, "set-speed": set_speed,
            "verify": verify}
