"""Helpers for integration tests against real processes.

Everything here runs the real tools: qemu-nbd, nbdkit, qemu-io, qemu-img,
libnbd and `python -m nbdmirror serve`.  Nothing is mocked.

Rules the helpers keep, so that tests can rely on them:
  * Every wait is a poll against a deadline; nothing sleeps to "let things
    settle".  Every subprocess.run has a timeout.
  * Every long-running process is started through a `Processes` registry,
    in its own session, with stdout and stderr going to a log file.  The
    registry stops each one by pid at teardown (SIGTERM, then SIGKILL after
    3 s), and then anything left in the process group it created.
  * Unix socket paths must stay under 108 bytes: use the short temp dir from
    `short_tempdir()` (the `workdir` fixture), never pytest's tmp_path.

The fixtures that wrap these live in conftest.py.
"""

import asyncio
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

READ_PIECE = 32 << 20      # largest request NBD servers accept
TOOL_TIMEOUT = 120         # seconds for one qemu-io / qemu-img run
STOP_GRACE = 3.0           # seconds between SIGTERM and SIGKILL


class HarnessError(AssertionError):
    """A helper could not do its job (a server did not start, a tool failed)."""


# -- temp dirs -----------------------------------------------------------------

def short_tempdir():
    """A fresh directory under /tmp with a short name (for unix sockets)."""
    return tempfile.mkdtemp(prefix="nbdm-", dir="/tmp")


def nbd_unix_uri(sock):
    """The NBD URI of an export on unix socket `sock`."""
    return f"nbd+unix:///?socket={os.path.abspath(os.fspath(sock))}"


# -- processes -------------------------------------------------------------------

def _live_processes():
    """(pid, [state, ppid, pgrp, ...]) of every live (non-zombie) process."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            yield int(name), fields


def _group_members(pgid):
    """Pids of the live processes in process group `pgid`."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def child_commands(ppid):
    """The command lines (argv lists) of the live children of `ppid`."""
    out = []
    for pid, fields in _live_processes():
        if int(fields[1]) == ppid:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read().decode().split("\0"))
            except OSError:
                continue
    return out


def _log_tail(path, limit=4000):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    text = data[-limit:].decode("utf-8", "replace")
    return ("..." if len(data) > limit else "") + text


class Processes:
    """Starts long-running processes and guarantees they end.

    Each process runs in a new session (so it is the leader of a process
    group of its own) with stdout+stderr in `<logdir>/<name>-<n>.log`, unless
    the caller passes its own stdout/stderr.
    """

    def __init__(self, logdir):
        self.logdir = os.fspath(logdir)
        self.procs = []
        self.started = 0        # numbers the logs; procs shrinks on forget

    def start(self, args, name=None, **popen_kwargs):
        """Popen `args`; the returned object also has `.log` and `.name`."""
        args = [os.fspath(a) for a in args]
        name = name or os.path.basename(args[0])
        log = os.path.join(self.logdir, f"{name}-{self.started}.log")
        self.started += 1
        with open(log, "wb") as f:
            popen_kwargs.setdefault("stdout", f)
            popen_kwargs.setdefault("stderr", subprocess.STDOUT)
            popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
            proc = subprocess.Popen(args, start_new_session=True,
                                    **popen_kwargs)
        proc.log, proc.name = log, name
        self.procs.append(proc)
        return proc

    def output(self, proc):
        """What `proc` wrote to its log so far (the tail of it)."""
        return _log_tail(proc.log)

    def kill(self, proc, sig=signal.SIGKILL):
        """Send `sig` to `proc` by pid, if it still runs (crash tests)."""
        if proc.poll() is None:
            proc.send_signal(sig)

    def stop(self, proc, grace=STOP_GRACE, forget=False):
        """SIGTERM `proc`, SIGKILL it after `grace` s; return its exit code.

        Then end whatever is left in its process group (children it did not
        reap); a warning names such leftovers, since they are a leak.
        With `forget` the registry drops it once it is stopped: stop_all
        will not look at its pid again, which another process may have by
        then.
        """
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)     # by pid; no-op once reaped
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                warnings.warn(f"{proc.name} (pid {proc.pid}) ignored SIGTERM "
                              f"for {grace} s; killing it")
                proc.kill()
                proc.wait(grace)
        left = _group_members(proc.pid)
        if left:
            warnings.warn(f"{proc.name} (pid {proc.pid}) left processes "
                          f"{left} behind; killing them")
            self._end_group(proc.pid, grace)
        if forget and proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def _end_group(self, pgid, grace):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not _group_members(pgid):
                    return
                time.sleep(0.02)

    def stop_all(self):
        """Stop every process, proxies first (a server may wait for its
        clients), then newest first; never raises for one of them."""
        errors = []
        for proc in sorted(reversed(self.procs),
                           key=lambda p: p.name != "nbdmirror"):
            try:
                self.stop(proc)
            except Exception as e:     # keep stopping the others
                errors.append(f"{proc.name} (pid {proc.pid}): {e!r}")
        self.procs.clear()
        if errors:
            raise HarnessError("could not stop: " + "; ".join(errors))

    def report(self):
        """The log tail of every process, for a failing test's output."""
        return "\n".join(
            f"--- {p.name} pid {p.pid} rc {p.poll()} ({p.log}) ---\n"
            f"{self.output(p)}" for p in self.procs)


def _probe_unix(path):
    """True if unix socket `path` accepts a connection (then closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    finally:
        s.close()


def _probe_nbd(path):
    """True if an NBD server on `path` completes a handshake.

    A whole handshake, then NBD_CMD_DISC: the server logs no error, unlike
    after a bare connect and close.
    """
    import nbd
    h = nbd.NBD()
    try:
        h.connect_unix(path)
    except nbd.Error:
        return False
    h.shutdown()
    return True


def wait_for_socket(path, timeout=10, proc=None, nbd=False):
    """Poll until unix socket `path` accepts a connection.

    With `nbd`, wait until an NBD handshake succeeds there instead.  Fails
    early, with the process's output, if `proc` exits meanwhile, and with a
    clear message at the deadline.
    """
    path = os.fspath(path)
    probe = _probe_nbd if nbd else _probe_unix
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            out = _log_tail(proc.log) if hasattr(proc, "log") else ""
            raise HarnessError(
                f"{getattr(proc, 'name', proc.args)} exited with status "
                f"{proc.returncode} before {path} accepted connections:\n{out}")
        if probe(path):
            return
        if time.monotonic() >= deadline:
            out = ""
            if proc is not None and hasattr(proc, "log"):
                out = "\noutput so far:\n" + _log_tail(proc.log)
            raise HarnessError(
                f"{path}: no connection accepted within {timeout} s{out}")
        time.sleep(0.02)


# -- servers -------------------------------------------------------------------

def qemu_nbd(procs, image, sock, fmt="raw", allocation_depth=False, extra=(),
             timeout=10):
    """Serve `image` with qemu-nbd on unix socket `sock`; return its URI.

    Persistent (-t) and with no client limit (-e 0), so it outlives the
    probe and every client disconnect.  `allocation_depth` adds -A
    (the qemu:allocation-depth context that sync=top needs).
    """
    sock = os.path.abspath(os.fspath(sock))
    args = ["qemu-nbd", "-k", sock, "-e", "0", "-t", "-f", fmt]
    if allocation_depth:
        args.append("-A")
    args += [*extra, os.path.abspath(os.fspath(image))]
    proc = procs.start(args, name="qemu-nbd")
    wait_for_socket(sock, timeout, proc, nbd=True)
    return nbd_unix_uri(sock)


def nbdkit_server(procs, sock, *args, filters=(), timeout=10):
    """Run `nbdkit -f -U sock [--filter=F ...] args...`; return its URI.

    e.g. nbdkit_server(procs, s, "memory", "64M") or
    nbdkit_server(procs, s, "file", path, "wdelay=500ms", filters=["delay"])
    (nbdkit 1.32's delay filter takes whole seconds or NNms, not "0.5").
    --exit-with-parent ends it if the test run itself dies.
    """
    sock = os.path.abspath(os.fspath(sock))
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock,
           *(f"--filter={f}" for f in filters), *args]
    proc = procs.start(cmd, name="nbdkit")
    wait_for_socket(sock, timeout, proc, nbd=True)
    return nbd_unix_uri(sock)


class Proxy:
    """A running `nbdmirror serve --foreground`."""

    def __init__(self, proc, socket_path, control):
        self.proc = proc
        self.socket = socket_path
        self.control = control
        self.uri = nbd_unix_uri(socket_path)


def serve_args(source, sock, control, target=None, **opts):
    """The `nbdmirror serve` arguments; opts spell `--key value` as key=value.

    Underscores become dashes; True gives a bare flag, False/None omits it.
    """
    args = ["serve", "--foreground", "--source", os.fspath(source),
            "--socket", os.fspath(sock), "--control", os.fspath(control)]
    if target is not None:
        args += ["--target", target]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def nbdmirror_env(repo_first=True):
    """The environment for `python -m nbdmirror`: this checkout first.

    With repo_first=False it comes after the caller's PYTHONPATH, which can
    then name another checkout (the benchmark allows that).
    """
    env = dict(os.environ)
    paths = [REPO, env.get("PYTHONPATH")]
    if not repo_first:
        paths.reverse()
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def start_proxy(procs, source, sock, control, target=None, timeout=20,
                env=None, cwd=REPO, **opts):
    """Start the proxy in the foreground; return a Proxy once it serves.

    Waits until both the guest socket and the control socket accept.
    `env` (default nbdmirror_env()) and `cwd` are the process's.
    """
    sock = os.path.abspath(os.fspath(sock))
    control = os.path.abspath(os.fspath(control))
    args = [sys.executable, "-m", "nbdmirror",
            *serve_args(source, sock, control, target, **opts)]
    proc = procs.start(args, name="nbdmirror", env=env or nbdmirror_env(),
                       cwd=cwd)
    wait_for_socket(sock, timeout, proc, nbd=True)
    wait_for_socket(control, timeout, proc)
    return Proxy(proc, sock, control)


def nbdmirror(*args, timeout=60, check=False):
    """Run `python -m nbdmirror args...` to the end; return CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "nbdmirror", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          check=check, env=nbdmirror_env(), cwd=REPO,
                          stdin=subprocess.DEVNULL)


# -- QMP -----------------------------------------------------------------------

def qmp_connect(control, timeout=10):
    """A connected, negotiated qemu.qmp legacy (synchronous) client.

    The caller closes it (the `qmp` fixture does).  Connecting (greeting and
    qmp_capabilities) and each command time out after `timeout` s.

    Note: qemu.qmp sends each command as bare JSON with no newline after it,
    as QEMU's streaming parser allows; a server must not wait for one.
    """
    from qemu.qmp.legacy import QEMUMonitorProtocol
    path = os.fspath(control)
    client = QEMUMonitorProtocol(path)
    client.settimeout(timeout)
    try:
        if hasattr(client, "_sync") and hasattr(client, "_qmp"):
            # What legacy connect(negotiate=True) does, but bounded in time.
            client._qmp.await_greeting = client._qmp.negotiate = True
            client._sync(client._qmp.connect(path), timeout)
        else:
            client.connect(negotiate=True)
    except asyncio.TimeoutError:
        client.close()
        raise HarnessError(f"{path}: no QMP greeting and capabilities "
                           f"negotiation within {timeout} s") from None
    except BaseException:
        client.close()
        raise
    return client


def qmp_execute(client, name, **args):
    """Send one command; return the raw reply ({"return"} or {"error"}).

    Works with every qemu.qmp version (its cmd/command methods were
    renamed between versions; cmd_obj was not).  Dashed argument names go
    through a dict: qmp_execute(c, "drive-mirror", **{"job-id": "m"}).
    """
    msg = {"execute": name}
    if args:
        msg["arguments"] = args
    return client.cmd_obj(msg)


def wait_event(client, name, timeout=30, predicate=None):
    """Pull events until one named `name` (and matching `predicate`) arrives.

    Events pulled on the way are dropped; their names appear in the timeout
    message.  Returns the event dict.
    """
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HarnessError(
                f"no {name} event within {timeout} s; saw {seen}")
        try:
            # pull_event takes a float timeout (an int would mean "forever").
            event = client.pull_event(wait=float(remaining))
        except asyncio.TimeoutError:
            continue
        if event is None:
            continue
        if event.get("event") == name and (predicate is None
                                           or predicate(event)):
            return event
        seen.append((event.get("event"), event.get("data")))


# -- tools -----------------------------------------------------------------------

def run_tool(args, timeout=TOOL_TIMEOUT):
    """Run a tool to the end; return CompletedProcess (text, captured)."""
    return subprocess.run([os.fspath(a) for a in args], capture_output=True,
                          text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def qemu_io(uri, *cmds, fmt="raw", timeout=TOOL_TIMEOUT):
    """Run `qemu-io -f fmt uri -c cmd ...`; fail unless it exits 0.

    qemu-io exits 1 when a command fails (I/O error, `read -P` mismatch).
    Returns stdout.
    """
    args = ["qemu-io", "-f", fmt, uri]
    for c in cmds:
        args += ["-c", c]
    r = run_tool(args, timeout)
    if r.returncode != 0:
        raise HarnessError(f"qemu-io {uri} {list(cmds)} exited "
                           f"{r.returncode}:\n{r.stdout}{r.stderr}")
    return r.stdout


def qemu_img(*args, timeout=TOOL_TIMEOUT):
    """Run `qemu-img args...`; fail unless it exits 0; return stdout."""
    r = run_tool(["qemu-img", *args], timeout)
    if r.returncode != 0:
        raise HarnessError(f"qemu-img {list(args)} exited "
                           f"{r.returncode}:\n{r.stdout}{r.stderr}")
    return r.stdout


def qemu_img_compare(a, b, fmt_a="raw", fmt_b="raw", timeout=TOOL_TIMEOUT):
    """`qemu-img compare`: 0 identical, 1 different; raises on errors.

    `a` and `b` are file paths or NBD URIs.
    """
    r = run_tool(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b],
                 timeout)
    if r.returncode not in (0, 1):
        raise HarnessError(f"qemu-img compare {a} {b} exited "
                           f"{r.returncode}:\n{r.stdout}{r.stderr}")
    return r.returncode


# -- images and data -------------------------------------------------------------

def random_bytes(seed, size):
    """`size` deterministic pseudo-random bytes (same as make_image's)."""
    return random.Random(seed).randbytes(size)


def make_image(path, size, seed=None, block=1 << 20, fsync=False):
    """Create a raw image of `size` bytes; return its path.

    With `seed` None it is sparse (all holes).  Otherwise it holds
    deterministic random data: the same seed and size give the same bytes.
    `fsync` flushes it to disk before returning.
    """
    path = os.fspath(path)
    with open(path, "wb") as f:
        if seed is None:
            f.truncate(size)
        else:
            rng = random.Random(seed)
            for off in range(0, size, block):
                f.write(rng.randbytes(min(block, size - off)))
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


def sha256_file(path, piece=READ_PIECE):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(piece):
            h.update(data)
    return h.hexdigest()


def _nbd_pieces(uri, piece=READ_PIECE):
    import nbd
    h = nbd.NBD()      # closed when collected (libnbd's Python has no close)
    h.connect_uri(uri)
    size = h.get_size()
    for off in range(0, size, piece):
        yield h.pread(min(piece, size - off), off)
    h.shutdown()


def nbd_read_all(uri):
    """The whole export at `uri`, as bytes (via libnbd)."""
    return b"".join(_nbd_pieces(uri))


def sha256_uri(uri):
    """SHA-256 of the whole export at `uri`, streamed."""
    h = hashlib.sha256()
    for data in _nbd_pieces(uri):
        h.update(data)
    return h.hexdigest()


def nbd_size(uri):
    """Size in bytes of the export at `uri`."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    h.shutdown()
    return size


# -- job events and checks ---------------------------------------------------

class EventLog:
    """Every event one QMP client receives, in order.

    helpers.wait_event drops the events it passes over; these tests check
    whole event sequences, so they keep them all.
    """

    def __init__(self, client):
        self.client = client
        self.events = []
        self._next = 0          # events before this index were waited past

    def _pull(self, timeout):
        event = self.client.pull_event(wait=float(max(timeout, 0.001)))
        if event is not None:
            self.events.append(event)

    def wait(self, name, status=None, timeout=30):
        """The next event `name` (a JOB_STATUS_CHANGE to `status`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._next, len(self.events)):
                e = self.events[i]
                if e["event"] == name and (
                        status is None or e["data"].get("status") == status):
                    self._next = i + 1
                    return e
                if e["event"] == "JOB_STATUS_CHANGE" and \
                        e["data"]["status"] == "null":
                    raise HarnessError(f"the job ended before {name} "
                                       f"{status or ''}: {self.tokens()} "
                                       f"{self.events[-3:]}")
            self._next = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(f"no {name} {status or ''} within "
                                   f"{timeout} s; saw {self.tokens()}")
            try:
                self._pull(remaining)
            except TimeoutError:
                pass

    def wait_end(self, timeout=30):
        """Wait until the job is gone (JOB_STATUS_CHANGE to null)."""
        return self.wait("JOB_STATUS_CHANGE", "null", timeout)

    def mark(self):
        """An index into the log: events received from now on come after it."""
        while (event := self.client.pull_event(wait=False)) is not None:
            self.events.append(event)
        return len(self.events)

    def tokens(self, since=0):
        """Events as short names: a JOB_STATUS_CHANGE is its new status."""
        return [e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE"
                else e["event"] for e in self.events[since:]]

    def named(self, name):
        return [e for e in self.events if e["event"] == name]


def ok(reply):
    """The `return` of a QMP reply; fail on an error reply."""
    assert "error" not in reply, reply
    return reply["return"]


def job_status(client):
    """The job's status from query-block-jobs, or None when there is none."""
    jobs = ok(qmp_execute(client, "query-block-jobs"))
    return jobs[0]["status"] if jobs else None


def guest_write(uri, shadow, *writes):
    """Write (offset, length, pattern byte) ranges through `uri` with one
    qemu-io run, and apply them to `shadow` (a bytearray model of the disk)."""
    qemu_io(uri, *(f"write -P {p:#x} {off} {n}" for off, n, p in writes))
    for off, n, p in writes:
        shadow[off:off + n] = bytes([p]) * n


def first_difference(actual, expected):
    """None if equal, else a short description of the first difference."""
    if actual == expected:
        return None
    if len(actual) != len(expected):
        return f"sizes differ: {len(actual)} != {len(expected)}"
    step = 1 << 20
    for off in range(0, len(actual), step):
        a, b = actual[off:off + step], expected[off:off + step]
        if a != b:
            i = next(i for i in range(len(a)) if a[i] != b[i])
            return (f"first difference at offset {off + i}: "
                    f"{a[i]:#04x} != {b[i]:#04x}")


def assert_holds(uri_or_path, expected, what):
    """The export (NBD URI) or file holds exactly `expected`."""
    if "://" not in uri_or_path:
        with open(uri_or_path, "rb") as f:
            actual = f.read()
    else:
        actual = nbd_read_all(uri_or_path)
    diff = first_difference(actual, expected)
    assert diff is None, f"{what}: {diff}"
