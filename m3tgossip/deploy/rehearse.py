"""A rehearsal of a campus deployment on one machine: bundles, namespaces, start.sh, status.

    python scripts/rehearse.py --topology topology/campus.toml --workload consensus \\
        --out runs/rehearsal -o size=256

Every node of the spec gets its own network namespace and address, its bundle is written for
that address (`m3tgossip deploy bundle`), and it is started by its bundle's `start.sh` inside
its namespace. The daemons run until every node has recorded `--rounds` rounds and, for the
consensus workload, is within `--target` of the exact mean (bounded by `--timeout`); then
`m3tgossip status` is asked of every node from an operator namespace with the operator key,
the daemons are stopped with SIGTERM and every namespace is deleted. Prints a per-node table
and writes `OUT/rehearsal.json`; exits 0 when the goal was reached, every status answered,
every daemon exited 0 and nothing was left behind, 1 otherwise, 2 if namespaces are unavailable
or the input is bad. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.deploy.bundle import BundleOptions
from m3tgossip.deploy.netns import STOP_TIMEOUT_S, NamespaceFederation
from m3tgossip.errors import ConfigError
from m3tgossip.harness.netlab import netns_available

#: seconds between looks at the nodes' metrics
POLL_S = 0.5
#: status queries run at once
STATUS_WORKERS = 4


def read_ready(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    """The JSON of the daemon's READY line (bounded wait); RuntimeError if it exits first."""
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"exited ({proc.wait(timeout=timeout_s)}) before READY")
            if line.startswith("READY "):
                return json.loads(line[len("READY ") :])
    raise RuntimeError(f"no READY line within {timeout_s} s")


def progress(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a node's metrics say: rounds done, its last error to the mean, its last accuracy."""
    last_eval = next((r for r in reversed(records) if "mean_acc" in r), None)
    return {
        "rounds": len(records),
        "error_to_mean": records[-1].get("error_to_mean") if records else None,
        "mean_acc": last_eval["mean_acc"] if last_eval else None,
        "tasks": {t: m["acc"] for t, m in last_eval["tasks"].items()} if last_eval else {},
        "bytes_out": records[-1]["bytes_out"] if records else 0,
        "seconds_per_round": (
            (records[-1]["time"] - records[0]["time"]) / (len(records) - 1)
            if len(records) > 1
            else None
        ),
    }


def ask(fed: NamespaceFederation, node_id: str, timeout_s: float) -> dict[str, Any]:
    """What `status` says of a node (its round and neighbours), or the error it gave."""
    try:
        s = fed.status(node_id, timeout_s)
    except (ConfigError, subprocess.SubprocessError, ValueError) as exc:
        return {"error": str(exc)}
    return {"round": s["round"], "neighbours": len(s["neighbours"])}


def reached(p: dict[str, Any], rounds: int, target: float | None) -> bool:
    if p["rounds"] < max(1, rounds):
        return False
    return target is None or (p["error_to_mean"] is not None and p["error_to_mean"] <= target)


def rehearse(args: argparse.Namespace) -> dict[str, Any]:
    """Run the rehearsal `args` describe; the result written to OUT/rehearsal.json."""
    target = args.target if args.workload == "consensus" else None
    settings = {f"workload.{k}": v for k, v in args.option} | dict(args.settings)
    options = BundleOptions(workload=args.workload, rounds=0, seed=args.seed, settings=settings)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = Path(args.out)
    result: dict[str, Any] = {"topology": str(args.topology), "workload": args.workload}
    fed = NamespaceFederation(args.topology, out, options, env=env)
    started = time.monotonic()
    try:
        fed.setup()
        for node_id in fed.ids:
            fed.start(node_id)
        result["ready"] = {n: read_ready(fed.procs[n], args.timeout) for n in fed.ids}
        deadline = started + args.timeout
        state: dict[str, dict[str, Any]] = {}
        while True:
            state = {
                n: progress(read_metrics(out / "nodes" / n / "state" / "metrics.jsonl"))
                for n in fed.ids
            }
            done = all(reached(p, args.rounds, target) for p in state.values())
            exited = [n for n, proc in fed.procs.items() if proc.poll() is not None]
            if done or exited or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        result["reached"] = done
        result["exited_early"] = exited
        with ThreadPoolExecutor(STATUS_WORKERS) as pool:
            answers = pool.map(lambda n: ask(fed, n, args.status_timeout), fed.ids)
            result["status"] = dict(zip(fed.ids, answers, strict=True))
        result["wall_s"] = round(time.monotonic() - started, 1)
        result["exit_codes"] = fed.stop(args.stop_timeout)
        result["nodes"] = {
            n: progress(read_metrics(out / "nodes" / n / "state" / "metrics.jsonl"))
            for n in fed.ids
        }
        result["processes_left"] = fed.pids_left()
    finally:
        left = fed.close()
        result["namespaces_left"] = sorted(set(left) | set(fed.lab.leftovers()))
    result["passed"] = bool(
        result["reached"]
        and not result["exited_early"]
        and all("error" not in s for s in result["status"].values())
        and all(code == 0 for code in result["exit_codes"].values())
        and not result["processes_left"]
        and not result["namespaces_left"]
    )
    (out / "rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{'node':<12} {'rounds':>6} {'s/round':>8} {'error':>10} {'mean acc':>8} status"]
    for n, p in result.get("nodes", {}).items():
        s = result["status"].get(n, {})
        spr = "-" if p["seconds_per_round"] is None else f"{p['seconds_per_round']:.2f}"
        err = "-" if p["error_to_mean"] is None else f"{p['error_to_mean']:.2e}"
        acc = "-" if p["mean_acc"] is None else f"{p['mean_acc']:.3f}"
        answer = s.get("error") or f"round {s['round']}, {s['neighbours']} neighbours"
        lines.append(f"{n:<12} {p['rounds']:>6} {spr:>8} {err:>10} {acc:>8} {answer}")
    lines.append(
        f"wall {result.get('wall_s')} s; goal reached: {result.get('reached')}; "
        f"exit codes 0: {all(c == 0 for c in result.get('exit_codes', {}).values())}; "
        f"left behind: {result.get('processes_left') or 'no process'}, "
        f"{result.get('namespaces_left') or 'no namespace'}; "
        + ("PASSED" if result["passed"] else "FAILED")
    )
    return "\n".join(lines) + "\n"


def _option(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (a bare word is a string), as `m3tgossip node -o` takes."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rehearse", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", required=True)
    p.add_argument("--out", required=True, help="folder for bundles, logs and rehearsal.json")
    p.add_argument("--workload", default="consensus", help="consensus | edu")
    p.add_argument("--rounds", type=int, default=0, help="rounds every node must record")
    p.add_argument(
        "--target", type=float, default=1e-6, help="consensus: relative error to reach (1e-6)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run (s)")
    p.add_argument(
        "--status-timeout",
        type=float,
        default=30.0,
        help="seconds a status query waits (a training node answers between its phases)",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        help="seconds the daemons get to exit after SIGTERM before they are killed",
    )
    p.add_argument("--option", "-o", action="append", type=_option, default=[])
    p.add_argument("--set", action="append", type=_option, default=[], dest="settings")
    args = p.parse_args(argv)
    ok, why = netns_available() if os.geteuid() == 0 else (False, "not root")
    if not ok:
        print(f"rehearse: network namespaces not available: {why}", file=sys.stderr)
        return 2
    try:
        result = rehearse(args)
    except ConfigError as exc:
        print(f"rehearse: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"rehearse: failed: {exc}", file=sys.stderr)
        return 1
    print(format_result(result), end="")
    return 0 if result["passed"] else 1
