"""A local cluster for one bench script: in a given folder, or a temporary one removed afterwards."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator

from kvstore.launcher import LocalCluster


@contextlib.contextmanager
def scratch_cluster(prefix: str, folder: str | None = None) -> Iterator[LocalCluster]:
    """Yield an unstarted `LocalCluster`; stop every node it started on exit, even on error."""
    root = folder or tempfile.mkdtemp(prefix=prefix)
    cluster = LocalCluster.open(root)
    try:
        yield cluster
    finally:
        stopped = cluster.down()
        print(f"cluster stopped ({', '.join(stopped) or 'nothing running'})", flush=True)
        if folder is None:
            shutil.rmtree(root, ignore_errors=True)
