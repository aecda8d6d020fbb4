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
import socket
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


def timestamp():
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}


def encode(msg):
    return json.dumps(msg).encode() + b"\r\n"


def bind_unix(path, mode=0o600):
    """A listening unix socket at `path`, created with `mode` from the
    start: bound under a temporary name, chmod-ed, then renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    for p in (tmp,):
        if os.path.exists(p):
            os.unlink(p)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


class _Client:
    def __init__(self, writer):
        self.writer = writer
        self.negotiated = False

    def send(self, msg):
        if not self.writer.is_closing():
            self.writer.write(encode(msg))


class QMPServer:
    def __init__(self, path, dispatch):
        self.path = path
        self.dispatch = dispatch
        self._clients = set()
        self._loop = None
        self._server = None
        self._thread = None
        self._ready = threading.Event()

    # -- life cycle (any thread) --------------------------------------------
    def start(self):
        sock = bind_unix(self.path)
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
        try:
            os.unlink(self.path)
        except OSError:
            pass

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
