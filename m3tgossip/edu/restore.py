"""A trained edu node rebuilt from its state folder, for `m3tgossip predict` and `export`.

The folder holds what the daemon wrote: `node.json` (node id, topology, seed, workload options;
`m3tgossip.daemon.nodeinfo`) and `checkpoint.npz` (every trained component, and the data
preprocessing of a node trained on a data folder). The model is built as the workload built it
and checked against the checkpoint's model id before its parameters are loaded.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.nodeinfo import FILENAME as NODE_INFO
from m3tgossip.daemon.nodeinfo import read_node_info
from m3tgossip.edu.data.adapt import Adapter
from m3tgossip.edu.model.lora import LoraSpec
from m3tgossip.edu.model.node_model import NodeModel, build_node_model
from m3tgossip.edu.model.pretrained import DEFAULT_CHECKPOINT
from m3tgossip.edu.workload import workload_options
from m3tgossip.errors import ConfigError
from m3tgossip.topology import NodeSpec, Topology
from m3tgossip.topology.load import parse_topology

ADAPTER_KEY = "data/adapter"


def model_id(model: NodeModel) -> str:
    """The id `EduWorkload.model_id` gives the same model."""
    digest = hashlib.sha256(json.dumps(model.identity, sort_keys=True).encode()).hexdigest()
    return "edu-" + digest[:16]


@dataclass
class TrainedNode:
    """A node's model with its trained parameters, and what it was trained with."""

    state_dir: Path
    info: dict[str, Any]
    topology: Topology
    node: NodeSpec
    options: dict[str, Any]
    model: NodeModel
    model_id: str
    meta: dict[str, Any]
    adapter: Adapter

    def metrics(self) -> list[dict[str, Any]]:
        """The node's metrics records (`metrics.jsonl` in its state folder)."""
        return read_metrics(self.state_dir / "metrics.jsonl")


def build_model(node: NodeSpec, seed: int, options: dict[str, Any]) -> NodeModel:
    """The model `EduWorkload` builds for `node` with these (checked) workload options."""
    o = options
    return build_node_model(
        node,
        seed=seed,
        lora=LoraSpec(rank=o["lora_rank"], mode=o["lora_mode"], alpha=float(o["lora_alpha"])),
        checkpoint=Path(o["checkpoint"]) if o["checkpoint"] else DEFAULT_CHECKPOINT,
        backbone_path=Path(o["backbone_path"]) if o["backbone_path"] else None,
        backbone_layers=o["backbone_layers"],
    )


def load_trained_node(state_dir: str | Path) -> TrainedNode:
    """The node of `state_dir`; ConfigError naming the file if something is missing or wrong."""
    folder = Path(state_dir)
    info = read_node_info(folder)
    source = str(folder / NODE_INFO)
    if info["workload"] != "edu":
        raise ConfigError(
            source, "workload", f"an edu node is needed, this one ran {info['workload']!r}"
        )
    try:
        topology = parse_topology(tomllib.loads(info["topology"]), f"{source} (topology)")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "topology", str(exc)) from None
    node = topology.node(info["node"])
    try:
        options = workload_options(info.get("workload_options") or {})
    except ValueError as exc:
        raise ConfigError(source, "workload_options", str(exc)) from None
    try:
        found = checkpoint.load(folder)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(str(folder / checkpoint.FILENAME), "", str(exc)) from None
    if found is None:
        raise ConfigError(
            str(folder / checkpoint.FILENAME), "", "missing: the node never checkpointed"
        )
    arrays, meta = found
    model = build_model(node, int(info["seed"]), options)
    identity = model_id(model)
    if meta.get("model_id") != identity:
        raise ConfigError(
            str(folder / checkpoint.FILENAME),
            "model_id",
            f"{meta.get('model_id')!r}, but the model node.json describes is {identity!r}",
        )
    for c, x in model.vectors().items():
        saved = arrays.get(f"param/{c}")
        if saved is None or saved.shape != x.shape:
            raise ConfigError(
                str(folder / checkpoint.FILENAME), f"param/{c}", "missing or misshapen"
            )
        x[...] = saved
    model.eval()
    adapter = Adapter.from_array(arrays[ADAPTER_KEY]) if ADAPTER_KEY in arrays else Adapter()
    return TrainedNode(folder, info, topology, node, options, model, identity, meta, adapter)
