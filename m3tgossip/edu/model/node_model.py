"""The M3T model as one node holds it: its components only, PEFT wiring, flat shared vectors.

Hard personalization: a node builds the encoders of its modalities and the prompts and heads of
its tasks, nothing else (a node without text does not even load MiniLM). Soft personalization:
components in the node's `local` are trained but never exposed for sharing.

Resource-aware participation by compute tier:

- `full`: LoRA adapters on the encoders, fusion and backbone, plus prompts and heads, are
  trained; it shares every component it holds except its `local` ones.
- `lite`: only prompts and heads are trained. It holds the encoder, fusion and backbone
  adapters like a full node and mixes them with their other holders every round, but never
  trains them (policy `followed`): it runs the federation's adapters without paying for their
  gradients, and its copies carry nothing of its own records (they start from the seeded
  initial adapters and change only by mixing what neighbours sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import MODALITIES, TASKS
from m3tgossip.edu.model.components import TEXT_MODEL, Component, FlatParameters, component_of
from m3tgossip.edu.model.config import M3TConfig
from m3tgossip.edu.model.lora import LoraSpec, attach_lora, delta_weights, load_lora
from m3tgossip.edu.model.m3t import Batch, M3TModel
from m3tgossip.edu.model.pretrained import (
    DEFAULT_CHECKPOINT,
    Checkpoint,
    SentenceEncoder,
    folder_digest,
    load_checkpoint,
    load_sentence_encoder,
    load_transformers_backbone,
    minilm_release,
)
from m3tgossip.log import get_logger

log = get_logger(__name__)

COMPUTE_TIERS = ("full", "lite")
#: bump when the component layout (what a shared vector holds, in which order) changes
LAYOUT_VERSION = 2


class NodeLike(Protocol):
    """What the model reads of a topology node (`m3tgossip.topology.spec.NodeSpec` fits)."""

    @property
    def modalities(self) -> tuple[str, ...]: ...
    @property
    def tasks(self) -> tuple[str, ...]: ...
    @property
    def compute(self) -> str: ...
    @property
    def local(self) -> tuple[str, ...]: ...


class NodeModel(nn.Module):
    """A node's M3T model: `net` is the PEFT-wrapped M3T model.

    `followed` names components whose adapters are mixed with their holders but not trained
    here (a `lite` node's encoders, fusion and backbone); a followed component in `local` would
    neither train nor mix, so it is frozen at its initial adapters instead.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        local: Sequence[str],
        text_encoder: SentenceEncoder | None,
        identity: dict[str, Any],
        followed: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.net = net
        self.modalities = self.base.modalities
        self.tasks = self.base.tasks
        self.text_encoder = text_encoder
        #: what must match between peers for their shared vectors to mean the same thing
        self.identity = identity
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in net.named_parameters():
            if p.requires_grad:
                groups.setdefault(component_of(name), []).append((name, p))
        for c in set(followed) & set(groups):
            for _, p in groups[c]:
                p.requires_grad_(False)
            if c in local:
                del groups[c]
        #: components mixed with their holders but never trained here
        self.followed = frozenset(c for c in followed if c in groups)
        self.flat = {c: FlatParameters(groups[c]) for c in sorted(groups)}
        self.policies = {c: self._policy(c, local) for c in self.held()}
        self._vectors = {c: f.array for c, f in self.flat.items()}
        self._shared = {
            c: a for c, a in self._vectors.items() if self.policies[c] in ("shared", "followed")
        }

    def _policy(self, component: str, local: Sequence[str]) -> str:
        if component not in self.flat:
            return "frozen"
        if component in local:
            return "local"
        return "followed" if component in self.followed else "shared"

    @property
    def base(self) -> M3TModel:
        """The M3T model inside the PEFT wrapper (its modules carry the adapters)."""
        return self.net.get_base_model() if isinstance(self.net, PeftModel) else self.net

    def held(self) -> list[str]:
        """The trainable-architecture components this node holds, sorted."""
        names = ["backbone", "fusion"]
        names += [f"encoder.{m}" for m in self.modalities]
        names += [f"{kind}.{t}" for t in self.tasks for kind in ("head", "prompt")]
        return sorted(names)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Logits per task."""
        return self.net(batch)

    def components(self) -> list[Component]:
        """Every component held, with policy and sizes; the frozen text model comes last."""
        counts = dict.fromkeys(self.held(), 0)
        for name, p in self.net.named_parameters():
            if ".original_module." not in name:  # PEFT's untouched copy of a modules_to_save
                counts[component_of(name)] += p.numel()
        out = [
            Component(c, self.policies[c], counts[c], len(self.trained_flat().get(c, ())))
            for c in self.held()
        ]
        if self.text_encoder is not None:
            out.append(Component(TEXT_MODEL, "frozen", self.text_encoder.n_params, 0))
        return out

    def trained_flat(self) -> dict[str, FlatParameters]:
        """The flat parameter groups of the components trained here (not the followed ones)."""
        return {c: f for c, f in self.flat.items() if c not in self.followed}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """All trained parameters, component by component in flat-vector order."""
        return [p for f in self.trained_flat().values() for p in f.params]

    def vectors(self) -> dict[str, np.ndarray]:
        """Every component with a flat vector (trained, shared or local, and followed) as a
        float32 view of the model: what a checkpoint keeps."""
        return self._vectors

    def shared_vectors(self) -> dict[str, np.ndarray]:
        """The shared components' flat float32 arrays: views of the model's storage, the same
        objects on every call, so changing them in place changes the model."""
        return self._shared

    def load_shared_vectors(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Copy flat arrays (some or all shared components) into the model."""
        for c, x in vectors.items():
            if c not in self._shared:
                raise KeyError(f"{c!r} is not a shared component of this node")
            target = self._shared[c]
            if np.shape(x) != target.shape:
                raise ValueError(f"{c}: expected {target.shape[0]} floats, got shape {np.shape(x)}")
            target[...] = x

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA weight change s * B A per adapted layer."""
        return delta_weights(self.net)

    def save_pretrained(self, folder: Path) -> None:
        """Write the adapters, prompts and heads in PEFT's own format."""
        if not isinstance(self.net, PeftModel):
            raise ValueError("this model has no PEFT adapters to save")
        self.net.save_pretrained(str(folder))

    def prepare(self, data: EduData) -> Batch:
        """Model inputs for every record of `data` (see `make_batch`)."""
        return make_batch(data, self.modalities, self.text_encoder)


def make_batch(
    data: EduData, modalities: Sequence[str], text_encoder: SentenceEncoder | None
) -> Batch:
    """Tensors of `modalities` for every record. Text goes through the frozen text model here,
    once per data set, so training steps never run it."""
    inputs, present = {}, {}
    for m in modalities:
        present[m] = torch.from_numpy(np.asarray(data.present[m], dtype=bool).copy())
        if m == "text":
            if text_encoder is None:
                raise ValueError("text inputs need the text model")
            x = text_encoder.embed(data.text)
        else:
            x = getattr(data, m)
        inputs[m] = torch.from_numpy(np.ascontiguousarray(x))
    return Batch(inputs, present)


def build_node_model(
    node: NodeLike,
    *,
    seed: int = 0,
    lora: LoraSpec | None = None,
    checkpoint: Path | None = DEFAULT_CHECKPOINT,
    config: M3TConfig | None = None,
    backbone_path: Path | None = None,
    backbone_layers: int | None = None,
    adapters: Path | None = None,
    text_model: Path | None = None,
) -> NodeModel:
    """The model of `node` under federation seed `seed`.

    Base weights of the encoders, fusion and backbone come from `checkpoint` (default: the
    shipped one); with `checkpoint=None` they start from the seed (tests, pretraining) and
    `config` gives the sizes. `backbone_path` swaps in the encoder layers of a local
    transformers folder (`backbone_layers` of them). `adapters` resumes from a `save_pretrained`
    folder. `text_model` overrides the MiniLM folder.
    """
    lora = lora or LoraSpec()
    unknown = [m for m in node.modalities if m not in MODALITIES]
    unknown += [t for t in node.tasks if t not in TASKS]
    if unknown or node.compute not in COMPUTE_TIERS:
        raise ValueError(f"unknown modalities/tasks {unknown} or compute tier {node.compute!r}")
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and config is not None and config != ckpt.config:
        raise ValueError(f"config {config} differs from the checkpoint's {ckpt.config}")
    config = ckpt.config if ckpt is not None else config or M3TConfig()
    backbone, backbone_info = None, None
    if backbone_path is not None:
        backbone, backbone_info = load_transformers_backbone(
            Path(backbone_path), config.d_model, backbone_layers, seed
        )
    base = M3TModel(
        config, node.modalities, {t: TASKS[t] for t in node.tasks}, seed=seed, backbone=backbone
    )
    if ckpt is not None:
        load_base_weights(base, ckpt, backbone_info)
    if adapters is not None:
        net: nn.Module = load_lora(base, lora, Path(adapters))
    else:
        net = attach_lora(base, lora, seed)
    followed: tuple[str, ...] = ()
    if node.compute == "lite":
        followed = ("backbone", "fusion", *(f"encoder.{m}" for m in node.modalities))
    text_encoder = None
    if "text" in node.modalities:
        text_encoder = load_sentence_encoder(text_model)
        if text_encoder.dim != config.text_dim:
            raise ValueError(
                f"text model width {text_encoder.dim} != config.text_dim {config.text_dim}"
            )
    identity = {
        "layout": LAYOUT_VERSION,
        "config": config.to_dict(),
        "checkpoint": ckpt.digest if ckpt is not None else None,
        "backbone": backbone_info,
        "lora": {"rank": lora.rank, "mode": lora.mode, "alpha": lora.alpha},
        "text_model": folder_digest(Path(text_model)) if text_model else minilm_release(),
        "seed": seed,
    }
    # a single-learner node that keeps everything local shares nothing it trains
    local = node.components if getattr(node, "single_learner", None) == "local" else node.local
    return NodeModel(
        net, local=local, text_encoder=text_encoder, identity=identity, followed=followed
    )


def load_base_weights(model: M3TModel, ckpt: Checkpoint, backbone: dict[str, Any] | None) -> None:
    """Copy the checkpoint's encoder, fusion and backbone weights into the components `model`
    holds. A backbone from a transformers folder keeps its own layers; its bridge comes from the
    checkpoint only if the checkpoint was pretrained with that same backbone."""
    if backbone is None and ckpt.backbone is not None:
        raise ValueError(
            f"{ckpt.path} was pretrained with the backbone {ckpt.backbone['name']}: pass its folder"
        )
    with_backbone = ckpt.backbone == backbone
    state = model.state_dict()
    wanted = {
        k: v
        for k, v in ckpt.tensors.items()
        if k in state and (with_backbone or not k.startswith("backbone."))
    }
    bad = [k for k, v in wanted.items() if v.shape != state[k].shape]
    if bad:
        raise ValueError(f"{ckpt.path}: shapes differ from the model for {', '.join(bad[:5])}")
    expected = [
        k
        for k in state
        if k.startswith(("encoders.", "fusion."))
        or (with_backbone and k.startswith("backbone.") and not k.startswith("backbone.layers."))
    ]
    missing = [k for k in expected if k not in wanted]
    if missing:
        raise ValueError(f"{ckpt.path}: no weights for {', '.join(missing[:5])}")
    model.load_state_dict(wanted, strict=False)
    if not with_backbone:
        log.info(
            "backbone %s: its bridge starts from the seed (not in %s)", backbone["name"], ckpt.path
        )
