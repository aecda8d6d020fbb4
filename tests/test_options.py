"""Option parsing: sizes, every job key, and the plugin's key=value table.

A bad value must be refused with a one-line message that names the option,
whichever way it arrived (plugin key, `serve` flag, QMP argument).
"""

import dataclasses

import pytest

from nbdmirror.options import (
    JOB_KEYS, PROXY_KEYS, JobOptions, OptionError, ProxyOptions,
    is_nbd_uri, make_job_options, parse_nbd_uri, parse_source)
from nbdmirror.sizes import format_size, parse_size

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
    None, 2.5, -1, True, False,
])
def test_parse_size_refuses_with_the_option_name(bad):
    with pytest.raises(ValueError) as e:
        parse_size(bad, "buf-size")
    msg = str(e.value)
    assert msg.startswith("buf-size: ")
    assert "\n" not in msg


def test_parse_size_names_size_by_default():
    with pytest.raises(ValueError, match="^size: "):
        parse_size("lots")


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (16 * M, "16.0 MiB"), (3 * G, "3.0 GiB"), (2048 * T, "2048.0 TiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


# -- job options -----------------------------------------------------------------------

def test_job_defaults_are_the_interfaces():
    o = make_job_options({"target": TGT})
    assert o == JobOptions(target=TGT, sync="full", job_id="mirror0",
                           speed=0, granularity=64 * K, buf_size=16 * M,
                           copy_mode="background", on_source_error="report",
                           on_target_error="report", target_is_zero=False)


def test_job_keys_cover_every_job_field():
    fields = {f.name for f in dataclasses.fields(JobOptions)}
    assert {field for field, _ in JOB_KEYS.values()} == fields
    assert all(k == f.replace("_", "-") for k, (f, _) in JOB_KEYS.items())


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


@pytest.mark.parametrize("g", ["4K", "8K", "64K", "1M", "64M", 4096, 64 * M])
def test_granularity_accepts_powers_of_two_from_4k_to_64m(g):
    assert make_job_options({"target": TGT, "granularity": g}).granularity \
        == parse_size(g)


@pytest.mark.parametrize("g", ["2K", "4095", "96K", "128M", "0", 3 * K,
                               "64G", "big"])
def test_granularity_refused_outside_bounds_or_not_a_power_of_two(g):
    with pytest.raises(OptionError, match="^granularity: "):
        make_job_options({"target": TGT, "granularity": g})


@pytest.mark.parametrize("key,bad", [
    ("sync", "incremental"), ("sync", ""), ("copy-mode", "sync"),
    ("on-source-error", "retry"), ("on-target-error", "REPORT"),
    ("speed", "fast"), ("speed", -1), ("buf-size", "4095"), ("buf-size", 0),
    ("buf-size", "lots"), ("target-is-zero", "maybe"), ("target-is-zero", 2),
    ("job-id", ""), ("job-id", 7), ("target", "/tmp/x.img"),
    ("target", "http://host/x"), ("target", ""), ("target", None),
])
def test_bad_job_value_names_its_key(key, bad):
    args = {"target": TGT, key: bad}
    with pytest.raises(OptionError) as e:
        make_job_options(args)
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


def test_unknown_job_key_is_named():
    with pytest.raises(OptionError, match="unknown job option 'device'"):
        make_job_options({"target": TGT, "device": "disk0"})


def test_target_is_required():
    with pytest.raises(OptionError, match="^target: required"):
        make_job_options({"sync": "full"})


def test_copy_mode_takes_write_blocking_and_names_a_bad_one():
    opts = make_job_options({"target": TGT, "copy-mode": "write-blocking"})
    assert opts.copy_mode == "write-blocking"
    with pytest.raises(OptionError, match="^copy-mode: "):
        make_job_options({"target": TGT, "copy-mode": "sideways"})


@pytest.mark.parametrize("uri", [
    "nbd://localhost", "nbd://127.0.0.1:10809/export", "nbds://h/e",
    "nbd+unix:///?socket=/tmp/s", "nbds+unix:///e?socket=/tmp/s"])
def test_nbd_uris(uri):
    assert parse_nbd_uri(uri) == uri
    assert is_nbd_uri(uri)


@pytest.mark.parametrize("bad", ["/tmp/x.img", "x.img", "file:///x",
                                 "nbd+tcp://h"])
def test_not_nbd_uris(bad):
    assert not is_nbd_uri(bad)
    with pytest.raises(OptionError, match="^target: .* is not an NBD URI"):
        parse_nbd_uri(bad)


# -- the source --------------------------------------------------------------------------

def test_source_file_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "disk.img").write_bytes(b"\0" * 512)
    monkeypatch.chdir(tmp_path)
    assert parse_source("disk.img") == str(tmp_path / "disk.img")


def test_source_nbd_uri_kept_as_is():
    assert parse_source(TGT) == TGT


@pytest.mark.parametrize("bad", ["", None, "/nonexistent/disk.img"])
def test_bad_source_is_named(bad):
    with pytest.raises(OptionError, match="^source: "):
        parse_source(bad)


# -- plugin keys (ProxyOptions) -------------------------------------------------------------

def test_proxy_keys_and_job_keys_do_not_overlap():
    assert not set(PROXY_KEYS) & set(JOB_KEYS)


def test_proxy_set_applies_proxy_and_job_keys(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    p = ProxyOptions()
    for k, v in [("source", str(img)), ("control", "rel.sock"),
                 ("device", "vda"), ("target", TGT), ("speed", "1M"),
                 ("sync", "none")]:
        p.set(k, v)
    assert p.source == str(img)
    assert p.control.endswith("/rel.sock") and p.control.startswith("/")
    assert p.device == "vda"
    assert p.job == {"target": TGT, "speed": M, "sync": "none"}
    p.check()
    o = p.job_options()
    assert (o.target, o.speed, o.sync, o.job_id) == (TGT, M, "none",
                                                     "mirror0")


def test_proxy_defaults():
    p = ProxyOptions()
    assert (p.device, p.bitmap, p.job) == ("disk0", None, {})
    assert p.job_options() is None


@pytest.mark.parametrize("key", ["foo", "targets", "job_id", "buf_size", ""])
def test_proxy_set_refuses_unknown_keys_naming_them(key):
    p = ProxyOptions()
    with pytest.raises(OptionError, match=f"^unknown key '{key}'$"):
        p.set(key, "1")


@pytest.mark.parametrize("key,bad", [
    ("granularity", "3K"), ("speed", "x"), ("sync", "all"),
    ("device", ""), ("target", "disk.img"), ("source", "/no/such/file")])
def test_proxy_set_refuses_bad_values_naming_the_key(key, bad):
    with pytest.raises(OptionError, match=f"^{key}: "):
        ProxyOptions().set(key, bad)


def test_proxy_check_requires_source_and_control(tmp_path):
    p = ProxyOptions()
    with pytest.raises(OptionError, match="^source: required"):
        p.check()
    p.source = str(tmp_path)
    with pytest.raises(OptionError, match="^control: required"):
        p.check()
    p.control = "/tmp/c.sock"
    p.check()


def test_proxy_check_job_keys_need_a_target():
    p = ProxyOptions(source="/x", control="/c")
    p.set("speed", "1M")
    p.set("buf-size", "1M")
    with pytest.raises(OptionError,
                       match="^buf-size: job options need target="):
        p.check()


def test_proxy_check_refuses_bitmap_for_now():
    p = ProxyOptions(source="/x", control="/c")
    p.set("bitmap", "b.bin")
    assert p.bitmap.startswith("/")
    with pytest.raises(OptionError, match="^bitmap: "):
        p.check()
