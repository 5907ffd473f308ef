"""The M3T model (paper, Figure 1) as nodes train it: components, encoders, PEFT wiring, exact LoRA.

- `config`: `M3TConfig`, the sizes;
- `layers`, `encoders`, `m3t`: the architecture (modality encoders, fusion, backbone, prompts,
  heads) and `Batch`, its input;
- `pretrained`: the frozen MiniLM text model, the shipped base checkpoint, backbones from
  transformers folders;
- `lora`: LoRA through PEFT, exact-averaging (`frozen_a`) and `separate` modes;
- `components`: names, sharing policies, seeds, flat parameter vectors;
- `node_model`: `build_node_model`, the model one node holds and the vectors it shares.
"""

from m3tgossip.edu.model.components import POLICIES, TEXT_MODEL, Component
from m3tgossip.edu.model.config import M3TConfig
from m3tgossip.edu.model.lora import LORA_MODES, LoraSpec
from m3tgossip.edu.model.m3t import Batch, M3TModel
from m3tgossip.edu.model.node_model import COMPUTE_TIERS, NodeModel, build_node_model
from m3tgossip.edu.model.pretrained import DEFAULT_CHECKPOINT, SentenceEncoder

__all__ = [
    "COMPUTE_TIERS",
    "DEFAULT_CHECKPOINT",
    "LORA_MODES",
    "POLICIES",
    "TEXT_MODEL",
    "Batch",
    "Component",
    "LoraSpec",
    "M3TConfig",
    "M3TModel",
    "NodeModel",
    "SentenceEncoder",
    "build_node_model",
]
