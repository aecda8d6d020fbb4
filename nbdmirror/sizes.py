"""Sizes and rates: a plain number of bytes or a K/M/G/T suffix (powers of 1024)."""

import re

_SUFFIX = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])(?:i?B)?|B)?\s*$", re.IGNORECASE)
# More digits than any limit needs; also keeps int() away from Python's
# 4300-digit conversion limit and its own error message.
_MAX_DIGITS = 24


def to_bytes(text):
    """The number of bytes in `text` ("65536", "64K", "16M", "1GiB") or in
    a non-negative int (a JSON number from QMP).

    Raises ValueError whose message is the reason, without a name.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"expected a size, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (a number of bytes, "
                         "optionally with a K, M, G or T suffix)")
    if len(m.group(1)) > _MAX_DIGITS:
        raise ValueError(f"{text[:12]!r}... is too large "
                         f"({len(m.group(1))} digits)")
    return int(m.group(1)) << (10 * _SUFFIX[(m.group(2) or "").upper()])


def parse_size(text, what="size"):
    """to_bytes(text); a ValueError's message starts with `what: `."""
    try:
        return to_bytes(text)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def short_size(n):
    """The shortest exact spelling: 65536 -> '64K', 1 << 30 -> '1G'."""
    for exp, unit in ((4, "T"), (3, "G"), (2, "M"), (1, "K")):
        if n and n % (1 << (10 * exp)) == 0:
            return f"{n >> (10 * exp)}{unit}"
    return str(n)


def format_size(n):
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
