"""Writing records (`EduData`) as a node's data folder, the format `folder.read_folder` reads.

The producers of folders (`example`: the built-in federation, `oulad_partition`: OULAD) write
through `write_folder`: labels.csv (the record index, with learner_id and the split),
learners.csv (group attributes), and the file of each modality the records have.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m3tgossip.edu.data.manifest import FILENAME, manifest_text
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import CLICK_TOKENS, TABULAR_FEATURES

#: class names the producers write for each task (index = class)
CLASS_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "at_risk": ("binary", ("no", "yes")),
    "engagement": ("ordinal", ("low", "medium", "high")),
    "stress": ("binary", ("no", "yes")),
    "handwriting": ("binary", ("wrong", "right")),
    "next_response": ("binary", ("wrong", "right")),
}
#: manifest settings for records already on the encoders' scales (the built-in generator)
ENCODER_SCALE = {
    "tabular": {"standardize": False},
    "signal": {"standardize": False},
    "image": {"invert": False, "crop": False},
}


#: what `write_folder` writes (and removes first from a folder it rewrites)
WRITTEN = (
    FILENAME,
    "labels.csv",
    "learners.csv",
    "tabular.csv",
    "clickstream.csv",
    "text.jsonl",
    "images.csv",
    "signal.csv",
    "images",
    "signal",
)


def _clear(out: Path) -> None:
    """Make `out` an empty place for a folder: remove what an earlier `write_folder` wrote;
    refuse a folder that holds anything else."""
    if not out.exists():
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN)
    if others:
        raise FileExistsError(f"{out} holds other files ({', '.join(others[:3])}); not writing")
    for name in WRITTEN:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _number(x: float) -> str:
    return format(float(x), ".9g")


def _csv(path: Path, header: Sequence[str], rows: Any) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_folder(
    out: str | Path,
    data: EduData,
    *,
    records: Sequence[str],
    learners: Sequence[str],
    modalities: Sequence[str],
    tasks: Sequence[str],
    node: str | None = None,
    test: np.ndarray | None = None,
    description: str = "",
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write `data` (one record per entry of `records`, of learner `learners[i]`) into the
    folder `out` (rewritten if an earlier call wrote it): the `modalities` it has, labels for
    `tasks`, `test` (bool per record) as the split column."""
    out = Path(out)
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(data)
    if len(records) != n or len(learners) != n:
        raise ValueError(f"{n} records, {len(records)} record ids, {len(learners)} learner ids")
    has = [m for m in modalities if data.present[m].any()]
    header = ["record_id", "learner_id", *tasks] + (["split"] if test is not None else [])
    rows = []
    for i in range(n):
        row = [records[i], learners[i]]
        row += [CLASS_NAMES[t][1][y] if (y := int(data.labels[t][i])) >= 0 else "" for t in tasks]
        if test is not None:
            row.append("test" if test[i] else "train")
        rows.append(row)
    _csv(out / "labels.csv", header, rows)
    groups = [g for g, v in data.groups.items() if (np.asarray(v) != "unknown").any()]
    first: dict[str, int] = {}
    for i, learner in enumerate(learners):
        first.setdefault(learner, i)
    _csv(
        out / "learners.csv",
        ["learner_id", *groups],
        ([lr, *(str(data.groups[g][i]) for g in groups)] for lr, i in first.items()),
    )
    ids = [(i, records[i], learners[i]) for i in range(n)]
    if "tabular" in has:
        _csv(
            out / "tabular.csv",
            ["learner_id", "record_id", *TABULAR_FEATURES],
            (
                [lr, r, *map(_number, data.tabular[i])]
                for i, r, lr in ids
                if data.present["tabular"][i]
            ),
        )
    if "clickstream" in has:
        _csv(
            out / "clickstream.csv",
            ["learner_id", "record_id", "t", "event"],
            (
                [lr, r, t, CLICK_TOKENS[tok]]
                for i, r, lr in ids
                if data.present["clickstream"][i]
                for t, tok in enumerate(data.clickstream[i])
                if tok
            ),
        )
    if "text" in has:
        with open(out / "text.jsonl", "w", encoding="utf-8") as handle:
            for i, r, _ in ids:
                if data.present["text"][i] and data.text[i]:
                    handle.write(json.dumps({"record_id": r, "text": data.text[i]}) + "\n")
    if "image" in has:
        (out / "images").mkdir()
        index = []
        for i, r, _ in ids:
            if data.present["image"][i]:
                name = f"images/{i:06d}.png"
                pixels = np.rint(np.clip(data.image[i, 0], 0, 1) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(out / name)
                index.append([r, name])
        _csv(out / "images.csv", ["record_id", "file"], index)
    if "signal" in has:
        (out / "signal").mkdir()
        index = []
        for i, r, _ in ids:
            if data.present["signal"][i]:
                name = f"signal/{i:06d}.npy"
                np.save(out / name, data.signal[i].astype(np.float32))
                index.append([r, name])
        _csv(out / "signal.csv", ["record_id", "file"], index)
    files = {m: f for m, f in (("image", "images.csv"), ("signal", "signal.csv")) if m in has}
    text = manifest_text(
        node=node,
        modalities=has,
        tasks={t: CLASS_NAMES[t] for t in tasks},
        groups=groups,
        description=description,
        files=files,
        settings=settings,
    )
    (out / FILENAME).write_text(text, encoding="utf-8")
    return out
