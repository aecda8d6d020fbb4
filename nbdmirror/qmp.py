"""The QMP control server: framing, greeting, negotiation and events.

This module knows the wire protocol, not the commands: it hands each
command to `dispatch(name, arguments)` (control.py) and sends back what it
returns or the QMPError it raises.  It runs an asyncio loop in a thread of
its own.

Hostile or broken control input costs nothing, and never disturbs guests
or other clients.  The limits, each enforced in one place:
  * a message is at most MAX_MESSAGE bytes (Splitter): the client gets an
    error and is disconnected, without the rest being buffered;
  * a message nests at most MAX_DEPTH deep (Splitter): an error, the
    session goes on;
  * framing costs linear time: Splitter looks at each byte once, json.loads
    sees only whole messages of bounded size and depth;
  * a client's unsent output is at most MAX_OUTPUT bytes (_Client.send):
    a client that does not read is dropped, as QEMU's monitor does;
  * each client's commands run in order in a worker thread of that client
    alone (_Client.run), so a slow command delays nobody else;
  * at most MAX_CLIENTS clients at once (_serve): more are refused;
  * all clients' input together takes at most INPUT_SHARE of one CPU
    (_Budget): clients take turns in arrival order, so one that sends
    costly input delays another by at most one turn, and guests -- which
    share this process and its GIL -- keep running.

Any thread may call broadcast(); every negotiated client receives every
event, in the order broadcast() was called.
"""

import asyncio
import concurrent.futures
import errno
import json
import math
import os
import re
import secrets
import socket
import stat
import threading
import time

from .paths import unlink_if_same

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0},
           "package": "nbdmirror"}

MAX_MESSAGE = 1 << 20    # bytes in one message (whitespace around it free)
# Nesting depth of objects and arrays.  QEMU allows 1024, but json.loads
# (and json.dumps, echoing an `id`) recurse once per level under Python's
# recursion limit of 1000, so 1024 would raise RecursionError.  No QMP
# command nests more than a few levels; 64 leaves a wide margin both ways.
MAX_DEPTH = 64
# Unsent output to one client.  Twice MAX_MESSAGE, so that the reply that
# echoes a largest-possible `id` fits in the buffer of a reading client.
MAX_OUTPUT = 2 * MAX_MESSAGE
MAX_CLIENTS = 32         # simultaneous clients, each with one worker thread
READ_CHUNK = 1 << 16     # bytes read at a time
# CPU for client input -- framing, parsing, checking, the commands themselves
# -- all clients together: at most this share of one CPU, beyond a burst.
# The guests' I/O runs in this process under the same GIL; a busy control
# thread would hold them up, whatever the client sends and however often it
# reconnects.  A QMP client uses a tiny fraction of this.
INPUT_SHARE = 0.1
INPUT_BURST = 0.05       # CPU seconds a quiet server spends without waiting
CLOSE_GRACE = 5.0        # seconds a closed client has to take its output


class AfterReply:
    """A command's result plus an action to run once the reply is sent
    (quit: the reply must reach the client before the server goes away)."""

    def __init__(self, result, action):
        self.result, self.action = result, action


class QMPError(Exception):
    """An error reply: {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, cls, desc):
        super().__init__(desc)
        self.cls, self.desc = cls, desc


class SocketPathError(OSError):
    """The control socket cannot be created at its path; the message is
    one line that names the path."""


def timestamp():
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}


def encode(msg):
    return json.dumps(msg).encode() + b"\r\n"


# -- framing -------------------------------------------------------------------

MESSAGE, ERROR, FATAL = "message", "error", "fatal"

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_SCALAR_END = re.compile(rb'[ \t\r\n{}\[\]"]')
_RUN = re.compile(rb"[{\[]+|[}\]]+")
_STRING_BODY = re.compile(rb'(?:[^"\\]+|\\.)*', re.S)
_BACKSLASH = ord("\\")
_OPEN = b"{["

# Splitter states: between messages, inside brackets, inside a string,
# inside a top-level scalar (a number or a literal, bad or not).
_TOP, _NEST, _STRING, _SCALAR = range(4)


class Splitter:
    """Cuts a byte stream into JSON messages, without parsing them.

    As QEMU's json-streamer, it follows only what decides where a message
    ends: whether it is inside a string (and after a backslash), and the
    depth of brackets, carried across feed() calls.  A message ends when the
    depth returns to 0; a top-level string at its closing quote; a top-level
    scalar (`42`, `null`, garbage) at whitespace or a bracket.  Checking
    that a message is valid JSON is json.loads's job, once it is whole.

    Each byte is looked at a few times at most, by C code (bytes.find and
    count, re) but for one Python step per run of brackets or per string, so
    the cost is linear in the input however it is split.  Structural bytes are
    ASCII, never part of a UTF-8 sequence, so bytes are split, not text.

    feed(data) returns a list of (kind, value):
      (MESSAGE, bytes)  a whole message, for json.loads;
      (ERROR, desc)     a message nested deeper than MAX_DEPTH: refused as
                        soon as seen, the rest of it skipped without
                        buffering, input goes on after it;
      (FATAL, desc)     a message longer than MAX_MESSAGE: the splitter
                        takes no more input (the connection is closed).
    """

    def __init__(self, max_message=MAX_MESSAGE, max_depth=MAX_DEPTH):
        self.max_message, self.max_depth = max_message, max_depth
        self.dead = False
        self._reset()

    def _reset(self):
        self._state = _TOP
        self._depth = 0
        self._escape = False         # the last byte was a backslash
        self._skipping = False       # too deep: refused, skipped to its end
        self._parts = []             # the message so far, from past chunks
        self._size = 0               # its length, skipped bytes included
        self._start = 0              # where it starts in the current chunk

    def feed(self, data):
        out = []
        pos, end = 0, len(data)
        while pos < end and not self.dead:
            state = self._state
            if state == _TOP:
                pos = _WHITESPACE.match(data, pos).end()
                if pos == end:
                    break
                self._start = pos
                c = data[pos]
                pos += 1
                if c in _OPEN:
                    self._depth, self._state = 1, _NEST
                elif c == ord('"'):
                    self._state = _STRING
                elif c in b"}]":            # a stray closer: a bad message
                    self._cut(data, pos, out)
                else:
                    self._state = _SCALAR
            elif state == _SCALAR:
                m = _SCALAR_END.search(data, pos)
                if m is None:
                    pos = end
                else:
                    pos = m.start()
                    self._cut(data, pos, out)
            elif state == _STRING:
                if self._escape:
                    self._escape = False
                    pos += 1
                    continue
                # find() is memchr: a long string costs next to nothing;
                # escapes, if any, are skipped by a regex, in C too.
                quote = data.find(b'"', pos)
                stop = end if quote < 0 else quote
                if data.find(b"\\", pos, stop) >= 0:
                    pos = _STRING_BODY.match(data, pos).end()
                    if pos < end and data[pos] == _BACKSLASH:
                        self._escape, pos = True, pos + 1   # chunk ends
                        continue
                elif quote >= 0:
                    pos = quote
                else:
                    pos = end
                if pos < end:                   # the closing quote
                    pos += 1
                    if self._depth:
                        self._state = _NEST
                    else:
                        self._cut(data, pos, out)
            else:
                pos = self._nest(data, pos, out)
        if self._state != _TOP and not self.dead:
            self._keep(data[self._start:], out)
            self._start = 0
        return out

    def _nest(self, data, pos, out):
        """Inside brackets: up to the next string, or the message's end."""
        quote = data.find(b'"', pos)
        stop = len(data) if quote < 0 else quote
        closes = data.count(b"}", pos, stop) + data.count(b"]", pos, stop)
        opens = data.count(b"{", pos, stop) + data.count(b"[", pos, stop)
        if self._depth - closes > 0 and (
                self._skipping or self._depth + opens <= self.max_depth):
            # Neither the end of the message nor too deep: count, in C.
            self._depth += opens - closes
        else:
            # Walk runs of openers or closers (`]]]]` is one step).
            for m in _RUN.finditer(data, pos, stop):
                run = m.end() - m.start()
                if data[m.start()] in _OPEN:
                    self._depth += run
                    if self._depth > self.max_depth and not self._skipping:
                        # Invariant: at most MAX_DEPTH levels reach json.loads.
                        self._skipping, self._parts = True, []
                        out.append((ERROR, "JSON nesting depth limit "
                                           "exceeded"))
                elif run < self._depth:
                    self._depth -= run
                else:
                    end = m.start() + self._depth
                    self._cut(data, end, out)
                    return end
        if quote < 0:
            return stop
        self._state = _STRING
        return quote + 1

    def _keep(self, piece, out):
        """The unfinished message's bytes of this chunk, for the next."""
        self._size += len(piece)
        if not self._skipping:
            self._parts.append(piece)
        self._check_size(out)

    def _check_size(self, out):
        # Invariant: no more than MAX_MESSAGE (plus one chunk) is buffered.
        if self._size > self.max_message:
            self.dead = True
            self._reset()
            out.append((FATAL, f"JSON message size limit exceeded (at most "
                               f"{self.max_message} bytes); closing the "
                               f"connection"))

    def _cut(self, data, end, out):
        """The message ends at data[end]: hand it out, unless skipped."""
        piece = data[self._start:end]
        self._size += len(piece)
        self._check_size(out)
        if self.dead:
            return
        if not self._skipping:
            out.append((MESSAGE, b"".join(self._parts) + piece
                        if self._parts else piece))
        self._reset()


def _refuse_constant(name):
    raise ValueError(f"invalid literal '{name}'")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):       # would be echoed as invalid JSON
        raise ValueError(f"number '{text[:20]}' out of range")
    return value


def parse(raw):
    """A whole message from Splitter -> its JSON value; ValueError if bad.
    NaN and Infinity are not JSON: refused, as QEMU does."""
    return json.loads(raw.decode("utf-8", "replace"),
                      parse_constant=_refuse_constant,
                      parse_float=_finite_float)


# -- the control socket ----------------------------------------------------------

def bind_unix(path, mode=0o600, backlog=16):
    """A listening unix socket at `path`, and its file's (st_dev, st_ino).

    Never replaces anything: a stale socket at `path` (one that nobody
    accepts on) is removed; anything else there -- a file, a directory, a
    live socket of a running proxy -- is refused with SocketPathError.
    The socket is bound under a temporary name in the same directory,
    chmod-ed to `mode` and listening before link() puts it at `path`;
    link() fails if anything appeared there meanwhile, so `path` is never
    clobbered and the socket there always has its final mode.
    """
    path = os.fspath(path)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmp, ident = _bind_temporary(sock, path, mode)
        try:
            sock.listen(backlog)
            os.link(tmp, path)
        except FileExistsError:
            raise SocketPathError(f"{path}: a file appeared there while the "
                                  f"control socket was being created; not "
                                  f"replacing it") from None
        except OSError as e:
            raise SocketPathError(f"{path}: cannot create the control socket: "
                                  f"{e.strerror or e}") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    except BaseException:
        sock.close()
        raise
    return sock, ident


def _bind_temporary(sock, path, mode):
    directory = os.path.dirname(path)
    for _ in range(3):
        tmp = os.path.join(directory, ".qmp-" + secrets.token_hex(4))
        try:
            sock.bind(tmp)           # fails if tmp exists: replaces nothing
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            raise SocketPathError(f"{path}: cannot create the control socket: "
                                  f"{e.strerror or e}") from None
        try:
            os.chmod(tmp, mode)
            st = os.lstat(tmp)
        except OSError as e:
            os.unlink(tmp)
            raise SocketPathError(f"{path}: cannot create the control socket: "
                                  f"{e.strerror or e}") from None
        return tmp, (st.st_dev, st.st_ino)
    raise SocketPathError(f"{path}: cannot create the control socket: no "
                          f"free temporary name in its directory")


def _remove_stale(path):
    """Unlink `path` if it is a socket nobody accepts on; refuse anything
    else that exists there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SocketPathError(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path}: exists and is not a socket; not "
                              f"replacing it")
    if _accepts(path):
        raise SocketPathError(f"{path}: in use by a running server")
    # Unlink only the socket just probed (not one that replaced it since;
    # a window of one lstat remains, as in any check-then-unlink).
    try:
        again = os.lstat(path)
    except FileNotFoundError:
        return
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        raise SocketPathError(f"{path}: changed while it was checked; not "
                              f"replacing it")
    os.unlink(path)


def _accepts(path):
    """False only if connecting to `path` is refused (a stale socket); a
    busy or unreachable server counts as running."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        s.close()
    return True


# -- the CPU budget for input ---------------------------------------------------

class _Budget:
    """Turns at the CPU for client input, first come first served, paced.

    Everything the loop thread spends -- accepting, reading, framing,
    parsing, answering, all but delivering events -- and the CPU time of
    the commands in the workers is charged: `cpu` seconds spent put the
    budget cpu / share seconds in debt, and the next turn waits until the
    debt is paid.  So client input costs at most `share` of one CPU
    (beyond a `burst` of credit and one turn's work), and as turns are
    granted in arrival order, one client's costly input delays another's
    by one turn.  Loop thread only.
    """

    def __init__(self, share=INPUT_SHARE, burst=INPUT_BURST):
        self.share, self.burst = share, burst
        self.exempt = 0.0              # loop CPU not to charge (events)
        self._paid_at = 0.0            # time.monotonic() when debts are paid
        self._counted = time.thread_time()   # loop CPU charged up to here
        self._queue = asyncio.Lock()   # FIFO: waiters take turns in order

    async def turn(self):
        """Wait for a turn, after paying for what the loop spent since the
        last one."""
        async with self._queue:
            now = time.thread_time()
            self.charge(now - self._counted - self.exempt)
            self._counted, self.exempt = now, 0.0
            delay = self._paid_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    def charge(self, cpu):
        credit_from = time.monotonic() - self.burst / self.share
        self._paid_at = max(self._paid_at, credit_from) + \
            max(cpu, 0.0) / self.share


# -- clients ---------------------------------------------------------------------

class _Client:
    """One connection: its writer, its negotiation state and its worker."""

    def __init__(self, writer, budget):
        self.writer = writer
        self.budget = budget
        self.negotiated = False
        self.dropped = False
        self._worker = None

    def send(self, data):
        """Queue `data` (bytes); drop the client instead if its unsent
        output would exceed MAX_OUTPUT."""
        transport = self.writer.transport
        if self.dropped or transport.is_closing():
            return
        # Invariant: a client's unsent output stays within MAX_OUTPUT.
        if transport.get_write_buffer_size() + len(data) > MAX_OUTPUT:
            self.drop()
            return
        transport.write(data)

    def drop(self):
        """Disconnect now, discarding unsent output (the client does not
        read it)."""
        self.dropped = True
        self.writer.transport.abort()

    def close(self, loop):
        """Close after the unsent output is taken, within CLOSE_GRACE s."""
        transport = self.writer.transport
        if transport.is_closing() and not transport.get_write_buffer_size():
            return
        transport.close()
        if transport.get_write_buffer_size():
            loop.call_later(CLOSE_GRACE, transport.abort)

    async def sent(self, timeout):
        """Wait (at most `timeout` s) until no output is left unsent."""
        transport = self.writer.transport
        deadline = time.monotonic() + timeout
        while transport.get_write_buffer_size() and \
                not transport.is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def run(self, fn, *args):
        """fn(*args) in this client's worker thread.  Commands of one client
        run one at a time, in order; other clients have their own thread."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="nbdmirror-qmp-client")
        spent = []

        def timed():
            start = time.thread_time()
            try:
                return fn(*args)
            finally:
                spent.append(time.thread_time() - start)
        await self.budget.turn()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._worker, timed)
        finally:
            self.budget.charge(sum(spent))

    def release(self):
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)


class QMPServer:
    def __init__(self, path, dispatch):
        self.path = os.fspath(path)
        self.dispatch = dispatch
        self._clients = set()
        self._ident = None          # (st_dev, st_ino) of the socket we made
        self.address = None         # the listening socket's local name
        self._loop = None
        self._main = None
        self._thread = None
        self._budget = None
        self._ready = threading.Event()

    # -- life cycle (any thread) --------------------------------------------
    def start(self):
        """Create the socket (SocketPathError if its path is taken), then
        serve in a thread of its own."""
        sock, self._ident = bind_unix(self.path)
        self.address = sock.getsockname()   # its accepted sockets' too
        self._thread = threading.Thread(target=self._run, args=(sock,),
                                        daemon=True, name="nbdmirror-qmp")
        self._thread.start()
        self._ready.wait()

    def stop(self):
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._shutdown)
            except RuntimeError:
                pass
            self._thread.join(5)
        # Only if it is still the socket we created.
        unlink_if_same(self.path, self._ident)
        self._ident = None

    def broadcast(self, event, data):
        msg = {"event": event, "data": data, "timestamp": timestamp()}
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._send_event, msg)
            except RuntimeError:       # loop closing
                pass

    def output_stats(self):
        """(number of clients, total unsent output bytes), from any thread;
        None once the server is stopped."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return None

        async def stats():
            return (len(self._clients),
                    sum(c.writer.transport.get_write_buffer_size()
                        for c in self._clients))
        return asyncio.run_coroutine_threadsafe(stats(), loop).result(5)

    # -- the loop thread -------------------------------------------------------
    def _run(self, sock):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._budget = _Budget()
        try:
            self._main = self._loop.create_task(self._accept(sock))
            self._ready.set()
            self._loop.run_until_complete(self._main)
        finally:
            sock.close()
            self._ready.set()
            self._loop.close()

    async def _accept(self, sock):
        """Accept clients, one per turn of the budget (a client that
        connects and disconnects in a loop is input too); at the end,
        cancel every session and wait for them."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        sessions = set()
        try:
            while True:
                await self._budget.turn()
                try:
                    conn, _ = await loop.sock_accept(sock)
                except OSError:          # EMFILE and the like: back off
                    await asyncio.sleep(0.1)
                    continue
                task = loop.create_task(self._session(conn))
                sessions.add(task)
                task.add_done_callback(sessions.discard)
        except asyncio.CancelledError:
            pass
        finally:
            for task in list(sessions):
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)

    async def _session(self, conn):
        try:
            reader, writer = await asyncio.open_unix_connection(
                sock=conn, limit=READ_CHUNK)
        except OSError:
            conn.close()
            return
        await self._serve(reader, writer)

    def _shutdown(self):
        # Gracefully: a quit's reply and the job's last events still go
        # out (within CLOSE_GRACE).
        for c in list(self._clients):
            c.close(self._loop)
        self._main.cancel()

    def _send_event(self, msg):
        started = time.thread_time()
        data = encode(msg)
        for c in list(self._clients):
            if c.negotiated:
                c.send(data)
        # Events come from the job, not from clients: not charged to input.
        self._budget.exempt += time.thread_time() - started

    async def _serve(self, reader, writer):
        loop = asyncio.get_running_loop()
        budget = self._budget
        if len(self._clients) >= MAX_CLIENTS:
            # Invariant: at most MAX_CLIENTS sessions (and worker threads).
            # A client whose command still runs keeps its place.
            writer.write(encode(_error(None, "GenericError",
                                       f"Too many QMP clients (at most "
                                       f"{MAX_CLIENTS}); try again later")))
            writer.close()
            return
        client = _Client(writer, budget)
        self._clients.add(client)
        client.send(encode({"QMP": {"version": VERSION, "capabilities": []}}))
        splitter = Splitter()
        try:
            while not client.dropped and not splitter.dead:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                await budget.turn()
                for kind, value in splitter.feed(data):
                    if kind == MESSAGE:
                        await self._answer(client, value)
                    else:
                        client.send(encode(_error(None, "GenericError",
                                                  value)))
                    if client.dropped:
                        break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
            client.release()
            client.close(loop)

    async def _answer(self, client, raw):
        """Parse, check and execute one message; send its reply."""
        await client.budget.turn()
        reply, call = self._prepare(client, raw)
        action = None
        if call is not None:
            reply, action = await self._call(client, *call)
        client.send(encode(reply))
        await client.writer.drain()
        if action is not None:
            # The reply must be on the socket before the action (quit)
            # takes the server away.
            await client.sent(CLOSE_GRACE)
            await client.run(action)

    def _prepare(self, client, raw):
        """(reply, None) for a message answered here, or (None, (id, name,
        arguments)) for a command to dispatch."""
        try:
            msg = parse(raw)
        except ValueError as e:
            desc = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            return _error(None, "GenericError",
                          f"JSON parse error, {desc}"), None
        if not isinstance(msg, dict):
            return _error(None, "GenericError",
                          "QMP input must be a JSON object"), None
        mid = msg.get("id")
        name = msg.get("execute")
        if not isinstance(name, str):
            return _error(mid, "GenericError",
                          "QMP input lacks member 'execute'"
                          if name is None else
                          "QMP input member 'execute' must be a string"), None
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return _error(mid, "GenericError", "QMP input member 'arguments' "
                                               "must be an object"), None
        extra = set(msg) - {"execute", "arguments", "id"}
        if extra:
            return _error(mid, "GenericError", f"QMP input member "
                          f"'{sorted(extra)[0]}' is unexpected"), None
        if name == "qmp_capabilities":
            if client.negotiated:
                return _error(mid, "CommandNotFound",
                              "Capabilities negotiation is already complete, "
                              "command ignored"), None
            client.negotiated = True
            return _reply(mid, {}), None
        if not client.negotiated:
            return _error(mid, "CommandNotFound",
                          "Expecting capabilities negotiation with "
                          "'qmp_capabilities'"), None
        return None, (mid, name, args)

    async def _call(self, client, mid, name, args):
        """(reply, action to run after sending it, or None)."""
        try:
            result = await client.run(self.dispatch, name, args)
        except QMPError as e:
            return _error(mid, e.cls, e.desc), None
        except Exception as e:       # noqa: BLE001 - never kill the session
            return _error(mid, "GenericError", f"{type(e).__name__}: {e}"), None
        if isinstance(result, AfterReply):
            return _reply(mid, result.result), result.action
        return _reply(mid, result), None


def _reply(mid, result):
    msg = {"return": result}
    if mid is not None:
        msg["id"] = mid
    return msg


def _error(mid, cls, desc):
    msg = {"error": {"class": cls, "desc": desc}}
    if mid is not None:
        msg["id"] = mid
    return msg
