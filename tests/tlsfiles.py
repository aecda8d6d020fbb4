"""TLS credentials made in the test, with gnutls-bin's tools (as a user
would make them), and servers that use them.

    psk_file(dir, user)     psktool: a file of `user:hexkey` lines
    qemu_psk_dir(dir, psk)  QEMU's tls-creds-psk dir: DIR/keys.psk
    pki(dir, name)          certtool: a CA, a server certificate for
                            localhost / 127.0.0.1 and a client certificate,
                            laid out as nbdkit, libnbd and QEMU read them
    free_port()             a TCP port on 127.0.0.1 nobody listens on now
    nbdkit_tls / qemu_nbd_tls   TLS servers over a raw image

Every tool run has a timeout; servers go through the `procs` registry.
"""

import os
import socket
import subprocess
import time

from helpers import HarnessError, run_tool
from servers import Target, wait_listening

TOOL_TIMEOUT = 60


def _run(args, cwd=None):
    r = subprocess.run(args, capture_output=True, text=True, cwd=cwd,
                       timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise HarnessError(f"{args[0]} exited {r.returncode}: "
                           f"{r.stdout}{r.stderr}")
    return r.stdout


def psk_file(folder, user="alice", name="keys.psk"):
    """A new PSK file with one random key for `user`; returns its path."""
    path = os.path.join(os.fspath(folder), name)
    _run(["psktool", "-u", user, "-p", path])
    return path


def psk_key(path):
    """The hex key(s) in a PSK file: what must never show anywhere."""
    with open(path) as f:
        return [line.strip().split(":", 1)[1] for line in f if ":" in line]


def qemu_psk_dir(folder, psk):
    """A directory for QEMU's tls-creds-psk: it reads DIR/keys.psk."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(psk, "rb") as src, \
            open(os.path.join(folder, "keys.psk"), "wb") as dst:
        dst.write(src.read())
    return folder


def _template(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def pki(folder, name="pki", host="localhost", ip="127.0.0.1"):
    """A CA and, signed by it, a server certificate (for `host` and `ip`)
    and a client certificate, in folder/name: ca-cert.pem, server-cert.pem,
    server-key.pem, client-cert.pem, client-key.pem (the names nbdkit,
    libnbd and QEMU look for).  Returns that directory."""
    d = os.path.join(os.fspath(folder), name)
    os.makedirs(d)
    t = os.path.join(d, "t")
    os.makedirs(t)

    def key(what):
        path = os.path.join(d, f"{what}-key.pem")
        _run(["certtool", "--generate-privkey", "--outfile", path])
        return path

    ca_key = key("ca")
    _run(["certtool", "--generate-self-signed", "--load-privkey", ca_key,
          "--template", _template(os.path.join(t, "ca"), [
              f"cn = nbdmirror test CA {name}", "ca", "cert_signing_key",
              "expiration_days = 2"]),
          "--outfile", os.path.join(d, "ca-cert.pem")])
    for who, lines in (
            ("server", [f"cn = {host}", f"dns_name = {host}",
                        f"ip_address = {ip}", "tls_www_server"]),
            ("client", ["cn = nbdmirror-client", "tls_www_client"])):
        _run(["certtool", "--generate-certificate",
              "--load-ca-certificate", os.path.join(d, "ca-cert.pem"),
              "--load-ca-privkey", ca_key, "--load-privkey", key(who),
              "--template", _template(os.path.join(t, who), lines + [
                  "encryption_key", "signing_key", "expiration_days = 2"]),
              "--outfile", os.path.join(d, f"{who}-cert.pem")])
    os.unlink(ca_key)           # no one signs anything else with it
    return d


def free_port():
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port, proc, timeout=10):
    """Poll until 127.0.0.1:port accepts a connection (nbdkit and qemu-nbd
    log nothing for a bare connect and close)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise HarnessError(f"{proc.name} exited {proc.returncode} before "
                               f"listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise HarnessError(f"nothing listens on 127.0.0.1:{port} after "
                               f"{timeout} s")
        time.sleep(0.02)


def nbdkit_tls(procs, image, *tls, sock=None, port=None):
    """nbdkit serving raw `image` with the given TLS flags
    (e.g. "--tls=require", "--tls-psk=FILE"), on unix socket `sock` or on
    127.0.0.1:`port`.  Returns a servers.Target (uri: plain nbd://, for
    reference only; TLS URIs are the test's to build)."""
    image = os.path.abspath(os.fspath(image))
    where = ["-U", os.path.abspath(os.fspath(sock))] if sock else \
        ["-i", "127.0.0.1", "-p", str(port)]
    proc = procs.start(["nbdkit", "-f", "--exit-with-parent", *where, *tls,
                        "file", image], name="nbdkit")
    if sock:
        wait_listening(os.path.abspath(os.fspath(sock)), proc)
    else:
        wait_tcp(port, proc)
    return Target("nbdkit-tls", None, sock, image, proc)


def qemu_nbd_tls(procs, image, creds_object, sock=None, port=None):
    """qemu-nbd serving raw `image`, persistent, with `--object
    creds_object` (id=tls0) and --tls-creds tls0; on `sock` or
    127.0.0.1:`port`."""
    image = os.path.abspath(os.fspath(image))
    where = ["-k", os.path.abspath(os.fspath(sock))] if sock else \
        ["-b", "127.0.0.1", "-p", str(port)]
    proc = procs.start(["qemu-nbd", "-f", "raw", "-t", *where,
                        "--object", creds_object, "--tls-creds", "tls0",
                        image], name="qemu-nbd")
    if sock:
        wait_listening(os.path.abspath(os.fspath(sock)), proc)
    else:
        wait_tcp(port, proc)
    return Target("qemu-nbd-tls", None, sock, image, proc)


def ps_output():
    """Every process's command line, as `ps` shows them."""
    return run_tool(["ps", "-eww", "-o", "args="]).stdout
