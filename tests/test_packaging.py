"""`nbdmirror serve` works from an installed package, not only a checkout.

A wheel built from this tree is installed into a fresh venv (as a user
would: `/usr/bin/python3 -m venv --system-site-packages`, which sees the
Debian-built `nbd`), and its `nbdmirror serve` runs with neither this
checkout on PYTHONPATH nor as the current directory; a client then reads
the disk through the guest socket.  The same for the editable install the
test run itself uses (.venv).
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import (REPO, make_image, nbd_read_all, nbd_unix_uri,
                     qmp_execute, random_bytes, wait_for_socket)

SIZE = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"
STEP_TIMEOUT = 120


def run(args, **kwargs):
    r = subprocess.run([os.fspath(a) for a in args], capture_output=True,
                       text=True, timeout=STEP_TIMEOUT,
                       stdin=subprocess.DEVNULL, **kwargs)
    assert r.returncode == 0, f"{args}:\n{r.stdout}{r.stderr}"
    return r


def build_wheel(workdir):
    """A wheel of this tree, built from a copy (the build writes files)."""
    src = workdir / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    shutil.copytree(os.path.join(REPO, "nbdmirror"), src / "nbdmirror",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps",
         "--no-build-isolation", "--no-index", "-w", workdir / "dist",
         f"{src}/"], env=_clean_env())
    wheels = list((workdir / "dist").glob("nbdmirror-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _clean_env():
    """The environment without anything that points at this checkout."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def serve_and_read(procs, qmp, workdir, nbdmirror_cmd, expect_plugin_in):
    """Run `nbdmirror serve` from `nbdmirror_cmd` in a directory of its own;
    read the whole disk through it; check which plugin file nbdkit runs."""
    run_dir = workdir / "run"
    run_dir.mkdir()
    src = make_image(run_dir / "src.img", SIZE, seed=21)
    sock, control = run_dir / "g.sock", run_dir / "c.sock"
    proc = procs.start([nbdmirror_cmd, "serve", "--foreground", "--source",
                        src, "--socket", sock, "--control", control],
                       name="nbdmirror", env=_clean_env(), cwd=run_dir)
    wait_for_socket(control, 30, proc)
    assert nbd_read_all(nbd_unix_uri(sock)) == random_bytes(21, SIZE)
    children = run(["pgrep", "-P", str(proc.pid), "nbdkit"]).stdout.split()
    assert len(children) == 1, children
    with open(f"/proc/{children[0]}/cmdline", "rb") as f:
        plugin = next(a for a in f.read().decode().split("\0")
                      if a.endswith("nbdkit_plugin.py"))
    assert plugin.startswith(os.fspath(expect_plugin_in)), plugin
    assert os.path.isfile(plugin)
    assert qmp_execute(qmp(control), "quit") == {"return": {}}
    assert proc.wait(30) == 0


def test_serve_from_a_wheel_in_a_fresh_venv(workdir, procs, qmp):
    wheel = build_wheel(workdir)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "nbdmirror/nbdkit_plugin.py" in names
    assert not any(n.startswith("plugin/") for n in names), names
    venv = workdir / "venv"
    run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages",
         "--without-pip", venv])
    run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps",
         "--no-index", wheel], env=_clean_env(), cwd=workdir)
    site = run([venv / "bin" / "python", "-c",
                "import nbdmirror, os; "
                "print(os.path.dirname(nbdmirror.__file__))"],
               env=_clean_env(), cwd=workdir).stdout.strip()
    assert site.startswith(os.fspath(venv)), site
    serve_and_read(procs, qmp, workdir, venv / "bin" / "nbdmirror", venv)


def test_serve_from_the_editable_install(workdir, procs, qmp):
    script = os.path.join(os.path.dirname(sys.executable), "nbdmirror")
    if not os.path.exists(script):
        pytest.skip("not run from a venv with nbdmirror installed")
    serve_and_read(procs, qmp, workdir, script,
                   os.path.join(REPO, "nbdmirror"))
