"""Sync modes (INTERFACE.md §3): `top`, `none` and `full`, end to end.

Each test runs real servers (qemu-nbd, nbdkit) and the real proxy, pivots
the guest with block-job-complete, stops the servers so the images are
consistent on disk, and then checks the bytes (qemu-img compare, qemu-io
`read -P`, checksums) and, for `top`, which qcow2 clusters the target's top
layer allocates (qemu-img map).
"""

import asyncio
import json
import os
import pathlib
import time

import pytest

from helpers import (make_image, nbd_read_all, nbdkit_server, nbdmirror,
                     qemu_img, qemu_img_compare, qemu_io, qemu_nbd,
                     qmp_execute, random_bytes, serve_args, sha256_file,
                     start_proxy, wait_event)

K = 1 << 10
M = 1 << 20
CHUNK = 64 * K              # the default granularity
CLUSTER = 64 * K            # qcow2's default cluster size
READY_TIMEOUT = 30
JOB_END_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")

# -- local helpers (candidates for helpers.py) --------------------------------

def serve_image(procs, image, sock, **kwargs):
    """qemu_nbd(), plus the qemu-nbd process, so a test can stop it early."""
    uri = qemu_nbd(procs, image, sock, **kwargs)
    return uri, procs.procs[-1]


def wait_any_event(client, names, timeout):
    """The first event whose name is in `names` (others are dropped)."""
    deadline = time.monotonic() + timeout
    seen = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            event = client.pull_event(wait=float(remaining))
        except asyncio.TimeoutError:
            continue
        if event is not None and event["event"] in names:
            return event
        seen.append(event and event["event"])
    raise AssertionError(f"none of {names} within {timeout} s; saw {seen}")


def wait_ready(client, timeout=READY_TIMEOUT):
    """The job's progress once it is ready: the BLOCK_JOB_READY event's
    data, or query-block-jobs' entry if it was ready before we listened.
    Fails at once if the job ends instead."""
    jobs = qmp_execute(client, "query-block-jobs")["return"]
    assert jobs, f"no job running; events: {client.get_events()}"
    if jobs[0]["status"] == "ready":
        return jobs[0]
    event = wait_any_event(client, ("BLOCK_JOB_READY", *JOB_END_EVENTS),
                           timeout)
    assert event["event"] == "BLOCK_JOB_READY", f"job ended: {event}"
    return event["data"]


def complete(client, job="mirror0", timeout=READY_TIMEOUT):
    """block-job-complete; return BLOCK_JOB_COMPLETED's data (no error)."""
    reply = qmp_execute(client, "block-job-complete", device=job)
    assert "return" in reply, reply
    data = wait_event(client, "BLOCK_JOB_COMPLETED", timeout)["data"]
    assert "error" not in data, data
    return data


def mirror_and_complete(procs, qmp, workdir, source, target,
                        ready_timeout=READY_TIMEOUT, **opts):
    """Run a job from `source` to `target` until ready, complete it, stop
    the proxy; return the ready progress (dict with offset and len)."""
    proxy = start_proxy(procs, source, workdir / "guest.sock",
                        workdir / "qmp.sock", target=target, **opts)
    client = qmp(proxy.control)
    ready = wait_ready(client, ready_timeout)
    complete(client)
    procs.stop(proxy.proc)
    return ready


def fill_image(path, size, byte):
    """A raw image of `size` bytes, all `byte`."""
    with open(path, "wb") as f:
        f.write(bytes([byte]) * size)
    return os.fspath(path)


def top_clusters(image):
    """qcow2 clusters that `image`'s own layer allocates (map depth 0)."""
    clusters = set()
    for e in json.loads(qemu_img("map", "--output=json", image)):
        if e["depth"] == 0:
            end = e["start"] + e["length"]
            clusters.update(range(e["start"] // CLUSTER,
                                  -(-end // CLUSTER)))
    return clusters


def qcow2_overlay(path, backing):
    qemu_img("create", "-q", "-f", "qcow2", "-b", os.fspath(backing),
             "-F", "qcow2", path)
    return os.fspath(path)


def qcow2_io(path, *cmds):
    return qemu_io(os.fspath(path), *cmds, fmt="qcow2")


# -- sync=top -----------------------------------------------------------------

BASE_SIZE = 16 * M
TOP_DATA = [(1 * M, 512 * K, 0x22), (9 * M, 64 * K, 0x33),
            (12 * M + 4 * K, 4 * K, 0x44)]     # inside one cluster
TOP_ZERO = (4 * M, 1 * M)                      # zero-written over base data
GUEST_WRITE = (14 * M, 128 * K, 0x55)          # via the proxy, after ready


@pytest.fixture
def top_chain(workdir):
    """base.qcow2 (0x11 everywhere) and top.qcow2 over it (TOP_DATA,
    TOP_ZERO, the rest unallocated); tgt-top.qcow2 over a copy of base."""
    base = workdir / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, str(BASE_SIZE))
    qcow2_io(base, f"write -P 0x11 0 {BASE_SIZE}")
    top = qcow2_overlay(workdir / "top.qcow2", base)
    qcow2_io(top, *(f"write -P {p:#x} {o} {n}" for o, n, p in TOP_DATA),
             "write -z {} {}".format(*TOP_ZERO))
    base_copy = workdir / "base-copy.qcow2"
    base_copy.write_bytes(base.read_bytes())
    tgt = qcow2_overlay(workdir / "tgt-top.qcow2", base_copy)
    return top, tgt, base_copy


def test_sync_top_copies_only_the_top_layer(workdir, procs, qmp, top_chain):
    top, tgt, base_copy = top_chain
    src_uri, src_proc = serve_image(procs, top, workdir / "src.sock",
                                    fmt="qcow2", allocation_depth=True)
    tgt_uri, tgt_proc = serve_image(procs, tgt, workdir / "tgt.sock",
                                    fmt="qcow2")
    proxy = start_proxy(procs, src_uri, workdir / "guest.sock",
                        workdir / "qmp.sock", target=tgt_uri, sync="top")
    client = qmp(proxy.control)
    ready = wait_ready(client)
    assert ready["offset"] == ready["len"]
    off, n, p = GUEST_WRITE
    qemu_io(proxy.uri, f"write -P {p:#x} {off} {n}")
    complete(client)
    for proc in (proxy.proc, src_proc, tgt_proc):
        procs.stop(proc)

    assert qemu_img_compare(top, tgt, "qcow2", "qcow2") == 0
    src_top, tgt_top = top_clusters(top), top_clusters(tgt)
    assert tgt_top, "nothing was copied into the target's top layer"
    assert tgt_top <= src_top, (
        f"target top allocates clusters the source top does not: "
        f"{sorted(tgt_top - src_top)[:10]}")
    # The zero-write hides base data on the target as on the source.
    zoff, zlen = TOP_ZERO
    qcow2_io(tgt, f"read -P 0 {zoff} {zlen}")
    qcow2_io(base_copy, f"read -P 0x11 {zoff} {zlen}")
    assert set(range(zoff // CLUSTER, (zoff + zlen) // CLUSTER)) <= tgt_top


def test_sync_top_refused_without_allocation_depth(workdir, procs):
    image = make_image(workdir / "src.img", 4 * M, seed=1)
    src_uri = qemu_nbd(procs, image, workdir / "src.sock")       # no -A
    tgt_uri = nbdkit_server(procs, workdir / "tgt.sock", "memory", "4M")
    refuse_top(workdir, src_uri, tgt_uri)


def test_sync_top_refused_for_a_raw_file_source(workdir, procs):
    image = make_image(workdir / "src.img", 4 * M, seed=1)
    tgt_uri = nbdkit_server(procs, workdir / "tgt.sock", "memory", "4M")
    refuse_top(workdir, image, tgt_uri)


def refuse_top(workdir, source, target):
    """`serve --sync top` must exit non-zero naming qemu:allocation-depth,
    before serving anything."""
    guest = workdir / "guest.sock"
    r = nbdmirror(*serve_args(source, guest, workdir / "qmp.sock", target,
                              sync="top"), timeout=20)
    assert r.returncode != 0, r
    assert "qemu:allocation-depth" in r.stderr, r.stderr
    assert not guest.exists()
    assert nbd_read_all(target) == bytes(4 * M)      # nothing written


def test_drive_mirror_top_refused_without_allocation_depth(workdir, procs,
                                                           qmp):
    image = make_image(workdir / "src.img", 4 * M, seed=1)
    src_uri = qemu_nbd(procs, image, workdir / "src.sock")       # no -A
    tgt_uri = nbdkit_server(procs, workdir / "tgt.sock", "memory", "4M")
    proxy = start_proxy(procs, src_uri, workdir / "guest.sock",
                        workdir / "qmp.sock")
    client = qmp(proxy.control)
    reply = qmp_execute(client, "drive-mirror", device="disk0",
                        target=tgt_uri, sync="top")
    assert "error" in reply, reply
    assert "qemu:allocation-depth" in reply["error"]["desc"]
    assert qmp_execute(client, "query-block-jobs")["return"] == []


# -- sync=none ----------------------------------------------------------------

NONE_SIZE = 4 * M
NONE_WRITES = [(0, 64 * K, 0x01), (1 * M, 192 * K, 0x02),
               (3 * M + 100 * K, 4 * K, 0x03)]      # not chunk-aligned


def test_sync_none_copies_only_guest_writes(workdir, procs, qmp):
    source = make_image(workdir / "src.img", NONE_SIZE, seed=7)
    target = fill_image(workdir / "tgt.img", NONE_SIZE, 0xAA)
    tgt_uri, tgt_proc = serve_image(procs, target, workdir / "tgt.sock")
    proxy = start_proxy(procs, source, workdir / "guest.sock",
                        workdir / "qmp.sock", target=tgt_uri, sync="none")
    client = qmp(proxy.control)
    ready = wait_ready(client, timeout=5)        # nothing to copy: prompt
    assert ready["offset"] == ready["len"] == 0
    qemu_io(proxy.uri, *(f"write -P {p:#x} {o} {n}"
                         for o, n, p in NONE_WRITES))
    complete(client)
    procs.stop(proxy.proc)
    procs.stop(tgt_proc)

    got = pathlib.Path(target).read_bytes()
    src = pathlib.Path(source).read_bytes()
    touched = set()
    for off, n, p in NONE_WRITES:
        assert got[off:off + n] == bytes([p]) * n, f"write at {off} lost"
        touched.update(range(off // CHUNK, -(-(off + n) // CHUNK)))
    for chunk in range(NONE_SIZE // CHUNK):
        a, b = chunk * CHUNK, (chunk + 1) * CHUNK
        if chunk in touched:
            # The rest of a written chunk may come from the source.
            assert got[a:b] == src[a:b], f"chunk {chunk} differs from source"
        else:
            assert got[a:b] == b"\xaa" * CHUNK, f"chunk {chunk} was written"


# -- sync=full ----------------------------------------------------------------

def sparse_source(path, size, data, written_zeroes):
    """A sparse raw image: random bytes at `data` [(off, len)], real zero
    bytes written at `written_zeroes` (data that reads as zero), holes
    elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (off, n) in enumerate(data):
            f.seek(off)
            f.write(random_bytes(100 + i, n))
        for off, n in written_zeroes:
            f.seek(off)
            f.write(bytes(n))
    return os.fspath(path)


# A 16 MiB source with data, holes and written zeroes (data reading as zero).
SPARSE_SIZE = 16 * M
SPARSE_DATA = [(0, 1 * M), (5 * M + 4 * K, 300 * K), (15 * M, 1 * M)]
SPARSE_ZEROES = [(8 * M, 2 * M), (5 * M + 304 * K, 4 * K)]


def serve_source(procs, workdir, image, kind):
    """The proxy's source for `image`: the file itself ("file"), or a
    qemu-nbd URI ("nbd").  Returns (source, server process or None)."""
    if kind == "file":
        return os.fspath(image), None
    return serve_image(procs, image, workdir / "src.sock")


@pytest.mark.parametrize("source_kind", [
    "file", "nbd"])
def test_sync_full_overwrites_a_junk_target(workdir, procs, qmp, source_kind):
    image = sparse_source(workdir / "src.img", SPARSE_SIZE, SPARSE_DATA,
                          SPARSE_ZEROES)
    source, src_proc = serve_source(procs, workdir, image, source_kind)
    target = make_image(workdir / "tgt.img", SPARSE_SIZE, seed=99)  # junk
    tgt_uri, tgt_proc = serve_image(procs, target, workdir / "tgt.sock")
    mirror_and_complete(procs, qmp, workdir, source, tgt_uri)
    for proc in (src_proc, tgt_proc):
        if proc:
            procs.stop(proc)
    assert qemu_img_compare(image, target) == 0
    assert sha256_file(image) == sha256_file(target)


@pytest.mark.parametrize("size, granularity", [
    (1025 * K, "4K"), (1025 * K, "64K"),     # a short last chunk
    (8 * M, "4K"), (8 * M, "64M"),           # smallest; one chunk > disk
], ids=["1025K-4K", "1025K-64K", "8M-4K", "8M-64M"])
def test_sync_full_copies_at_any_granularity(workdir, procs, qmp, size,
                                             granularity):
    source = make_image(workdir / "src.img", size, seed=3)
    target = make_image(workdir / "tgt.img", size, seed=4)
    tgt_uri, tgt_proc = serve_image(procs, target, workdir / "tgt.sock")
    ready = mirror_and_complete(procs, qmp, workdir, source, tgt_uri,
                                granularity=granularity)
    procs.stop(tgt_proc)
    assert ready["offset"] == ready["len"] == size
    assert sha256_file(source) == sha256_file(target)


def test_sync_full_zero_length_disk(workdir, procs, qmp):
    source = make_image(workdir / "src.img", 0)
    tgt_uri = nbdkit_server(procs, workdir / "tgt.sock", "memory", "0")
    proxy = start_proxy(procs, source, workdir / "guest.sock",
                        workdir / "qmp.sock", target=tgt_uri)
    client = qmp(proxy.control)
    ready = wait_ready(client, timeout=5)
    assert ready["offset"] == ready["len"] == 0
    data = complete(client)
    assert data["offset"] == data["len"] == 0
    assert qmp_execute(client, "query-block-jobs")["return"] == []
