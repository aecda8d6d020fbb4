"""Shared fixtures for tests against real processes (see helpers.py).

    workdir   a short temp dir under /tmp (pathlib.Path), removed afterwards
    procs     a helpers.Processes: start long-running processes through it;
              each is stopped by pid at teardown, pass or fail
    qmp       qmp(control_path) -> connected qemu.qmp legacy client, closed
              at teardown (before the processes are stopped)

Typical use:

    from helpers import make_image, nbdkit_server, start_proxy, wait_event

    def test_mirror_reaches_ready(workdir, procs, qmp):
        src = make_image(workdir / "src.img", 8 << 20, seed=1)
        tgt = nbdkit_server(procs, workdir / "tgt.sock", "memory", "8M")
        proxy = start_proxy(procs, src, workdir / "g.sock",
                            workdir / "qmp.sock", target=tgt)
        client = qmp(proxy.control)
        wait_event(client, "BLOCK_JOB_READY", timeout=30)

When a test fails, the tail of every process's log is printed in the
"Captured stdout teardown" section.
"""

import pathlib
import shutil

import pytest

import helpers

_live = []      # every Processes still in use, for the end-of-session sweep


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Record each phase's report on the item, so fixtures see failures."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request):
    return any(getattr(getattr(request.node, "rep_" + w, None), "failed",
                       False) for w in ("setup", "call"))


@pytest.fixture
def workdir():
    """A short temp dir (unix socket paths must stay under 108 bytes)."""
    path = helpers.short_tempdir()
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs(workdir, request):
    """The process registry; every process is stopped by pid at teardown."""
    p = helpers.Processes(workdir)
    _live.append(p)
    yield p
    if _failed(request) and p.procs:
        print(p.report())
    try:
        p.stop_all()
    finally:
        _live.remove(p)


@pytest.fixture
def qmp(procs):
    """qmp(control) -> a connected QMP client; all are closed at teardown.

    Depends on `procs` so that clients close before the servers stop.
    """
    clients = []

    def connect(control, timeout=10):
        client = helpers.qmp_connect(control, timeout)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        try:
            client.close()
        except Exception:   # the server may be gone already
            pass


def pytest_sessionfinish(session, exitstatus):
    """Last resort: stop processes whose fixture teardown never ran."""
    for p in list(_live):
        p.stop_all()
