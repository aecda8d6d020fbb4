"""The files the proxy creates, and the rule that it never harms others.

The proxy creates three files: the guest socket (nbdkit's -U), the control
socket and the pid file.  Rules, for `serve` and for the plugin alike:

  * The three differ from each other and from every file the proxy reads
    or serves (the source, the bitmap, an NBD source's or target's unix
    socket), compared as the files they name: through symlinks, `..` and
    relative paths, hard links included.
  * An existing file there is replaced only if it is a leftover of ours: a
    socket that nobody accepts connections on, or a pid file (a small
    regular file of ours holding only a pid) of a process that is gone.
    A socket someone serves belongs to that server: a second proxy is
    refused.  Anything else is refused, never removed or truncated.
  * Each must be creatable: its directory exists and is writable.

check() decides with no side effect at all (a refusal creates, removes and
writes nothing); remove_stale_socket() and PidFile then act, each on the
very file that was checked.
"""

import errno
import os
import re
import socket
import stat
import urllib.parse

SOCKET, PIDFILE = "socket", "pidfile"
SUN_PATH_MAX = 107          # bytes of a unix socket path (sockaddr_un)
PROBE_TIMEOUT = 1.0         # a server busy for longer counts as live
PIDFILE_MAX = 32            # bytes: a pid and a newline, with room to spare
_PID_RE = re.compile(rb"^[1-9][0-9]{0,9}\n?$")


class PathError(ValueError):
    """A path the proxy must not use; str() names the option and path."""


def local_path(spec):
    """The file behind a source or target: a path as is, the socket of an
    nbd+unix URI, None for TCP URIs and None."""
    if not spec:
        return None
    if "://" not in spec:
        return spec
    url = urllib.parse.urlsplit(spec)
    if url.scheme.endswith("+unix"):
        sock = urllib.parse.parse_qs(url.query).get("socket")
        return os.path.abspath(sock[0]) if sock else None
    return None


def _identity(path):
    """What makes two paths the same file: the inode when it exists, else
    the resolved path (symlinks and `..` followed)."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check(creates, inputs):
    """Refuse (PathError) unless every path in `creates` [(option, path,
    SOCKET|PIDFILE)] may be created, given the files in `inputs` [(option,
    path)] that the proxy uses.  Side-effect free (a probe connects to an
    existing socket and closes)."""
    seen = []
    for name, path in list(inputs) + [(n, p) for n, p, _ in creates]:
        ident = _identity(path)
        for other, other_path, other_ident in seen:
            if ident == other_ident:
                also = "" if path == other_path else f" ({other_path})"
                raise PathError(f"{name}: {path}: the same file as "
                                f"{other}{also}")
        seen.append((name, path, ident))
    for name, path, kind in creates:
        _check_creatable(name, path, kind)


def _check_creatable(name, path, kind):
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise PathError(f"{name}: {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PathError(f"{name}: {path}: cannot create files in {folder} "
                        "(permission denied)")
    if kind == SOCKET and len(os.fsencode(path)) > SUN_PATH_MAX:
        raise PathError(f"{name}: {path}: too long for a unix socket "
                        f"({len(os.fsencode(path))} bytes, at most "
                        f"{SUN_PATH_MAX})")
    if kind == SOCKET:
        _check_socket(name, path)
    else:
        PidFile(path, name).check()


def _check_socket(name, path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PathError(f"{name}: {path}: exists and is not a socket; "
                        "not replacing it")
    live = probe(path)
    if live is True:
        raise PathError(f"{name}: {path}: in use: a server accepts "
                        "connections there")
    if live is not False:
        raise PathError(f"{name}: {path}: cannot tell whether a server uses "
                        f"this socket ({live})")


def probe(path):
    """True if a server accepts connections on unix socket `path`, False if
    it is a leftover nobody listens on, else the reason it is unknown."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT)
    try:
        s.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except socket.timeout:
        return True             # bound and listening, but its queue is full
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)
    finally:
        s.close()


def remove_stale_socket(path):
    """Unlink the socket at `path` if nobody listens on it (check() said
    so): only that socket, never a file that took its place since."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(before.st_mode) and probe(path) is False:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
            os.unlink(path)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True             # someone else's process
    return True


class PidFile:
    """The server's pid file, written without following a symlink or
    truncating anything: created with O_CREAT|O_EXCL|O_NOFOLLOW, after
    removing only a stale pid file of ours, and removed at exit only if it
    is still the file we wrote."""

    def __init__(self, path, name="pidfile"):
        self.path, self.name = path, name
        self._written = None        # (dev, ino, content) of what we wrote

    def _refuse(self, why):
        raise PathError(f"{self.name}: {self.path}: {why}")

    def check(self):
        """None if nothing is there, the stat of a stale pid file of ours;
        PathError for anything else."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        not_ours = "exists and is not a stale pid file; not replacing it"
        if not stat.S_ISREG(st.st_mode) or st.st_size > PIDFILE_MAX \
                or st.st_uid != os.geteuid():
            self._refuse(not_ours)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW |
                         os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self._refuse(f"cannot read it ({os.strerror(e.errno)})")
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                self._refuse("changed while being checked")
            data = os.read(fd, PIDFILE_MAX + 1)
        finally:
            os.close(fd)
        if not _PID_RE.match(data):
            self._refuse(not_ours)
        pid = int(data)
        if _pid_alive(pid):
            self._refuse(f"process {pid} named there is running")
        return st

    def create(self):
        """Write our pid; replace only a stale pid file of ours."""
        stale = self.check()
        if stale is not None:
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == (stale.st_dev, stale.st_ino):
                os.unlink(self.path)
        content = f"{os.getpid()}\n".encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                         os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.EEXIST:
                self._refuse("created by someone else meanwhile")
            self._refuse(f"cannot create it ({os.strerror(e.errno)})")
        try:
            os.write(fd, content)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._written = (st.st_dev, st.st_ino, content)

    def remove(self):
        """Unlink the pid file if it is still the one we wrote."""
        if self._written is None:
            return
        dev, ino, content = self._written
        self._written = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) != (dev, ino):
                return
            with open(self.path, "rb") as f:
                if f.read(PIDFILE_MAX + 1) != content:
                    return
            os.unlink(self.path)
        except OSError:
            pass


def file_identity(path):
    """(st_dev, st_ino) of `path` itself (not following a symlink)."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def unlink_if_same(path, identity):
    """Remove `path` only if it is still the file `identity` names (one
    we made): another proxy may have put its own there since.  A window
    of one lstat remains, as in any check-then-unlink."""
    if identity is None:
        return
    try:
        if file_identity(path) == identity:
            os.unlink(path)
    except OSError:
        pass
