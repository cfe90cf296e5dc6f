"""Installing DeltaBox as a host service (issue 12): `make install` / `make uninstall`, the
unit as shipped, and systemd's notify protocol against a real NOTIFY_SOCKET.

The install goes into a throw-away DESTDIR, so the host's /opt, /etc and groups are never
touched. A run under a real systemd as PID 1 is not here: see docs/install.md, "Tested".
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deltabox
from conftest import leftovers

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "deltabox.service"


def _make(target: str, destdir: Path, **env) -> subprocess.CompletedProcess:
    res = subprocess.run(["make", "-s", "-C", str(ROOT), target, f"DESTDIR={destdir}"],
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, **{k: str(v) for k, v in env.items()}})
    assert res.returncode == 0, f"make {target}: {res.stdout}\n{res.stderr}"
    return res


def _unit_options(path: Path) -> dict[str, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=dict, empty_lines_in_values=False)
    parser.optionxform = str
    # systemd allows repeated keys; configparser does not: number them.
    text, seen, lines = path.read_text(), {}, []
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key = line.split("=", 1)[0]
            seen[key] = seen.get(key, 0) + 1
            line = f"{key}#{seen[key]}={line.split('=', 1)[1]}"
        lines.append(line)
    parser.read_string("\n".join(lines))
    out: dict[str, list[str]] = {}
    for section in parser.sections():
        for key, value in parser[section].items():
            out.setdefault(key.split("#")[0], []).append(value)
    return out


def _verify_unit(unit: Path, destdir: Path) -> None:
    """systemd-analyze verify, with the unit's paths pointed into DESTDIR: its ExecStart
    must exist and be executable, and every key must be known (no output at all)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: `apt-get install systemd` (native/setup-host.sh)")
    check = destdir / "verify" / "deltabox.service"
    check.parent.mkdir(exist_ok=True)
    check.write_text(unit.read_text().replace("/opt/deltabox", f"{destdir}/opt/deltabox"))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(check)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), \
        f"systemd-analyze verify:\n{res.stdout}{res.stderr}"


def test_unit_as_shipped_keeps_mounts_cgroups_and_sandboxes_working():
    opts = _unit_options(UNIT)
    assert opts["Type"] == ["notify"] and opts["NotifyAccess"] == ["main"]
    assert opts["KillMode"] == ["process"]        # a restart leaves sandboxes to re-adopt
    assert opts["Restart"] == ["on-failure"]
    assert opts["Delegate"] == ["yes"]
    assert opts["StateDirectoryMode"] == ["0700"]
    assert "--config /etc/deltabox/config.toml" in opts["ExecStart"][0]
    # Each of these gives the daemon a private mount namespace (its store and branch
    # mounts would die with it), a seccomp filter or a capability bound its sandboxes
    # and CRIU would inherit, or read-only cgroups: see docs/install.md.
    for forbidden in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                      "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules",
                      "ProtectControlGroups", "ReadOnlyPaths", "InaccessiblePaths",
                      "SystemCallFilter", "CapabilityBoundingSet", "MountFlags", "UMask"):
        assert forbidden not in opts, forbidden


def test_make_install_reinstall_uninstall_purge(tmp_path):
    dest = tmp_path / "root"
    _make("install", dest)

    prefix = dest / "opt/deltabox"
    venv = prefix / "venv"
    site = next((venv / "lib").glob("python3*/site-packages"))
    # The native parts came in the wheel.
    assert os.access(site / "deltabox/_bin/deltabox-init", os.X_OK)
    assert list((site / "deltabox").glob("_native*.so"))
    # The venv is self-contained: Debian's python3, nothing from the repo or /root.
    home = [line for line in (venv / "pyvenv.cfg").read_text().splitlines()
            if line.startswith("home")]
    assert home == ["home = /usr/bin"], home
    res = subprocess.run([str(venv / "bin/deltabox"), "daemon", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--config" in res.stdout, res.stderr
    res = subprocess.run([str(venv / "bin/python"), "-I", "-c",
                          "import deltabox, deltabox._native; print(deltabox.__file__)"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith(str(site)), res.stderr

    link = dest / "usr/local/bin/deltabox"
    assert link.is_symlink() and os.readlink(link) == "/opt/deltabox/venv/bin/deltabox"
    unit = dest / "etc/systemd/system/deltabox.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    _verify_unit(unit, dest)
    config = dest / "etc/deltabox/config.toml"
    import tomllib
    assert tomllib.loads(config.read_text()) == {"socket-group": "deltabox"}
    state = dest / "var/lib/deltabox"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (prefix / "docs/install.md").exists()

    # Idempotent: a second install succeeds and changes nothing the admin owns.
    config.write_text(config.read_text() + '\nstore-size = "32G"\n')
    (state / "keep-me").write_text("layers")
    _make("install", dest)
    assert 'store-size = "32G"' in config.read_text()       # edited: kept
    assert (dest / "etc/deltabox/config.toml.dist").exists()

    # Uninstall: what install added goes; the state dir and the edited config stay.
    _make("uninstall", dest)
    _make("uninstall", dest)                                 # idempotent
    for gone in (venv, link, unit, prefix / "docs", dest / "etc/deltabox/config.toml.dist"):
        assert not os.path.lexists(gone), gone
    assert (state / "keep-me").exists() and config.exists()

    _make("uninstall", dest, PURGE=1)
    assert not state.exists() and not config.exists() and not prefix.exists()


def _recv(sock: socket.socket, timeout: float) -> str | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except socket.timeout:
        return None


def test_notify_ready_only_once_serving_and_stopping_on_sigterm(tmp_path):
    state = tmp_path / "state"
    sock_path = tmp_path / "run" / "deltabox.sock"
    config = tmp_path / "config.toml"
    # The socket comes from the config file only: the daemon serving there proves it read it.
    config.write_text(f'socket = "{sock_path}"\nstore-size = "16G"\n')
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltabox.cli", "daemon", "--config", str(config),
         "--state-dir", str(state)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})
    try:
        msg = _recv(notify, 90)
        assert msg is not None, (tmp_path / "daemon.log").read_text()[-3000:]
        assert "READY=1" in msg.split("\n")
        # At READY the socket already answers, at once.
        with deltabox.Client(sock_path) as client:
            client.status()
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660

        proc.send_signal(signal.SIGTERM)
        msg = _recv(notify, 30)
        assert msg is not None and "STOPPING=1" in msg.split("\n")
        assert proc.wait(60) == 0
        # journald gets structlog's JSON lines.
        import json
        events = [json.loads(line)["event"] for line in
                  (tmp_path / "daemon.log").read_text().splitlines() if line.startswith("{")]
        assert "daemon.serving" in events and "daemon.stopped" in events
        assert not sock_path.exists()
        assert leftovers(state) == {"mounts": [], "loops": [], "inits": []}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
        log.close()
