"""Reference nbdkit Python plugin: serve a file read-only with os.preadv
straight into nbdkit's buffer, nothing else.  The floor for any Python
plugin's file read path.

    nbdkit python bench/plugins/read_file.py file=PATH
"""

import os

import nbdkit

API_VERSION = 2
_path = None
_fd = -1


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown key {key}")
    _path = os.path.abspath(value)


def config_complete():
    global _fd
    _fd = os.open(_path, os.O_RDONLY)


def open(readonly):
    return 1


def get_size(_):
    return os.fstat(_fd).st_size


def can_write(_):
    return False


def can_multi_conn(_):
    return True


def pread(_, buf, offset, flags):
    os.preadv(_fd, [buf], offset)
