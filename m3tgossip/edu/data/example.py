"""The built-in federation as data folders: `m3tgossip data example --topology SPEC --out DIR`.

One folder per node, `DIR/<node id>`, holding exactly the records `federation.node_data` gives
the node (its train and test records, the split written in labels.csv), in the format of
`m3tgossip/docs/data.md`. The generator draws one learner per record, so each record has its own
learner id. The values are already on the encoders' scales, so the manifests turn
standardisation, image inversion and cropping off; training a node on its folder is training
it on the built-in records (the images are 8-bit PNGs, within 1/510 of the generated pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3tgossip.edu.data.config import DataConfig
from m3tgossip.edu.data.federation import NodeLike, node_data
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.writer import ENCODER_SCALE, write_folder


def write_node_example(node: NodeLike, out: str | Path, config: DataConfig) -> Path:
    """Write the node's built-in records into the folder `out`."""
    train, test = node_data(node, config)
    data = EduData.concat([train, test])
    n = len(data)
    return write_folder(
        out,
        data,
        records=[f"{node.id}-r{i:05d}" for i in range(n)],
        learners=[f"{node.id}-l{i:05d}" for i in range(n)],
        modalities=node.modalities,
        tasks=node.tasks,
        node=node.id,
        test=np.arange(n) >= len(train),
        description=(
            f"built-in records of node {node.id} (federation seed {config.seed}, "
            f"records {config.records}, alpha {config.alpha})"
        ),
        settings=ENCODER_SCALE,
    )


def write_example(nodes: list[NodeLike], out: str | Path, config: DataConfig) -> list[Path]:
    """One folder per node under `out`; returns their paths."""
    return [write_node_example(node, Path(out) / node.id, config) for node in nodes]
