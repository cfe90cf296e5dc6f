"""deltabox.host.linux's mount lookups on real mounts: is_mountpoint and mounts_under read
only the lines of /proc/self/mountinfo that name the path asked about (a prefilter on the
mangled path), and must answer exactly what a full parse does -- siblings that share a
prefix, nested mounts, and names the kernel escapes (space, tab, backslash)."""

from __future__ import annotations

import contextlib
import subprocess

import pytest

from deltabox.host import linux


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(rel: str):
        target = tmp_path / rel
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(target)],
                       check=True)
        made.append(target)
        return str(target)
    yield tmp_path, mount
    for target in reversed(made):
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(target)], check=True)


def _full(path: str) -> tuple[bool, list[str]]:
    """The answer of a parse of every line (what the prefilter must not change)."""
    targets = [t for _, t, _ in linux.mount_table()]
    under = {t for t in targets if t == path or t.startswith(path + "/")}
    return path in targets, sorted(under, key=lambda t: t.count("/"), reverse=True)


@pytest.mark.parametrize("name", ["a", "a b", "tab\there", "back\\slash"])
def test_mount_lookups_match_a_full_parse(mounts, name):
    root, mount = mounts
    top = mount(name)
    nested = mount(f"{name}/inner dir")
    sibling = mount(f"{name}x")  # shares the prefix, is not below it
    assert linux.is_mountpoint(top) and linux.is_mountpoint(nested)
    assert not linux.is_mountpoint(root / name / "inner dir" / "not-a-mount")
    assert linux.mounts_under(top) == [nested, top]  # deepest first
    assert sibling not in linux.mounts_under(top)
    for path in (top, nested, sibling, str(root), str(root / name / "missing")):
        assert (linux.is_mountpoint(path), linux.mounts_under(path)) == _full(path), path


def test_is_mountpoint_sees_bind_mounts_and_does_not_follow_symlinks(mounts):
    """statx's STATX_ATTR_MOUNT_ROOT: a directory bound onto itself (same filesystem, same
    st_dev as its parent: what os.path.ismount misses) is a mount point; a symlink to a
    mount point is not (the mount table never lists it either)."""
    root, mount = mounts
    top = mount("top")
    bound = root / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", str(bound), str(bound)], check=True)
    try:
        (root / "link").symlink_to(top)
        assert linux.is_mountpoint(bound) and _full(str(bound))[0]
        assert not linux.is_mountpoint(root / "link") and not _full(str(root / "link"))[0]
        assert not linux.is_mountpoint(root / "top" / "missing" / "deeper")
    finally:
        subprocess.run(["umount", str(bound)], check=True)
