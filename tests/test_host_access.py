"""What other host users can reach: the state dir is root's alone; the unix socket is root's,
or root's and one group's (--socket-group). Checked as real users (uid 65534, and a user
made for the test in a group made for the test), not by reading mode bits alone."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import deltabox
from conftest import DaemonProcess, leftovers

NOBODY = 65534

# Run as another user: what each path operation gives (ok, or the errno's name).
PROBE = r"""
import errno, json, os, socket, sys
import deltabox

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)

def status(path):
    try:
        with deltabox.Client(path, timeout=10) as c:
            return "ok " + c.status().version
    except deltabox.DeltaboxError as e:
        return type(e).__name__

ops = {"list": os.listdir, "stat": os.stat, "connect": connect}
print(json.dumps([attempt(lambda: ops[op](path)) if op != "status" else status(path)
                  for op, path in json.loads(sys.argv[1])]))
"""


def probe(user: list[str], *ops: tuple[str, Path]) -> list[str]:
    """`ops` (list / stat / connect / status, path) run by a python started through
    `setpriv` with `user`'s credentials."""
    r = subprocess.run(["setpriv", *user, "--", sys.executable, "-c", PROBE,
                        json.dumps([(op, str(path)) for op, path in ops])],
                       capture_output=True, text=True, cwd="/", timeout=60,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


AS_NOBODY = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def open_dir():
    """A directory every user may traverse (pytest's own tmp dirs are root-only, which
    would make every check below pass for the wrong reason)."""
    d = Path(tempfile.mkdtemp(prefix="deltabox-access-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _stopped_cleanly(d: DaemonProcess) -> None:
    assert d.stop() == 0, d.log()
    assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}


def test_state_dir_is_root_only(open_dir):
    state = open_dir / "state"
    state.mkdir(mode=0o755)
    d = DaemonProcess(state).start()
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "store").stat().st_mode) == 0o700
        assert (state / "store").is_mount()
        # By default the socket stays root's: 0660 root:root.
        st = d.socket.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, 0)
        got = probe(AS_NOBODY, ("list", open_dir), ("list", state), ("stat", state / "store"),
                    ("list", state / "store"), ("stat", state / "store" / "layers"),
                    ("connect", d.socket))
        assert got == ["ok", "EACCES", "EACCES", "EACCES", "EACCES", "EACCES"]
    finally:
        _stopped_cleanly(d)


@pytest.fixture
def trainer():
    """A group made for the test and a user in it (as a supplementary group, as
    `usermod -aG` would do); removed afterwards."""
    group, user = f"dbxg-{secrets.token_hex(3)}", f"dbxu-{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "-G", group, user],
                       check=True, capture_output=True)
        try:
            yield user, grp.getgrnam(group).gr_gid
        finally:
            subprocess.run(["userdel", user], check=True, capture_output=True)
            try:  # the user's own group (USERGROUPS_ENAB), if userdel left it
                grp.getgrnam(user)
                subprocess.run(["groupdel", user], check=True, capture_output=True)
            except KeyError:
                pass
    finally:
        subprocess.run(["groupdel", group], check=True, capture_output=True)


@pytest.mark.parametrize("by", ["name", "gid"])
def test_socket_group_lets_its_members_in_and_no_one_else(workdir, open_dir, trainer, by):
    user, gid = trainer
    group = grp.getgrgid(gid).gr_name
    run_dir = open_dir / "run" / "deltabox"  # created by the daemon
    d = DaemonProcess(workdir / f"sg-{secrets.token_hex(3)}",
                      extra_args=("--socket", str(run_dir / "deltabox.sock"),
                                  "--socket-group", group if by == "name" else str(gid)))
    d.socket = run_dir / "deltabox.sock"
    d.start()
    try:
        for path, mode in ((run_dir, 0o750), (d.socket, 0o660)):
            st = path.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, gid), path
        member = [f"--reuid={pwd.getpwnam(user).pw_uid}", f"--regid={pwd.getpwnam(user).pw_gid}",
                  "--init-groups"]
        got = probe(member, ("status", d.socket), ("list", run_dir))
        assert got[0].startswith("ok ") and got[1:] == ["ok"], got
        got = probe(AS_NOBODY, ("list", run_dir), ("stat", d.socket), ("connect", d.socket),
                    ("status", d.socket))
        assert got == ["EACCES", "EACCES", "EACCES", "Unavailable"]
        # After a crash the stale socket is all the directory holds: a restart takes it.
        d.kill()
        d.start()
        assert probe(member, ("status", d.socket))[0].startswith("ok ")
        assert d.socket.stat().st_gid == gid
    finally:
        _stopped_cleanly(d)


def _daemon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltabox.cli", "daemon", *args],
                          capture_output=True, text=True, timeout=60)


def test_socket_group_must_exist(open_dir):
    unused_gid = next(g for g in range(4_000_000, 4_001_000) if g not in
                      {e.gr_gid for e in grp.getgrall()})
    for spec in ("no-such-group-dbx", str(unused_gid)):
        state = open_dir / "state"
        r = _daemon("--state-dir", str(state), "--socket", str(open_dir / "run" / "sock"),
                    "--socket-group", spec)
        assert r.returncode != 0 and f"--socket-group {spec}: no such group" in r.stderr, \
            r.stderr
        assert not state.exists() and not (open_dir / "run").exists()  # nothing touched


def test_socket_group_wants_a_directory_of_its_own(open_dir):
    shared = open_dir / "shared"
    shared.mkdir(mode=0o755)
    (shared / "other-file").write_text("x")
    state = open_dir / "state"
    r = _daemon("--state-dir", str(state), "--socket", str(shared / "deltabox.sock"),
                "--socket-group", "0")
    assert r.returncode != 0 and "holds other files (other-file)" in r.stderr, r.stderr
    st = shared.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o755, 0)  # left as it was
    assert not state.exists()
    # Nor the state dir (root-only), nor a directory inside it.
    for sock in (state / "deltabox.sock", state / "run" / "deltabox.sock"):
        r = _daemon("--state-dir", str(state), "--socket", str(sock), "--socket-group", "0")
        assert r.returncode != 0 and "apart from the state dir" in r.stderr, r.stderr


@pytest.mark.parametrize("source", ["/etc", "/etc/shadow", "/root"])
def test_image_import_reads_only_the_daemons_image_dirs(client, source):
    """The daemon is root; a client (a socket-group member) must not make it read
    host files by importing them as an image (and then reading them in a sandbox)."""
    with pytest.raises(deltabox.PermissionDenied, match="image directories"):
        client.import_image(f"leak-{secrets.token_hex(3)}", source)
    assert not [i for i in client.list_images() if i.name.startswith("leak-")]


def test_image_import_through_a_symlink_out_of_an_image_dir_is_refused(client, tmp_path):
    link = tmp_path / "innocent.tar"           # tmp is one of the test daemons' image dirs
    link.symlink_to("/etc/shadow")
    with pytest.raises(deltabox.PermissionDenied, match="image directories"):
        client.import_image("via-link", link)
