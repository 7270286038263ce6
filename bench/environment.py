"""What a result was measured on: machine, load, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("kvstore", "kvclient", "grpcio", "protobuf", "numpy", "rocksdict", "redis", "hiredis", "hdrhistogram")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment() -> dict[str, Any]:
    """Return machine, Python, package versions and the git commit of this checkout."""
    from bench.redis_systems import redis_server_version

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "loadavg_at_start": list(os.getloadavg()),
        "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
        "git": git_info(),
        "versions": {**{p: _version(p) for p in PACKAGES}, "redis-server": redis_server_version() or None},
    }


def git_info() -> dict[str, Any]:
    """Return the commit sha and whether tracked files differ from it (None outside a checkout)."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if sha else None}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meminfo_kib(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
