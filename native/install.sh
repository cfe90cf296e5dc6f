#!/usr/bin/env bash
# Install DeltaBox as a host service, or remove it again.
#
#   native/install.sh install | uninstall | status | wheel [DIR]
#
# install: builds the project's wheel (native init + cffi extension inside), a venv from it in
#   $PREFIX/venv (Debian's python3, nothing under /root), `deltabox` on PATH, the unit, the
#   `deltabox` system group (owner of the socket), /etc/deltabox/config.toml (kept if edited),
#   the state dir 0700 and the docs. The CRIU build of native/setup-host.sh stays in $PREFIX/criu.
# uninstall: removes what install added; the state dir (layers, branches, the database) and an
#   edited config are kept unless PURGE=1. CRIU ($PREFIX/criu) belongs to setup-host.sh: kept.
# Both are idempotent: a second run does (almost) nothing new and succeeds.
#
# Environment:
#   DESTDIR   stage everything below this root (tests): no group, no systemctl. The venv then
#             lives at $DESTDIR$PREFIX and works there, but the unit names $PREFIX.
#   PREFIX    (default /opt/deltabox)   BINDIR (default /usr/local/bin)
#   UNITDIR   (default /etc/systemd/system)   CONFDIR (default /etc/deltabox)
#   STATEDIR  (default /var/lib/deltabox)     GROUP (default deltabox)
#   PYTHON    interpreter for the installed venv (default /usr/bin/python3)
#   BUILD_PYTHON  interpreter that builds the wheel (default .venv/bin/python: no downloads)
#   PURGE=1   uninstall also removes the state dir and the config
#   WHEEL     install this wheel (made by `native/install.sh wheel DIR`) instead of building
#             one: a host without compilers (tests/test_service_e2e.py's container)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PREFIX=${PREFIX:-/opt/deltabox}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/deltabox}
STATEDIR=${STATEDIR:-/var/lib/deltabox}
GROUP=${GROUP:-deltabox}
PYTHON=${PYTHON:-/usr/bin/python3}
BUILD_PYTHON=${BUILD_PYTHON:-$ROOT/.venv/bin/python}
PURGE=${PURGE:-0}
WHEEL=${WHEEL:-}
UNIT=deltabox.service

D=$DESTDIR  # shorthand: every path written is $D<final path>
CONFIG_SUM=$D$PREFIX/.config.sha256    # the shipped config's checksum: unedited => removable

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
host_systemd() { [[ -z $D && -d /run/systemd/system ]]; }

TMP=
cleanup() { if [[ -n $TMP ]]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT

build_wheel() {
    local out=$1 src
    src=$TMP/src
    # Build from a clean copy: no in-tree build/ or egg-info left behind, no stale artefacts
    # (the wheel's _bin/ and _native*.so are built by setup.py -> native/build.py).
    mkdir -p "$src"
    tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=./deltabox/_proto --exclude=./deltabox/_bin \
        --exclude='./deltabox/_native*.so' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.hypothesis --exclude=./rl_examples -cf - . | tar -C "$src" -xf -
    if [[ -x $BUILD_PYTHON ]] && "$BUILD_PYTHON" -c 'import setuptools, cffi, grpc_tools, wheel' 2>/dev/null; then
        "$BUILD_PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$src" >"$TMP/wheel.log" 2>&1 ||
            { tail -n 30 "$TMP/wheel.log" >&2; die "pip wheel failed"; }
    else  # isolated build: pip fetches the build requirements from the index
        "$PYTHON" -m pip wheel -q --no-deps -w "$out" "$src" >"$TMP/wheel.log" 2>&1 ||
            { tail -n 30 "$TMP/wheel.log" >&2; die "pip wheel failed"; }
    fi
    local whl
    whl=$(ls "$out"/deltabox-*.whl)
    check_wheel "$whl"
    printf '%s\n' "$whl"
}

# The wheel must carry the native parts, or the daemon fails at the first sandbox.
check_wheel() {
    "$PYTHON" - "$1" <<'EOF' || die "the wheel lacks the native init or the cffi extension"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
ok = "deltabox/_bin/deltabox-init" in names and any(
    n.startswith("deltabox/_native") and n.endswith(".so") for n in names)
sys.exit(0 if ok else 1)
EOF
}


install_config() {
    local dst=$D$CONFDIR/config.toml
    install -d -m 0755 "$D$CONFDIR"
    if [[ -e $dst ]] && ! [[ -f $CONFIG_SUM && $(sha256sum <"$dst") == "$(cat "$CONFIG_SUM")" ]]; then
        log "config: $dst edited by the admin: kept (shipped version: $dst.dist)"
        install -m 0644 "$ROOT/systemd/config.toml" "$dst.dist"
        return
    fi
    sed "s/^socket-group = \"deltabox\"/socket-group = \"$GROUP\"/" "$ROOT/systemd/config.toml" >"$dst"
    chmod 0644 "$dst"
    sha256sum <"$dst" >"$CONFIG_SUM"
}

do_install() {
    [[ -x $PYTHON ]] || die "$PYTHON missing (apt-get install python3 python3-venv)"
    local venv=$D$PREFIX/venv whl
    install -d -m 0755 "$D$PREFIX"

    TMP=$(mktemp -d /tmp/deltabox-install.XXXXXX)
    if [[ -n $WHEEL ]]; then
        [[ -f $WHEEL ]] || die "WHEEL=$WHEEL: no such file"
        whl=$WHEEL
        check_wheel "$whl"
    else
        log "wheel: building from $ROOT"
        whl=$(build_wheel "$TMP/wheels" | tail -n1)
    fi
    log "wheel: $(basename "$whl") (has deltabox/_bin/deltabox-init and _native*.so)"

    # A venv holds absolute paths, so it is created in place; an upgrade reinstalls the
    # package into it and leaves the dependencies that are already satisfied.
    if [[ ! -x $venv/bin/python ]]; then
        log "venv: $venv ($("$PYTHON" --version))"
        "$PYTHON" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$whl"
    # The daemon's dependencies are the `server` extra (the base install is the client).
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$whl[server,cli]"
    # -I: the installed package, not the one in the current directory
    "$venv/bin/python" -I -c 'import deltabox._native, deltabox.config as c; c.init_binary()' ||
        die "the installed package does not import its native parts"

    install -d -m 0755 "$D$PREFIX/docs"
    install -m 0644 "$ROOT/README.md" "$D$PREFIX/README.md"
    install -m 0644 "$ROOT"/docs/*.md "$D$PREFIX/docs/"

    install -d -m 0755 "$D$BINDIR"
    ln -sfn "$PREFIX/venv/bin/deltabox" "$D$BINDIR/deltabox"

    install -d -m 0755 "$D$UNITDIR"
    sed -e "s|/opt/deltabox|$PREFIX|g" -e "s|/etc/deltabox|$CONFDIR|g" \
        -e "s|/var/lib/deltabox|$STATEDIR|g" \
        "$ROOT/systemd/$UNIT" >"$D$UNITDIR/$UNIT.tmp"
    chmod 0644 "$D$UNITDIR/$UNIT.tmp"
    mv -f "$D$UNITDIR/$UNIT.tmp" "$D$UNITDIR/$UNIT"

    install_config

    # The store holds setuid binaries and agents' data: root only (the unit says 0700 too).
    install -d -m 0700 "$D$STATEDIR"
    chmod 0700 "$D$STATEDIR"

    if [[ -z $D ]]; then
        if ! getent group "$GROUP" >/dev/null; then
            groupadd --system "$GROUP"
            printf '%s\n' "$GROUP" >"$PREFIX/.created-group"
            log "group: $GROUP created (add trainers: usermod -aG $GROUP USER)"
        fi
        [[ -x $PREFIX/criu/sbin/criu ]] ||
            log "WARNING: no CRIU in $PREFIX/criu: run 'make host' (native/setup-host.sh criu)"
    fi
    if host_systemd; then
        systemctl daemon-reload
        log "systemd: $UNITDIR/$UNIT installed; start it with: systemctl enable --now deltabox"
        if systemctl is-active --quiet "$UNIT"; then
            log "systemd: $UNIT is running the old version: systemctl restart deltabox"
        fi
    else
        log "unit: $D$UNITDIR/$UNIT (no systemd running here: not loaded)"
    fi
    log "done: $D$PREFIX ($(cat "$D$PREFIX/venv/lib/python3"*/site-packages/deltabox-*.dist-info/METADATA |
        awk '/^Version:/ {print "deltabox " $2; exit}'))"
}

# Refuse to delete a state dir with something mounted below it (a running daemon's store).
mounted_below() { awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts; }

do_uninstall() {
    if host_systemd && systemctl is-active --quiet "$UNIT" 2>/dev/null; then
        log "systemd: stopping $UNIT"
        systemctl stop "$UNIT"
    fi
    if host_systemd && systemctl is-enabled --quiet "$UNIT" 2>/dev/null; then
        systemctl disable --quiet "$UNIT"
    fi
    # Never remove a file the admin replaced: the symlink only if it is ours.
    if [[ -L $D$BINDIR/deltabox && $(readlink "$D$BINDIR/deltabox") == "$PREFIX/venv/bin/deltabox" ]]; then
        rm -f "$D$BINDIR/deltabox"
    fi
    rm -f "$D$UNITDIR/$UNIT"
    if host_systemd; then systemctl daemon-reload; fi
    local cfg=$D$CONFDIR/config.toml
    if [[ -f $cfg ]]; then
        if [[ $PURGE == 1 ]] || [[ -f $CONFIG_SUM && $(sha256sum <"$cfg") == "$(cat "$CONFIG_SUM")" ]]; then
            rm -f "$cfg"
        else
            log "config: $cfg was edited: kept (PURGE=1 removes it)"
        fi
    fi
    rm -f "$cfg.dist"
    rmdir "$D$CONFDIR" 2>/dev/null || true
    rm -rf "$D$PREFIX/venv" "$D$PREFIX/docs" "$D$PREFIX/README.md"
    if [[ -z $D && -f $PREFIX/.created-group ]]; then
        local g
        g=$(cat "$PREFIX/.created-group")
        getent group "$g" >/dev/null && groupdel "$g"
        rm -f "$PREFIX/.created-group"
    fi
    rm -f "$CONFIG_SUM"
    # $PREFIX itself only if nothing else (CRIU) is left in it.
    rmdir "$D$PREFIX" 2>/dev/null || true
    if [[ $PURGE == 1 && -d $D$STATEDIR ]]; then
        local m
        m=$(mounted_below "$(readlink -f "$D$STATEDIR")")
        [[ -z $m ]] || die "PURGE: still mounted below $D$STATEDIR (is a daemon running?): $m"
        rm -rf --one-file-system "$D$STATEDIR"
        log "purged $D$STATEDIR"
    elif [[ -d $D$STATEDIR ]]; then
        log "state: $D$STATEDIR kept (PURGE=1 removes it)"
    fi
    log "uninstalled"
}

do_status() {
    local f
    for f in "$PREFIX/venv/bin/deltabox" "$BINDIR/deltabox" "$UNITDIR/$UNIT" "$CONFDIR/config.toml" "$STATEDIR" "$PREFIX/criu/sbin/criu"; do
        if [[ -e $D$f ]]; then printf 'present  %s\n' "$D$f"; else printf 'missing  %s\n' "$D$f"; fi
    done
    getent group "$GROUP" >/dev/null && echo "present  group $GROUP" || echo "missing  group $GROUP"
}

case ${1:-} in
wheel)  # build the wheel only, into ${2:-dist}; prints its path
    TMP=$(mktemp -d /tmp/deltabox-install.XXXXXX)
    mkdir -p "${2:-dist}"
    whl=$(build_wheel "$TMP/wheels" | tail -n1)
    mv -f "$whl" "${2:-dist}/"
    printf '%s\n' "${2:-dist}/$(basename "$whl")" ;;
install) do_install ;;
uninstall) do_uninstall ;;
status) do_status ;;
*) echo "usage: $0 install|uninstall|status|wheel [DIR]  (env: DESTDIR PREFIX PURGE=1 ...)" >&2; exit 2 ;;
esac
