# nbdmirror: set-up, tests, demo and benchmark.
#
# `make setup` installs what a fresh Debian 12 machine lacks (apt, only when a
# package is missing), then a venv that sees the system site-packages (the
# Debian-built `nbd` module works only with /usr/bin/python3) with this
# package and its test extra, and byte-compiles the package.  Repeated runs
# do nothing (but compile what changed).

SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# e.g. make test ARGS='tests/test_bitmap.py -x'
ARGS ?=

DEB_PACKAGES := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin \
	qemu-utils python3-venv python3-pip python3-bitarray python3-tqdm \
	python3-pytest python3-pytest-timeout qemu-system-x86 qemu-system-common \
	gnutls-bin fio

.PHONY: setup debs pyc test test-all demo bench clean

setup: debs $(STAMP) pyc

# Installs only the missing packages; prints nothing when all are there.
debs:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null \
			| grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
		$$sudo apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing; \
	fi

$(PY): | debs
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml | $(PY)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip install -q -e '.[test]'
	touch $@

# The .pyc files of the package, which an editable install does not make.
# Without them every `nbdmirror serve` compiles what it loads twice, in the
# CLI (about 15 ms) and in nbdkit's embedded interpreter (about 35 ms), when
# PYTHONDONTWRITEBYTECODE is set or the checkout is read-only, and the
# first run after a change does anywhere.  Python still checks each .pyc
# against its source's mtime and size, so an edited file is never run
# stale; this recompiles only what changed.
pyc: | $(PY)
	$(PY) -m compileall -q --invalidation-mode timestamp nbdmirror

test: setup
	$(PYTEST) $(ARGS)

test-all: setup
	$(PYTEST) -m '' $(ARGS)

demo: setup
	$(PY) -m nbdmirror.demo

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) *.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
