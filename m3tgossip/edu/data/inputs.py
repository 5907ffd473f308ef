"""Fitting real inputs to the encoders' fixed shapes: images, signal windows, event names.

- images of any size and mode -> `IMAGE_SHAPE` (1 x 8 x 8, values in [0, 1], ink bright): to
  grey, inverted when the background is light, optionally cropped to the ink, shrunk with
  Pillow's box filter (each pixel the mean of the block it covers, as scikit-learn's digits were
  made) so the longer side fits, and centred on a dark canvas;
- signal windows of any length and channel count -> `SIGNAL_SHAPE` (64 steps x 4 channels):
  channels named like `SIGNAL_CHANNELS` take their slot, others fill the free slots in order
  (extra channels are dropped); the length is resampled linearly to 64 steps, or cropped to the
  last 64 (shorter windows padded at the start with their first value);
- clickstream event names -> token ids in [1, `CLICK_VOCAB`): built-in token names and OULAD
  activity types keep their ids, a node's own event names take the unused ids by frequency,
  the rest are hashed (the same id on every machine).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from m3tgossip.edu.data.oulad import ACTIVITY_TOKENS
from m3tgossip.edu.data.schema import (
    CLICK_TOKENS,
    CLICK_VOCAB,
    IMAGE_SHAPE,
    SIGNAL_CHANNELS,
    SIGNAL_SHAPE,
    TOKEN_ID,
)

#: event name -> token id for the names every node knows
BUILTIN_EVENTS: dict[str, int] = {
    **{k: TOKEN_ID[v] for k, v in ACTIVITY_TOKENS.items()},
    **{name: i for i, name in enumerate(CLICK_TOKENS) if i},
}
#: token ids no built-in name uses: a node's own event names take these first
FREE_IDS = tuple(range(len(CLICK_TOKENS), CLICK_VOCAB))
#: a pixel counts as ink (for cropping) above this value
INK = 0.25


def fit_image(image: Image.Image, *, invert: str | bool = "auto", crop: bool = True) -> np.ndarray:
    """float32 `IMAGE_SHAPE` from a Pillow image of any size (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)  # transparency shows as paper
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if invert == "auto":
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        invert = bool(border.mean() > 0.5)
    if invert:
        grey = 1.0 - grey
    if crop:
        rows, cols = np.flatnonzero((grey > INK).any(axis=1)), np.flatnonzero((grey > INK).any(0))
        if len(rows) and len(cols):
            grey = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    _, h, w = IMAGE_SHAPE
    scale = min(h / grey.shape[0], w / grey.shape[1])
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BOX), dtype=np.float32)
    out = np.zeros((h, w), np.float32)
    top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return np.clip(out, 0.0, 1.0)[None]


def channel_slots(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """For input channels `names` (in column order): the `SIGNAL_CHANNELS` slot of each (-1:
    dropped) and the names of the dropped ones."""
    slots = [SIGNAL_CHANNELS.index(n) if n in SIGNAL_CHANNELS else -1 for n in names]
    free = [i for i in range(len(SIGNAL_CHANNELS)) if i not in slots]
    for k, slot in enumerate(slots):
        if slot < 0 and free:
            slots[k] = free.pop(0)
    return slots, [n for n, s in zip(names, slots, strict=True) if s < 0]


def fit_signal(x: np.ndarray, slots: Sequence[int], fit: str = "resample") -> np.ndarray:
    """float32 `SIGNAL_SHAPE` from a window [T, C] (or [T]) whose column k goes to `slots[k]`."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    steps, channels = SIGNAL_SHAPE
    t = len(x)
    if fit == "resample":
        if t == 1:
            window = np.repeat(x, steps, axis=0)
        else:
            grid = np.linspace(0, t - 1, steps)
            window = np.stack(
                [np.interp(grid, np.arange(t), x[:, k]) for k in range(x.shape[1])], 1
            )
    elif fit == "crop":
        window = x[-steps:]
        if len(window) < steps:
            window = np.pad(window, ((steps - len(window), 0), (0, 0)), mode="edge")
    else:
        raise ValueError(f"signal fit: resample or crop, got {fit!r}")
    out = np.zeros((steps, channels), np.float32)
    for k, slot in enumerate(slots):
        if slot >= 0:
            out[:, slot] = window[:, k]
    return out


def hashed_id(name: str) -> int:
    """A token id in [1, CLICK_VOCAB) from the event name alone."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "little") % (CLICK_VOCAB - 1)


def build_vocabulary(counts: Counter[str]) -> dict[str, int]:
    """Ids for a node's own event names (not built-in ones): the most frequent (ties by name)
    take `FREE_IDS`; the others are left to `hashed_id`."""
    own = sorted((n for n in counts if n not in BUILTIN_EVENTS), key=lambda n: (-counts[n], n))
    return dict(zip(own, FREE_IDS, strict=False))


def event_ids(events: Sequence[str], vocabulary: dict[str, int]) -> list[int]:
    """Token ids of event names under a node's `vocabulary`."""
    return [BUILTIN_EVENTS.get(e) or vocabulary.get(e) or hashed_id(e) for e in events]
