"""The `nbdmirror` command line (INTERFACE.md §2, §6), run as a process.

Each command against a live proxy, its effect checked through a separate
QMP observer (connected first, so it sees every event) and on the bytes;
the exit statuses 0 / 1 / 2 with their one-line messages; `verify` on files
and NBD URIs; `watch` on a pseudo-terminal and on pipes.
"""

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from helpers import (REPO, child_commands, make_image, nbd_read_all,
                     nbd_unix_uri, nbdkit_server, nbdmirror, nbdmirror_env,
                     qemu_io, qemu_nbd, qmp_connect, qmp_execute,
                     random_bytes, sha256_file, sha256_uri, start_proxy)

K, M = 1 << 10, 1 << 20
JOB = "mirror0"
VERB_ERROR = ("Job 'mirror0' in state 'running' cannot accept command verb "
              "'complete'")


# -- local helpers ---------------------------------------------------------------

class Rig:
    """A proxy with no job, an empty target, and a QMP observer that keeps
    every event it sees in .seen."""

    def __init__(self, workdir, procs, qmp, size):
        self.workdir, self.procs, self.size = workdir, procs, size
        self.src = make_image(workdir / "src.img", size, seed=5)
        # The target starts first, so it stops after the proxy at teardown.
        self.tgt = nbdkit_server(procs, workdir / "tgt.sock", "memory",
                                 str(size))
        self.proxy = start_proxy(procs, self.src, workdir / "guest.sock",
                                 workdir / "qmp.sock")
        self.control = self.proxy.control
        self.observer = qmp(self.control)
        self.seen = []

    def cli(self, command, *args, timeout=60):
        return nbdmirror(command, "--control", self.control, *args,
                         timeout=timeout)

    def ok(self, name, **args):
        reply = qmp_execute(self.observer, name, **args)
        assert "return" in reply, f"{name} {args}: {reply}"
        return reply["return"]

    def start_job(self, **opts):
        self.ok("drive-mirror", device="disk0", target=self.tgt, sync="full",
                **{"job-id": JOB, **opts})

    def jobs(self):
        return self.ok("query-block-jobs")

    def wait_event(self, done, timeout=30):
        """Pull events into .seen until done(event); return that event."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"event not seen in {timeout} s: " \
                                  f"{[short(e) for e in self.seen]}"
            try:
                event = self.observer.pull_event(wait=float(remaining))
            except TimeoutError:
                continue
            if event is None:
                continue
            self.seen.append(event)
            if done(event):
                return event

    def wait_status(self, status, timeout=30):
        return self.wait_event(lambda e: short(e) == status, timeout)

    def saw(self, name):
        return name in [short(e) for e in self.seen]


def short(event):
    """A JOB_STATUS_CHANGE by its status, other events by their name."""
    if event["event"] == "JOB_STATUS_CHANGE":
        return event["data"]["status"]
    return event["event"]


def one_line(text):
    """The text is exactly one non-empty line; return it."""
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].strip(), repr(text)
    return lines[0]


def poll(fn, timeout=15, interval=0.05):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"condition not met in {timeout} s"
        time.sleep(interval)
    return value


def cli_args(*args):
    return [sys.executable, "-m", "nbdmirror", *map(str, args)]


def run_on_pty(procs, args, timeout=30, cols=100, rows=24):
    """Run `args` with stdin/stdout/stderr on a pseudo-terminal; return
    (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ,
                struct.pack("HHHH", rows, cols, 0, 0))
    try:
        proc = procs.start(args, name="pty", stdin=slave, stdout=slave,
                           stderr=slave, env=nbdmirror_env(), cwd=REPO)
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"still running after {timeout} s: {out!r}"
            ready, _, _ = select.select([master], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:          # EIO: every writer closed the pty
                break
            if not data:
                break
            out += data
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        os.close(master)
    return rc, out.decode("utf-8", "replace")


@pytest.fixture
def rig(workdir, procs, qmp):
    def make(size=8 * M):
        return Rig(workdir, procs, qmp, size)
    return make


# -- status ----------------------------------------------------------------------

def test_status_prints_one_human_line_for_a_running_job(rig):
    r = rig()
    r.start_job(speed=1 * M)
    r.wait_status("running")
    res = r.cli("status")
    assert res.returncode == 0, res.stderr
    line = one_line(res.stdout)
    assert JOB in line and "running" in line and "%" in line


def test_status_json_is_the_job_as_query_block_jobs_reports_it(rig):
    r = rig()
    r.start_job(speed=1 * M)
    r.wait_status("running")
    res = r.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["device"] == JOB and job["status"] == "running"
    assert job["len"] == r.size and job["speed"] == 1 * M
    assert set(job) >= {"offset", "paused", "ready", "busy", "io-status"}


def test_status_without_a_job_says_so(rig):
    r = rig()
    res = r.cli("status")
    assert res.returncode == 0 and "no active job" in res.stdout
    res = r.cli("status", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) is None


# -- events ----------------------------------------------------------------------

def test_events_prints_json_lines_until_the_job_ends(rig, procs, workdir):
    r = rig()
    r.start_job(speed=1 * M)
    r.wait_status("running")
    out, err = workdir / "events.out", workdir / "events.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = procs.start(cli_args("events", "--control", r.control),
                           name="events", stdout=fo, stderr=fe,
                           env=nbdmirror_env(), cwd=REPO)

    def printed_something():
        # Stimulus until the client is listening: each pause/resume makes
        # two events; poll until it printed one.
        r.ok("block-job-pause", device=JOB)
        r.wait_status("paused")
        r.ok("block-job-resume", device=JOB)
        r.wait_status("running")
        return out.read_bytes()
    poll(printed_something)
    r.ok("block-job-set-speed", device=JOB, speed=0)
    r.wait_status("ready")
    r.ok("block-job-complete", device=JOB)
    r.wait_status("null")
    assert proc.wait(timeout=10) == 0, err.read_text()
    printed = [json.loads(line) for line in out.read_text().splitlines()]
    # Exactly the events the observer saw since the client began listening.
    assert printed == r.seen[-len(printed):]
    assert [short(e) for e in printed][-6:] == [
        "ready", "BLOCK_JOB_READY", "pending", "BLOCK_JOB_COMPLETED",
        "concluded", "null"]


def test_events_without_a_job_exits_at_once(rig):
    r = rig()
    res = r.cli("events", timeout=15)
    assert res.returncode == 0 and res.stdout == ""


# -- start, pause, resume, set-speed -------------------------------------------

def test_start_begins_a_job_on_a_proxy_without_target(rig):
    r = rig()
    res = r.cli("start", "--target", r.tgt, "--sync", "full",
                "--job-id", JOB, "--granularity", "128K")
    assert res.returncode == 0, res.stderr
    r.wait_status("ready")
    assert [short(e) for e in r.seen] == ["created", "running", "ready"]
    assert r.jobs()[0]["device"] == JOB
    r.ok("block-job-complete", device=JOB)
    r.wait_status("null")
    assert sha256_uri(r.tgt) == sha256_file(r.src)


def test_start_wait_ready_returns_once_the_job_is_ready(rig):
    r = rig(size=16 * M)
    res = r.cli("start", "--target", r.tgt, "--job-id", JOB,
                "--speed", "32M", "--wait-ready")
    assert res.returncode == 0, res.stderr
    assert r.jobs()[0]["status"] == "ready"


def test_start_while_a_job_is_active_fails(rig):
    r = rig()
    r.start_job(speed=1 * M)
    r.wait_status("running")
    res = r.cli("start", "--target", r.tgt)
    assert res.returncode == 1
    assert JOB in one_line(res.stderr)


def test_start_to_an_unreachable_target_fails_naming_it(rig, workdir):
    r = rig()
    missing = f"nbd+unix:///?socket={workdir}/nothing.sock"
    res = r.cli("start", "--target", missing)
    assert res.returncode == 1
    assert "nothing.sock" in one_line(res.stderr)
    assert r.jobs() == []


def test_pause_resume_and_set_speed_drive_the_job(rig):
    r = rig()
    r.start_job(speed=512 * K)
    r.wait_status("running")
    assert r.cli("pause").returncode == 0
    r.wait_status("paused")
    assert r.jobs()[0]["paused"] is True
    assert r.cli("resume").returncode == 0
    r.wait_status("running")
    assert r.jobs()[0]["paused"] is False
    assert r.cli("set-speed", "1M").returncode == 0
    assert r.jobs()[0]["speed"] == 1 * M
    assert r.cli("set-speed", "0").returncode == 0
    r.wait_status("ready")


# -- complete and cancel --------------------------------------------------------

def test_complete_wait_returns_0_after_the_pivot(rig):
    r = rig()
    r.start_job()
    r.wait_status("ready")
    res = r.cli("complete", "--wait")
    assert res.returncode == 0, res.stderr
    assert r.jobs() == []               # the job ended before the exit
    r.wait_status("null")
    assert r.saw("BLOCK_JOB_COMPLETED")
    assert sha256_uri(r.tgt) == sha256_file(r.src)
    qemu_io(r.proxy.uri, "write -P 0x61 0 4k")          # now on the target
    qemu_io(r.tgt, "read -P 0x61 0 4k")


def test_cancel_force_wait_returns_0_after_the_job_ended(rig):
    r = rig()
    r.start_job(speed=1 * M)
    r.wait_status("running")
    res = r.cli("cancel", "--force", "--wait")
    assert res.returncode == 0, res.stderr
    assert r.jobs() == []
    r.wait_status("null")
    assert r.saw("BLOCK_JOB_CANCELLED") and not r.saw("BLOCK_JOB_COMPLETED")


def test_soft_cancel_wait_after_ready_leaves_a_consistent_copy(rig):
    r = rig()
    r.start_job()
    r.wait_status("ready")
    res = r.cli("cancel", "--wait")
    assert res.returncode == 0, res.stderr
    r.wait_status("null")
    assert r.saw("BLOCK_JOB_COMPLETED")
    assert sha256_uri(r.tgt) == sha256_file(r.src)


# -- failures: exit 1 -------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["status"], ["status", "--json"], ["events"], ["watch"], ["pause"],
    ["resume"], ["complete", "--wait"], ["cancel", "--force"],
    ["set-speed", "1M"], ["start", "--target", "nbd://localhost:1"],
])
def test_missing_control_socket_fails_with_one_line_naming_it(workdir,
                                                              command):
    path = workdir / "no-such.sock"
    res = nbdmirror(command[0], "--control", path, *command[1:], timeout=30)
    assert res.returncode == 1
    assert str(path) in one_line(res.stderr)


def test_complete_while_running_fails_with_qemu_wording(rig):
    r = rig()
    r.start_job(speed=1 * M)
    r.wait_status("running")
    res = r.cli("complete")
    assert res.returncode == 1
    assert VERB_ERROR in one_line(res.stderr)
    assert r.jobs()[0]["status"] == "running"


@pytest.mark.parametrize("command", [["pause"], ["resume"], ["complete"],
                                     ["cancel"], ["set-speed", "1M"]])
def test_verbs_without_a_job_fail(rig, command):
    r = rig()
    res = r.cli(*command)
    assert res.returncode == 1
    assert "no active job" in one_line(res.stderr)


# -- bad usage: exit 2 ------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["set-speed", "--control", "{control}", "abc"],
    ["set-speed", "--control", "{control}", "-5"],
    ["no-such-command", "--control", "{control}"],
    ["status"],                                  # no --control
    ["start", "--control", "{control}"],         # no --target
    ["start", "--control", "{control}", "--target", "t", "--sync", "most"],
    ["verify", "only-one.img"],
    ["serve", "--source", "/dev/null", "--control", "{control}",
     "--threads", "0"],
    [],
])
def test_bad_usage_exits_2(workdir, args):
    # The control path does not exist: usage is checked before connecting.
    control = str(workdir / "none.sock")
    res = nbdmirror(*(a.format(control=control) for a in args), timeout=30)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.strip()


# -- verify ----------------------------------------------------------------------

SIZE = 8 * M + 4 * K       # not a multiple of verify's 4 MiB step


def make_pair(workdir, *offsets):
    """Two images of SIZE bytes, equal but for one byte at each offset."""
    a = make_image(workdir / "a.img", SIZE, seed=8)
    b = make_image(workdir / "b.img", SIZE, seed=8)
    with open(b, "r+b") as f:
        for off in offsets:
            f.seek(off)
            old = f.read(1)
            f.seek(off)
            f.write(bytes([old[0] ^ 0xFF]))
    return a, b


def serve_both(procs, workdir, a, b):
    return (qemu_nbd(procs, a, workdir / "a.sock"),
            qemu_nbd(procs, b, workdir / "b.sock"))


@pytest.mark.parametrize("over", ["files", "nbd", "mixed"])
def test_verify_identical_images_exits_0(workdir, procs, over):
    a, b = make_pair(workdir)
    if over != "files":
        ua, ub = serve_both(procs, workdir, a, b)
        a, b = (ua, ub) if over == "nbd" else (a, ub)
    res = nbdmirror("verify", a, b)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("over", ["files", "nbd"])
@pytest.mark.parametrize("offsets,first", [
    ((3 * M + 17, 6 * M + 5), 3 * M + 17),
    ((0,), 0),
    ((4 * M - 1, 4 * M), 4 * M - 1),
    ((SIZE - 1,), SIZE - 1),
])
def test_verify_different_images_exits_1_with_the_first_offset(
        workdir, procs, over, offsets, first):
    a, b = make_pair(workdir, *offsets)
    if over == "nbd":
        a, b = serve_both(procs, workdir, a, b)
    res = nbdmirror("verify", a, b)
    assert res.returncode == 1, res.stdout + res.stderr
    assert str(first) in res.stdout.split(), res.stdout


def test_verify_images_of_different_sizes_exits_1(workdir):
    a = make_image(workdir / "a.img", 4 * M, seed=1)
    b = make_image(workdir / "b.img", 4 * M + 512, seed=1)
    res = nbdmirror("verify", a, b)
    assert res.returncode == 1
    assert "size" in res.stdout + res.stderr


def test_verify_a_missing_image_fails_naming_it(workdir):
    a = make_image(workdir / "a.img", 1 * M, seed=1)
    res = nbdmirror("verify", a, workdir / "gone.img")
    assert res.returncode == 1
    assert "gone.img" in one_line(res.stderr)


# -- watch -----------------------------------------------------------------------

def test_watch_on_a_terminal_draws_a_progress_bar_and_exits_0_when_ready(
        rig, procs):
    r = rig(size=16 * M)
    r.start_job(speed=8 * M)
    r.wait_status("running")
    rc, out = run_on_pty(procs, cli_args("watch", "--control", r.control))
    assert rc == 0, out
    frames = out.split("\r")                  # redrawn in place
    def drawn(*words):
        return any(all(w in f for w in words) for f in frames)
    assert drawn("%|", "B/s", "running"), out
    assert drawn("100%|", "B/s", "ready"), out
    assert r.jobs()[0]["status"] == "ready"


def test_watch_without_a_terminal_prints_a_plain_final_line(rig):
    r = rig(size=16 * M)
    r.start_job(speed=16 * M)
    r.wait_status("running")
    res = r.cli("watch")
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stdout + res.stderr
    last = res.stdout.splitlines()[-1]
    assert "ready" in last and str(16 * M) in last, res.stdout


def test_watch_exits_without_noise_on_stderr(rig):
    r = rig(size=16 * M)
    r.start_job(speed=8 * M)          # > 0.5 s without an event: a timeout
    r.wait_status("running")
    res = r.cli("watch")
    assert res.returncode == 0
    assert res.stderr == ""


# -- serve -------------------------------------------------------------------------

def test_serve_daemon_reports_a_refused_target_in_one_line(workdir):
    src = make_image(workdir / "src.img", 1 * M, seed=1)
    missing = nbd_unix_uri(workdir / "nowhere.sock")
    res = nbdmirror("serve", "--source", src, "--socket", workdir / "g.sock",
                    "--control", workdir / "c.sock", "--target", missing,
                    timeout=30)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert line.startswith("nbdmirror: error: target: ") and \
        "nowhere.sock" in line, line
    assert sorted(p.name for p in workdir.iterdir()) == ["src.img"]


def _daemon_pid(pidfile):
    """The pid in `pidfile` if it names a running nbdkit, else None."""
    try:
        pid = int(pidfile.read_text())
        with open(f"/proc/{pid}/comm") as f:
            return pid if f.read().strip() == "nbdkit" else None
    except (OSError, ValueError):
        return None


def test_serve_daemon_returns_serving_with_its_pid_file(workdir):
    src = make_image(workdir / "src.img", 1 * M, seed=2)
    pidfile = workdir / "proxy.pid"
    try:
        res = nbdmirror("serve", "--source", src, "--socket",
                        workdir / "g.sock", "--control", workdir / "c.sock",
                        "--pidfile", pidfile, timeout=30)
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        pid = _daemon_pid(pidfile)
        assert pid, "the pid file does not name the running nbdkit"
        assert nbd_read_all(nbd_unix_uri(workdir / "g.sock")) == \
            random_bytes(2, 1 * M)
        client = qmp_connect(workdir / "c.sock")
        try:
            assert qmp_execute(client, "quit") == {"return": {}}
        finally:
            try:
                client.close()
            except EOFError:     # qemu.qmp: the server went first, as
                pass             # QEMU's does after quit
        poll(lambda: not os.path.exists(f"/proc/{pid}"))
        assert not pidfile.exists()
    finally:
        pid = _daemon_pid(pidfile)
        if pid:
            os.kill(pid, signal.SIGKILL)


def test_serve_foreground_passes_sigterm_to_nbdkit_and_exits_0(workdir,
                                                                procs):
    src = make_image(workdir / "src.img", 1 * M, seed=3)
    proxy = start_proxy(procs, src, workdir / "g.sock", workdir / "c.sock")
    child = subprocess.run(["pgrep", "-P", str(proxy.proc.pid), "nbdkit"],
                           capture_output=True, text=True, timeout=10)
    (nbdkit_pid,) = child.stdout.split()
    assert procs.stop(proxy.proc) == 0
    assert not os.path.exists(f"/proc/{nbdkit_pid}")    # ended and reaped


def test_serve_does_not_open_a_single_client_nbd_source_itself(workdir,
                                                                procs):
    """qemu-nbd with its defaults serves one client, then exits: the proxy
    must be that one client (serve opens nothing itself)."""
    image = make_image(workdir / "src.img", 1 * M, seed=4)
    sock = workdir / "src.sock"
    procs.start(["qemu-nbd", "-f", "raw", "-k", sock, image],
                name="qemu-nbd")
    poll(lambda: os.path.exists(sock))      # no probe: it would be the one
    proxy = start_proxy(procs, nbd_unix_uri(sock), workdir / "g.sock",
                        workdir / "c.sock")
    assert nbd_read_all(proxy.uri) == random_bytes(4, 1 * M)


# -- nbdkit threads ----------------------------------------------------------

def _nbdkit_threads(proxy):
    """The -t that serve gave its nbdkit (a child of the proxy process)."""
    for args in child_commands(proxy.proc.pid):
        if os.path.basename(args[0]) == "nbdkit":
            return int(args[args.index("-t") + 1])
    raise AssertionError("no nbdkit under the proxy")


@pytest.mark.parametrize("kind,given,expected", [
    ("file", None, 1), ("nbd", None, 4), ("file", 3, 3)])
def test_serve_picks_nbdkit_threads_by_the_source_kind(
        kind, given, expected, workdir, procs):
    img = make_image(workdir / "src.img", 1 << 20, seed=3)
    source = img if kind == "file" else \
        qemu_nbd(procs, img, workdir / "src.sock")
    opts = {} if given is None else {"threads": given}
    proxy = start_proxy(procs, source, workdir / "g.sock",
                        workdir / "qmp.sock", **opts)
    assert _nbdkit_threads(proxy) == expected
