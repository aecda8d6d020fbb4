"""The QMP control server: framing, greeting, negotiation and events.

This module knows the wire protocol, not the commands: it hands each
command to `dispatch(name, arguments)` (control.py) and sends back what it
returns or the QMPError it raises.  It runs an asyncio loop in a thread of
its own; commands run one at a time per client in a worker thread, so a
slow command never stalls events to other clients.

Any thread may call broadcast(); every negotiated client receives every
event, in the order broadcast() was called.
"""

import asyncio
import codecs
import json
import os
import errno
import secrets
import socket
import stat
import threading
import time

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0},
           "package": "nbdmirror"}


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



class _Client:
    def __init__(self, writer):
        self.writer = writer
        self.negotiated = False

    def send(self, msg):
        if not self.writer.is_closing():
            self.writer.write(encode(msg))


class QMPServer:
    def __init__(self, path, dispatch):
        self.path = os.fspath(path)
        self.dispatch = dispatch
        self._clients = set()
        self._ident = None          # (st_dev, st_ino) of the socket we made
        self._loop = None
        self._server = None
        self._thread = None
        self._ready = threading.Event()

    # -- life cycle (any thread) --------------------------------------------
    def start(self):
        """Create the socket (SocketPathError if its path is taken), then
        serve in a thread of its own."""
        sock, self._ident = bind_unix(self.path)
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
        self._unlink_own_socket()

    def _unlink_own_socket(self):
        """Unlink the path only if it is still the socket we created: another
        proxy may have put its own there since."""
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        self._ident = None

    def broadcast(self, event, data):
        msg = {"event": event, "data": data, "timestamp": timestamp()}
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._send_event, msg)
            except RuntimeError:       # loop closing
                pass

    # -- the loop thread -------------------------------------------------------
    def _run(self, sock):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def main():
            self._server = await asyncio.start_unix_server(self._serve,
                                                           sock=sock)
            self._ready.set()
            try:
                await self._server.serve_forever()
            except asyncio.CancelledError:
                pass

        try:
            self._loop.run_until_complete(main())
        finally:
            self._ready.set()
            self._loop.close()

    def _shutdown(self):
        for c in list(self._clients):
            c.writer.close()
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()

    def _send_event(self, msg):
        for c in list(self._clients):
            if c.negotiated:
                c.send(msg)

    async def _serve(self, reader, writer):
        client = _Client(writer)
        self._clients.add(client)
        client.send({"QMP": {"version": VERSION, "capabilities": []}})
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parser = json.JSONDecoder()
        text = ""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                text += decoder.decode(data)
                while True:
                    text = text.lstrip()
                    if not text:
                        break
                    try:
                        msg, end = parser.raw_decode(text)
                    except json.JSONDecodeError as e:
                        if e.pos >= len(text) or _incomplete(text):
                            break             # wait for more input
                        client.send(_error(None, "GenericError",
                                           f"JSON parse error, {e.msg}"))
                        nl = text.find("\n", e.pos)
                        text = "" if nl < 0 else text[nl + 1:]
                        continue
                    text = text[end:]
                    reply, action = await self._handle(client, msg)
                    client.send(reply)
                    await writer.drain()
                    if action is not None:
                        await asyncio.get_running_loop().run_in_executor(
                            None, action)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
            writer.close()

    async def _handle(self, client, msg):
        """(reply, action to run after sending it, or None)."""
        result = await self._execute(client, msg)
        if isinstance(result, AfterReply):
            return _reply(msg.get("id"), result.result), result.action
        return result, None

    async def _execute(self, client, msg):
        if not isinstance(msg, dict):
            return _error(None, "GenericError",
                          "QMP input must be a JSON object")
        mid = msg.get("id")
        name = msg.get("execute")
        if not isinstance(name, str):
            return _error(mid, "GenericError",
                          "QMP input lacks member 'execute'"
                          if name is None else
                          "QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return _error(mid, "GenericError",
                          "QMP input member 'arguments' must be an object")
        extra = set(msg) - {"execute", "arguments", "id"}
        if extra:
            return _error(mid, "GenericError",
                          f"QMP input member '{sorted(extra)[0]}' is unexpected")
        if name == "qmp_capabilities":
            if client.negotiated:
                return _error(mid, "CommandNotFound",
                              "Capabilities negotiation is already complete, "
                              "command ignored")
            client.negotiated = True
            return _reply(mid, {})
        if not client.negotiated:
            return _error(mid, "CommandNotFound",
                          "Expecting capabilities negotiation with "
                          "'qmp_capabilities'")
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, self.dispatch, name, args)
        except QMPError as e:
            return _error(mid, e.cls, e.desc)
        except Exception as e:       # noqa: BLE001 - never kill the session
            return _error(mid, "GenericError", f"{type(e).__name__}: {e}")
        return result if isinstance(result, AfterReply) else _reply(mid, result)


def _incomplete(text):
    """True if `text` could still become valid JSON with more input: an
    unterminated object, array or string, judged by bracket depth."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                return False
        elif ch == "\n" and depth == 0:
            return False
    return depth > 0 or in_str


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
