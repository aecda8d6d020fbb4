"""Races between guest writes and the copier, provoked on purpose.

A slow target (nbdkit's delay filter) keeps each copy request in flight for
a long time, and a tiny buf-size makes copies go one at a time, so a guest
that writes all over a small disk hits chunks whose copy is in flight, again
and again.  The rules of bitmap.py / copier.py (mark after the source write,
clear before the read, re-dirty on failure) must leave every such chunk
dirty, so the target still ends equal to what the guest wrote.
"""

import pytest

from helpers import (job_status, make_image, nbd_read_all, nbdkit_server,
                     qmp_execute, random_bytes, start_proxy, wait_event)
from test_workload import Workload, assert_equal, wait_ready

KiB, MiB = 1 << 10, 1 << 20
SIZE = 1 * MiB


def slow_target(procs, workdir, wdelay="20ms"):
    img = make_image(workdir / "tgt.img", SIZE)
    return nbdkit_server(procs, workdir / "tgt.sock", "file", img,
                         f"wdelay={wdelay}", filters=["delay"])


@pytest.mark.parametrize("seed,granularity", [(1, "4K"), (2, "64K")])
def test_guest_writes_racing_inflight_copies_are_not_lost(
        seed, granularity, workdir, procs, qmp):
    src = make_image(workdir / "src.img", SIZE, seed=seed)
    target = slow_target(procs, workdir)
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "qmp.sock",
                        target=target, granularity=granularity,
                        buf_size="64K")
    client = qmp(proxy.control)
    load = Workload(proxy.uri, seed, bytearray(random_bytes(seed, SIZE)))

    with load.running():
        load.wait_ops(200)
        assert job_status(client) == "running", "phase 1 ended too soon"
    wait_ready(client)
    with load.running():                  # and again while completing
        load.wait_ops(400)
        reply = qmp_execute(client, "block-job-complete", device="mirror0")
        assert "error" not in reply, reply
        done = wait_event(client, "BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done["data"], done

    # Chunks were copied more than once: the races did happen.
    assert done["data"]["offset"] > SIZE, done["data"]
    expected = bytes(load.shadow)
    assert_equal(nbd_read_all(target), expected, "target")
    assert_equal(nbd_read_all(proxy.uri), expected, "guest view")
