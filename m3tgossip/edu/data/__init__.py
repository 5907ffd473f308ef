"""Education data for the `edu` workload: the built-in multi-modal generator and real-data loaders.

`node_data` gives a node its own records from its topology entry and the federation seed;
`load_oulad` reads the Open University Learning Analytics Dataset into the same `EduData` form.

- `schema`: modalities, tasks, shapes, the clickstream vocabulary, group attributes;
- `records`: `EduData`, the container every source fills;
- `config`: `DataConfig`, how many built-in records a node makes and how skewed they are;
- `federation`: `node_data`, `node_records`, `pooled_data`, the records of each node, and
  `unseen_data`, learners of its institution that no node trains on, and `nonmember_data`,
  learners drawn like the node's own that it never trains on (membership-inference controls);
- `institutions`, `learners`: the population an institution draws and the learners' latents;
- `text`, `clickstream`, `tabular`, `signals`, `handwriting`: one generator per modality;
- `draws`: the seeded streams and link function the generators share;
- `oulad`: `load_oulad`.

A node's own data folder (format: `m3tgossip/docs/data.md`):

- `manifest`, `tables`: the manifest and the CSV / JSON-lines files, errors by file, row, field;
- `folder`: `read_folder`, a folder as read; `inputs`: images, signals and event names fitted to
  the encoders; `adapt`: `Adapter`, the preprocessing fitted on a node's training records;
- `node_folder`: `load_node_folder`, a node's train and test records from its folder;
- `check`: what `m3tgossip data check` prints; `writer`: `write_folder`;
- `example`, `oulad_partition`: the built-in federation and OULAD written as folders.
"""

from m3tgossip.edu.data.config import DataConfig
from m3tgossip.edu.data.federation import (
    NONMEMBER_RECORDS,
    UNSEEN_RECORDS,
    node_data,
    node_records,
    nonmember_data,
    pooled_data,
    unseen_data,
)
from m3tgossip.edu.data.institutions import institution_profile
from m3tgossip.edu.data.oulad import load_oulad
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import (
    CLICK_LEN,
    CLICK_TOKENS,
    CLICK_VOCAB,
    GROUP_ATTRIBUTES,
    IMAGE_SHAPE,
    MODALITIES,
    PRIME_DIGITS,
    SIGNAL_CHANNELS,
    SIGNAL_SHAPE,
    TABULAR_DIM,
    TABULAR_FEATURES,
    TASKS,
    TOKEN_ID,
    answer_token,
)

__all__ = [
    "CLICK_LEN",
    "CLICK_TOKENS",
    "CLICK_VOCAB",
    "GROUP_ATTRIBUTES",
    "IMAGE_SHAPE",
    "MODALITIES",
    "PRIME_DIGITS",
    "SIGNAL_CHANNELS",
    "SIGNAL_SHAPE",
    "TABULAR_DIM",
    "TABULAR_FEATURES",
    "TASKS",
    "TOKEN_ID",
    "DataConfig",
    "EduData",
    "answer_token",
    "institution_profile",
    "load_oulad",
    "node_data",
    "nonmember_data",
    "NONMEMBER_RECORDS",
    "unseen_data",
    "UNSEEN_RECORDS",
    "node_records",
    "pooled_data",
]
