"""Sizes and rates: a plain number of bytes or a K/M/G/T suffix (powers of 1024)."""

import re

_SUFFIX = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])(?:i?B)?|B)?\s*$", re.IGNORECASE)


def parse_size(text, what="size"):
    """Return the number of bytes in `text` ("65536", "64K", "16M", "1GiB").

    Raises ValueError naming `what` on anything else.
    """
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a size, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{what}: must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(
            f"{what}: {text!r} is not a size (a number of bytes, "
            "optionally with a K, M, G or T suffix)")
    return int(m.group(1)) << (10 * _SUFFIX[(m.group(2) or "").upper()])


def format_size(n):
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
