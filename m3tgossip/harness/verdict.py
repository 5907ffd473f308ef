"""The checks of a chaos run and their report: what each measures, on what is left on disk.

Relative consensus error (consensus workload): every node records, each round, `digest`, 16
fixed random projections of each component (the same directions on every node). With d_i the
concatenated digests of the last record of alive honest node i and m their mean,
spread = max_i ||d_i - m|| / ||m||. Random projections preserve distances up to a small
factor (Johnson-Lindenstrauss), so this is the spread of the states among nodes relative to
their common value. It is not the error to the initial exact mean: a restarted node resumes
from its checkpoint and lost messages make the network mean drift a little, so the nodes agree
on a value near, not at, the initial mean (`error_to_mean` is reported for information).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from m3tgossip.daemon import checkpoint
from m3tgossip.harness.testbed import Testbed

#: the checks of a verdict, in its order
CHECKS = (
    "converged",
    "alive_and_progressing",
    "checkpoints_intact",
    "resumed_from_checkpoint",
    "metrics_parseable",
    "clean_shutdown",
    "no_process_left",
    "network_cleaned",
)
#: edu: evaluations averaged on each side of the nemesis (one evaluation is noisy)
EVALS = 3
#: fault-history events counted in `faults_injected`
FAULT_EVENTS = (
    "sigkill",
    "restart",
    "sigstop",
    "sigcont",
    "partition",
    "heal-partition",
    "partition-skipped",
    "kill-skipped",
    "stop-skipped",
)


# --------------------------------------------------------------------------- measurements


def digest_spread(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Relative spread of the nodes' digests (see the module docstring); None if undefined."""
    digests = {n: r["digest"] for n, r in records.items() if r.get("digest")}
    if len(digests) < 2:
        return {"spread": None, "nodes": sorted(digests)}
    comps = sorted(set.intersection(*(set(d) for d in digests.values())))
    vec = {
        n: np.concatenate([np.asarray(d[c], dtype=np.float64) for c in comps])
        for n, d in digests.items()
    }
    mean = np.mean(list(vec.values()), axis=0)
    norm = float(np.linalg.norm(mean))
    per = {n: float(np.linalg.norm(v - mean)) / (norm if norm > 0 else 1.0) for n, v in vec.items()}
    worst = max(per, key=lambda n: per[n])
    return {
        "spread": per[worst],
        "worst_node": worst,
        "per_node": per,
        "nodes": sorted(digests),
        "components": comps,
    }


def mean_metric(records: list[dict[str, Any]]) -> float | None:
    """The mean of the last EVALS mean accuracies among `records` (None if there is none)."""
    vals = [float(r["mean_acc"]) for r in records if r.get("mean_acc") is not None][-EVALS:]
    return float(np.mean(vals)) if vals else None


def last_metric(records: list[dict[str, Any]]) -> float | None:
    """The last mean accuracy among `records` (None if there is none)."""
    for rec in reversed(records):
        if rec.get("mean_acc") is not None:
            return float(rec["mean_acc"])
    return None


def metrics_health(path: Path) -> dict[str, int]:
    """Lines of a metrics file and how many do not parse (a SIGKILL may tear one line)."""
    total = bad = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                total += 1
                try:
                    if not isinstance(json.loads(line), dict):
                        bad += 1
                except json.JSONDecodeError:
                    bad += 1
    except FileNotFoundError:
        pass
    return {"lines": total, "unparseable": bad}


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (this run's folder)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and pid_alive(int(entry)):
            out.append(int(entry))
    return out


# --------------------------------------------------------------------------- convergence


def consensus_convergence(bed: Testbed, nodes: list[str], tolerance: float) -> dict[str, Any]:
    """Whether the digests of `nodes` (alive, honest) agree within `tolerance`."""
    last = {}
    for nid in nodes:
        recs = bed.records(nid)
        if recs:
            last[nid] = recs[-1]
    s = digest_spread(last)
    errs: list[float] = [
        r["error_to_mean"] for r in last.values() if r.get("error_to_mean") is not None
    ]
    s["error_to_mean_max"] = max(errs) if errs else None
    s["rounds"] = {n: int(r["round"]) for n, r in last.items()}
    s["ok"] = s["spread"] is not None and len(last) == len(nodes) and s["spread"] <= tolerance
    s["definition"] = (
        "max over alive honest nodes i of ||d_i - mean(d)|| / ||mean(d)||, d_i the "
        "concatenated 16-dim random-projection digests of node i's last metrics record"
    )
    s["tolerance"] = tolerance
    return s


def edu_convergence(
    bed: Testbed,
    nodes: list[str],
    pre_metric: dict[str, float | None],
    heal_wall: float,
    metric_tol: float,
) -> dict[str, Any]:
    """Whether every node of `nodes` evaluated after the heal (wall time `heal_wall`) and kept
    its pre-nemesis accuracy within `metric_tol`."""
    per: dict[str, Any] = {}
    ok = True
    for nid in nodes:
        recs = [r for r in bed.records(nid) if r.get("mean_acc") is not None]
        after = [r for r in recs if r.get("time", 0) > heal_wall]
        final = float(np.mean([r["mean_acc"] for r in after[-EVALS:]])) if after else None
        pre = pre_metric.get(nid)
        node_ok = (
            final is not None
            and math.isfinite(final)
            and (pre is None or final >= pre - metric_tol)
        )
        per[nid] = {
            "pre_nemesis": pre,
            "final": final,
            "last": float(after[-1]["mean_acc"]) if after else None,
            "evaluations_after_heal": len(after),
            "round": int(after[-1]["round"]) if after else None,
            "ok": node_ok,
        }
        ok = ok and node_ok
    finals = [v["final"] for v in per.values() if v["final"] is not None]
    return {
        "ok": ok and bool(nodes),
        "definition": f"every alive honest node evaluated after the heal; the mean of its last "
        f"{EVALS} mean-accuracy evaluations is at least the mean of its last {EVALS} before "
        "the nemesis minus metric_tol",
        "metric_tol": metric_tol,
        "mean_final_acc": sum(finals) / len(finals) if finals else None,
        "per_node": per,
    }


# --------------------------------------------------------------------------- the checks


def checkpoints_intact(bed: Testbed) -> dict[str, Any]:
    """Every node's checkpoint loads, and its round is at least the last recorded round + 1."""
    ck: dict[str, Any] = {}
    ck_ok = True
    for nid in bed.nodes:
        recs = bed.records(nid)
        last = int(recs[-1]["round"]) if recs else -1
        try:
            found = checkpoint.load(bed.child(nid).folder)
            rnd = int(found[1]["round"]) if found else None
            good = rnd is not None and rnd >= last + 1
            ck[nid] = {"round": rnd, "last_metrics_round": last, "ok": good}
        except checkpoint.CheckpointError as exc:
            good = False
            ck[nid] = {"error": str(exc), "ok": False}
        ck_ok = ck_ok and good
    return {
        "passed": ck_ok,
        "per_node": ck,
        "definition": "checkpoint loads and its round >= last metrics round + 1",
    }


def resumed_from_checkpoint(
    bed: Testbed, kill_info: list[dict[str, Any]], workload: str, metric_tol: float
) -> dict[str, Any]:
    """Every SIGKILLed node restarted at the round of the checkpoint it left (and, edu, kept
    its accuracy within `metric_tol`)."""
    per = []
    ok = True
    for info in kill_info:
        nid = info["node"]
        recs = bed.records(nid)
        readies = bed.readies(nid)
        idx = info.get("start_index")
        ready = readies[idx] if idx is not None and idx < len(readies) else None
        resumed_round = ready["round"] if ready else None
        sessions_after = [r for r in recs if ready and r.get("session") == ready["session"]]
        first_after = sessions_after[0] if sessions_after else None
        expected = info.get("checkpoint_round")
        row = {
            "node": nid,
            "killed_at_s": info["t"],
            "checkpoint_round_at_kill": expected,
            "resumed_round": resumed_round,
            "first_round_after": int(first_after["round"]) if first_after else None,
            "last_round_before": info["last_metrics_round"],
        }
        good = (
            expected is not None
            and resumed_round == expected
            and row["first_round_after"] is not None
            and row["first_round_after"] >= expected
        )
        if workload == "edu":
            before = info.get("metric_before")
            after = next(
                (float(r["mean_acc"]) for r in sessions_after if r.get("mean_acc") is not None),
                None,
            )
            first_ever = next(
                (float(r["mean_acc"]) for r in recs if r.get("mean_acc") is not None), None
            )
            row.update(
                metric_before_kill=before,
                metric_first_after_restart=after,
                metric_first_ever=first_ever,
            )
            if before is not None and after is not None:
                row["metric_change"] = after - before
                good = good and after >= before - metric_tol
        row["ok"] = good
        ok = ok and good
        per.append(row)
    return {
        "passed": ok,
        "restarts": per,
        "definition": "a restarted node announces (READY) exactly the round of the checkpoint "
        "it left at the SIGKILL and records no round before it"
        + (
            "; its first mean accuracy after the restart is at least the last before the "
            "kill minus metric_tol"
            if workload == "edu"
            else ""
        ),
    }


def metrics_parseable(bed: Testbed, kill_info: list[dict[str, Any]]) -> dict[str, Any]:
    """Every metrics file has lines, all parse except at most one torn line per SIGKILL."""
    health = {nid: metrics_health(bed.child(nid).folder / "metrics.jsonl") for nid in bed.nodes}
    kills = {nid: sum(1 for k in kill_info if k["node"] == nid) for nid in bed.nodes}
    ok = all(h["lines"] > 0 and h["unparseable"] <= kills[nid] for nid, h in health.items())
    return {
        "passed": ok,
        "per_node": health,
        "definition": "every line parses, except at most one torn line per SIGKILL",
    }


def clean_shutdown(
    codes: dict[str, int | None], unexpected: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every daemon exited 0 on the final SIGTERM and none exited on its own before."""
    return {
        "passed": all(c == 0 for c in codes.values()) and not unexpected,
        "exit_codes_on_sigterm": codes,
        "unexpected_exits": unexpected,
    }


def no_process_left(pids: list[int], nodes_dir: Path) -> dict[str, Any]:
    """None of the started processes, and no process mentioning the run's folder, is alive."""
    alive_pids = [p for p in pids if pid_alive(p)]
    strays = processes_mentioning(str(nodes_dir))
    return {
        "passed": not alive_pids and not strays,
        "pids_started": len(pids),
        "still_alive": alive_pids,
        "daemon_processes_of_this_run": strays,
    }


def faults_injected(history: list[dict[str, Any]]) -> dict[str, int]:
    """How many of each fault event the run's history holds."""
    injected: dict[str, int] = {}
    for h in history:
        if h["event"] in FAULT_EVENTS:
            injected[h["event"]] = injected.get(h["event"], 0) + 1
    return injected


def format_verdict(v: dict[str, Any]) -> str:
    """The lines the chaos runner prints at the end: the verdict and one line per check."""
    lines = [
        f"chaos verdict: {'PASSED' if v['passed'] else 'FAILED'}  ({v['topology']}, "
        f"{v['nodes']} nodes, {v['workload']}, {v['net']}, loss {v['message_loss']:g}, "
        f"{v['elapsed_s']:.0f} s)"
    ]
    if v["net_note"]:
        lines.append(f"  note: {v['net_note']}")
    lines.append(
        "  faults: " + ", ".join(f"{k} {n}" for k, n in sorted(v["faults_injected"].items()))
    )
    for name, c in v["checks"].items():
        extra = ""
        if name == "converged":
            if "spread" in c:
                sp, em = c.get("spread"), c.get("error_to_mean_max")
                extra = (
                    f"spread {sp:.3e} (tol {c['tolerance']:g})" if sp is not None else "spread n/a"
                )
                if em is not None:
                    extra += f", error to initial mean {em:.3e}"
            else:
                m = c.get("mean_final_acc")
                extra = (
                    f"mean final accuracy {m:.3f}" if m is not None else "no evaluation after heal"
                )
        elif name == "resumed_from_checkpoint":
            extra = "; ".join(
                f"{r['node']} ck {r['checkpoint_round_at_kill']} -> ready {r['resumed_round']}"
                for r in c["restarts"]
            )
        lines.append(f"  [{'ok' if c['passed'] else 'FAIL'}] {name} {extra}")
    return "\n".join(lines)
