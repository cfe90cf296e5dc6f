# DeltaBox: the two commands a fresh machine needs are `make demo` and `make test`.
# Every step is idempotent and cached: a second run takes seconds.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
export DELTABOX_CACHE ?= /var/cache/deltabox

.PHONY: demo test setup host venv build clean-build install uninstall

demo: setup
	$(VENV)/bin/deltabox demo

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

setup: host venv build

# apt packages, CRIU >= 4 (built from Debian's source if needed), the tiny and demo images,
# the systemd rootfs that tests/test_service_e2e.py boots with systemd-nspawn
host:
	bash native/setup-host.sh all

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,cli,test]'
	touch $@

venv: $(VENV)/.installed

# generated protobuf code, the cffi extension, the static sandbox init
build: venv
	$(PY) native/build.py

# A host service (docs/install.md): /opt/deltabox/venv from the project's wheel, `deltabox` on
# PATH, the unit, the `deltabox` group, /etc/deltabox/config.toml. CRIU and the images come from
# `make host`. DESTDIR=dir stages it (tests); `make uninstall PURGE=1` also drops the state dir.
install: venv
	$(if $(DESTDIR),,bash native/setup-host.sh packages criu)
	DESTDIR=$(DESTDIR) bash native/install.sh install

uninstall:
	DESTDIR=$(DESTDIR) PURGE=$(PURGE) bash native/install.sh uninstall

clean-build:
	rm -rf deltabox/_proto deltabox/_bin deltabox/_native*.so build *.egg-info
