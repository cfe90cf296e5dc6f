"""The source trees `deltabox bench fs` checkpoints: pinned PyPI sdists (fetched once
with pip into $DELTABOX_CACHE/bench/sdists) or `synthetic:N` generated files, unpacked
under /work of the tiny busybox rootfs; and the "step that changes k files"
(`pick_files`: k files spread over the tree's directories, seeded).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deltabox.bench.common import CACHE

__all__ = ["TREES", "Tree", "prepare_tree", "pick_files", "STEP_SCRIPT"]

# Named trees: pinned sdists (setuptools builds, so `pip download` needs no extra
# build backend). django: 6,798 files, 44 MB. mono: 20,042 files, 280 MB.
TREES: dict[str, list[str]] = {
    "django": ["django==5.1"],
    "mono": ["django==5.1", "ansible-core==2.17.5", "botocore==1.35.40", "sympy==1.13.3",
             "mypy==1.11.2", "sqlalchemy==2.0.36", "setuptools==75.1.0"],
}

STEP_SCRIPT = ('while IFS= read -r f; do echo "# deltabox bench step $S" >> "/work/$f" '
               '|| exit 1; done')


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _sdist(spec: str, cache: Path, log) -> Path:
    """The sdist archive for `name==version`, downloaded with pip once."""
    name, _, version = spec.partition("==")
    if not version:
        raise SystemExit(f"sdist {spec!r}: pin a version (name==version)")
    cache.mkdir(parents=True, exist_ok=True)
    want = f"{_norm(name)}_{version}"

    def find() -> Path | None:
        for p in cache.iterdir():
            m = re.fullmatch(r"(.+?)\.(tar\.gz|tgz|zip|tar\.bz2)", p.name)
            if m and _norm(m.group(1)) == _norm(want):
                return p
        return None
    found = find()
    if found:
        return found
    log(f"downloading the sdist of {spec} (pip)")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                          "--no-binary", ":all:", "--no-build-isolation", "-d", str(cache),
                          spec], capture_output=True, text=True, timeout=600)
    found = find()
    if found is None:
        raise SystemExit(f"pip download {spec} failed (PyPI unreachable? use --tree "
                         f"synthetic:N):\n{res.stderr[-2000:]}")
    return found


def _unpack(archive: Path, dest: Path) -> list[str]:
    """Unpack an sdist into `dest`; returns the top-level names it added."""
    before = set(os.listdir(dest))
    if archive.name.endswith(".zip"):
        subprocess.run(["unzip", "-q", str(archive), "-d", str(dest)], check=True)
    else:
        subprocess.run(["tar", "xf", str(archive), "-C", str(dest), "--no-same-owner"],
                       check=True)
    return sorted(set(os.listdir(dest)) - before)


def _synthetic(work: Path, n: int) -> None:
    """n small text files, 20 per directory, 20 directories per top directory."""
    rng = random.Random(n)
    for i in range(n):
        d = work / f"pkg{i // 400:03d}" / f"mod{(i // 20) % 20:02d}"
        if i % 20 == 0:
            d.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x * {rng.randrange(1000)}\n"
                       for j in range(rng.randrange(5, 60)))
        (d / f"file{i:06d}.py").write_text(body)


@dataclass
class Tree:
    name: str
    sources: list[str]
    stage: Path          # rootfs staging dir on the store's XFS; the tree is stage/work
    files: list[str]     # regular files, relative to /work
    dirs: int
    bytes: int

    @property
    def work(self) -> Path:
        return self.stage / "work"

    def info(self) -> dict:
        return {"name": self.name, "files": len(self.files), "dirs": self.dirs,
                "bytes": self.bytes, "sources": self.sources}


def prepare_tree(spec: str, stage: Path, tiny_tar: Path, log) -> Tree:
    """Unpack tiny.tar into `stage` and put the tree under stage/work."""
    stage.mkdir(parents=True)
    subprocess.run(["tar", "xf", str(tiny_tar), "-C", str(stage)], check=True)
    work = stage / "work"
    work.mkdir(exist_ok=True)
    if spec.startswith("synthetic:"):
        n = int(spec.partition(":")[2])
        _synthetic(work, n)
        sources = [f"synthetic: {n} generated files"]
    else:
        specs = TREES.get(spec) or (spec.partition(":")[2].split(",")
                                    if spec.startswith("sdist:") else None)
        if not specs:
            raise SystemExit(f"unknown tree {spec!r}: use {', '.join(TREES)}, synthetic:N or "
                             "sdist:NAME==VERSION[,...]")
        sources = []
        for s in specs:
            sources += _unpack(_sdist(s, CACHE / "bench" / "sdists", log), work)
    # Owned by root and writable, as a checked-out tree is for its user.
    subprocess.run(["chown", "-R", "0:0", str(work)], check=True)
    subprocess.run(["chmod", "-R", "u+w", str(work)], check=True)
    files, dirs, size = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(work):
        dirs += len(dirnames)
        rel = os.path.relpath(dirpath, work)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            size += st.st_size
            if os.path.isfile(p) and not os.path.islink(p) and "\n" not in f:
                files.append(f if rel == "." else f"{rel}/{f}")
    files.sort()
    return Tree(spec, sources, stage, files, dirs, size)


def pick_files(tree: Tree, k: int, seed: int) -> list[str]:
    """k distinct files spread over the tree's directories (round robin, seeded)."""
    rng = random.Random(seed)
    by_dir: dict[str, list[str]] = {}
    for f in tree.files:
        by_dir.setdefault(f.rpartition("/")[0], []).append(f)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_dir.items())]
    rng.shuffle(pools)
    out: list[str] = []
    k = min(k, len(tree.files))
    while len(out) < k:
        for pool in pools:
            if pool:
                out.append(pool.pop())
                if len(out) == k:
                    break
    return out
