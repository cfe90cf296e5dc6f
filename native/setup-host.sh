#!/usr/bin/env bash
# Prepare a fresh DeltaBox host (Debian 12 bookworm, root): packages, CRIU 4.1.1 + libcriu,
# and the two rootfs images the daemon and tests use.
#
#   native/setup-host.sh packages | criu | image-tiny | image-demo | service-rootfs | all
#
# Idempotent and cached: every step first validates its result (not just a stamp) and
# returns at once when it is already there, so a second `all` takes seconds.
#
# Environment:
#   DELTABOX_CACHE        cache root            (default /var/cache/deltabox)
#   DELTABOX_CRIU_PREFIX  CRIU install prefix   (default /opt/deltabox/criu)
set -euo pipefail

CACHE=${DELTABOX_CACHE:-/var/cache/deltabox}
CRIU_PREFIX=${DELTABOX_CRIU_PREFIX:-/opt/deltabox/criu}
IMAGES=$CACHE/images
STAMPS=$CACHE/stamps

CRIU_VERSION=4.1.1
CRIU_ORIG=criu_${CRIU_VERSION}.orig.tar.xz
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
# Debian suite that carries CRIU 4.1.1 (bookworm's 3.17.1 fails `criu check` on kernel 6.18).
CRIU_SUITE=trixie
# Left out of the build: TLS for the page server and nftables network locking, neither of
# which DeltaBox uses (network_lock SKIP: a sandbox's netns is dumped empty). Every criu
# process pays for its libraries when it starts: 2.8-3.9 ms of CPU with them (22 shared
# objects), 0.8-0.9 ms without (7); one criu runs per dump and per restore.
# NO_NFTABLES is our patch 0007.
CRIU_FEATURES=(NO_GNUTLS=1 NO_NFTABLES=1)

PACKAGES=(
    xfsprogs busybox-static debootstrap build-essential pkg-config patch
    # CRIU build dependencies (DESIGN.md); no asciidoc: we never build the man pages
    libprotobuf-c-dev protobuf-c-compiler libnl-3-dev libnet1-dev libcap-dev libbsd-dev
    # (no GnuTLS or nftables: built without them, CRIU_FEATURES below)
    python3-protobuf libaio-dev libprotobuf-dev protobuf-compiler
    uuid-dev libdrm-dev
    # runtime / tooling
    iproute2 iptables util-linux xz-utils zstd ca-certificates curl libffi-dev python3-venv
    # systemd-analyze (tests/test_install.py verifies the unit); installs no init system
    systemd
    # systemd-nspawn: tests/test_service_e2e.py boots the service-rootfs under a real systemd
    systemd-container
)

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

# Temp dirs removed on exit, whatever happens. A debootstrap that died half-way can leave
# proc/sys (or a bind-mounted /dev) mounted inside its target: unmount everything below the
# temp dir first (deepest first) and never let rm cross a filesystem boundary.
TMPDIRS=()
cleanup() {
    local d m
    for d in "${TMPDIRS[@]}"; do
        [[ -d $d ]] || continue
        while read -r m; do
            umount -l "$m" 2>/dev/null || true
        done < <(awk -v d="$d/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
        rm -rf --one-file-system "$d"
    done
}
trap cleanup EXIT

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Run "$@" and log how long it took.
timed() {
    local name=$1 t0 t1
    shift
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    log "$name: done in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f s", b-a}')"
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# ---------------------------------------------------------------------------------------------
# Apt sources: the Debian mirror is derived from the machine's own configuration, never
# hard-coded (the project machines point deb.debian.org at a local mirror).

os_codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && printf '%s\n' "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
}

# Print "URI SUITE COMPONENTS..." for every enabled `deb` entry, one per suite, from
# /etc/apt/sources.list, sources.list.d/*.list (one-line format) and *.sources (deb822).
# Files with other suffixes (e.g. *.disabled) are ignored, as apt does.
apt_deb_entries() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # drop comments and [options], keep type == deb
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
            awk '$1 == "deb" && NF >= 4 { $1 = ""; sub(/^ /, ""); print }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # deb822: blank-line separated stanzas; only single-line fields matter here
        awk '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no")
                    for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) print u[i], s[j], comps
                types = ""; enabled = ""; comps = ""; nu = 0; ns = 0
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                key = $1; sub(/:$/, "", key); key = tolower(key)
                $1 = ""; sub(/^ +/, ""); val = $0
                if (key == "types") types = val
                else if (key == "enabled") enabled = val
                else if (key == "components") comps = val
                else if (key == "uris") nu = split(val, u, " ")
                else if (key == "suites") ns = split(val, s, " ")
            }
            END { flush() }' "$f"
    done
}

# The mirror serving Debian main for this release: an entry whose suite is exactly the
# machine's codename (so not -security/-updates) and whose components include main.
DEBIAN_MIRROR=
debian_mirror() {
    if [[ -z $DEBIAN_MIRROR ]]; then
        local codename
        codename=$(os_codename)
        DEBIAN_MIRROR=$(apt_deb_entries |
            awk -v c="$codename" '$2 == c { for (i = 3; i <= NF; i++) if ($i == "main") { print $1; exit } }')
        [[ -n $DEBIAN_MIRROR ]] ||
            die "no apt source serves '$codename main' (checked /etc/apt/sources.list{,.d/*.list,.d/*.sources})"
        DEBIAN_MIRROR=${DEBIAN_MIRROR%/}
    fi
    printf '%s\n' "$DEBIAN_MIRROR"
}

# ---------------------------------------------------------------------------------------------
# 1. packages

missing_packages() {
    local p st
    for p in "${PACKAGES[@]}"; do
        st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ $st == "install ok installed" ]] || printf '%s\n' "$p"
    done
}

# Other apt users (engineers, unattended jobs) may hold the dpkg/lists locks: wait for them
# instead of failing. DPkg::Lock::Timeout covers the dpkg frontend lock; `apt-get update`'s
# lists lock does not honour it, hence the retry loop.
apt_locked() {
    local i err
    for i in $(seq 1 60); do
        if err=$("$@" -o DPkg::Lock::Timeout=300 2>&1 >/dev/null); then
            return 0
        fi
        grep -qi 'could not get lock\|unable to acquire\|unable to lock' <<<"$err" || { printf '%s\n' "$err" >&2; return 1; }
        ((i == 1)) && log "apt is locked by another process; waiting"
        sleep 5
    done
    printf '%s\n' "$err" >&2
    return 1
}

step_packages() {
    need_root
    local missing
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]} == 0)); then
        log "packages: all ${#PACKAGES[@]} present"
        return
    fi
    log "packages: installing ${missing[*]}"
    apt_locked apt-get update -qq
    # --no-install-recommends keeps asciidoc/docbook & friends out
    apt_locked apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) || die "packages still missing after apt-get install: ${missing[*]}"
    log "packages: installed"
}

# ---------------------------------------------------------------------------------------------
# 2. criu

criu_bin() { printf '%s\n' "$CRIU_PREFIX/sbin/criu"; }

# Our fixes on top of CRIU $CRIU_VERSION (native/criu-patches/*.patch, applied in order).
# Their fingerprint, with the build's settings, is stored in the prefix, so changing a
# patch or a setting triggers a rebuild.
PATCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-patches
# CRIU's kernel-feature cache ($RUNDIR/criu.kdat) carries a magic of its own build: two
# builds sharing /run/criu.kdat (ours and a distro's, used by Docker or Podman) delete each
# other's cache and probe the kernel again, inside our checkpoints' frozen window. Ours gets
# its own directory (deltabox/host/criu.py, KDAT_CACHE_OURS).
CRIU_RUNDIR=/run/deltabox-kdat
patches_fingerprint() {
    if compgen -G "$PATCH_DIR/*.patch" >/dev/null; then
        { cat "$PATCH_DIR"/*.patch; echo "RUNDIR=$CRIU_RUNDIR ${CRIU_FEATURES[*]}"; } |
            sha256sum | awk '{print $1}'
    else
        echo none
    fi
}

# True when the prefix holds a working CRIU >= 4 with libcriu and its headers, built
# with the current patch set.
criu_ok() {
    local bin ver out
    bin=$(criu_bin)
    [[ -x $bin ]] || return 1
    [[ $(cat "$CRIU_PREFIX/.deltabox-patches" 2>/dev/null) == "$(patches_fingerprint)" ]] || return 1
    [[ -e $CRIU_PREFIX/lib/libcriu.so && -f $CRIU_PREFIX/include/criu/criu.h ]] || return 1
    ver=$(LD_LIBRARY_PATH=$CRIU_PREFIX/lib "$bin" --version 2>/dev/null | awk '/^Version:/ { print $2 }')
    [[ -n $ver && ${ver%%.*} -ge 4 ]] || return 1
    out=$(LD_LIBRARY_PATH=$CRIU_PREFIX/lib "$bin" check 2>&1) || return 1
    grep -q 'Looks good' <<<"$out" || return 1
}

sha_ok() { [[ -f $1 ]] && [[ $(sha256sum "$1" | awk '{print $1}') == "$CRIU_SHA256" ]]; }

# Fetch criu_4.1.1.orig.tar.xz from the trixie suite of the machine's own mirror, using apt's
# tooling with a private configuration: own sources list, lists and cache dirs, so the system's
# apt state (sources, /var/lib/apt/lists, pkgcache) is left untouched.
fetch_criu_orig() {
    local dest=$1 mirror aptdir dl
    mirror=$(debian_mirror)
    aptdir=$CACHE/apt-$CRIU_SUITE
    dl=$aptdir/download
    rm -rf "$aptdir"
    mkdir -p "$aptdir/sources.list.d" "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$dl"
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$mirror" "$CRIU_SUITE" >"$aptdir/sources.list"
    # apt drops to the _apt user for downloads; let it write there (avoids the unsandboxed warning)
    chown -R _apt:root "$aptdir/lists" "$aptdir/cache" "$dl" 2>/dev/null || true
    local apt_opts=(
        -o "Dir::Etc::SourceList=$aptdir/sources.list"
        -o "Dir::Etc::SourceParts=$aptdir/sources.list.d"
        -o "Dir::State::Lists=$aptdir/lists"
        -o "Dir::Cache=$aptdir/cache"
        -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
        -o "APT::Get::List-Cleanup=false"
    )
    log "criu: apt-get update (private state, deb-src $mirror $CRIU_SUITE main)"
    apt-get "${apt_opts[@]}" update -qq || die "apt-get update of the private $CRIU_SUITE deb-src list failed"

    log "criu: apt-get source --download-only criu"
    # The .dsc may be missing on the mirror: apt-get then fails, but the orig tarball it names
    # is what counts, so look for it whatever the exit status.
    if ! (cd "$dl" && apt-get "${apt_opts[@]}" source --download-only -qq criu) >"$aptdir/source.log" 2>&1; then
        log "criu: apt-get source failed ($(grep -m1 -E '^(E|Err):' "$aptdir/source.log" || tail -n1 "$aptdir/source.log"))"
    fi
    if [[ ! -f $dl/$CRIU_ORIG ]]; then
        # Fallback: read the Sources index apt just downloaded for the pool directory and
        # fetch the tarball directly from <mirror>/<Directory>/.
        local idx dir
        idx=$(find "$aptdir/lists" -maxdepth 1 -type f -name "*_dists_${CRIU_SUITE}_main_source_Sources*" -print -quit)
        [[ -n $idx ]] || die "no $CRIU_SUITE Sources index downloaded; cannot locate $CRIU_ORIG"
        # apt-helper cat-file decompresses whatever compression apt stored the index with
        # (GzipIndexes may be on). Decompress to a file first: an early-exiting reader in a
        # pipe would SIGPIPE the writer and trip pipefail.
        /usr/lib/apt/apt-helper cat-file "$idx" >"$aptdir/Sources"
        dir=$(awk '
            /^Package: / { pkg = $2 } /^$/ { pkg = "" }
            pkg == "criu" && /^Directory: / && !done { print $2; done = 1 }' "$aptdir/Sources")
        [[ -n $dir ]] || die "package criu not found in the $CRIU_SUITE Sources index"
        grep -q " $CRIU_ORIG\$" "$aptdir/Sources" ||
            die "$CRIU_SUITE Sources index does not list $CRIU_ORIG (criu moved on?)"
        log "criu: fallback: curl $mirror/$dir/$CRIU_ORIG"
        curl -fsSL --retry 3 -o "$dl/$CRIU_ORIG.part" "$mirror/$dir/$CRIU_ORIG" ||
            die "download of $mirror/$dir/$CRIU_ORIG failed"
        mv "$dl/$CRIU_ORIG.part" "$dl/$CRIU_ORIG"
    fi
    if ! sha_ok "$dl/$CRIU_ORIG"; then
        die "sha256 mismatch for $CRIU_ORIG: got $(sha256sum "$dl/$CRIU_ORIG" | awk '{print $1}'), want $CRIU_SHA256 -- refusing to build"
    fi
    mv "$dl/$CRIU_ORIG" "$dest"
    rm -rf "$aptdir"
}

build_criu() {
    local src=$CACHE/src/$CRIU_ORIG build=$CACHE/build srcdir
    mkdir -p "$CACHE/src" "$build"
    if sha_ok "$src"; then
        log "criu: cached $src (sha256 ok)"
    else
        rm -f "$src"
        fetch_criu_orig "$src"
        log "criu: fetched $src (sha256 ok)"
    fi

    srcdir=$build/criu-$CRIU_VERSION
    rm -rf "$srcdir"
    tar -C "$build" -xf "$src"
    [[ -f $srcdir/Makefile ]] || die "unexpected tarball layout: no $srcdir/Makefile"
    local patch
    for patch in "$PATCH_DIR"/*.patch; do
        [[ -e $patch ]] || continue
        log "criu: applying $(basename "$patch")"
        patch -d "$srcdir" -p1 --quiet --forward <"$patch" || die "patch $(basename "$patch") failed"
    done

    # PYTHON pinned to Debian's interpreter (pycriu codegen only); SKIP_PIP_INSTALL keeps
    # `install-lib` from pip-installing pycriu; LIBDIR overrides the multiarch default
    # (lib/x86_64-linux-gnu) so libcriu lands at a stable $PREFIX/lib.
    local mk=(make -C "$srcdir" PYTHON=/usr/bin/python3 PREFIX="$CRIU_PREFIX" LIBDIR="$CRIU_PREFIX/lib"
        RUNDIR="$CRIU_RUNDIR" SKIP_PIP_INSTALL=1 "${CRIU_FEATURES[@]}")
    log "criu: make criu lib (-j$(nproc)) in $srcdir"
    "${mk[@]}" -j"$(nproc)" criu >"$build/criu-make.log" 2>&1 ||
        { tail -n 30 "$build/criu-make.log" >&2; die "make criu failed (log: $build/criu-make.log)"; }
    "${mk[@]}" -j"$(nproc)" lib >>"$build/criu-make.log" 2>&1 ||
        { tail -n 30 "$build/criu-make.log" >&2; die "make lib failed (log: $build/criu-make.log)"; }

    # Install only the binary, libcriu and headers (no man pages, crit, compel, plugins).
    # DESTDIR staging (same PREFIX, so nothing is rebuilt and the pkg-config file is right), then
    # the staged prefix is swapped in: a failed install never leaves a half-populated prefix.
    local stage=$build/stage
    rm -rf "$stage"
    "${mk[@]}" install-criu install-lib DESTDIR="$stage" >>"$build/criu-make.log" 2>&1 ||
        { tail -n 30 "$build/criu-make.log" >&2; die "make install failed (log: $build/criu-make.log)"; }
    local new=$stage$CRIU_PREFIX
    if [[ ! -x $new/sbin/criu && -x $new/bin/criu ]]; then
        mkdir -p "$new/sbin"
        ln -s ../bin/criu "$new/sbin/criu"
    fi
    patches_fingerprint >"$new/.deltabox-patches"
    mkdir -p "$(dirname "$CRIU_PREFIX")"
    rm -rf "$CRIU_PREFIX.new" "$CRIU_PREFIX.old"
    mv "$new" "$CRIU_PREFIX.new"
    if [[ -e $CRIU_PREFIX ]]; then mv "$CRIU_PREFIX" "$CRIU_PREFIX.old"; fi
    mv "$CRIU_PREFIX.new" "$CRIU_PREFIX"
    rm -rf "$CRIU_PREFIX.old" "$stage"
    # Built objects are not needed any more; the verified tarball stays cached for rebuilds.
    rm -rf "$srcdir"
}

step_criu() {
    need_root
    if criu_ok; then
        log "criu: $(criu_bin) $("$(criu_bin)" --version | awk '/^Version:/{print $2}') present, criu check ok"
        return
    fi
    log "criu: building CRIU $CRIU_VERSION into $CRIU_PREFIX"
    build_criu
    local out
    out=$(LD_LIBRARY_PATH=$CRIU_PREFIX/lib "$(criu_bin)" --version 2>&1) || die "installed criu does not run: $out"
    grep -q "^Version: $CRIU_VERSION\$" <<<"$out" || die "installed criu reports unexpected version: $out"
    out=$(LD_LIBRARY_PATH=$CRIU_PREFIX/lib "$(criu_bin)" check 2>&1) || die "criu check failed: $out"
    grep -q 'Looks good' <<<"$out" || die "criu check did not say 'Looks good.': $out"
    criu_ok || die "criu install incomplete (binary, lib/libcriu.so, include/criu/criu.h)"
    log "criu: installed $(criu_bin) $CRIU_VERSION; criu check: $(tail -n1 <<<"$out")"
}

# ---------------------------------------------------------------------------------------------
# Images: built in a temp dir next to the destination, tarred with numeric owners to a temp file,
# then renamed into place (atomic on the same filesystem). A stamp records size+mtime of the tar
# so a replaced/truncated tar is rebuilt.

tar_stamp_ok() {
    local tarf=$1 stamp=$2
    [[ -s $tarf && -f $stamp ]] || return 1
    [[ $(stat -c '%s %Y' "$tarf") == "$(cat "$stamp")" ]]
}

write_tar_stamp() { mkdir -p "$STAMPS"; stat -c '%s %Y' "$1" >"$2"; }

human_size() { du -h --apparent-size "$1" | cut -f1; }

# 3. image-tiny

build_tiny() {
    local out=$IMAGES/tiny.tar root tmp a
    mkdir -p "$IMAGES"
    tmp=$(mktemp -d "$IMAGES/.tiny.XXXXXX")
    TMPDIRS+=("$tmp")
    root=$tmp/root
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,dev,sys,run,var/tmp}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    chmod 700 "$root/root"
    install -m 755 /bin/busybox "$root/bin/busybox"
    # busybox --list gives bare applet names; all of them go to /bin (sh included)
    while read -r a; do
        [[ -n $a && $a != busybox ]] || continue
        ln -sf busybox "$root/bin/$a"
    done < <(/bin/busybox --list)
    [[ -L $root/bin/sh ]] || die "busybox has no sh applet"
    cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
    echo sandbox >"$root/etc/hostname"
    cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost sandbox
::1	localhost ip6-localhost ip6-loopback
EOF
    tar --numeric-owner --sort=name -C "$root" -cf "$tmp/tiny.tar" .
    mv -f "$tmp/tiny.tar" "$out"
    write_tar_stamp "$out" "$STAMPS/image-tiny"
}

step_image_tiny() {
    need_root
    local out=$IMAGES/tiny.tar
    [[ -x /bin/busybox ]] || die "/bin/busybox missing: run '$0 packages' first"
    if tar_stamp_ok "$out" "$STAMPS/image-tiny"; then
        log "image-tiny: $out present ($(human_size "$out"))"
        return
    fi
    log "image-tiny: building $out"
    build_tiny
    log "image-tiny: $out $(human_size "$out") ($(tar -tf "$out" | wc -l) entries)"
}

# 4. image-demo

build_demo() {
    local out=$IMAGES/demo.tar root tmp mirror suite
    mirror=$(debian_mirror)
    suite=$(os_codename)
    mkdir -p "$IMAGES"
    tmp=$(mktemp -d "$IMAGES/.demo.XXXXXX")
    TMPDIRS+=("$tmp")
    root=$tmp/root
    log "image-demo: debootstrap --variant=minbase --include=python3,git $suite $mirror"
    debootstrap --variant=minbase --include=python3,git "$suite" "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1 ||
        { cp "$tmp/debootstrap.log" "$CACHE/demo-debootstrap.log"; tail -n 20 "$tmp/debootstrap.log" >&2;
          die "debootstrap failed (log: $CACHE/demo-debootstrap.log)"; }
    # Shrink: downloaded .debs and package lists are not needed in a sandbox image.
    find "$root/var/cache/apt/archives" -maxdepth 1 -type f -name '*.deb' -delete
    rm -f "$root"/var/cache/apt/*.bin
    find "$root/var/lib/apt/lists" -mindepth 1 -maxdepth 1 ! -name partial ! -name lock -exec rm -rf {} +
    # /dev is provided per sandbox (tmpfs + mknod); keep the directory, drop debootstrap's nodes.
    find "$root/dev" -mindepth 1 -delete
    tar --numeric-owner --sort=name -C "$root" -cf "$tmp/demo.tar" .
    mv -f "$tmp/demo.tar" "$out"
    write_tar_stamp "$out" "$STAMPS/image-demo"
}

step_image_demo() {
    need_root
    local out=$IMAGES/demo.tar
    command -v debootstrap >/dev/null || die "debootstrap missing: run '$0 packages' first"
    if tar_stamp_ok "$out" "$STAMPS/image-demo"; then
        log "image-demo: $out present ($(human_size "$out"))"
        return
    fi
    log "image-demo: building $out (takes a few minutes)"
    build_demo
    log "image-demo: $out $(human_size "$out")"
}

# 5. service-rootfs: a Debian rootfs whose PID 1 is systemd, for tests/test_service_e2e.py
# (`systemd-nspawn --boot`; this VM has no systemd as PID 1). It holds what `make install`
# and the daemon need at run time: python3-venv, xfsprogs, iproute2/iptables, CRIU's shared
# libraries (CRIU itself is bind-mounted from $CRIU_PREFIX). Kept as a directory; each test
# run boots an overlay of it, so the cached tree never changes.

SERVICE_ROOTFS=$CACHE/service-rootfs
SERVICE_PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,xfsprogs,iproute2,iptables,procps,libbsd0,libprotobuf-c1,libnl-3-200,libnet1

step_service_rootfs() {
    need_root
    local out=$SERVICE_ROOTFS/root stamp=$SERVICE_ROOTFS/stamp want tmp mirror suite
    command -v debootstrap >/dev/null || die "debootstrap missing: run '$0 packages' first"
    suite=$(os_codename)
    want="$suite $SERVICE_PACKAGES"
    if [[ -x $out/lib/systemd/systemd && $(cat "$stamp" 2>/dev/null) == "$want" ]]; then
        log "service-rootfs: $out present"
        return
    fi
    mirror=$(debian_mirror)
    mkdir -p "$SERVICE_ROOTFS"
    tmp=$(mktemp -d "$SERVICE_ROOTFS/.new.XXXXXX")
    TMPDIRS+=("$tmp")
    log "service-rootfs: debootstrap --variant=minbase $suite $mirror (takes a few minutes)"
    debootstrap --variant=minbase --include="$SERVICE_PACKAGES" "$suite" "$tmp/root" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1 ||
        { cp "$tmp/debootstrap.log" "$CACHE/service-rootfs-debootstrap.log"; tail -n 20 "$tmp/debootstrap.log" >&2;
          die "debootstrap failed (log: $CACHE/service-rootfs-debootstrap.log)"; }
    find "$tmp/root/var/cache/apt/archives" -maxdepth 1 -type f -name '*.deb' -delete
    # A container boots faster and quieter without these; the test drives it with nsenter.
    local unit
    for unit in console-getty.service getty@.service systemd-networkd.service \
        systemd-resolved.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
        fstrim.timer systemd-timesyncd.service; do
        ln -sfn /dev/null "$tmp/root/etc/systemd/system/$unit"
    done
    echo deltabox-e2e >"$tmp/root/etc/hostname"
    rm -rf "$out"
    mv "$tmp/root" "$out"
    printf '%s\n' "$want" >"$stamp"
    log "service-rootfs: $out $(du -sh "$out" | cut -f1)"
}

# ---------------------------------------------------------------------------------------------

usage() {
    cat >&2 <<EOF
usage: $0 {packages|criu|image-tiny|image-demo|service-rootfs|all} ...
  packages    apt-get install the host packages (only those missing)
  criu        build CRIU $CRIU_VERSION + libcriu into $CRIU_PREFIX (from Debian $CRIU_SUITE source)
  image-tiny  busybox rootfs tarball  $IMAGES/tiny.tar
  image-demo  debootstrap rootfs tarball $IMAGES/demo.tar (python3, git)
  service-rootfs  debootstrap rootfs with systemd $SERVICE_ROOTFS/root (tests/test_service_e2e.py)
  all         all of the above, in that order
cache: $CACHE (DELTABOX_CACHE), CRIU prefix: $CRIU_PREFIX (DELTABOX_CRIU_PREFIX)
EOF
    exit 2
}

run_step() {
    case $1 in
    packages) timed packages step_packages ;;
    criu) timed criu step_criu ;;
    image-tiny) timed image-tiny step_image_tiny ;;
    image-demo) timed image-demo step_image_demo ;;
    service-rootfs) timed service-rootfs step_service_rootfs ;;
    all) for s in packages criu image-tiny image-demo service-rootfs; do run_step "$s"; done ;;
    *) usage ;;
    esac
}

main() {
    (($# > 0)) || usage
    mkdir -p "$CACHE"
    local s
    for s in "$@"; do run_step "$s"; done
}

main "$@"
