#!/usr/bin/env python3
"""The hivemind side of `benchmarks/peers.py`: N `DecentralizedAverager` peers to the exact mean.

Run by peers.py in a Python that has hivemind and torch (it imports neither m3tgossip nor
anything of this repository). As the coordinator (no `--peer`) it starts N peer processes of
itself, each in its own session, and reads their event lines; as a peer (`--peer I`) it is one
participant:

1. a DHT node on 127.0.0.1 (peer 0 writes its addresses to OUT/peer0.maddrs, the others wait
   for that file and join through it), then a `DecentralizedAverager` over `--components`
   float32 tensors of `--size` values drawn from a generator seeded by (seed, peer, component),
   with target and minimum group size N; then it prints its `ready` event;
2. `step()` back to back; after each, the relative error ||x - mean|| / ||mean|| of all its
   tensors to the exact mean of every peer's initial values (computed in float64 on a
   background thread from `ready` on; the step's end time is taken before the check), until it
   is at most `--target`;
3. it waits for `stop` in OUT and leaves.

Once every peer reported its exact step, the coordinator prints one line `EXACT {"pids": ...}`
and waits for a line on standard input (peers.py samples the peers' memory meanwhile), then
writes `stop`, reaps the peers (killing the process group of any that stays) and writes
OUT/result.json: the row of the comparison. Exit 1 if a peer failed or the timeout passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

#: seconds between looks at the peers' event files
POLL_S = 0.02
#: seconds peers get to leave after `stop` before their process groups are killed
LEAVE_S = 30.0


def initial(seed: int, peer: int, component: int, size: int) -> np.ndarray:
    """Peer `peer`'s seeded initial values of one tensor (float64 draws rounded to float32)."""
    rng = np.random.default_rng([seed, peer, component])
    return rng.standard_normal(size).astype(np.float32)


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def run_peer(a: argparse.Namespace) -> int:
    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager

    torch.set_num_threads(1)
    out = Path(a.out)
    deadline = time.monotonic() + a.timeout
    initial_peers: list[str] = []
    if a.peer > 0:
        book = out / "peer0.maddrs"
        while not book.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("peer 0 never wrote its addresses")
            time.sleep(0.01)
        initial_peers = json.loads(book.read_text())
    dht = hivemind.DHT(
        start=True, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    if a.peer == 0:
        tmp = out / "peer0.maddrs.tmp"
        tmp.write_text(json.dumps([str(m) for m in dht.get_visible_maddrs()]))
        tmp.rename(out / "peer0.maddrs")
    tensors = [torch.from_numpy(initial(a.seed, a.peer, c, a.size)) for c in range(a.components)]
    averager = DecentralizedAverager(
        tensors,
        dht,
        start=True,
        prefix="peers_bench",
        target_group_size=a.peers,
        min_group_size=a.peers,
    )
    emit({"event": "ready", "peer": a.peer, "time": time.time(), "pid": os.getpid()})

    mean: list[np.ndarray] = []

    def exact_mean() -> None:
        for c in range(a.components):
            acc = np.zeros(a.size, dtype=np.float64)
            for p in range(a.peers):
                acc += initial(a.seed, p, c, a.size)
            mean.append(acc / a.peers)

    worker = threading.Thread(target=exact_mean, daemon=True)
    worker.start()
    steps = 0
    error = float("inf")
    while error > a.target and time.monotonic() < deadline:
        try:
            averager.step(timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - reported, then tried again
            emit({"event": "step-failed", "peer": a.peer, "time": time.time(), "error": repr(exc)})
            continue
        done = time.time()
        steps += 1
        worker.join()
        with averager.get_tensors() as now:
            diffs = [t.numpy().astype(np.float64) - m for t, m in zip(now, mean, strict=True)]
        sq = sum(float(d @ d) for d in diffs)
        norm = float(np.sqrt(sum(float(m @ m) for m in mean)))
        error = float(np.sqrt(sq)) / norm
        emit({"event": "step", "peer": a.peer, "time": done, "step": steps, "error": error})
    if error > a.target:
        emit({"event": "gave-up", "peer": a.peer, "time": time.time(), "error": error})
    while not (out / "stop").exists() and time.monotonic() < deadline + LEAVE_S:
        time.sleep(0.05)
    averager.shutdown()
    dht.shutdown()
    return 0 if error <= a.target else 1


def events(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def coordinate(a: argparse.Namespace) -> int:
    import hivemind
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("peer0.maddrs", "stop", "result.json"):
        (out / stale).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, str(Path(__file__).resolve()), "--out", str(out)]
    base += ["--peers", str(a.peers), "--size", str(a.size), "--components", str(a.components)]
    base += ["--target", repr(a.target), "--seed", str(a.seed), "--timeout", repr(a.timeout)]
    procs: dict[int, subprocess.Popen] = {}
    launch: dict[int, float] = {}
    logs = {i: out / f"peer{i}.log" for i in range(a.peers)}
    ok = False
    try:
        for i in range(a.peers):
            with open(logs[i], "w") as stdout, open(out / f"peer{i}.err", "w") as stderr:
                launch[i] = time.time()
                procs[i] = subprocess.Popen(
                    [*base, "--peer", str(i)],
                    stdout=stdout,
                    stderr=stderr,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
        deadline = time.monotonic() + a.timeout
        ready: dict[int, dict[str, Any]] = {}
        exact: dict[int, dict[str, Any]] = {}
        failures = 0
        while len(exact) < a.peers and time.monotonic() < deadline:
            for i in range(a.peers):
                if i in exact:
                    continue
                evs = events(logs[i])
                for ev in evs:
                    if ev["event"] == "ready":
                        ready[i] = ev
                    elif ev["event"] == "step" and ev["error"] <= a.target:
                        exact[i] = ev
                failures = max(failures, sum(ev["event"] == "step-failed" for ev in evs))
                if i not in exact and procs[i].poll() is not None:
                    raise RuntimeError(
                        f"peer {i} exited with {procs[i].returncode}; see {out / f'peer{i}.err'}"
                    )
            time.sleep(POLL_S)
        if len(exact) < a.peers:
            raise TimeoutError(f"{a.peers - len(exact)} peers not exact within {a.timeout:g} s")
        pids = {str(i): p.pid for i, p in procs.items()}
        print("EXACT " + json.dumps({"pids": pids}), flush=True)
        sys.stdin.readline()
        all_ready = max(ev["time"] for ev in ready.values())
        result = {
            "system": "hivemind",
            "graph": "all-reduce group",
            "peers": a.peers,
            "state_bytes": a.size * a.components * 4,
            "components": a.components,
            "dtype": "float32",
            "security": "libp2p TLS 1.3 (hivemind default)",
            "seconds_to_exact": max(ev["time"] for ev in exact.values()) - all_ready,
            "steps_to_exact": max(ev["step"] for ev in exact.values()),
            "failed_steps_max": failures,
            "startup_s": all_ready - min(launch.values()),
            "startup_per_peer_s": spread([ready[i]["time"] - launch[i] for i in ready]),
            "versions": {"hivemind": hivemind.__version__, "torch": torch.__version__},
            "settings": {
                "target_group_size": a.peers,
                "min_group_size": a.peers,
                "other": "DecentralizedAverager defaults",
            },
        }
        (out / "result.json").write_text(json.dumps(result, indent=2))
        ok = True
    finally:
        (out / "stop").write_text("")
        end = time.monotonic() + LEAVE_S
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of the peer: p2pd, children
            except ProcessLookupError:
                pass
            proc.wait()
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--size", type=int, required=True, help="float32 values per tensor")
    p.add_argument("--components", type=int, default=6, help="tensors per peer")
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--peer", type=int, default=None, help="run as this peer (0..N-1)")
    a = p.parse_args()
    return run_peer(a) if a.peer is not None else coordinate(a)


if __name__ == "__main__":
    sys.exit(main())
