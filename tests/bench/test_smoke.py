"""The benchmark harness end to end on the smoke scenarios, so it never rots (issues #3, #4).

Runs `python -m bench run smoke` (with a 3-replica kvstore next to the single copy) and
`python -m bench run smoke_replicated` (kill -9 of the busiest leader under reads and a write
stream) in subprocesses (they start node and redis-server processes and always stop them)
and checks the JSON they write. The Redis peers run only where `redis-server` is on PATH;
elsewhere they must be reported as skipped with the install hint.
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


def run_bench(out: Any, scenario: str, *args: str) -> dict[str, Any]:
    """Run one scenario with `python -m bench`; return its result JSON (plus `_out`, `_stdout`)."""
    cmd = [sys.executable, "-m", "bench", "run", scenario, "--out", str(out), "-q", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, f"bench exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (path,) = glob.glob(str(out / f"*-{scenario}.json"))
    with open(path) as f:
        result: dict[str, Any] = json.load(f)
    result["_out"] = str(out)
    result["_stdout"] = done.stdout
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    systems = "kvstore,kvstore_r3,redis,redis_asyncio,redis_cluster,floor_rocksdict,floor_numpy"
    if not HAVE_REDIS:
        systems = "kvstore,kvstore_r3,redis,floor_numpy"
    return run_bench(tmp_path_factory.mktemp("bench"), "smoke", "--systems", systems)


@pytest.fixture(scope="module")
def leader_kill(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_bench(tmp_path_factory.mktemp("bench"), "smoke_replicated")


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
    assert systems["kvstore_r3"]["status"] == "ok" and systems["kvstore_r3"]["info"]["replicas"] == 3
    assert systems["kvstore"]["info"]["replicas"] == 1
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


def test_replicated_latency_is_reported_against_the_single_copy(smoke: dict[str, Any]) -> None:
    phase = smoke["phases"][0]
    one, three = phase["systems"]["kvstore"], phase["systems"]["kvstore_r3"]
    assert three["errors"] == {} and three["checked"] > 0 and three["check_failed"] == 0
    assert isinstance(three["hedges"], int) and isinstance(one["hedges"], int)  # from the client's counter
    ratio = three["latency_us"]["p99"] / one["latency_us"]["p99"]
    assert f"= {ratio:.2f}×" in smoke["_stdout"].split("Replicated ÷ single-copy (kvstore)")[1]


def test_leader_kill_keeps_reads_answering_and_writes_resume(leader_kill: dict[str, Any]) -> None:
    (phase,) = leader_kill["phases"]
    kill, restart = phase["events"]
    assert kill["action"] == "kill" and kill["chosen_as"] == "leader" and kill["error"] is None
    assert kill["node"] in {"n1", "n2", "n3"} and kill["led_partitions"]
    assert restart["action"] == "restart" and restart["node"] == kill["node"] and restart["error"] is None
    reads = phase["systems"]["kvstore"]
    assert reads["check_failed"] == 0 and reads["checked"] > 0
    after = [r for r in reads["per_second"] if r["second"] > kill["done_s"]]
    assert after and all(r["completed"] > 0 for r in after), reads["per_second"]
    assert reads["errors"] == {}, f"reads failed while two replicas lived: {reads['per_second']}"
    (failover,) = reads["write_stream"]["failover"]
    assert failover["node"] == kill["node"] and failover["affected_writes_after_kill"] > 0
    assert failover["failover_s"] is not None, "no write to the killed leader's partitions was acknowledged"
    assert "Around the kill:" in leader_kill["_stdout"]
    assert len(glob.glob(os.path.join(leader_kill["_out"], "*-smoke_replicated-timeline.png"))) == 1
