"""Components: the named parts of the M3T model, their sharing policies, seeds and flat vectors.

Names: `encoder.<modality>`, `fusion`, `backbone`, `prompt.<task>`, `head.<task>`, plus the frozen
text model `encoder.text.minilm`. Policies on a node:

- `shared`: trained here and gossiped with the other holders;
- `local`: trained here, never sent (listed in the node's `local`);
- `frozen`: not trained here (pretrained weights only), never sent.

`FlatParameters` makes a component's trainable tensors views into one flat float32 tensor, so the
numpy array the daemon mixes *is* the model's storage: mixing in place updates the model with
no copy, and every optimiser step shows in the array.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: `followed`: mixed with its holders like `shared` but never trained here (the adapters of a
#: `lite` node's encoders, fusion and backbone)
POLICIES = ("shared", "local", "followed", "frozen")
#: the frozen sentence encoder under `encoder.text` (never trained, never sent)
TEXT_MODEL = "encoder.text.minilm"
_KINDS = {"encoders": "encoder", "prompts": "prompt", "heads": "head"}
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Component:
    """One component as a node holds it."""

    name: str
    policy: str
    #: every parameter, frozen base and trainable
    params: int
    #: parameters trained on this node (the floats sent per round if the policy is `shared`)
    trainable: int


def module_name(name: str) -> str:
    """A parameter or module name inside the base model, with PEFT's wrapping removed."""
    name = name.removeprefix(_PEFT_PREFIX)
    return name.replace(".modules_to_save.default", "").replace(".default", "")


def component_of(name: str) -> str:
    """The component a parameter belongs to: `encoders.image.mlp.fc1.lora_B.default.weight` ->
    `encoder.image`, `backbone.blocks.0.attn.q.base_layer.weight` -> `backbone`."""
    parts = name.removeprefix(_PEFT_PREFIX).split(".")
    if parts[0] in _KINDS:
        return f"{_KINDS[parts[0]]}.{parts[1]}"
    return parts[0]


def component_seed(name: str, seed: int) -> int:
    """A 63-bit seed for `name` under federation seed `seed` (the same on every machine)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded(name: str, seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded for `name`, restoring the RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(name, seed))
        yield


class FlatParameters:
    """A component's trainable parameters, re-pointed to be views into one flat float32 tensor.

    The parameters stay ordinary leaf `nn.Parameter`s (the optimiser updates them in place, which
    writes the flat storage); `array` is a numpy view of the same memory.
    """

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.flat = torch.empty(sum(p.numel() for p in self.params), dtype=torch.float32)
        offset = 0
        for p in self.params:
            view = self.flat[offset : offset + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            offset += p.numel()
        self.array: np.ndarray = self.flat.numpy()

    def __len__(self) -> int:
        return self.flat.numel()

    def flatten(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Per-parameter tensors shaped like `params` (e.g. optimiser moments) as one flat array."""
        return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy()

    def unflatten(self, array: np.ndarray) -> list[torch.Tensor]:
        """The inverse of `flatten`: new tensors shaped like `params`."""
        flat = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        sizes = [p.numel() for p in self.params]
        return [t.view_as(p) for t, p in zip(flat.split(sizes), self.params, strict=True)]
