"""Running a federation on engines people already have: SLURM jobs and Kubernetes.

`m3tgossip.engines.slurm` writes an sbatch job (one daemon per task) and is the launcher each
task runs; `m3tgossip.engines.kubernetes` writes a StatefulSet with its Service, ConfigMap and
Secrets from the shared spec. `m3tgossip.engines.commands` holds the `m3tgossip slurm ...` and
`m3tgossip kube ...` subcommands. `scripts/Containerfile` builds the image the manifests run.
"""

from m3tgossip.engines.commands import add_parsers, run
from m3tgossip.engines.common import OPERATOR, ensure_keys, node_overrides, node_toml, write_atomic
from m3tgossip.engines.kubernetes import KubeOptions, install_key, pod_node, write_manifests
from m3tgossip.engines.slurm import (
    BASE_PORT,
    SbatchOptions,
    TaskPlan,
    collect,
    format_collect,
    plan_task,
    resolve,
    sbatch_script,
    write_sbatch,
)
from m3tgossip.engines.slurm_step import SlurmStep, expand_hostlist, layout, tasks_per_node

__all__ = [
    "BASE_PORT",
    "KubeOptions",
    "OPERATOR",
    "SbatchOptions",
    "SlurmStep",
    "TaskPlan",
    "add_parsers",
    "collect",
    "ensure_keys",
    "expand_hostlist",
    "format_collect",
    "install_key",
    "layout",
    "node_overrides",
    "node_toml",
    "plan_task",
    "pod_node",
    "resolve",
    "run",
    "sbatch_script",
    "tasks_per_node",
    "write_atomic",
    "write_manifests",
    "write_sbatch",
]
