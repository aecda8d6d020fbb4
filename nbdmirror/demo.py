"""A one-minute demo of nbdmirror, needing nothing but this machine.

    python -m nbdmirror.demo          (or: make demo)

It builds everything in a temp dir and removes it at the end:

  1. a 256 MiB source image, part random data and part holes;
  2. a target: qemu-nbd serving a fresh, sparse raw file of the same size;
  3. the proxy (`nbdmirror serve`, as a daemon with a pidfile), with a speed
     limit so that the copy takes a few seconds;
  4. a guest workload (qemu-io through the proxy's guest socket) that writes
     while the copy runs, including into ranges already copied;
  5. progress from QMP until BLOCK_JOB_READY, then `nbdmirror complete`
     (the pivot);
  6. checks: the target equals the source as the guest last wrote it
     (`nbdmirror verify` and `qemu-img compare`), the guest reads back its
     writes from the target, and after the pivot a guest write reaches the
     target and not the source.

Every step prints one line starting with "==> ".  Exit status: 0 when every
check passed, 1 when one failed, 130 on Ctrl-C.  Every process the demo
starts is stopped by its pid, also on failure or Ctrl-C.
"""

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .sizes import format_size as fmt_bytes

MiB = 1 << 20
SIZE = 256 * MiB
SPEED = "48M"                    # background copy limit: ~3 s for the data
SPEED_TEXT = "48 MiB/s"
# Source layout: (offset, length) of random data; the rest are holes.
DATA = [(0, 96 * MiB), (128 * MiB, 32 * MiB), (192 * MiB, 16 * MiB)]
# Guest writes during the copy: (qemu-io write command, read-back check).
WORKLOAD = [
    ("write -P 0x11 1M 2M", "read -P 0x11 1M 2M"),        # copied already
    ("write -P 0x22 100M 1M", "read -P 0x22 100M 1M"),    # into a hole
    ("write -z 140M 1M", "read -P 0 140M 1M"),            # zeroes over data
    ("write -P 0x33 250M 4M", "read -P 0x33 250M 4M"),    # not copied yet
]
POST_PIVOT = ("write -P 0x44 0 64K", "read -P 0x44 0 64K")
STEP_TIMEOUT = 60                # seconds any one wait may take


class CheckFailed(Exception):
    """A check of the demo failed; str() says which."""


class Interrupted(BaseException):
    """SIGTERM: leave like Ctrl-C, through every finally."""


def say(msg):
    print(f"==> {msg}", flush=True)


def detail(msg):
    print(f"    {msg}", flush=True)


def shell_word(word):
    """`word` as a shell would need it, keeping $DEMO expandable."""
    if re.fullmatch(r"[\w@%+=:,./$-]+", word):
        return word
    return '"' + re.sub(r'(["\\`])', r"\\\1", word) + '"'


def nbd_uri(sock):
    return f"nbd+unix:///?socket={sock}"


# -- processes ---------------------------------------------------------------

class Demo:
    """The temp dir, the processes and the QMP client, all torn down by
    close() whatever happened."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="nbdmirror-demo-", dir="/tmp")
        self.children = []       # Popen objects (qemu-nbd)
        self.daemon_pids = []    # pidfiles of daemons (the proxy)
        self.qmp = None

    def path(self, name):
        return os.path.join(self.dir, name)

    def show(self, args):
        """The command line, with the temp dir spelled $DEMO."""
        text = " ".join(shell_word(str(a).replace(self.dir, "$DEMO"))
                        for a in args)
        detail(f"$ {text}")

    def run(self, args, check=True, shown=None):
        """Run a tool to the end; return (exit status, output).  `shown`:
        the command line to print, if not `args`."""
        self.show(shown or args)
        r = subprocess.run(args, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=STEP_TIMEOUT)
        out = (r.stdout + r.stderr).strip()
        if check and r.returncode != 0:
            raise CheckFailed(f"{os.path.basename(args[0])} exited "
                              f"{r.returncode}: {out}")
        return r.returncode, out

    def nbdmirror(self, *args, check=True):
        """`nbdmirror ARGS` (run as this interpreter's -m nbdmirror)."""
        return self.run([sys.executable, "-m", "nbdmirror", *args],
                        check=check, shown=["nbdmirror", *args])

    def qemu_io(self, uri, cmds, check=True):
        return self.run(["qemu-io", "-f", "raw", uri] +
                        [a for c in cmds for a in ("-c", c)], check=check)

    def start(self, args, name):
        self.show(args)
        log = open(self.path(f"{name}.log"), "wb")
        with log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        proc.name = name
        self.children.append(proc)
        return proc

    def close(self):
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:       # noqa: BLE001 - the server may be gone
                pass
        for pidfile in self.daemon_pids:
            pid = read_pid(pidfile)
            if pid:
                stop_pid(pid)
        for proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(3)
        shutil.rmtree(self.dir, ignore_errors=True)


def read_pid(pidfile):
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def stop_pid(pid, grace=3.0):
    """SIGTERM a process that is not our child, SIGKILL it after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.02)


def wait_for_socket(path, proc, timeout=STEP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"{proc.name} exited with status "
                              f"{proc.returncode}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise CheckFailed(f"{path}: no connection accepted in {timeout} s")


# -- the story ---------------------------------------------------------------

def make_source(path):
    rng = random.Random(2024)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, length in DATA:
            f.seek(off)
            for pos in range(0, length, 4 * MiB):
                f.write(rng.randbytes(min(4 * MiB, length - pos)))


def allocated(path):
    return os.stat(path).st_blocks * 512


def qmp_connect(control):
    from qemu.qmp.legacy import QEMUMonitorProtocol
    client = QEMUMonitorProtocol(control)
    client.connect(negotiate=True)
    client.settimeout(STEP_TIMEOUT)
    return client


def next_event(client, timeout):
    """The next event, or None after `timeout` s."""
    try:
        return client.pull_event(wait=float(timeout) if timeout > 0 else False)
    except asyncio.TimeoutError:
        return None


def block_job(client):
    jobs = client.cmd_obj({"execute": "query-block-jobs"}).get("return", [])
    return jobs[0] if jobs else None


def progress_line(job):
    pct = 100.0 * job["offset"] / job["len"] if job["len"] else 100.0
    return (f"{job['status']:8} {fmt_bytes(job['offset']):>10} of "
            f"{fmt_bytes(job['len']):>10} ({pct:5.1f} %)")


def wait_progress(client, t0, until, what):
    """Print progress until until(job) is true; return the job.  Fails
    if the job reports an error or ends first."""
    deadline = time.monotonic() + STEP_TIMEOUT
    last = None
    while True:
        job = block_job(client)
        if job is None:
            raise CheckFailed(f"the job ended while waiting for {what}")
        if job.get("error"):
            raise CheckFailed(f"job error: {job['error']}")
        line = progress_line(job)
        if line != last:
            detail(f"t={time.monotonic() - t0:4.1f} s  {line}")
            last = line
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise CheckFailed(f"no {what} within {STEP_TIMEOUT} s")
        ev = next_event(client, 0.5)
        while ev is not None:
            if ev["event"] == "BLOCK_JOB_ERROR" or \
                    "error" in ev.get("data", {}):
                raise CheckFailed(f"{ev['event']} {ev['data']}")
            ev = next_event(client, 0)


def story(demo):
    src, tgt = demo.path("source.img"), demo.path("target.img")
    tgt_sock, guest_sock = demo.path("target.sock"), demo.path("guest.sock")
    control, pidfile = demo.path("qmp.sock"), demo.path("proxy.pid")
    tgt_uri, guest_uri = nbd_uri(tgt_sock), nbd_uri(guest_sock)
    data = sum(n for _, n in DATA)

    say(f"working in DEMO={demo.dir}")
    say(f"creating a {fmt_bytes(SIZE)} source image: "
        f"{fmt_bytes(data)} random data, the rest holes")
    make_source(src)
    src_alloc0 = allocated(src)

    say("starting the target: qemu-nbd on a fresh sparse raw file")
    with open(tgt, "wb") as f:
        f.truncate(SIZE)
    target = demo.start(["qemu-nbd", "-k", tgt_sock, "-e", "0", "-t",
                         "-f", "raw", tgt], "qemu-nbd")
    wait_for_socket(tgt_sock, target)

    say(f"starting the proxy: the guest's disk is the source, mirrored to "
        f"the target at {SPEED_TEXT} at most")
    demo.daemon_pids.append(pidfile)
    t0 = time.monotonic()
    demo.nbdmirror("serve", "--source", src, "--target", tgt_uri,
                   "--socket", guest_sock, "--control", control,
                   "--pidfile", pidfile, "--speed", SPEED)
    detail(f"proxy running as pid {read_pid(pidfile)}; guest disk at "
           f"{guest_uri.replace(demo.dir, '$DEMO')}")
    client = demo.qmp = qmp_connect(control)

    say("phase 1 (copying): holes count as done at once; waiting until a "
        "quarter of the data is copied")
    wait_progress(client, t0,
                  lambda j: j["offset"] >= SIZE - data + data // 4,
                  "a quarter of the data copied")
    say("the guest writes while the copy runs (qemu-io through the proxy)")
    before = block_job(client)
    demo.qemu_io(guest_uri, [w for w, _ in WORKLOAD])
    after = block_job(client)
    detail(f"job still {after['status']} after the writes; len grew by "
           f"{fmt_bytes(after['len'] - before['len'])} "
           f"(rewritten ranges are copied again)")
    if after["status"] != "running":
        detail("note: the copy had already converged; the writes were "
               "mirrored in phase 2")

    say("`nbdmirror status` (the command line client)")
    _, out = demo.nbdmirror("status", "--control", control)
    detail(out)

    say("waiting for BLOCK_JOB_READY (source and target in sync)")
    ready = wait_progress(client, t0, lambda j: j["status"] == "ready",
                          "ready")
    t_ready = time.monotonic() - t0

    say("completing the job: the guest switches to the target (pivot)")
    demo.nbdmirror("complete", "--wait", "--control", control)
    if block_job(client) is not None:
        raise CheckFailed("the job is still listed after complete")
    detail("BLOCK_JOB_COMPLETED; the proxy now serves the target")

    failures = []

    def check(ok, good, bad):
        if ok:
            detail(f"ok: {good}")
        else:
            detail(f"FAILED: {bad}")
            failures.append(bad)

    say("checking: the target equals the source as the guest last wrote it")
    rc, out = demo.nbdmirror("verify", src, tgt_uri, check=False)
    check(rc == 0, out, f"nbdmirror verify: {out}")
    rc, out = demo.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                        src, tgt_uri], check=False)
    check(rc == 0, out, f"qemu-img compare: {out}")

    say("checking: the guest reads its writes back, now from the target")
    rc, out = demo.qemu_io(guest_uri, [r for _, r in WORKLOAD], check=False)
    check(rc == 0 and "Pattern verification failed" not in out,
          f"{len(WORKLOAD)} patterns read back",
          f"qemu-io read-back: {out}")

    say("after the pivot, a guest write reaches the target, not the source")
    with open(src, "rb") as f:
        src_head = f.read(64 << 10)
    demo.qemu_io(guest_uri, [POST_PIVOT[0]])
    rc, out = demo.qemu_io(tgt_uri, [POST_PIVOT[1]], check=False)
    check(rc == 0 and "Pattern verification failed" not in out,
          "the target holds the new data", f"target read-back: {out}")
    with open(src, "rb") as f:
        check(f.read(64 << 10) == src_head, "the source file is unchanged",
              "the post-pivot write changed the source file")

    say("stopping the proxy (QMP quit)")
    pid = read_pid(pidfile)
    try:
        client.cmd_obj({"execute": "quit"})
    except Exception as e:      # noqa: BLE001 - the reply may race the exit
        detail(f"(no reply to quit; the connection closed first: {e})")
    deadline = time.monotonic() + 10
    while pid and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    check(not (pid and pid_alive(pid)), "the proxy exited",
          "the proxy did not exit after quit")

    say("checking: holes stayed holes on the target")
    src_alloc, tgt_alloc = allocated(src), allocated(tgt)
    check(tgt_alloc <= src_alloc + MiB,
          f"allocated: target {fmt_bytes(tgt_alloc)}, source "
          f"{fmt_bytes(src_alloc)} (was {fmt_bytes(src_alloc0)} before the "
          f"guest wrote)",
          f"the target allocates {fmt_bytes(tgt_alloc)}, the source only "
          f"{fmt_bytes(src_alloc)}")

    say("summary")
    holes = SIZE - data             # counted as done by the initial scan
    copied = ready["len"] - holes
    detail(f"copied {fmt_bytes(copied)} ({fmt_bytes(data)} of data, "
           f"{fmt_bytes(copied - data)} more rewritten by the guest), "
           f"skipped {fmt_bytes(holes)} of holes")
    detail(f"ready {t_ready:.1f} s after the proxy started: "
           f"{fmt_bytes(copied / t_ready)}/s (speed limit {SPEED_TEXT})")
    if failures:
        raise CheckFailed(f"{len(failures)} check(s) failed: "
                          + "; ".join(failures))


def main():
    def on_term(signum, frame):
        raise Interrupted()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.monotonic()
    demo = Demo()
    try:
        story(demo)
    except CheckFailed as e:
        say(f"FAILED: {e}")
        return 1
    except (KeyboardInterrupt, Interrupted):
        say("interrupted")
        return 130
    finally:
        demo.close()
    say(f"all checks passed in {time.monotonic() - start:.1f} s; "
        f"processes stopped, {demo.dir} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
