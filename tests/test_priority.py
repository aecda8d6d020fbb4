"""Thread CPU priorities (priority.py): the job thread copies nicer than the
process, and what serves guest requests does not, even when the job thread
starts it and the proxy runs unprivileged (it may not raise a priority)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from helpers import nbdkit_server
from nbdmirror import priority

pytestmark = pytest.mark.timeout(60)

REPO = pathlib.Path(__file__).resolve().parent.parent


def nice_of(tid):
    return os.getpriority(os.PRIO_PROCESS, tid)


def in_a_nicer_thread(fn, step=5):
    """fn() in a new thread that first lowers its priority by `step`."""
    out = []

    def run():
        priority.nicer(step)
        out.append(fn())
    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return out[0]


def started_thread_nice(start):
    """start(fn) starts a thread (from somewhere) running fn: its nice."""
    seen = []
    done = threading.Event()

    def body():
        seen.append(nice_of(threading.get_native_id()))
        done.set()
    start(lambda: threading.Thread(target=body).start())
    assert done.wait(10)
    return seen[0]


def test_a_starter_starts_threads_at_its_makers_priority():
    base = nice_of(threading.get_native_id())
    starter = priority.Starter("test-starter")
    try:
        direct, through = in_a_nicer_thread(lambda: (
            started_thread_nice(lambda fn: fn()),
            started_thread_nice(starter.call)))
    finally:
        starter.close()
    assert direct == min(19, base + 5)     # inherited from its creator
    assert through == base


def test_a_starter_call_returns_what_fn_returns_or_raises():
    starter = priority.Starter("test-starter")
    try:
        assert starter.call(lambda: 42) == 42
        with pytest.raises(KeyError):
            starter.call(lambda: {}["missing"])
        assert starter.call(threading.get_native_id) != \
            threading.get_native_id()
    finally:
        starter.close()


UNPRIVILEGED = textwrap.dedent("""
    import json, os, sys, threading
    from nbdmirror import priority
    from nbdmirror.endpoints import NbdEndpoint

    ep = NbdEndpoint(sys.argv[1])
    ep.start_io()
    starter = priority.Starter("starter")
    out = {"process": os.getpriority(os.PRIO_PROCESS, os.getpid())}

    def job():
        priority.nicer(5)
        for how, start_io in (("starter", starter.call), ("here", None)):
            ep.reconnect(5, start_io=start_io)
            ep.pwrite(b"x" * 4096, 0)        # the new connection works
            io = ep.conn._thread.native_id
            out[how] = os.getpriority(os.PRIO_PROCESS, io)
    t = threading.Thread(target=job)
    t.start()
    t.join(20)
    ep.close()
    starter.close()
    print(json.dumps(out))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to user nobody")
def test_unprivileged_a_reconnected_target_is_served_at_the_process_priority(
        workdir, procs):
    """As `nobody`, a target connection made again by a nicer thread (the
    job's, after a lost connection) has its I/O thread, which serves the
    guest too after a pivot, at the process's priority when started
    through a Starter; started from the nicer thread it stays nicer (which
    shows that this user may not raise it)."""
    os.chmod(workdir, 0o755)
    sock = workdir / "t.sock"
    uri = nbdkit_server(procs, sock, "memory", "1M")
    os.chmod(sock, 0o777)
    shutil.copytree(REPO / "nbdmirror", workdir / "pkg" / "nbdmirror",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(workdir / "pkg"),
               PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-c", UNPRIVILEGED, uri],
        env=env, cwd="/", capture_output=True, text=True, timeout=40)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["here"] == min(19, out["process"] + 5), out
    assert out["starter"] == out["process"], out
