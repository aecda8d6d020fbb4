"""The benchmark's statistics and table: the one place that turns samples
into figures.

A row holds the samples of nbdmirror (this checkout), of a baseline and,
with --compare, of the other checkout.  Every figure printed is the
MEDIAN of a side's samples with its spread [min-max]; a ratio is the
ratio of two medians.  A sample of `inf` means "did not finish within
the cap" (e.g. a job that did not converge).
"""

import math
import statistics
from dataclasses import dataclass, field


def median(samples):
    return statistics.median(samples) if samples else None


def ratio(a, b):
    """median(a) / median(b), or None when either side has no figure."""
    ma, mb = median(a), median(b)
    if ma is None or mb is None or mb == 0 or math.isinf(mb):
        return None
    return ma / mb


@dataclass
class Aim:
    """What the project aims at: `ratio` (nbdmirror / baseline) or
    `value` (nbdmirror's own median) `op` (<= or >=) `limit`."""
    op: str
    limit: float
    of: str = "ratio"

    def met(self, row):
        x = row.ratio if self.of == "ratio" else median(row.ours)
        if x is None:
            return None
        return x <= self.limit if self.op == "<=" else x >= self.limit

    def text(self, unit):
        if self.of == "ratio":
            return f"{self.op} {self.limit:g}"
        return f"{self.op} {self.limit:g} {unit}"


@dataclass
class Row:
    key: str
    what: str
    unit: str = "s"          # s, ms, IOPS, MB/s, MiB, %
    base_name: str = ""      # what the baseline is ("nbdcopy", "QEMU", ...)
    aim: Aim = None
    ours: list = field(default_factory=list)     # nbdmirror, this checkout
    base: list = field(default_factory=list)     # the baseline
    before: list = None      # the --compare checkout (None: not compared)
    error: str = None
    notes: list = field(default_factory=list)

    @property
    def ratio(self):
        return ratio(self.ours, self.base)

    @property
    def verdict(self):
        if self.error:
            return "ERROR"
        if self.aim is None:
            return ""
        met = self.aim.met(self)
        return "" if met is None else ("ok" if met else "MISS")

    def note(self, text):
        self.notes.append(text)


# -- formatting ------------------------------------------------------------

def fmt(v, unit):
    if v is None:
        return "-"
    if math.isinf(v):
        return "DNC"         # did not converge / finish within the cap
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k"
    if unit == "MB/s":
        return f"{v:.0f} MB/s"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    if unit == "%":
        return f"{v:.2f} %"
    return f"{v:g} {unit}"


def fmt_bare(v, unit):
    """A number without its unit (for the spread)."""
    text = fmt(v, unit)
    return text.rsplit(" ", 1)[0] if " " in text else text


def summary(samples, unit):
    """'median [min-max]' of one side."""
    if not samples:
        return "-"
    m = fmt(median(samples), unit)
    if len(samples) == 1:
        return m
    return (f"{m} [{fmt_bare(min(samples), unit)}-"
            f"{fmt_bare(max(samples), unit)}]")


def fmt_ratio(r):
    return "-" if r is None else f"{r:.3f}"


def print_table(rows, title, compare=False, out=print):
    """The table of medians, then every row's samples and notes."""
    out()
    out(title)
    w = max([len(r.what) for r in rows] + [20])
    bw = max([len(r.base_name) for r in rows] + [8])
    cols = [f"{'':4}", f"{'measurement':{w}}", f"{'nbdmirror':22}"]
    if compare:
        cols += [f"{'before':22}", f"{'after/before':>12}"]
    cols += [f"{'baseline':{bw}}", f"{'':22}", f"{'ratio':>6}", f"{'aim':11}",
             "     "]
    head = " ".join(cols)
    out(head)
    out("-" * len(head))
    for r in rows:
        cols = [f"{r.key:4}", f"{r.what:{w}}",
                f"{summary(r.ours, r.unit):22}"]
        if compare:
            before = summary(r.before, r.unit) if r.before is not None \
                else "(not run)"
            cols += [f"{before:22}",
                     f"{fmt_ratio(ratio(r.ours, r.before or [])):>12}"]
        aim = r.aim.text(r.unit) if r.aim else ""
        cols += [f"{r.base_name:{bw}}", f"{summary(r.base, r.unit):22}",
                 f"{fmt_ratio(r.ratio):>6}", f"{aim:11}", f"{r.verdict:5}"]
        out(" ".join(cols).rstrip())
    out()
    for r in rows:
        if r.error:
            out(f"{r.key} error: {r.error}")
        if not r.ours:
            continue
        runs = f"{r.key} runs: nbdmirror [{samples_text(r.ours, r.unit)}]"
        if r.before is not None:
            runs += f"; before [{samples_text(r.before, r.unit)}]"
        if r.base:
            runs += f"; {r.base_name} [{samples_text(r.base, r.unit)}]"
        out(runs)
        for n in r.notes:
            out(f"{'':5}{n}")


def samples_text(samples, unit):
    return ", ".join(fmt(x, unit) for x in samples)
