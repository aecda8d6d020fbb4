"""TLS on the NBD connections the proxy makes (target, NBD source) and the
checks on the guest-facing server's TLS options.

What a URI may ask for (INTERFACE.md §2), as libnbd spells it:

    nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR
    nbds+unix:///EXPORT?socket=PATH&tls-psk-file=FILE&tls-username=NAME

  * `nbds` (and `nbds+unix`) require TLS: libnbd sets TLS_REQUIRE for them,
    so a server without TLS is refused, never used in plain text.
  * Query parameters: socket, tls-certificates, tls-psk-file,
    tls-username, tls-verify-peer; any other is refused.  Two of them name
    local files, which libnbd reads only after set_uri_allow_local_file:
    the proxy allows that (its URIs come from its command line or its
    0600 control socket), and the allow-list keeps it to those two.
    Parameters are split as libnbd splits them ('&'; ';' is refused, since
    libnbd would split there too) and percent-decoded as libnbd does.
  * tls-* parameters on `nbd://` are refused: libnbd would ignore them and
    talk in plain text.
  * The TLS user name comes from tls-username=NAME or NAME@ in the
    authority.  libnbd 1.14 understands only the latter (and otherwise
    falls back to getlogin(), which fails in a daemon): configure() sets
    it on the handle itself.  A PSK without a user name is refused.
  * The server's certificate is verified (libnbd's tls-verify-peer, on by
    default) against DIR/ca-cert.pem and the host name connected to.
    libnbd 1.14 does not verify it at all in two cases, measured: over a
    unix socket (there is no host name; QEMU refuses the same set-up: "No
    hostname for certificate validation"), and when no certificate
    directory is found (it then loads the system's trust store but never
    asks gnutls to check against it).  So X.509 over `nbds+unix`, and
    X.509 without tls-certificates, are refused unless the URI says
    tls-verify-peer=false.  PSK authenticates both sides by the key.

Secrets stay in files: nothing here reads a PSK file (libnbd does), and
messages name parameters and paths, never a key.

explain() turns libnbd's TLS errors into a reason that says it is TLS and
what is likely wrong (as measured with libnbd 1.14 and gnutls 3.7).
"""

import os
import urllib.parse

import nbd

TLS_SCHEMES = ("nbds", "nbds+unix")
PARAMS = ("socket", "tls-certificates", "tls-psk-file", "tls-username",
          "tls-verify-peer")
LOCAL_FILES = ("tls-certificates", "tls-psk-file")      # what libnbd reads
_BOOLEANS = {"true": True, "on": True, "yes": True, "1": True,
             "false": False, "off": False, "no": False, "0": False}


class TlsError(nbd.Error):
    """A TLS setting that cannot work; raised while the handle is set up,
    so that the connection's own error path reports it."""

    def __init__(self, reason):
        super().__init__(f"TLS: {reason}", None)


class Settings:
    """What a URI asks of TLS: tls (bool), unix (bool), psk_file,
    certificates, username, verify_peer (bool)."""

    def __init__(self, uri):
        url = urllib.parse.urlsplit(uri)
        params = query_params(url.query)
        self.tls = url.scheme in TLS_SCHEMES
        self.unix = url.scheme.endswith("+unix")
        self.psk_file = params.get("tls-psk-file")
        self.certificates = params.get("tls-certificates")
        named = params.get("tls-username")
        user = urllib.parse.unquote(url.username) if url.username else None
        if named is not None and user is not None and named != user:
            raise ValueError(f"two TLS user names: {user}@ and "
                             f"tls-username={named}")
        self.username = named if named is not None else user
        verify = params.get("tls-verify-peer", "true")
        if verify.lower() not in _BOOLEANS:
            raise ValueError(f"tls-verify-peer={verify}: expected true or "
                             "false")
        self.verify_peer = _BOOLEANS[verify.lower()]
        tls_params = [p for p in params if p.startswith("tls-")]
        if tls_params and not self.tls:
            raise ValueError(
                f"{tls_params[0]} needs an nbds:// or nbds+unix:// URI "
                f"({url.scheme}:// never uses TLS)")
        for name in ("tls-certificates", "tls-psk-file", "tls-username"):
            if params.get(name) == "":
                raise ValueError(f"{name}: empty")
        if self.psk_file and self.certificates:
            raise ValueError("tls-psk-file and tls-certificates: give one "
                             "of them")
        if self.psk_file and not self.username:
            raise ValueError("tls-psk-file needs a user name: add "
                             "tls-username=NAME")

    @property
    def kind(self):
        return "psk" if self.psk_file else "x509"


def query_params(query):
    """{name: value} of a URI's query, split and decoded as libnbd does;
    ValueError for a parameter not in PARAMS, a repeated one, or ';'."""
    if ";" in query:
        raise ValueError("';' in the URI's query: separate parameters "
                         "with '&'")
    out = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = urllib.parse.unquote(name)
        if name not in PARAMS:
            raise ValueError(f"URI parameter {name!r} is not allowed "
                             f"(allowed: {', '.join(PARAMS)})")
        if name in out:
            raise ValueError(f"URI parameter {name!r} given twice")
        out[name] = urllib.parse.unquote(value)
    return out


def check_uri(uri):
    """Raise ValueError (a one-line reason) for a URI whose TLS or local
    file parameters the proxy refuses; see the module docstring."""
    Settings(uri)


def configure(h, uri):
    """Set up handle `h` for `uri` before aio_connect_uri.  Raises
    TlsError (an nbd.Error) for what cannot work: a missing file, X.509 over
    a unix socket with verification on."""
    try:
        s = Settings(uri)
    except ValueError as e:
        raise TlsError(str(e)) from None
    if not s.tls:
        return
    # Only the two parameters above can name a file: query_params refused
    # every other one.
    h.set_uri_allow_local_file(True)
    if s.psk_file:
        if not os.access(s.psk_file, os.R_OK):
            raise TlsError(f"tls-psk-file {s.psk_file}: "
                           f"{_why_unreadable(s.psk_file)}")
    elif s.certificates:
        ca = os.path.join(s.certificates, "ca-cert.pem")
        if not os.access(ca, os.R_OK):
            # libnbd would quietly use the system's trust store instead.
            raise TlsError(f"tls-certificates: {ca}: {_why_unreadable(ca)}")
    if s.username:
        h.set_tls_username(s.username)
    h.set_tls_verify_peer(s.verify_peer)
    if s.kind == "x509" and s.verify_peer and s.unix:
        raise TlsError(
            "libnbd cannot verify a server certificate over a unix socket "
            "(there is no host name to check it against); use nbds://HOST, "
            "a pre-shared key (tls-psk-file), or tls-verify-peer=false to "
            "accept the server's certificate unchecked")
    if s.kind == "x509" and s.verify_peer and not s.certificates:
        raise TlsError(
            "give tls-certificates=DIR (DIR/ca-cert.pem: the CA that signed "
            "the server's certificate): without it libnbd falls back to the "
            "system's trust store and does not check the server's "
            "certificate at all; or tls-verify-peer=false to accept it "
            "unchecked")


def _why_unreadable(path):
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return e.strerror
    return "cannot be read"


def explain(uri, reason):
    """`reason` (libnbd's error, without the nbd_*: prefix) reworded when
    it is about TLS; else unchanged."""
    try:
        s = Settings(uri)
    except ValueError:
        return reason
    if reason.startswith("TLS: "):
        return reason
    if "server requires TLS encryption first" in reason:
        return ("TLS: the server requires TLS: use an nbds:// or "
                "nbds+unix:// URI with tls-psk-file or tls-certificates")
    if not s.tls:
        return reason
    if "server refused TLS" in reason:
        return ("TLS: the server does not offer TLS (an nbds URI never "
                "falls back to plain text)")
    if "was not found in PSK file" in reason:
        return (f"TLS: user {s.username} has no key in tls-psk-file "
                f"{s.psk_file}")
    if "getlogin" in reason:
        return "TLS: no user name: add tls-username=NAME"
    if "gnutls" not in reason:
        return reason
    detail = reason.split(": ", 1)[-1]
    if "certificate verification" in detail:
        trust = f"{s.certificates}/ca-cert.pem" if s.certificates \
            else "the system's trust store (or ~/.pki/libnbd)"
        return ("TLS: the server's certificate is not trusted: not signed "
                f"by a CA in {trust}, or not issued for the host name "
                f"connected to ({detail})")
    if s.kind == "psk":
        return ("TLS: handshake failed: the server did not accept the "
                f"pre-shared key of user {s.username} (wrong key, or the "
                f"server does not use PSK) ({detail})")
    if "Insufficient credentials" in detail:
        return ("TLS: handshake failed: the server asks for credentials "
                f"this URI does not give (a pre-shared key?) ({detail})")
    where = f" in {s.certificates}" if s.certificates else ""
    return ("TLS: handshake failed: the server refused the connection (does "
            "it require a client certificate, client-cert.pem and "
            f"client-key.pem{where}, or a pre-shared key?) ({detail})")


# -- the guest-facing server (nbdkit's own TLS) ---------------------------------

def check_guest(mode, certificates=None, psk=None, verify_peer=False):
    """Raise ValueError ('OPTION: reason') unless `serve`'s guest-facing TLS
    options (nbdkit's --tls, --tls-certificates, --tls-psk,
    --tls-verify-peer) make sense together and their files are there."""
    given = [name for name, value in (("tls-certificates", certificates),
                                      ("tls-psk", psk),
                                      ("tls-verify-peer", verify_peer))
             if value]
    if mode == "off":
        if given:
            raise ValueError(f"{given[0]}: needs --tls on or --tls require")
        return
    if not certificates and not psk:
        raise ValueError(f"tls: --tls {mode} needs --tls-certificates DIR "
                         "or --tls-psk FILE")
    if verify_peer and not certificates:
        raise ValueError("tls-verify-peer: needs --tls-certificates DIR "
                         "(it checks client certificates)")
    if psk and not os.access(psk, os.R_OK):
        raise ValueError(f"tls-psk: {psk}: {_why_unreadable(psk)}")
    if certificates:
        needed = ["server-cert.pem", "server-key.pem"] + \
            (["ca-cert.pem"] if verify_peer else [])
        for name in needed:
            path = os.path.join(certificates, name)
            if not os.access(path, os.R_OK):
                raise ValueError(f"tls-certificates: {path}: "
                                 f"{_why_unreadable(path)}")
