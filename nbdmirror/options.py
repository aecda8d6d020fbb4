"""The option table shared by the plugin keys, `nbdmirror serve` and drive-mirror.

One place names every option, parses its value and checks it, so that a bad
value gets the same one-line error whichever way it arrived.
"""

import dataclasses
import os
import urllib.parse

from .sizes import parse_size

SYNC_MODES = ("full", "top", "none")
COPY_MODES = ("background", "write-blocking")
ERROR_POLICIES = ("report", "ignore", "stop", "enospc")
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

MIN_GRANULARITY = 4 << 10
MAX_GRANULARITY = 64 << 20


class OptionError(ValueError):
    """A bad option value; str() is the one-line message for the user."""


def _choice(name, choices):
    def parse(value):
        if value not in choices:
            raise OptionError(
                f"{name}: {value!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _size(name):
    def parse(value):
        try:
            return parse_size(value, name)
        except ValueError as e:
            raise OptionError(str(e)) from None
    return parse


def _granularity(value):
    g = _size("granularity")(value)
    if g & (g - 1) or not MIN_GRANULARITY <= g <= MAX_GRANULARITY:
        raise OptionError(
            f"granularity: {value!r} must be a power of two from 4K to 64M")
    return g


def _buf_size(value):
    n = _size("buf-size")(value)
    if n < 4096:
        raise OptionError(f"buf-size: {value!r} is too small (at least 4K)")
    return n


def _bool(name):
    def parse(value):
        if isinstance(value, bool):
            return value
        v = str(value).lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{name}: {value!r} is not a boolean")
    return parse


def parse_nbd_uri(value, name="target"):
    """Check that `value` is an NBD URI libnbd can connect to."""
    if not isinstance(value, str) or not value:
        raise OptionError(f"{name}: expected an NBD URI")
    if not is_nbd_uri(value):
        raise OptionError(
            f"{name}: {value!r} is not an NBD URI "
            f"({', '.join(s + '://' for s in NBD_SCHEMES)})")
    return value


def is_nbd_uri(value):
    """An NBD URI as libnbd takes it (not QEMU's legacy nbd:unix:PATH)."""
    return "://" in value and \
        urllib.parse.urlsplit(value).scheme in NBD_SCHEMES


def parse_source(value):
    if not isinstance(value, str) or not value:
        raise OptionError("source: expected a file path or an NBD URI")
    if is_nbd_uri(value):
        return value
    path = os.path.abspath(value)
    if not os.path.exists(path):
        raise OptionError(f"source: {value}: no such file")
    return path


def _name(name):
    def parse(value):
        if not isinstance(value, str) or not value:
            raise OptionError(f"{name}: must be a non-empty string")
        return value
    return parse


def _path(value):
    return os.path.abspath(value)


@dataclasses.dataclass
class JobOptions:
    """What one mirror job needs; drive-mirror and start-up both build one."""
    target: str
    sync: str = "full"
    job_id: str = "mirror0"
    speed: int = 0
    granularity: int = 64 << 10
    buf_size: int = 16 << 20
    copy_mode: str = "background"
    on_source_error: str = "report"
    on_target_error: str = "report"
    target_is_zero: bool = False


# key (plugin key / QMP argument spelling) -> (dataclass field, parser)
JOB_KEYS = {
    "target": ("target", parse_nbd_uri),
    "sync": ("sync", _choice("sync", SYNC_MODES)),
    "job-id": ("job_id", _name("job-id")),
    "speed": ("speed", _size("speed")),
    "granularity": ("granularity", _granularity),
    "buf-size": ("buf_size", _buf_size),
    "copy-mode": ("copy_mode", _choice("copy-mode", COPY_MODES)),
    "on-source-error": ("on_source_error",
                        _choice("on-source-error", ERROR_POLICIES)),
    "on-target-error": ("on_target_error",
                        _choice("on-target-error", ERROR_POLICIES)),
    "target-is-zero": ("target_is_zero", _bool("target-is-zero")),
}

PROXY_KEYS = {
    "source": ("source", parse_source),
    "control": ("control", _path),
    "device": ("device", _name("device")),
    "bitmap": ("bitmap", _path),
}


@dataclasses.dataclass
class ProxyOptions:
    source: str = None
    control: str = None
    device: str = "disk0"
    bitmap: str = None
    job: dict = dataclasses.field(default_factory=dict)  # raw job keys

    def set(self, key, value):
        """Apply one plugin key=value; raise OptionError on a bad one."""
        if key in PROXY_KEYS:
            field, parse = PROXY_KEYS[key]
            setattr(self, field, parse(value))
        elif key in JOB_KEYS:
            self.job[key] = JOB_KEYS[key][1](value)
        else:
            raise OptionError(f"unknown key {key!r}")

    def check(self):
        if not self.source:
            raise OptionError("source: required (a raw image path or an NBD URI)")
        if not self.control:
            raise OptionError("control: required (path of the QMP socket)")
        if self.bitmap:
            raise OptionError("bitmap: persistent bitmaps are not supported yet")
        if self.job and "target" not in self.job:
            raise OptionError(
                f"{sorted(self.job)[0]}: job options need target=")

    def job_options(self):
        """The start-up job's options, or None when no target was given."""
        if "target" not in self.job:
            return None
        return make_job_options(self.job)


def make_job_options(args):
    """Build JobOptions from {key: value} (plugin keys or QMP arguments)."""
    kwargs = {}
    for key, value in args.items():
        if key not in JOB_KEYS:
            raise OptionError(f"unknown job option {key!r}")
        field, parse = JOB_KEYS[key]
        kwargs[field] = parse(value)
    if "target" not in kwargs:
        raise OptionError("target: required")
    return JobOptions(**kwargs)
