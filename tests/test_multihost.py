"""Across hosts: guest, proxy and target each in a network namespace of
their own, joined by veth pairs; the guest attaches over TCP, the proxy
mirrors over TCP with TLS (a pre-shared key), and the link to the target
is cut mid-copy and after ready.  The job must recover, copy again only what was dirty or in flight,
and pivot to a target that holds exactly what the guest wrote.
"""

import re
import subprocess
import sys
import time

import pytest

from helpers import (EventLog, REPO, make_image, nbdmirror_env, ok,
                     qmp_execute, random_bytes, wait_for_socket)
from netns import Network
from tlsfiles import psk_file, qemu_psk_dir

MiB = 1 << 20
SIZE = 64 * MiB
BUF = 4 * MiB
CUT = 3.0           # seconds a link stays down (the scenario, not a wait)
USER = "proxy1"     # the pre-shared key's user name


class Hosts:
    def __init__(self, net, procs, workdir):
        self.net, self.procs, self.workdir = net, procs, workdir
        self.guest, self.proxy, self.target = net.hosts("g", "p", "t")
        _, self.proxy_addr, _, _ = net.link(self.guest, self.proxy)
        _, self.target_addr, self.proxy_dev, _ = net.link(self.proxy,
                                                          self.target)

    def serve_target(self, image, tls=False):
        """qemu-nbd in the target host over TCP (with tls: requiring TLS
        with a pre-shared key); returns the URI the proxy uses."""
        args = ["qemu-nbd", "-f", "raw", "-t", "-e", "0", "-b",
                self.target_addr, "-p", "10809"]
        uri = f"nbd://{self.target_addr}:10809/"
        probe = ["nbdinfo", "--size", uri]
        if tls:
            psk = psk_file(self.workdir, USER)
            qdir = qemu_psk_dir(self.workdir / "qemu-psk", psk)
            args += ["--object",
                     f"tls-creds-psk,id=tls0,dir={qdir},endpoint=server",
                     "--tls-creds", "tls0"]
            uri = (f"nbds://{self.target_addr}:10809/?tls-psk-file={psk}"
                   f"&tls-username={USER}")
            probe = ["nbdinfo", "--size",
                     f"nbds://{USER}@{self.target_addr}:10809/"
                     f"?tls-psk-file={psk}"]
        self.net.start(self.procs, self.target, args + [image],
                       name="qemu-nbd")
        self.poll(lambda: self.net.run(self.proxy, probe).returncode == 0,
                  "the target to listen")
        return uri

    def serve_proxy(self, source, target, **opts):
        control = self.workdir / "qmp.sock"
        args = [sys.executable, "-m", "nbdmirror", "serve", "--foreground",
                "--source", source, "--port", "10809", "--bind",
                self.proxy_addr, "--control", control, "--target", target]
        for key, value in opts.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        proc = self.net.start(self.procs, self.proxy, args, name="nbdmirror",
                              env=nbdmirror_env(), cwd=REPO)
        wait_for_socket(str(control), 20, proc)
        return control, f"nbd://{self.proxy_addr}:10809/"

    def guest_write(self, uri, shadow, *writes):
        cmds = []
        for off, n, p in writes:
            cmds += ["-c", f"write -P {p:#x} {off} {n}"]
            shadow[off:off + n] = bytes([p]) * n
        r = self.net.run(self.guest, ["qemu-io", "-f", "raw", uri, *cmds])
        assert r.returncode == 0, r.stdout + r.stderr

    def guest_read_all(self, uri):
        out = self.workdir / "guest-view.img"
        r = self.net.run(self.guest, ["nbdcopy", uri, out])
        assert r.returncode == 0, r.stderr
        return out.read_bytes()

    def link_down(self):
        self.net.set_link(self.proxy, self.proxy_dev, False)
        self._down_at = time.monotonic()

    def link_up(self, after=CUT):
        """Bring the proxy-target link up once it was down `after` s."""
        time.sleep(max(0.0, self._down_at + after - time.monotonic()))
        self.net.set_link(self.proxy, self.proxy_dev, True)

    @staticmethod
    def poll(cond, what, timeout=20):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.05)


@pytest.fixture
def hosts(procs, workdir):
    with Network() as net:
        h = Hosts(net, procs, workdir)
        try:
            yield h
        finally:
            procs.stop_all()         # before the namespaces go


def test_mirror_across_hosts_over_tls_survives_link_cuts_and_pivots(
        hosts, workdir, qmp):
    src = make_image(workdir / "src.img", SIZE, seed=11)
    shadow = bytearray(random_bytes(11, SIZE))
    tgt_img = make_image(workdir / "tgt.img", SIZE)
    target = hosts.serve_target(tgt_img, tls=True)
    control, guest_uri = hosts.serve_proxy(
        src, target, speed="16M", buf_size="4M", io_timeout=1,
        reconnect_delay=30)
    log = EventLog(qmp(control))

    def job():
        return ok(qmp_execute(log.client, "query-block-jobs"))[0]

    # Mid-copy: the guest writes, the link to the target goes down.
    hosts.guest_write(guest_uri, shadow, (3 * MiB + 5, 200000, 0x11))
    hosts.poll(lambda: job()["offset"] >= 8 * MiB, "copy progress")
    hosts.link_down()
    log.wait("TARGET_DISCONNECTED", timeout=15)     # copies time out
    hosts.guest_write(guest_uri, shadow, (40 * MiB, 300000, 0x22))
    hosts.link_up()
    log.wait("TARGET_RECONNECTED", timeout=30)
    ok(qmp_execute(log.client, "block-job-set-speed", device="mirror0",
                   speed=0))
    ready = log.wait("BLOCK_JOB_READY", timeout=60)
    first = ready["data"]["offset"]

    # After ready: another cut; the guest's writes are copied into it.
    hosts.link_down()
    hosts.guest_write(guest_uri, shadow, (SIZE - 70000, 70000, 0x33),
                      (MiB, 4096, 0x44))
    log.wait("TARGET_DISCONNECTED", timeout=15)
    assert job()["status"] == "ready" and "target-disconnected" in job()
    hosts.link_up()
    log.wait("TARGET_RECONNECTED", timeout=30)

    ok(qmp_execute(log.client, "block-job-complete", device="mirror0"))
    done = log.wait("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done["data"], done
    hosts.guest_write(guest_uri, shadow, (7 * MiB, 65536, 0x55))  # on target

    # Copied again: what was in flight or queued at each cut, plus what the
    # guest wrote (the guest's writes are small here).
    recopied = done["data"]["offset"] - SIZE
    print(f"bytes copied {done['data']['offset']} for a {SIZE} byte disk: "
          f"re-copied {recopied} (at ready {first - SIZE})")
    assert recopied <= 2 * 2 * BUF + 2 * MiB, done["data"]
    assert hosts.guest_read_all(guest_uri) == bytes(shadow)
    hosts.procs.stop_all()
    with open(tgt_img, "rb") as f:
        assert f.read() == bytes(shadow)


def test_mirror_over_a_slow_link_converges_with_a_sensible_rate(hosts, workdir,
                                                                qmp):
    """htb limits the proxy-target link to 100 Mbit/s (12.5 MB/s); the job
    reaches ready, and `status` shows a rate near the link's and an ETA."""
    size = 24 * MiB
    src = make_image(workdir / "src.img", size, seed=12)
    tgt_img = make_image(workdir / "tgt.img", size)
    target = hosts.serve_target(tgt_img)
    dev = hosts.proxy_dev
    for cmd in (["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
                 "htb", "default", "10"],
                ["tc", "class", "add", "dev", dev, "parent", "1:", "classid",
                 "1:10", "htb", "rate", "100mbit", "burst", "64k"]):
        r = hosts.net.run(hosts.proxy, cmd)
        if r.returncode:
            pytest.skip(f"tc htb: {r.stderr.strip()}")
    control, _ = hosts.serve_proxy(src, target, buf_size="4M")
    log = EventLog(qmp(control))
    r = subprocess.run([sys.executable, "-m", "nbdmirror", "status",
                        "--control", control], capture_output=True,
                       text=True, timeout=30, env=nbdmirror_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    rate = re.search(r"rate ([\d.]+) (MiB|KiB)/s, ETA (\d+) s", r.stdout)
    assert rate, r.stdout
    mbs = float(rate[1]) * (1 if rate[2] == "MiB" else 1 / 1024)
    assert 3 < mbs < 20, r.stdout            # the link: ~11.9 MiB/s
    log.wait("BLOCK_JOB_READY", timeout=60)
    ok(qmp_execute(log.client, "block-job-complete", device="mirror0"))
    done = log.wait("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done["data"], done
    hosts.procs.stop_all()
    with open(tgt_img, "rb") as f:
        assert f.read() == random_bytes(12, size)
