"""TLS on both legs, with real servers and credentials made here.

Guest leg: the proxy's nbdkit serves with --tls require (PSK on a unix
socket, X.509 with client certificates on 127.0.0.1), and qemu-io (QEMU's
own tls-creds objects), nbdinfo and libnbd attach; plain clients and
clients with the wrong credentials are refused.

Target leg: the whole mirror cycle (guest writes while copying, ready,
pivot, bytes compared) to qemu-nbd with tls-creds-psk, to nbdkit
--tls=require --tls-psk over TCP (started by drive-mirror) and to qemu-nbd
with X.509 (server and client certificates checked).  A wrong key, a server
without TLS, a CA that was not trusted, X.509 over a unix socket and a
plain URI to a TLS server are each refused, by `serve` and by drive-mirror,
with a message that says TLS, and nothing is written to the target.  The
PSK never shows in replies, events, logs or `ps`.

Only unix sockets and 127.0.0.1.
"""

import os
import random
import stat
import subprocess
import sys

import nbd
import pytest

from nbdmirror.options import (OptionError, make_job_options, parse_nbd_uri,
                               parse_source)
from helpers import (REPO, EventLog, first_difference, make_image,
                     nbd_read_all, nbd_unix_uri, nbdmirror_env, ok, qemu_io,
                     qemu_nbd, qmp_execute, random_bytes, run_tool,
                     serve_args, sha256_file, start_proxy, wait_for_socket)
from servers import AioClient, apply, plan_batch, write_file
from tlsfiles import (free_port, nbdkit_tls, pki, ps_output, psk_file,
                      psk_key, qemu_nbd_tls, qemu_psk_dir)

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
SIZE = 4 * MiB
USER = "alice"


def tls_uri(base, **params):
    """base + '?' + params, names with '-' for '_' (socket first)."""
    query = "&".join(f"{k.replace('_', '-')}={v}" for k, v in params.items())
    return f"{base}?{query}"


def start_tls_proxy(procs, src, workdir, *extra, timeout=20):
    """`serve --foreground` whose guest side may speak TLS only: ready once
    the control socket accepts (it opens after nbdkit bound the guest
    socket) and the guest socket is there; a plain NBD probe would be
    refused."""
    sock, control = workdir / "g.sock", workdir / "qmp.sock"
    args = serve_args(src, sock, control)
    proc = procs.start([sys.executable, "-m", "nbdmirror", *args, *extra],
                       name="nbdmirror", env=nbdmirror_env(), cwd=REPO)
    wait_for_socket(control, timeout, proc)
    wait_for_socket(sock, timeout, proc)
    return proc, str(sock), str(control)


def serve_refusal(procs, *args, timeout=30):
    """Run `serve --foreground ARGS`, expecting a refusal: (rc, output)."""
    proc = procs.start([sys.executable, "-m", "nbdmirror", "serve",
                        "--foreground", *map(str, args)],
                       name="nbdmirror", env=nbdmirror_env(), cwd=REPO)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve {args} still runs: it should have refused")
    return rc, procs.output(proc)


def libnbd_connect(uri):
    """A libnbd handle connected to `uri`, local-file URI parameters
    allowed (as nbdinfo does)."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    return h


def nbdinfo(uri):
    return run_tool(["nbdinfo", "--size", uri], timeout=30)


# -- guest leg -------------------------------------------------------------------

def test_guest_over_psk_serves_tls_clients_and_refuses_plain_ones(
        workdir, procs):
    src = make_image(workdir / "src.img", SIZE, seed=1)
    psk = psk_file(workdir)
    proc, sock, _ = start_tls_proxy(procs, src, workdir, "--tls", "require",
                                    "--tls-psk", psk)

    # nbdinfo and libnbd: the user goes before the host (libnbd 1.14 takes
    # the URI's tls-username= only from nbdmirror, which sets it itself).
    uri = f"nbds+unix://{USER}@/?socket={sock}&tls-psk-file={psk}"
    r = nbdinfo(uri)
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r
    h = libnbd_connect(uri)
    assert h.get_tls_negotiated()
    assert h.pread(4096, 8192) == random_bytes(1, SIZE)[8192:12288]
    h.shutdown()

    # QEMU, with its own credentials object: writes, then reads them back.
    qdir = qemu_psk_dir(workdir / "qemu-psk", psk)
    r = run_tool([
        "qemu-io", "--object",
        f"tls-creds-psk,id=tls0,dir={qdir},endpoint=client,username={USER}",
        "--image-opts",
        f"driver=raw,file.driver=nbd,file.server.type=unix,"
        f"file.server.path={sock},file.tls-creds=tls0",
        "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"])
    assert r.returncode == 0 and "Pattern verification failed" not in \
        r.stdout, r

    # Plain clients are refused: TLS is required.
    r = nbdinfo(nbd_unix_uri(sock))
    assert r.returncode != 0 and "requires TLS" in r.stderr, r
    r = run_tool(["qemu-io", "-f", "raw", nbd_unix_uri(sock), "-c",
                  "read 0 4k"])
    assert r.returncode != 0 and "TLS" in r.stdout + r.stderr, r
    # A key that is not in the proxy's file is refused too.
    other = psk_file(workdir, USER, name="other.psk")
    r = nbdinfo(f"nbds+unix://{USER}@/?socket={sock}&tls-psk-file={other}")
    assert r.returncode != 0, r

    assert proc.poll() is None, procs.output(proc)
    with open(src, "rb") as f:
        f.seek(MiB)
        assert f.read(64 << 10) == b"\x5a" * (64 << 10)


def test_guest_over_tcp_with_x509_checks_both_certificates(workdir, procs):
    src = make_image(workdir / "src.img", SIZE, seed=2)
    certs, stranger = pki(workdir, "pki"), pki(workdir, "other")
    port = free_port()
    control = workdir / "qmp.sock"
    proc = procs.start(
        [sys.executable, "-m", "nbdmirror", "serve", "--foreground",
         "--source", src, "--control", control, "--port", str(port),
         "--bind", "127.0.0.1", "--tls", "require", "--tls-certificates",
         certs, "--tls-verify-peer"],
        name="nbdmirror", env=nbdmirror_env(), cwd=REPO)
    wait_for_socket(control, 20, proc)

    # QEMU verifies the proxy's certificate against the CA and shows its
    # own (the proxy asks for it: --tls-verify-peer).
    r = run_tool([
        "qemu-io", "--object",
        f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
        "--image-opts",
        f"driver=raw,file.driver=nbd,file.server.type=inet,"
        f"file.server.host=127.0.0.1,file.server.port={port},"
        f"file.tls-creds=tls0",
        "-c", "write -P 0xa5 2M 4k", "-c", "read -P 0xa5 2M 4k"])
    assert r.returncode == 0 and "Pattern verification failed" not in \
        r.stdout, r
    r = nbdinfo(f"nbds://localhost:{port}/?tls-certificates={certs}")
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r

    # Refused: a client that trusts another CA (and shows a certificate of
    # that CA), a client without a certificate, a plain client.
    r = nbdinfo(f"nbds://localhost:{port}/?tls-certificates={stranger}")
    assert r.returncode != 0 and "certificate" in r.stderr, r
    bare = workdir / "ca-only"
    bare.mkdir()
    write_file(bare / "ca-cert.pem",
               open(os.path.join(certs, "ca-cert.pem"), "rb").read())
    r = nbdinfo(f"nbds://localhost:{port}/?tls-certificates={bare}")
    assert r.returncode != 0, r
    r = nbdinfo(f"nbd://127.0.0.1:{port}/")
    assert r.returncode != 0 and "requires TLS" in r.stderr, r
    assert proc.poll() is None, procs.output(proc)


# -- target leg: whole cycles ---------------------------------------------------------

def mirror_cycle(workdir, procs, qmp, target_uri, target_img, seed,
                 via="serve", source=None):
    """Serve a source (plain guest socket) mirroring to `target_uri`: guest
    writes while copying, ready, writes, complete, writes after the pivot.
    The source is a new image of `seed`'s bytes, or `source` (a URI whose
    export holds them).  Returns (QMP replies, events and `ps` output seen,
    the proxy's process); the target file is compared with what the guest
    wrote once the proxy stopped."""
    rng = random.Random(seed)
    src = source or make_image(workdir / "src.img", SIZE, seed=seed)
    shadow = bytearray(random_bytes(seed, SIZE))
    if via == "serve":
        proxy = start_proxy(procs, src, workdir / "g.sock",
                            workdir / "qmp.sock", target=target_uri,
                            speed="2M")
        log = EventLog(qmp(proxy.control))
    else:
        proxy = start_proxy(procs, src, workdir / "g.sock",
                            workdir / "qmp.sock")
        log = EventLog(qmp(proxy.control))
        ok(qmp_execute(log.client, "drive-mirror", device="disk0",
                       target=target_uri, sync="full", speed=2 * MiB,
                       **{"job-id": "mirror0"}))
    seen = []
    guest = AioClient(proxy.uri)
    apply(shadow, guest.run(plan_batch(rng, SIZE, 8)))
    seen.append(qmp_execute(log.client, "query-block-jobs"))
    seen.append(qmp_execute(log.client, "query-jobs"))
    log.wait("BLOCK_JOB_READY", timeout=30)
    apply(shadow, guest.run(plan_batch(rng, SIZE, 8)))
    seen.append(qmp_execute(log.client, "query-block-jobs"))
    ok(qmp_execute(log.client, "block-job-complete", device="mirror0"))
    done = log.wait("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done["data"], done
    log.wait_end()
    apply(shadow, guest.run(plan_batch(rng, SIZE, 8)))
    diff = first_difference(nbd_read_all(proxy.uri), bytes(shadow))
    assert diff is None, f"guest view after the pivot: {diff}"
    seen.append(ps_output())
    guest.close()
    log.mark()
    seen += log.events
    procs.stop(proxy.proc)
    with open(target_img, "rb") as f:
        diff = first_difference(f.read(), bytes(shadow))
    assert diff is None, f"target file: {diff}"
    return seen, proxy.proc


def assert_secret_never_shown(key_file, seen, proc, procs):
    keys = psk_key(key_file)
    assert keys and all(len(k) >= 32 for k in keys)
    text = repr(seen) + procs.output(proc)
    for k in keys:
        assert k not in text and k.upper() not in text


def test_mirror_to_qemu_nbd_over_psk_on_a_unix_socket(workdir, procs, qmp):
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    psk = psk_file(workdir)
    qdir = qemu_psk_dir(workdir / "qemu-psk", psk)
    sock = workdir / "tgt.sock"
    qemu_nbd_tls(procs, tgt_img,
                 f"tls-creds-psk,id=tls0,dir={qdir},endpoint=server",
                 sock=sock)
    uri = tls_uri("nbds+unix:///", socket=sock, tls_psk_file=psk,
                  tls_username=USER)
    seen, proc = mirror_cycle(workdir, procs, qmp, uri, tgt_img, seed=11)
    assert_secret_never_shown(psk, seen, proc, procs)


def test_drive_mirror_to_nbdkit_requiring_psk_over_tcp(workdir, procs, qmp):
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    psk = psk_file(workdir)
    port = free_port()
    nbdkit_tls(procs, tgt_img, "--tls=require", f"--tls-psk={psk}",
               port=port)
    uri = tls_uri(f"nbds://127.0.0.1:{port}/", tls_psk_file=psk,
                  tls_username=USER)
    seen, proc = mirror_cycle(workdir, procs, qmp, uri, tgt_img, seed=12,
                              via="drive-mirror")
    assert_secret_never_shown(psk, seen, proc, procs)


def test_mirror_to_qemu_nbd_with_x509_over_tcp(workdir, procs, qmp):
    """qemu-nbd's tls-creds-x509 server verifies the client too
    (verify-peer defaults to on): libnbd shows DIR/client-cert.pem."""
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    certs = pki(workdir)
    port = free_port()
    qemu_nbd_tls(procs, tgt_img,
                 f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                 port=port)
    uri = tls_uri(f"nbds://localhost:{port}/", tls_certificates=certs)
    mirror_cycle(workdir, procs, qmp, uri, tgt_img, seed=13)


def test_mirror_from_a_source_served_over_psk(workdir, procs, qmp):
    """The NBD source's connection takes the same URIs as the target's."""
    src_img = make_image(workdir / "src.img", SIZE, seed=15)
    psk = psk_file(workdir)
    qdir = qemu_psk_dir(workdir / "qemu-psk", psk)
    qemu_nbd_tls(procs, src_img,
                 f"tls-creds-psk,id=tls0,dir={qdir},endpoint=server",
                 sock=workdir / "src.sock")
    source = tls_uri("nbds+unix:///", socket=workdir / "src.sock",
                     tls_psk_file=psk, tls_username=USER)
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    target = qemu_nbd(procs, tgt_img, workdir / "tgt.sock")
    seen, proc = mirror_cycle(workdir, procs, qmp, target, tgt_img, seed=15,
                              source=source)
    assert_secret_never_shown(psk, seen, proc, procs)


# -- target leg: refusals ----------------------------------------------------------------

def refusal_case(case, workdir, procs):
    """(target URI, target image, what the message must say) for `case`."""
    tgt_img = make_image(workdir / "tgt.img", SIZE, seed=99)
    psk = psk_file(workdir)
    if case == "wrong-key":
        nbdkit_tls(procs, tgt_img, "--tls=require", f"--tls-psk={psk}",
                   sock=workdir / "tgt.sock")
        other = psk_file(workdir, USER, name="other.psk")
        uri = tls_uri("nbds+unix:///", socket=workdir / "tgt.sock",
                      tls_psk_file=other, tls_username=USER)
        return uri, tgt_img, "did not accept the pre-shared key"
    if case == "unknown-user":
        nbdkit_tls(procs, tgt_img, "--tls=require", f"--tls-psk={psk}",
                   sock=workdir / "tgt.sock")
        uri = tls_uri("nbds+unix:///", socket=workdir / "tgt.sock",
                      tls_psk_file=psk, tls_username="bob")
        return uri, tgt_img, "user bob has no key in tls-psk-file"
    if case == "server-without-tls":
        nbdkit_tls(procs, tgt_img, sock=workdir / "tgt.sock")
        uri = tls_uri("nbds+unix:///", socket=workdir / "tgt.sock",
                      tls_psk_file=psk, tls_username=USER)
        return uri, tgt_img, "the server does not offer TLS"
    if case == "plain-uri-to-tls-server":
        nbdkit_tls(procs, tgt_img, "--tls=require", f"--tls-psk={psk}",
                   sock=workdir / "tgt.sock")
        return nbd_unix_uri(workdir / "tgt.sock"), tgt_img, \
            "the server requires TLS"
    certs, stranger = pki(workdir, "pki"), pki(workdir, "other")
    if case == "untrusted-ca":
        port = free_port()
        nbdkit_tls(procs, tgt_img, "--tls=require",
                   f"--tls-certificates={certs}", port=port)
        uri = tls_uri(f"nbds://localhost:{port}/",
                      tls_certificates=stranger)
        return uri, tgt_img, "certificate is not trusted"
    if case == "certificate-for-another-host":
        port = free_port()
        elsewhere = pki(workdir, "elsewhere", host="elsewhere.example",
                        ip="192.0.2.1")
        nbdkit_tls(procs, tgt_img, "--tls=require",
                   f"--tls-certificates={elsewhere}", port=port)
        uri = tls_uri(f"nbds://localhost:{port}/",
                      tls_certificates=elsewhere)
        return uri, tgt_img, "not issued for the host name"
    if case == "no-certificate-directory":
        port = free_port()
        nbdkit_tls(procs, tgt_img, "--tls=require",
                   f"--tls-certificates={certs}", port=port)
        return f"nbds://localhost:{port}/", tgt_img, \
            "give tls-certificates=DIR"
    if case == "x509-on-a-unix-socket":
        nbdkit_tls(procs, tgt_img, "--tls=require",
                   f"--tls-certificates={certs}", sock=workdir / "tgt.sock")
        uri = tls_uri("nbds+unix:///", socket=workdir / "tgt.sock",
                      tls_certificates=certs)
        return uri, tgt_img, "cannot verify a server certificate over a " \
            "unix socket"
    raise AssertionError(case)


CASES = ["wrong-key", "unknown-user", "server-without-tls",
         "plain-uri-to-tls-server", "untrusted-ca",
         "certificate-for-another-host", "no-certificate-directory",
         "x509-on-a-unix-socket"]


@pytest.mark.parametrize("case", CASES)
def test_serve_refuses_a_target_whose_tls_fails(case, workdir, procs):
    uri, tgt_img, says = refusal_case(case, workdir, procs)
    before = sha256_file(tgt_img)
    src = make_image(workdir / "src.img", SIZE, seed=3)
    rc, out = serve_refusal(procs, "--source", src, "--socket",
                            workdir / "g.sock", "--control",
                            workdir / "qmp.sock", "--target", uri)
    lines = [l for l in out.splitlines() if l.strip()]
    assert rc != 0 and len(lines) == 1, out
    assert lines[0].startswith("nbdmirror: ") and "TLS" in lines[0] and \
        says in lines[0], lines
    assert sha256_file(tgt_img) == before


@pytest.mark.parametrize("case", CASES)
def test_drive_mirror_refuses_a_target_whose_tls_fails(case, workdir, procs,
                                                       qmp):
    uri, tgt_img, says = refusal_case(case, workdir, procs)
    before = sha256_file(tgt_img)
    src = make_image(workdir / "src.img", SIZE, seed=4)
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock")
    client = qmp(proxy.control)
    reply = qmp_execute(client, "drive-mirror", device="disk0", target=uri,
                        sync="full")
    assert "error" in reply, reply
    desc = reply["error"]["desc"]
    assert "TLS" in desc and says in desc and "\n" not in desc, desc
    assert ok(qmp_execute(client, "query-block-jobs")) == []
    # The guest is still served from the source.
    qemu_io(proxy.uri, "write -P 0x33 0 4k", "read -P 0x33 0 4k")
    assert sha256_file(tgt_img) == before


def test_unverified_x509_on_a_unix_socket_only_when_asked(workdir, procs,
                                                          qmp):
    """tls-verify-peer=false: the user's choice to accept any certificate
    where libnbd cannot check one (a unix socket)."""
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    certs = pki(workdir)
    nbdkit_tls(procs, tgt_img, "--tls=require",
               f"--tls-certificates={certs}", sock=workdir / "tgt.sock")
    uri = tls_uri("nbds+unix:///", socket=workdir / "tgt.sock",
                  tls_certificates=certs, tls_verify_peer="false")
    mirror_cycle(workdir, procs, qmp, uri, tgt_img, seed=14)


# -- security defaults ---------------------------------------------------------------

def test_proxy_files_are_not_world_writable(workdir, procs):
    src = make_image(workdir / "src.img", SIZE)
    pidfile = workdir / "proxy.pid"
    old = os.umask(0)               # the most permissive a caller can be
    try:
        proxy = start_proxy(procs, src, workdir / "g.sock",
                            workdir / "qmp.sock", pidfile=pidfile)
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(os.stat(p).st_mode)
             for p in (proxy.socket, proxy.control, pidfile)}
    assert modes[proxy.control] == 0o600, modes
    for path, mode in modes.items():
        assert not mode & 0o002, f"{path} is world-writable: {mode:o}"


def test_serve_without_socket_or_port_listens_nowhere(workdir, procs):
    src = make_image(workdir / "src.img", SIZE)
    rc, out = serve_refusal(procs, "--source", src, "--control",
                            workdir / "qmp.sock")
    assert rc == 2 and "socket, port: give one of them" in out, out
    assert not os.path.exists(workdir / "qmp.sock")


@pytest.mark.parametrize("args,says", [
    (["--tls-psk", "{psk}"], "tls-psk: needs --tls on or --tls require"),
    (["--tls-verify-peer"], "tls-verify-peer: needs --tls on"),
    (["--tls", "require"], "tls: --tls require needs --tls-certificates"),
    (["--tls", "on", "--tls-psk", "{dir}/none.psk"],
     "tls-psk: {dir}/none.psk: No such file"),
    (["--tls", "require", "--tls-certificates", "{dir}"],
     "tls-certificates: {dir}/server-cert.pem: No such file"),
    (["--tls", "on", "--tls-psk", "{psk}", "--tls-verify-peer"],
     "tls-verify-peer: needs --tls-certificates"),
    (["--tls", "sometimes"], "tls: 'sometimes' is not one of off, on, "
                             "require"),
    (["--bind", "127.0.0.1"], "bind: needs --port"),
])
def test_serve_refuses_guest_options_that_cannot_work(args, says,
                                                          workdir, procs):
    src = make_image(workdir / "src.img", SIZE)
    psk = psk_file(workdir)
    fill = dict(psk=psk, dir=workdir)
    rc, out = serve_refusal(procs, "--source", src, "--socket",
                            workdir / "g.sock", "--control",
                            workdir / "qmp.sock",
                            *(a.format(**fill) for a in args))
    assert rc == 2 and says.format(**fill) in out, out
    assert len(out.strip().splitlines()) == 1, out


# -- URIs: what is accepted before anything connects (no processes) -----------------

@pytest.mark.parametrize("uri", [
    "nbds://h/e?tls-certificates=/d",
    "nbds://h:10810/?tls-psk-file=/f&tls-username=u",
    "nbds+unix:///?socket=/s&tls-psk-file=/f&tls-username=u",
    "nbds+unix://u@/?socket=/s&tls-psk-file=/f",
    "nbds+unix://u@/?socket=/s&tls-psk-file=/f&tls-username=u",
    "nbds+unix:///?socket=/s&tls-certificates=/d&tls-verify-peer=false",
    "nbds://h/",
    "nbd+unix:///e?socket=/s",
])
def test_tls_uris_accepted(uri):
    assert parse_nbd_uri(uri) == uri
    assert parse_source(uri) == uri


@pytest.mark.parametrize("uri,says", [
    ("nbds+unix:///?socket=/s&tls-psk-file=/f",
     "tls-psk-file needs a user name: add tls-username=NAME"),
    ("nbd+unix:///?socket=/s&tls-psk-file=/f&tls-username=u",
     "tls-psk-file needs an nbds:// or nbds+unix:// URI (nbd+unix:// never "
     "uses TLS)"),
    ("nbd://h/?tls-certificates=/d", "tls-certificates needs an nbds://"),
    ("nbds://h/?tls-priority=NORMAL",
     "URI parameter 'tls-priority' is not allowed (allowed: socket, "
     "tls-certificates, tls-psk-file, tls-username, tls-verify-peer)"),
    ("nbds://h/?tls-certificates=/d&x-key-file=/etc/shadow",
     "URI parameter 'x-key-file' is not allowed"),
    ("nbd+unix:///?socket=/s;tls-psk-file=/etc/shadow",
     "';' in the URI's query"),
    ("nbds://h/?tls-certificates=/a&tls-certificates=/b",
     "URI parameter 'tls-certificates' given twice"),
    ("nbds://h/?tls-psk-file=/f&tls-username=u&tls-certificates=/d",
     "tls-psk-file and tls-certificates: give one of them"),
    ("nbds://h/?tls-verify-peer=maybe", "tls-verify-peer=maybe: expected"),
    ("nbds://bob@h/?tls-psk-file=/f&tls-username=alice",
     "two TLS user names: bob@ and tls-username=alice"),
    ("nbds://h/?tls-certificates=", "tls-certificates: empty"),
    # Decoded as libnbd decodes it: still tls-psk-file.
    ("nbds://h/?tls%2Dpsk%2Dfile=/f", "tls-psk-file needs a user name"),
])
def test_tls_uris_refused_with_one_line_naming_the_parameter(uri, says):
    for name, parse in (("target", parse_nbd_uri), ("source", parse_source)):
        with pytest.raises(OptionError) as e:
            parse(uri)
        assert str(e.value).startswith(f"{name}: ") and says in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(OptionError, match="^target: "):
        make_job_options({"target": uri})
