"""nbdconn.NbdConnection against real nbdkit servers: who polls the handle
(a caller for its own request, else the I/O thread), and that every
request is answered, also when the server stops, hangs up or the
connection is killed or closed while a caller polls."""

import contextlib
import errno
import os
import random
import socket
import threading
import time

import nbd
import pytest

from helpers import nbdkit_server
from servers import deadline_poll, frozen, in_thread
from nbdmirror import nbdconn
from nbdmirror.nbdconn import NbdConnection

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def server(workdir, procs):
    """nbdkit memory: (uri, process)."""
    uri = nbdkit_server(procs, workdir / "t.sock", "memory", str(SIZE))
    return uri, procs.procs[-1]


@pytest.fixture
def connect(server):
    conns = []

    def connect(**kwargs):
        c = NbdConnection(server[0], **kwargs)
        conns.append(c)
        return c
    yield connect
    for c in conns:
        c.close()


def write(c, data, offset):
    c.call(lambda cb: c.h.aio_pwrite(data, offset, completion=cb))


def read(c, length, offset):
    buf = nbd.Buffer(length)
    c.call(lambda cb: c.h.aio_pread(buf, offset, completion=cb))
    return buf.to_bytearray()


def raised_within(thread, outcome, seconds):
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not end within {seconds} s"
    assert outcome[0][0] == "raised", f"the call returned {outcome[0]}"
    return outcome[0][1]


def test_a_lone_call_is_polled_by_its_caller(connect):
    """Nothing else in flight: the completion runs in the calling thread
    (no hand-off to the I/O thread), and afterwards nobody polls."""
    c = connect(contexts=[nbd.CONTEXT_BASE_ALLOCATION])
    threads = []

    def extent(metacontext, offset, entries, err):
        threads.append(threading.get_ident())
        return 0
    write(c, b"a" * 4096, 0)
    c.call(lambda cb: c.h.aio_block_status(4096, 0, extent, completion=cb))
    assert threads == [threading.get_ident()]
    assert c._poller is None


def test_async_requests_are_polled_by_the_io_thread(connect):
    c = connect(contexts=[nbd.CONTEXT_BASE_ALLOCATION])
    threads, done = [], threading.Event()

    def extent(metacontext, offset, entries, err):
        threads.append(threading.get_ident())
        return 0
    c.submit(lambda cb: c.h.aio_block_status(4096, 0, extent, completion=cb),
             lambda err: done.set())
    assert done.wait(5)
    assert threads and threads[0] != threading.get_ident()
    deadline_poll(lambda: c._poller is None, 2, "the I/O thread going idle")


def test_callers_and_async_requests_mixed_all_land(connect):
    """8 threads of calls (small and 4 MiB writes, which fill the socket
    and leave partial sends) beside a stream of async writes: every
    request is answered, and the bytes are those written."""
    c = connect()
    region = SIZE // 16          # each thread writes its own region
    expect = {}
    lock = threading.Lock()

    def caller(i):
        rng = random.Random(i)
        base = i * region
        for n in range(60):
            length = 4 * MiB if n % 15 == 0 else rng.choice((512, 4096,
                                                              65536))
            offset = base + rng.randrange(0, region - length + 1, 512)
            data = rng.randbytes(length)
            write(c, data, offset)
            with lock:
                expect[(i, n)] = (offset, data)
            assert read(c, length, offset) == data
        return True

    # async writes in the last region, their own buffers, checked at the end
    answered, async_data = [], os.urandom(MiB)
    for k in range(32):
        buf = nbd.Buffer.from_bytearray(
            bytearray(async_data[k * 32768:(k + 1) * 32768]))
        c.submit(lambda cb, buf=buf, k=k: c.h.aio_pwrite(
            buf, 15 * region + k * 32768, completion=cb), answered.append)
    runs = [in_thread(lambda i=i: caller(i)) for i in range(8)]
    for t, outcome in runs:
        t.join(60)
        assert not t.is_alive(), "a caller hung"
        assert outcome == [("ok", True)], outcome
    deadline_poll(lambda: len(answered) == 32, 10, "the async writes")
    assert answered == [0] * 32
    assert read(c, MiB, 15 * region) == async_data
    deadline_poll(lambda: c._poller is None, 2, "nobody polling at the end")


@contextlib.contextmanager
def caller_polling_stopped_server(c, server, call=None):
    """A thread in call() (a 4 KiB write by default), polling the handle
    itself, while the server is SIGSTOPped: yields (thread, outcome)."""
    write(c, b"x" * 4096, 0)
    with frozen(server[1]):
        t, outcome = in_thread(call or (lambda: write(c, b"y" * 4096, 0)))
        deadline_poll(lambda: c._poller == nbdconn.CALLER, 5,
                      "the caller polling")
        yield t, outcome


def test_a_caller_at_a_stopped_server_is_released_by_kill(connect, server):
    c = connect()
    with caller_polling_stopped_server(c, server) as (t, outcome):
        c.kill("abandoned")
        e = raised_within(t, outcome, 5)
        assert isinstance(e, OSError) and e.errno == errno.ENOTCONN, e
    assert c.dead == "abandoned"


def test_a_caller_at_a_stopped_server_times_out(connect, server):
    c = connect(io_timeout=0.5)
    write(c, b"x" * 4096, 0)
    with frozen(server[1]):
        started = time.monotonic()
        t, outcome = in_thread(lambda: write(c, b"y" * 4096, 0))
        e = raised_within(t, outcome, 5)
        assert isinstance(e, OSError) and e.errno == errno.ETIMEDOUT, e
        assert time.monotonic() - started >= 0.5
    with pytest.raises(OSError) as later:
        write(c, b"z", 0)
    assert later.value.errno == errno.ETIMEDOUT


def test_close_while_a_caller_polls_a_stopped_server(connect, server):
    c = connect()
    with caller_polling_stopped_server(c, server) as (t, outcome):
        closer, closed = in_thread(c.close)
        e = raised_within(t, outcome, 5)
        assert isinstance(e, OSError), e
        closer.join(5)
        assert closed == [("ok", None)]


def test_give_up_hands_the_request_to_the_io_thread(connect, server):
    """A caller that gives up leaves its request in flight; the I/O thread
    takes it over, and the connection goes on working."""
    c = connect()
    stop = threading.Event()
    call = (lambda: c.call(
        lambda cb: c.h.aio_pwrite(b"y" * 4096, 0, completion=cb),
        give_up=stop.is_set))
    with caller_polling_stopped_server(c, server, call) as (t, outcome):
        stop.set()
        e = raised_within(t, outcome, 5)
        assert e.errno == errno.ECANCELED
        assert c._poller == nbdconn.IO
    deadline_poll(lambda: c._poller is None, 5,
                  "the I/O thread reaping the abandoned request")
    assert read(c, 4096, 0) == b"y" * 4096


def test_meanwhile_runs_while_the_request_is_out(connect, server):
    """call(meanwhile=...): meanwhile() runs once the request is sent,
    without waiting for the answer (the server is stopped), and the call
    returns only with the answer."""
    c = connect()
    seen = []
    with frozen(server[1]):
        t, outcome = in_thread(lambda: c.call(
            lambda cb: c.h.aio_pwrite(b"m" * 4096, 0, completion=cb),
            meanwhile=lambda: seen.append(len(c._pending))))
        deadline_poll(lambda: seen, 5, "meanwhile() to run")
        assert seen == [1]                  # its request was in flight
        deadline_poll(lambda: c._poller == nbdconn.CALLER, 5,
                      "the caller polling for the answer after it")
        assert t.is_alive()
    t.join(5)
    assert outcome == [("ok", None)]
    assert read(c, 4096, 0) == b"m" * 4096


def test_a_meanwhile_that_raises_still_waits_for_the_answer(connect, server):
    c = connect()

    def source_half():
        raise ValueError("the source write failed")
    with frozen(server[1]):
        t, outcome = in_thread(lambda: c.call(
            lambda cb: c.h.aio_pwrite(b"n" * 4096, 0, completion=cb),
            meanwhile=source_half))
        deadline_poll(lambda: c._poller == nbdconn.CALLER, 5,
                      "the caller polling for the answer")
        assert t.is_alive()
    e = raised_within(t, outcome, 5)
    assert isinstance(e, ValueError), e
    assert c._pending == {} and read(c, 4096, 0) == b"n" * 4096


def test_an_idle_connection_notices_its_server_going(connect, server):
    """Nothing in flight, nobody polling: a server that exits is noticed
    at once, not at the next request."""
    c = connect()
    write(c, b"x" * 4096, 0)
    assert c._poller is None and c.dead is None
    server[1].kill()
    deadline_poll(lambda: c.dead is not None, 5, "the hang-up noticed")
    with pytest.raises(OSError) as e:
        read(c, 4096, 0)
    assert e.value.errno == errno.ENOTCONN


def test_an_end_found_by_another_thread_is_reported(connect, server):
    """libnbd finds a server gone in whichever thread drives the handle:
    under load, the job thread's next send can read the hang-up before the
    I/O thread does, which then sees an ended handle and no socket to
    watch.  `dead` must say so all the same: the job reconnects on it
    (seen as a job that never reported TARGET_DISCONNECTED)."""
    c = connect()                        # nothing sent: no I/O thread yet
    server[1].kill()
    server[1].wait(5)
    c.h.aio_notify_read()                # this thread reads the end
    assert c.h.aio_is_closed() or c.h.aio_is_dead()
    assert c.dead is None
    c.start()
    deadline_poll(lambda: c.dead is not None, 5, "the end reported")
    answered = []
    c.submit(lambda cb: c.h.aio_pwrite(b"x" * 4096, 0, completion=cb),
             answered.append)
    assert answered == [errno.ENOTCONN]


def test_a_unix_socket_connection_sends_a_copier_write_at_once(connect):
    """The send buffer holds several of the copier's requests (Linux's
    default holds less than one); the test runs as root, which may go past
    net.core.wmem_max."""
    from nbdmirror.copier import REQUEST_SIZE
    c = connect()
    s = socket.socket(fileno=os.dup(c.h.aio_get_fd()))
    try:
        got = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    finally:
        s.close()
    assert got >= 2 * nbdconn.UNIX_SNDBUF >= 4 * REQUEST_SIZE, got


def test_the_io_thread_runs_at_the_process_priority(connect):
    """Started by a thread that runs nicer (the job's), the I/O thread,
    which serves guest requests too, does not stay nicer (the test runs as
    root, which may raise a priority)."""
    c = connect()

    def from_a_nicer_thread():
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid,
                       os.getpriority(os.PRIO_PROCESS, tid) + 5)
        c.start()
        return c._thread.native_id
    t, outcome = in_thread(from_a_nicer_thread)
    t.join(5)
    io = outcome[0][1]
    deadline_poll(lambda: os.getpriority(os.PRIO_PROCESS, io) ==
                  os.getpriority(os.PRIO_PROCESS, os.getpid()), 5,
                  "the I/O thread at the process's priority")
    write(c, b"x" * 4096, 0)        # and it works
