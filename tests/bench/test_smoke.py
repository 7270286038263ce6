"""The benchmark harness end to end on the smoke scenario, so it never rots (issue #3).

Runs `python -m bench run smoke` in a subprocess (it starts node and redis-server processes
and always stops them) and checks the JSON it writes. The Redis peers run only where
`redis-server` is on PATH; elsewhere they must be reported as skipped with the install hint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_REDIS = shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    systems = "kvstore,redis,redis_asyncio,redis_cluster,floor_rocksdict,floor_numpy"
    if not HAVE_REDIS:
        systems = "kvstore,redis,floor_numpy"
    cmd = [sys.executable, "-m", "bench", "run", "smoke", "--out", str(out), "--systems", systems, "-q"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, f"bench exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (path,) = glob.glob(str(out / "*-smoke.json"))
    with open(path) as f:
        result: dict[str, Any] = json.load(f)
    result["_out"] = str(out)
    result["_stdout"] = done.stdout
    return result


def test_writes_json_markdown_and_plots(smoke: dict[str, Any]) -> None:
    out = smoke["_out"]
    assert len(glob.glob(os.path.join(out, "*-smoke.md"))) == 1
    assert len(glob.glob(os.path.join(out, "*-smoke-cdf.png"))) == 1
    assert "| kvstore |" in smoke["_stdout"]
    env = smoke["environment"]
    assert env["versions"]["kvstore"] and env["python"] and env["cpus"]
    assert "sha" in env["git"]
    assert smoke["scenario"]["name"] == "smoke"


def test_systems_ran_or_were_skipped_with_a_reason(smoke: dict[str, Any]) -> None:
    systems = smoke["systems"]
    assert systems["kvstore"]["status"] == "ok"
    assert systems["floor_numpy"]["status"] == "ok"
    if HAVE_REDIS:
        assert systems["redis"]["status"] == "ok"
        assert systems["redis_asyncio"]["status"] == "ok"
        assert systems["redis_cluster"]["status"] == "ok"
        assert systems["floor_rocksdict"]["status"] == "ok"
    else:
        assert systems["redis"]["status"] == "skipped"
        assert "apt-get install -y redis-server" in systems["redis"]["reason"]


def test_open_loop_keeps_the_offered_rate_with_correct_answers(smoke: dict[str, Any]) -> None:
    phase = smoke["phases"][0]
    assert phase["mode"] == "open"
    ran = [n for n, s in smoke["systems"].items() if s["status"] == "ok"]
    assert set(phase["systems"]) == set(ran)
    for name, s in phase["systems"].items():
        assert abs(s["achieved_per_s"] - phase["offered_per_s"]) <= 0.2 * phase["offered_per_s"], name
        assert s["errors"] == {}, name
        assert s["checked"] > 0 and s["check_failed"] == 0, name
        lat = s["latency_us"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"], name
        assert lat["count"] == s["completed"] == s["sent"], name
        assert s["per_second"] and s["cdf_us"] and s["hdr"], name


def test_closed_loop_reports_throughput(smoke: dict[str, Any]) -> None:
    phase = smoke["phases"][1]
    assert phase["mode"] == "closed" and phase["concurrency"] == 2
    for name, s in phase["systems"].items():
        assert s["keys_per_s"] > 0 and s["check_failed"] == 0 and s["errors"] == {}, name
    kv = phase["systems"]["kvstore"]
    assert kv["retries"] == 0
    assert kv["node_stats"]["keys_read"] > 0
