"""One NBD connection, shared by every thread of the proxy.

nbdmirror opens one connection per NBD endpoint and keeps it for the life of
the endpoint, as QEMU does: `qemu-nbd` with its defaults serves one client
and exits when that client leaves, and a server with a connection limit must
keep a slot free for others.  The guest path (many nbdkit worker threads) and
the copier (the job thread) share it.

How it is driven (FIELD-NOTES, "libnbd"):
  * One I/O thread per connection runs the poll loop: it alone calls
    aio_notify_read/write, so completion callbacks run in that thread.
  * Any thread may submit aio commands (libnbd takes the handle lock).  A
    submission that leaves the handle wanting to write (a partial send)
    writes to a wake pipe, so the I/O thread polls for POLLOUT too.
  * A completion callback runs with the handle lock held: it must never call
    this handle.  `done(err)` callbacks handed to submit() obey that rule.

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

from . import tls

POLL_INTERVAL = 0.25     # seconds between the I/O thread's timeout checks
CLOSE_GRACE = 1.0        # seconds a polite disconnect may take at close


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
        self._lock = threading.Lock()   # guards the six below and _thread
        self._pending = {}              # key -> submit time, oldest first
        self._submitting = 0            # submit() calls inside issue()
        self._closing = False           # close() began: submit() refuses
        self._keys = itertools.count()
        self._dead = None               # why the connection ended, or None
        self._timed_out = False
        self._thread = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False

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
        the I/O thread when the server answers (0 on success), or right here
        when the request cannot be sent."""
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
            return
        try:
            issue(completion)
            wants_write = self.h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE
        except nbd.Error as e:      # not sent: the callback will not run
            with self._lock:
                self._pending.pop(key, None)
            done(errno.ENOTCONN if self.h.aio_is_closed()
                 or self.h.aio_is_dead() else errno_of(e))
            return
        finally:
            with self._lock:
                self._submitting -= 1
        if wants_write:
            self._wake()

    def call(self, issue, give_up=None):
        """submit() and wait for the answer; raise OSError on failure.

        Without `give_up` it waits until the server answers or the
        connection ends (io_timeout bounds that).  With it, give_up() is
        asked every 0.1 s and True abandons the wait (ECANCELED): only for
        requests whose buffers are Python objects that libnbd keeps alive,
        never for a buffer that the caller frees on return."""
        latch = threading.Lock()
        latch.acquire()
        result = []

        def done(err):
            result.append(err)
            latch.release()

        self.submit(issue, done)
        if give_up is None:
            latch.acquire()
        else:
            while not latch.acquire(timeout=0.1):
                if give_up():
                    raise OSError(errno.ECANCELED, "abandoned")
        if result[0]:
            raise OSError(result[0], f"{self.display}: "
                                     f"{os.strerror(result[0])}")

    def kill(self, reason="killed"):
        """End the connection now: every request in flight completes with
        an error (from the I/O thread), and later ones fail at once."""
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
        # No submit() may be inside the handle when it is freed below.
        with self._lock:
            if self._closing:
                return              # closed already
            self._closing = True
        while True:
            with self._lock:
                if not self._submitting:
                    break
            time.sleep(0.001)
        if self._thread is None:
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
            elif h.aio_is_ready():
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

    def _run(self):
        h = self.h
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd = h.aio_get_fd()
        mask = 0
        while not self._stop:
            ended = h.aio_is_closed() or h.aio_is_dead()
            d = 0 if ended else h.aio_get_direction()
            want = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            if want != mask:
                if not mask:
                    poller.register(fd, want)
                elif not want:
                    poller.unregister(fd)
                else:
                    poller.modify(fd, want)
                mask = want
            if ended:
                self._note_end()
            for f, ev in poller.poll(int(POLL_INTERVAL * 1000)):
                if f == self._wake_r:
                    try:
                        while os.read(self._wake_r, 64):
                            pass
                    except BlockingIOError:
                        pass
                    # Cleared after draining: a wake skipped because the
                    # flag was still set happened before this line, and the
                    # loop re-reads the direction after it.
                    self._wake_pending = False
                    continue
                try:
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        h.aio_notify_read()
                    if ev & select.POLLOUT and \
                            h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
                        h.aio_notify_write()
                except nbd.Error:
                    # The connection broke: libnbd has completed every
                    # request in flight with an error already.
                    self._note_end()
            self._check_timeouts()

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
