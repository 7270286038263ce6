"""`kvstore bench ...`: run scenarios side by side with the peers, list them, re-render reports.

    kvstore bench list
    kvstore bench run k1000_uniform                      # all systems, writes bench/results/...
    kvstore bench run smoke --systems kvstore,floor_numpy --set duration_s=1 --out /tmp/b
    kvstore bench report bench/results/<stamp>-k1000_uniform.json

`run` writes, per scenario, `<out>/<UTC stamp>-<scenario>.json` (everything measured,
with environment, versions and git sha), `.md` (the summary, also printed) and PNG plots.
Exit status: 0 when every started system answered correctly; 1 when a system failed to
start (other than a skipped peer) or returned a wrong answer; 2 for a bad scenario or usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from typing import Any

from bench.environment import REPO
from bench.redis_systems import INSTALL_HINT
from bench.report import render
from bench.scenario import ScenarioError, list_scenarios, load_scenario, parse_overrides

log = logging.getLogger("bench")

DEFAULT_OUT = os.path.join(REPO, "bench", "results")
DOCS_START, DOCS_END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore bench", description="benchmark harness (issue #3)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the scenarios in bench/scenarios/")
    run = sub.add_parser("run", help="run scenarios against kvstore and its peers")
    run.add_argument("scenarios", nargs="+", help="scenario names (see 'list') or paths to .toml files")
    run.add_argument("--systems", help="comma-separated subset, e.g. kvstore,redis (default: the scenario's)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario field")
    run.add_argument("--out", default=DEFAULT_OUT, help="folder for JSON, Markdown and PNG (default bench/results)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--install-peers", action="store_true", help="apt-get install redis-server if it is missing")
    run.add_argument("--no-malloc-env", action="store_true", help="do not set glibc malloc thresholds (compare)")
    run.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    report = sub.add_parser("report", help="print the Markdown summary of result JSON files (and redraw plots)")
    report.add_argument("results", nargs="+", help="result .json files")
    report.add_argument("--plots", action="store_true", help="also redraw the PNG plots next to each JSON")
    report.add_argument(
        "--docs", metavar="MARKDOWN", help=f"replace the part of this file between {DOCS_START} and {DOCS_END}"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kvstore bench`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return cmd_list()
    if args.command == "report":
        return cmd_report(args)
    if not args.no_malloc_env and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads these once at start: run the harness again with them (grpc-call-cost.md)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], {**os.environ, **MALLOC_ENV})
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return cmd_run(args, argv)


def cmd_list() -> int:
    for name, description in list_scenarios():
        print(f"{name:18} {description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    sections = []
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        base = path.removesuffix(".json")
        if args.plots:
            from bench.plots import all_plots

            for made in all_plots(result, base):
                print(f"wrote {made}", file=sys.stderr)
        text = render(result)
        print(text)
        sections.append(text + _plot_links(base, args.docs))
    if args.docs:
        return _update_docs(args.docs, "\n".join(sections))
    return 0


def _plot_links(base: str, docs: str | None) -> str:
    """Return Markdown image links to the run's PNGs, relative to the docs file."""
    where = os.path.dirname(os.path.abspath(docs)) if docs else os.getcwd()
    links = []
    for suffix, title in (("-cdf", "latency CDF"), ("-p99-vs-load", "p99 against offered load"),
                          ("-timeline", "per-second latency around the timeline")):  # fmt: skip
        png = base + suffix + ".png"
        if os.path.exists(png):
            links.append(f"![{title}]({os.path.relpath(png, where)})")
    return "\n" + "\n\n".join(links) + "\n" if links else ""


def _update_docs(path: str, body: str) -> int:
    with open(path) as f:
        text = f.read()
    start, end = text.find(DOCS_START), text.find(DOCS_END)
    if start < 0 or end < start:
        print(f"kvstore bench: {path} has no {DOCS_START} ... {DOCS_END} section", file=sys.stderr)
        return 2
    with open(path, "w") as f:
        f.write(text[: start + len(DOCS_START)] + "\n\n" + body.rstrip() + "\n\n" + text[end:])
    print(f"updated {path}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        overrides = parse_overrides(args.set)
        if args.systems:
            overrides["systems"] = [s.strip() for s in args.systems.split(",") if s.strip()]
        scenarios = [load_scenario(name, overrides) for name in args.scenarios]
    except ScenarioError as exc:
        print(f"kvstore bench: {exc}", file=sys.stderr)
        return 2
    if any(s in scn.systems for scn in scenarios for s in ("redis", "redis_cluster")):
        _ensure_redis(args.install_peers)
    from bench.runner import run_scenario  # heavy imports (grpc, redis, rocksdict) only when running

    os.makedirs(args.out, exist_ok=True)
    status = 0
    for scn in scenarios:
        result = run_scenario(scn, command="kvstore bench " + shlex.join(argv))
        base = os.path.join(args.out, f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-{scn.name}")
        summary = render(result)
        _write(base, result, summary, plots=not args.no_plots)
        print(summary)
        status = max(status, _status(result))
    return status


def _write(base: str, result: dict[str, Any], summary: str, *, plots: bool) -> None:
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(summary)
    made = [base + ".json", base + ".md"]
    if plots:
        from bench.plots import all_plots

        made += all_plots(result, base)
    for path in made:
        log.info("wrote %s", os.path.relpath(path))


def _status(result: dict[str, Any]) -> int:
    failed = [n for n, s in result["systems"].items() if s.get("status") == "failed"]
    wrong = [
        n for p in result.get("phases", []) for n, s in p["systems"].items() if s.get("check_failed", 0) > 0
    ]  # fmt: skip
    for name in failed:
        log.error("system failed to start: %s: %s", name, result["systems"][name].get("reason"))
    for name in sorted(set(wrong)):
        log.error("system returned wrong answers: %s", name)
    return 1 if failed or wrong else 0


def _ensure_redis(install: bool) -> None:
    if shutil.which("redis-server"):
        return
    if not install:
        log.warning("redis-server is not on PATH: the Redis peers will be skipped; install with: %s", INSTALL_HINT)
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log.warning("--install-peers needs root and apt-get; install by hand: %s", INSTALL_HINT)
        return
    log.info("installing redis-server with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            log.warning("%s failed: %s", " ".join(cmd), done.stderr[-500:])
            return
