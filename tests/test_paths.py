"""`serve` never harms the files it is pointed at (issue 7.1, 7.4).

Each case runs the real `nbdmirror serve` (or nbdkit with the plugin) on a
folder of files and checks, besides the exit status and the one-line
message naming the option and the path, that every file in the folder is
byte-for-byte what it was: nothing created, removed, truncated or replaced.
"""

import hashlib
import os
import socket
import stat
import subprocess
import sys

import pytest

from helpers import (REPO, make_image, nbd_read_all, nbdmirror_env,
                     qmp_execute, random_bytes, start_proxy, wait_for_socket)

SIZE = 1 << 20
WAIT = 20           # seconds a refused serve may take at most


@pytest.fixture
def d(workdir):
    """The folder the cases play in (the process logs stay outside it)."""
    folder = workdir / "d"
    folder.mkdir()
    make_image(folder / "src.img", SIZE, seed=11)
    return folder


def snapshot(folder):
    """{relative path: what it is}: content hashes of files, targets of
    symlinks, inodes of sockets."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    what = ("file", hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                what = ("dir",)
            else:
                what = ("other", stat.S_IFMT(st.st_mode), st.st_ino)
            out[os.path.relpath(path, folder)] = what
    return out


def serve(procs, *args, cwd=REPO):
    """Run `nbdmirror serve --foreground ARGS`, expecting a refusal:
    (exit status, output lines).  If it wrongly starts, the registry stops
    it at teardown."""
    proc = procs.start([sys.executable, "-m", "nbdmirror", "serve",
                        "--foreground", *map(str, args)],
                       name="nbdmirror", env=nbdmirror_env(), cwd=cwd)
    try:
        rc = proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve {args} still runs: it should have refused")
    return rc, [l for l in procs.output(proc).splitlines() if l.strip()]


def assert_refused(procs, d, args, words, cwd=REPO):
    before = snapshot(d)
    rc, lines = serve(procs, *args, cwd=cwd)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("nbdmirror: "), lines
    for word in words:
        assert str(word) in lines[0], (word, lines)
    assert snapshot(d) == before


def stale_socket(path):
    """A unix socket file nobody listens on (as a killed server leaves)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait(10)
    return p.pid


# -- refusals -------------------------------------------------------------------------

def test_socket_equal_to_the_source_is_refused(procs, d):
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "src.img", "--control", d / "c.sock"],
                   ["socket:", d / "src.img", "source"])


def test_control_on_an_existing_file_is_refused(procs, d):
    (d / "victim.txt").write_text("precious\n")
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control", d / "victim.txt"],
                   ["control:", d / "victim.txt", "not a socket"])


def test_pidfile_equal_to_the_source_is_refused(procs, d):
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control", d / "c.sock",
                              "--pidfile", d / "src.img"],
                   ["pidfile:", d / "src.img", "source"])


def test_pidfile_symlink_to_the_source_is_refused(procs, d):
    os.symlink("src.img", d / "link.pid")
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control", d / "c.sock",
                              "--pidfile", d / "link.pid"],
                   ["pidfile:", d / "link.pid", "source"])


def test_dangling_symlink_as_pidfile_is_not_followed(procs, d):
    os.symlink("elsewhere.pid", d / "link.pid")
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control", d / "c.sock",
                              "--pidfile", d / "link.pid"],
                   ["pidfile:", d / "link.pid", "not a stale pid file"])
    assert not (d / "elsewhere.pid").exists()


def test_relative_path_resolving_to_the_source_is_refused(procs, d):
    (d / "sub").mkdir()
    assert_refused(procs, d, ["--source", "../src.img", "--socket",
                              "g.sock", "--control", "./x/../../src.img"],
                   ["control:", d / "src.img", "source"], cwd=d / "sub")


def test_control_equal_to_the_guest_socket_is_refused(procs, d):
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control", d / "g.sock"],
                   ["control:", d / "g.sock", "socket"])


def test_control_in_a_missing_directory_is_named(procs, d):
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control",
                              d / "missing" / "c.sock"],
                   ["control:", d / "missing" / "c.sock",
                    "no such directory"])


def test_pidfile_that_is_not_a_pid_file_is_refused(procs, d):
    (d / "notes.pid").write_text("12 apples\n")
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control", d / "c.sock",
                              "--pidfile", d / "notes.pid"],
                   ["pidfile:", d / "notes.pid", "not a stale pid file"])


def test_pidfile_of_a_running_process_is_refused(procs, d):
    (d / "p.pid").write_text(f"{os.getpid()}\n")
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g.sock", "--control", d / "c.sock",
                              "--pidfile", d / "p.pid"],
                   ["pidfile:", d / "p.pid", f"process {os.getpid()}",
                    "running"])


# -- a second proxy ---------------------------------------------------------------------

@pytest.fixture
def first(procs, d):
    """A running proxy on d/src.img with d/g1.sock and d/c1.sock."""
    return start_proxy(procs, d / "src.img", d / "g1.sock", d / "c1.sock")


def assert_first_still_serves(first, qmp):
    assert nbd_read_all(first.uri) == random_bytes(11, SIZE)
    client = qmp(first.control)
    assert qmp_execute(client, "query-status")["return"]["running"] is True


def test_second_proxy_on_a_live_control_socket_is_refused(procs, d, first,
                                                          qmp):
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g2.sock", "--control", d / "c1.sock"],
                   ["control:", d / "c1.sock", "in use"])
    assert_first_still_serves(first, qmp)


def test_second_proxy_on_a_live_guest_socket_is_refused(procs, d, first,
                                                        qmp):
    assert_refused(procs, d, ["--source", d / "src.img", "--socket",
                              d / "g1.sock", "--control", d / "c2.sock"],
                   ["socket:", d / "g1.sock", "in use"])
    assert_first_still_serves(first, qmp)


# -- what is ours to replace ---------------------------------------------------------------

def test_stale_sockets_are_cleaned_and_the_proxy_serves(procs, d, qmp):
    stale_socket(d / "g.sock")
    stale_socket(d / "c.sock")
    before = snapshot(d)
    # start_proxy waits until both sockets accept: served by the new proxy.
    proxy = start_proxy(procs, d / "src.img", d / "g.sock", d / "c.sock")
    assert nbd_read_all(proxy.uri) == random_bytes(11, SIZE)
    assert qmp_execute(qmp(proxy.control), "query-status")["return"]
    assert snapshot(d)["src.img"] == before["src.img"]


def test_stale_pid_file_is_replaced_and_removed_at_exit(procs, d):
    (d / "p.pid").write_text(f"{dead_pid()}\n")
    proxy = start_proxy(procs, d / "src.img", d / "g.sock", d / "c.sock",
                        pidfile=d / "p.pid")
    pid = int((d / "p.pid").read_text())
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "nbdkit"
    assert stat.S_IMODE(os.lstat(d / "p.pid").st_mode) == 0o644
    assert procs.stop(proxy.proc) == 0
    assert not (d / "p.pid").exists()


def test_pid_file_replaced_meanwhile_is_not_removed_at_exit(procs, d):
    proxy = start_proxy(procs, d / "src.img", d / "g.sock", d / "c.sock",
                        pidfile=d / "p.pid")
    os.unlink(d / "p.pid")
    (d / "p.pid").write_text("someone else's\n")
    assert procs.stop(proxy.proc) == 0
    assert (d / "p.pid").read_text() == "someone else's\n"


# -- the nbdkit form means the same ------------------------------------------------------------

def test_plugin_form_refuses_an_existing_control_file_in_one_line(procs, d):
    (d / "victim.txt").write_text("precious\n")
    before = snapshot(d)
    proc = procs.start(["nbdkit", "-f", "-U", d / "g.sock", "python",
                        os.path.join(REPO, "plugin", "nbdmirror.py"),
                        f"source={d / 'src.img'}",
                        f"control={d / 'victim.txt'}"], name="nbdkit")
    assert proc.wait(WAIT) != 0
    said = [l for l in procs.output(proc).splitlines()
            if l.startswith("nbdmirror: ")]
    assert said == [f"nbdmirror: control: {d / 'victim.txt'}: exists and is "
                    "not a socket; not replacing it"], procs.output(proc)
    assert snapshot(d) == before


def test_plugin_form_writes_and_removes_its_pid_file(procs, d):
    proc = procs.start(["nbdkit", "-f", "-U", d / "g.sock", "python",
                        os.path.join(REPO, "plugin", "nbdmirror.py"),
                        f"source={d / 'src.img'}", f"control={d / 'c.sock'}",
                        f"pidfile={d / 'p.pid'}"], name="nbdkit")
    wait_for_socket(d / "c.sock", 20, proc)
    assert int((d / "p.pid").read_text()) == proc.pid
    assert procs.stop(proc) == 0
    assert not (d / "p.pid").exists()
