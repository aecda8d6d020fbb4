"""Sparse-aware copying (INTERFACE.md §3, FIELD-NOTES "Block status").

Ranges that read as zeroes are not sent as data: skipped where the target
already reads as zero, written as NBD zero requests elsewhere, or as zero
buffers when the target cannot zero.  A sparse source stays sparse on a
sparse-capable target.  Checked with real allocation (st_blocks), nbdkit's
log filter (which requests reached the target) and checksums.
"""

import os
import re

import pytest

from helpers import (make_image, nbdkit_server, qemu_img_compare, qemu_io,
                     sha256_file, sha256_uri)
from test_sync_modes import (SPARSE_DATA, SPARSE_SIZE, SPARSE_ZEROES,
                             mirror_and_complete, serve_image, serve_source,
                             sparse_source)

K = 1 << 10
M = 1 << 20
G = 1 << 30


def allocated(path):
    return os.stat(path).st_blocks * 512


# -- a large sparse disk ------------------------------------------------------

BIG = 8 * G
BIG_DATA = [(i * G + i * (M + 4 * K), 4 * M) for i in range(8)]   # 32 MiB
BIG_ZEROES = [(7 * G + 512 * M, 16 * M)]        # written zeroes: data on disk


@pytest.mark.parametrize("source_kind", [
    "file", "nbd"])
@pytest.mark.parametrize("target_is_zero", [False, True],
                         ids=["probe-target", "target-is-zero"])
def test_sparse_8g_disk_stays_sparse(workdir, procs, qmp, target_is_zero,
                                     source_kind):
    image = sparse_source(workdir / "src.img", BIG, BIG_DATA, BIG_ZEROES)
    source, src_proc = serve_source(procs, workdir, image, source_kind)
    target = make_image(workdir / "tgt.img", BIG)            # all holes
    tgt_uri, tgt_proc = serve_image(procs, target, workdir / "tgt.sock")
    ready = mirror_and_complete(procs, qmp, workdir, source, tgt_uri,
                                target_is_zero=target_is_zero,
                                ready_timeout=60)
    for proc in (src_proc, tgt_proc):
        if proc:
            procs.stop(proc)

    # Progress counts the skipped zero ranges too.
    assert ready["offset"] == ready["len"] == BIG
    assert qemu_img_compare(image, target) == 0
    data = sum(n for _, n in BIG_DATA)
    assert allocated(image) >= data + sum(n for _, n in BIG_ZEROES)
    # Neither holes nor written zeroes were allocated on the target.
    assert allocated(target) <= 1.1 * data + 4 * M, (
        f"target allocates {allocated(target) / M:.1f} MiB for "
        f"{data / M:.0f} MiB of data")


# -- what reaches the target --------------------------------------------------

LOG_REQUEST = re.compile(r"connection=\d+ (Write|Zero|Trim) id=\d+ "
                         r"offset=0x([0-9a-f]+) count=0x([0-9a-f]+)")


def junk_target(procs, sock, *args, filters=()):
    """An nbdkit memory target of SPARSE_SIZE bytes, 0xcc everywhere."""
    uri = nbdkit_server(procs, sock, "memory", str(SPARSE_SIZE), *args,
                        filters=filters)
    qemu_io(uri, f"write -P 0xcc 0 {SPARSE_SIZE}")
    return uri


def zero_mibs(path):
    """Indexes of the MiBs of `path` that read as all zeroes."""
    with open(path, "rb") as f:
        return {i for i in range(SPARSE_SIZE // M) if f.read(M) == bytes(M)}


def logged_requests(log, skip):
    """[(kind, offset, count)] from nbdkit's log filter, after `skip` bytes."""
    with open(log) as f:
        f.seek(skip)
        return [(k, int(o, 16), int(n, 16))
                for k, o, n in LOG_REQUEST.findall(f.read())]


def test_zero_ranges_reach_the_target_as_zero_requests(workdir, procs, qmp):
    source = sparse_source(workdir / "src.img", SPARSE_SIZE, SPARSE_DATA,
                           SPARSE_ZEROES)
    log = workdir / "target.log"
    tgt_uri = junk_target(procs, workdir / "tgt.sock", f"logfile={log}",
                          filters=["log"])
    junk_end = os.path.getsize(log)
    mirror_and_complete(procs, qmp, workdir, source, tgt_uri)

    assert sha256_uri(tgt_uri) == sha256_file(source)
    requests = logged_requests(log, junk_end)
    zero = zero_mibs(source)
    assert zero, "the source should have all-zero MiBs"
    for kind, off, n in requests:
        if kind == "Write":
            hit = zero & set(range(off // M, -(-(off + n) // M)))
            assert not hit, f"zeroes sent as data: Write {off:#x}+{n:#x}"
    assert any(kind == "Zero" for kind, _, _ in requests)


@pytest.mark.parametrize("filters, args", [
    pytest.param(["nozero"], ["zeromode=none"], id="no-zero"),
    pytest.param(["nozero"], ["zeromode=emulate"], id="emulated-zero"),
    pytest.param(["nozero"], ["zeromode=plugin", "fastzeromode=slow"],
                 id="fast-zero-refused"),
    pytest.param(["noextents"], [], id="no-extents"),
])
def test_zero_ranges_reach_a_limited_target(workdir, procs, qmp, filters,
                                            args):
    """A target without (fast) zero support or block status still ends
    identical to a source with holes and written zeroes."""
    source = sparse_source(workdir / "src.img", SPARSE_SIZE, SPARSE_DATA,
                           SPARSE_ZEROES)
    tgt_uri = junk_target(procs, workdir / "tgt.sock", *args,
                          filters=filters)
    mirror_and_complete(procs, qmp, workdir, source, tgt_uri)
    assert sha256_uri(tgt_uri) == sha256_file(source)
