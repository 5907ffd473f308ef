"""Education data for the `edu` workload: the built-in multi-modal generator and real-data loaders.

`node_data` gives a node its own records from its topology entry and the federation seed;
`load_oulad` reads the Open University Learning Analytics Dataset into the same `EduData` form.
"""

from m3tgossip.edu.data.edu import (
    CLICK_LEN,
    CLICK_TOKENS,
    CLICK_VOCAB,
    GROUP_ATTRIBUTES,
    IMAGE_SHAPE,
    MODALITIES,
    SIGNAL_CHANNELS,
    SIGNAL_SHAPE,
    TABULAR_DIM,
    TABULAR_FEATURES,
    TASKS,
    DataConfig,
    EduData,
    institution_profile,
    node_data,
    node_records,
    pooled_data,
)
from m3tgossip.edu.data.oulad import load_oulad

__all__ = [
    "CLICK_LEN",
    "CLICK_TOKENS",
    "CLICK_VOCAB",
    "GROUP_ATTRIBUTES",
    "IMAGE_SHAPE",
    "MODALITIES",
    "SIGNAL_CHANNELS",
    "SIGNAL_SHAPE",
    "TABULAR_DIM",
    "TABULAR_FEATURES",
    "TASKS",
    "DataConfig",
    "EduData",
    "institution_profile",
    "load_oulad",
    "node_data",
    "node_records",
    "pooled_data",
]
