"""Hosts for multi-host tests: network namespaces joined by veth pairs.

    with Network() as net:               # skips the test if it cannot
        guest, proxy, target = net.hosts("guest", "proxy", "target")
        net.link(guest, proxy)           # fd00:<n>:1::1 <-> ::2
        ...
        net.run(proxy, ["ip", "link"])   # a command inside a host

Each host is a namespace with only loopback and its veth ends, with
private addresses (10.<link>.0.1 and .2) that exist only inside these
namespaces: nothing reaches outside them.  Processes started in a host go through
the caller's `procs` registry (`net.start(procs, host, args)`), so they are
killed by pid at teardown; the namespaces are deleted after that.

Pathname unix sockets are not namespaced: the test talks QMP to a proxy in
a namespace through its control socket as usual.
"""

import itertools
import os
import subprocess

import pytest

_serial = itertools.count(1)


def _ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


class Network:
    def __init__(self):
        n = next(_serial)
        self.prefix = f"nbm{os.getpid() % 100000}x{n}"
        self.spaces = []
        self._links = 0

    def __enter__(self):
        probe = f"{self.prefix}probe"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode:
            pytest.skip(f"cannot make network namespaces: {r.stderr.strip()}")
        _ip("netns", "del", probe, check=False)
        return self

    def __exit__(self, *exc):
        for ns in self.spaces:
            _ip("netns", "del", ns, check=False)

    def hosts(self, *names):
        out = []
        for name in names:
            ns = f"{self.prefix}{name}"
            _ip("netns", "add", ns)
            self.spaces.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
            # A link taken down keeps its IPv6 addresses (Linux drops them
            # by default), so a cut link comes back as it was.
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv6.conf.all.keep_addr_on_down=1",
                            "net.ipv6.conf.default.keep_addr_on_down=1"],
                           check=True, timeout=30, capture_output=True)
            out.append(ns)
        return out

    def link(self, a, b):
        """A veth pair between hosts a and b; returns (addr_a, addr_b, dev_a,
        dev_b): 10.<k>.0.1 on a, 10.<k>.0.2 on b."""
        self._links += 1
        k = self._links
        dev_a, dev_b = f"v{k}a{os.getpid() % 10000}", f"v{k}b{os.getpid() % 10000}"
        _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        _ip("link", "set", dev_a, "netns", a)
        _ip("link", "set", dev_b, "netns", b)
        # IPv4: libnbd 1.14 sends an IPv6 literal as the TLS server name
        # (SNI), which GnuTLS servers refuse.
        addr_a, addr_b = f"10.{k}.0.1", f"10.{k}.0.2"
        for ns, dev, addr in ((a, dev_a, addr_a), (b, dev_b, addr_b)):
            _ip("addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            _ip("link", "set", dev, "up", ns=ns)
        return addr_a, addr_b, dev_a, dev_b

    def set_link(self, ns, dev, up):
        _ip("link", "set", dev, "up" if up else "down", ns=ns)

    def start(self, procs, ns, args, **kwargs):
        """A long-running process inside host `ns`, through `procs`."""
        return procs.start(["ip", "netns", "exec", ns, *map(str, args)],
                           name=kwargs.pop("name", os.path.basename(
                               str(args[0]))), **kwargs)

    def run(self, ns, args, timeout=120):
        return subprocess.run(["ip", "netns", "exec", ns, *map(str, args)],
                              capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
