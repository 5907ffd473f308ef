"""Where the tasks of a SLURM job step run, read from the environment SLURM gives each task.

Every task of a step sees the same step variables (node list, tasks per node, distribution)
and its own rank, so every task computes the same rank -> host table (`SlurmStep.hosts`); it
checks the row of its own rank against the node it runs on (`SLURMD_NODENAME`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from m3tgossip.errors import ConfigError

ENV = "SLURM environment"
#: longest `scontrol show hostnames` may take
SCONTROL_TIMEOUT_S = 30.0

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")


# ----------------------------------------------------------------------------- SLURM syntax


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets; ConfigError for unbalanced brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(ENV, text, "nested '[' in a host list")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(ENV, text, "']' without '[' in a host list")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(ENV, text, "'[' without ']' in a host list")
    parts.append(text[start:])
    return parts


def _expand_range(group: str, text: str) -> list[str]:
    out: list[str] = []
    for item in group.split(","):
        m = _RANGE.fullmatch(item.strip())
        if m is None:
            raise ConfigError(ENV, text, f"bad range {item!r} in a host list")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ConfigError(ENV, text, f"range {item!r} runs backwards")
        if int(hi) - int(lo) > 100_000:
            raise ConfigError(ENV, text, f"range {item!r} is too long")
        out += [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(text: str) -> list[str]:
    """The host names of a SLURM host list, in order: `node[01-03,7],gpu1` ->
    node01, node02, node03, node7, gpu1 (each range zero-padded as its first number is;
    several bracket groups in one name expand to every combination, the last varying fastest).
    """
    text = text.strip()
    if not text:
        raise ConfigError(ENV, "host list", "empty")
    hosts: list[str] = []
    for item in _split_top(text):
        if not item:
            raise ConfigError(ENV, text, "empty name in a host list")
        names = [""]
        for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            if not literal and not group:
                continue
            names = [n + literal for n in names]
            if group:
                names = [n + v for n in names for v in _expand_range(group, text)]
        hosts += names
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST`; `expand_hostlist` where scontrol is not on PATH or
    does not answer (no slurm.conf outside a job, say)."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            done = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=SCONTROL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pass
        else:
            if done.returncode == 0 and done.stdout.split():
                return done.stdout.split()
    return expand_hostlist(nodelist)


def tasks_per_node(text: str) -> list[int]:
    """SLURM's tasks-per-node list: `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in text.split(","):
        m = _COUNT.fullmatch(item.strip())
        if m is None:
            raise ConfigError(ENV, text, f"bad tasks-per-node entry {item!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def layout(nodes: Sequence[str], counts: Sequence[int], distribution: str) -> list[str]:
    """The host of every task rank, for tasks placed `counts[i]` on `nodes[i]` in this
    distribution (`block`, `cyclic`, `plane=N`; only the node level, before `:`, matters)."""
    if len(nodes) != len(counts):
        raise ConfigError(
            ENV, "SLURM_STEP_TASKS_PER_NODE", f"{len(counts)} counts for {len(nodes)} nodes"
        )
    kind = (distribution or "block").split(":")[0].split(",")[0].strip().lower()
    if len(nodes) == 1 or kind in ("block", "unknown", ""):
        return [host for host, n in zip(nodes, counts, strict=True) for _ in range(n)]
    if kind == "cyclic" or kind.startswith("plane"):
        size = 1
        if kind.startswith("plane"):
            _, _, num = kind.partition("=")
            if not num.isdigit() or int(num) < 1:
                raise ConfigError(ENV, "SLURM_DISTRIBUTION", f"bad plane size in {distribution!r}")
            size = int(num)
        left, out = list(counts), []
        while any(left):
            for i, host in enumerate(nodes):
                take = min(size, left[i])
                out += [host] * take
                left[i] -= take
        return out
    raise ConfigError(
        ENV,
        "SLURM_DISTRIBUTION",
        f"cannot place tasks laid out {distribution!r} across nodes; "
        "run srun with --distribution=block (the template does)",
    )


# ----------------------------------------------------------------------------- the step


def _env_int(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        if name in env:
            try:
                value = int(env[name])
            except ValueError:
                raise ConfigError(ENV, name, f"not an integer: {env[name]!r}") from None
            if value < 0:
                raise ConfigError(ENV, name, f"negative: {value}")
            return value
    raise ConfigError(
        ENV, names[0], "not set: run `m3tgossip slurm task` as an srun task (the template does)"
    )


@dataclass(frozen=True)
class SlurmStep:
    """Where the tasks of one job step run, as every task of the step reads it."""

    rank: int
    ntasks: int
    #: host of every task rank, in rank order
    hosts: tuple[str, ...]
    #: the SLURM node this task runs on (SLURMD_NODENAME), if known
    nodename: str | None = None
    job_id: str | None = None

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        hostnames: Callable[[str], list[str]] = scontrol_hostnames,
    ) -> SlurmStep:
        """The step of the calling task, from SLURM's task environment; ConfigError naming the
        variable if one is missing or malformed, or if the layout does not put this task on
        the node it runs on."""
        env = os.environ if env is None else env
        rank = _env_int(env, "SLURM_PROCID")
        ntasks = _env_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        name = next(
            (
                n
                for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                if n in env
            ),
            None,
        )
        if name is None:
            raise ConfigError(ENV, "SLURM_STEP_NODELIST", "not set (nor SLURM_JOB_NODELIST)")
        nodes = hostnames(env[name])
        if not nodes:
            raise ConfigError(ENV, name, f"no hosts in {env[name]!r}")
        counts_var = next(
            (n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in env), None
        )
        if counts_var is not None:
            counts = tasks_per_node(env[counts_var])
        elif len(nodes) == 1:
            counts = [ntasks]
        else:
            raise ConfigError(ENV, "SLURM_STEP_TASKS_PER_NODE", "not set, and the step has nodes")
        if sum(counts) != ntasks:
            raise ConfigError(
                ENV, counts_var or "", f"{sum(counts)} tasks placed, but the step has {ntasks}"
            )
        hosts = layout(nodes, counts, env.get("SLURM_DISTRIBUTION", "block"))
        if rank >= ntasks:
            raise ConfigError(ENV, "SLURM_PROCID", f"rank {rank} of only {ntasks} tasks")
        nodename = env.get("SLURMD_NODENAME") or None
        if nodename is not None and hosts[rank] != nodename:
            raise ConfigError(
                ENV,
                "SLURMD_NODENAME",
                f"task {rank} runs on {nodename}, but the step's layout puts it on "
                f"{hosts[rank]}; run srun with --distribution=block",
            )
        return cls(rank, ntasks, tuple(hosts), nodename, env.get("SLURM_JOB_ID"))
