"""Smoke test of the benchmark: `bench/run.py --quick` runs every
measurement, prints a ratio for each, and leaves nothing behind."""

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

BENCH = os.path.join(REPO, "bench", "run.py")
ROWS = ("a1", "a2", "b1", "b2", "b3", "b4", "b5", "b6", "c1", "c2", "d1",
        "d2", "d3")


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
def test_quick_bench_prints_a_ratio_for_every_measurement():
    r = subprocess.run([sys.executable, BENCH, "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=170,
                       stdin=subprocess.DEVNULL)
    workdir = re.search(r"working in (\S+)", r.stderr).group(1)
    assert not os.path.exists(workdir), "the bench left its temp dir"
    assert live_processes_mentioning(workdir) == [], "the bench left processes"
    assert r.returncode == 0, r.stdout + r.stderr
    for key in ROWS:
        # the ratio is the one figure printed with three decimals
        m = re.search(rf"^{key} .* (\d+\.\d{{3}})(?: |$)", r.stdout, re.M)
        assert m, f"no ratio for {key}:\n{r.stdout}"
        assert float(m.group(1)) > 0
