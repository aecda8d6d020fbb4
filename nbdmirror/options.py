"""The option table: every option of the proxy and of its job, in one place.

Everything that names, parses or documents an option reads OPTIONS, below:

  * `nbdmirror serve` gets one flag per row (`--NAME`), with the row's help
    text and default (cli.py);
  * the nbdkit plugin takes `NAME=VALUE` for every proxy and job row
    (ProxyOptions.set); nbdkit rows become nbdkit's own arguments (`-U`);
  * `nbdmirror start` and QMP `drive-mirror` take the job rows, under the
    same names, with the row's JSON type (control.py);
  * JobOptions, the job's settings, has one field per job row
    (NAME with `-` as `_`), with the row's default.

So adding an option is one row; its user then reads the new attribute.

A value is parsed once where it arrives: a command-line string, a plugin
key's string or a QMP JSON value all go through the row's kind, and a bad
one is refused with a one-line OptionError that starts with the option's
name (`buf-size: '2G' is out of range (4K to 1G)`).  `serve` hands the
parsed values to nbdkit in their canonical spelling (absolute paths, bytes),
where the plugin parses them again: two processes, one parse each.
"""

import dataclasses
import math
import os
import re
import urllib.parse

from . import paths, tls
from .sizes import short_size, to_bytes

PROXY = "proxy"     # a setting of the proxy: plugin key and `serve` flag
JOB = "job"         # a setting of a mirror job: also `start` and drive-mirror
NBDKIT = "nbdkit"   # an nbdkit argument that `serve` passes on

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

K, M, G = 1 << 10, 1 << 20, 1 << 30
# buf-size: the bytes the copier may have in flight, all of which may sit in
# memory at once.  QEMU bounds it only by what it can allocate at job start;
# here 1G: 64 times the 16M default, while copy speed stops growing past a
# few MiB in flight (FIELD-NOTES: 16 x 1 MiB requests already saturate, as
# does nbdcopy's 16 MiB queue), so a larger value could only cost memory.
MAX_BUF_SIZE = 1 * G
# Timeouts end up as poll()'s milliseconds, an int (at most 2^31-1 ms, ~24
# days): a million seconds keeps every one of them representable.
MAX_SECONDS = 1e6


class OptionError(ValueError):
    """A bad option value; str() is the one-line message for the user."""


# -- kinds: how a value is parsed, spelled for nbdkit, and typed in QMP ---------
#
# parse() takes a str (command line, plugin key) or a JSON value (QMP) and
# returns the value, or raises ValueError with the reason; the row puts its
# name in front.

class _Kind:
    qmp = None              # the JSON type drive-mirror accepts
    metavar = "VALUE"
    flag = False            # a bare --flag on the command line

    def parse(self, value):
        raise NotImplementedError

    def format(self, value):
        """The value as a plugin key's string; parse(format(v)) == v."""
        return str(value)

    def show(self, value):
        """The value as --help shows a default."""
        return self.format(value)


class Text(_Kind):
    qmp = str

    def __init__(self, metavar="NAME"):
        self.metavar = metavar

    def parse(self, value):
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string")
        return value


class Choice(_Kind):
    qmp = str

    def __init__(self, *choices):
        self.choices = choices
        self.metavar = "{" + ",".join(choices) + "}"

    def parse(self, value):
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of "
                             f"{', '.join(self.choices)}")
        return value


class Size(_Kind):
    """Bytes: a number with an optional K/M/G/T suffix, or a JSON int."""
    qmp = int

    def __init__(self, lo, hi, power_of_two=False, metavar="SIZE"):
        self.lo, self.hi, self.power_of_two = lo, hi, power_of_two
        self.metavar = metavar

    def parse(self, value):
        n = to_bytes(value)
        lo, hi = short_size(self.lo), short_size(self.hi)
        if self.power_of_two and n & (n - 1):
            raise ValueError(f"{value!r} is not a power of two from {lo} "
                             f"to {hi}")
        if not self.lo <= n <= self.hi:
            raise ValueError(f"{value!r} is out of range ({lo} to {hi})")
        return n


class Int(_Kind):
    qmp = int
    metavar = "N"

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def parse(self, value):
        if isinstance(value, str) and value.strip().isdigit() and \
                len(value.strip()) <= 12:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a whole number")
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{value!r} is out of range "
                             f"({self.lo} to {self.hi})")
        return value


class Seconds(_Kind):
    """A positive number of seconds (or zero, with zero=True); fractions
    allowed."""
    qmp = float
    metavar = "S"

    def __init__(self, zero=False):
        self.zero = zero

    def parse(self, value):
        try:
            if isinstance(value, bool) or len(str(value)) > 32:
                raise ValueError
            s = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number of seconds") \
                from None
        if not (math.isfinite(s) and (0 < s or self.zero and s == 0)
                and s <= MAX_SECONDS):
            least = "0" if self.zero else "more than 0"
            raise ValueError(f"{value!r} is out of range ({least}, "
                             f"at most {MAX_SECONDS:.0f})")
        return s


class Flag(_Kind):
    """On or off: a bare --flag, `key=true|false`, a JSON boolean."""
    qmp = bool
    flag = True
    _WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}

    def parse(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in self._WORDS:
            return self._WORDS[value.lower()]
        raise ValueError(f"{value!r} is not a boolean (true or false)")

    def format(self, value):
        return "true" if value else "false"

    def show(self, value):
        return "on" if value else "off"


class Path(_Kind):
    """A file path, made absolute at once (nbdkit chdirs to / later; over
    QMP, a relative path is relative to the proxy's working directory)."""
    qmp = str
    metavar = "PATH"

    def parse(self, value):
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file path")
        return os.path.abspath(value)


class NbdUri(_Kind):
    """An NBD URI, or QEMU's legacy spelling (nbd:unix:PATH[:exportname=E],
    nbd:HOST:PORT[:exportname=E]) turned into one."""
    qmp = str
    metavar = "URI"

    def parse(self, value):
        if not isinstance(value, str) or not value:
            raise ValueError("expected an NBD URI")
        value = legacy_nbd_uri(value) or value
        if not is_nbd_uri(value):
            raise ValueError(f"{value!r} is not an NBD URI ("
                             f"{', '.join(s + '://' for s in NBD_SCHEMES)})")
        tls.check_uri(value)
        return value


class Source(_Kind):
    """A raw image's path (made absolute; it must exist) or an NBD URI."""
    metavar = "SRC"

    def parse(self, value):
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file path or an NBD URI")
        if is_nbd_uri(value):
            tls.check_uri(value)
            return value
        path = os.path.abspath(value)
        if not os.path.exists(path):
            raise ValueError(f"{value}: no such file")
        return path


_LEGACY = re.compile(r"^nbd:(?:unix:(?P<path>[^:]+)|(?P<host>[^:/]+|\[[^]]+\])"
                     r":(?P<port>\d+))(?::exportname=(?P<export>.*))?$")


def legacy_nbd_uri(value):
    """The URI for QEMU's legacy `nbd:...` spelling, or None."""
    m = _LEGACY.match(value)
    if not m:
        return None
    export = urllib.parse.quote(m["export"] or "", safe="")
    if m["path"]:
        return f"nbd+unix:///{export}?socket={m['path']}"
    return f"nbd://{m['host']}:{m['port']}/{export}"


def is_nbd_uri(value):
    """An NBD URI as libnbd takes it (not QEMU's legacy nbd:unix:PATH)."""
    return isinstance(value, str) and "://" in value and \
        urllib.parse.urlsplit(value).scheme in NBD_SCHEMES


# -- rows -------------------------------------------------------------------------

OPTIONAL, REQUIRED = "optional", "required"


class Option:
    """One row.  Its name is the plugin key, the QMP argument, the `--flag`
    (with `--` in front) and, with `-` as `_`, the attribute (`field`)."""

    def __init__(self, name, kind, default, help, scope, qmp=None,
                 nbdkit=None, required=False):
        self.name, self.kind, self.help, self.scope = name, kind, help, scope
        self.field = name.replace("-", "_")
        self.flag = "--" + name
        self.key = None if scope == NBDKIT else name    # plugin key
        self.nbdkit = nbdkit        # nbdkit's own flag, for NBDKIT rows
        self.qmp = qmp              # drive-mirror: None, OPTIONAL, REQUIRED
        self.required = required    # serve and the plugin need it
        # A default is written as the user would write it ("64K") and
        # shown so in --help; the attribute holds its parsed value.
        self.default_text = default if default is None or \
            isinstance(default, str) else kind.show(default)
        self.default = None if default is None else self.parse(default)

    def parse(self, value):
        """The parsed value, or OptionError('NAME: reason')."""
        try:
            return self.kind.parse(value)
        except ValueError as e:
            raise OptionError(f"{self.name}: {e}") from None

    def format(self, value):
        return self.kind.format(value)

    def __repr__(self):
        return f"Option({self.name!r})"


def _table(*rows):
    table = {}
    for row in rows:
        assert row.name not in table, row.name
        table[row.name] = row
    return table


ERROR_POLICIES = ("report", "ignore", "stop", "enospc")

OPTIONS = _table(
    # -- the proxy ------------------------------------------------------------
    Option("source", Source(), None,
           "raw image file path, or NBD URI of the source", PROXY,
           required=True),
    Option("control", Path(), None,
           "QMP control socket (created with mode 0600)", PROXY,
           required=True),
    Option("device", Text(), "disk0",
           "the disk's name in QMP and events", PROXY),
    Option("pidfile", Path(), None,
           "write the server's process id here; an existing file is "
           "replaced only if it is a stale pid file", PROXY),
    Option("connect-timeout", Seconds(), 10,
           "seconds to wait for an NBD source or target to accept a "
           "connection", PROXY),
    Option("io-timeout", Seconds(), 30,
           "seconds one request to an NBD source or target may take", PROXY),
    # -- nbdkit: the guest-facing server ------------------------------------------
    Option("socket", Path(), None, "guest-facing unix socket", NBDKIT,
           nbdkit="-U"),
    Option("port", Int(1, 65535), None,
           "guest-facing TCP port; give --socket or --port (nothing listens "
           "on TCP unless --port is given)", NBDKIT, nbdkit="-p"),
    Option("bind", Text("ADDR"), None,
           "guest-facing TCP address (default: every address)", NBDKIT,
           nbdkit="-i"),
    Option("tls", Choice("off", "on", "require"), "off",
           "guest-facing TLS: require refuses clients that do not start "
           "TLS", NBDKIT, nbdkit="--tls"),
    Option("tls-certificates", Path(), None,
           "guest-facing TLS with X.509: a directory holding ca-cert.pem, "
           "server-cert.pem and server-key.pem", NBDKIT,
           nbdkit="--tls-certificates"),
    Option("tls-psk", Path(), None,
           "guest-facing TLS with pre-shared keys: a file of USER:HEXKEY "
           "lines (psktool)", NBDKIT, nbdkit="--tls-psk"),
    Option("tls-verify-peer", Flag(), False,
           "guest-facing X.509: clients must show a certificate signed by "
           "the CA", NBDKIT, nbdkit="--tls-verify-peer"),
    # nbdkit's default of 16 threads per connection makes Python's GIL the
    # bottleneck of guest requests; serve picks by the source's kind
    # (endpoints.Endpoint.guest_threads, README "Guest I/O").
    Option("threads", Int(1, 1024), None,
           "nbdkit worker threads per guest connection (default: 1 for a "
           "file source, 4 for an NBD source)", NBDKIT, nbdkit="-t"),
    # -- the job ------------------------------------------------------------------
    Option("target", NbdUri(), None,
           "NBD URI of the mirror target; without it no job starts until "
           "drive-mirror", JOB, qmp=REQUIRED),
    Option("sync", Choice("full", "top", "none"), "full",
           "what to copy: everything, the source's top layer, or only new "
           "writes", JOB, qmp=REQUIRED),
    Option("job-id", Text("ID"), "mirror0",
           "job id in QMP and events (drive-mirror's default: the device)", JOB,
           qmp=OPTIONAL),
    Option("speed", Size(0, (1 << 63) - 1, metavar="RATE"), 0,
           "background copy limit in bytes/s, 0 = none", JOB, qmp=OPTIONAL),
    Option("granularity", Size(4 * K, 64 * M, power_of_two=True), "64K",
           "dirty-tracking unit, a power of two from 4K to 64M", JOB,
           qmp=OPTIONAL),
    Option("buf-size", Size(4 * K, MAX_BUF_SIZE), "16M",
           f"bytes in flight source to target, at most; up to "
           f"{short_size(MAX_BUF_SIZE)}", JOB, qmp=OPTIONAL),
    Option("copy-mode", Choice("background", "write-blocking", "auto"),
           "background",
           "write-blocking: guest writes reach the target before they "
           "complete; auto: background until the backlog stops shrinking "
           "for auto-switch-after seconds, then write-blocking", JOB,
           qmp=OPTIONAL),
    Option("auto-switch-after", Seconds(), 5,
           "copy-mode auto: seconds without a smaller backlog before "
           "switching to write-blocking", JOB, qmp=OPTIONAL),
    Option("on-source-error", Choice(*ERROR_POLICIES), "report",
           "what a source read error does to the job", JOB, qmp=OPTIONAL),
    Option("on-target-error", Choice(*ERROR_POLICIES), "report",
           "what a target write error does to the job", JOB, qmp=OPTIONAL),
    Option("reconnect-delay", Seconds(zero=True), 30,
           "seconds to keep reconnecting to a lost target before "
           "on-target-error applies (0: at once)", JOB, qmp=OPTIONAL),
    Option("target-is-zero", Flag(), False,
           "the target reads as zeroes before the job", JOB, qmp=OPTIONAL),
    Option("bitmap", Path(), None,
           "persistent dirty bitmap file: the job survives a crash or "
           "restart of the proxy, and resumes from it", JOB, qmp=OPTIONAL),
    Option("bitmap-discard", Flag(), False,
           "start over (full copy) instead of refusing a bitmap file that "
           "does not match, is corrupt, or whose job ended", JOB,
           qmp=OPTIONAL),
    Option("auto-finalize", Flag(), True,
           "off: a completed job waits in `pending` (guest I/O held) for "
           "job-finalize, as QEMU's", JOB, qmp=OPTIONAL),
    Option("auto-dismiss", Flag(), True,
           "off: an ended job waits in `concluded` for job-dismiss, as "
           "QEMU's", JOB, qmp=OPTIONAL),
)


FIELDS = {r.field: r for r in OPTIONS.values()}     # by attribute name


def rows(*scopes):
    """The rows of the given scopes, in table order."""
    return [r for r in OPTIONS.values() if r.scope in scopes]


def parse_nbd_uri(value, name="target"):
    """Check that `value` is an NBD URI libnbd can connect to."""
    try:
        return NbdUri().parse(value)
    except ValueError as e:
        raise OptionError(f"{name}: {e}") from None


def parse_source(value):
    return OPTIONS["source"].parse(value)


# -- the job's options ----------------------------------------------------------------

JobOptions = dataclasses.make_dataclass(
    "JobOptions",
    [(r.field, object) for r in rows(JOB)
     if r.default is None and r.qmp == REQUIRED] +
    [(r.field, object, dataclasses.field(default=r.default))
     for r in rows(JOB) if r.default is not None or r.qmp != REQUIRED])
JobOptions.__module__ = __name__
JobOptions.__doc__ = (
    "What one mirror job needs; drive-mirror and start-up both build one. "
    "One field per job row of OPTIONS: "
    + ", ".join(r.field for r in rows(JOB)) + ".")


def make_job_options(args):
    """JobOptions from {name: value}: plugin keys, QMP arguments or command
    line strings, each parsed by its row; the rest take their defaults."""
    kwargs = {}
    for name, value in args.items():
        row = OPTIONS.get(name)
        if row is None or row.scope != JOB:
            raise OptionError(f"unknown job option {name!r}")
        kwargs[row.field] = row.parse(value)
    return _job_options(kwargs)


def _job_options(fields):
    if fields.get("target") is None:
        raise OptionError("target: required")
    return JobOptions(**fields)


def qmp_arguments(job):
    """drive-mirror's arguments for JobOptions `job` (values unchanged)."""
    return {r.name: getattr(job, r.field) for r in rows(JOB)
            if r.qmp and getattr(job, r.field) is not None}


# -- the proxy's options (the plugin's keys) -------------------------------------------

class ProxyOptions:
    """The proxy rows' values as attributes (source, control, device,
    pidfile, connect_timeout, io_timeout, ...), and the job rows' values
    that were given (bitmap among them), in `job` by name."""

    def __init__(self, **fields):
        for row in rows(PROXY):
            setattr(self, row.field, row.default)
        self.job = {}
        for field, value in fields.items():
            if field not in _PROXY_FIELDS:
                raise TypeError(f"ProxyOptions has no option {field!r}")
            setattr(self, field, value)

    def set(self, key, value):
        """Apply one plugin key=value; raise OptionError on a bad one."""
        row = OPTIONS.get(key)
        if row is None or row.key is None:
            raise OptionError(f"unknown key {key!r}")
        parsed = row.parse(value)
        if row.scope == PROXY:
            setattr(self, row.field, parsed)
        else:
            self.job[key] = parsed

    def check(self, guest_socket=None):
        """Refuse missing options and paths the proxy must not use (see
        paths.py).  `guest_socket` is nbdkit's -U path when known.  Creates,
        removes and writes nothing."""
        for row in rows(PROXY):
            if row.required and getattr(self, row.field) is None:
                raise OptionError(f"{row.name}: required ({row.help})")
        if self.job.get("bitmap-discard") and not self.job.get("bitmap"):
            raise OptionError("bitmap-discard: needs bitmap=")
        if self.job and "target" not in self.job:
            raise OptionError(f"{next(iter(self.job))}: job options need "
                              "target=")
        try:
            paths.check(self.paths(guest_socket), self.inputs())
        except paths.PathError as e:
            raise OptionError(str(e)) from None

    def paths(self, guest_socket=None):
        """The files the proxy creates: [(option name, path, kind)]."""
        out = [("socket", guest_socket, paths.SOCKET),
               ("control", self.control, paths.SOCKET),
               ("pidfile", self.pidfile, paths.PIDFILE)]
        return [p for p in out if p[1] is not None]

    def inputs(self):
        """The files the proxy uses and must not replace: [(name, path)]."""
        out = [("source", paths.local_path(self.source)),
               ("bitmap", self.job.get("bitmap")),
               ("target", paths.local_path(self.job.get("target")))]
        return [p for p in out if p[1] is not None]

    def job_options(self):
        """The start-up job's options, or None when no target was given."""
        if "target" not in self.job:
            return None
        return _job_options({OPTIONS[k].field: v for k, v in self.job.items()})

    def plugin_args(self):
        """["key=value", ...]: what was set, spelled for nbdkit's command
        line, so that the plugin ends up with the same options."""
        out = []
        for row in rows(PROXY, JOB):
            value = getattr(self, row.field) if row.scope == PROXY else \
                self.job.get(row.name)
            if value is not None and (row.scope == JOB or
                                      value != row.default):
                out.append(f"{row.key}={row.format(value)}")
        return out

    def __repr__(self):
        given = {r.field: getattr(self, r.field) for r in rows(PROXY)}
        return f"ProxyOptions({given}, job={self.job})"


_PROXY_FIELDS = {r.field for r in rows(PROXY)}
