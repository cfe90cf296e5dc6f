"""Installing DeltaBox as a host service (issue 12): `make install` / `make uninstall`, the
unit as shipped, and systemd's notify protocol against a real NOTIFY_SOCKET.

The install goes into a throw-away DESTDIR, so the host's /opt, /etc and groups are never
touched. `--on-exit` (what a SIGTERM does to the sandboxes) is tested here on plain
daemons; the run under a real systemd as PID 1 is tests/test_service_e2e.py.
"""

from __future__ import annotations

import configparser
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path


import deltabox
from conftest import leftovers, require_systemd_tool

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
    require_systemd_tool("systemd-analyze", "`apt-get install systemd` (native/setup-host.sh)")
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
    assert "--on-exit systemd" in opts["ExecStart"][0]   # restart keeps, stop stops
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


# ---- --on-exit: what a SIGTERM does to the sandboxes ---------------------------------------

def test_on_exit_keep_leaves_sandboxes_to_the_next_daemon_which_stops_them(new_daemon):
    """`--on-exit keep` (what the unit does on `systemctl restart`): the sandbox and the
    store stay; the next daemon adopts the same init and session; a daemon that stops
    (the default, `systemctl stop`) then leaves nothing."""
    from conftest import TINY_TAR, sandbox_inits
    d = new_daemon(extra_args=("--on-exit", "keep")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        s = c.create("tiny", name="kept")
        s.open_session("sh", name="sh").run("X=42; cd /tmp")
        s.write_file("/root/f", b"files")
        init = s.info.init_pid
    assert d.stop() == 0, d.log()
    assert '"keep_sandboxes": true' in d.log(), d.log()
    left = leftovers(d.state_dir)
    assert init in left["inits"] and left["mounts"] and left["loops"], left
    assert not d.socket.exists()

    d.extra_args = ()                      # the next daemon stops them (the default)
    d.start()
    assert '"adopted": 1' in d.log(), d.log()
    with d.client() as c:
        s = c.get("kept")
        assert s.info.init_pid == init, "restarted, not adopted"
        assert s.session("sh").run("echo $X; pwd").stdout == b"42\n/tmp\n"
        assert s.read_file("/root/f") == b"files"
    assert d.stop() == 0, d.log()
    assert '"keep_sandboxes": false' in d.log()
    assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}
    assert not psutil_alive(init) and not sandbox_inits(d.state_dir)


def test_on_exit_systemd_outside_a_service_stops(new_daemon):
    """`--on-exit systemd` with no systemd job to ask (not a service here): stop, leave
    nothing, and say why."""
    from conftest import TINY_TAR
    d = new_daemon(extra_args=("--on-exit", "systemd")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        c.create("tiny", name="stopped-with-me")
    assert d.stop() == 0, d.log()
    assert "daemon.on_exit_not_a_service" in d.log() and '"keep_sandboxes": false' in d.log()
    assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}


def test_own_unit_and_job_type_parsing(tmp_path):
    from deltabox.host.systemd import keep_sandboxes_on_exit, own_unit
    v1 = tmp_path / "v1"
    v1.write_text("9:name=systemd:/system.slice/deltabox.service\n4:memory:/x\n0::/\n")
    assert own_unit(v1) == "deltabox.service"
    v2 = tmp_path / "v2"
    v2.write_text("0::/system.slice/deltabox.service/daemon\n")
    assert own_unit(v2) == "deltabox.service"
    none = tmp_path / "none"
    none.write_text("0::/user.slice/user-0.slice/session-1.scope\n")
    assert own_unit(none) is None
    assert keep_sandboxes_on_exit("keep") and not keep_sandboxes_on_exit("stop")


def psutil_alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- packaging: the base install is the client ---------------------------------------------

_COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "_proto",
                                      "_bin", "_native*.so", "__pycache__", ".pytest_cache",
                                      ".hypothesis", "rl_examples")
# What only the daemon needs: none of it may come with `pip install deltabox`.
_SERVER_ONLY = {"grpcio-health-checking", "grpcio-reflection", "cffi", "pyroute2", "psutil",
                "structlog", "prometheus-client", "rich"}


def _build_wheel(tmp: Path, **env) -> tuple[Path, str]:
    """A wheel of the working tree (a clean copy, as native/install.sh builds it), built
    with this venv's build tools; returns it and pip's verbose log."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp / "wheels"), str(src)],
                         capture_output=True, text=True, timeout=400,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return next((tmp / "wheels").glob("deltabox-*.whl")), res.stdout + res.stderr


def _metadata(wheel: Path):
    import email.parser
    import zipfile
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(meta).decode()), names


def _generated_floors() -> tuple[str, str]:
    """(grpcio, protobuf) versions the generated code in deltabox/_proto demands."""
    import re
    grpc_py = (ROOT / "deltabox/_proto/deltabox/v1/deltabox_pb2_grpc.py").read_text()
    grpc_floor = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_py).group(1)
    pb_py = (ROOT / "deltabox/_proto/deltabox/v1/deltabox_pb2.py").read_text()
    m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
                  r"(\d+),\s*(\d+),\s*(\d+),", pb_py)
    return grpc_floor, ".".join(m.groups())


def test_wheel_requires_only_grpcio_and_protobuf_at_the_generated_floors(tmp_path):
    import tomllib

    from packaging.requirements import Requirement
    wheel, _ = _build_wheel(tmp_path)
    meta, names = _metadata(wheel)
    assert meta["Version"] == deltabox.__version__   # one version source
    # It carries a CPython extension and a native binary: tagged for this interpreter and
    # platform, never py3-none-any (pip would install it where it cannot run).
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.endswith(f"-{tag}-{tag}-linux_{platform.machine()}.whl"), wheel.name
    base, extras = {}, {}
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is None:
            base[req.name] = req.specifier
        else:
            extra = str(req.marker).split("==")[1].strip(' "\'')
            extras.setdefault(extra, set()).add(req.name.lower())
    assert set(base) == {"grpcio", "protobuf"}, base
    grpc_floor, pb_floor = _generated_floors()
    # The floor is the generated code's own check: nothing older passes it.
    assert f">={grpc_floor}" in str(base["grpcio"]).split(",")
    assert f">={pb_floor}" in str(base["protobuf"]).split(",")
    assert "8" not in base["protobuf"]           # the generated code wants major 7
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert f"grpcio-tools=={grpc_floor}" in build  # what generated them, pinned
    assert _SERVER_ONLY <= extras["server"], extras["server"]
    assert "torch" in extras["rl"] and {"pytest", "deltabox"} <= extras["test"]
    assert "rich" in extras["cli"]
    for needed in ("deltabox/py.typed", "deltabox/_proto/deltabox/v1/deltabox_pb2.py",
                   "deltabox/_proto/deltabox/v1/deltabox_pb2_grpc.py",
                   "deltabox/_bin/deltabox-init"):
        assert needed in names, needed
    assert any(n.startswith("deltabox/_native") and n.endswith(".so") for n in names)

    # A fresh venv: `pip install` of the wheel brings grpcio and protobuf (and their own
    # dependencies), nothing of the daemon's; the client imports; the daemon says what is
    # missing.
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    res = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([str(venv / "bin/pip"), "list", "--format", "json"],
                         capture_output=True, text=True, timeout=60, check=True)
    import json
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(res.stdout)}
    assert {"deltabox", "grpcio", "protobuf"} <= installed
    assert not installed & _SERVER_ONLY, installed & _SERVER_ONLY
    assert installed <= {"deltabox", "grpcio", "protobuf", "typing-extensions", "pip",
                         "setuptools", "wheel"}, installed
    res = subprocess.run([str(venv / "bin/python"), "-I", "-c",
                          "import deltabox; print(deltabox.__version__, deltabox.Client)"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith(deltabox.__version__), res.stderr
    res = subprocess.run([str(venv / "bin/deltabox"), "daemon"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode != 0
    assert "pip install 'deltabox[server]'" in res.stderr, res.stderr


def test_wheel_without_a_c_compiler_skips_the_native_parts_and_the_daemon_says_why(tmp_path):
    wheel, log = _build_wheel(tmp_path, CC="/nonexistent/cc")
    assert "WARNING: deltabox's native parts were NOT built" in log, log[-3000:]
    _, names = _metadata(wheel)
    assert "deltabox/_proto/deltabox/v1/deltabox_pb2.py" in names   # the client's part
    assert not [n for n in names if n.startswith(("deltabox/_bin/", "deltabox/_native"))]
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name   # the client runs anywhere
    # That package with everything the daemon needs but its native parts: a clear refusal.
    import zipfile
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # (-c: this venv's editable install of the checkout must not lend it the checkout's
    # native parts, so its import hook is dropped first.)
    res = subprocess.run([sys.executable, "-c", "import sys; sys.meta_path[:] = [f for f in "
                          "sys.meta_path if 'editable' not in repr(f).lower()]; "
                          "import deltabox.cli; "
                          "assert deltabox.__file__.startswith(sys.argv[1]), deltabox.__file__; "
                          "sys.argv[1:] = ['daemon']; deltabox.cli.main()", str(unpacked)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(unpacked)})
    assert res.returncode != 0
    assert "deltabox/_native" in res.stderr and "deltabox-init" in res.stderr, res.stderr
    assert "build-essential" in res.stderr and "native/build.py" in res.stderr, res.stderr
