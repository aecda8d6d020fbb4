"""The QMP wire protocol, spoken over a raw unix socket (no QMP library).

What a hand-written client (socat, a script) sees: the greeting, the
capabilities negotiation, error replies for every kind of bad input with the
session going on afterwards, `id` echoed, framing that does not depend on
how the bytes are split into send() calls, the control socket's mode, and
events delivered to every negotiated client.
"""

import json
import os
import socket
import stat
import time

import pytest

from helpers import make_image, nbdkit_server, start_proxy

M = 1 << 20
JOB = "mirror0"
TIMEOUT = 10


# -- local helpers ---------------------------------------------------------------

class Raw:
    """One QMP session on a plain socket.  recv() returns the next message;
    reply() the next non-event message, keeping events in .events."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(os.fspath(path))
        self.buf = b""
        self.events = []
        self.greeting = self.recv()

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def send_msg(self, msg):
        self.send(json.dumps(msg) + "\n")

    def recv(self, timeout=TIMEOUT):
        """The next message (one JSON line); fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no message within {timeout} s " \
                                  f"(buffered: {self.buf!r})"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            assert data, f"server closed the connection ({self.buf!r})"
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def nothing_within(self, seconds):
        """True if no byte arrives within `seconds` (a measurement window)."""
        if self.buf:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        self.buf += data
        return False

    def reply(self, timeout=TIMEOUT):
        while True:
            msg = self.recv(timeout)
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def execute(self, name, args=None, **extra):
        msg = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send_msg(msg)
        return self.reply()

    def negotiate(self):
        assert self.execute("qmp_capabilities") == {"return": {}}
        return self

    def events_until_null(self, timeout=30):
        """Event names (JOB_STATUS_CHANGE as 'JSC:status') until status
        null, including the events already kept by reply()."""
        deadline = time.monotonic() + timeout
        while not self.events or not is_null(self.events[-1]):
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            assert "event" in msg, f"unexpected reply {msg}"
            self.events.append(msg)
        return [name(e) for e in self.events]


def is_null(event):
    return event["event"] == "JOB_STATUS_CHANGE" \
        and event["data"]["status"] == "null"


def name(event):
    if event["event"] == "JOB_STATUS_CHANGE":
        return "JSC:" + event["data"]["status"]
    return event["event"]


def assert_session_alive(client):
    """The session still answers, and answers the right command."""
    reply = client.execute("query-status", id="alive")
    assert reply == {"return": reply["return"], "id": "alive"}, reply
    assert reply["return"]["status"] == "running"


@pytest.fixture
def proxy(workdir, procs):
    """A proxy on an 8 MiB source with no job; .tgt is an empty target.

    The target starts first, so it is stopped last: an nbdkit with the
    proxy still connected does not exit on SIGTERM (3 s until SIGKILL)."""
    src = make_image(workdir / "src.img", 8 * M, seed=3)
    tgt = nbdkit_server(procs, workdir / "tgt.sock", "memory", "8M")
    p = start_proxy(procs, src, workdir / "guest.sock", workdir / "qmp.sock")
    p.tgt = tgt
    return p


@pytest.fixture
def connect(proxy):
    """connect() -> a Raw session on the proxy's control socket (greeted,
    not negotiated); all are closed at teardown."""
    clients = []

    def make():
        c = Raw(proxy.control)
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(connect):
    """A negotiated Raw session."""
    return connect().negotiate()


# -- greeting and negotiation ----------------------------------------------------

def test_greeting_announces_version_and_no_capabilities(connect):
    greeting = connect().greeting
    assert set(greeting) == {"QMP"}
    assert set(greeting["QMP"]) == {"version", "capabilities"}
    assert greeting["QMP"]["capabilities"] == []
    version = greeting["QMP"]["version"]
    assert isinstance(version.get("package"), str)
    assert all(isinstance(version["qemu"][k], int)
               for k in ("major", "minor", "micro"))


def test_commands_before_qmp_capabilities_are_refused(connect):
    c = connect()
    reply = c.execute("query-status", id=1)
    assert reply["error"]["class"] == "CommandNotFound", reply
    assert "qmp_capabilities" in reply["error"]["desc"]
    assert reply["id"] == 1
    c.negotiate()
    assert_session_alive(c)


def test_second_qmp_capabilities_is_refused(client):
    reply = client.execute("qmp_capabilities")
    assert reply["error"]["class"] == "CommandNotFound", reply
    assert_session_alive(client)


def test_control_socket_is_a_socket_with_mode_0600(proxy):
    st = os.stat(proxy.control)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


# -- bad input -------------------------------------------------------------------

BAD_INPUT = {
    "malformed JSON": ('{"execute": query-status}', "GenericError"),
    "a stray closing bracket": ("}", "GenericError"),
    "an array": ("[1, 2]", "GenericError"),
    "a string": ('"x"', "GenericError"),
    "a number": ("42", "GenericError"),
    "null": ("null", "GenericError"),
    "unknown command": ('{"execute": "no-such-command"}', "CommandNotFound"),
    "missing execute": ('{"arguments": {}}', "GenericError"),
    "execute not a string": ('{"execute": 5}', "GenericError"),
    "arguments not an object": ('{"execute": "query-status", '
                                '"arguments": [1]}', "GenericError"),
    "unexpected member": ('{"execute": "query-status", "extra": 1}',
                          "GenericError"),
    "unexpected argument": ('{"execute": "query-status", '
                            '"arguments": {"verbose": true}}', "GenericError"),
    "wrong argument type": ('{"execute": "block-job-set-speed", "arguments": '
                            '{"device": "mirror0", "speed": "fast"}}',
                            "GenericError"),
    "missing argument": ('{"execute": "block-job-set-speed", "arguments": '
                         '{"device": "mirror0"}}', "GenericError"),
    "boolean as integer": ('{"execute": "block-job-set-speed", "arguments": '
                           '{"device": "mirror0", "speed": true}}',
                           "GenericError"),
}


@pytest.mark.parametrize("text,cls", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_gets_one_error_reply_and_the_session_goes_on(client, text,
                                                                cls):
    client.send(text + "\n")
    reply = client.reply()
    assert set(reply) == {"error"}, reply
    assert reply["error"]["class"] == cls, reply
    assert isinstance(reply["error"]["desc"], str) and reply["error"]["desc"]
    assert_session_alive(client)


@pytest.mark.parametrize("args,words", [
    ({"device": JOB, "speed": "fast"}, ["speed", "integer"]),
    ({"device": JOB}, ["speed", "missing"]),
    ({"device": JOB, "speed": 1, "burst": 2}, ["burst", "unexpected"]),
])
def test_argument_errors_name_the_argument(client, args, words):
    """Argument checks come before the job lookup (there is no job here)."""
    reply = client.execute("block-job-set-speed", args)
    assert reply["error"]["class"] == "GenericError", reply
    for w in words:
        assert w in reply["error"]["desc"], reply


@pytest.mark.parametrize("mid", [7, "abc", {"tag": [1, 2]}, 0, ""])
def test_id_is_echoed_on_success_and_on_error(client, mid):
    ok = client.execute("query-status", id=mid)
    assert ok["id"] == mid and "return" in ok
    bad = client.execute("no-such-command", id=mid)
    assert bad["id"] == mid and bad["error"]["class"] == "CommandNotFound"
    refused = client.execute("block-job-pause", {"device": JOB}, id=mid)
    assert refused["id"] == mid and refused["error"]["class"] == \
        "DeviceNotActive"


def test_replies_without_id_carry_none(client):
    assert "id" not in client.execute("query-status")
    assert "id" not in client.execute("no-such-command")


# -- framing ---------------------------------------------------------------------

def test_a_message_split_across_two_sends_is_one_command(client):
    msg = json.dumps({"execute": "query-status", "id": "split"}) + "\n"
    client.send(msg[:13])
    # A partial message gets no reply (a measurement window, 0.3 s).
    assert client.nothing_within(0.3)
    client.send(msg[13:])
    reply = client.reply()
    assert reply["id"] == "split" and reply["return"]["running"] is True


def test_a_multibyte_character_split_across_sends_survives(client):
    mid = "dévé€"
    data = (json.dumps({"execute": "query-status", "id": mid},
                       ensure_ascii=False) + "\n").encode()
    cut = data.index("€".encode()) + 1      # inside the 3-byte euro sign
    client.send(data[:cut])
    assert client.nothing_within(0.3)
    client.send(data[cut:])
    assert client.reply()["id"] == mid


@pytest.mark.parametrize("sep", ["\n", "\r\n", "", " "])
def test_two_messages_in_one_send_get_two_replies_in_order(client, sep):
    first = json.dumps({"execute": "query-status", "id": 1})
    second = json.dumps({"execute": "query-jobs", "id": 2})
    client.send(first + sep + second + "\n")
    r1, r2 = client.reply(), client.reply()
    assert r1["id"] == 1 and r1["return"]["status"] == "running"
    assert r2 == {"return": [], "id": 2}
    assert_session_alive(client)


def test_an_error_between_two_good_messages_does_not_eat_them(client):
    client.send('{"execute": "query-status", "id": 1}\n'
                '{"execute": oops}\n'
                '{"execute": "query-jobs", "id": 3}\n')
    replies = [client.reply() for _ in range(3)]
    assert replies[0]["id"] == 1 and "return" in replies[0]
    assert replies[1]["error"]["class"] == "GenericError"
    assert replies[2] == {"return": [], "id": 3}


# -- events ---------------------------------------------------------------------

COMPLETED = ["JSC:created", "JSC:running", "JSC:ready", "BLOCK_JOB_READY",
             "JSC:pending", "BLOCK_JOB_COMPLETED", "JSC:concluded", "JSC:null"]


def test_three_clients_each_receive_every_event_of_a_job(proxy, connect):
    clients = [connect().negotiate() for _ in range(3)]
    silent = connect()              # greeted, never negotiated
    driver = clients[0]
    reply = driver.execute("drive-mirror", {
        "device": "disk0", "target": proxy.tgt, "sync": "full",
        "job-id": JOB})
    assert reply == {"return": {}}
    for c in clients:
        while "BLOCK_JOB_READY" not in [name(e) for e in c.events]:
            c.events.append(c.recv())
    assert driver.execute("block-job-complete", {"device": JOB}) == \
        {"return": {}}
    sequences = [c.events_until_null() for c in clients]
    assert sequences == [COMPLETED] * 3
    # The very same events: same data and timestamps.
    assert clients[1].events == clients[0].events == clients[2].events
    # Events go only to negotiated sessions: nothing was queued for this one.
    assert silent.execute("qmp_capabilities") == {"return": {}}
    assert silent.execute("query-jobs", id=9) == {"return": [], "id": 9}
    assert silent.events == []


def test_a_client_that_disconnects_does_not_disturb_the_others(proxy, connect):
    a, b = connect().negotiate(), connect().negotiate()
    assert a.execute("drive-mirror", {
        "device": "disk0", "target": proxy.tgt, "sync": "full",
        "job-id": JOB, "speed": 4 * M}) == {"return": {}}
    b.close()                        # gone while events are being sent
    assert a.execute("block-job-set-speed",
                     {"device": JOB, "speed": 0}) == {"return": {}}
    while "BLOCK_JOB_READY" not in [name(e) for e in a.events]:
        a.events.append(a.recv())
    assert a.execute("block-job-cancel", {"device": JOB}) == {"return": {}}
    assert a.events_until_null() == COMPLETED
