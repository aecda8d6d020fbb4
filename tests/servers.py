"""Harness for tests against NBD servers as people run them, and a real QEMU.

Builds on helpers.py (Processes, start_proxy, qmp_connect...); nothing here
is mocked.  What it adds:

  * Targets: qemu-nbd with its defaults (one client; it exits when that
    client leaves, so it is never probed with a connection), with -t, with
    -t -e 2; nbdkit with the limit, nozero and fua filters (always behind
    the log filter, which records every connection); qemu-storage-daemon
    exporting a raw file; nbdkit with tests/plugins/file_target.py (a file
    whose flush hangs or fails while a trigger file exists).
  * Connection counts as the server sees them: its sockets in
    /proc/net/unix (accepted, or queued for accept), sampled in a thread,
    and for nbdkit the log filter's Connect/Disconnect lines.
  * frozen(proc): SIGSTOP a server for the duration of a block.
  * AioClient: one libnbd connection with many requests in flight (aio),
    each answer timed; GuestLoad: a thread keeping requests in flight.
  * RawQMP: a QMP session on a plain socket that never blocks, for tests
    that talk to many clients at once from one thread.
  * QemuGuest: qemu-system-x86_64 -machine none with the disk as a
    -blockdev nbd node, I/O through HMP qemu-io over QMP.

Every wait is a poll against a deadline.  Every process is started through
the `procs` registry.
"""

import contextlib
import json
import os
import pathlib
import random
import re
import select
import signal
import socket
import threading
import time

import nbd

from helpers import HarnessError, nbd_unix_uri, qmp_execute, wait_for_socket

MiB = 1 << 20
PLUGINS = pathlib.Path(__file__).parent / "plugins"
FILE_TARGET = PLUGINS / "file_target.py"

# Bounds on connecting to and on each request to the target (serve options).
# Small, so that a stall is noticed well inside a test's time limits.
CONNECT_TIMEOUT = 2
IO_TIMEOUT = 3


def deadline_poll(check, timeout, what, interval=0.02):
    """Poll `check()` until it returns a true value; return that value.

    Fails with "`what` not within `timeout` s" at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def wait_in_log(proc, text, timeout=15):
    """Poll until the whole log of `proc` (a helpers.Processes process)
    holds `text` (Processes.output() is only its tail)."""
    def said():
        with open(proc.log, errors="replace") as f:
            return text in f.read()
    deadline_poll(said, timeout, f"{text!r} in {proc.log}")


def in_thread(fn):
    """Run fn() in a thread: (thread, outcome), outcome filled with
    ("ok", value) or ("raised", exception) when it ends."""
    outcome = []

    def run():
        try:
            outcome.append(("ok", fn()))
        except Exception as e:          # noqa: BLE001 - the test looks
            outcome.append(("raised", e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, outcome


# -- unix sockets as the server sees them ------------------------------------------

_SO_ACCEPTCON = 0x10000     # /proc/net/unix Flags of a listening socket
_SS_CONNECTING, _SS_CONNECTED = 2, 3


def _unix_sockets(path):
    """(flags, state) of every socket named `path` in /proc/net/unix."""
    path = os.fspath(path)
    found = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path:
                found.append((int(fields[3], 16), int(fields[5], 16)))
    return found


def is_listening(path):
    """True if a socket is listening on unix path `path` (no connection is
    made: qemu-nbd without -t would exit when a probe leaves)."""
    return any(flags & _SO_ACCEPTCON for flags, _ in _unix_sockets(path))


def server_connections(path):
    """Connections to the server listening on `path`: the server ends of
    accepted connections and those queued for accept.  (A server-side
    socket carries the listening socket's name; a client's does not.)"""
    return sum(1 for flags, state in _unix_sockets(path)
               if not flags & _SO_ACCEPTCON
               and state in (_SS_CONNECTING, _SS_CONNECTED))


def wait_listening(path, proc, timeout=10):
    def check():
        if proc.poll() is not None:
            raise HarnessError(f"{proc.name} exited with status "
                               f"{proc.returncode} before listening on "
                               f"{path}:\n{_tail(proc)}")
        return is_listening(path)
    deadline_poll(check, timeout, f"{proc.name} listening on {path}")


def wait_closed(path, timeout=5):
    """Wait until the server on `path` has no connection left (after the
    start-up probe: a server limited to one client must not see it
    overlap the proxy's)."""
    deadline_poll(lambda: server_connections(path) == 0, timeout,
                  f"the server on {path} closing its last connection")


def _tail(proc):
    try:
        with open(proc.log, "rb") as f:
            return f.read()[-3000:].decode("utf-8", "replace")
    except (OSError, AttributeError):
        return ""


class ConnectionWatch:
    """Samples server_connections(path) every 5 ms in a thread.

    `max` is the most connections seen at once.  A connection that lives
    less than a sample period may be missed: for nbdkit targets, also read
    the log filter (nbdkit_log_connections).
    """

    def __init__(self, path, period=0.005):
        self.path = os.fspath(path)
        self.period = period
        self.max = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            n = server_connections(self.path)
            self.max = max(self.max, n)
            self.samples += 1
            self._stop.wait(self.period)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        return self.max

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def nbdkit_log_connections(logfile):
    """(most connections open at once, connections refused) from an nbdkit
    log filter file.  Refused: a Preconnect that returned an error (the
    limit filter turned the client away)."""
    try:
        text = pathlib.Path(logfile).read_text(errors="replace")
    except FileNotFoundError:
        return 0, 0
    # The filter does not end every record with a newline: split on stamps.
    records = re.split(r"(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ )", text)
    now = most = refused = 0
    for r in records:
        if re.search(r"connection=\d+ Connect ", r):
            now += 1
            most = max(most, now)
        elif re.search(r"connection=\d+ Disconnect", r):
            now -= 1
        elif re.search(r"\.\.\.Preconnect id=\d+ return=-1", r):
            refused += 1
    return most, refused


# -- targets -----------------------------------------------------------------------

class Target:
    """An NBD server the proxy mirrors to.

    kind        the name of the set-up (TARGET_KINDS)
    uri         its NBD URI; sock: its unix socket; image: its raw file
    proc        the server process
    persistent  False if it exits when its (only) client leaves
    slots       how many clients it accepts at once (None: no limit)
    log         nbdkit log filter file, or None
    """

    def __init__(self, kind, uri, sock, image, proc, persistent=True,
                 slots=None, log=None):
        self.kind, self.uri, self.sock, self.image = kind, uri, sock, image
        self.proc, self.persistent, self.slots = proc, persistent, slots
        self.log = log

    def connections(self):
        """(most at once, refused) from the log filter, for nbdkit."""
        if self.log is None:
            raise HarnessError(f"{self.kind} has no connection log")
        return nbdkit_log_connections(self.log)


def qemu_nbd_target(procs, image, sock, *options, kind="qemu-nbd"):
    """`qemu-nbd -f raw -k SOCK [options] IMAGE`, exactly as given.

    Without -t it serves one client and exits when that client leaves, so
    readiness is checked without connecting (the socket is listening).
    """
    sock = os.path.abspath(os.fspath(sock))
    image = os.path.abspath(os.fspath(image))
    proc = procs.start(["qemu-nbd", "-f", "raw", "-k", sock, *options, image],
                       name="qemu-nbd")
    wait_listening(sock, proc)
    persistent = "-t" in options or "--persistent" in options
    slots = 1
    for opt, value in zip(options, options[1:]):
        if opt in ("-e", "--shared"):
            slots = int(value) or None
    return Target(kind, nbd_unix_uri(sock), sock, image, proc,
                  persistent=persistent, slots=slots)


def nbdkit_target(procs, image, sock, *args, filters=(), plugin="file",
                  kind="nbdkit", slots=None):
    """nbdkit serving `image` (plugin `file`, or a plugin script that takes
    file=IMAGE) behind the log filter and `filters`."""
    sock = os.path.abspath(os.fspath(sock))
    image = os.path.abspath(os.fspath(image))
    log = os.path.join(os.path.dirname(sock),
                       os.path.basename(sock) + ".connections.log")
    if plugin == "file":
        plugin_args = ["file", image]
    else:
        plugin_args = ["python", os.fspath(plugin), f"file={image}"]
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock,
           "--filter=log", *(f"--filter={f}" for f in filters),
           *plugin_args, f"logfile={log}", *args]
    proc = procs.start(cmd, name="nbdkit")
    wait_for_socket(sock, 10, proc, nbd=True)
    wait_closed(sock)
    return Target(kind, nbd_unix_uri(sock), sock, image, proc,
                  persistent=True, slots=slots, log=log)


def qsd_target(procs, image, sock, node="file0"):
    """qemu-storage-daemon exporting raw file `image` over NBD, writable;
    the export is named after the node."""
    sock = os.path.abspath(os.fspath(sock))
    image = os.path.abspath(os.fspath(image))
    proc = procs.start(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name={node},filename={image}",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", f"type=nbd,id=export0,node-name={node},writable=on"],
        name="qemu-storage-daemon")
    uri = f"nbd+unix:///{node}?socket={sock}"
    wait_listening(sock, proc)
    deadline_poll(lambda: can_connect(uri, 1), 10,
                  f"qemu-storage-daemon serving {uri}")
    wait_closed(sock)
    return Target("qemu-storage-daemon", uri, sock, image, proc)


TARGET_KINDS = {
    # kind -> start(procs, image, sock) -> Target
    "qemu-nbd-defaults": lambda p, i, s: qemu_nbd_target(
        p, i, s, kind="qemu-nbd-defaults"),
    "qemu-nbd-persistent": lambda p, i, s: qemu_nbd_target(
        p, i, s, "-t", kind="qemu-nbd-persistent"),
    "qemu-nbd-shared": lambda p, i, s: qemu_nbd_target(
        p, i, s, "-t", "-e", "0", kind="qemu-nbd-shared"),
    "qemu-nbd-two-clients": lambda p, i, s: qemu_nbd_target(
        p, i, s, "-t", "-e", "2", kind="qemu-nbd-two-clients"),
    "nbdkit-limit-1": lambda p, i, s: nbdkit_target(
        p, i, s, "limit=1", filters=["limit"], kind="nbdkit-limit-1",
        slots=1),
    "nbdkit-nozero": lambda p, i, s: nbdkit_target(
        p, i, s, filters=["nozero"], kind="nbdkit-nozero"),
    # fuamode=none is the default; nbdkit 1.32 refuses to be told so
    # ("unknown fuamode 'none'").
    "nbdkit-fua-none": lambda p, i, s: nbdkit_target(
        p, i, s, filters=["fua"], kind="nbdkit-fua-none"),
    "qemu-storage-daemon": lambda p, i, s: qsd_target(p, i, s),
}


def start_target(procs, kind, image, sock):
    return TARGET_KINDS[kind](procs, image, sock)


def flush_fault_target(procs, image, sock, trigger, mode, marker=None,
                       filters=(), args=()):
    """nbdkit over `image` whose flush hangs (mode "hang") or fails with
    EIO (mode "fail") while file `trigger` exists; each such flush appends
    a line to `marker`."""
    extra = [f"trigger={trigger}", f"mode={mode}"]
    if marker is not None:
        extra.append(f"marker={marker}")
    return nbdkit_target(procs, image, sock, *extra, *args, filters=filters,
                         plugin=FILE_TARGET, kind=f"flush-{mode}")


def marked_flushes(marker):
    """How many faulty flushes the file_target plugin recorded."""
    try:
        return len(pathlib.Path(marker).read_text().splitlines())
    except FileNotFoundError:
        return 0


# -- stopping a server -------------------------------------------------------------

def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


@contextlib.contextmanager
def frozen(proc):
    """SIGSTOP `proc` (by pid) for the block; SIGCONT it afterwards, also
    when the block fails, so that teardown can stop it."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        deadline_poll(lambda: _state(proc.pid) in ("T", "t", None), 5,
                      f"{proc.name} stopped by SIGSTOP")
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)


# -- NBD clients ---------------------------------------------------------------------

def _connect(uri, timeout):
    """A libnbd handle connected to `uri` within `timeout` s, or None.

    aio_connect_uri + poll, so that a stopped or full server cannot block
    the test.
    """
    h = nbd.NBD()
    h.aio_connect_uri(uri)
    deadline = time.monotonic() + timeout
    while not h.aio_is_ready():
        if h.aio_is_dead() or h.aio_is_closed():
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            h.poll(max(1, int(min(remaining, 0.1) * 1000)))
        except nbd.Error:
            return None
    return h


def can_connect(uri, timeout=5):
    """True if an NBD client completes the handshake within `timeout` s;
    the connection is closed again."""
    h = _connect(uri, timeout)
    if h is None:
        return False
    h.shutdown()
    return True


class Request:
    """One NBD request: kind is write, zero, read or flush."""

    def __init__(self, kind, offset=0, length=0, data=None, fua=False):
        self.kind, self.offset, self.length = kind, offset, length
        self.data, self.fua = data, fua
        self.cookie = self.buf = None
        self.submitted = self.answered = None
        self.error = None
        self.result = None          # bytes read

    @property
    def done(self):
        return self.answered is not None

    @property
    def latency(self):
        return None if self.answered is None else \
            self.answered - self.submitted

    def __repr__(self):
        state = "pending" if not self.done else \
            f"error {self.error}" if self.error else "ok"
        return (f"<{self.kind}{' fua' if self.fua else ''} "
                f"{self.offset}+{self.length}: {state}>")


class AioClient:
    """One NBD connection; many requests in flight on it (libnbd aio)."""

    def __init__(self, uri, timeout=10):
        self.uri = uri
        self.h = _connect(uri, timeout)
        if self.h is None:
            raise HarnessError(f"{uri}: no NBD handshake within {timeout} s")

    def can(self, what):
        """can_zero, can_fua, ... as negotiated on this connection."""
        return getattr(self.h, "can_" + what)()

    def submit(self, req):
        h = self.h
        flags = nbd.CMD_FLAG_FUA if req.fua else 0
        req.submitted = time.monotonic()
        try:
            if req.kind == "write":
                req.buf = nbd.Buffer.from_bytearray(bytearray(req.data))
                req.cookie = h.aio_pwrite(req.buf, req.offset, flags=flags)
            elif req.kind == "zero":
                req.cookie = h.aio_zero(req.length, req.offset, flags=flags)
            elif req.kind == "read":
                req.buf = nbd.Buffer(req.length)
                req.cookie = h.aio_pread(req.buf, req.offset)
            elif req.kind == "flush":
                req.cookie = h.aio_flush()
            else:
                raise ValueError(req.kind)
        except nbd.Error as e:        # refused before it was sent
            req.error, req.answered = str(e), time.monotonic()
        return req

    def submit_all(self, reqs):
        """Submit every request, and send them all (see send_queued)."""
        for r in reqs:
            self.submit(r)
        self.send_queued()
        return reqs

    def send_queued(self, timeout=5):
        """Drive the connection until libnbd has written every submitted
        request to the socket (it writes only as far as the socket takes
        without blocking, and the rest while polled).  True if it did
        within `timeout` s."""
        deadline = time.monotonic() + timeout
        while self.h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                self.h.poll(max(1, int(min(remaining, 0.05) * 1000)))
            except nbd.Error:
                return False
        return True

    def _reap(self, req):
        try:
            if not self.h.aio_command_completed(req.cookie):
                return False
        except nbd.Error as e:
            req.error = str(e)
        req.answered = time.monotonic()
        if req.kind == "read" and req.error is None:
            req.result = bytes(req.buf.to_bytearray())
        return True

    def wait(self, reqs, timeout):
        """Wait until every request in `reqs` is answered; fail with the
        unanswered ones after `timeout` s.  A lost connection answers the
        rest with its error."""
        deadline = time.monotonic() + timeout
        pending = [r for r in reqs if not r.done]
        while True:
            pending = [r for r in pending if not self._reap(r)]
            if not pending:
                return reqs
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(
                    f"{len(pending)} of {len(reqs)} requests unanswered "
                    f"after {timeout} s: {pending[:4]}")
            try:
                self.h.poll(max(1, int(min(remaining, 0.1) * 1000)))
            except nbd.Error as e:
                for r in pending:
                    r.error, r.answered = f"connection lost: {e}", \
                        time.monotonic()
                return reqs

    def run(self, reqs, timeout=10):
        """Submit all of `reqs` at once, wait for every answer, and fail
        unless every one succeeded; returns `reqs`."""
        self.wait(self.submit_all(reqs), timeout)
        failed = [r for r in reqs if r.error]
        if failed:
            raise AssertionError(f"{len(failed)} of {len(reqs)} requests "
                                 f"failed on {self.uri}: {failed[:4]}")
        return reqs

    def close(self):
        with contextlib.suppress(nbd.Error):
            if self.h.aio_is_ready():
                self.h.shutdown()
        self.h = None


def plan_batch(rng, size, count, kinds=("write",), max_len=64 << 10):
    """`count` requests of the given kinds (chosen in turn), on ranges that
    do not overlap (their order on the wire cannot matter), at unaligned
    offsets.  Write data is seeded random.  Flushes take no range."""
    slot = size // count
    assert slot >= 2, "disk too small for this many requests"
    order = rng.sample(range(count), count)
    reqs = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        fua = kind.endswith("+fua")
        kind = kind.removesuffix("+fua")
        if kind == "flush":
            reqs.append(Request("flush"))
            continue
        start = order[i] * slot
        length = rng.randint(1, min(max_len, slot - 1))
        offset = start + rng.randrange(slot - length)
        data = rng.randbytes(length) if kind == "write" else None
        reqs.append(Request(kind, offset, length, data, fua))
    return reqs


def apply(shadow, reqs):
    """Apply the answered, successful writes and zeroes to `shadow`."""
    for r in reqs:
        if r.error is None and r.done:
            if r.kind == "write":
                shadow[r.offset:r.offset + r.length] = r.data
            elif r.kind == "zero":
                shadow[r.offset:r.offset + r.length] = bytes(r.length)


class GuestLoad:
    """A guest connection that keeps `depth` requests in flight, in a
    thread, until stopped or the connection fails.

    Request i only ever touches slot i of `region` (offset, length) and is
    issued after the previous one on that slot was answered, so with a
    `shadow` every answered write is modelled exactly.  kinds: "write",
    "read" or both, alternated.
    """

    def __init__(self, uri, depth=8, region=(0, MiB), kinds=("write", "read"),
                 shadow=None, seed=0, length=4096):
        self.client = AioClient(uri)
        self.depth, self.kinds, self.shadow = depth, kinds, shadow
        self.rng = random.Random(seed)
        start, total = region
        self.slot = total // depth
        assert self.slot >= length, "region too small"
        self.bases = [start + i * self.slot for i in range(depth)]
        self.length = length
        self.ops = 0
        self.error = None
        self._n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _next(self, i):
        kind = self.kinds[self._n % len(self.kinds)]
        self._n += 1
        off = self.bases[i] + self.rng.randrange(self.slot - self.length + 1)
        data = self.rng.randbytes(self.length) if kind == "write" else None
        return self.client.submit(Request(kind, off, self.length, data))

    def _run(self):
        c = self.client
        inflight = [self._next(i) for i in range(self.depth)]
        try:
            while not self._stop.is_set():
                for i, r in enumerate(inflight):
                    if not r.done and not c._reap(r):
                        continue
                    if r.error:
                        self.error = r.error
                        return
                    if self.shadow is not None:
                        apply(self.shadow, [r])
                    self.ops += 1
                    inflight[i] = self._next(i)
                c.h.poll(50)
            # Stopped: let what is in flight finish, for an exact shadow.
            c.wait(inflight, 10)
            if self.shadow is not None:
                apply(self.shadow, inflight)
            self.ops += sum(1 for r in inflight if not r.error)
        except (nbd.Error, HarnessError) as e:
            self.error = str(e)

    def start(self):
        self._thread.start()
        return self

    def wait_ops(self, n, timeout=10):
        deadline_poll(lambda: self.ops >= n or self.error is not None,
                      timeout, f"{n} guest requests answered "
                      f"(only {self.ops})")
        assert self.error is None, f"guest request failed: {self.error}"

    def stop(self, timeout=15):
        """Stop issuing; once the thread ended (fail if it does not within
        `timeout` s), close the connection."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the guest load is stuck"
        self.client.close()

    def finished(self, timeout):
        """True if the thread ended (e.g. its connection closed) within
        `timeout` s, without being stopped."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


# -- QMP on a plain socket --------------------------------------------------------

class RawQMP:
    """One QMP session on a plain socket; nothing blocks longer than asked.

    send() writes a command; reply(timeout) returns the next non-event
    message or None; events are kept in .events.
    """

    def __init__(self, path, timeout=10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.sock.setblocking(False)
        self.buf = b""
        self.events = []
        self.greeting = self._message(timeout)
        if self.greeting is None or "QMP" not in self.greeting:
            raise HarnessError(f"{path}: no QMP greeting: {self.greeting}")

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    def _message(self, timeout):
        """The next message within `timeout` s (0: only if already here)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                return None
            data = self.sock.recv(65536)
            if not data:
                raise HarnessError("QMP server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, name, arguments=None, **extra):
        msg = {"execute": name, **extra}
        if arguments:
            msg["arguments"] = arguments
        self.sock.setblocking(True)
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        finally:
            self.sock.setblocking(False)

    def reply(self, timeout):
        """The next reply within `timeout` s, or None."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._message(max(0.0, deadline - time.monotonic()))
            if msg is None or "event" not in msg:
                return msg
            self.events.append(msg)

    def execute(self, name, arguments=None, timeout=10):
        self.send(name, arguments)
        msg = self.reply(timeout)
        if msg is None:
            raise HarnessError(f"no reply to {name} within {timeout} s")
        return msg

    def negotiate(self):
        reply = self.execute("qmp_capabilities")
        if reply != {"return": {}}:
            raise HarnessError(f"qmp_capabilities: {reply}")
        return self


# -- a real QEMU as the guest ------------------------------------------------------

_QEMU_IO_DONE = re.compile(r"^(wrote|read) (\d+)/(\d+) bytes at offset (\d+)",
                           re.M)
_QEMU_IO_FAILED = re.compile(r"fail|error|Error|cannot|Cannot|not found")


class QemuGuest:
    """qemu-system-x86_64 with no machine, whose disk is a -blockdev nbd node
    on the proxy's socket; I/O by HMP `qemu-io NODE "..."` over QMP.

    HMP qemu-io writes its results to QEMU's stdout (the process log), not
    into the command's reply: io() reads them from there.
    """

    def __init__(self, procs, qmp, guest_sock, qmp_path, node="disk"):
        self.node = node
        qmp_path = os.path.abspath(os.fspath(qmp_path))
        guest_sock = os.path.abspath(os.fspath(guest_sock))
        self.proc = procs.start(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults",
             "-display", "none",
             "-qmp", f"unix:{qmp_path},server=on,wait=off",
             "-blockdev", f"driver=nbd,node-name={node},server.type=unix,"
                          f"server.path={guest_sock}"],
            name="qemu-system")
        wait_for_socket(qmp_path, 20, self.proc)
        self.qmp = qmp(qmp_path)
        self.procs = procs

    def _log(self):
        with open(self.proc.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def hmp(self, command_line):
        reply = qmp_execute(self.qmp, "human-monitor-command",
                            **{"command-line": command_line})
        if "error" in reply:
            raise HarnessError(f"HMP {command_line!r}: {reply['error']}")
        return reply["return"]

    def io(self, *commands, timeout=30):
        """Run qemu-io commands on the node, in order; fail unless each data
        command reported completion and nothing failed (a `read -P` whose
        pattern does not match prints "Pattern verification failed").

        aio_write/aio_read return at once and complete later.
        Returns what qemu-io printed.
        """
        return self.collect(self.submit(*commands), timeout)

    def submit(self, *commands):
        """Run the commands; return a ticket for collect(), which waits
        for their results (aio_write: requests left in flight meanwhile)."""
        start = len(self._log())
        for c in commands:
            out = self.hmp(f'qemu-io {self.node} "{c}"')
            if out.strip():
                raise AssertionError(f"qemu-io {c!r}: {out.strip()}")
        return start, commands

    def collect(self, ticket, timeout=30):
        start, commands = ticket
        expected = sum(1 for c in commands
                       if c.split()[0] in ("read", "write", "aio_read",
                                           "aio_write"))

        def printed():
            text = self._log()[start:]
            if _QEMU_IO_FAILED.search(text) or \
                    len(_QEMU_IO_DONE.findall(text)) >= expected:
                return text
        text = deadline_poll(printed, timeout,
                             f"qemu-io {list(commands)} completion")
        failed = _QEMU_IO_FAILED.search(text)
        assert not failed, f"qemu-io {list(commands)} in QEMU: {text}"
        for verb, done, total, _ in _QEMU_IO_DONE.findall(text):
            assert done == total, f"short {verb}: {text}"
        return text

    def quit(self, timeout=10):
        """QMP quit; wait for the process to exit."""
        with contextlib.suppress(Exception):
            qmp_execute(self.qmp, "quit")
        self.proc.wait(timeout)
        return self.proc.returncode


# -- files ---------------------------------------------------------------------------

def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def pwrite_file(path, data, offset):
    """Write `data` into the file at `offset`, and fsync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


# -- QMP timing --------------------------------------------------------------------

def collect_events(log, seconds):
    """Every event an EventLog's client receives in the next `seconds`
    (a measurement window); they are also kept in log.events."""
    start = len(log.events)
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            event = log.client.pull_event(wait=float(remaining))
        except TimeoutError:
            break
        if event is not None:
            log.events.append(event)
    return log.events[start:]


def execute_within(client, seconds, name, **args):
    """qmp_execute, failing unless the reply came within `seconds`.
    (The client's own timeout still bounds the wait.)"""
    sent = time.monotonic()
    try:
        reply = qmp_execute(client, name, **args)
    except TimeoutError:
        raise AssertionError(f"no reply to {name} within the QMP client's "
                             f"timeout") from None
    took = time.monotonic() - sent
    assert took <= seconds, f"{name} took {took:.1f} s (limit {seconds} s)"
    return reply
