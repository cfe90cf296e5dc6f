"""`deltabox bench transfer`: moving a full checkpoint (a Python session holding X MB of
os.urandom, incompressible: the worst case for compression) from one daemon to another on
this host, against copying the same state with `tar | tar` and `rsync -a` in the same run.

Two throw-away daemons, both with the demo image (so the image's layers are skipped by
digest, as between two nodes that imported the same image; the first, untimed, send
computes the digests). Rows, each over `iterations` samples, p50/p95 of the wall time the
client sees, and MB/s of *state* (the checkpoint's CRIU images plus its own layers, the
bytes every row moves):

- export   `Client.export_checkpoint` of daemon A into a file, skipping the layers B holds
           (the image's), as `send` does
- import   `Client.import_checkpoint` of that file into daemon B (deleted again after)
- send     `Client.send_checkpoint` A -> B, streamed, no file (deleted again after)
- tar      `tar -cf - images layers | tar -xf -` into a fresh directory
- rsync    `rsync -a` of the same directories into a fresh directory

and, in-process on the same images, zlib level 1 and 6 (and zstd 3 if `zstandard` is
importable): MB/s and ratio -- why the stream uses zlib level 1 (deltabox.core.transfer_format).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from deltabox.bench.common import CACHE
from deltabox.stats import summary
from deltabox.testing import ThrowawayDaemon

__all__ = ["main_transfer", "run_transfer"]


def _state_dirs(d: ThrowawayDaemon, client, ckpt) -> list[Path]:
    """The checkpoint's images and its own (non-image) layers in daemon A's store."""
    store = d.state_dir / "store"
    image_ids = set(_image_layer_ids(client, ckpt))
    return [store / "images" / ckpt.id] + [store / "layers" / lid for lid in ckpt.layer_ids
                                           if lid not in image_ids]


def _image_layer_ids(client, ckpt) -> list[str]:
    n = client.checkpoint_manifest(ckpt).image_layers
    return list(ckpt.layer_ids[:n])


def _du(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        for root, _, files in os.walk(p):
            for f in files:
                st = os.lstat(os.path.join(root, f))
                total += st.st_size if not os.path.islink(os.path.join(root, f)) else 0
    return total


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _compression(images: Path) -> list[dict]:
    data = b"".join(p.read_bytes() for p in sorted(images.iterdir()) if p.is_file())
    rows = []
    ways = [("zlib 1", lambda b: zlib.compress(b, 1)), ("zlib 6", lambda b: zlib.compress(b, 6))]
    try:
        import zstandard
        ways.append(("zstd 3", zstandard.ZstdCompressor(level=3).compress))
    except ImportError:
        pass
    for name, fn in ways:
        t = _timed(lambda: fn(data))
        out = fn(data)
        rows.append({"codec": name, "mb_s": round(len(data) / t / 1e6, 1),
                     "ratio": round(len(data) / max(1, len(out)), 2), "mb": len(data) >> 20})
    return rows


def run_transfer(mb: int = 100, iterations: int = 5, progress=print) -> dict:
    samples: dict[str, list[float]] = {k: [] for k in ("export", "import", "send", "tar",
                                                       "rsync")}
    work = Path(tempfile.mkdtemp(prefix="deltabox-bench-transfer-"))
    demo_tar = CACHE / "images" / "demo.tar"
    key = work / "transfer-key"   # a full import needs a key both share (docs/security.md)
    os.close(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    key.write_bytes(os.urandom(32))
    keyed = ("--transfer-key-file", str(key))
    with ThrowawayDaemon(extra_args=keyed) as a, ThrowawayDaemon(extra_args=keyed) as b, \
            a.client() as ca, b.client() as cb:
        ca.import_image("demo", demo_tar)
        cb.import_image("demo", demo_tar)
        sbx = ca.create("demo", memory=(mb + 256) << 20)
        try:
            py = sbx.open_session("python", name="py")
            py.run(f"import os\nblob = os.urandom({mb} << 20)")
            ckpt = sbx.checkpoint("bench", full=True)
            ca.send_checkpoint(ckpt, to=cb)            # untimed: digests computed both sides
            cb.delete_checkpoint(ckpt)
            # what send skips: the image's layers (both daemons imported the same tar)
            have = cb.have_layers(ca.checkpoint_manifest(ckpt).digests)
            state = _state_dirs(a, ca, ckpt)
            state_bytes = _du(state)
            progress(f"state: {state_bytes / 1e6:.1f} MB (images + own layers)")
            file = work / "ck.dbx"
            export_bytes = 0
            for i in range(iterations):
                samples["export"].append(_timed(lambda: ca.export_checkpoint(
                    ckpt, file, skip_layers=have)))
                export_bytes = file.stat().st_size
                samples["import"].append(_timed(lambda: cb.import_checkpoint(file)))
                cb.delete_checkpoint(ckpt)
                samples["send"].append(_timed(lambda: ca.send_checkpoint(ckpt, to=cb)))
                cb.delete_checkpoint(ckpt)
                for way in ("tar", "rsync"):
                    dst = work / f"{way}-{i}"
                    dst.mkdir()
                    if way == "tar":
                        cmd = (f"tar -C / -cf - {' '.join(str(p)[1:] for p in state)} | "
                               f"tar -C {dst} -xf -")
                    else:
                        cmd = f"rsync -a {' '.join(str(p) for p in state)} {dst}/"
                    samples[way].append(_timed(lambda: subprocess.run(
                        cmd, shell=True, check=True)))
                    shutil.rmtree(dst)
                progress(f"iteration {i + 1}/{iterations}: " + ", ".join(
                    f"{k} {v[-1]:.2f} s" for k, v in samples.items()))
            compression = _compression(a.state_dir / "store" / "images" / ckpt.id)
        finally:
            sbx.destroy()
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for way, v in samples.items():
        s = summary(v, 3)
        rows.append({"way": way, "seconds": s,
                     "mb_s_p50": round(state_bytes / s["p50"] / 1e6, 1) if s["p50"] else None})
    return {"mb": mb, "iterations": iterations, "state_bytes": state_bytes,
            "stream_bytes": export_bytes, "rows": rows, "compression": compression,
            "loadavg": os.getloadavg(), "cpus": os.cpu_count()}


def main_transfer(args) -> int:
    mb = 20 if args.quick else args.mb
    doc = run_transfer(mb, args.iterations or (3 if args.quick else 5),
                       progress=lambda m: print(m, file=sys.stderr))
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2))
        return 0
    print(f"full checkpoint of a Python session holding {doc['mb']} MB (os.urandom): state "
          f"{doc['state_bytes'] / 1e6:.1f} MB, stream {doc['stream_bytes'] / 1e6:.1f} MB")
    print(f"{'way':<8} {'p50 s':>8} {'p95 s':>8} {'MB/s (p50)':>11}")
    for r in doc["rows"]:
        print(f"{r['way']:<8} {r['seconds']['p50']:>8.2f} {r['seconds']['p95']:>8.2f} "
              f"{r['mb_s_p50']:>11.1f}")
    for c in doc["compression"]:
        print(f"{c['codec']:<8} {c['mb_s']:>8.1f} MB/s, ratio {c['ratio']:.2f} on "
              f"{c['mb']} MB of CRIU images")
    print(f"{doc['iterations']} iterations; load average at the end {doc['loadavg'][0]:.2f} "
          f"on {doc['cpus']} CPUs")
    return 0
