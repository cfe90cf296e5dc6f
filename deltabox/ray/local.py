"""A Ray cluster of several nodes on this one machine, each node with its own deltabox
daemon: what tests/test_ray.py and `deltabox bench ray` run on (as root).

    with LocalCluster(nodes=2, slots=8, images={"tiny": TINY_TAR}) as lc:
        lc.pool.create("tiny", 4)          # 2 on each node

Nodes are `ray.cluster_utils.Cluster` nodes (own raylet, own node id, same IP); their
`NodeDaemon`s spawn daemons under one temp dir (`node-<id>/state`: own store, socket, TCP
port, certificate, token). On exit the daemons are stopped, whatever a killed one left is
removed (`deltabox.testing.remove_leftovers`), Ray is shut down and the dir deleted.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from deltabox.ray.node import NodeDaemonConfig, SLOTS
from deltabox.ray.pool import SandboxPool

__all__ = ["LocalCluster"]


class LocalCluster:
    """`nodes` Ray nodes of `cpus` CPUs and `slots` deltabox_slots each (plus
    `node_resources[i]` on node i), a daemon on each, `images` ({name: path}) imported."""

    def __init__(self, nodes: int = 2, *, slots: int = 8, cpus: float = 2,
                 node_resources: list[dict] | None = None, images: dict | None = None,
                 store_size: str = "8G"):
        self.n, self.slots, self.cpus = nodes, slots, cpus
        self.node_resources = list(node_resources or [])
        self.images = dict(images or {})
        self.store_size = store_size
        self.cluster = None
        self.pool: SandboxPool | None = None
        self.base: Path | None = None

    def _resources(self, i: int) -> dict:
        extra = self.node_resources[i] if i < len(self.node_resources) else {}
        return {SLOTS: self.slots, **extra}

    def start(self) -> "LocalCluster":
        import ray
        from ray.cluster_utils import Cluster
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.cpus, "resources": self._resources(0), "include_dashboard": False})
        for i in range(1, self.n):
            self.cluster.add_node(num_cpus=self.cpus, resources=self._resources(i))
        ray.init(address=self.cluster.address, logging_level="warning", log_to_driver=False)
        self.cluster.wait_for_nodes()
        self.base = Path(tempfile.mkdtemp(prefix="deltabox-ray-"))
        dirs = tuple(sorted({str(Path(p).resolve().parent) for p in self.images.values()}))
        self.pool = SandboxPool.start(NodeDaemonConfig(base_dir=str(self.base),
                                                       store_size=self.store_size,
                                                       image_dirs=dirs))
        for name, path in self.images.items():
            for node, res in self.pool.import_image(name, Path(path).resolve()).items():
                if isinstance(res, BaseException):
                    raise RuntimeError(f"importing {name} on node {node[:12]}: {res}")
        return self

    def stop(self) -> dict:
        """Stop everything; {node: what its daemon left ('' = nothing)}."""
        import ray
        from deltabox.store.metadata import read_instance_id
        from deltabox.testing import remove_leftovers
        left = self.pool.stop() if self.pool is not None else {}
        if self.base is not None:
            for node_dir in self.base.glob("node-*"):
                state = node_dir / "state"
                remove_leftovers(state, read_instance_id(state))
        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        if self.base is not None:
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.base)], check=False)
            self.base = None
        return left

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# A default for callers that pass nothing: the daemon's default image dir.
DEFAULT_IMAGES = {"tiny": Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))
                  / "images" / "tiny.tar"}
