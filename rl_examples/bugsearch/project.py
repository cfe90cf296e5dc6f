"""The real project the bug search works on, pinned, and the bug injected into it.

    python rl_examples/bugsearch/project.py DEST     # unpack + inject into DEST, print the diff

Project: more-itertools 10.5.0 (MIT), its sdist from PyPI, checked against SHA256
below: pure Python, 817 unittest tests + doctests, ~3 s for the whole suite. It is
downloaded once with `pip download --no-binary :all: --no-deps` into CACHE (or taken
from --sdist / $BUGSEARCH_SDIST on a host without network).

The bug (FAULTS): two faults in `more_itertools.more.windowed`, the sliding window
that `adjacent`, `locate(window_size=...)`, `rlocate` and `replace` are built on:
  1. `(n - len(window))` -> `(n - len(window) - 1)`: a first window shorter than n
     is padded one short (5 failures of the whole suite, with fault 2 fixed);
  2. `islice(filler, step - 1, None, step)` -> `islice(filler, step, None, step)`:
     every later window advances by step + 1 (30 failures alone).
Both: 34 failures. Each fix alone lowers the count (to 5 or to 30), and the fix takes
both: a search has to go two levels deep. Measured with `python3 -m unittest discover
-s tests` on the unpacked tree (see main()).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

PROJECT = "more-itertools"
VERSION = "10.5.0"
SDIST = f"more-itertools-{VERSION}.tar.gz"
SHA256 = "5482bfef7849c25dc3c6dd53a6173ae4795da2a41a80faea6700d9f5846c5da6"
CACHE = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox")) / "bugsearch"
PACKAGES = ("more_itertools", "tests")   # top-level names the project's tests import
FAULTY_FILE = "more_itertools/more.py"
FAULTS = (
    ("        yield tuple(window) + ((fillvalue,) * (n - len(window)))\n",
     "        yield tuple(window) + ((fillvalue,) * (n - len(window) - 1))\n"),
    ("    for _ in islice(filler, step - 1, None, step):\n",
     "    for _ in islice(filler, step, None, step):\n"),
)
FUNCTION = "windowed"   # where the faults are (the policy's fault localisation finds it)


def sdist_path(explicit: str | None = None) -> Path:
    """The pinned sdist: explicit path, $BUGSEARCH_SDIST, the cache, or downloaded into
    the cache with pip. Its SHA256 is checked in every case."""
    path = Path(explicit or os.environ.get("BUGSEARCH_SDIST") or CACHE / SDIST)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                        "--no-deps", f"{PROJECT}=={VERSION}", "-d", str(path.parent)],
                       check=True, stdout=sys.stderr)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {SHA256} ({PROJECT} {VERSION})")
    return path


def project_files(sdist: Path) -> dict[str, bytes]:
    """The package and its tests from the sdist (relative path -> bytes), bug injected."""
    files: dict[str, bytes] = {}
    prefix = f"more-itertools-{VERSION}/"
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):]
            if m.isfile() and rel.split("/")[0] in PACKAGES and rel.endswith((".py", ".pyi")):
                files[rel] = tar.extractfile(m).read()
    files[FAULTY_FILE] = inject(files[FAULTY_FILE].decode()).encode()
    return files


def inject(text: str) -> str:
    """Apply FAULTS to the upstream text; each must match exactly once."""
    for good, bad in FAULTS:
        if text.count(good) != 1:
            raise RuntimeError(f"fault site {good.strip()!r} found {text.count(good)} times: "
                               f"not {PROJECT} {VERSION}?")
        text = text.replace(good, bad)
    return text


def upstream_text(sdist: Path) -> str:
    with tarfile.open(sdist) as tar:
        return tar.extractfile(f"more-itertools-{VERSION}/{FAULTY_FILE}").read().decode()


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.splitlines()[2].strip())
    dest = Path(sys.argv[1])
    sdist = sdist_path()
    for rel, data in project_files(sdist).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    good = upstream_text(sdist)
    sys.stdout.writelines(difflib.unified_diff(
        good.splitlines(True), inject(good).splitlines(True),
        f"a/{FAULTY_FILE}", f"b/{FAULTY_FILE}"))


if __name__ == "__main__":
    main()
