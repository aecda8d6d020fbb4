"""Smoke test of the benchmark: `bench/run.py --quick` runs every
measurement, prints a median and (where there is a baseline) a ratio for
each, and leaves nothing behind."""

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

BENCH = os.path.join(REPO, "bench", "run.py")
# A: 4 pairs at the first size, 3 at the bigger one; B2: --threads 4;
# D5/D6: copy-mode auto
ROWS = ([f"A{i}" for i in range(1, 29)] + [f"B{i}" for i in range(1, 10)]
        + ["C1"] + [f"D{i}" for i in range(1, 7)]
        + [f"E{i}" for i in range(1, 9)] + ["F1", "F2"]
        + ["G1", "G2", "G3"])
NO_BASELINE = ("E1", "E5", "F2", "G3")  # peak RSS, re-copied shares


def live_processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_quick_bench_prints_every_measurement():
    r = subprocess.run([sys.executable, BENCH, "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    workdirs = re.findall(r"working in (\S+)", r.stderr)
    assert workdirs, r.stderr
    for workdir in workdirs:
        assert not os.path.exists(workdir), f"the bench left {workdir}"
        assert live_processes_mentioning(workdir) == [], \
            "the bench left processes"
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"load average \d+\.\d", r.stdout), r.stdout
    for key in ROWS:
        line = re.search(rf"^{key} .*$", r.stdout, re.M)
        assert line, f"no row {key}:\n{r.stdout}"
        # a median with its spread: "0.30 s [0.29-0.30]"
        assert re.search(r"\S+ \[\S+-\S+\]", line.group(0)), line.group(0)
        if key not in NO_BASELINE:
            # the ratio is the one figure printed with three decimals
            m = re.search(r" (\d+\.\d{3}|inf) ", line.group(0) + " ")
            assert m, f"no ratio for {key}: {line.group(0)}"
            assert float(m.group(1)) > 0
