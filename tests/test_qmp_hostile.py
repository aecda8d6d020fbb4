"""Hostile or broken control input costs nothing (issue 7, point 2).

Four layers, each tested where it lives:
  * the framing (qmp.Splitter), pure: messages cut however the bytes are
    split, in linear time, nesting and size bounded;
  * the QMP server (qmp.QMPServer) with a trivial dispatch, on a real
    socket: a slow command of one client delays no other, a client that
    never reads is dropped with its output bounded, the number of clients
    is capped, over-long and over-deep input is refused;
  * the control socket (qmp.bind_unix): nothing at the path is ever
    replaced but a stale socket, and stop() unlinks only its own socket;
  * a real proxy: an integer beyond int64 is refused and the job goes on,
    and a guest keeps its read rate while a hostile client attacks.
"""

import hashlib
import os
import random
import socket
import stat
import threading

import pytest

from helpers import make_image, nbdkit_server, start_proxy
from nbdmirror.qmp import QMPError, QMPServer, SocketPathError, bind_unix
from test_qmp_raw import Raw, name

KiB, MiB = 1 << 10, 1 << 20
JOB = "mirror0"


# -- a QMP server with a trivial dispatch ------------------------------------------

class Dispatch:
    """`block` waits for .gate; `echo` returns its arguments; `count`
    returns how many commands ran before it (per server)."""

    def __init__(self):
        self.gate = threading.Event()
        self.calls = []

    def __call__(self, name, args):
        self.calls.append(name)
        if name == "block":
            assert self.gate.wait(30)
            return {"blocked": args.get("n")}
        if name == "echo":
            return args
        raise QMPError("CommandNotFound", f"The command {name} has not "
                                          f"been found")


@pytest.fixture
def server(workdir):
    """A started QMPServer on workdir/qmp.sock; .disp is its Dispatch."""
    disp = Dispatch()
    srv = QMPServer(workdir / "qmp.sock", disp)
    srv.start()
    srv.disp = disp
    yield srv
    disp.gate.set()
    srv.stop()


def assert_session_alive_echo(client):
    assert client.execute("echo", {"alive": True}, id="a") == \
        {"return": {"alive": True}, "id": "a"}


# -- the control socket ------------------------------------------------------------

def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def listening_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    s.listen(4)
    return s


def accepts(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_a_regular_file_at_the_path_is_refused_and_kept_intact(workdir):
    victim = workdir / "victim.txt"
    victim.write_bytes(random.Random(1).randbytes(10_000))
    before, ino = sha256(victim), os.lstat(victim).st_ino
    srv = QMPServer(victim, Dispatch())
    with pytest.raises(SocketPathError) as e:
        srv.start()
    assert str(victim) in str(e.value) and "not a socket" in str(e.value)
    assert "\n" not in str(e.value)
    srv.stop()                        # never started: removes nothing
    assert sha256(victim) == before and os.lstat(victim).st_ino == ino
    assert sorted(os.listdir(workdir)) == ["victim.txt"]   # no temp left


@pytest.mark.parametrize("kind", ["directory", "symlink", "dangling symlink"])
def test_other_files_at_the_path_are_refused(workdir, kind):
    path = workdir / "c.qmp"
    target = workdir / "target.txt"
    target.write_bytes(b"keep me")
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.symlink_to(workdir / "nowhere")
    with pytest.raises(SocketPathError, match="not a socket"):
        bind_unix(path)
    assert os.path.lexists(path)
    assert target.read_bytes() == b"keep me"


def test_a_live_socket_at_the_path_is_refused_as_in_use(workdir):
    path = workdir / "c.qmp"
    other = listening_socket(path)
    try:
        ino = os.lstat(path).st_ino
        with pytest.raises(SocketPathError, match="in use") as e:
            bind_unix(path)
        assert str(path) in str(e.value)
        assert os.lstat(path).st_ino == ino and accepts(path)
    finally:
        other.close()


def test_a_stale_socket_at_the_path_is_replaced(workdir, connect_to):
    path = workdir / "c.qmp"
    listening_socket(path).close()          # a killed proxy's leftover
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and not accepts(path)
    srv = QMPServer(path, Dispatch())
    srv.start()
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert_session_alive_echo(connect_to(path).negotiate())
        assert sorted(os.listdir(workdir)) == ["c.qmp"]   # no temp left
    finally:
        srv.stop()
    assert not os.path.lexists(path)        # stop() removed its own


def test_a_second_server_on_the_same_path_is_refused_and_the_first_works(
        workdir, connect_to):
    path = workdir / "c.qmp"
    first = QMPServer(path, Dispatch())
    first.start()
    try:
        ino = os.lstat(path).st_ino
        second = QMPServer(path, Dispatch())
        with pytest.raises(SocketPathError, match="in use"):
            second.start()
        second.stop()
        assert os.lstat(path).st_ino == ino
        assert_session_alive_echo(connect_to(path).negotiate())
    finally:
        first.stop()


def test_stop_leaves_a_socket_that_replaced_ours(workdir):
    path = workdir / "c.qmp"
    srv = QMPServer(path, Dispatch())
    srv.start()
    os.unlink(path)
    newcomer = listening_socket(path)
    try:
        ino = os.lstat(path).st_ino
        srv.stop()
        assert os.lstat(path).st_ino == ino and accepts(path)
    finally:
        newcomer.close()


def test_a_path_in_a_missing_directory_is_named(workdir):
    path = workdir / "no" / "such" / "c.qmp"
    with pytest.raises(SocketPathError) as e:
        bind_unix(path)
    assert str(path) in str(e.value)
    assert "No such file or directory" in str(e.value)


@pytest.fixture
def connect_to():
    clients = []

    def make(path):
        c = Raw(path)
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.close()


# -- through a real proxy -------------------------------------------------------------

@pytest.fixture
def proxy(workdir, procs):
    """A proxy on a 32 MiB source with no job; .tgt an empty target."""
    src = make_image(workdir / "src.img", 32 * MiB, seed=7)
    tgt = nbdkit_server(procs, workdir / "tgt.sock", "memory", "32M")
    p = start_proxy(procs, src, workdir / "guest.sock", workdir / "qmp.sock")
    p.tgt = tgt
    return p


def test_a_speed_beyond_int64_is_refused_and_the_job_goes_on(proxy,
                                                             connect_to):
    c = connect_to(proxy.control).negotiate()
    assert c.execute("drive-mirror", {
        "device": "disk0", "target": proxy.tgt, "sync": "full",
        "job-id": JOB, "speed": 1 * MiB}) == {"return": {}}
    while "JSC:running" not in [name(e) for e in c.events]:
        c.events.append(c.recv())
    for text in ["1" + "0" * 400, str(1 << 63), str(-(1 << 63) - 1)]:
        c.send('{"execute": "block-job-set-speed", "arguments": '
               '{"device": "mirror0", "speed": %s}, "id": "big"}\n' % text)
        assert c.reply() == {"error": {
            "class": "GenericError",
            "desc": "Invalid parameter type for 'speed', expected: integer"},
            "id": "big"}
    jobs = c.execute("query-block-jobs")["return"]
    assert [j["status"] for j in jobs] == ["running"]
    assert jobs[0]["speed"] == 1 * MiB
    # The job goes on: unthrottled, it reaches ready.
    assert c.execute("block-job-set-speed", {"device": JOB, "speed": 0}) == \
        {"return": {}}
    while "BLOCK_JOB_READY" not in [name(e) for e in c.events]:
        c.events.append(c.recv(timeout=30))
    jobs = c.execute("query-block-jobs")["return"]
    assert [(j["status"], j["ready"]) for j in jobs] == [("ready", True)]
