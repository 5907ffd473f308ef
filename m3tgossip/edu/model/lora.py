"""LoRA through PEFT on the frozen encoders, fusion and backbone, in a form that averages exactly.

A LoRA layer adds s * B A to a frozen weight W. Gossip averages the shared tensors, and averaging
A and B separately is not averaging B A: mean(B_i) mean(A_i) = mean(B_i A_i) + cross terms.

- `frozen_a` (default, as FFA-LoRA): A is drawn from a generator seeded by the federation seed
  and the layer's name, so it is identical on every node, and never trained. Only B is trained
  and shared; then mean(B_i) A = mean(B_i A) exactly.
- `separate`: A (from the same seed) and B are both trained and shared; kept for comparison, its
  cross-term error is what `delta_weights` shows.

Heads, prompts and any new, not pretrained, part of a backbone are PEFT `modules_to_save`:
trained in full and written with the adapters by `save_pretrained`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from m3tgossip.edu.model.components import component_seed, module_name
from m3tgossip.edu.model.m3t import M3TModel
from m3tgossip.edu.model.pretrained import TransformersBackbone

LORA_MODES = ("frozen_a", "separate")
_ADAPTED = ("encoders", "fusion", "backbone")


@dataclass(frozen=True)
class LoraSpec:
    """Rank, mode and scale (alpha / rank) of the adapters."""

    rank: int = 4
    mode: str = "frozen_a"
    alpha: float = 8.0

    def __post_init__(self) -> None:
        if self.mode not in LORA_MODES:
            raise ValueError(f"lora mode: one of {', '.join(LORA_MODES)}, got {self.mode!r}")
        if self.rank < 1:
            raise ValueError(f"lora rank: must be >= 1, got {self.rank}")


def trained_in_full(model: M3TModel) -> list[str]:
    """Modules trained directly: every prompt and head, and a transformers backbone's bridge."""
    names = [f"prompts.{t}" for t in model.tasks] + [f"heads.{t}" for t in model.tasks]
    if isinstance(model.backbone, TransformersBackbone):
        names += [f"backbone.{n}" for n in TransformersBackbone.NEW]
    return names


def lora_targets(model: M3TModel) -> list[str]:
    """The frozen pretrained `nn.Linear` layers of the encoders, fusion and backbone."""
    full = tuple(trained_in_full(model))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.split(".")[0] in _ADAPTED
        and not name.startswith(full)
    ]


def lora_config(model: M3TModel, spec: LoraSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=lora_targets(model),
        modules_to_save=trained_in_full(model),
    )


def lora_layers(net: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-adapted layers by their name in the base model."""
    return {module_name(n): m for n, m in net.named_modules() if isinstance(m, LoraLayer)}


def seed_lora_a(net: nn.Module, seed: int, *, train_a: bool) -> None:
    """Draw every A from the federation seed (PEFT's default distribution, U(-1/sqrt(in),
    1/sqrt(in))) and freeze it unless `train_a`."""
    for name, layer in lora_layers(net).items():
        weight = layer.lora_A["default"].weight
        g = torch.Generator().manual_seed(component_seed(f"lora_A/{name}", seed))
        bound = 1.0 / math.sqrt(weight.shape[1])
        with torch.no_grad():
            weight.copy_((torch.rand(weight.shape, generator=g) * 2 - 1) * bound)
        weight.requires_grad_(train_a)


def attach_lora(model: M3TModel, spec: LoraSpec, seed: int) -> PeftModel:
    """Freeze `model`, wrap it with fresh adapters (B = 0, A from the federation seed)."""
    model.requires_grad_(False)
    net = get_peft_model(model, lora_config(model, spec))
    seed_lora_a(net, seed, train_a=spec.mode == "separate")
    return net


def load_lora(model: M3TModel, spec: LoraSpec, folder: Path) -> PeftModel:
    """Wrap `model` with adapters saved by `save_pretrained` (PEFT's own format) in `folder`."""
    model.requires_grad_(False)
    targets = set(lora_targets(model))
    net = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    saved = net.peft_config["default"]
    if saved.r != spec.rank or set(lora_layers(net)) != targets:
        raise ValueError(
            f"{folder}: adapters of rank {saved.r} on other layers do not fit this model "
            f"(rank {spec.rank})"
        )
    for layer in lora_layers(net).values():
        layer.lora_A["default"].weight.requires_grad_(spec.mode == "separate")
    return net


def delta_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight change s * B A of every adapted layer, by layer name."""
    out = {}
    for name, layer in lora_layers(net).items():
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        out[name] = (layer.scaling["default"] * b @ a).detach()
    return out
