"""The option table: sizes, every row through every way in, and refusals.

Every row of options.OPTIONS must be reachable as a `serve` flag, as a
plugin key (unless it is nbdkit's) and, for job rows, as a `start` flag and
a drive-mirror argument; a bad value must be refused with one line that
starts with the option's name, whichever way it arrived.  No processes:
`serve` and `start` are run in this process up to where they would start
nbdkit or connect.
"""

import dataclasses
import math

import pytest

from nbdmirror import cli, control
from nbdmirror.options import (
    JOB, MAX_BUF_SIZE, NBDKIT, OPTIONS, PROXY, REQUIRED, JobOptions,
    OptionError, ProxyOptions, is_nbd_uri, make_job_options, parse_nbd_uri,
    parse_source, qmp_arguments, rows)
from nbdmirror.options import (Choice, Flag, Int, NbdUri, Path, Seconds,
                               Size, Source, Text)
from nbdmirror.qmp import QMPError
from nbdmirror.sizes import format_size, parse_size, short_size, to_bytes

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
TGT = "nbd+unix:///?socket=/tmp/t.sock"


# -- sizes ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("0", 0), ("65536", 65536), ("64K", 64 * K), ("64k", 64 * K),
    ("16M", 16 * M), ("1G", G), ("2T", 2 * T), ("1GiB", G), ("16MB", 16 * M),
    ("4 K", 4 * K), (" 512 ", 512), ("100B", 100),
    (0, 0), (4096, 4096),
])
def test_parse_size_accepts_bytes_and_binary_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", [
    "", "K", "1.5M", "-1", "0x10", "12Q", "64KK", "ten", "1e6", "5 5",
    None, 2.5, -1, True, False, "9" * 401, "9" * 5000 + "K",
])
def test_parse_size_refuses_with_the_option_name(bad):
    with pytest.raises(ValueError) as e:
        parse_size(bad, "buf-size")
    msg = str(e.value)
    assert msg.startswith("buf-size: ")
    assert "\n" not in msg and len(msg) < 200


def test_parse_size_names_size_by_default():
    with pytest.raises(ValueError, match="^size: "):
        parse_size("lots")


def test_to_bytes_takes_huge_json_integers_for_the_range_check():
    assert to_bytes(10 ** 400) == 10 ** 400


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (16 * M, "16.0 MiB"), (3 * G, "3.0 GiB"), (2048 * T, "2048.0 TiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("n,text", [
    (0, "0"), (4096, "4K"), (64 * M, "64M"), (G, "1G"), (G + 1, "1073741825"),
    (3 * T, "3T")])
def test_short_size(n, text):
    assert short_size(n) == text


# -- a good and a bad value for each row, from its kind --------------------------------

def good(row, tmp_path, json=False):
    """A valid value for `row` other than its default; a JSON value (for
    QMP) if `json`, else a string."""
    kind = row.kind
    value = {
        Text: "x1", Path: str(tmp_path / "p"), NbdUri: TGT,
        Source: str(tmp_path / "src.img"), Flag: "true", Seconds: "0.5",
    }.get(type(kind))
    if isinstance(kind, Choice):
        value = kind.choices[-1]
    elif isinstance(kind, (Size, Int)):
        value = str(kind.hi)
    assert value is not None, f"no sample for {row}"
    if json:
        value = row.parse(value)
    return value


def bad(row):
    kind = row.kind
    if isinstance(kind, Size):
        return short_size(kind.hi + 1) if kind.hi < (1 << 63) - 1 \
            else str(kind.hi + 1)
    if isinstance(kind, Int):
        return str(kind.lo - 1)
    if isinstance(kind, Seconds):
        return "-1" if kind.zero else "0"
    return {Text: "", Path: "", NbdUri: "/tmp/x.img", Source: "/no/such.img",
            Flag: "maybe", Choice: "bogus"}[type(kind)]


@pytest.fixture
def src(tmp_path):
    (tmp_path / "src.img").write_bytes(bytes(4096))
    return str(tmp_path / "src.img")


ALL = list(OPTIONS.values())
KEYED = [r for r in ALL if r.scope != NBDKIT]
JOBS = rows(JOB)


def test_the_table_has_each_scope_and_only_known_ones():
    assert {r.scope for r in ALL} == {PROXY, JOB, NBDKIT}
    assert [r.name for r in ALL] == list(OPTIONS)
    for r in ALL:
        assert r.help and r.flag == "--" + r.name
        assert r.field == r.name.replace("-", "_")
        assert (r.key is None) == (r.scope == NBDKIT)
        assert (r.nbdkit is not None) == (r.scope == NBDKIT)
        assert r.qmp is None or r.scope == JOB


@pytest.mark.parametrize("row", ALL, ids=str)
def test_row_default_parses_to_itself(row):
    if row.default is not None:
        assert row.parse(row.format(row.default)) == row.default


# -- reachable: serve, plugin key, start, drive-mirror ------------------------------------

def serve_args(src, tmp_path, *extra):
    return ["serve", "--source", src, "--control",
            str(tmp_path / "c.sock"), *extra]


@pytest.mark.parametrize("row", ALL, ids=str)
def test_every_row_is_a_serve_flag(row, tmp_path, src):
    args = cli._parser().parse_args(serve_args(
        src, tmp_path, *([row.flag] if row.kind.flag
                         else [row.flag, good(row, tmp_path)])))
    given = getattr(args, row.field)
    assert given is True if row.kind.flag else given == good(row, tmp_path)


def companions(row, tmp_path):
    """The other serve flags that `row` needs beside it: where the guest
    connects (--socket, or --port for --bind), and for the guest TLS rows
    TLS on with the files nbdkit will read."""
    out = [] if row.name in ("socket", "port") else \
        ["--port", "10809"] if row.name == "bind" else \
        ["--socket", str(tmp_path / "g.sock")]
    p = tmp_path / "p"      # good()'s path
    if row.name == "tls-psk":
        p.write_text("alice:00\n")
    if row.name == "tls-certificates":
        p.mkdir()
        for name in ("server-cert.pem", "server-key.pem"):
            (p / name).write_text("")
    if row.name == "tls":               # good(): require
        (tmp_path / "k.psk").write_text("alice:00\n")
        out += ["--tls-psk", str(tmp_path / "k.psk")]
    if row.name == "tls-verify-peer":
        d = tmp_path / "certs"
        d.mkdir()
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            (d / name).write_text("")
        out += ["--tls", "require", "--tls-certificates", str(d)]
    if row.name in ("tls-psk", "tls-certificates"):
        out += ["--tls", "on"]
    if row.name == "bitmap-discard":
        out += ["--bitmap", str(tmp_path / "dirty.bitmap")]
    return out


@pytest.mark.parametrize("row", ALL, ids=str)
def test_every_serve_flag_reaches_nbdkit_or_the_plugin(row, tmp_path, src,
                                                       monkeypatch):
    """serve, up to the nbdkit command it would run: an nbdkit row becomes
    nbdkit's flag (a bare one for a flag), any other the plugin key, with
    the parsed value."""
    ran = []
    monkeypatch.setattr(cli, "_run_foreground",
                        lambda cmd, serving: ran.append(cmd) or 0)
    value = good(row, tmp_path)
    rc = cli.main(serve_args(src, tmp_path, "--foreground", "--target", TGT,
                             *companions(row, tmp_path),
                             *([row.flag] if row.kind.flag
                               else [row.flag, value])))
    assert rc == 0 and len(ran) == 1
    cmd, parsed = ran[0], row.parse(value if not row.kind.flag else True)
    assert cmd[0] == "nbdkit" and cli.PLUGIN in cmd
    if row.scope == NBDKIT and row.kind.flag:
        assert row.nbdkit in cmd
    elif row.scope == NBDKIT:
        i = cmd.index(row.nbdkit)
        assert cmd[i + 1] == row.format(parsed)
    else:
        assert f"{row.key}={row.format(parsed)}" in cmd


@pytest.mark.parametrize("row", KEYED, ids=str)
def test_every_proxy_and_job_row_is_a_plugin_key(row, tmp_path, src):
    p = ProxyOptions()
    p.set(row.key, good(row, tmp_path))
    want = row.parse(good(row, tmp_path))
    got = getattr(p, row.field) if row.scope == PROXY else p.job[row.key]
    assert got == want


@pytest.mark.parametrize("row", KEYED, ids=str)
def test_plugin_args_give_the_plugin_the_same_options(row, tmp_path, src):
    """What `serve` passes to nbdkit parses back to the same values."""
    p = ProxyOptions()
    for key, value in [("source", src), ("control", str(tmp_path / "c")),
                       ("target", TGT), (row.key, good(row, tmp_path))]:
        p.set(key, value)
    q = ProxyOptions()
    for arg in p.plugin_args():
        q.set(*arg.split("=", 1))
    assert vars(q) == vars(p)


@pytest.mark.parametrize("row", JOBS, ids=str)
def test_every_job_row_is_a_start_flag(row, tmp_path):
    args = cli._parser().parse_args(
        ["start", "--control", "c", "--target", TGT,
         *([row.flag] if row.kind.flag else [row.flag, good(row, tmp_path)])])
    assert getattr(args, row.field) is not None


class FakeClient:
    """Stands in for cli.Client: records the QMP commands `start` sends."""

    def __init__(self):
        self.sent = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def cmd(self, name, **args):
        self.sent.append((name, args))
        return {}


@pytest.mark.parametrize("row", JOBS, ids=str)
def test_every_start_flag_reaches_drive_mirror_parsed(row, tmp_path,
                                                      monkeypatch):
    client = FakeClient()
    monkeypatch.setattr(cli, "_client", lambda args: client)
    value = good(row, tmp_path)
    assert cli.main(["start", "--control", "c", "--target", TGT,
                     *([row.flag] if row.kind.flag
                       else [row.flag, value])]) == 0
    ((name, args),) = client.sent
    assert name == "drive-mirror" and args["device"] == "disk0"
    assert args[row.name] == row.parse(True if row.kind.flag else value)
    assert drive_mirror(**{k: v for k, v in args.items() if k != "device"})


class FakeProxy:
    device = "disk0"

    def __init__(self):
        self.started = []

    def start_job(self, opts):
        self.started.append(opts)


def drive_mirror(**args):
    proxy = FakeProxy()
    control.Control(proxy).dispatch(
        "drive-mirror", {"device": "disk0", "target": TGT, "sync": "full",
                         **args})
    return proxy.started[0]


@pytest.mark.parametrize("row", JOBS, ids=str)
def test_every_job_row_is_a_drive_mirror_argument(row, tmp_path):
    assert row.qmp, f"{row.name}: drive-mirror does not take it"
    value = good(row, tmp_path, json=True)
    opts = drive_mirror(**{row.name: value})
    assert getattr(opts, row.field) == value


def test_drive_mirror_requires_target_and_sync_as_qemu_does():
    assert {r.name for r in JOBS if r.qmp == REQUIRED} == {"target", "sync"}
    for missing in ("target", "sync"):
        args = {"device": "disk0", "target": TGT, "sync": "full"}
        del args[missing]
        with pytest.raises(QMPError, match=f"'{missing}' is missing"):
            control.Control(FakeProxy()).dispatch("drive-mirror", args)


def test_drive_mirror_job_id_defaults_to_the_device_as_in_qemu():
    assert drive_mirror().job_id == "disk0"
    assert drive_mirror(**{"job-id": "j"}).job_id == "j"


@pytest.mark.parametrize("row", JOBS, ids=str)
def test_drive_mirror_checks_each_arguments_json_type(row):
    wrong = "1" if row.kind.qmp is not str else 1
    with pytest.raises(QMPError, match=f"'{row.name}', expected"):
        drive_mirror(**{row.name: wrong})


# -- bad values: refused, naming the option, every way in ---------------------------------

@pytest.mark.parametrize("row", KEYED, ids=str)
def test_bad_plugin_key_value_names_the_key(row):
    with pytest.raises(OptionError) as e:
        ProxyOptions().set(row.key, bad(row))
    assert str(e.value).startswith(f"{row.name}: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("row", ALL, ids=str)
def test_bad_serve_value_is_one_line_exit_2_naming_the_option(
        row, tmp_path, src, capsys):
    if row.kind.flag:
        pytest.skip("a bare flag has no value")
    rc = cli.main(serve_args(src, tmp_path, row.flag, bad(row)))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"nbdmirror: {row.name}: ") and \
        err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == [tmp_path / "src.img"]  # nothing made


@pytest.mark.parametrize("row", JOBS, ids=str)
def test_bad_job_value_from_qmp_names_the_argument(row):
    value = bad(row)
    if row.kind.qmp is int:
        value = row.kind.hi + 1 if isinstance(row.kind, Size) else -1
    elif row.kind.qmp is float:
        value = -1
    elif row.kind.qmp is bool:
        pytest.skip("a JSON boolean is always a good boolean")
    with pytest.raises(QMPError) as e:
        drive_mirror(**{row.name: value})
    if isinstance(value, int) and value >= 1 << 63:
        # Outside int64, QEMU's own wording: its parser reads a double.
        assert e.value.desc == (f"Invalid parameter type for "
                                f"'{row.name}', expected: integer")
    else:
        assert e.value.desc.startswith(f"{row.name}: "), e.value.desc


@pytest.mark.parametrize("row", JOBS, ids=str)
def test_bad_start_value_is_exit_2_before_connecting(row, tmp_path, capsys):
    if row.kind.flag:
        pytest.skip("a bare flag has no value")
    rc = cli.main(["start", "--control", str(tmp_path / "none.sock"),
                   "--target", TGT, row.flag, bad(row)])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"nbdmirror: {row.name}: ")


# -- limits ------------------------------------------------------------------------------

def test_buf_size_is_at_most_1g():
    assert MAX_BUF_SIZE == G
    assert make_job_options({"target": TGT, "buf-size": "1G"}).buf_size == G
    assert make_job_options({"target": TGT, "buf-size": G}).buf_size == G
    for too_big in ("2G", G + 1, "1T", 2 ** 64, "9" * 30):
        with pytest.raises(OptionError, match="^buf-size: .*(range|large)"):
            make_job_options({"target": TGT, "buf-size": too_big})


def test_buf_size_limit_every_way_in(tmp_path, src, capsys):
    with pytest.raises(OptionError, match="^buf-size: '2G' is out of range "
                                          r"\(4K to 1G\)$"):
        ProxyOptions().set("buf-size", "2G")
    with pytest.raises(QMPError, match="^buf-size: "):
        drive_mirror(**{"buf-size": 2 * G})
    assert cli.main(serve_args(src, tmp_path, "--target", TGT,
                               "--buf-size", "2G")) == 2
    assert "buf-size: '2G'" in capsys.readouterr().err


@pytest.mark.parametrize("speed", [(1 << 63) - 1, "8388607T"])
def test_speed_up_to_qemus_int64(speed):
    assert make_job_options({"target": TGT, "speed": speed}).speed == \
        to_bytes(speed)


@pytest.mark.parametrize("speed", [1 << 63, 10 ** 400, "8192P", "9" * 401,
                                   -1, 1.5])
def test_speed_beyond_int64_or_negative_refused(speed):
    with pytest.raises(OptionError, match="^speed: "):
        make_job_options({"target": TGT, "speed": speed})


@pytest.mark.parametrize("key", ["connect-timeout", "io-timeout"])
@pytest.mark.parametrize("value,want", [("10", 10.0), ("0.25", 0.25),
                                        ("1e3", 1000.0), ("7", 7.0)])
def test_timeouts_are_positive_seconds(key, value, want):
    p = ProxyOptions()
    p.set(key, value)
    assert getattr(p, key.replace("-", "_")) == want
    assert isinstance(getattr(p, key.replace("-", "_")), float)


@pytest.mark.parametrize("key", ["connect-timeout", "io-timeout"])
@pytest.mark.parametrize("bad_value", ["0", "-1", "nan", "inf", "1e400",
                                       "soon", "", "2e6"])
def test_timeouts_refuse_what_is_not_a_positive_time(key, bad_value):
    with pytest.raises(OptionError, match=f"^{key}: "):
        ProxyOptions().set(key, bad_value)


def test_timeout_defaults():
    p = ProxyOptions()
    assert (p.connect_timeout, p.io_timeout) == (10.0, 30.0)
    assert all(isinstance(t, float) and math.isfinite(t)
               for t in (p.connect_timeout, p.io_timeout))


# -- job options -----------------------------------------------------------------------

def test_job_defaults_are_the_interfaces():
    o = make_job_options({"target": TGT})
    assert o == JobOptions(target=TGT, sync="full", job_id="mirror0",
                           speed=0, granularity=64 * K, buf_size=16 * M,
                           copy_mode="background", on_source_error="report",
                           on_target_error="report", target_is_zero=False)


def test_job_options_has_one_field_per_job_row():
    assert [f.name for f in dataclasses.fields(JobOptions)] == \
        [r.field for r in JOBS]
    for f in dataclasses.fields(JobOptions):
        row = OPTIONS[f.name.replace("_", "-")]
        assert f.default == (dataclasses.MISSING if row.default is None
                             and row.qmp == REQUIRED else row.default)


def test_job_options_parse_strings_as_from_the_command_line():
    o = make_job_options({
        "target": TGT, "sync": "top", "job-id": "j1", "speed": "10M",
        "granularity": "1M", "buf-size": "64M", "copy-mode": "background",
        "on-source-error": "ignore", "on-target-error": "stop",
        "target-is-zero": "true"})
    assert (o.sync, o.job_id, o.speed, o.granularity, o.buf_size) == \
        ("top", "j1", 10 * M, M, 64 * M)
    assert (o.on_source_error, o.on_target_error, o.target_is_zero) == \
        ("ignore", "stop", True)


def test_job_options_take_json_types_as_from_qmp():
    o = make_job_options({"target": TGT, "speed": 1000,
                          "granularity": 4096, "buf-size": 1 << 20,
                          "target-is-zero": False})
    assert (o.speed, o.granularity, o.buf_size, o.target_is_zero) == \
        (1000, 4096, M, False)


def test_qmp_arguments_round_trip_through_drive_mirror():
    o = make_job_options({"target": TGT, "speed": "1M", "sync": "none",
                          "target-is-zero": "on"})
    assert drive_mirror(**qmp_arguments(o)) == o


@pytest.mark.parametrize("g", ["4K", "8K", "64K", "1M", "64M", 4096, 64 * M])
def test_granularity_accepts_powers_of_two_from_4k_to_64m(g):
    assert make_job_options({"target": TGT, "granularity": g}).granularity \
        == parse_size(g)


@pytest.mark.parametrize("g", ["2K", "4095", "96K", "128M", "0", 3 * K,
                               "64G", "big"])
def test_granularity_refused_outside_bounds_or_not_a_power_of_two(g):
    with pytest.raises(OptionError, match="^granularity: "):
        make_job_options({"target": TGT, "granularity": g})


@pytest.mark.parametrize("key,bad_value", [
    ("sync", "incremental"), ("sync", ""), ("copy-mode", "sync"),
    ("on-source-error", "retry"), ("on-target-error", "REPORT"),
    ("speed", "fast"), ("speed", -1), ("buf-size", "4095"), ("buf-size", 0),
    ("buf-size", "lots"), ("target-is-zero", "maybe"), ("target-is-zero", 2),
    ("job-id", ""), ("job-id", 7), ("target", "/tmp/x.img"),
    ("target", "http://host/x"), ("target", ""), ("target", None),
])
def test_bad_job_value_names_its_key(key, bad_value):
    with pytest.raises(OptionError) as e:
        make_job_options({"target": TGT, key: bad_value})
    msg = str(e.value)
    assert msg.startswith(f"{key}: "), msg
    assert "\n" not in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("value,want", [
    (True, True), (False, False), ("1", True), ("yes", True), ("ON", True),
    ("true", True), ("0", False), ("no", False), ("off", False),
    ("False", False),
])
def test_target_is_zero_booleans(value, want):
    assert make_job_options(
        {"target": TGT, "target-is-zero": value}).target_is_zero is want


@pytest.mark.parametrize("key", ["device", "source", "socket", "buf_size"])
def test_unknown_job_key_is_named(key):
    with pytest.raises(OptionError, match=f"unknown job option '{key}'"):
        make_job_options({"target": TGT, key: "x"})


def test_target_is_required():
    with pytest.raises(OptionError, match="^target: required"):
        make_job_options({"sync": "full"})


@pytest.mark.parametrize("uri", [
    "nbd://localhost", "nbd://127.0.0.1:10809/export", "nbds://h/e",
    "nbd+unix:///?socket=/tmp/s", "nbds+unix:///e?socket=/tmp/s"])
def test_nbd_uris(uri):
    assert parse_nbd_uri(uri) == uri
    assert is_nbd_uri(uri)


@pytest.mark.parametrize("bad_uri", ["/tmp/x.img", "x.img", "file:///x",
                                     "nbd+tcp://h"])
def test_not_nbd_uris(bad_uri):
    assert not is_nbd_uri(bad_uri)
    with pytest.raises(OptionError, match="^target: .* is not an NBD URI"):
        parse_nbd_uri(bad_uri)


# -- the source --------------------------------------------------------------------------

def test_source_file_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "disk.img").write_bytes(b"\0" * 512)
    monkeypatch.chdir(tmp_path)
    assert parse_source("disk.img") == str(tmp_path / "disk.img")


def test_source_nbd_uri_kept_as_is():
    assert parse_source(TGT) == TGT


@pytest.mark.parametrize("bad_source", ["", None, "/nonexistent/disk.img"])
def test_bad_source_is_named(bad_source):
    with pytest.raises(OptionError, match="^source: "):
        parse_source(bad_source)


# -- ProxyOptions -------------------------------------------------------------------------

def test_proxy_set_applies_proxy_and_job_keys(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    p = ProxyOptions()
    for k, v in [("source", str(img)), ("control", "rel.sock"),
                 ("device", "vda"), ("target", TGT), ("speed", "1M"),
                 ("sync", "none"), ("pidfile", "p.pid")]:
        p.set(k, v)
    assert p.source == str(img)
    assert p.control.endswith("/rel.sock") and p.control.startswith("/")
    assert p.pidfile.endswith("/p.pid") and p.pidfile.startswith("/")
    assert p.device == "vda"
    assert p.job == {"target": TGT, "speed": M, "sync": "none"}
    p.check()
    o = p.job_options()
    assert (o.target, o.speed, o.sync, o.job_id) == (TGT, M, "none",
                                                     "mirror0")


def test_proxy_defaults():
    p = ProxyOptions()
    assert (p.device, p.pidfile, p.job) == ("disk0", None, {})
    assert p.job_options() is None


@pytest.mark.parametrize("key", ["foo", "targets", "job_id", "buf_size", "",
                                 "socket", "threads", "port"])
def test_proxy_set_refuses_unknown_keys_naming_them(key):
    with pytest.raises(OptionError, match=f"^unknown key '{key}'$"):
        ProxyOptions().set(key, "1")


def test_proxy_check_requires_source_and_control(tmp_path):
    p = ProxyOptions()
    with pytest.raises(OptionError, match="^source: required"):
        p.check()
    p.source = str(tmp_path)
    with pytest.raises(OptionError, match="^control: required"):
        p.check()
    p.control = str(tmp_path / "c.sock")
    p.check()


def test_proxy_check_job_keys_need_a_target(tmp_path):
    p = ProxyOptions(source="/x", control=str(tmp_path / "c"))
    p.set("buf-size", "1M")
    p.set("speed", "1M")
    with pytest.raises(OptionError,
                       match="^buf-size: job options need target="):
        p.check()


def test_proxy_check_bitmap_is_a_job_option_made_absolute(tmp_path):
    p = ProxyOptions(source="/x", control=str(tmp_path / "c"))
    p.set("bitmap", "b.bin")
    assert p.job["bitmap"].startswith("/")
    with pytest.raises(OptionError, match="^bitmap: job options need "
                                          "target=$"):
        p.check()
    p.set("target", TGT)
    p.check()
    assert p.job_options().bitmap == p.job["bitmap"]


def test_proxy_check_bitmap_discard_needs_a_bitmap(tmp_path):
    p = ProxyOptions(source="/x", control=str(tmp_path / "c"))
    p.set("target", TGT)
    p.set("bitmap-discard", "true")
    with pytest.raises(OptionError, match="^bitmap-discard: needs bitmap=$"):
        p.check()


def test_proxy_check_bitmap_must_not_be_another_path(tmp_path):
    p = ProxyOptions(source=str(tmp_path / "src"), control=str(tmp_path / "c"))
    (tmp_path / "src").write_bytes(b"")
    p.set("target", TGT)
    p.set("bitmap", str(tmp_path / "src"))
    with pytest.raises(OptionError, match="^bitmap: .*the same file as "
                                          "source"):
        p.check()


def test_proxy_options_constructor_takes_only_proxy_fields():
    assert ProxyOptions(io_timeout=5.0).io_timeout == 5.0
    with pytest.raises(TypeError):
        ProxyOptions(speed=1)


def test_serve_help_shows_every_option_with_its_help_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())     # unwrapped
    for row in ALL:
        assert row.flag in text
        assert " ".join(row.help.split()) in text, row
        if row.default is not None:
            assert f"(default: {row.default_text})" in text, row
