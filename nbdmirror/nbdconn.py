"""One NBD connection, shared by every thread of the proxy.

nbdmirror opens one connection per NBD endpoint and keeps it for the life of
the endpoint, as QEMU does: `qemu-nbd` with its defaults serves one client
and exits when that client leaves, and a server with a connection limit must
keep a slot free for others.  The guest path (many nbdkit worker threads) and
the copier (the job thread) share it.

How it is driven (FIELD-NOTES, "libnbd"):
  * Any thread may submit aio commands (libnbd takes the handle lock).
  * One thread at a time polls the handle (calls aio_notify_read/write), so
    completion callbacks run in that thread.  Which one is `_poller`
    (guarded by `_lock`):
      - CALLER: a thread in call() whose request was sent while nobody
        polled.  It polls until its own request completed, which saves the
        two thread wake-ups of a hand-off (a guest write-through, or a
        guest request to an NBD source or a pivoted target).  A 4 KiB
        write to nbdkit memory: 86 us through the I/O thread, 36 us like
        this (libnbd's own synchronous call: 24 us).
      - IO: the connection's I/O thread, for everything else (the copier's
        requests, several callers at once).
      - None: nobody, and then no request is in flight.
    Invariant: at the end of every submit(), and whenever a poller leaves,
    a request in flight has a poller.  A poller leaves only under `_lock`
    and only if nothing is in flight, or it hands over to IO (waking it).
  * The I/O thread always runs: it watches the wake pipe, polls the handle
    when it is the poller, watches an idle connection for a hang-up (a
    server that goes away between requests is noticed at once), and checks
    the timeouts whoever polls.
  * libnbd reads a server's end in whichever thread drives the handle: a
    request sent to a server already gone may end it in the sender's
    thread.  Whoever sees the handle ended sets `dead` (_ended), the
    sender included; the I/O thread, idle, looks at every round.
  * A submission that leaves the handle wanting to write (a partial send)
    writes to the wake pipe, which every poller watches, so that whoever
    polls re-reads the direction and waits for POLLOUT too.
  * A completion callback runs with the handle lock held, in whichever
    thread polls: it must never call this handle, nor take a lock that a
    thread calling call() may hold.  `done(err)` callbacks handed to
    submit() obey that rule.

Bounds (nothing waits on a peer without one):
  * Connecting, handshake included, must finish within `connect_timeout`.
  * Each request must complete within `io_timeout`: the I/O thread looks at
    the oldest request in flight a few times a second, and past the bound it
    kills the connection (shutdown(2) on its socket).  libnbd then completes
    every request in flight with an error, in the I/O thread, so a waiter is
    always released, and released only after libnbd is done with its buffer.
  * kill() does the same on demand (a force cancel abandons the target).

After a kill or a loss the connection is dead for good: every request fails
at once with ENOTCONN (ETIMEDOUT for requests ended by a timeout).
"""

import errno
import itertools
import os
import re
import select
import socket
import threading
import time

import nbd

from . import priority, tls

POLL_INTERVAL = 0.25     # seconds between the I/O thread's timeout checks
CALLER_POLL = 0.1        # seconds between a polling caller's give_up checks
CLOSE_GRACE = 1.0        # seconds a polite disconnect may take at close
IO, CALLER = "io", "caller"     # who polls (_poller)
# How a request fails when its connection is lost: ENOTCONN (libnbd's, for
# a handle that ended; the request may end before anyone noted `dead`), or
# ETIMEDOUT after a timeout dropped it; none of them is an answer of the
# server's, except ESHUTDOWN: the server is going away.
LOST = frozenset({errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNRESET,
                  errno.EPIPE, errno.ESHUTDOWN})
# The send buffer of a unix socket connection, at least (the kernel doubles
# what it is asked for).  Linux's default, 208 KiB, holds less than one of
# the copier's 256 KiB writes, so each one was sent in pieces, by the I/O
# thread, one POLLOUT at a time: 2 GiB file -> nbdkit memory took 1.62-1.71
# s, 1.47-1.51 s with 416 KiB, 1.29-1.30 s with 2 MiB (nbdcopy: 1.37-1.41).
# TCP tunes its own buffers (setting one would turn that off).
UNIX_SNDBUF = 1 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)     # Linux's number


class ConnectError(Exception):
    """The connection could not be made; str() is a one-line reason."""


def errno_of(exc):
    """The errno number of an nbd.Error or OSError (EIO if none).  (An
    nbd.Error's `errno` is a name such as 'EINVAL'; `errnum` the number.)"""
    if isinstance(exc, nbd.Error):
        return exc.errnum or errno.EIO
    return getattr(exc, "errno", None) or errno.EIO


def _free(h):
    """Close a libnbd handle now (the binding has no close()): frees it and
    its socket; commands still in flight are dropped without callbacks."""
    if hasattr(h, "_o"):
        nbd.NBD.__del__(h)
        del h._o


def _widen_send_buffer(fd):
    """UNIX_SNDBUF for a unix socket: asked for plainly, and past the
    administrator's cap (net.core.wmem_max) only if the process may."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        if s.family != socket.AF_UNIX:
            return
        for option in (socket.SO_SNDBUF, SO_SNDBUFFORCE):
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= \
                    2 * UNIX_SNDBUF:
                return
            try:
                s.setsockopt(socket.SOL_SOCKET, option, UNIX_SNDBUF)
            except OSError:         # EPERM: not privileged; keep what is
                return
    finally:
        s.close()


class NbdConnection:
    """One libnbd handle and the thread that polls it.

    `h` may be used directly for what needs no round trip (get_size,
    can_*).  Everything that talks to the server goes through submit() or
    call().
    """

    def __init__(self, uri, contexts=(), *, name="nbdmirror",
                 connect_timeout=10.0, io_timeout=30.0, display=None,
                 give_up=None):
        self.uri = uri
        self.display = display or uri        # safe to show (no secrets)
        self.io_timeout = io_timeout
        self.h = nbd.NBD()
        self.h.set_handle_name(name)
        for ctx in contexts:
            self.h.add_meta_context(ctx)
        self._connect(connect_timeout, give_up)
        self._fd = self.h.aio_get_fd()
        _widen_send_buffer(self._fd)
        self._lock = threading.Lock()   # guards the seven below, _thread
        self._pending = {}              # key -> submit time, oldest first
        self._poller = None             # IO, CALLER or None (see above)
        self._submitting = 0            # submit() calls inside issue()
        self._closing = False           # close() began: submit() refuses
        self._keys = itertools.count()
        self._dead = None               # why the connection ended, or None
        self._timed_out = False
        self._thread = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False
        # The polling caller's poll set: one caller polls at a time.
        self._caller_poll = self._new_poll()

    def _connect(self, timeout, give_up):
        """give_up() is asked every 0.1 s: True abandons the attempt."""
        h = self.h
        deadline = time.monotonic() + timeout
        try:
            tls.configure(h, self.uri)
            h.aio_connect_uri(self.uri)
            while h.aio_is_connecting():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectError(
                        f"cannot connect to {self.display}: timed out after "
                        f"{timeout:g} s (is the server stopped or busy with "
                        f"another client?)")
                if give_up is not None and give_up():
                    raise ConnectError(f"connecting to {self.display}: "
                                       f"abandoned")
                h.poll(max(1, int(min(left, 0.1) * 1000)))
            if not h.aio_is_ready():
                raise ConnectError(f"cannot connect to {self.display}: "
                                   f"the server closed the connection")
        except nbd.Error as e:
            _free(h)
            reason = tls.explain(self.uri, re.sub(r"^nbd_\w+: ", "",
                                                  e.string or str(e)))
            raise ConnectError(
                f"cannot connect to {self.display}: {reason}") from None
        except BaseException:
            _free(h)
            raise

    # -- requests (any thread) ---------------------------------------------
    @property
    def dead(self):
        """Why the connection ended (a string), or None while it works."""
        return self._dead

    def submit(self, issue, done):
        """Send one request: issue(completion) calls an h.aio_* method with
        `completion=completion`.  done(errno) is called exactly once: from
        the polling thread when the server answers (0 on success), or right
        here when the request cannot be sent."""
        self._send(issue, done, IO)

    def _send(self, issue, done, role):
        """submit(); if nobody polls, `role` does from now on.  True if
        the caller is to poll (role CALLER, and nobody polled)."""
        key = next(self._keys)

        def completion(err):
            with self._lock:
                self._pending.pop(key, None)
                timed_out = self._timed_out
            e = err.value
            if e and timed_out:
                e = errno.ETIMEDOUT
            done(e)
            return 1

        with self._lock:
            if self._dead is not None or self._closing:
                failed = errno.ETIMEDOUT if self._timed_out else errno.ENOTCONN
            else:
                failed = 0
                self._pending[key] = time.monotonic()
                self._submitting += 1
                if self._thread is None:
                    self._start_thread()
        if failed:
            done(failed)
            return False
        sent = wake = False
        try:
            issue(completion)
            sent = True
            wake = self.h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE
        except nbd.Error as e:      # not sent: the callback will not run
            with self._lock:
                self._pending.pop(key, None)
            # this send may be what found the server gone
            done(errno.ENOTCONN if self._ended() else errno_of(e))
        finally:
            with self._lock:
                self._submitting -= 1
                mine = sent and self._poller is None
                if mine:
                    self._poller = role
        polls_itself = mine and role is CALLER
        # Whoever polls re-reads the direction: the I/O thread when it
        # becomes the poller, and when a partial send wants POLLOUT (a
        # caller that polls itself reads it at once).
        if (mine and role is IO) or (wake and not polls_itself):
            self._wake()
        return polls_itself

    def call(self, issue, give_up=None, meanwhile=None):
        """submit() and wait for the answer; raise OSError on failure.

        Without `give_up` it waits until the server answers or the
        connection ends (io_timeout bounds that).  With it, give_up() is
        asked every 0.1 s and True abandons the wait (ECANCELED): only for
        requests whose buffers are Python objects that libnbd keeps alive,
        never for a buffer that the caller frees on return.

        meanwhile(), if given, runs once the request is sent and before it
        is waited for (a write-blocking guest write's source half, while
        its target half is on the wire).  The request is waited for even if
        meanwhile() raises, which is then raised.  While it runs, a caller
        that polls for itself does not poll: other requests on this
        connection (the copier's) complete only after it."""
        latch = threading.Lock()
        latch.acquire()
        result = []

        def done(err):
            result.append(err)
            latch.release()

        polls = self._send(issue, done, CALLER)
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                self._wait(polls, latch, result, None)
                raise
        self._wait(polls, latch, result, give_up)
        if result[0]:
            raise OSError(result[0], f"{self.display}: "
                                     f"{os.strerror(result[0])}")

    def _wait(self, polls, latch, result, give_up):
        """Until the request of call() completed (`result` filled): polling
        for it if the caller `polls`, else on its latch."""
        if polls:
            self._poll_for(result, give_up)
        elif give_up is None:
            latch.acquire()
        else:
            while not latch.acquire(timeout=CALLER_POLL):
                if give_up():
                    raise OSError(errno.ECANCELED, "abandoned")

    def _poll_for(self, result, give_up):
        """The caller polls until its request completed (`result` filled),
        then hands the handle over: to the I/O thread if other requests are
        in flight, else to nobody."""
        try:
            while not result:
                self._poll_once(self._caller_poll, CALLER_POLL)
                if not result and give_up is not None and give_up():
                    raise OSError(errno.ECANCELED, "abandoned")
        finally:
            with self._lock:
                self._poller = IO if self._pending else None
                wake = self._poller is IO
            if wake:
                self._wake()

    def kill(self, reason="killed"):
        """End the connection now: every request in flight completes with
        an error (in the thread that polls), and later ones fail at once."""
        with self._lock:
            if self._dead is None:
                self._dead = reason
            if self._thread is None:
                # Nothing was ever sent: no request waits, no poller runs.
                return
        try:
            fd = os.dup(self.h.aio_get_fd())
        except (nbd.Error, OSError):
            return
        s = socket.socket(fileno=fd)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            s.close()
        self._wake()

    def close(self):
        """Disconnect politely (bounded), stop the I/O thread, free the
        handle.  Requests still in flight are killed first."""
        h = self.h
        with self._lock:
            if self._closing:
                return              # closed already
            self._closing = True
        # No submit() may be inside the handle when it is freed below.
        while True:
            with self._lock:
                if not self._submitting:
                    break
            time.sleep(0.001)
        if self._thread is None:        # never sent: nobody polls
            if h.aio_is_ready():
                try:
                    h.aio_disconnect()
                    deadline = time.monotonic() + CLOSE_GRACE
                    while not h.aio_is_closed() and not h.aio_is_dead() \
                            and time.monotonic() < deadline:
                        h.poll(100)
                except nbd.Error:
                    pass
        else:
            with self._lock:
                busy = bool(self._pending)
            if busy:
                self.kill("closed")
            # A caller polling for its request leaves once it completed
            # (the kill completes it); then the I/O thread alone polls: it
            # sends the disconnect, and no caller is inside the handle when
            # it is freed.
            while True:
                with self._lock:
                    if self._poller is not CALLER:
                        self._poller = IO
                        break
                time.sleep(0.001)
            if not busy and h.aio_is_ready():
                try:
                    h.aio_disconnect()
                except nbd.Error:
                    pass
            self._wake()
            deadline = time.monotonic() + CLOSE_GRACE
            while not (h.aio_is_closed() or h.aio_is_dead()) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            if not (h.aio_is_closed() or h.aio_is_dead()):
                self.kill("closed")
            self._stop = True
            self._wake()
            self._thread.join(CLOSE_GRACE + POLL_INTERVAL)
        with self._lock:
            self._dead = self._dead or "closed"
        _free(h)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # -- the I/O thread ------------------------------------------------------
    def start(self):
        """Start the I/O thread now, from this thread, whose CPU priority
        it inherits (else the first request starts it)."""
        with self._lock:
            if self._thread is None and not self._closing:
                self._start_thread()

    def _start_thread(self):
        """Lazily, in the process that uses the connection: a connection
        made before nbdkit forks is polled by a thread of the child."""
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"nbdmirror-io-{self.display}")
        self._thread.start()

    def _wake(self):
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass

    def _new_poll(self):
        """A poll set of the wake pipe, and of the handle's socket."""
        p = select.poll()
        p.register(self._wake_r, select.POLLIN)
        return {"poll": p, "mask": 0}

    def _watch(self, poller, want):
        """Poll the socket for `want` (0: not at all) in `poller`."""
        if want != poller["mask"]:
            p = poller["poll"]
            if not poller["mask"]:
                p.register(self._fd, want)
            elif not want:
                p.unregister(self._fd)
            else:
                p.modify(self._fd, want)
            poller["mask"] = want

    def _poll_once(self, poller, timeout):
        """One round of the poll loop, by the thread that is the poller:
        wait up to `timeout` s for what the handle wants (or a wake), then
        let libnbd read or write; completions run here."""
        d = 0 if self._ended() else self.h.aio_get_direction()
        self._watch(poller,
                    (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) |
                    (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0))
        for f, ev in poller["poll"].poll(int(timeout * 1000)):
            if f == self._wake_r:
                self._drain_wakes()
                continue
            self._notify(ev)

    def _notify(self, ev):
        h = self.h
        try:
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR |
                     select.POLLRDHUP):
                h.aio_notify_read()
            if ev & select.POLLOUT and \
                    h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
                h.aio_notify_write()
        except nbd.Error:
            # The connection broke: libnbd has completed every request in
            # flight with an error already.
            self._note_end()

    def _drain_wakes(self):
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass
        # Cleared after draining: a wake skipped because the flag was still
        # set happened before this line, and the poller re-reads the
        # direction after it.
        self._wake_pending = False

    def _run(self):
        """The I/O thread: polls the handle while it is the poller; else
        watches an idle connection for a hang-up, and the wake pipe."""
        priority.like_the_process()
        me = self._new_poll()
        while not self._stop:
            with self._lock:
                role = self._poller
            if role is IO:
                self._poll_once(me, POLL_INTERVAL)
                with self._lock:
                    if self._poller is IO and not self._pending and \
                            not self._closing:
                        self._poller = None     # idle: the next caller polls
            else:
                # Idle (None): a hang-up is news; a caller polls: not ours.
                # The handle may have ended in a thread that sent a request
                # to a server already gone, before this one saw the hang-up.
                ended = self._ended()
                self._watch(me, select.POLLRDHUP
                            if role is None and not ended else 0)
                for f, ev in me["poll"].poll(int(POLL_INTERVAL * 1000)):
                    if f == self._wake_r:
                        self._drain_wakes()
                        continue
                    with self._lock:
                        mine = self._poller is None
                        if mine:
                            self._poller = IO   # read the hang-up
                    if mine:
                        self._notify(ev)
            self._check_timeouts()

    def _ended(self):
        """True if the handle has ended (closed or dead), and then `dead`
        says so, whichever thread found the end (the job reconnects on
        it)."""
        if not (self.h.aio_is_closed() or self.h.aio_is_dead()):
            return False
        self._note_end()
        return True

    def _note_end(self):
        with self._lock:
            if self._dead is None:
                self._dead = "the server closed the connection"

    def _check_timeouts(self):
        if not self.io_timeout:
            return
        with self._lock:
            if not self._pending or self._dead is not None:
                return
            oldest = next(iter(self._pending.values()))
            if time.monotonic() - oldest < self.io_timeout:
                return
            self._timed_out = True
        self.kill(f"a request took longer than {self.io_timeout:g} s")
