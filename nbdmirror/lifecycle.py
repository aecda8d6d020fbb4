"""Ending the proxy: QMP `quit` and signals stop it in bounded time.

nbdkit 1.32 asked to exit (nbdkit.shutdown(), or SIGTERM) stops accepting
clients but then waits for every connected guest to hang up: a guest that
keeps its connection open keeps the proxy alive.  Shutting the guests'
sockets down does not help: a guest that then closes with requests in
flight makes two nbdkit workers fail to reply at once, which trips an
assertion in nbdkit (raw_send_socket: sock >= 0).  So `quit` ends the job,
lets the guest requests inside finish, cleans up (sockets, pid file) and
ends the process (Proxy.request_shutdown, nbdkit_plugin._exit_now); the
guests see the server go, as after a crash, and every write they were
answered for is on the source (or, after a pivot, the target).

  * Signals.install() (nbdkit's main thread, in after_fork) takes SIGTERM,
    SIGINT, SIGHUP and SIGQUIT over from nbdkit: Python's C-level handler
    writes the signal number to a wakeup pipe, and a watcher thread calls
    `on_signal`, which does what `quit` does.
  * GuestSocket remembers the inode of nbdkit's -U socket, so that the
    proxy removes that socket at exit only if it is still the one nbdkit
    made.
"""

import os
import select
import signal
import socket
import stat
import threading

from .paths import file_identity, unlink_if_same

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class Signals:
    def __init__(self, on_signal):
        self._on_signal = on_signal
        self._r = self._w = None

    def install(self):
        """Only from the main thread (Python's rule for signal handlers)."""
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            # The Python-level handler never runs (nbdkit's main thread
            # runs no Python); the wakeup byte is what counts.
            signal.signal(sig, lambda *_: None)
        threading.Thread(target=self._watch, daemon=True,
                         name="nbdmirror-signals").start()

    def _watch(self):
        while True:
            select.select([self._r], [], [])
            try:
                data = os.read(self._r, 64)
            except BlockingIOError:
                continue
            if data:
                self._on_signal(data[0])
                return


def _sockets():
    """A socket object (over a dup of the fd) for each socket we hold."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                out.append(socket.socket(fileno=os.dup(int(name))))
        except OSError:
            continue
    return out


class GuestSocket:
    """nbdkit's -U socket: noted once nbdkit made it, removed at exit only
    if the path still names that socket."""

    def __init__(self):
        self._path = self._ident = None

    def note(self):
        """After nbdkit bound its listening sockets (after_fork), before
        the proxy makes its own (the control socket)."""
        for s in _sockets():
            try:
                if s.family == socket.AF_UNIX and s.getsockopt(
                        socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    path = s.getsockname()
                    if isinstance(path, str) and path and \
                            self._path is None and _is_socket(path):
                        self._path = path
                        self._ident = file_identity(path)
            except OSError:
                pass
            finally:
                s.close()

    def remove(self):
        if self._path is not None:
            unlink_if_same(self._path, self._ident)


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
