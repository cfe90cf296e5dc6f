"""The CRIU that native/setup-host.sh builds, as the daemon drives it.

CRIU caches its probe of the kernel's features in `$RUNDIR/criu.kdat`, stamped with a magic of
its own build (the build's time). Two builds sharing one file -- ours and a distro's, as used by
Docker or Podman -- delete each other's cache as stale, and ours then probes the kernel again in
every dump (40-100 ms, with the sandbox frozen). Our build has a directory of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from deltabox.host.criu import KDAT_CACHE, KDAT_CACHE_OURS, Criu, find_criu


def test_our_criu_keeps_its_kdat_cache_apart():
    criu = Criu(find_criu())
    criu.ensure_kdat_cache()
    assert criu.kdat_cache == KDAT_CACHE_OURS
    assert KDAT_CACHE_OURS.stat().st_size > 0


def test_a_foreign_kdat_cache_does_not_make_our_dump_probe(tmp_path):
    criu = Criu(find_criu())
    criu.ensure_kdat_cache()
    saved = KDAT_CACHE.read_bytes() if KDAT_CACHE.exists() else None
    KDAT_CACHE.write_bytes(b"another CRIU build's cache".ljust(904, b"\0"))
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.1)
        env = dict(os.environ, LD_LIBRARY_PATH=str(criu.binary.parent.parent / "lib"))
        r = subprocess.run([str(criu.binary), "dump", "-t", str(proc.pid), "-D", str(tmp_path),
                            "-o", "dump.log", "-v4", "--leave-running"],
                           env=env, capture_output=True, timeout=120)
        log = (tmp_path / "dump.log").read_text(errors="replace")
        assert r.returncode == 0, log[-2000:]
        assert f"Loaded kdat cache from {KDAT_CACHE_OURS}" in log, \
            [ln for ln in log.splitlines() if "kdat" in ln]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if saved is None:
            KDAT_CACHE.unlink(missing_ok=True)
        else:
            KDAT_CACHE.write_bytes(saved)


def test_our_criu_links_no_library_it_does_not_use():
    """Built with NO_GNUTLS=1 NO_NFTABLES=1 (native/setup-host.sh, CRIU patch 0007): every
    criu process loads its libraries as it starts -- 2.8-3.9 ms of CPU with GnuTLS and
    nftables and their 14 dependencies, 0.8-0.9 ms without -- and DeltaBox uses neither
    (no TLS page server; network_lock SKIP)."""
    binary = find_criu()
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent.parent / "lib"))
    out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True,
                         check=True).stdout
    linked = {line.split()[0] for line in out.splitlines() if "=>" in line}
    assert "libprotobuf-c.so.1" in linked, out  # ldd did list criu's libraries
    unused = {lib for lib in linked if lib.startswith(("libgnutls", "libnftables", "libnftnl",
                                                         "libjansson", "libp11-kit"))}
    assert not unused, f"criu links {sorted(unused)}: built without NO_GNUTLS/NO_NFTABLES?"
